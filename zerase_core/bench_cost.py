"""``python -m zerase_core bench-cost``: what a Z-Erase step costs, against two yardsticks.

All measured side by side in one process, on the same model, resolution and batch:

* ``speedup_vs_reference`` — seconds per step of :mod:`.reference_step` (the official
  code's organisation) ÷ seconds per step of ours (:class:`~.trainer.ZEraseTrainer` with
  its default settings and the x_t pool, whose one-off build is spread over a
  ``run_steps``-step run and included);
* ``overhead_vs_gated_esd`` — ours ÷ a plain gated ESD step (L_erase only) built from the
  same parts (the paper's figure: 35 / 20 minutes = 1.75);
* attention-loss memory against materialised maps, and the real Z-Image memory estimate
  (:mod:`.bench_memory`, :mod:`.bench_estimate`).

Our step's cost depends on λ: while λ = 0 the preservation term needs only a forward. Both
regimes are timed by pinning λ (``fixed`` mode at 0 and at 1); the headline uses λ > 0,
the dearer one. Timings are medians over steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .cli import command
from .config import TrainConfig
from .lora import LoRAConfig
from .objectives import loss_erase
from .reference_step import reference_step
from .trainer import ZEraseTrainer

log = logging.getLogger(__name__)

RUN_STEPS = 1000  # the pool's build time is spread over a run of this many steps (paper: 1000)


@dataclass(frozen=True)
class SpeedCase:
    name: str
    make_backend: Callable[[], object]
    config: TrainConfig
    image_tokens: int


def gated_esd_step(trainer: ZEraseTrainer) -> None:
    """A plain gated ESD step (Eq. 5 only) with our x_t source, teacher and student parts."""
    pool = trainer.pool
    if trainer.xt_pool is not None:
        d = trainer.xt_pool.draw(trainer.rng, trainer.gen, trainer.backend.device)
        er, x_t, sigma, teacher = pool.erase[d.erase_index], d.x_t, d.sigma, d.teacher[:2]
    else:
        er = pool.erase[trainer.rng.randrange(len(pool.erase))]
        x_t, sigma = trainer._sample_xt(er)
        teacher = trainer._teacher(x_t, sigma, [er, pool.uncond])
    v, _ = trainer.backend.velocity(x_t, sigma, [er], lora=True)
    loss_erase(v, teacher[1:2].to(v.device), teacher[0:1].to(v.device), trainer.config.eta).backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def _median_seconds(fn: Callable[[], object], steps: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(backend) -> Callable[[], None]:
    device = backend.device
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_case(case: SpeedCase, steps: int, run_steps: int = RUN_STEPS) -> dict:
    """Seconds per step of each variant on one freshly built backend."""
    backend = case.make_backend()
    sync = _sync(backend)

    def trainer(**over) -> ZEraseTrainer:
        backend.uninstall()  # each variant starts from the bare model and a fresh LoRA
        return ZEraseTrainer(backend, dataclasses.replace(case.config, **over))

    peaks: dict[str, float] = {}
    on_gpu = backend.device.type == "cuda"

    def timed(fn, name: str):
        if on_gpu:  # peak GiB above what is resident before the variant (weights, pool)
            sync()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = _median_seconds(lambda: (fn(), sync()), steps)
        except torch.OutOfMemoryError:
            log.warning("%s ran out of memory at %d image tokens", name, case.image_tokens)
            peaks[name] = float("inf")
            return float("nan")
        if on_gpu:
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        return seconds

    out: dict = {"model": case.name, "image_tokens": case.image_tokens, "batch": 1,
                 "resolution": [case.config.height, case.config.width]}
    ours = trainer(xt_source="pool", lambda_mode="fixed", fixed_lambda=1.0)
    pool_s = ours.xt_pool.seconds
    out["pool"] = {"trajectories": ours.xt_pool.x.shape[0], "levels": ours.xt_pool.x.shape[1],
                   "build_s": pool_s, "amortised_over_steps": run_steps}
    per_step_pool = pool_s / run_steps
    s = {"ours_lambda_positive": timed(ours.train_step, "ours_lambda_positive") + per_step_pool}
    zero = trainer(xt_source="pool", lambda_mode="fixed", fixed_lambda=0.0)
    s["ours_lambda_zero"] = timed(zero.train_step, "ours_lambda_zero") + per_step_pool
    fresh = trainer(xt_source="fresh", lambda_mode="fixed", fixed_lambda=1.0)
    s["ours_fresh_xt_lambda_positive"] = timed(fresh.train_step, "ours_fresh_xt_lambda_positive")
    esd = trainer(xt_source="pool", preserve=())
    s["gated_esd"] = timed(lambda: gated_esd_step(esd), "gated_esd") + esd.xt_pool.seconds / run_steps
    ref = trainer(xt_source="fresh")
    s["reference"] = timed(lambda: reference_step(ref), "reference")
    del ours, zero, fresh, esd, ref
    backend.uninstall()
    out["seconds_per_step"] = s
    if on_gpu:
        out["peak_gib_above_resident"] = peaks
    out["minutes_per_run"] = {k: v * run_steps / 60 for k, v in s.items()}
    out["speedup_vs_reference"] = s["reference"] / s["ours_lambda_positive"]
    out["speedup_vs_reference_lambda_zero"] = s["reference"] / s["ours_lambda_zero"]
    out["overhead_vs_gated_esd"] = s["ours_lambda_positive"] / s["gated_esd"]
    out["overhead_vs_gated_esd_lambda_zero"] = s["ours_lambda_zero"] / s["gated_esd"]
    return out


def _base_config(**over) -> TrainConfig:
    base = dict(concept="red", preserve=("blue",), templates=("a photo of a {} ball",), steps=RUN_STEPS,
                lora=LoRAConfig(rank=4), xt_pool=8)
    return TrainConfig(**(base | over))


def speed_cases(tiny: bool) -> list[SpeedCase]:
    from .tiny import TinyZImageConfig, tiny_zimage_backend

    if tiny:  # seconds on a CPU: a correctness run of the command, not a measurement
        config = _base_config(height=64, width=64, sample_steps=2, xt_pool=1, shuffle_pool=0)
        return [SpeedCase("tiny-diffusers", tiny_zimage_backend, config, 16)]
    cfg = TinyZImageConfig(dim=128, n_heads=4)
    cases = [SpeedCase("tiny-diffusers", lambda: tiny_zimage_backend(cfg), _base_config(height=px, width=px), tokens)
             for px, tokens in ((256, 256), (512, 1024))]
    toy = _toy_case()
    return ([toy] if toy else []) + cases


def _toy_case() -> SpeedCase | None:
    from .toy import DIT_FILE

    if not DIT_FILE.exists():
        log.warning("toy weights %s not found: the toy row is skipped", DIT_FILE)
        return None
    from .backends.toy import toy_backend
    from .toy import load_toy

    bundle = load_toy()
    s = bundle.sampling
    config = _base_config(height=32, width=32, sample_steps=max(1, s.steps // 2), shift=s.shift, sample_cfg=s.cfg,
                          templates=("a red circle",), preserve=("blue",))
    tokens = (bundle.latent_shape[1] // bundle.dit_config.patch_size) ** 2
    return SpeedCase("toy", lambda: toy_backend(bundle), config, tokens)


def attention_memory(tokens=(256, 1024, 4096), heads: int = 2, head_dim: int = 128) -> dict:
    from .bench_memory import attention_loss_bytes, growth_exponent

    rows = [{"image_tokens": n, "caption_tokens": 64} | attention_loss_bytes(n, 64, heads, head_dim) for n in tokens]
    ours, maps = [r["ours"] for r in rows], [r["materialised"] for r in rows]
    # Saved bytes are linear in heads and layers; the real model has 30 of each, in bf16.
    real = [{"image_tokens": r["image_tokens"],
             "ours_gib": r["ours"] / heads * 30 * 30 / 2 / 2**30,
             "materialised_gib": r["materialised"] / heads * 30 * 30 / 2 / 2**30} for r in rows]
    return {"method": "bytes saved for backward by one layer's attention-mass loss (saved_tensors_hooks), "
                      f"{heads} heads × {head_dim}, fp32, q and k not counted",
            "rows": rows, "growth_exponent": {"ours": growth_exponent(list(tokens), ours),
                                              "materialised": growth_exponent(list(tokens), maps)},
            "real_zimage_all_layers_no_checkpointing": real}


def run(tiny: bool = False, steps: int = 3, memory_estimate: bool = True) -> dict:
    from .bench_estimate import measure_layers, real_zimage_estimate, run_time_estimate

    result = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
              if not torch.cuda.is_available() else torch.cuda.get_device_name(),
              "torch": torch.__version__, "tiny": tiny, "steps_timed": steps,
              "speed": [time_case(c, steps) for c in speed_cases(tiny)]}
    result["attention_loss_memory"] = attention_memory(heads=1 if tiny else 2)
    if memory_estimate and not tiny:
        result["real_zimage_memory_estimate"] = real_zimage_estimate(measure_layers())
        result["real_zimage_run_time_estimate"] = run_time_estimate()
    speed = result["speed"]
    result["summary"] = {
        "min_speedup_vs_reference": min(r["speedup_vs_reference"] for r in speed),
        "max_overhead_vs_gated_esd": max(r["overhead_vs_gated_esd"] for r in speed),
        "max_overhead_vs_gated_esd_lambda_zero": max(r["overhead_vs_gated_esd_lambda_zero"] for r in speed),
        "attention_loss_growth_ours": result["attention_loss_memory"]["growth_exponent"]["ours"],
        "attention_loss_growth_materialised": result["attention_loss_memory"]["growth_exponent"]["materialised"],
    }
    return result


def table(result: dict) -> str:
    """A readable summary of :func:`run`'s JSON."""
    lines = [f"device: {result['device']}", "",
             "model            img tok  ref s/step  ours s/step (λ>0 / λ=0)  ESD s/step  speedup  overhead (λ>0 / λ=0)"]
    for r in result["speed"]:
        s = r["seconds_per_step"]
        lines.append(f"{r['model']:<16} {r['image_tokens']:>7}  {s['reference']:>10.3f}  {s['ours_lambda_positive']:>10.3f} / "
                     f"{s['ours_lambda_zero']:<10.3f}  {s['gated_esd']:>10.3f}  {r['speedup_vs_reference']:>6.2f}×  "
                     f"{r['overhead_vs_gated_esd']:.2f} / {r['overhead_vs_gated_esd_lambda_zero']:.2f}")
    mem = result["attention_loss_memory"]
    lines += ["", "attention loss, saved bytes per layer: image tokens  ours  materialised"]
    lines += [f"  {r['image_tokens']:>6}  {r['ours'] / 2**20:9.2f} MiB  {r['materialised'] / 2**20:9.2f} MiB" for r in mem["rows"]]
    g = mem["growth_exponent"]
    lines.append(f"  growth exponent: ours {g['ours']:.2f}, materialised {g['materialised']:.2f}")
    est = result.get("real_zimage_memory_estimate")
    if est:
        lines += ["", "real Z-Image (estimate): case  needs GiB  budget GB  fits"]
        lines += [f"  {k:<20} {v['needs_gib']:>6.2f}  {v['budget_gb']:>4}  {v['fits']}" for k, v in est["fits"].items()]
        t = result["real_zimage_run_time_estimate"]
        lines.append(f"  1000 steps at 512² on an H100: {t['minutes_all_lambda_zero']:.1f}–{t['minutes_all_lambda_positive']:.1f} min")
    return "\n".join(lines)


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny sizes, seconds: checks the command, measures nothing")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    p.add_argument("--no-estimate", action="store_true", help="skip the real Z-Image memory estimate")
    p.add_argument("--out", type=Path, help="also write the JSON here")


@command("bench-cost", "seconds per Z-Erase step vs the official-style reference and gated ESD; memory", _add)
def _bench_cost(args: argparse.Namespace) -> int:
    result = run(tiny=args.tiny, steps=args.steps, memory_estimate=not args.no_estimate)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)  # stdout stays valid JSON; the table goes to stderr
    print(table(result), file=sys.stderr)
    return 0


from . import xt_compare  # noqa: E402,F401  (registers bench-xt beside bench-cost)
