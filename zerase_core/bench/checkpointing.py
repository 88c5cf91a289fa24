"""``python -m zerase_core bench-checkpointing``: what checkpointing the first k main layers costs and saves.

``"auto"`` checkpoints as few main layers as let a step fit (:mod:`..memory_fit`), on the model that each one
checkpointed costs its forward once more in backward and keeps only its input. This measures both on one model:
a Z-Erase step at λ > 0 (the batch-3 [c_er, ∅, c_pr] student forward/backward with the attention mass, x_t from the
pool) with k = 0 … all of the main layers checkpointed, timed interleaved (:func:`.timing.interleaved_medians`),
and beside each its peak memory above where the step started (on a GPU the allocator's; on the CPU, which keeps no
such statistics, from the profiler's allocation and free events in time order), the recomputation's own included.
Ratios are against k = 0 in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..cli import command, out_path
from ..errors import ZEraseError
from ..memory_fit import most_checkpointed
from .memory import cpu_peak_bytes, least_squares_slope
from .report import check_out, emit
from .timing import check_timing, device_sync, interleaved_medians, peak_gib


def measure(backend, config, counts: list[int], steps: int, repeats: int) -> dict:
    """Seconds per step and peak memory, for each count of checkpointed layers in ``counts`` (the first of them, 0
    unless told otherwise, is what the ratios are taken against)."""
    from ..trainer import ZEraseTrainer

    config = dataclasses.replace(config, lambda_mode="fixed", fixed_lambda=1.0, gradient_checkpointing="off")
    trainer = ZEraseTrainer(backend, config)  # λ pinned > 0: every step is the batch-3 one

    def switch(k: int) -> None:  # untimed: in ComfyUI a change of patches reloads the model at its next use
        backend.set_gradient_checkpointing(k)
        backend.load()

    variants = {k: trainer.train_step for k in counts}
    sync = device_sync(backend)
    seconds = interleaved_medians(variants, steps, repeats, sync, switch=switch)
    if backend.device.type == "cuda":
        peak = {k: gib * 2**30 for k, gib in peak_gib(variants, sync, switch).items()}
    else:
        peak = {}
        for k, fn in variants.items():
            switch(k)
            peak[k] = float(cpu_peak_bytes(fn))
    base = counts[0]
    rows = [{"checkpointed_layers": k, "seconds_per_step": seconds[k], "time_ratio": seconds[k] / seconds[base],
             "peak_mib": peak[k] / 2**20, "peak_ratio": peak[k] / peak[base]} for k in counts]
    return {"device": str(backend.device), "model": backend.fingerprint(),
            "image_tokens": backend.image_tokens(config.height, config.width),
            "layers": backend.n_layers, "height": config.height, "rows": rows,
            "added_time_per_layer_s": _slope(rows, "seconds_per_step"),
            "peak_saved_mib_per_layer": -_slope(rows, "peak_mib")}


def _slope(rows: list[dict], key: str) -> float:
    """Least-squares change of ``key`` per checkpointed layer: the linear model's per-layer figure."""
    return least_squares_slope([r["checkpointed_layers"] for r in rows], [r[key] for r in rows])


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=8, help="main layers of the tiny Z-Image (dim 128) measured")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (512: 1024 image tokens)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round and variant")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--out", type=out_path)


@command("bench-checkpointing", "seconds and peak memory of a step with k of the main layers checkpointed",
         _add)
def _bench_checkpointing(args: argparse.Namespace) -> int:
    from .cost import base_config, bench_tiny_backend

    check_timing(args.steps, args.repeats)
    check_out(args.out)
    if args.layers < 1:
        raise ZEraseError(f"--layers must be at least 1; got {args.layers}.")
    backend = bench_tiny_backend(n_layers=args.layers)
    config = base_config(height=args.resolution, width=args.resolution, sample_steps=2, xt_pool=1)
    # quarters of the layers, and all but the last: what "on" checkpoints (memory_fit.most_checkpointed)
    counts = sorted({round(args.layers * f) for f in (0, 0.25, 0.5, 0.75, 1)} | {most_checkpointed(args.layers)})
    result = measure(backend, config, counts, args.steps, args.repeats)
    emit(result, args)
    for r in result["rows"]:
        print(f"{r['checkpointed_layers']:>3} of {result['layers']} checkpointed: {r['seconds_per_step']:.3f} s/step "
              f"(×{r['time_ratio']:.2f}), peak {r['peak_mib']:.1f} MiB (×{r['peak_ratio']:.2f})", file=sys.stderr)
    return 0
