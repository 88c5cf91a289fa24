"""The overhead yardstick: a plain gated ESD step (L_erase only), built from the parts of ours.

``overhead_vs_gated_esd`` divides a Z-Erase step by this one (the paper's figure: 35 / 20 minutes = 1.75), so it
uses the same x_t source, the same prompts and levels, and the same gated LoRA: the ratio is what L_attn and L_pr add.
"""

from __future__ import annotations

from ..objectives import loss_erase
from ..trainer import Teacher, ZEraseTrainer


def gated_esd_step(trainer: ZEraseTrainer) -> None:
    """A plain gated ESD step (Eq. 5 only) from the same parts and the same x_t source as ours.

    Fresh: x_t sampled as ours does, teacher v(c_er), v(∅) in one no-grad forward, student
    v(c_er) forward/backward. Pool: x_t and both teacher predictions drawn from the pool.
    """
    d = trainer.draw()  # the draw Z-Erase makes, so both see the same prompts and levels
    er, x_t, sigma, teacher = d.erase, d.x_t, d.sigma, d.teacher
    if x_t is None:  # fresh
        x_t, sigma = trainer.sample_xt(er)
        teacher = trainer.teacher_predictions(x_t, sigma, [er, trainer.prompts.uncond])
    v, _ = trainer.backend.velocity(x_t, sigma, [er], lora=True)
    rows = Teacher.rows(teacher.to(v.device))
    loss_erase(v, rows.uncond, rows.concept, trainer.config.eta).backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
