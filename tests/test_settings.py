"""Settings a Python caller gets wrong are refused when they are made, by name, before any prompt is encoded."""

from __future__ import annotations

import re

import pytest
import torch

from zerase_core.config import TrainConfig
from zerase_core.errors import ZEraseError
from zerase_core.lora import LoRAConfig
from zerase_core.lora_file import ErasureLoRA


def _config(**changes) -> TrainConfig:
    return TrainConfig(**({"concept": "red"} | changes))


@pytest.mark.parametrize("changes, message", [
    # a string where a tuple of strings goes was iterated as its letters: preservation of "b", "l", "u", "e"
    (dict(preserve="blue"), r"preserve must be a tuple of str, e\.g\. \('a',\) for one; got str 'blue'"),
    (dict(templates="a photo of {}"), r"templates must be a tuple of str"),
    (dict(seed=1.5), r"seed must be an int; got float 1\.5"),  # was torch's manual_seed error after encoding
    (dict(steps=2.5), r"steps must be an int"),  # ran 3 steps and recorded 2.5
    (dict(xt_pool=2.5), r"xt_pool must be an int"),
    (dict(seed=True), r"seed must be an int; got bool"),
    (dict(lr="0.001"), r"lr must be a float; got str"),
    (dict(lora={"rank": 4}), r"lora must be a LoRAConfig; got dict"),
    (dict(epsilon="1e-3"), r"epsilon must be a float or None; got str"),
    (dict(lr=10**400), r"lr must be a float; got int 1000+…\.$"),  # no float holds it: was an OverflowError
])
def test_a_setting_of_the_wrong_type_is_refused_by_name(changes, message):
    with pytest.raises(ZEraseError, match=message):
        _config(**changes)


@pytest.mark.parametrize("changes, message", [
    (dict(sample_steps=0), r"sample_steps must be ≥ 1"),  # was torch's random_ error inside the pool
    (dict(shuffle_pool=-3), r"shuffle_pool must be ≥ 0"),  # was no shuffling, silently
    (dict(sample_cfg=-5.0), r"sample_cfg must be ≥ 0"),
    (dict(attn_weight=-1.0), r"attn_weight must be ≥ 0"),  # would reward attention on the concept
    (dict(lambda_mode="fixed", fixed_lambda=-5.0), r"fixed_lambda must be ≥ 0"),  # was λ = 0, silently
    # it multiplies ΔW: 0 trained nothing (no gradient), and the file of a negative one is refused after training
    (dict(lora=LoRAConfig(strength=0.0)), r"lora\.strength must be > 0 and ≤ 20"),
    (dict(lora=LoRAConfig(strength=-1.0)), r"lora\.strength must be > 0 and ≤ 20 .*got -1\.0"),
    (dict(lora=LoRAConfig(strength=21.0)), r"lora\.strength must be > 0 and ≤ 20"),
    (dict(concept="\u200b"), r"The concept is empty"),  # a zero-width space: nothing a prompt shows
    (dict(preserve=("\u200e ",)), r"A preservation concept is empty"),
])
def test_a_setting_out_of_its_range_is_refused_by_name(changes, message):
    with pytest.raises(ZEraseError, match=message):
        _config(**changes)


@pytest.mark.parametrize("changes, message", [
    (dict(rank=2.5), r"LoRAConfig: rank must be an int"),
    (dict(layers=(0, 1, 2)), r"layers must be a tuple of 2 \(int, int\) or None"),
    (dict(alpha=0.0), r"alpha must be > 0"),  # a LoRA that can change nothing, trained for nothing
    (dict(alpha=-4.0), r"alpha must be > 0"),
    (dict(strength=1e39), r"must be finite numbers in float32"),  # finite in Python, inf in the model
    (dict(alpha=1e20, rank=1, strength=1e20), r"float32 .*; got 1e\+20, 1e\+20, 1e\+40"),  # the product told too
])
def test_a_lora_setting_that_would_fail_late_or_train_nothing_is_refused(changes, message):
    with pytest.raises(ZEraseError, match=message):
        LoRAConfig(**changes)


def test_lists_are_taken_as_tuples_and_settings_survive_their_json():
    config = _config(preserve=["blue"], templates=["a {} ball"], lora=LoRAConfig(layers=[0, 2]))
    assert config.preserve == ("blue",) and config.templates == ("a {} ball",) and config.lora.layers == (0, 2)
    assert TrainConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()  # to_dict resolves ε and templates


def test_an_erasure_lora_that_could_not_be_read_back_is_refused_when_made():
    factors = {(0, "q"): (torch.zeros(2, 8), torch.zeros(8, 2))}
    for changes, message in ((dict(scale=float("nan")), "finite numbers in float32"),
                             (dict(strength=1e39), "finite numbers in float32"),
                             # ΔW's multiplier, told as the number that is not finite
                             (dict(scale=1e20, strength=1e20), "their product 1e[+]40 must be finite numbers in"),
                             (dict(scale=0.0), "scale must be > 0"),  # alpha / rank: ≤ 0 would strengthen
                             (dict(scale=-1.0), "scale must be > 0 .*got -1"),
                             # the pack writes 1: a negative one applied the erasure's opposite under the
                             # concept's name, 0 nothing, and merges carried either past their weights' bounds
                             (dict(strength=-1.0), "strength must be > 0 and at most 20; got -1"),
                             (dict(strength=0.0), "strength must be > 0 and at most 20; got 0"),
                             (dict(strength=1e30), "strength must be > 0 and at most 20; got 1e[+]30"),
                             (dict(concept=None), "concept must be a str"),
                             (dict(preserve=(1, 2)), "preserve must be a tuple of str")):
        with pytest.raises(ZEraseError, match=message):
            ErasureLoRA(factors, **changes)


