"""``python -m zerase_core bench-cost``: what a Z-Erase step costs, against two yardsticks.

All measured side by side in one process, on the same model, resolution and batch, for
both x_t sources (``fresh``: ESD sampling every step; ``pool``, the default: trajectories
sampled once, the build spread over a ``run_steps``-step run and included):

* ``speedup_vs_reference_<source>_<λ>`` — seconds per step of :mod:`.reference_step` (the
  official code's organisation, fresh x_t) ÷ seconds per step of ours
  (:class:`~.trainer.ZEraseTrainer`);
* ``overhead_vs_gated_esd_<source>_<λ>`` — ours ÷ a plain gated ESD step (L_erase only)
  with the same x_t source and parts (the paper's figure: 35 / 20 minutes = 1.75);
* ``split_seconds`` — the parts of a step (x_t, teacher, student forward/backward, the
  attention mass, AdamW) so the reader sees where the time goes;
* ``paper_lambda_weighted`` — the two λ regimes weighed by how often the paper's λ rule
  visits them on the toy (:mod:`.lambda_kinds`);
* attention-loss memory against materialised maps, the real Z-Image memory estimate and the
  1000-step H100 composition (:mod:`.memory`, :mod:`.estimate`).

Our step's cost depends on λ: while λ_t = 0 the preservation term runs without a graph.
Both regimes are timed by pinning λ (``fixed`` mode at 0 and at 1). The unsuffixed headline
keys are the default x_t source at λ > 0, the dearer regime. Timings are medians over
``repeats`` interleaved rounds of ``steps`` steps, after one warm-up step per variant.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import platform
import random
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..backends.base import Backend
from ..cli import command, out_path
from ..config import XT_SOURCES, TrainConfig
from ..errors import ZEraseError
from ..lagrangian import rule_for
from ..lora import LoRAConfig
from ..trainer import ZEraseTrainer
from ..xt_pool import TrajectoryPool
from .cost_split import cost_split, make_optimizer_state
from .cost_table import table
from .gated_esd import gated_esd_step
from .reference_step import reference_step
from .report import check_out, emit
from .timing import check_timing, device_sync, interleaved_medians, peak_gib

log = logging.getLogger(__name__)

RUN_STEPS = TrainConfig.steps  # the pool's build time is spread over a run of this many steps (paper: 1000)


@dataclass(frozen=True)
class SpeedCase:
    name: str
    backend: Backend
    config: TrainConfig

    @property
    def image_tokens(self) -> int:
        """Image tokens of the config's picture, as the model cuts it: latent cells over a patch's cells (asked of
        the model, so a row's count cannot disagree with what it timed)."""
        return self.backend.image_tokens(self.config.height, self.config.width)

    @property
    def row(self) -> str:
        """The row's name, as ``--models`` takes it: e.g. ``tiny-diffusers-256``."""
        return f"{self.name}-{self.image_tokens}"


def time_case(case: SpeedCase, steps: int, run_steps: int = RUN_STEPS, repeats: int = 1) -> dict:
    """Seconds per step of each variant on the case's backend, both x_t sources.

    Every pool variant shares one pool (built once, its build time spread over ``run_steps``
    steps and added to the pool variants' per-step seconds); fresh variants sample x_t each step.
    λ is pinned (``fixed`` at 1: the batch-3 student path; at 0: L_pr without a graph).
    """
    backend = case.backend
    sync = device_sync(backend)
    backend.uninstall()
    # One LoRA, optimizer and prompt pool serve every variant (the backend holds one installed LoRA).
    base = ZEraseTrainer(backend, dataclasses.replace(case.config, xt_source="fresh"))
    shared_pool = base.build_pool()  # as xt_source="pool" builds it
    trainers = _variant_trainers(base, shared_pool)
    variants = {name: _step_of(name, t) for name, t in trainers.items()}
    out: dict = {"model": case.name, "image_tokens": case.image_tokens, "batch": 1,
                 "resolution": [base.config.height, base.config.width], "timed": {"steps": steps, "repeats": repeats},
                 "pool": {"trajectories": shared_pool.trajectories, "levels": shared_pool.x.shape[1],
                          "build_s": shared_pool.seconds, "amortised_over_steps": run_steps}}
    peaks = None
    if backend.device.type == "cuda":
        make_optimizer_state(base)  # else the first variant measured would pay for AdamW's buffers
        peaks = peak_gib(variants, sync)  # also each variant's warm-up
    timed = {name: fn for name, fn in variants.items() if not peaks or peaks[name] != float("inf")}
    oom = lambda name: log.warning("%s ran out of memory at %d image tokens", name, case.image_tokens)  # noqa: E731
    s = interleaved_medians(timed, steps, repeats, sync, warm_up=peaks is None, on_oom=oom)
    s = {name: s.get(name, float("nan")) for name in variants}  # out of memory: NaN, as interleaved_medians gives
    for name in s:
        if "_pool" in name:
            s[name] += shared_pool.seconds / run_steps
    out["split_seconds"] = cost_split(trainers["ours_pool_lambda_positive"], steps, repeats, sync)
    del trainers, variants, timed
    backend.uninstall()
    out["seconds_per_step"] = s
    if peaks is not None:
        out["peak_gib_above_resident"] = peaks
    out["minutes_per_run"] = {k: v * run_steps / 60 for k, v in s.items()}
    return out | _ratios(s, out["split_seconds"], run_steps)


def _variant_trainers(base: ZEraseTrainer, shared_pool: TrajectoryPool) -> dict[str, ZEraseTrainer]:
    """Ours at λ pinned > 0 and = 0, and gated ESD, for each x_t source; the reference (fresh x_t)."""
    c = base.config

    def trainer(source: str, **over) -> ZEraseTrainer:
        t = copy.copy(base)  # a shallow copy with its own settings and x_t source
        t.config = dataclasses.replace(c, **over)
        t.lambda_rule = rule_for(t.config)  # its own λ rule: the copy would share the base's, whatever the config says
        t.xt_pool = shared_pool if source == "pool" else None
        # Its own RNGs, seeded alike: every variant draws the same prompts and levels in the
        # same order, so fresh variants sample x_t to the same random depths step by step.
        t.rng, t.gen = random.Random(c.seed), torch.Generator().manual_seed(c.seed)
        return t

    trainers: dict[str, ZEraseTrainer] = {}
    for source in XT_SOURCES:
        trainers[f"ours_{source}_lambda_positive"] = trainer(source, lambda_mode="fixed", fixed_lambda=1.0)
        trainers[f"ours_{source}_lambda_zero"] = trainer(source, lambda_mode="fixed", fixed_lambda=0.0)
        trainers[f"gated_esd_{source}"] = trainer(source)
    trainers["reference"] = trainer("fresh")
    return trainers


def _step_of(name: str, trainer: ZEraseTrainer) -> Callable[[], object]:
    if name.startswith("gated_esd"):
        return lambda: gated_esd_step(trainer)
    return (lambda: reference_step(trainer)) if name == "reference" else trainer.train_step


def _ratios(s: dict[str, float], split: dict[str, float], run_steps: int) -> dict:
    """speedup_vs_reference and overhead_vs_gated_esd per x_t source and λ regime, the paper-λ weighing, headlines."""
    out: dict = {}
    for source in XT_SOURCES:
        for lam in ("lambda_positive", "lambda_zero"):
            ours = s[f"ours_{source}_{lam}"]
            out[f"speedup_vs_reference_{source}_{lam}"] = s["reference"] / ours
            out[f"overhead_vs_gated_esd_{source}_{lam}"] = ours / s[f"gated_esd_{source}"]
    # The paper's λ rule mixes the step kinds; weighed by the toy's measured shares
    # (estimate.TOY_STEP_KINDS). A recomputed step is a λ = 0 step plus L_pr with a graph.
    from .estimate import TOY_STEP_KINDS

    f_b, f_r = TOY_STEP_KINDS["fraction_batched"], TOY_STEP_KINDS["fraction_recomputed"]
    out["paper_lambda_weighted"] = {"fractions": {"batched": f_b, "recomputed": f_r, "lambda_zero": 1 - f_b - f_r}}
    for source in XT_SOURCES:
        pos, zero = s[f"ours_{source}_lambda_positive"], s[f"ours_{source}_lambda_zero"]
        weighted = f_b * pos + (1 - f_b) * zero + f_r * split["student_pr_fwd_bwd"]
        out["paper_lambda_weighted"][source] = {
            "seconds_per_step": weighted, "minutes_per_run": weighted * run_steps / 60,
            "speedup_vs_reference": s["reference"] / weighted,
            "overhead_vs_gated_esd": weighted / s[f"gated_esd_{source}"]}
    # Headline keys: the default configuration (TrainConfig.xt_source) at the dearer λ > 0.
    default = TrainConfig.xt_source
    out["default_xt_source"] = default
    out["speedup_vs_reference"] = out[f"speedup_vs_reference_{default}_lambda_positive"]
    out["overhead_vs_gated_esd"] = out[f"overhead_vs_gated_esd_{default}_lambda_positive"]
    out["overhead_vs_gated_esd_lambda_zero"] = out[f"overhead_vs_gated_esd_{default}_lambda_zero"]
    return out


def base_config(**over) -> TrainConfig:
    """The benchmark's run (also scripts/gpu_bench.py's): TrainConfig's defaults but rank 4, an 8-trajectory
    pool and gradient checkpointing off unless asked for (a bench times what it names; "auto" would switch), with
    ``over``."""
    base = dict(concept="red", preserve=("blue",), templates=("a photo of a {} ball",), steps=RUN_STEPS,
                lora=LoRAConfig(rank=4), xt_pool=8, gradient_checkpointing="off")
    return TrainConfig(**(base | over))


def bench_tiny_backend(**over) -> Backend:
    """The benches' tiny Z-Image (diffusers' class): dim 128, 4 heads, with ``over`` (e.g. ``n_layers``)."""
    from ..tiny import TinyZImageConfig, tiny_zimage_backend

    return tiny_zimage_backend(TinyZImageConfig(**(dict(dim=128, n_heads=4) | over)))


def speed_cases(tiny: bool) -> list[SpeedCase]:
    from ..tiny import tiny_zimage_backend

    if tiny:  # seconds on a CPU: a correctness run of the command, not a measurement
        config = base_config(height=64, width=64, sample_steps=2, xt_pool=1, shuffle_pool=0)
        return [SpeedCase("tiny-diffusers", tiny_zimage_backend(), config)]
    cases = [SpeedCase("tiny-diffusers", bench_tiny_backend(), base_config(height=px, width=px))
             for px in (256, 512)]
    toy = _toy_case()
    return ([toy] if toy else []) + cases


def _toy_case() -> SpeedCase | None:
    from ..toy import DIT_FILE

    if not DIT_FILE.exists():
        log.warning("toy weights %s not found: the toy row is skipped", DIT_FILE)
        return None
    from ..backends.toy import toy_backend
    from ..toy import load_toy

    bundle = load_toy()
    s = bundle.sampling
    config = base_config(height=32, width=32, sample_steps=max(1, s.steps // 2), shift=s.shift, sample_cfg=s.cfg,
                          templates=("a red circle",), preserve=("blue",))
    return SpeedCase("toy", toy_backend(bundle), config)


def attention_memory(tokens=(256, 1024, 4096), heads: int = 2) -> dict:
    """Attention-loss memory at the real model's head size and caption length, ``heads`` heads."""
    from .estimate import HEAD_DIM as head_dim, REAL
    from .memory import attention_loss_bytes, growth_exponent

    caption = REAL["caption_tokens"]
    rows = [{"image_tokens": n, "caption_tokens": caption} | attention_loss_bytes(n, caption, heads, head_dim)
            for n in tokens]
    ours, maps = [r["ours"] for r in rows], [r["materialised"] for r in rows]
    # Saved bytes are linear in heads and layers; scaled to the real model's, in bf16 (half of fp32).
    per_head = REAL["n_layers"] * REAL["n_heads"] / heads / 2 / 2**30
    real = [{"image_tokens": r["image_tokens"], "ours_gib": r["ours"] * per_head,
             "materialised_gib": r["materialised"] * per_head} for r in rows]
    return {"method": "bytes saved for backward (saved_tensors_hooks) by one layer's attention with its mass, minus "
                      f"by the plain attention; {heads} heads × {head_dim}, fp32",
            "rows": rows, "growth_exponent": {"ours": growth_exponent(list(tokens), ours),
                                              "materialised": growth_exponent(list(tokens), maps)},
            "real_zimage_all_layers_no_checkpointing": real}


def run(tiny: bool = False, steps: int = 3, memory_estimate: bool = True, repeats: int = 1,
        models: tuple[str, ...] = ()) -> dict:
    from .estimate import measure_layers, real_zimage_estimate, run_time_estimate

    cases = speed_cases(tiny)
    unknown = sorted(set(models) - {c.row for c in cases})
    if unknown:  # before any measuring: a misspelt row would otherwise cost minutes and then fail on an empty table
        raise ZEraseError(f"bench-cost has no row {', '.join(unknown)}; its rows are "
                          f"{', '.join(c.row for c in cases)}.")
    cases = [c for c in cases if not models or c.row in models]
    result = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
              if not torch.cuda.is_available() else torch.cuda.get_device_name(),
              "torch": torch.__version__, "tiny": tiny, "steps_timed": steps, "repeats": repeats,
              "speed": [time_case(c, steps, repeats=repeats) for c in cases]}
    result["attention_loss_memory"] = attention_memory(heads=1 if tiny else 2)
    if memory_estimate and not tiny:
        result["real_zimage_memory_estimate"] = real_zimage_estimate(measure_layers())
    result["real_zimage_run_time_estimate"] = run_time_estimate()
    speed = result["speed"]
    summary = {"default_xt_source": speed[0]["default_xt_source"]} if speed else {}
    for source in XT_SOURCES:
        for lam in ("lambda_positive", "lambda_zero"):
            speedup, overhead = f"speedup_vs_reference_{source}_{lam}", f"overhead_vs_gated_esd_{source}_{lam}"
            summary[f"min_{speedup}"] = min(r[speedup] for r in speed)
            summary[f"max_{overhead}"] = max(r[overhead] for r in speed)
    result["summary"] = summary | {
        "min_speedup_vs_reference": min(r["speedup_vs_reference"] for r in speed),
        "max_overhead_vs_gated_esd": max(r["overhead_vs_gated_esd"] for r in speed),
        "max_overhead_vs_gated_esd_lambda_zero": max(r["overhead_vs_gated_esd_lambda_zero"] for r in speed),
        "attention_loss_growth_ours": result["attention_loss_memory"]["growth_exponent"]["ours"],
        "attention_loss_growth_materialised": result["attention_loss_memory"]["growth_exponent"]["materialised"],
        "h100_512_1000_steps_minutes": {k: round(r["minutes"], 2) for k, r in
                                        result["real_zimage_run_time_estimate"]["toy_lambda_fractions"]["rows"].items()},
        "h100_512_1000_steps_default_settings":
            result["real_zimage_run_time_estimate"]["toy_lambda_fractions"]["default_settings"],
    }
    return result


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny sizes, seconds: checks the command, measures nothing")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round (after one warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all variants, interleaved (median of all)")
    p.add_argument("--models", nargs="+", default=[], help="only these rows, e.g. toy-64 tiny-diffusers-256")
    p.add_argument("--no-estimate", action="store_true", help="skip the real Z-Image memory estimate")
    p.add_argument("--out", type=out_path, help="also write the JSON here")


@command("bench-cost", "seconds per Z-Erase step vs the official-style reference and gated ESD; memory", _add)
def _bench_cost(args: argparse.Namespace) -> int:
    check_timing(args.steps, args.repeats)
    check_out(args.out)
    result = run(tiny=args.tiny, steps=args.steps, memory_estimate=not args.no_estimate, repeats=args.repeats,
                 models=tuple(args.models))
    emit(result, args)  # stdout stays valid JSON; the table goes to stderr
    print(table(result), file=sys.stderr)
    return 0


