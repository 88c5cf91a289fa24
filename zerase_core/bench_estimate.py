"""GPU memory and run time of real Z-Image training, built from measurements on small models.

Per-layer activation memory of the student forward (LoRA on, attention mass recorded) is
measured as saved-for-backward bytes (:mod:`.bench_memory`) on scaled-down Z-Images with
the real head size (128) at two widths and two sequence lengths; it is linear in both, so
a fit extrapolates to the real model (dim 3840, 30 layers, 30 heads). The other terms are
counted: weights, LoRA + AdamW state, checkpointed block inputs, and a fixed allowance for
the CUDA context and kernel workspaces (stated in the output, not measured here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .bench_memory import GiB, saved_bytes
from .prompts import EncodedPrompt

REAL = dict(dim=3840, n_layers=30, n_heads=30, params=6.15e9, caption_tokens=64, ffn_ratio=8 / 3)
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
    """A randomly initialised Z-Image with the real head size, refiners and layout, at width ``dim``."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        dim=dim, n_layers=n_layers, n_refiner_layers=1, n_heads=dim // HEAD_DIM, n_kv_heads=dim // HEAD_DIM,
        cap_feat_dim=cap_feat_dim, axes_dims=[32, 48, 48],
    )
    return model.to(dtype).eval()


def student_layer_bytes(dim: int, image_tokens: int, caption_tokens: int, rank: int = 16) -> float:
    """Saved-for-backward bytes per main layer of a batch-1 student forward (bf16, LoRA, mass)."""
    from .backends.diffusers_zimage import DiffusersZImageBackend
    from .lora import LoRAConfig

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
            x, torch.tensor([0.5]), prompt, lora=True, concept_tokens=[[1]])[0].sum())[0])
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


def estimate(case: MemoryCase, fit: dict[str, float], rank: int = 16) -> dict:
    """GiB for one Z-Erase student step on the real model, term by term."""
    dim, layers = REAL["dim"], REAL["n_layers"]
    tokens = (case.resolution // 16) ** 2 + REAL["caption_tokens"]  # VAE /8, patch 2
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
        check.append(ref | {"estimated_gb_above_weights": round(est["activations_gb"] + est["lora_and_adam_gib"] * GiB / 1e9, 2)})
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


def run_time_estimate(pool_trajectories: int = 32, levels: int = 8, steps: int = 1000, mass_overhead: float = 0.03) -> dict:
    """Minutes for a 1000-step Z-Erase run at 512² on one H100, from the issue's H100 timings.

    Pool build: trajectories × levels forwards of batch 3 (c_er, ∅, c_pr) at the measured
    teacher cost. Steps: with λ > 0 the student runs batch 3 forward+backward (measured,
    with checkpointing); with λ = 0 batch 1 forward+backward plus a batch-2 forward (a third
    of the batch-3 teacher figure per sample). ``mass_overhead`` adds the extra attention call.
    """
    t = H100_SECONDS[512]
    pool = pool_trajectories * levels * t["teacher_fwd_b3"]
    per_sample_fwd = t["teacher_fwd_b3"] / 3
    step_lam_pos = t["student_fwd_bwd_b3_ckpt"] * (1 + mass_overhead)
    step_lam_zero = t["student_fwd_bwd_b1"] * (1 + mass_overhead) + 2 * per_sample_fwd
    return {
        "pool_build_s": pool,
        "step_s_lambda_positive": step_lam_pos,
        "step_s_lambda_zero": step_lam_zero,
        "minutes_all_lambda_positive": (pool + steps * step_lam_pos) / 60,
        "minutes_all_lambda_zero": (pool + steps * step_lam_zero) / 60,
    }
