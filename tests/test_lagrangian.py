"""λ rules: Eq. 15 step by step, Eq. 12 against its closed form, and the trainer's use of them."""

from __future__ import annotations

import pytest
import torch

from zerase_core.lagrangian import PaperLambda, direction, exact_lambda, rule_for


def test_paper_rule_reproduces_eq15_step_by_step():
    alpha, beta, eps = 1e-3, 0.1, 1e-2
    rule = PaperLambda(alpha=alpha, beta=beta, epsilon=eps)
    losses = [0.0, 0.002, 0.0015, 0.004, 0.0041, 0.0]
    lam, prev, peak = 0.0, None, 0.0
    for value in losses:
        g = ((value if prev is None else prev) - value) / alpha + eps  # g̃_t of Eq. 15
        lam = max(0.0, lam - beta * g)
        prev = value
        assert rule.update(value) == lam
        assert rule.last_g == g
        peak = max(peak, rule.value)
    # the scripted sequence exercises both branches: λ rose when L_pr jumped, and fell to 0 again
    assert peak > 0.1 and rule.value == 0.0


def test_paper_rule_rises_when_preservation_degrades():
    rule = PaperLambda(alpha=1e-3, beta=0.1, epsilon=1e-3)
    values = [rule.update(v) for v in (0.0, 0.01, 0.02)]
    assert values[0] == 0.0 and 0 < values[1] < values[2]


def test_exact_lambda_matches_closed_form_on_quadratics():
    # L_er = ½‖θ − a‖², L_pr = ½‖θ − b‖²: gradients θ − a and θ − b are known exactly.
    theta = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    a = torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64)
    b = torch.tensor([0.0, 2.5, -2.0], dtype=torch.float64)
    g_er, g_pr = theta - a, theta - b
    eps = 0.05
    expected = (-(g_er @ g_pr) - eps) / (g_pr @ g_pr)
    assert expected > 0  # a conflicting pair
    lam = exact_lambda(g_er, g_pr, eps)
    assert abs(lam - float(expected)) < 1e-12
    d = direction(g_er, g_pr, lam)
    # at λ* > 0 the constraint ∇L_pr · d ≥ −ε holds with equality (KKT)
    assert abs(float(g_pr @ d) + eps) < 1e-12
    # no conflict (both losses fall along the same direction): λ* = 0, d is the erasure gradient
    assert exact_lambda(g_er, g_er, eps) == 0.0
    assert exact_lambda(g_er, torch.zeros(3, dtype=torch.float64), eps) == 0.0
    noise = torch.tensor([1e-9, 0.0, 0.0], dtype=torch.float64)  # ∇L_pr at B = 0: rounding noise only
    assert exact_lambda(g_er, noise, 0.0) == 0.0  # not (−g_er·noise)/‖noise‖² ≈ 1e9 times g_er's scale


def test_paired_rule_uses_the_observed_before_and_after_pair():
    from zerase_core.lagrangian import PairedLambda

    alpha, beta, eps = 1e-3, 0.1, 1e-3
    rule = PairedLambda(alpha=alpha, beta=beta, epsilon=eps)
    assert rule.update(0.5) == 0.0 and rule.last_g == eps  # step 1: no update behind it yet
    rule.observe(0.010, 0.012)  # the update raised L_pr on its own batch by 0.002
    g = (0.010 - 0.012) / alpha + eps
    assert rule.update(0.9) == max(0.0, -beta * g) and rule.last_g == g  # 0.9, another batch's value, is ignored
    rule.observe(0.012, 0.011)
    restored = PairedLambda(alpha=alpha, beta=beta, epsilon=eps)
    restored.load_state(rule.state())
    assert restored.update(0.0) == rule.update(0.0)  # the pending pair survives a checkpoint


def test_each_mode_asks_for_the_preservation_gradient_only_when_it_can_count():
    from dataclasses import replace

    from zerase_core.config import TrainConfig
    from zerase_core.lagrangian import MODES, rule_for

    config = TrainConfig(concept="cat", lr=1e-3, beta=0.1, epsilon=1e-3, fixed_lambda=0.5)
    rules = {mode: rule_for(replace(config, lambda_mode=mode)) for mode in MODES}
    # λ₀ = 0 under Eq. 15: the first step's L_pr gradient cannot enter the update; Eq. 12 always needs it.
    assert {m: r.needs_pr_gradient() for m, r in rules.items()} == {
        "paper": False, "paired": False, "exact": True, "fixed": True}
    assert not rule_for(replace(config, lambda_mode="fixed", fixed_lambda=0.0)).needs_pr_gradient()
    rules["paper"].update(0.0)
    rules["paper"].update(0.5)  # L_pr rose by 0.5 in one step: g̃ < 0, λ > 0
    assert rules["paper"].value > 0 and rules["paper"].needs_pr_gradient()
    fixed = rules["fixed"]
    fixed.load_state({"value": 0.0, "previous_pr": None, "last_g": 0.0})  # a checkpoint cannot change a setting
    assert fixed.update(1.0) == 0.5