def test_numpy_numbers_are_taken_as_pythons_and_a_numpy_nan_is_refused():
    """np.int64 steps trained, then failed the checkpoint's JSON; np.float32 NaN passed the finiteness check, which
    asks for a float."""
    import numpy as np

    config = _config(steps=np.int64(2), lr=np.float64(0.01), lora=LoRAConfig(layers=[np.int64(0), 2]))
    assert (type(config.steps), type(config.lr), type(config.lora.layers[0])) == (int, float, int)
    for changes in (dict(shift=np.float32("nan")), dict(epsilon=np.float32("inf"))):
        with pytest.raises(ZEraseError, match="Settings must be finite numbers"):
            _config(**changes)
    with pytest.raises(ZEraseError, match="steps must be an int; got float64"):
        _config(steps=np.float64(2.0))


@pytest.mark.parametrize("preset, eps, prompt", [
    ("nsfw", 1e-3, "nude"),
    ("style", 1e-3, "An art in the style of nude"),
    ("entity", 1e-2, "A photo of nude"),
    ("abstract", 1e-2, "A close scene of nude"),
    ("celebrity", 1e-2, "A photo of nude"),
    ("utility", 5e-3, "nude"),
])
def test_each_preset_gives_the_papers_tolerance_and_template(preset, eps, prompt):
    """Table 6's ε and Table 7's template per concept type, what a run gets when it leaves them out (nsfw's and
    utility's template, the bare concept, is ours: the paper gives none)."""
    config = TrainConfig(concept="nude", preset=preset)
    assert config.eps == eps
    assert [t.replace("{}", "nude") for t in config.erase_templates] == [prompt]


def test_an_epsilon_of_zero_is_used_as_given_not_replaced_by_the_presets():
    """ε = 0 (no rise of L_pr allowed) is a valid setting, not 'unset'."""
    config = TrainConfig(concept="red", preset="entity", epsilon=0.0)
    assert config.eps == 0.0 and config.to_dict()["epsilon"] == 0.0


@pytest.mark.parametrize("changes", [
    dict(sample_cfg=0.0),  # "≥ 0": guidance 0 samples with the empty prompt's prediction
    dict(epsilon=0.0),
    dict(shuffle_pool=0),
    dict(eta=0.0),
    dict(xt_pool=1),
])
def test_a_setting_on_the_edge_of_its_range_is_taken(changes):
    """Each range's closed end is a valid setting, taken as given."""
    config = TrainConfig(**({"concept": "red"} | changes))
    assert all(getattr(config, name) == value for name, value in changes.items())


@pytest.mark.parametrize("changes", [dict(height=0), dict(width=0), dict(width=-64)])
def test_a_training_resolution_that_is_not_positive_is_refused_on_either_side(changes):
    """Height and width are checked each on its own (the CLI's --resolution sets both, the Python API either)."""
    with pytest.raises(ZEraseError, match="The resolution must be positive"):
        TrainConfig(**({"concept": "red"} | changes))


@pytest.mark.parametrize("shift, steps", [(1e-8, 8), (1e8, 8), (1e8, 4)])
def test_a_flow_shift_whose_levels_float32_cannot_hold_apart_is_refused(shift, steps):
    """σ₀ infinite (shift ≈ 6e-8 or less) or levels rounded to one σ (about 1e7 or more): the x_t pool finds a level by
    its σ, so the earlier of two equal levels was never sampled, and training drew uninitialised memory as x_t."""
    from zerase_core.sampling import flow_sigmas

    sigmas = flow_sigmas(steps, shift)
    assert not sigmas.isfinite().all() or (sigmas[1:] == sigmas[:-1]).any()  # what the refusal is for
    with pytest.raises(ZEraseError, match=re.escape(f"A flow shift of {shift:g} with {steps} sampling steps")):
        TrainConfig(concept="red", shift=shift, sample_steps=steps)
    for kept in (0.01, 3.0, 100.0):  # the range the message offers, ComfyUI's ModelSamplingAuraFlow's up to 100
        assert TrainConfig(concept="red", shift=kept, sample_steps=steps).shift == kept


def test_the_help_says_gradient_checkpointing_on_stops_before_the_last_layer():
    """`--help` tells "on" and auto's answer to running out as the run does them (memory_fit.most_checkpointed): all
    main layers but the last, not all (a mutation audit: the help's earlier "all" passed every test)."""
    import argparse

    from zerase_core.cli import _add_train

    parser = argparse.ArgumentParser()
    _add_train(parser)
    text = " ".join(parser.format_help().split())
    assert "as many as on from a step that runs out" in text
    assert "on (also the flag alone): all but the last (checkpointing it saves nothing), always" in text
