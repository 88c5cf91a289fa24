"""The toy world's subcommands: ``demo`` (the README's main job), ``bench``, ``measure``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import command, out_path, print_result


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concept", default="red",
                   help="a concept of the toy world: colour, shape, size, position, background or a synonym")
    p.add_argument("--preserve", nargs="*", default=None,
                   help="preservation concepts (default: the other values of the attribute)")
    p.add_argument("--steps", type=int, default=1000, help="Z-Erase steps (paper: 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=out_path, default=Path("out/demo"))
    p.add_argument("--n-eval", type=int, default=100, help="prompts per evaluation set (robustness sets: half)")
    p.add_argument("--resume", action="store_true",
                   help="continue the training run a stopped demo left in --out (or extend it with more --steps)")


@command("demo", "erase a concept from the built-in toy model and measure it exactly", _add_demo)
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    preserve = tuple(args.preserve) if args.preserve is not None else None
    report = run_demo(args.concept, preserve, args.steps, args.seed, args.out, args.n_eval, resume=args.resume)
    keys = ("concept", "acc_e", "acc_ir", "h_a", "fd_before", "fd_after", "seconds")
    extra = {"original_acc_e": report["original"]["acc_e"], "out": str(args.out)}
    print_result(json.dumps({k: report[k] for k in keys} | extra))
    return 0


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", nargs="+", default=["red", "circle", "left"], help="one per attribute type by default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300, help="Z-Erase steps per trained cell")
    p.add_argument("--n-eval", type=int, default=24, help="prompts per evaluation set (the committed table's 24)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all)")
    p.add_argument("--out", type=out_path, default=Path("out/bench"),
                   help="folder for the cells and the table (the committed one is docs/bench/toy)")
    p.add_argument("--assemble-only", action="store_true", help="write the table from the cells already measured")


@command("bench", "the paper's comparison table on the toy world (Markdown + JSON, resumable)", _add_bench)
def _bench(args: argparse.Namespace) -> int:
    from ..bench.report import command_line
    from .bench import run_bench

    cmd = command_line(args.argv)
    run_bench(args.concepts, args.seeds, args.steps, args.n_eval, args.out, args.methods, cmd,
              assemble_only=args.assemble_only)
    print_result((args.out / "bench.md").read_text(encoding="utf-8"))  # written as UTF-8 (↓, ±), whatever the locale
    return 0


def _add_measure(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", type=Path, help="erasure LoRA files, applied together (none: the original)")
    p.add_argument("--concepts", nargs="+", default=[], help="concepts to measure (default: the files' own)")
    p.add_argument("--n-eval", type=int, default=100, help="prompts per evaluation set, as demo's --n-eval")
    p.add_argument("--seed", type=int, default=0, help="as demo's --seed: its report's prompts and images")


@command("measure", "toy world: erasure of LoRA files applied together (a merge, several stacked), per concept",
         _add_measure)
def _measure(args: argparse.Namespace) -> int:
    from .measure import measure

    print_result(json.dumps(measure(args.files, args.concepts, args.n_eval, args.seed), indent=2))
    return 0
