"""Same-process A/B of the attention-mass rows: the widened attention on every batch row (as before aebbb3e) against
only the rows with concept columns (now), pool steps at λ > 0 on the tiny diffusers Z-Image of ``bench-cost``.

    python scripts/ab_attention_rows.py --resolution 512 --rounds 6 --out docs/bench/attention_rows/ab_1024_tokens.json
    python scripts/ab_attention_rows.py --toy --rounds 8          # bench-cost's toy row (64 image tokens)

Rounds alternate which side runs first; the times are CPU seconds (``time.process_time``), steadier than wall time on
a shared machine. Prints one line per round and the median ratio (now ÷ before; below 1 is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zerase_core.backends import base  # noqa: E402
from zerase_core.bench.cost import _toy_case, base_config, bench_tiny_backend  # noqa: E402
from zerase_core.trainer import ZEraseTrainer  # noqa: E402

NOW = base._leading_rows


def seconds_per_step(trainer: ZEraseTrainer, rows_only: bool, steps: int) -> float:
    """CPU seconds per training step with the mass on the concept rows only (now) or on every row (before)."""
    base._leading_rows = NOW if rows_only else (lambda tokens: None)
    start = time.process_time()
    for _ in range(steps):
        trainer.train_step()
    return (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--toy", action="store_true", help="bench-cost's toy row instead of the tiny Z-Image")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="steps per side per round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pinned = dict(xt_pool=2, lambda_mode="fixed", fixed_lambda=1.0)  # every step the batch-3 path
    if args.toy:
        case = _toy_case()
        if case is None:
            sys.exit("--toy needs the toy's weights, which are not found (see zerase_core.toy.DIT_FILE)")
        trainer = ZEraseTrainer(case.backend, dataclasses.replace(case.config, **pinned))
        args.resolution = case.config.height
    else:
        config = base_config(height=args.resolution, width=args.resolution, **pinned)
        trainer = ZEraseTrainer(bench_tiny_backend(), config)
    for rows_only in (True, False):  # warm-up
        seconds_per_step(trainer, rows_only, 1)
    rounds = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        times = {rows_only: seconds_per_step(trainer, rows_only, args.steps) for rows_only in order}
        rounds.append({"now_s": times[True], "before_s": times[False], "ratio": times[True] / times[False]})
        print(f"round {r}: now {times[True]:.4f} s, before {times[False]:.4f} s, ratio {rounds[-1]['ratio']:.3f}")
    ratios = [x["ratio"] for x in rounds]
    result = {"image_tokens": trainer.backend.image_tokens(args.resolution, args.resolution),
              "command": " ".join(sys.argv), "torch": torch.__version__, "threads": 1, "rounds": rounds,
              "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}
    print(f"median ratio {result['median_ratio']:.3f} ({result['min_ratio']:.3f}–{result['max_ratio']:.3f}) at "
          f"{result['image_tokens']} image tokens")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
