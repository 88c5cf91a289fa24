"""Eq. 5-8 on hand-worked numbers: the sign of the negative guidance, and which terms L_pr sums."""

from __future__ import annotations

import pytest
import torch

from zerase_core.objectives import erase_target, loss_attn, loss_er, loss_erase, loss_pr, loss_total


def _full(value: float) -> torch.Tensor:
    return torch.full((1, 4, 2, 2), value)


def test_erase_target_points_away_from_the_concept():
    # v_∅ = 0, v_c = 1, η = 2: the target is v_∅ − η (v_c − v_∅) = −2, on the far side of ∅ from the concept.
    assert torch.equal(erase_target(_full(0.0), _full(1.0), eta=2.0), _full(-2.0))
    assert torch.equal(erase_target(_full(0.5), _full(1.0), eta=1.0), _full(0.0))


def test_loss_erase_is_the_mean_squared_distance_to_that_target():
    v_u, v_c = _full(0.0), _full(1.0)
    assert loss_erase(_full(0.0), v_u, v_c, eta=2.0).item() == pytest.approx(4.0)  # (0 − (−2))²
    assert loss_erase(_full(-2.0), v_u, v_c, eta=2.0).item() == 0.0
    assert loss_erase(v_c, v_u, v_c, eta=2.0).item() == pytest.approx(9.0)  # the teacher itself is far from it


def test_loss_pr_sums_the_unconditional_and_the_kept_concept_terms():
    # student ∅ off by 1, student c_pr off by 3: 1² + 3² = 10; without a kept concept only the first term.
    assert loss_pr(_full(1.0), _full(0.0), _full(0.0), _full(3.0)).item() == pytest.approx(10.0)
    assert loss_pr(_full(1.0), _full(0.0)).item() == pytest.approx(1.0)


def test_loss_attn_is_the_mean_mass_over_the_batch():
    assert loss_attn(torch.tensor([0.2, 0.4])).item() == pytest.approx(0.3)


def test_loss_er_adds_the_weighted_attention_term_and_loss_total_weighs_l_pr_by_lambda():
    t = torch.tensor
    assert loss_er(t(1.0), t(0.5), attn_weight=2.0).item() == pytest.approx(2.0)  # Eq. 7 at weight 2: 1 + 2·0.5
    assert loss_er(t(1.0), t(0.5)).item() == pytest.approx(1.5)  # the paper's weight, 1
    assert loss_total(t(2.0), t(3.0), lam=0.5).item() == pytest.approx(3.5)  # Algorithm 1: L_er + λ L_pr
    assert loss_total(t(2.0), t(3.0), lam=0.0).item() == pytest.approx(2.0)


def test_the_sigma_schedule_is_time_shifted_by_the_models_shift():
    """σ' = shift·σ / (1 + (shift − 1)·σ) at Z-Image's shift 3; shift 1 is the plain linear schedule."""
    from zerase_core.sampling import flow_sigmas

    assert flow_sigmas(4, 3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert flow_sigmas(4, 1.0).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_loss_total_at_lambda_zero_does_not_back_propagate_l_pr():
    """loss_total at λ = 0 leaves L_pr out, as its docstring says ("its graph is never walked"): L_er + 0·L_pr is the
    same value, but a finite L_pr whose gradient is not (here √x at 0) made 0·∞ = NaN in the update."""
    x = torch.zeros((), requires_grad=True)
    l_er, l_pr = (x - 1.0).square(), x.sqrt()  # L_pr = 0, finite; dL_pr/dx = +inf at 0
    loss_total(l_er, l_pr, 0.0).backward()
    assert x.grad is not None and torch.isfinite(x.grad) and x.grad.item() == -2.0
