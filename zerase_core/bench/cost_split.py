"""Where a step's time goes: each part of a Z-Erase step timed alone at one x_t (``split_seconds``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..trainer import ZEraseTrainer
from .timing import interleaved_medians


def cost_split(trainer: ZEraseTrainer, steps: int, repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Seconds of each part of a step at a fixed x_t (medians; x_t sampling: mean over random levels).

    Parts: fresh x_t sampling; teacher forwards (batch 3 for ours, batch 2 for ESD); the
    student's erase prediction forward without and with the attention mass (the difference
    is what L_attn adds to the attention call) and its backward; the no-grad [∅, c_pr] forward
    (λ_t = 0); the batch-3 forward and backward (λ_t > 0); the AdamW step.
    """
    prompts = trainer.prompts
    x_t, sigma = trainer.sample_xt(prompts.erase[0])
    out = interleaved_medians(_split_parts(trainer, x_t, sigma), steps, repeats, sync)
    xt = []
    for _ in range(max(8, steps * repeats)):  # the level is random: a mean, not a median
        start = time.perf_counter()
        trainer.sample_xt(prompts.erase[0])
        sync()
        xt.append(time.perf_counter() - start)
    out["fresh_xt_mean"] = statistics.mean(xt)
    from .memory import saved_bytes

    pr = _pr_prompts(trainer)
    n = len(pr)  # activation bytes the [∅, c_pr] forward holds when it builds a graph (none under no_grad)
    out["student_pr_graph_saved_mib"] = saved_bytes(lambda: trainer.backend.velocity(
        x_t.expand(n, -1, -1, -1), sigma.expand(n), pr, lora=True)[0], resident=trainer.backend.weights())[0] / 2**20
    out["attn_mass_fwd"] = out["student_er_fwd_attn"] - out["student_er_fwd"]
    out["student_er_bwd"] = out["student_er_fwd_attn_bwd"] - out["student_er_fwd_attn"]
    out["student_b3_bwd"] = out["student_b3_fwd_attn_bwd"] - out["student_b3_fwd_attn"]
    return out


def _pr_prompts(trainer: ZEraseTrainer) -> list:
    """L_pr's prompts with the run's first preservation prompt: [∅, c_pr], or [∅] without one."""
    keep = trainer.prompts.keep
    return trainer.pr_prompts(keep[0] if keep else None)


def _split_parts(trainer: ZEraseTrainer, x_t: torch.Tensor, sigma: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each part of a step as a call at this x_t, for :func:`cost_split`."""
    backend, prompts = trainer.backend, trainer.prompts
    er, tokens = prompts.erase[0], list(prompts.erase_tokens[0])
    pr = _pr_prompts(trainer)

    def student(prompts, mass: bool, backward: bool, grad: bool = True):
        n = len(prompts)
        with torch.set_grad_enabled(grad):
            v, m = backend.velocity(x_t.expand(n, -1, -1, -1), sigma.expand(n), prompts, lora=True,
                                    concept_tokens=[tokens] + [[]] * (n - 1) if mass else None,
                                    mass_layers=trainer.mass_layers)
        if backward:
            (v.float().square().mean() + (m.sum() if mass else 0)).backward()
            trainer.optimizer.zero_grad(set_to_none=True)

    return {
        "teacher_fwd_b3": lambda: trainer.teacher_predictions(x_t, sigma, [er, *pr]),
        "teacher_fwd_b2": lambda: trainer.teacher_predictions(x_t, sigma, [er, prompts.uncond]),
        "student_er_fwd": lambda: student([er], False, False),
        "student_er_fwd_attn": lambda: student([er], True, False),
        "student_er_fwd_attn_bwd": lambda: student([er], True, True),
        "student_pr_fwd_nograd": lambda: student(pr, False, False, grad=False),
        "student_pr_fwd_graph": lambda: student(pr, False, False),  # what λ_t = 0 steps ran before (graph dropped)
        "student_pr_fwd_bwd": lambda: student(pr, False, True),
        "student_b3_fwd_attn": lambda: student([er, *pr], True, False),
        "student_b3_fwd_attn_bwd": lambda: student([er, *pr], True, True),
        "adamw": lambda: _zero_grad_step(trainer),
    }


def _zero_grad_step(trainer: ZEraseTrainer) -> None:
    """One AdamW step on zero gradients: the optimizer's own cost (and its buffers, made at the first step)."""
    for p in trainer.params:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def make_optimizer_state(trainer: ZEraseTrainer) -> None:
    """AdamW makes its moment buffers at its first step: make them now, with a step that moves nothing (lr 0)."""
    groups = trainer.optimizer.param_groups
    rates = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    _zero_grad_step(trainer)
    for g, lr in zip(groups, rates):
        g["lr"] = lr
