"""Lagrangian-guided adaptive erasure modulation (paper §4.2): how λ weighs L_pr.

Three rules behind one interface:

* ``paper`` — Algorithm 1 / Eq. 15: g̃_t = (L_pr(θ_{t−1}) − L_pr(θ_t))/α + ε,
  λ ← max(0, λ − β g̃_t), starting at λ₀ = 0. No extra backward pass.
* ``exact`` — Eq. 12: λ* = max(0, (−∇L_er·∇L_pr − ε)/‖∇L_pr‖²) from both gradients
  (two backward passes); the update direction is ∇L_er + λ*∇L_pr (Eq. 11).
* ``fixed`` — a constant λ, for ablations (linear scalarisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODES = ("paper", "exact", "fixed")


@dataclass
class PaperLambda:
    """Eq. 15. ``update`` takes this step's L_pr value and returns λ_{t+1} for this step's loss."""

    alpha: float  # the model's learning rate (the Taylor step of Eq. 14)
    beta: float
    epsilon: float
    value: float = 0.0  # λ₀ = 0
    previous_pr: float | None = None  # L_pr(θ_{t−1})
    last_g: float = field(default=0.0)

    def update(self, pr_now: float) -> float:
        # The first step has no θ_{t−1}; L_pr(θ₀) = 0 there anyway (B = 0), so g̃ = ε.
        previous = pr_now if self.previous_pr is None else self.previous_pr
        self.last_g = (previous - pr_now) / self.alpha + self.epsilon
        self.value = max(0.0, self.value - self.beta * self.last_g)
        self.previous_pr = pr_now
        return self.value

    def state(self) -> dict:
        return {"value": self.value, "previous_pr": self.previous_pr, "last_g": self.last_g}

    def load_state(self, state: dict) -> None:
        self.value, self.previous_pr, self.last_g = state["value"], state["previous_pr"], state["last_g"]


def exact_lambda(grad_er: torch.Tensor, grad_pr: torch.Tensor, epsilon: float) -> float:
    """Eq. 12 clipped at 0 (λ ≥ 0): the dual optimum for flattened gradients."""
    g_er, g_pr = grad_er.double(), grad_pr.double()
    norm2 = torch.dot(g_pr, g_pr)
    if norm2 == 0:
        return 0.0  # no preservation gradient: nothing to trade against
    return max(0.0, float((-torch.dot(g_er, g_pr) - epsilon) / norm2))


def direction(grad_er: torch.Tensor, grad_pr: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 11: d* = ∇L_er + λ*∇L_pr (λ* = 0 leaves the erasure gradient alone)."""
    return grad_er + lam * grad_pr
