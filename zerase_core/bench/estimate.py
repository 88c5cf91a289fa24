"""GPU memory and run time of real Z-Image training, built from measurements on small models.

Per-layer activation memory of the student forward (LoRA on, attention mass recorded) is
measured as saved-for-backward bytes (:mod:`.memory`) on scaled-down Z-Images with
the real head size (128) at two widths and two sequence lengths; bytes per token are linear in
the width, so a fit extrapolates to the real model (dim 3840, 30 layers, 30 heads), and nearly constant in the
length (``length_linearity``: at 1024 image tokens 0.96 of those at 256), so applying those at 256 tokens to longer
sequences errs slightly high. The weights a layer saves for backward are left out (:func:`.memory.saved_bytes`'s
``resident``): they are held anyway, and counted they grew with the square of the width. The other terms are
counted: weights, LoRA + AdamW state, checkpointed block inputs, and a fixed allowance for
the CUDA context and kernel workspaces (stated in the output, not measured here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .memory import GiB, saved_bytes
from .. import memory_fit
from ..config import XT_SOURCES, TrainConfig
from ..prompts import EncodedPrompt

REAL = dict(dim=3840, n_layers=30, n_heads=30, params=6.15e9, caption_tokens=64, ffn_ratio=8 / 3)
PIXELS_PER_TOKEN = 8 * 2  # the VAE's downsampling, then the 2×2 patch: a token's side in pixels
HEAD_DIM = 128
CONTEXT_ALLOWANCE_GIB = 1.0  # CUDA context + cuBLAS/attention workspaces (assumed, typical for an H100)
# Measured on one H100 by the author (random full-size Z-Image, bf16, rank-16 gated LoRA,
# 64 caption tokens): GB above the weights for the student forward+backward.
H100_REPORTED = [
    {"resolution": 512, "batch": 3, "checkpointing": True, "gb_above_weights": 1.6},
    {"resolution": 512, "batch": 1, "checkpointing": False, "gb_above_weights": 7.2},
    {"resolution": 1024, "batch": 1, "checkpointing": True, "gb_above_weights": 2.0},
    {"resolution": 1024, "batch": 3, "checkpointing": True, "gb_above_weights": 6.1},
]
H100_SECONDS = {512: {"teacher_fwd_b3": 0.19, "student_fwd_bwd_b3_ckpt": 0.56, "student_fwd_bwd_b1": 0.20},
                1024: {"student_fwd_bwd_b1_ckpt": 0.63, "student_fwd_bwd_b3_ckpt": 1.64}}


class FixedLengthEncoder:
    """Caption features of a fixed token count (random, seeded): the transformer does not care what they mean."""

    def __init__(self, dim: int, tokens: int, seed: int = 0):
        self.dim, self.tokens, self.seed = dim, tokens, seed

    def encode(self, prompts):
        out = []
        for i, text in enumerate(prompts):
            g = torch.Generator().manual_seed(self.seed + i)
            spans = tuple((j, j + 1) if j < len(text) else None for j in range(self.tokens))
            out.append(EncodedPrompt(text, torch.randn(self.tokens, self.dim, generator=g), spans))
        return out


def scaled_zimage(dim: int, n_layers: int, dtype=torch.bfloat16, cap_feat_dim: int = 64):
    """A randomly initialised Z-Image with the real head size, RoPE axes, latent and patch, at width ``dim``."""
    from ..tiny import small_zimage

    torch.manual_seed(0)
    model = small_zimage(dim=dim, n_layers=n_layers, n_refiner_layers=1, n_heads=dim // HEAD_DIM,
                         axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512), in_channels=16, patch_size=2,
                         cap_feat_dim=cap_feat_dim)
    return model.to(dtype).eval()


def student_layer_bytes(dim: int, image_tokens: int, caption_tokens: int, rank: int = 16) -> float:
    """Saved-for-backward bytes per main layer of a batch-1 student forward (bf16, LoRA, mass)."""
    from ..backends.diffusers_zimage import DiffusersZImageBackend
    from ..lora import LoRAConfig

    totals = []
    for n_layers in (1, 2):
        backend = DiffusersZImageBackend(scaled_zimage(dim, n_layers), FixedLengthEncoder(64, caption_tokens))
        backend.install(LoRAConfig(rank=rank))
        for p in backend.transformer.parameters():
            p.requires_grad_(p.dtype == torch.float32)  # only the LoRA factors train
        side = int(image_tokens**0.5) * 2  # latent side: patch 2
        x = torch.randn(1, 16, side, side)
        prompt = backend.encode(["concept"])
        totals.append(saved_bytes(lambda: backend.velocity(
            x, torch.tensor([0.5]), prompt, lora=True, concept_tokens=[[1]])[0].sum(), resident=backend.weights())[0])
    return float(totals[1] - totals[0])  # the difference is exactly one main layer


def fit_layer_bytes(points: list[dict]) -> dict[str, float]:
    """Per-token bytes of one layer, linear in dim: b/L = slope·dim + intercept (from two widths)."""
    (d0, b0), (d1, b1) = [(p["dim"], p["bytes_per_token"]) for p in points[:2]]
    slope = (b1 - b0) / (d1 - d0)
    return {"slope_per_dim": slope, "intercept": b0 - slope * d0}


def measure_layers() -> dict:
    """Per-layer measurements (two widths at 256 image tokens, one width at 1024) and their fit."""
    points = []
    for dim, image_tokens in ((256, 256), (512, 256), (256, 1024)):
        b = student_layer_bytes(dim, image_tokens, REAL["caption_tokens"])
        tokens = image_tokens + REAL["caption_tokens"]
        points.append({"dim": dim, "image_tokens": image_tokens, "bytes": b, "bytes_per_token": b / tokens})
    fit = fit_layer_bytes(points)
    # Linearity in L: the per-token bytes at 1024 image tokens must match those at 256 (same dim).
    fit["length_linearity"] = points[2]["bytes_per_token"] / points[0]["bytes_per_token"]
    return {"points": points, "fit": fit}


@dataclass(frozen=True)
class MemoryCase:
    resolution: int
    batch: int
    checkpointing: bool
    weight_bytes_per_param: float = 2.0  # bf16; 1.0 for fp8 base weights


def _image_tokens(resolution: int) -> int:
    return (resolution // PIXELS_PER_TOKEN) ** 2


def estimate(case: MemoryCase, fit: dict[str, float], rank: int = 16) -> dict:
    """GiB for one Z-Erase student step on the real model, term by term."""
    dim, layers = REAL["dim"], REAL["n_layers"]
    tokens = _image_tokens(case.resolution) + REAL["caption_tokens"]
    layer = (fit["slope_per_dim"] * dim + fit["intercept"]) * tokens * case.batch  # bytes, one main layer
    hidden = tokens * dim * 2 * case.batch  # one bf16 hidden state
    if case.checkpointing:
        # Block inputs of every layer are kept; one block's activations exist while it is
        # recomputed in backward; plus the incoming and outgoing hidden-state gradients.
        activations = layers * hidden + layer + 2 * hidden
    else:
        activations = layers * layer + 2 * hidden
    lora_params = layers * 3 * rank * (dim + dim)
    lora_state = lora_params * 4 * 4  # fp32 parameter, gradient, AdamW m and v
    weights = REAL["params"] * case.weight_bytes_per_param
    total = weights + activations + lora_state + CONTEXT_ALLOWANCE_GIB * GiB
    return asdict(case) | {
        "tokens": tokens,
        "weights_gib": weights / GiB,
        "activations_gib": activations / GiB,
        "activations_gb": activations / 1e9,
        "lora_and_adam_gib": lora_state / GiB,
        "context_allowance_gib": CONTEXT_ALLOWANCE_GIB,
        "total_gib": total / GiB,
    }


def real_zimage_estimate(measured: dict) -> dict:
    """Cases the issue asks about, the check against the H100 figures, and what fits where."""
    fit = measured["fit"]
    check = []
    for ref in H100_REPORTED:
        est = estimate(MemoryCase(ref["resolution"], ref["batch"], ref["checkpointing"]), fit)
        above = est["activations_gb"] + est["lora_and_adam_gib"] * GiB / 1e9
        check.append(ref | {"estimated_gb_above_weights": round(above, 2)})
    cases = {
        "512_bf16_ckpt_b3": estimate(MemoryCase(512, 3, True), fit),
        "1024_bf16_ckpt_b3": estimate(MemoryCase(1024, 3, True), fit),
        "1024_bf16_ckpt_b1": estimate(MemoryCase(1024, 1, True), fit),
        "512_fp8_ckpt_b3": estimate(MemoryCase(512, 3, True, 1.0), fit),
    }
    budgets = {"512_bf16_ckpt_b3": 16, "1024_bf16_ckpt_b3": 24, "1024_bf16_ckpt_b1": 24, "512_fp8_ckpt_b3": 12}
    # A "16 GB" card has 16 GiB; budgets are compared in GiB.
    fits = {k: {"budget_gb": b, "needs_gib": round(cases[k]["total_gib"], 2), "fits": cases[k]["total_gib"] <= b}
            for k, b in budgets.items()}
    return {"measured_layers": measured, "check_against_h100": check, "cases": cases, "fits": fits}


# Share of steps of each kind under the paper's λ rule, measured on the toy world with the demo's
# settings (docs/bench/lambda_toy.json: `python -m zerase_core bench-lambda`, 400 steps, concepts
# red and circle, both x_t sources). How often λ > 0 on the real model was not measured.
# The demo's ε = 1e-3: λ > 0 on 97 % of steps — 1553 batched (λ_t > 0), 27 recomputed
# (λ_t = 0, λ_{t+1} > 0), 20 with λ = 0. (With Table 6's ε = 1e-2 it was 91 %: 1457 / 67 / 76.)
TOY_STEP_KINDS = {"fraction_batched": 1553 / 1600, "fraction_recomputed": 27 / 1600,
                  "source": "docs/bench/lambda_toy.json"}


def h100_parts(resolution: int = 512) -> dict:
    """Seconds of each part of a step on one H100, from the issue's figures, with every derived one named.

    Measured (the issue): ``teacher_fwd_b3`` (0.19 s), ``student_fwd_bwd_b3_ckpt`` (0.56 s),
    ``student_fwd_bwd_b1`` (0.20 s, no checkpointing). Derived:

    * A1 — the base weights are frozen, so the backward computes activation gradients only,
      about one forward: a forward of batch 1 = half of its forward+backward (0.10 s). Check:
      batch 3 with checkpointing = 3 forwards = 3 × 0.19 = 0.57 s against 0.56 s measured.
    * A2 — a batch-2 forward lies halfway between batch 1 and batch 3.
    * A3 — gradient checkpointing adds one forward: batch 3 without = 0.56 − 0.19 s; batch 1
      with = 0.20 + 0.10 s.
    """
    t = H100_SECONDS[resolution]
    f3 = t["teacher_fwd_b3"]
    f1 = t["student_fwd_bwd_b1"] / 2  # A1
    f2 = (f1 + f3) / 2  # A2
    return {
        "fwd_b1": f1, "fwd_b2": f2, "fwd_b3": f3,
        "fwd_bwd": {  # by checkpointing, then batch
            True: {1: t["student_fwd_bwd_b1"] + f1, 2: 3 * f2, 3: t["student_fwd_bwd_b3_ckpt"]},  # A3
            False: {1: t["student_fwd_bwd_b1"], 2: 2 * f2, 3: t["student_fwd_bwd_b3_ckpt"] - f3},  # A3, A1
        },
    }


def run_time_composition(fraction_batched: float, fraction_recomputed: float,
                         pool_trajectories: int = TrainConfig.xt_pool, levels: int = TrainConfig.sample_steps,
                         steps: int = TrainConfig.steps, mass_overhead: float = 0.03,
                         memory_budget_gb: float = 80.0) -> dict:
    """Minutes of a ``steps``-step Z-Erase run at 512² on one H100, per x_t source and checkpointing.

    A step is one of three kinds (see :mod:`.trainer`), weighed by the given fractions:

    * λ_t = 0: student erase prediction forward+backward (batch 1) + the no-grad [∅, c_pr]
      forward (batch 2);
    * λ_t = 0, λ_{t+1} > 0 (``recomputed``): the same + L_pr again with a graph (batch 2 fwd+bwd);
    * λ_t > 0 (``batched``): one batch-3 student forward+backward.

    ``mass_overhead`` (A4, assumed, not measured) adds the attention mass to the student forward+backward.
    x_t: ``pool`` — a one-off build of trajectories × levels batched forwards of (c_er, ∅, c_pr),
    charged at the batch-3 rate per trajectory and level (A5: the build really runs batch 24,
    so this is high); ``fresh`` — per step the Turbo sampler (``levels`` Euler steps, no CFG)
    to a uniformly random level, (levels − 1)/2 batch-1 forwards on average, plus the batch-3
    teacher forward. Not counted (A6): prompt encoding and model loading (once per run), the
    AdamW step on the LoRA's 11 M parameters, host↔device copies of pool entries. Memory (A7):
    without checkpointing activations grow linearly with batch from the measured 7.2 GB at
    batch 1, so batch 3 needs about 21.6 GB + 12.3 GB of weights.
    """
    p = h100_parts(512)
    fractions = {"batched": fraction_batched, "recomputed": fraction_recomputed,
                 "lambda_zero": 1 - fraction_batched - fraction_recomputed}
    rows = {}
    for source in XT_SOURCES:
        for ckpt in (True, False):
            kinds, esd = _step_kinds(p, ckpt, 1 + mass_overhead)
            xt = _xt_cost(p, source, levels, pool_trajectories)
            row = _composed_row(kinds, esd, xt, fractions, steps, _reference_step_s(p, ckpt, levels),
                                _peak_gb(ckpt), memory_budget_gb)
            key = f"{source}_{'ckpt' if ckpt else 'no_ckpt'}"
            rows[key] = {"xt_source": source, "gradient_checkpointing": ckpt} | row
    return {
        "resolution": 512, "steps": steps, "device": "one H100 (composed from the issue's H100 figures, not run here)",
        "memory_budget_gb": memory_budget_gb, "fractions": fractions,
        # What TrainConfig's defaults run on this card: the x_t pool, and checkpointing "auto"
        "default_settings": default_settings(memory_budget_gb, rows),
        "parts_s": {k: v for k, v in p.items() if k != "fwd_bwd"} | {
            "fwd_bwd_ckpt": p["fwd_bwd"][True], "fwd_bwd_no_ckpt": p["fwd_bwd"][False]},
        "assumptions": _assumptions(mass_overhead, pool_trajectories, levels),
        "rows": rows,
        "meets_10_min": sorted(k for k, r in rows.items() if r["meets_10_min"]),
    }


def default_settings(card_gb: float, rows: dict) -> dict:
    """What TrainConfig's defaults run on a card of ``card_gb``: their x_t source, and checkpointing "auto", which
    checkpoints as few main layers as let the step fit beside the weights, by the trainer's own rule
    (memory_fit.plan). Checkpointing k of the 30 layers costs k/30 of what checkpointing all adds (A3 per layer), so
    its minutes lie that far from the "no_ckpt" row towards the "ckpt" row."""
    source, mode, n = TrainConfig.xt_source, TrainConfig.gradient_checkpointing, REAL["n_layers"]
    if mode == "auto":  # by memory_fit's figure (the H200's 21.9 GiB), not the rows' A7 (the H100 7.2 GB × 3)
        free = int((card_gb - CONTEXT_ALLOWANCE_GIB) * GiB - _weights_gb() * 1e9)  # a "24 GB" card has 24 GiB
        image_tokens = _image_tokens(TrainConfig.height)
        layers = memory_fit.plan(image_tokens, REAL["caption_tokens"], 3, n, REAL["dim"], 0, free).checkpointed
    else:
        layers = n if mode == "on" else 0
    off, on = rows[f"{source}_no_ckpt"], rows[f"{source}_ckpt"]
    minutes = off["minutes"] + (on["minutes"] - off["minutes"]) * layers / n
    return {"xt_source": source, "checkpointed_layers": layers, "of_layers": n, "minutes": minutes,
            "meets_10_min": minutes <= 10}


def _step_kinds(p: dict, ckpt: bool, mass: float) -> tuple[dict[str, float], float]:
    """Seconds of each kind of our step before x_t costs, and of a plain gated ESD step (L_erase only, batch 1)."""
    fb = p["fwd_bwd"][ckpt]
    lam_zero = fb[1] * mass + p["fwd_b2"]
    return {"lambda_zero": lam_zero, "recomputed": lam_zero + fb[2], "batched": fb[3] * mass}, fb[1]


def _xt_cost(p: dict, source: str, levels: int, trajectories: int) -> dict[str, float]:
    """x_t's seconds: per step (sampling + teacher forward) and once (the pool build), for ours and for ESD."""
    if source == "fresh":
        sampling = (levels - 1) / 2 * p["fwd_b1"]
        return {"step": sampling + p["fwd_b3"], "esd_step": sampling + p["fwd_b2"],  # ESD's teacher: v(c_er), v(∅)
                "once": 0.0, "esd_once": 0.0}
    return {"step": 0.0, "esd_step": 0.0, "once": trajectories * levels * p["fwd_b3"],
            "esd_once": trajectories * levels * p["fwd_b2"]}  # ESD's pool keeps v(c_er), v(∅)


