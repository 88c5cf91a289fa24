"""The paper's training objectives, as functions of velocity predictions.

Student predictions carry the LoRA (θ + Δθ); teacher predictions are the frozen θ.
Norms are means over elements (the squared L2 norm up to a constant, as in the official
code and ESD), so loss scales do not depend on resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def erase_target(v_uncond: torch.Tensor, v_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """Eq. 5's negatively guided target: v_θ(x_t, ∅) − η (v_θ(x_t, c_er) − v_θ(x_t, ∅))."""
    return v_uncond - eta * (v_concept - v_uncond)


def loss_erase(v_student_concept: torch.Tensor, v_uncond: torch.Tensor, v_concept: torch.Tensor, eta: float):
    """L_erase (Eq. 5): pull the erase prompt's velocity to the negatively guided target."""
    return F.mse_loss(v_student_concept.float(), erase_target(v_uncond, v_concept, eta).float())


def loss_attn(mass: torch.Tensor) -> torch.Tensor:
    """L_attn (Eq. 6): attention mass image queries put on the concept's token columns.

    ``mass`` is (B,) per sample, already a mean over heads, image queries and layers.
    """
    return mass.mean()


def loss_er(l_erase: torch.Tensor, l_attn: torch.Tensor, attn_weight: float = 1.0) -> torch.Tensor:
    """L_er (Eq. 7) = L_erase + L_attn; ``attn_weight`` = 1 is the paper's, 0 leaves plain ESD's objective."""
    return l_erase + attn_weight * l_attn


def loss_total(l_er: torch.Tensor, l_pr: torch.Tensor, lam: float) -> torch.Tensor:
    """Algorithm 1's L_total = L_er + λ_{t+1} L_pr; at λ = 0 L_pr is left out, so its graph is never walked."""
    return l_er + lam * l_pr if lam > 0 else l_er


def loss_pr(
    v_student_uncond: torch.Tensor,
    v_uncond: torch.Tensor,
    v_student_keep: torch.Tensor | None = None,
    v_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_pr (Eq. 8): unconditional term + preservation-concept term, student vs teacher."""
    loss = F.mse_loss(v_student_uncond.float(), v_uncond.float())
    if v_student_keep is not None:
        loss = loss + F.mse_loss(v_student_keep.float(), v_keep.float())
    return loss
