"""The toy world's subcommands: ``demo`` (the README's main job)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import command


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concept", default="red", help="a concept of the toy world: colour, shape, size, position, background or a synonym")
    p.add_argument("--preserve", nargs="*", default=None, help="preservation concepts (default: the other values of the attribute)")
    p.add_argument("--steps", type=int, default=1000, help="Z-Erase steps (paper: 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--n-eval", type=int, default=200, help="prompts per evaluation set")


@command("demo", "erase a concept from the built-in toy model and measure it exactly", _add_demo)
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    preserve = tuple(args.preserve) if args.preserve is not None else None
    report = run_demo(args.concept, preserve, args.steps, args.seed, args.out, args.n_eval)
    keys = ("concept", "acc_e", "acc_ir", "h_a", "fd_before", "fd_after", "seconds")
    print(json.dumps({k: report[k] for k in keys} | {"original_acc_e": report["original"]["acc_e"], "out": str(args.out)}))
    return 0
