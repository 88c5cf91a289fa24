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


# --- from a mutation audit: each kills a mutant the suite let through -------------------------------------------

def test_text_and_dit_configs_refuse_sizes_that_cannot_be_built():
    """Refused by name when the config is made, not as torch's assertion (heads) or a shape error at the first long
    prompt (no room for <bos>/<eos>), nor a latent grid that does not tile the image."""
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        TextConfig(dim=63, n_heads=4)
    with pytest.raises(ValueError, match="max_tokens"):
        TextConfig(max_tokens=1)
    with pytest.raises(ValueError, match="unshuffle"):
        DiTConfig(unshuffle=3)


def test_sampler_config_refuses_a_shift_or_guidance_that_cannot_sample_and_follows_its_shift():
    """shift <= 0 inverts or flattens the schedule, a negative cfg guides away from the prompt; the schedule is the
    engine's, shifted as the config says (the shipped shift is 1.0, where a dropped shift would not show)."""
    from zerase_core.sampling import flow_sigmas

    for bad in (dict(shift=0.0), dict(shift=-1.0), dict(cfg=-0.5)):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)
    shifted = SamplerConfig(steps=4, shift=3.0).sigmas()
    assert torch.equal(shifted, flow_sigmas(4, 3.0)) and not torch.equal(shifted, SamplerConfig(steps=4).sigmas())


def test_tokens_are_case_insensitive_and_a_long_prompt_is_cut_keeping_eos(encoder):
    """"Red" is the word "red" (not <unk>: a capital letter lost the concept's token); a prompt longer than max_tokens
    is cut to exactly max_tokens with <eos> last, so it still fits the positional table."""
    tok = encoder.tokenizer
    assert tok.tokenize("Red CIRCLE", 10)[0] == tok.tokenize("red circle", 10)[0]
    assert tok.stoi["<unk>"] not in tok.tokenize("Red CIRCLE", 10)[0]
    n = encoder.config.max_tokens
    ids, spans = tok.tokenize(" ".join(["red"] * 100), n)
    assert len(ids) == len(spans) == n and ids[-1] == tok.stoi["<eos>"] and spans[-1] is None
    (enc,) = encoder.encode([" ".join(["red"] * 100)])
    assert enc.features.shape == (n, encoder.feat_dim)


def test_the_same_word_at_two_places_encodes_differently_and_features_are_layer_normalised(encoder):
    """Learned positions make a word's feature depend on where it stands (without them "red red" gives two equal
    vectors); the final LayerNorm, at its initial affine, leaves each token's feature at mean 0 and variance 1."""
    (enc,) = encoder.encode(["red red"])
    assert not torch.allclose(enc.features[1], enc.features[2], atol=1e-4)
    assert torch.allclose(enc.features.mean(-1), torch.zeros(enc.n_tokens), atol=1e-5)
    assert torch.allclose(enc.features.var(-1, unbiased=False), torch.ones(enc.n_tokens), atol=1e-3)


@needs_weights
def test_generate_follows_its_seed_and_the_negative_prompt():
    """Another seed draws other noise; the negative prompt is what guidance pushes away from, so changing it changes
    the images (it was accepted and ignored)."""
    bundle = load_toy()
    fast = SamplerConfig(steps=2, shift=bundle.sampling.shift, cfg=3.0)
    prompts = ["a large red circle on the left on a white background"]
    first = generate(bundle, prompts, seed=0, sampler=fast)
    assert not torch.equal(first, generate(bundle, prompts, seed=1, sampler=fast))
    negative = SamplerConfig(steps=2, shift=fast.shift, cfg=3.0, negative_prompt="a small blue square")
    assert not torch.allclose(first, generate(bundle, prompts, seed=0, sampler=negative), atol=1e-4)


def test_cfg_one_runs_the_conditional_pass_alone(monkeypatch):
    """cfg = 1.0 is no guidance: the sampler skips the unconditional half (half the cost), as SamplerConfig says."""
    import zerase_core.toy.sampling as sampling

    batches = []
    monkeypatch.setattr(sampling, "predict", lambda t, x, s, caps, p: batches.append(len(x)) or torch.zeros_like(x))
    torch.manual_seed(0)
    encoder = ToyTextEncoder(TextConfig()).eval()
    sampling.euler_sample(None, encoder, DiTConfig(), ["red", "blue"], 0, SamplerConfig(steps=2, cfg=1.0))
    assert batches == [2, 2]
    batches.clear()
    sampling.euler_sample(None, encoder, DiTConfig(), ["red", "blue"], 0, SamplerConfig(steps=2, cfg=3.0))
    assert batches == [4, 4]


