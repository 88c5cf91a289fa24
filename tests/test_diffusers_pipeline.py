"""Erasure LoRAs in a plain diffusers ZImagePipeline (`zerase_core.diffusers_pipeline`): the gate reads each call's
token layout off the call's own inputs, so `pipe(...)` samples the erased model exactly as the engine predicts it."""

from __future__ import annotations

import pytest
import torch

from zerase_core.errors import ZEraseError
from zerase_core.lora import LoRAConfig
from zerase_core.tiny import TinyZImageConfig, small_zimage, tiny_zimage_backend

from devices import ON_DEVICES

TINY = TinyZImageConfig()


def _erasure_lora():
    """A LoRA that changes the tiny model (B ≠ 0), as a file would hold it, and the backend it was made on."""
    from zerase_core.apply import export_lora

    backend = tiny_zimage_backend()
    g = torch.Generator().manual_seed(5)
    lora_set = backend.install(LoRAConfig(rank=4))
    with torch.no_grad():
        for p in lora_set.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    # as trained on a diffusers Z-Image folder: the tiny model is named "z-image-tiny" by its own loader
    lora = export_lora(lora_set, concept="red", fingerprint=backend.fingerprint() | {"family": "z-image"})
    backend.uninstall()
    return lora, backend


def _pipeline(weights: dict):
    """A ZImagePipeline around a transformer no backend has touched, with the tiny model's weights; no text encoder
    (the tests hand it caption features)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    transformer = small_zimage(dim=TINY.dim, n_layers=TINY.n_layers, n_refiner_layers=TINY.n_refiner_layers,
                               n_heads=TINY.n_heads, axes_dims=TINY.axes_dims, axes_lens=(256, 64, 64),
                               in_channels=TINY.in_channels, patch_size=2, cap_feat_dim=TINY.cap_feat_dim)
    transformer.load_state_dict(weights)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                          tokenizer=None, transformer=transformer.eval())


def _predictor(engine, device: str = "cpu"):
    """One fixed call of a transformer, no gradient: two captions of different lengths (a guidance batch) on one x_t."""
    from zerase_core.backends.diffusers_zimage import zimage_forward

    captions = [p.features.to(device) for p in engine.encode(["a red circle on the left", "blue"])]
    x = torch.randn(2, TINY.in_channels, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    sigma = torch.tensor([0.7, 0.7], device=device)

    def predict(transformer):
        with torch.no_grad():
            return zimage_forward(transformer, x, sigma, captions)

    return predict


def _sample(pipe, captions, guidance: float = 0.0):
    return pipe(prompt_embeds=captions[:1], negative_prompt_embeds=captions[1:] or None, guidance_scale=guidance,
                num_inference_steps=2, height=64, width=64, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def test_a_pipeline_call_is_gated_as_the_engines_own_call_and_uninstall_gives_the_original_back():
    """Through the pipeline's transformer call the LoRA acts on text tokens only, laid out from the call's inputs:
    the prediction equals the engine's (backend.velocity, LoRA on) bit for bit, also for a batch of captions of
    different lengths (classifier-free guidance); sampling changes, and uninstall() restores the original pictures."""
    from zerase_core.backends.diffusers_zimage import zimage_forward
    from zerase_core.diffusers_pipeline import apply_erasure

    lora, engine = _erasure_lora()
    pipe = _pipeline(engine.transformer.state_dict())
    prompts = engine.encode(["a red circle on the left", "blue"])  # 2 rows, captions of other lengths
    captions = [p.features for p in prompts]
    original = _sample(pipe, captions, guidance=2.0)

    backend = apply_erasure(pipe, lora)
    x = torch.randn(2, TINY.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        direct = -zimage_forward(pipe.transformer, x, sigma, captions).float()  # as the pipeline calls it
    engine_v, _ = backend.velocity(x, sigma, prompts, lora=True)
    without, _ = engine.velocity(x, sigma, prompts, lora=False)  # the same weights, no LoRA
    assert torch.equal(direct, engine_v) and not torch.allclose(direct, without, atol=1e-3)
    # Applied, the LoRA is part of the model θ: what a LoRA trained on top switches off is its own, not this one
    assert torch.equal(backend.velocity(x, sigma, prompts, lora=False)[0], engine_v)

    erased = _sample(pipe, captions, guidance=2.0)
    assert not torch.allclose(erased, original, atol=1e-3)
    backend.uninstall()
    assert torch.equal(_sample(pipe, captions, guidance=2.0), original)


def test_a_second_lora_on_the_same_pipeline_adds_up_under_its_own_name_and_omni_calls_are_refused():
    """apply_erasure twice reuses the backend that owns the transformer (one gate for both LoRAs); the same name twice
    is refused; a call in Z-Image's omni mode (reference images) cannot be laid out by the gate and is refused."""
    from zerase_core.diffusers_pipeline import apply_erasure

    lora, engine = _erasure_lora()
    pipe = _pipeline(engine.transformer.state_dict())
    captions = [engine.encode(["a red circle"])[0].features]
    first = apply_erasure(pipe, lora, strength=0.5)
    half = _sample(pipe, captions)
    assert apply_erasure(pipe, lora, strength=0.5, name="again") is first
    assert not torch.allclose(_sample(pipe, captions), half, atol=1e-3)  # 0.5 + 0.5: the two add up
    with pytest.raises(ZEraseError, match="already installed"):
        apply_erasure(pipe, lora, name="again")
    with pytest.raises(ZEraseError, match="omni mode"):
        pipe.transformer([[torch.zeros(TINY.in_channels, 1, 8, 8)]], torch.tensor([0.5]), [[captions[0]]])