def _reference_step_s(p: dict, ckpt: bool, levels: int) -> float:
    """The official-style step (fresh x_t, 3 teacher + 3 student forwards of batch 1, everything back-propagated):
    a lower bound, its materialised maps not charged."""
    return (levels - 1) / 2 * p["fwd_b1"] + 3 * p["fwd_b1"] + 3 * p["fwd_bwd"][ckpt][1]


def _peak_gb(ckpt: bool) -> float:
    """The batch-3 step is the peak: weights plus its activations."""
    return _weights_gb() + _activations_gb(ckpt)


def _activations_gb(ckpt: bool) -> float:
    """The batch-3 step's activations: 1.6 GB measured with checkpointing; A7 without."""
    act_b1 = next(r["gb_above_weights"] for r in H100_REPORTED if r["resolution"] == 512 and not r["checkpointing"])
    return 1.6 if ckpt else 3 * act_b1


def _weights_gb() -> float:
    return REAL["params"] * torch.bfloat16.itemsize / 1e9


def _composed_row(kinds: dict, esd: float, xt: dict, fractions: dict, steps: int, reference: float,
                  needs_gb: float, budget_gb: float) -> dict:
    step_s = {k: v + xt["step"] for k, v in kinds.items()}
    per_step = sum(fractions[k] * step_s[k] for k in kinds)
    total = xt["once"] + steps * per_step
    esd_total = xt["esd_once"] + steps * (esd + xt["esd_step"])
    minutes = total / 60
    return {
        "step_s": step_s | {"weighted": per_step},
        "one_off_s": xt["once"], "minutes": minutes,
        "minutes_if_lambda_always_positive": (xt["once"] + steps * step_s["batched"]) / 60,
        "gated_esd_minutes": esd_total / 60,
        "overhead_vs_gated_esd": total / esd_total,
        "reference_minutes_lower_bound": steps * reference / 60,
        "speedup_vs_reference_at_least": steps * reference / total,
        "peak_gb_estimate": needs_gb, "fits_memory": needs_gb <= budget_gb,
        "meets_10_min": minutes <= 10 and needs_gb <= budget_gb,
    }