@needs_weights
def test_classifier_predict_names_the_drawn_labels_and_accuracy_is_a_fraction():
    """predict is what adherence and the erasure metrics read: the canonical value of the highest logit per image.
    accuracy is a fraction of the n images, whatever n."""
    from zerase_core.toy.world import sample

    state, _ = load_weights(CLASSIFIER_FILE)
    model = ToyClassifier()
    model.load_state_dict(state)
    images, labels = sample(40, seed=2024)
    predicted = model.eval().predict(torch.from_numpy(images).permute(0, 3, 1, 2))
    for name, values in predicted.items():
        assert sum(v == getattr(lab, name) for v, lab in zip(values, labels)) >= 38, name
    acc = accuracy(model, n=40, seed=2024)
    assert all(0.9 <= a <= 1.0 for a in acc.values()), acc


def test_train_classifier_draws_a_fresh_batch_each_step_and_measures_on_the_held_out_seed(monkeypatch):
    """Each step a new batch (seed + step), the held-out accuracy on eval_seed (never a training seed), and the model
    handed back in eval mode."""
    import zerase_core.toy.classifier as classifier

    seeds = []
    batch = classifier.world_batch
    monkeypatch.setattr(classifier, "world_batch", lambda n, seed: seeds.append(seed) or batch(n, seed))
    cfg = classifier.ClassifierTraining(steps=3, batch=4, eval_samples=4)
    model, acc = classifier.train_classifier(cfg)
    assert seeds == [cfg.seed, cfg.seed + 1, cfg.seed + 2, cfg.eval_seed]
    assert not model.training and set(acc) == set(classifier.ATTRIBUTES)


def test_adherence_draws_each_batch_from_its_own_noise(monkeypatch):
    """Batches of an adherence run take seed + start: with the seed alone every batch of 100 repeated the first
    one's noise, and n = 500 measured 100 noises five times."""
    import zerase_core.toy.evaluate as evaluate

    seeds = []

    def sampled(transformer, encoder, dit, prompts, seed, *rest):
        seeds.append(seed)
        return torch.rand(len(prompts), 3, 32, 32)

    monkeypatch.setattr(evaluate, "euler_sample", sampled)
    evaluate.adherence(torch.nn.Linear(1, 1), None, DiTConfig(), ToyClassifier().eval(), SamplerConfig(), n=5, seed=7,
                       batch=2)
    assert seeds == [7, 9, 11]


def test_toy_weights_are_stored_as_fp16_keep_integers_and_load_as_float32(tmp_path):
    """Shipped files are fp16 (half the size), integer tensors are not cast, and a loaded state is float32 whatever
    the file holds; a file written without metadata loads with none."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from zerase_core.toy.weights_io import save_weights

    save_weights(tmp_path / "w.safetensors", {"w": torch.rand(3), "i": torch.arange(3)}, {"format": "x"})
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert f.get_tensor("w").dtype == torch.float16 and f.get_tensor("i").dtype == torch.int64
    state, _ = load_weights(tmp_path / "w.safetensors")
    assert state["w"].dtype == torch.float32 and torch.equal(state["i"], torch.arange(3))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    assert load_weights(tmp_path / "bare.safetensors")[1] == {}


def test_a_toy_training_batch_is_a_pure_function_of_seed_and_step():
    """A resumed run sees the same data as an uninterrupted one (the trainer's promise), and each step other data."""
    from zerase_core.toy.train import DiTTraining, training_batch

    cfg, dit = DiTTraining(batch=4), DiTConfig()
    a, b, c = training_batch(3, cfg, dit), training_batch(3, cfg, dit), training_batch(4, cfg, dit)
    assert a[1] == b[1] and all(torch.equal(x, y) for x, y in zip(a[::2] + a[3:], b[::2] + b[3:]))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])