def test_each_rule_is_built_with_the_settings_it_names():
    """α is the learning rate (the Taylor step of Eq. 14), β the dual step, ε the preset's or the given one: swapped,
    only one slow training test noticed (a mutation audit)."""
    from zerase_core.config import TrainConfig
    from zerase_core.lagrangian import ExactLambda, FixedLambda, PairedLambda, rule_for

    def config(mode, **over):
        return TrainConfig(concept="red", lambda_mode=mode, lr=2e-3, beta=0.3, epsilon=0.05, **over)

    for mode, kind in (("paper", PaperLambda), ("paired", PairedLambda)):
        rule = rule_for(config(mode))
        assert type(rule) is kind and (rule.alpha, rule.beta, rule.epsilon) == (2e-3, 0.3, 0.05)
    exact = rule_for(config("exact"))
    assert type(exact) is ExactLambda and exact.epsilon == 0.05
    fixed = rule_for(config("fixed", fixed_lambda=0.7))
    assert type(fixed) is FixedLambda and fixed.value == 0.7


def test_euler_steps_by_the_schedule_toward_sigma_zero():
    """x_{k+1} = x_k + (σ_{k+1} − σ_k) v: with v = ε − x0 constant, from σ = 1 (noise) it lands on x0 at σ = 0."""
    from zerase_core.sampling import flow_sigmas, integrate

    x0, noise = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.25])
    sigmas = flow_sigmas(4, 3.0).tolist()
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and all(a > b for a, b in zip(sigmas, sigmas[1:]))
    torch.testing.assert_close(integrate(lambda x, s: noise - x0, noise, sigmas), x0)
    halfway = integrate(lambda x, s: noise - x0, noise, sigmas[:3])
    torch.testing.assert_close(halfway, sigmas[2] * noise + (1 - sigmas[2]) * x0)


@pytest.mark.parametrize("mode", ["paper", "paired"])
def test_a_rules_state_loads_back_as_it_was_and_each_wrong_entry_is_named(mode):
    """What a checkpoint keeps of λ (state → JSON → load_state) gives back the rule it was; an entry that is not a
    finite number (a bool, inf, a string, a list where a number goes) is refused by its name, not taken."""
    import json
    from types import SimpleNamespace
    config = SimpleNamespace(lambda_mode=mode, lr=1e-3, beta=0.1, eps=1e-3, fixed_lambda=0.0)
    rule = rule_for(config)
    for pr in (0.2, 0.5):  # L_pr rose: λ > 0
        if rule.observes_update:
            rule.observe(pr, pr + 0.3)
        rule.update(pr)
    again = rule_for(config)
    again.load_state(json.loads(json.dumps(rule.state())))
    assert again == rule and again.value > 0
    for name, wrong in [("value", True), ("last_g", float("inf")), ("previous_pr", "0.1"), ("value", [0.5])]:
        with pytest.raises(ValueError, match=f"λ's state: {name} must be a finite number"):
            rule_for(config).load_state(rule.state() | {name: wrong})
    if mode == "paired":
        with pytest.raises(ValueError, match="λ's state: pair must be a finite number"):
            rule_for(config).load_state(rule.state() | {"pair": [0.1, None]})


@pytest.mark.parametrize("mode", ["paper", "paired"])
def test_an_unset_previous_pr_and_one_of_zero_load_back_as_they_were(mode):
    """previous_pr loads back as it was saved: unset (a rule before its first step) as unset, and 0.0 as 0.0, not as
    unset. L_pr(θ₀) is 0 at a run's first step (B = 0), so 0.0 is what a checkpoint written then holds; read back as
    unset, the resumed run's next g̃ was ε instead of (0 − L_pr)/α + ε, and its λ stayed 0 where the uninterrupted
    run's rose (a mutation audit: `if not previous_pr` and a required previous_pr passed every test)."""
    import json
    from types import SimpleNamespace

    config = SimpleNamespace(lambda_mode=mode, lr=1e-3, beta=0.1, eps=1e-3, fixed_lambda=0.0)
    fresh, again = rule_for(config), rule_for(config)
    again.load_state(json.loads(json.dumps(fresh.state())))
    assert again == fresh and again.previous_pr is None
    rule = rule_for(config)
    if rule.observes_update:
        rule.observe(0.0, 0.0)
    rule.update(0.0)  # the first step: L_pr(θ₀) = 0
    resumed = rule_for(config)
    resumed.load_state(json.loads(json.dumps(rule.state())))
    assert resumed == rule and resumed.previous_pr == 0.0
    assert resumed.update(0.5) == rule.update(0.5)
    if mode == "paper":
        assert rule.value > 0  # L_pr rose from 0: λ rises, in the resumed run as in the uninterrupted one