def test_a_file_is_loaded_its_strength_applies_and_the_backend_knows_the_transformers_latents(tmp_path):
    """apply_erasure takes the file's path (str or Path), as the module's example does; at strength 0 the pipeline's
    pictures are the original ones bit for bit (the LoRA's delta is scaled to 0), where the file at strength 1 changes
    them exactly as the loaded LoRA does. The backend made for a pipeline has the transformer's latent channels (4
    here), not Z-Image's default 16 (a mutation audit: a dropped strength, a path left unloaded and LatentSpec()
    passed every test)."""
    from pathlib import Path

    from zerase_core.diffusers_pipeline import apply_erasure
    from zerase_core.lora_file import save_lora

    lora, engine = _erasure_lora()
    path = save_lora(lora, tmp_path / "red.safetensors")
    pipe = _pipeline(engine.transformer.state_dict())
    captions = [engine.encode(["a red circle"])[0].features]
    original = _sample(pipe, captions)
    backend = apply_erasure(pipe, str(path), strength=0.0)
    assert torch.equal(_sample(pipe, captions), original)
    assert backend.latent_shape(64, 64) == (TINY.in_channels, 8, 8)
    backend.uninstall()
    assert apply_erasure(pipe, Path(path)) is backend
    from_file = _sample(pipe, captions)
    backend.uninstall()
    apply_erasure(pipe, lora)
    assert torch.equal(_sample(pipe, captions), from_file) and not torch.allclose(from_file, original, atol=1e-3)