def _assumptions(mass_overhead: float, pool_trajectories: int, levels: int) -> dict[str, str]:
    return {
        "measured": "teacher fwd b3 0.19 s; student fwd+bwd b3 ckpt 0.56 s; b1 no ckpt 0.20 s (+7.2 GB)",
        "A1": "frozen base: backward ≈ one forward, so fwd b1 = 0.20/2 s (checks: 3 × 0.19 ≈ 0.56)",
        "A2": "fwd b2 = mean of fwd b1 and fwd b3",
        "A3": "checkpointing adds one forward of the same batch",
        "A4": f"attention mass adds {mass_overhead:.0%} to the student fwd+bwd (assumed: the GPU runs' "
              "split_seconds put it at -1 % to +47 % (median 8 %) of the c_er forward alone, in noisy 3-step medians)",
        "A5": f"pool: {pool_trajectories} trajectories × {levels} levels at the batch-3 forward rate",
        "fresh": f"Turbo sampler, {levels} steps, no CFG: {(levels - 1) / 2} batch-1 forwards per step on average",
        "A6": "not counted: prompt encoding, model load, AdamW step, pool host↔device copies",
        "A7": "activation memory linear in batch; weights bf16 6.15 B params",
        "lambda": "step-kind fractions from the toy world (paper λ rule); not measured on the real model",
        "reference": "official-style step: fresh x_t + 3 batch-1 teacher forwards + 3 batch-1 student fwd+bwd, "
                     "with the same checkpointing; its L×L attention maps not charged (a lower bound)",
    }


def run_time_estimate(fraction_batched: float | None = None, fraction_recomputed: float | None = None, **kw) -> dict:
    """:func:`run_time_composition` at the toy-measured λ fractions, plus the two extremes (λ always 0 / > 0)."""
    f_b = TOY_STEP_KINDS["fraction_batched"] if fraction_batched is None else fraction_batched
    f_r = TOY_STEP_KINDS["fraction_recomputed"] if fraction_recomputed is None else fraction_recomputed
    return {"toy_lambda_fractions": run_time_composition(f_b, f_r, **kw),
            "lambda_always_zero": run_time_composition(0.0, 0.0, **kw),
            "lambda_always_positive": run_time_composition(1.0, 0.0, **kw)}
