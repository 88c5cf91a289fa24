"""Reproduce the shipped toy weights: the classifier, then the DiT in the phases it was trained in.

    python scripts/train_toy.py --run-dir /tmp/toy_run [--threads 1]

The DiT run was steered while it trained (see zerase_core/toy/weights/README.md): each phase
below resumes the previous one's checkpoint with new settings, and stops where the original
run switched. Batches are a pure function of (seed, step), so the phases replay it exactly up
to floating-point nondeterminism. About 75 minutes of one CPU core for the DiT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zerase_core.toy.train import main as train_main  # noqa: E402
from zerase_core.toy.weights_io import WEIGHTS_DIR  # noqa: E402

# (stop at step, extra arguments). "--steps" sets the cosine schedule's length for that phase; the
# last phase stopped at 7500 of 8000 when adherence had met the target (time budget).
PHASES: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1340, ("--steps", "7000")),
    (2293, ("--steps", "6000", "--sigma-mean", "0.5")),
    (3849, ("--steps", "6000", "--sigma-mean", "0.5", "--edge-weight", "4")),
    (7500, ("--steps", "8000", "--sigma-mean", "0.5", "--edge-weight", "8", "--eval-every", "750")),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--threads", default="1")
    parser.add_argument("--skip-classifier", action="store_true", help="keep the shipped classifier")
    args = parser.parse_args()
    common = ["--threads", args.threads]
    if not args.skip_classifier:
        train_main(common + ["classifier"])
    export = str(WEIGHTS_DIR / "toy_dit.safetensors")
    for stop_at, extra in PHASES:
        stop = ["--stop-at", str(stop_at)]
        train_main(common + ["dit", "--run-dir", str(args.run_dir), "--export", export, "--batch", "32", *extra, *stop])


if __name__ == "__main__":
    main()
