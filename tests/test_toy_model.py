"""The toy text encoder, classifier and shipped model: spans, templates, accuracy, loading, sampling."""

import ast
from dataclasses import FrozenInstanceError

import numpy as np
import pytest
import torch

from zerase_core.errors import ZEraseError
from zerase_core.prompts import EncodedPrompt, concept_token_indices
from zerase_core.toy import CLASSIFIER_FILE, DIT_FILE, generate, load_toy
from zerase_core.toy.classifier import ToyClassifier, accuracy
from zerase_core.toy.model import DiTConfig, to_image, to_latent
from zerase_core.toy.sampling import SamplerConfig
from zerase_core.toy.text import TextConfig, ToyTextEncoder
from zerase_core.toy.weights_io import load_weights

needs_weights = pytest.mark.skipif(
    not (DIT_FILE.exists() and CLASSIFIER_FILE.exists()),
    reason="shipped toy weights missing: run `python -m zerase_core.toy.train classifier` and `... dit`",
)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ToyTextEncoder(TextConfig()).eval()


def test_spans_cover_the_words_and_template_tokens_have_none(encoder):
    text = "On the left, a large Crimson circle"
    (enc,) = encoder.encode([text])
    assert isinstance(enc, EncodedPrompt)
    assert enc.spans[0] is None and enc.spans[-1] is None  # <bos>, <eos>
    pieces = [text[s:e] for s, e in enc.spans[1:-1]]
    assert pieces == ["On", "the", "left", ",", "a", "large", "Crimson", "circle"]
    assert enc.features.shape == (len(pieces) + 2, encoder.feat_dim)
    assert torch.isfinite(enc.features).all()


def test_empty_prompt_encodes_to_the_template(encoder):
    (enc,) = encoder.encode([""])
    assert enc.n_tokens == 2 and enc.spans == (None, None)


def test_unknown_words_map_to_unk_but_keep_spans(encoder):
    ids, spans = encoder.tokenizer.tokenize("a zebra", encoder.config.max_tokens)
    assert ids[2] == encoder.tokenizer.stoi["<unk>"] and spans[2] == (2, 7)


def test_concept_tokens_found_for_words_case_and_phrases(encoder):
    enc_a, enc_b = encoder.encode(["a red circle, red on red", "a big Crimson plus sign at the top"])
    assert concept_token_indices(enc_a, "red") == [2, 5, 7]
    assert concept_token_indices(enc_b, "crimson") == [3]
    assert concept_token_indices(enc_b, "plus sign") == [4, 5]
    with pytest.raises(ZEraseError):
        concept_token_indices(enc_b, "blue")


def test_encoding_is_independent_of_batch_padding(encoder):
    alone = encoder.encode(["a red circle"])[0].features
    batched = encoder.encode(["a red circle", "a very much longer prompt with many words in it"])[0].features
    assert torch.allclose(alone, batched, atol=1e-5)


def test_latent_round_trip():
    cfg = DiTConfig()
    images = torch.rand(2, 3, 32, 32)
    latents = to_latent(images, cfg)
    assert latents.shape == (2, *cfg.latent_shape)
    assert torch.allclose(to_image(latents, cfg), images, atol=1e-6)


def test_configs_are_frozen_and_checked():
    with pytest.raises(FrozenInstanceError):
        SamplerConfig().steps = 3
    with pytest.raises(ValueError):
        DiTConfig(dim=128, n_heads=4, axes_dims=(8, 8, 8))
    with pytest.raises(ValueError):
        SamplerConfig(steps=0)


@needs_weights
def test_classifier_is_accurate_on_fresh_world_samples():
    """Floor 0.98: the world's classes never overlap (see test_toy_world), so a working classifier is
    ~100% correct; 0.98 of 500 leaves room for a few anti-aliased borderline pixels, not for a broken head."""
    state, meta = load_weights(CLASSIFIER_FILE)
    model = ToyClassifier()
    model.load_state_dict(state)
    acc = accuracy(model.eval(), n=500, seed=424_242)
    assert min(acc.values()) >= 0.98, acc
    assert min(ast.literal_eval(meta["heldout_accuracy"]).values()) >= 0.98


@needs_weights
def test_shipped_model_loads_frozen_and_generates_images():
    bundle = load_toy()
    assert not any(p.requires_grad for p in bundle.transformer.parameters())
    assert not bundle.transformer.training
    assert bundle.sampling == SamplerConfig(**ast.literal_eval(bundle.metadata["sampler"]))
    fast = SamplerConfig(steps=4, shift=bundle.sampling.shift, cfg=bundle.sampling.cfg)
    images = generate(bundle, ["a large red circle on the left on a white background", ""], seed=0, sampler=fast)
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    again = generate(bundle, ["a large red circle on the left on a white background", ""], seed=0, sampler=fast)
    assert torch.equal(images, again)
    assert bundle.to_latent(images).shape == (2, *bundle.latent_shape)


@needs_weights
def test_shipped_model_follows_colour_and_shape_at_the_default_sampler():
    """Issue 5's floor, 0.90 for colour and shape. Measured 1.00 and 0.97 on 500 prompts; on these 100 the
    floor sits > 3 standard errors below 0.97, so only a real loss of adherence trips it."""
    from zerase_core.toy.evaluate import adherence

    bundle = load_toy()
    acc = adherence(bundle.transformer, bundle.encoder, bundle.dit_config, bundle.classifier, bundle.sampling,
                    n=100, seed=31_337)
    assert acc["colour"] >= 0.90 and acc["shape"] >= 0.90, acc


def test_toy_weights_metadata_reads_back_as_the_files_always_stored_it(tmp_path):
    """The toy's reader takes metadata as stored: a step is "40000", as in the shipped files (the weights' identity in
    every report), not a quoted '"40000"'."""
    from zerase_core.toy.weights_io import save_weights

    given = {"step": 40000, "format_version": "1", "sampler": "{'steps': 20}"}  # a number given as text or not
    save_weights(tmp_path / "w.safetensors", {"w": torch.zeros(1)}, given)
    assert load_weights(tmp_path / "w.safetensors")[1] == {"step": "40000", "format_version": "1",
                                                            "sampler": "{'steps': 20}"}
    assert load_weights(DIT_FILE)[1]["step"].isdigit()


def test_the_toy_trainer_resumes_from_a_checkpoint_read_without_pickled_objects(tmp_path, monkeypatch):
    """The toy DiT trainer's checkpoint holds tensors, numbers and strings only, so it is read with torch.load's
    weights_only (a checkpoint file cannot run code when read) and resumes the exact state it saved."""
    from zerase_core.toy.train import DiTTraining, Trainer

    def trainer():
        return Trainer(tmp_path, DiTTraining(batch=2), DiTConfig(), TextConfig(), SamplerConfig())

    first = trainer()
    first.train_step()
    first.step, first.best = 1, np.float64(0.5)  # as the classifier's adherence score comes
    first.save_checkpoint()
    again = trainer()
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(k.get("weights_only")) or load(*a, **k))
    again.try_resume()
    assert reads == [True]
    assert (again.step, again.best) == (1, 0.5)
    for a, b in zip(first.transformer.state_dict().values(), again.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert again.opt.state_dict()["state"][0]["step"] == first.opt.state_dict()["state"][0]["step"] == 1
    old = torch.load(first.ckpt_path, weights_only=True) | {"best": np.float64(0.5)}  # as written before 25759ae
    torch.save(old, first.ckpt_path)
    with pytest.raises(ZEraseError, match="numpy's float.*convert it once"):
        trainer().try_resume()