def test_a_non_square_call_with_a_caption_past_32_tokens_is_laid_out_as_the_engine_lays_it_out():
    """The layout read off a pipeline call counts the image's tokens per axis ((h/2)·(w/2), not one side squared) and
    the caption's tokens (its rows, not its feature width, which is 32 here): on an 8×12-cell latent with a caption
    of more than 32 tokens, whose padded segments differ from those of a square picture and of a 32-token caption, the
    pipeline's call predicts as the engine does, bit for bit (the other test's pictures are square, its captions
    short, so either slip passed it)."""
    from zerase_core.backends.diffusers_zimage import zimage_forward
    from zerase_core.diffusers_pipeline import apply_erasure

    lora, engine = _erasure_lora()
    pipe = _pipeline(engine.transformer.state_dict())
    prompts = engine.encode(["a red circle " * 12])
    assert prompts[0].n_tokens > 32 == TINY.cap_feat_dim
    backend = apply_erasure(pipe, lora)
    x = torch.randn(1, TINY.in_channels, 8, 12, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        direct = -zimage_forward(pipe.transformer, x, sigma, [prompts[0].features]).float()
    engine_v, _ = backend.velocity(x, sigma, prompts, lora=True)
    without, _ = engine.velocity(x, sigma, prompts, lora=False)  # the same weights, no LoRA
    assert torch.equal(direct, engine_v) and not torch.allclose(direct, without, atol=1e-3)


def test_a_later_backend_replaces_the_earlier_ones_wrapper_and_lets_it_go():
    """A second backend over the same transformer (a pipeline's, after the engine's) owns its calls, and its wrapper
    replaces the earlier backend's instead of wrapping it: nested, every call also ran each earlier backend's layout
    work, and the transformer kept every earlier backend (its LoRAs, its recorder) alive."""
    import gc
    import weakref

    from zerase_core.backends.diffusers_zimage import DiffusersZImageBackend, LatentSpec, owner

    first = tiny_zimage_backend()
    transformer = first.transformer
    second = DiffusersZImageBackend(transformer, None, LatentSpec(TINY.in_channels))
    assert owner(transformer) is second
    earlier = weakref.ref(first)
    del first
    gc.collect()
    assert earlier() is None


def test_an_erased_transformer_deep_copies_and_pickles_as_itself_and_its_copy_uninstalls_alone():
    """copy.deepcopy, pickle and torch.save of the transformer recursed without end after apply_erasure, and after
    uninstall() too (the attention processors' wrappers stay): an EMA copy or a saved pipeline object failed. A copy
    predicts as the erased original, bit for bit, and belongs to a backend of its own: uninstalling the copy's LoRA
    leaves the original erased."""
    import copy
    import pickle

    from zerase_core.backends.diffusers_zimage import owner
    from zerase_core.diffusers_pipeline import apply_erasure

    lora, engine = _erasure_lora()
    predict = _predictor(engine)

    pipe = _pipeline(engine.transformer.state_dict())
    original = predict(pipe.transformer)
    backend = apply_erasure(pipe, lora)
    erased = predict(pipe.transformer)
    copied, unpickled = copy.deepcopy(pipe.transformer), pickle.loads(pickle.dumps(pipe.transformer))
    for other in (copied, unpickled):
        assert torch.equal(predict(other), erased) and owner(other) not in (None, backend)
    owner(copied).uninstall()
    assert torch.equal(predict(copied), original) and torch.equal(predict(pipe.transformer), erased)
    backend.uninstall()
    assert torch.equal(predict(copy.deepcopy(pipe.transformer)), original)


def test_an_erased_transformer_saves_the_original_model_and_loads_weights_under_the_erasure(tmp_path):
    """The erasure is its LoRA file, not the weights (as in ComfyUI): the gated layer cannot be merged into them. Saved
    under the wrapper's names, save_pretrained reloaded with randomly initialised q/k/v projections and a warning.
    The state of an erased transformer is the original's, keys in order and values; save_pretrained reloads the
    original model; the original's state loads strictly into the erased transformer, which stays erased."""
    from diffusers import ZImageTransformer2DModel

    from zerase_core.diffusers_pipeline import apply_erasure

    lora, engine = _erasure_lora()
    predict = _predictor(engine)

    pipe = _pipeline(engine.transformer.state_dict())
    state, original = pipe.transformer.state_dict(), predict(pipe.transformer)
    apply_erasure(pipe, lora)
    erased = predict(pipe.transformer)
    saved = pipe.transformer.state_dict()
    assert list(saved) == list(state) and all(torch.equal(saved[k], state[k]) for k in state)
    pipe.transformer.save_pretrained(tmp_path / "saved")
    assert torch.equal(predict(ZImageTransformer2DModel.from_pretrained(tmp_path / "saved")), original)
    pipe.transformer.load_state_dict(state, strict=True)
    assert torch.equal(predict(pipe.transformer), erased) and not torch.equal(erased, original)


@pytest.mark.parametrize("name", ["red.safetensors", "train", "to", ""])
def test_a_name_no_adapter_can_take_is_refused_before_any_layer_is_wrapped(name):
    """The name keys the LoRA's adapter in every layer (a torch ModuleDict): a file's name, a torch module's attribute
    or nothing raised torch's bare KeyError with the first layer already wrapped."""
    from zerase_core.diffusers_pipeline import apply_erasure

    lora, engine = _erasure_lora()
    pipe = _pipeline(engine.transformer.state_dict())
    with pytest.raises(ZEraseError, match=f"LoRA's name must be a word.*Got {name!r}"):
        apply_erasure(pipe, lora, name=name)
    assert type(pipe.transformer.layers[0].attention.to_q) is torch.nn.Linear
    apply_erasure(pipe, lora, name="red")


def test_a_pipeline_cast_to_bfloat16_after_apply_samples_as_one_cast_before():
    """``pipe.to(torch.bfloat16)`` after ``apply_erasure`` reaches the adapters (submodules of the transformer): the
    cast factors met fp32 text rows and the next call failed. They stay fp32, with their values: the pictures are
    those of a pipeline cast before the LoRA was applied, bit for bit."""
    from zerase_core.diffusers_pipeline import apply_erasure

    lora, engine = _erasure_lora()
    captions = [engine.encode(["a red circle"])[0].features.to(torch.bfloat16)]
    cast_first = _pipeline(engine.transformer.state_dict()).to(torch.bfloat16)
    original = _sample(cast_first, captions)
    apply_erasure(cast_first, lora)
    applied_first = _pipeline(engine.transformer.state_dict())
    apply_erasure(applied_first, lora)
    applied_first.to(torch.bfloat16)
    factors = list(applied_first.transformer.layers[0].attention.to_q.adapters.parameters())
    assert factors and all(f.dtype == torch.float32 for f in factors)
    assert applied_first.transformer.layers[0].attention.to_q.base_layer.weight.dtype == torch.bfloat16
    want = _sample(cast_first, captions)
    assert torch.equal(_sample(applied_first, captions), want) and not torch.equal(want, original)


@pytest.mark.parametrize("device", ON_DEVICES)
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("order", ["offload, then apply", "apply, then offload"])
def test_a_transformer_with_group_offloading_predicts_as_the_erased_model(order, offload_type, device):
    """diffusers' group offloading (``transformer.enable_group_offload``), the other way to run Z-Image on a small
    card, moves the parameters its hooks were set up with: block by block, or Linear by Linear, where the LoRA's
    factors, in ParameterDicts no hook is ever called on or added after the hooks were set, are not among them; the
    gated layer brings its factors to the input's device itself. Offloaded to the CPU and computing on ``device``, the
    transformer predicts as one never offloaded with the LoRA applied, bit for bit, at its first call and at its second
    (after the hooks have put the weights back), and not as the original. On the CPU the hooks run and nothing moves."""
    from zerase_core.diffusers_pipeline import apply_erasure

    lora, engine = _erasure_lora()
    on_device = _predictor(engine, device)

    def predict(pipe):
        return on_device(pipe.transformer)

    never_offloaded = _pipeline(engine.transformer.state_dict()).to(device)
    original = predict(never_offloaded)
    apply_erasure(never_offloaded, lora)
    want = predict(never_offloaded)

    pipe = _pipeline(engine.transformer.state_dict())
    offload = {"onload_device": torch.device(device), "offload_device": torch.device("cpu"),
               "offload_type": offload_type}
    if offload_type == "block_level":
        offload["num_blocks_per_group"] = 1
    if order == "apply, then offload":
        apply_erasure(pipe, lora)
    pipe.transformer.enable_group_offload(**offload)
    if order == "offload, then apply":
        apply_erasure(pipe, lora)
    first, second = predict(pipe), predict(pipe)
    assert torch.equal(first, want) and torch.equal(second, want) and not torch.equal(want, original)


@pytest.mark.parametrize("order", ["offload, then apply", "apply, then offload"])
def test_a_pipeline_offloaded_whole_samples_the_erased_model_and_one_offloaded_layer_by_layer_is_refused(order):
    """16 GB cards run Z-Image with CPU offload. enable_model_cpu_offload moves the whole transformer for its calls
    (accelerate's cpu_offload_with_hook): the erased pictures are those of a pipeline never offloaded, bit for bit,
    whether the LoRA is applied before or after. enable_sequential_cpu_offload keeps each layer's weights on the
    meta device until it runs (accelerate's cpu_offload): there the gated layers computed another model without an
    error, so it is refused, at apply_erasure or, offloaded after it, at the first call. (Executed on the CPU here,
    which exercises the hooks, not a device move.)"""
    import accelerate

    from zerase_core.diffusers_pipeline import apply_erasure

    lora, engine = _erasure_lora()
    captions = [p.features for p in engine.encode(["a red circle on the left", "blue"])]
    plain = _pipeline(engine.transformer.state_dict())
    apply_erasure(plain, lora)
    want = _sample(plain, captions, guidance=2.0)

    def offload(pipe, how):
        if how == "whole":
            accelerate.cpu_offload_with_hook(pipe.transformer, execution_device="cpu")
        else:
            accelerate.cpu_offload(pipe.transformer, execution_device="cpu")

    for how in ("whole", "layer by layer"):
        pipe = _pipeline(engine.transformer.state_dict())
        if order == "offload, then apply":
            offload(pipe, how)
            if how != "whole":
                with pytest.raises(ZEraseError, match="enable_sequential_cpu_offload.*enable_model_cpu_offload"):
                    apply_erasure(pipe, lora)
                continue
            apply_erasure(pipe, lora)
        else:
            apply_erasure(pipe, lora)
            offload(pipe, how)
        if how == "whole":
            assert torch.equal(_sample(pipe, captions, guidance=2.0), want)
        else:
            with pytest.raises(ZEraseError, match="offloaded layer by layer"):
                _sample(pipe, captions, guidance=2.0)

