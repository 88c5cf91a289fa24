"""Opt-in check of the shipped toy model's prompt adherence (slow: minutes on a CPU).

    python -m zerase_core.toy.report [--n 200] [--styles canonical synonym shuffled paraphrase]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from . import evaluate_adherence, load_toy
from .world import PROMPT_STYLES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="prompts per style (each names every attribute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--styles", nargs="+", default=list(PROMPT_STYLES), choices=PROMPT_STYLES)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    bundle = load_toy()
    print(f"sampler: {bundle.sampling}  (weights step {bundle.metadata.get('step')})")
    for style in args.styles:
        t0 = time.time()
        acc = evaluate_adherence(bundle, args.n, args.seed, style)
        cells = "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
        print(f"{style:<11} {cells}  ({time.time() - t0:.0f} s, n={args.n})")


if __name__ == "__main__":
    main()
