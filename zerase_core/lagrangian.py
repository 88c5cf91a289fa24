"""Lagrangian-guided adaptive erasure modulation (paper §4.2): how λ weighs L_pr.

Three rules behind one interface:

* ``paper`` — Algorithm 1 / Eq. 15: g̃_t = (L_pr(θ_{t−1}) − L_pr(θ_t))/α + ε,
  λ ← max(0, λ − β g̃_t), starting at λ₀ = 0. No extra backward pass.
* ``exact`` — Eq. 12: λ* = max(0, (−∇L_er·∇L_pr − ε)/‖∇L_pr‖²) from both gradients
  (two backward passes); the update direction is ∇L_er + λ*∇L_pr (Eq. 11).
* ``paired`` — Eq. 15 with both L_pr values on one preservation batch: L_pr of step t's
  batch before and after step t's update (one extra no-grad forward per step; two when λ_t > 0,
  so both values come from the same call shape — see ZEraseTrainer.train_step). Eq. 14 reads
  the difference as ∇L_pr · d_t, a finite difference along the update, which holds only on
  one batch; ``paper`` pairs consecutive steps' batches, whose difference is mostly sampling
  noise divided by α.
* ``fixed`` — a constant λ, for ablations (linear scalarisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODES = ("paper", "paired", "exact", "fixed")


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
        self.last_g = self.g_tilde(pr_now)
        self.value = max(0.0, self.value - self.beta * self.last_g)
        self.previous_pr = pr_now
        return self.value

    def g_tilde(self, pr_now: float) -> float:
        """g̃_t = (L_pr(θ_{t−1}) − L_pr(θ_t))/α + ε, with consecutive steps' values (Algorithm 1)."""
        # The first step has no θ_{t−1}; L_pr(θ₀) = 0 there anyway (B = 0), so g̃ = ε.
        previous = pr_now if self.previous_pr is None else self.previous_pr
        return (previous - pr_now) / self.alpha + self.epsilon

    def state(self) -> dict:
        return {"value": self.value, "previous_pr": self.previous_pr, "last_g": self.last_g}

    def load_state(self, state: dict) -> None:
        self.value, self.previous_pr, self.last_g = state["value"], state["previous_pr"], state["last_g"]


@dataclass
class PairedLambda(PaperLambda):
    """Eq. 15 on one batch. ``observe`` gets L_pr of a step's preservation batch before and after that
    step's update; the next ``update`` uses that pair, so g̃ measures what the update did to L_pr."""

    pair: tuple[float, float] | None = None  # (L_pr(θ_t), L_pr(θ_{t+1})) on step t's batch

    def observe(self, before: float, after: float) -> None:
        self.pair = (before, after)

    def g_tilde(self, pr_now: float) -> float:
        """g̃ from the observed pair; ``pr_now`` (another batch's value) does not enter."""
        # The first step has no update behind it yet: g̃ = ε, as in PaperLambda.
        return self.epsilon if self.pair is None else (self.pair[0] - self.pair[1]) / self.alpha + self.epsilon

    def state(self) -> dict:
        return super().state() | {"pair": list(self.pair) if self.pair is not None else None}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.pair = tuple(state["pair"]) if state.get("pair") is not None else None


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
