"""Lagrangian-guided adaptive erasure modulation (paper §4.2): how λ weighs L_pr.

Four rules behind one interface (:func:`rule_for` picks one from the settings): each says whether a step
needs L_pr's gradient (``needs_pr_gradient``), gives λ for the step's objective (``update`` from L_pr's value, or
``solve`` from both gradients when ``from_gradients``), and keeps what it learns in ``state`` for checkpoints.

* ``paper`` — Algorithm 1 / Eq. 15: g̃_t = (L_pr(θ_{t−1}) − L_pr(θ_t))/α + ε,
  λ ← max(0, λ − β g̃_t), starting at λ₀ = 0. No extra backward pass.
* ``exact`` — Eq. 12: λ* = max(0, (−∇L_er·∇L_pr − ε)/‖∇L_pr‖²) from both gradients
  (two backward passes); the update direction is ∇L_er + λ*∇L_pr (Eq. 11).
* ``paired`` — Eq. 15 with both L_pr values on one preservation batch: L_pr of step t's
  batch before and after step t's update (one extra no-grad forward per step; two when λ_t > 0,
  so both values come from the same call shape — see ZEraseTrainer._descend). Eq. 14 reads
  the difference as ∇L_pr · d_t, a finite difference along the update, which holds only on
  one batch; ``paper`` pairs consecutive steps' batches, whose difference is mostly sampling
  noise divided by α.
* ``fixed`` — a constant λ, for ablations (linear scalarisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import shown

MODES = ("paper", "paired", "exact", "fixed")


class _Rule:
    """The interface, and what the rules share unless they say otherwise: λ from L_pr's value (``update``), no g̃,
    nothing to checkpoint."""

    from_gradients: ClassVar[bool] = False  # λ from both gradients (``solve``) instead of ``update``
    observes_update: ClassVar[bool] = False  # wants L_pr of the step's batch before and after it (``observe``)
    last_g: float = 0.0  # g̃ of the last update (Eq. 15 rules only)

    def needs_pr_gradient(self) -> bool:
        """Whether this step's λ will most likely be > 0, so that L_pr's gradient counts in the update."""
        raise NotImplementedError

    def update(self, pr_now: float) -> float:
        """λ for this step's objective, from this step's L_pr value (rules with ``from_gradients`` unset)."""
        raise NotImplementedError(f"{type(self).__name__} takes λ from the gradients (solve)")

    def solve(self, grad_er: torch.Tensor, grad_pr: torch.Tensor) -> float:
        """λ for this step's direction, from both gradients (rules with ``from_gradients`` set)."""
        raise NotImplementedError(f"{type(self).__name__} takes λ from L_pr's value (update)")

    def observe(self, before: float, after: float) -> None:
        """L_pr of a step's batch before and after its update (rules with ``observes_update`` set)."""
        raise NotImplementedError(f"{type(self).__name__} does not observe updates")

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        """Take ``state`` as :meth:`state` gave it (read back from a checkpoint's JSON), or ValueError naming the entry
        that is wrong (a null, a list or a dict where a number goes was taken once, and the first step failed)."""


@dataclass
class PaperLambda(_Rule):
    """Eq. 15. ``update`` takes this step's L_pr value and returns λ_{t+1} for this step's loss.

    λ is kept ≥ 0: it is the dual variable of Eq. 10 (Eq. 15 and Algorithm 1 write no clamp; without it a run where
    L_pr never rises would drive λ negative, rewarding L_pr's growth)."""

    alpha: float  # the model's learning rate (the Taylor step of Eq. 14)
    beta: float
    epsilon: float
    value: float = 0.0  # λ₀ = 0
    previous_pr: float | None = None  # L_pr(θ_{t−1})

    def needs_pr_gradient(self) -> bool:
        """Whether this step's λ will most likely be > 0, so L_pr's gradient will count: it was last step."""
        return self.value > 0

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
        # previous_pr is unset before the first step (no L_pr yet); the others are set from the start
        self.value, self.last_g = _number(state, "value"), _number(state, "last_g")
        self.previous_pr = None if state["previous_pr"] is None else _number(state, "previous_pr")


@dataclass
class PairedLambda(PaperLambda):
    """Eq. 15 on one batch. ``observe`` gets L_pr of a step's preservation batch before and after that
    step's update; the next ``update`` uses that pair, so g̃ measures what the update did to L_pr."""

    pair: tuple[float, float] | None = None  # (L_pr(θ_t), L_pr(θ_{t+1})) on step t's batch
    observes_update: ClassVar[bool] = True

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
        pair = state.get("pair")  # unset before a paired step has been observed
        if pair is not None and not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"λ's state: pair must be two numbers, got {shown(repr(pair))}")
        self.pair = None if pair is None else (_number(pair, 0, "pair"), _number(pair, 1, "pair"))


@dataclass
class ExactLambda(_Rule):
    """Eq. 12 every step, from both gradients (``solve``); nothing carries over between steps."""

    epsilon: float
    from_gradients: ClassVar[bool] = True

    def needs_pr_gradient(self) -> bool:
        return True

    def solve(self, grad_er: torch.Tensor, grad_pr: torch.Tensor) -> float:
        return exact_lambda(grad_er, grad_pr, self.epsilon)


@dataclass
class FixedLambda(_Rule):
    """A constant λ (linear scalarisation, for ablations and the cost benchmark); a setting, not checkpointed
    state (resume checks it like the others)."""

    value: float

    def needs_pr_gradient(self) -> bool:
        return self.value > 0

    def update(self, pr_now: float) -> float:
        return self.value


def _number(holder, key, name: str | None = None) -> float:
    """``holder[key]`` as a finite float, or ValueError naming it (a bool is not taken for a number)."""
    value = holder[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"λ's state: {name or key} must be a finite number, got {shown(repr(value))}")
    return float(value)


def rule_for(config) -> _Rule:
    """The λ rule a :class:`~zerase_core.config.TrainConfig` names (``lambda_mode``, one of :data:`MODES`), with its
    settings (α is the learning rate)."""
    if config.lambda_mode == "exact":
        return ExactLambda(config.eps)
    if config.lambda_mode == "fixed":
        return FixedLambda(config.fixed_lambda)
    if config.lambda_mode == "paired":
        return PairedLambda(alpha=config.lr, beta=config.beta, epsilon=config.eps)
    return PaperLambda(alpha=config.lr, beta=config.beta, epsilon=config.eps)


def exact_lambda(grad_er: torch.Tensor, grad_pr: torch.Tensor, epsilon: float) -> float:
    """Eq. 12 clipped at 0 (λ ≥ 0): the dual optimum for flattened gradients."""
    g_er, g_pr = grad_er.double(), grad_pr.double()
    norm2 = torch.dot(g_pr, g_pr)
    if norm2 <= 1e-12 * torch.dot(g_er, g_er):
        # No preservation gradient to trade against. At B = 0 (the first step) ∇L_pr is the kernels' rounding
        # noise, and with ε = 0 the ratio would turn that noise into a huge λ* and a random direction.
        return 0.0
    return max(0.0, float((-torch.dot(g_er, g_pr) - epsilon) / norm2))


def direction(grad_er: torch.Tensor, grad_pr: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 11: d* = ∇L_er + λ*∇L_pr (λ* = 0 leaves the erasure gradient alone)."""
    return grad_er + lam * grad_pr