def test_the_toy_trainer_learns_x0_minus_noise_with_a_warmup_and_a_short_ema_memory(tmp_path, monkeypatch):
    """The raw output's target is x0 - eps (the engine's convention, minus the velocity): a model that outputs it
    exactly has zero loss. The learning rate warms up from lr/warmup (not 0: the first step moved nothing) and ends at
    10%; the EMA's first decay is 1/10, so it follows the live weights early on."""
    import zerase_core.toy.train as train

    cfg, dit = train.DiTTraining(batch=2), DiTConfig()
    assert train.lr_at(0, cfg) == pytest.approx(cfg.lr / cfg.warmup)
    assert train.lr_at(cfg.warmup - 1, cfg) == pytest.approx(cfg.lr)
    assert train.lr_at(cfg.steps, cfg) == pytest.approx(0.1 * cfg.lr)
    trainer = train.Trainer(tmp_path, cfg, dit, TextConfig(), SamplerConfig())
    before = [p.clone() for p in trainer.transformer.parameters()]
    x0, _, noise, _ = train.training_batch(0, cfg, dit)
    exact = (x0 - noise).clone()
    real = train.predict
    monkeypatch.setattr(train, "predict", lambda *a: real(*a) * 0 + exact)
    assert trainer.train_step() == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(train, "predict", real)
    trainer.train_step()  # a real step: the live weights move
    decay = 2 / 11  # (1 + step) / (10 + step) at step 1; the EMA held the (unmoved, zero-gradient) first weights
    for e, live, b in zip(trainer.ema_transformer.parameters(), trainer.transformer.parameters(), before):
        assert torch.allclose(e, decay * b + (1 - decay) * live, atol=1e-6)


def test_a_resumed_toy_run_gets_its_ema_and_rng_back(tmp_path):
    """The checkpoint holds the EMA weights (what is exported) and the RNG state; a resume that kept the fresh EMA
    exported weights that forgot all training before the stop."""
    from zerase_core.toy.train import DiTTraining, Trainer

    def trainer():
        return Trainer(tmp_path, DiTTraining(batch=2), DiTConfig(), TextConfig(), SamplerConfig())

    first = trainer()
    first.train_step()
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    first.save_checkpoint()
    again = trainer()
    again.try_resume()
    assert torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(first.ema_transformer.state_dict().values(), again.ema_transformer.state_dict().values()):
        assert torch.equal(a, b)


def test_export_keeps_the_best_weights_only(tmp_path, monkeypatch):
    """--export is the shipped file: it is written when min(colour, shape) improves, never by a worse evaluation."""
    import zerase_core.toy.train as train

    trainer = train.Trainer(tmp_path, train.DiTTraining(batch=2), DiTConfig(), TextConfig(), SamplerConfig())
    trainer.classifier = ToyClassifier()
    scores = iter([0.9, 0.5])
    monkeypatch.setattr(train, "adherence", lambda *a, **k: dict.fromkeys(("colour", "shape"), next(scores)))
    export = tmp_path / "best.safetensors"
    trainer.step = 1
    trainer.evaluate_and_export(export)
    trainer.step = 2
    trainer.evaluate_and_export(export)
    assert load_weights(export)[1]["step"] == "1" and trainer.best == 0.9


def test_the_adherence_report_evaluates_the_styles_seed_and_threads_it_is_given(monkeypatch, capsys):
    """`python -m zerase_core.toy.report` passes its --n, --seed and --styles through to evaluate_adherence and sets
    --threads (a report that ignored them would print the default run's figures under the asked-for heading)."""
    from types import SimpleNamespace

    from zerase_core.toy import report

    calls, threads = [], []
    monkeypatch.setattr(report, "load_toy", lambda: SimpleNamespace(sampling="euler", metadata={"step": 7}))
    monkeypatch.setattr(report, "evaluate_adherence", lambda bundle, n, seed, style: calls.append((n, seed, style))
                        or {"colour": 0.5})
    monkeypatch.setattr(report.torch, "set_num_threads", threads.append)
    report.main(["--n", "5", "--seed", "3", "--styles", "synonym", "--threads", "2"])
    assert calls == [(5, 3, "synonym")] and threads == [2]
    out = capsys.readouterr().out
    assert "weights step 7" in out and "synonym" in out and "colour 0.500" in out and "n=5" in out
