"""The ComfyUI backend against real ComfyUI classes at tiny sizes (skipped without a checkout)."""

import json
import weakref

import pytest
from comfy_support import encode, require_comfyui, tiny_clip, tiny_lumina2, tiny_zimage
from device_errors import DEVICES, ran_out

comfy = require_comfyui()
import torch  # noqa: E402

from zerase_core.backends.comfy_zimage import ComfyZImageBackend, encode_with_clip, training_session  # noqa: E402
from zerase_core.errors import ZEraseError  # noqa: E402
from zerase_core.lora import LoRAConfig  # noqa: E402
from zerase_core.prompts import concept_token_indices  # noqa: E402


def _randomise(lora_set, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_set.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_refuses_non_zimage_models():
    with pytest.raises(ZEraseError, match="not Z-Image"):
        ComfyZImageBackend(tiny_lumina2(comfy))
    with pytest.raises(ZEraseError, match="not Z-Image"):
        ComfyZImageBackend(object())


def test_a_model_rebuilt_under_the_patches_is_followed_or_refused_never_run_silently():
    """clone(model_override=...) (dynamic VRAM's non-dynamic delegate: TorchCompileModel after Apply, hooked
    conditioning) puts the patches onto another model object loaded from the same file. They are built again on its
    modules, two stacked erasure LoRAs too, so it samples what the model it was cloned from samples (they were
    refused; a ComfyUI review showed ON_CLONE lets them follow). Where another extension's patch sits under ours,
    they cannot follow, and sampling is refused rather than run on the old object's layers."""
    from comfy_support import empty_latent, ksample

    from zerase_core.backends.comfy_zimage.object_patches import GatedForward, erasure_chain

    def erased(model, seeds=(0, 1)):
        patcher = model
        for seed in seeds:  # Apply twice: a chain of two LoRAs on each qkv
            backend = ComfyZImageBackend(patcher)
            _randomise(backend.install(LoRAConfig(rank=2)), seed)
            patcher = backend.patcher
        return patcher

    cond = encode(tiny_clip(comfy), "a cat")
    model = erased(tiny_zimage(comfy))
    same_file = tiny_zimage(comfy)  # what ComfyUI loads again: the same weights, another object
    rebuilt = model.clone(model_override=same_file.get_clone_model_override())
    assert rebuilt.model is same_file.model
    expected = ksample(comfy, model, cond, cond, empty_latent())
    torch.testing.assert_close(ksample(comfy, rebuilt, cond, cond, empty_latent()), expected, rtol=0, atol=1e-6)
    # ComfyUI's cached delegate: the same model object again, its modules still patched by the run just done. A chain
    # built on what the instance held ran the LoRAs twice (a review reproduced it).
    qkv = same_file.model.diffusion_model.layers[0].attention.qkv
    assert isinstance(vars(qkv).get("forward"), GatedForward)  # the case: still patched
    cached = model.clone(model_override=rebuilt.get_clone_model_override())
    assert len(list(erasure_chain(cached.object_patches["diffusion_model.layers.0.attention.qkv.forward"]))) == 2
    torch.testing.assert_close(ksample(comfy, cached, cond, cond, empty_latent()), expected, rtol=0, atol=1e-6)
    plain = ksample(comfy, same_file, cond, cond, empty_latent())
    assert (plain - expected).abs().max() > 1e-2  # the LoRAs change the picture: the rebuilt model runs them
    again = rebuilt.clone(model_override=tiny_zimage(comfy).get_clone_model_override())  # rebuilt twice
    torch.testing.assert_close(ksample(comfy, again, cond, cond, empty_latent()), expected, rtol=0, atol=1e-6)
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    set_torch_compile_wrapper(model=again, backend="eager")  # TorchCompileModel after Apply: on the rebuilt model
    torch.testing.assert_close(ksample(comfy, again, cond, cond, empty_latent()), expected, rtol=0, atol=1e-5)

    other = tiny_zimage(comfy)  # another extension patched a qkv before the erasure LoRA was applied
    qkv = other.get_model_object("diffusion_model.layers.0.attention.qkv")
    other.add_object_patch("diffusion_model.layers.0.attention.qkv.forward", lambda x: qkv.__class__.forward(qkv, x))
    stuck = erased(other).clone(model_override=tiny_zimage(comfy).get_clone_model_override())
    with pytest.raises(ZEraseError, match="rebuilt the model after the erasure LoRA .* the LoRA cannot follow"):
        ksample(comfy, stuck, cond, cond, empty_latent())
    above = erased(tiny_zimage(comfy)).clone()  # another extension's patch on top of the LoRA's (a review: this one
    key = "diffusion_model.layers.0.attention.qkv.forward"  # kept calling the old model's qkv, unrefused)
    below = above.get_model_object(key)
    above.add_object_patch(key, lambda x: below(x))
    stuck = above.clone(model_override=tiny_zimage(comfy).get_clone_model_override())
    with pytest.raises(ZEraseError, match="rebuilt the model after the erasure LoRA .* the LoRA cannot follow"):
        ksample(comfy, stuck, cond, cond, empty_latent())


class _HalvingQKV:  # another extension's qkv patch, given as its object's own forward
    def __init__(self, qkv):
        self.qkv = qkv

    def forward(self, x):
        return type(self.qkv).forward(self.qkv, x) / 2


class _HalvingQKVWithoutForward:  # the same, under another method's name, its class without a forward
    def __init__(self, qkv):
        self.qkv = qkv

    def run(self, x):
        return type(self.qkv).forward(self.qkv, x) / 2


@pytest.mark.parametrize("patch", ["forward", "run", "bound_to_the_module"])
def test_another_extensions_bound_method_under_the_lora_is_refused_when_the_model_is_rebuilt(patch):
    """Another object's bound method patched on a qkv was taken for the module's own forward when its class's forward
    was the method: the rebuilt model sampled with the extension's patch silently dropped (the picture off by up to
    0.05); with no forward on its class the clone failed with an AttributeError (a mutation audit found both). A
    function bound to the module itself is not its forward either."""
    import types

    from comfy_support import empty_latent, ksample

    cond = encode(tiny_clip(comfy), "a cat")
    other = tiny_zimage(comfy)
    qkv = other.get_model_object("diffusion_model.layers.0.attention.qkv")
    if patch == "bound_to_the_module":
        forward = types.MethodType(lambda module, x: type(module).forward(module, x) / 2, qkv)
    else:
        forward = getattr((_HalvingQKV if patch == "forward" else _HalvingQKVWithoutForward)(qkv), patch)
    other.add_object_patch("diffusion_model.layers.0.attention.qkv.forward", forward)
    backend = ComfyZImageBackend(other)
    _randomise(backend.install(LoRAConfig(rank=2)))
    stuck = backend.patcher.clone(model_override=tiny_zimage(comfy).get_clone_model_override())
    with pytest.raises(ZEraseError, match="rebuilt the model after the erasure LoRA .* the LoRA cannot follow"):
        ksample(comfy, stuck, cond, cond, empty_latent())


@pytest.mark.parametrize("compile_first", [False, True], ids=["compile_after_apply", "compile_before_apply"])
def test_torch_compile_wrapper_keeps_the_lora(compile_first):
    """ComfyUI's compile wrapper swaps the compiled module in while sampling: same model, same patched result."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_support import empty_latent, ksample

    def erased(base):
        backend = ComfyZImageBackend(base)
        _randomise(backend.install(LoRAConfig(rank=2)))
        return backend.patcher

    cond = encode(tiny_clip(comfy), "a cat")
    plain = ksample(comfy, erased(tiny_zimage(comfy)), cond, cond, empty_latent())
    base = tiny_zimage(comfy)
    if compile_first:
        set_torch_compile_wrapper(model=base, backend="eager")
        model = erased(base)
    else:
        model = erased(base)
        set_torch_compile_wrapper(model=model, backend="eager")
    torch.testing.assert_close(ksample(comfy, model, cond, cond, empty_latent()), plain, rtol=0, atol=1e-5)


def test_refuses_a_text_encoder_of_another_width():
    """Another LLM's encoder with a chat template passes the tokenizer check; its feature width does not."""
    backend = ComfyZImageBackend(tiny_zimage(comfy), tiny_clip(comfy, width=96), node="Z-Erase Train")
    with pytest.raises(ZEraseError, match="Z-Erase Train: this CLIP gives 96-wide text features, the model takes 64"):
        backend.encode(["a cat"])


def test_encode_matches_clip_text_encode_and_localises_words():
    clip = tiny_clip(comfy)
    (p,) = encode_with_clip(clip, ["A painting by Van Gogh, swirling sky"])
    assert torch.equal(p.features, encode(clip, "A painting by Van Gogh, swirling sky")[0][0][0])
    assert p.spans[0] is None and p.spans[-1] is None  # chat template tokens
    idx = concept_token_indices(p, "van gogh")
    assert "".join(p.text[p.spans[i][0]:p.spans[i][1]] for i in idx).strip().lower().replace(" ", "") == "vangogh"
    with pytest.raises(ZEraseError, match="does not occur"):
        concept_token_indices(p, "cat")


def test_escaped_parentheses_and_decomposed_letters_are_read_as_the_tokenizer_reads_them():
    """ComfyUI's tokenizer turns \\( \\) into plain parentheses and Qwen's normalises to NFC: the spans follow what
    was read, and a word is found whichever way it was composed (both were refused as 'weight syntax', which Z-Image's
    tokenizer does not parse: "(cat:1.2)" is read as written). An embedding's name is not read: refused, named."""
    import unicodedata

    clip = tiny_clip(comfy)
    escaped, decomposed = "a \\(cat\\) on a table", unicodedata.normalize("NFD", "a café with a cat")
    p, q = encode_with_clip(clip, [escaped, decomposed])
    assert p.text == "a (cat) on a table" and torch.equal(p.features, encode(clip, escaped)[0][0][0])
    assert [p.text[slice(*p.spans[i])].strip() for i in concept_token_indices(p, "cat")] == ["cat"]
    for word in ("café", unicodedata.normalize("NFD", "café")):
        assert "".join(q.text[slice(*q.spans[i])] for i in concept_token_indices(q, word)).strip() == "café"
    (weighted,) = encode_with_clip(clip, ["a (cat:1.2) on a table"])
    assert [weighted.text[slice(*weighted.spans[i])].strip() for i in concept_token_indices(weighted, "cat")] == ["cat"]
    with pytest.raises(ZEraseError, match="does it name an 'embedding:'"):
        encode_with_clip(clip, ["a embedding:nothing_here cat"])


def test_a_dropped_backend_frees_its_clone_at_once():
    """Nothing the clone holds (its wrapper, the LoRA and checkpointing patches) refers back to the backend, so
    dropping the backend frees the clone by reference counting, not at the next full garbage collection (under
    dynamic VRAM Train's clone is a whole second copy of the model)."""
    import gc

    backend = ComfyZImageBackend(tiny_zimage(comfy), tiny_clip(comfy))
    _randomise(backend.install(LoRAConfig(rank=2)))
    backend.set_gradient_checkpointing(backend.n_layers)
    refs = weakref.ref(backend), weakref.ref(backend.patcher)
    gc.disable()
    try:
        del backend
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


def test_refuses_the_ungated_ablation():
    """The object-patch wrapper is always gated: scope 'all' would otherwise train gated under an ungated name."""
    backend = ComfyZImageBackend(tiny_zimage(comfy))
    with pytest.raises(ZEraseError, match="only gated LoRAs"):
        backend.install(LoRAConfig(rank=4, scope="all"))
    assert not [k for k in backend.patcher.object_patches if ".qkv." in k]  # nothing wrapped


def test_gated_lora_touches_text_rows_only_and_original_is_untouched():
    model, clip = tiny_zimage(comfy), tiny_clip(comfy)
    before = model.model.diffusion_model.layers[0].attention.qkv
    backend = ComfyZImageBackend(model, clip)
    lora_set = backend.install(LoRAConfig(rank=4))
    _randomise(lora_set)
    prompts = backend.encode(["a photo of a cat"])
    x = torch.randn(1, 16, 8, 12)
    sigma = torch.tensor([0.7])
    seen = []
    hook = lambda m, i, o: seen.append((i[0], o))  # noqa: E731
    handle = before.register_forward_hook(hook)
    try:
        v_off, _ = backend.velocity(x, sigma, prompts, lora=False)
        v_on, _ = backend.velocity(x, sigma, prompts, lora=True)
    finally:
        handle.remove()
    assert not torch.allclose(v_off, v_on)
    text_rows = 32  # 13 caption tokens padded to 32
    (x_off, o_off), (x_on, o_on) = seen
    assert torch.equal(x_off, x_on)  # layer 0 sees the same input either way
    assert torch.equal(o_on[:, text_rows:], o_off[:, text_rows:])  # image rows: bit-identical
    assert not torch.equal(o_on[:, :text_rows], o_off[:, :text_rows])  # text rows: changed
    assert torch.equal(o_off, torch.nn.functional.linear(x_off, before.weight))
    assert model.model.diffusion_model.layers[0].attention.qkv is before
    assert "diffusion_model.layers.0.attention.qkv.forward" not in model.object_patches


def test_velocity_and_mass_shapes_mixed_caption_lengths():
    """Captions that pad to different lengths (NextDiT pads to 32) run as groups of one length each: the batch
    gives what batch-1 calls give, row by row."""
    backend = ComfyZImageBackend(tiny_zimage(comfy), tiny_clip(comfy))
    long = "a very long prompt about a small cat on a mat, " * 4 + "and more words to pass thirty two tokens"
    prompts = backend.encode(["a cat", long])
    assert prompts[0].n_tokens <= 32 < prompts[1].n_tokens  # two padded lengths: the grouped path runs
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 0.9])
    tokens = [concept_token_indices(p, "cat") for p in prompts]
    with torch.no_grad():
        v, mass = backend.velocity(x, sigma, prompts, concept_tokens=tokens, mass_layers={0, 1})
        for i in range(2):
            v_i, mass_i = backend.velocity(x[i : i + 1], sigma[i : i + 1], prompts[i : i + 1],
                                           concept_tokens=tokens[i : i + 1], mass_layers={0, 1})
            torch.testing.assert_close(v[i : i + 1], v_i, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mass[i : i + 1], mass_i, rtol=1e-4, atol=1e-6)
    assert v.shape == x.shape and mass.shape == (2,)
    assert ((mass > 0) & (mass < 1)).all()


def test_mass_from_the_attention_call_matches_the_softmax_map_and_keeps_the_prediction():
    """ComfyUI's attention override runs the stock kernel widened by the indicator: the mass equals the one read
    off the materialised softmax map, and the prediction is the plain one up to rounding."""
    from zerase_core.bench.reference_step import materialised_maps

    backend = ComfyZImageBackend(tiny_zimage(comfy), tiny_clip(comfy))
    _randomise(backend.install(LoRAConfig(rank=4)))
    prompts = backend.encode(["a photo of a cat"])
    tokens = [concept_token_indices(prompts[0], "cat")]
    x, sigma = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([0.6])
    with torch.no_grad():
        bare, _ = backend.velocity(x, sigma, prompts)
        v, mass = backend.velocity(x, sigma, prompts, concept_tokens=tokens, mass_layers={0, 1})
        with materialised_maps(backend):
            v_maps, mass_maps = backend.velocity(x, sigma, prompts, concept_tokens=tokens, mass_layers={0, 1})
    assert 0 < float(mass) < 1
    torch.testing.assert_close(mass, mass_maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(v, bare, rtol=0, atol=1e-5)
    torch.testing.assert_close(v_maps, bare, rtol=0, atol=1e-6)  # the reference reads maps beside an unwidened call


def test_captions_that_pad_alike_share_one_call_and_equal_separate_calls():
    """[c_er, ∅, c_pr] of three caption lengths that pad to one multiple run as one batch (one call, the noise
    refiner once for the shared x_t), with the values and LoRA gradients of three separate calls."""
    backend = ComfyZImageBackend(tiny_zimage(comfy), tiny_clip(comfy))
    lora_set = backend.install(LoRAConfig(rank=4))
    _randomise(lora_set)
    prompts = backend.encode(["a cat", "", "a photo of a small cat"])
    assert len({p.n_tokens for p in prompts}) == 3 and max(p.n_tokens for p in prompts) <= 32
    tokens = [concept_token_indices(prompts[0], "cat"), [], []]
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(1, 16, 8, 12, generator=g).expand(3, -1, -1, -1), torch.full((3,), 0.6)
    dit = backend.dit
    calls, refiner_rows = [], []
    handles = [dit.register_forward_pre_hook(lambda m, a: calls.append(1)),
               dit.noise_refiner[0].feed_forward.register_forward_pre_hook(
                   lambda m, a: refiner_rows.append(a[0].shape[0]))]
    with training_session(backend):
        try:
            v, mass = backend.velocity(x, sigma, prompts, concept_tokens=tokens, mass_layers={0, 1})
            assert len(calls) == 1 and refiner_rows == [1]
            (v.square().mean() + mass.sum()).backward()
        finally:
            for h in handles:
                h.remove()
        batched = [p.grad.clone() for p in lora_set.parameters()]
        for p in lora_set.parameters():
            p.grad = None
        parts = [backend.velocity(x[i : i + 1], sigma[i : i + 1], [prompts[i]], concept_tokens=[tokens[i]],
                                  mass_layers={0, 1}) for i in range(3)]
        sum(vi.square().mean() / 3 + mi.sum() for vi, mi in parts).backward()
    torch.testing.assert_close(v, torch.cat([vi for vi, _ in parts]), rtol=0, atol=1e-5)
    torch.testing.assert_close(mass, torch.cat([mi for _, mi in parts]), rtol=0, atol=1e-6)
    assert float(mass[0].detach()) > 0 and float(mass[1:].detach().abs().sum()) == 0
    for got, want in zip(batched, [p.grad for p in lora_set.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_training_forwards_use_attention_with_a_backward(monkeypatch):
    """SageAttention (ComfyUI's --use-sage-attention, or another node's override) has no backward: its outputs are cut
    off from q, k and v. A training forward without a recorder (L_pr recomputed with a graph, attn_weight 0) ran on it
    and the LoRA learned nothing there, without a word (a ComfyUI review). So a training session runs every attention
    on ComfyUI's SDPA, the forwards without a graph too: λ compares L_pr values, which must come from one kernel.
    Simulated by a kernel that detaches."""
    import comfy.ldm.lumina.model as lumina
    from comfy.ldm.modules.attention import wrap_attn

    stock, ran = lumina.optimized_attention_masked, []
    cut = wrap_attn(lambda q, *args, **kwargs: ran.append(q.requires_grad) or stock(q, *args, **kwargs).detach())
    monkeypatch.setattr(lumina, "optimized_attention_masked", cut)
    backend = ComfyZImageBackend(tiny_zimage(comfy), tiny_clip(comfy))
    lora_set = backend.install(LoRAConfig(rank=2))
    _randomise(lora_set)
    prompts = backend.encode(["a photo of a dog"])
    x, sigma = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((1,), 0.6)
    with training_session(backend):
        v, _ = backend.velocity(x, sigma, prompts)  # no recorder: as L_pr's forward
        v.square().mean().backward()
        with torch.no_grad():  # as the teacher's, and L_pr's while λ = 0
            backend.velocity(x, sigma, prompts)
    assert ran == []  # no attention of the session ran on it
    grads = [p.grad for p in lora_set.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():  # sampling, outside a session, keeps the host's kernel
        backend.velocity(x, sigma, prompts)
    dit = backend.dit
    assert len(ran) == len(dit.layers) + len(dit.noise_refiner) + len(dit.context_refiner)  # every layer's


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float8_e4m3fn], ids=["fp32", "fp8"])
def test_training_keeps_base_weights_frozen_and_runs_on_fp8_weights(weight_dtype):
    """A model built outside inference mode has trainable-looking parameters: the session freezes them (no base
    gradient is computed or kept; fp8 ones could not take one) and gives them back as they were."""
    from zerase_core.config import TrainConfig
    from zerase_core.trainer import ZEraseTrainer

    model = tiny_zimage(comfy, weight_dtype=weight_dtype)
    base = list(model.model.diffusion_model.parameters())
    assert all(p.requires_grad for p in base)
    backend = ComfyZImageBackend(model, tiny_clip(comfy))
    config = TrainConfig(concept="cat", preserve=("dog",), steps=2, height=64, width=64, sample_steps=2,
                         lora=LoRAConfig(rank=2), shuffle_pool=2)
    with training_session(backend):
        result = ZEraseTrainer(backend, config).run()
    assert result.completed and any(b.abs().sum() > 0 for _, b in result.lora.factors.values())
    assert all(p.grad is None and p.requires_grad for p in base)
    assert model.model.diffusion_model.layers[0].attention.qkv.weight.dtype == weight_dtype


def test_training_steps_run_on_inference_tensor_weights():
    from zerase_core.config import TrainConfig
    from zerase_core.trainer import ZEraseTrainer

    with torch.inference_mode():
        model = tiny_zimage(comfy, inference_tensors=True)
    backend = ComfyZImageBackend(model, tiny_clip(comfy))
    config = TrainConfig(concept="cat", preserve=("dog",), steps=2, height=64, width=64, sample_steps=2,
                         lora=LoRAConfig(rank=2), shuffle_pool=2)
    qkv = model.model.diffusion_model.layers[0].attention.qkv
    original, values = weakref.ref(qkv.weight), qkv.weight.detach().clone()
    with training_session(backend):
        trainer = ZEraseTrainer(backend, config)
        result = trainer.run()
    assert result.completed and len(result.history) == 2
    assert any(b.abs().sum() > 0 for _, b in result.lora.factors.values())
    # The plain copy stays and the inference original is gone: the weights were never held twice.
    assert original() is None and not qkv.weight.is_inference() and torch.equal(qkv.weight, values)


def test_training_on_top_of_an_applied_erasure_lora():
    """Apply Erasure LoRA runs in inference mode; Z-Erase Train on its output back-propagates through that LoRA."""
    from zerase_core.apply import export_lora, install_lora
    from zerase_core.config import TrainConfig
    from zerase_core.trainer import ZEraseTrainer

    with torch.inference_mode():
        model = tiny_zimage(comfy, inference_tensors=True)
        first = ComfyZImageBackend(model)
        lora_set = first.install(LoRAConfig(rank=2))
        _randomise(lora_set)
        lora = export_lora(lora_set, concept="dog", preserve=(), fingerprint=first.fingerprint(), training={})
        applied = ComfyZImageBackend(model)
        applied_set = install_lora(applied, lora, name=applied.key)
    backend = ComfyZImageBackend(applied.patcher, tiny_clip(comfy))
    config = TrainConfig(concept="cat", preserve=("bird",), steps=2, height=64, width=64, sample_steps=2,
                         lora=LoRAConfig(rank=2), shuffle_pool=2)
    with training_session(backend):
        result = ZEraseTrainer(backend, config).run()
    assert result.completed and any(b.abs().sum() > 0 for _, b in result.lora.factors.values())
    assert all(p.grad is None and not p.requires_grad for p in applied_set.parameters())  # applied, not trained
    def qkv(patcher):
        return {k: v for k, v in patcher.object_patches.items() if ".qkv." in k}

    assert qkv(backend.patcher) and qkv(backend.patcher) != qkv(applied.patcher)  # training's wrappers stand there
    backend.uninstall()  # takes ours off and puts back what the MODEL came with, not nothing
    assert qkv(backend.patcher) == qkv(applied.patcher)


def test_training_loads_the_whole_model_and_refuses_a_partial_load(monkeypatch):
    """Backward needs the weights each forward saved; a low-VRAM partial load streams weights through cast buffers
    every layer reuses (a GPU-only path). So training asks ComfyUI for a whole load with every other model out of
    the way (the text encoder would otherwise keep ~8 GB of a 24 GB card), as its own LoRA trainer does, and refuses
    with a message where ComfyUI still loads in part (--novram) or runs out of memory."""
    from zerase_core.config import TrainConfig
    from zerase_core.trainer import ZEraseTrainer

    mm, real_load = comfy.mm, comfy.mm.load_models_gpu
    backend = ComfyZImageBackend(tiny_zimage(comfy), tiny_clip(comfy))
    calls = []  # the DiT's loads (the text encoder loads itself too, its own way)
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, **kw: (
        calls.append(kw) if models[0] is backend.patcher else None) or real_load(models, **kw))
    config = TrainConfig(concept="cat", preserve=("dog",), steps=1, height=64, width=64, sample_steps=2,
                         lora=LoRAConfig(rank=2), shuffle_pool=2)
    with training_session(backend):
        trainer = ZEraseTrainer(backend, config)
        trainer.run()
        assert calls and all(kw == {"memory_required": 1e20, "force_full_load": True} for kw in calls)
        # Asked before every forward: nothing to do while this clone is loaded whole with its patches in place,
        # a load again once a patch is added or taken away, or the model was moved out.
        calls.clear()
        backend.load()
        assert calls == []
        backend.set_gradient_checkpointing(backend.n_layers)  # patches added
        backend.load()
        assert len(calls) == 1
        backend.set_gradient_checkpointing(0)  # and taken away again
        backend.load()
        assert len(calls) == 2 and not any("CheckpointedForward" in type(layer.forward).__name__
                                           for layer in backend.dit.layers)
        mm.unload_all_models()
        backend.load()
        assert len(calls) == 3
    calls.clear()
    backend.load()  # sampling afterwards: ComfyUI's own choice again
    assert calls == [{}]

    def partial(models, **kw):
        real_load(models, **kw)
        models[0].model.model_lowvram = True  # what ComfyUI reports after a partial load

    fresh = ComfyZImageBackend(tiny_zimage(comfy), tiny_clip(comfy))
    monkeypatch.setattr(mm, "load_models_gpu", partial)
    with pytest.raises(ZEraseError, match="only in part.*without --novram"):
        with training_session(fresh):
            fresh.load()  # as the first forward does

    for device in DEVICES:  # ComfyUI on a Mac: MPS says it with a plain RuntimeError
        def out_of_memory(models, raised=ran_out(device), **kw):
            raise raised

        monkeypatch.setattr(mm, "load_models_gpu", out_of_memory)
        with pytest.raises(ZEraseError, match="whole Z-Image on the GPU.*fp8"):
            with training_session(fresh):
                fresh.load()


def test_under_dynamic_vram_training_runs_on_a_non_dynamic_twin(monkeypatch):
    """ComfyUI's dynamic VRAM (its default on NVIDIA) pages weights in per op; on a CPU ComfyUI falls back to the
    plain patcher, so it is simulated by what ComfyUI itself consults: is_dynamic() and the loader it keeps in
    cached_patcher_init. Training builds on a twin loaded again from the model's file (ComfyUI's own route for
    torch.compile); erasure LoRAs applied before are built again on the twin and trained on top of; with no file,
    or with another extension's patch under those LoRAs (bound to the other model), it says what to do."""
    from zerase_core.config import TrainConfig
    from zerase_core.trainer import ZEraseTrainer

    model = tiny_zimage(comfy, seed=3)
    monkeypatch.setattr(model, "is_dynamic", lambda: True)
    with pytest.raises(ZEraseError, match="no(ne)?.*Load Diffusion Model.*--disable-dynamic-vram"):
        ComfyZImageBackend.for_training(model, tiny_clip(comfy))
    loads = []
    model.cached_patcher_init = (lambda seed, disable_dynamic=False: loads.append(disable_dynamic)
                                 or tiny_zimage(comfy, seed=seed), (3,))
    backend = ComfyZImageBackend.for_training(model, tiny_clip(comfy))
    assert loads == [True] and backend.dit is not model.model.diffusion_model
    prompts = backend.encode(["a cat", ""])
    x, sigma = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7, 0.7])
    with torch.no_grad():  # the same model, loaded again
        torch.testing.assert_close(backend.velocity(x, sigma, prompts, lora=False)[0],
                                   ComfyZImageBackend(model).velocity(x, sigma, prompts, lora=False)[0])
    config = TrainConfig(concept="cat", preserve=("dog",), steps=1, height=64, width=64, sample_steps=2,
                         lora=LoRAConfig(rank=2), shuffle_pool=2)
    with training_session(backend):
        assert ZEraseTrainer(backend, config).run().completed

    # Erasure LoRAs applied before come onto the twin (rebuilt_model.rebind), and the run trains on top of them (it
    # was refused: they were bound to the other model object)
    from zerase_core.apply import export_lora, install_lora

    trained = ComfyZImageBackend(model)
    trained_set = trained.install(LoRAConfig(rank=2))
    _randomise(trained_set)
    lora = export_lora(trained_set, concept="dog", preserve=(), fingerprint=trained.fingerprint(), training={})
    with torch.inference_mode():  # as Apply Erasure LoRA runs
        applied = ComfyZImageBackend(model)
        applied_set = install_lora(applied, lora, name=applied.key)
    before = [p.clone() for p in applied_set.parameters()]
    monkeypatch.setattr(applied.patcher, "is_dynamic", lambda: True)
    on_top = ComfyZImageBackend.for_training(applied.patcher, tiny_clip(comfy))
    assert loads == [True, True] and on_top.dit is not applied.dit
    with torch.no_grad():  # its teacher (our LoRA off) is the applied model: the LoRA runs, on the twin's modules
        teacher = on_top.velocity(x, sigma, prompts, lora=False)[0]
        torch.testing.assert_close(teacher, applied.velocity(x, sigma, prompts)[0])
        assert (teacher - backend.velocity(x, sigma, prompts, lora=False)[0]).abs().max() > 1e-3
    with training_session(on_top):
        assert ZEraseTrainer(on_top, config).run().completed
    assert all(torch.equal(a, b) for a, b in zip(before, applied_set.parameters()))  # applied, not trained

    other = tiny_zimage(comfy, seed=3)  # another extension's patch under the LoRA: bound to the old model
    other.cached_patcher_init = model.cached_patcher_init
    qkv = other.get_model_object("diffusion_model.layers.0.attention.qkv")
    other.add_object_patch("diffusion_model.layers.0.attention.qkv.forward", lambda x: qkv.__class__.forward(qkv, x))
    with torch.inference_mode():
        stuck = ComfyZImageBackend(other)
        install_lora(stuck, lora, name=stuck.key)
    monkeypatch.setattr(stuck.patcher, "is_dynamic", lambda: True)
    loaded = len(loads)
    with pytest.raises(ZEraseError, match="another extension patched the forward.*cannot be carried.*--disable-dyn"):
        ComfyZImageBackend.for_training(stuck.patcher, tiny_clip(comfy))
    assert len(loads) == loaded  # told before the model file is loaded again (a review: it was after)


def test_applied_lora_weights_leave_the_gpu_with_the_model():
    """ComfyUI moves a detached model to its offload device; the applied erasure LoRAs, held in object patches
    outside the module tree, stayed on the GPU (a ComfyUI review: ~44 MB each at rank 16, outside ComfyUI's
    accounting). Now they go with it, and a LoRA in training stays beside its optimizer state. A CPU has no second
    device: the offload device is "meta" here, so where the weights went is all that can be read."""
    from zerase_core.apply import export_lora, install_lora

    trained = ComfyZImageBackend(tiny_zimage(comfy))
    lora = export_lora(trained.install(LoRAConfig(rank=2)), concept="dog", preserve=(),
                       fingerprint=trained.fingerprint(), training={})
    with torch.inference_mode():  # as Apply Erasure LoRA runs
        applied = ComfyZImageBackend(tiny_zimage(comfy))
        applied_set = install_lora(applied, lora, name=applied.key)
    training = ComfyZImageBackend(applied.patcher)  # Train on top of it: its LoRA and the applied one, in one chain
    training_set = training.install(LoRAConfig(rank=2))
    training.patcher.offload_device = torch.device("meta")
    training.patcher.detach(unpatch_all=False)  # ComfyUI keeps the weights in place: so do we
    assert {p.device.type for p in applied_set.parameters()} == {"cpu"}
    with torch.inference_mode():  # where ComfyUI unloads models: inside a node's run
        training.patcher.detach()
    assert {p.device.type for p in applied_set.parameters()} == {"meta"}
    assert {p.device.type for p in training_set.parameters()} == {"cpu"}
    assert not any(p.is_inference() for p in applied_set.parameters())  # a later training can back-propagate


def test_an_applied_lora_waits_on_the_offload_device_until_the_model_runs():
    """Made on the compute device at Apply, an erasure LoRA held GPU memory outside ComfyUI's accounting until the
    model's first unload, though ComfyUI loads the model only when a sampler runs. ("meta" stands for the offload
    device: a CPU has no second one; the way back is the gated layer's move to the input's device.)"""
    from zerase_core.apply import export_lora, install_lora

    trained = ComfyZImageBackend(tiny_zimage(comfy))
    lora = export_lora(trained.install(LoRAConfig(rank=2)), concept="dog", preserve=(),
                       fingerprint=trained.fingerprint(), training={})
    with torch.inference_mode():  # as Apply Erasure LoRA runs
        applied = ComfyZImageBackend(tiny_zimage(comfy))
        applied.patcher.offload_device = torch.device("meta")
        applied_set = install_lora(applied, lora, name=applied.key)
    assert {p.device.type for p in applied_set.parameters()} == {"meta"}
    assert not any(p.is_inference() for p in applied_set.parameters())  # a later training can back-propagate


class _PackA:  # another node's patch, as a bound method (a class of its module: its name is stable)
    def forward(self, x):
        return x


class _PackB(_PackA):
    def forward(self, x):
        return -x


class _Keeper:  # another node's patch object that keeps what it patched, once it is put on
    patcher = None

    def forward(self, x):
        return x


def test_the_model_digest_tells_the_file_and_its_patches(tmp_path):
    """What a saved LoRA is reused for: the same file with the same patches, not just the same architecture."""
    from zerase_core.apply import install_lora
    from zerase_core.backends.comfy_zimage.digest import model_digest
    from zerase_core.lora_file import ErasureLoRA

    model = tiny_zimage(comfy)
    assert model_digest(model) is None  # built in memory: nothing stable tells it from another
    weights = tmp_path / "z_image_turbo.safetensors"
    weights.write_bytes(b"weights")
    model.cached_patcher_init = (lambda *a, **k: None, (str(weights), {}))
    digest = model_digest(model)
    assert digest and model_digest(model.clone()) == digest
    assert ComfyZImageBackend(model).base_digest() == digest  # the backend's own wrappers do not count
    key = next(k for k in model.model_state_dict() if k.endswith("attention.qkv.weight"))
    stock = model.clone()
    stock.add_patches({key: (torch.zeros(1),)}, 0.5)  # a stock LoRA or any weight patch
    assert model_digest(stock) != digest
    weaker = model.clone()
    weaker.add_patches({key: (torch.zeros(1),)}, 0.25)
    assert model_digest(weaker) != model_digest(stock)
    import importlib

    adapter = importlib.import_module("comfy.weight_adapter").LoRAAdapter  # what LoraLoader puts on a key
    up, down = torch.randn(3 * 256, 2), torch.randn(2, 256)
    alphas = []
    for alpha in (1.0, 4.0):
        stocked = model.clone()
        stocked.add_patches({key: adapter({key}, (up, down, alpha, None, None, None))}, 1.0)
        alphas.append(model_digest(stocked))
    assert None not in alphas and len({*alphas, digest}) == 3  # each alpha, and the bare model, its own digest
    applied = []
    factors = {(0, "q"): (torch.randn(2, 256), torch.randn(256, 2))}
    for strength in (1.0, 0.5):
        erased = ComfyZImageBackend(model)
        install_lora(erased, ErasureLoRA(factors), name=erased.key, strength=strength)
        applied.append(model_digest(erased.patcher))
    again = ComfyZImageBackend(model)  # the same LoRA applied anew: another random adapter name, the same model
    install_lora(again, ErasureLoRA(factors), name=again.key)
    assert applied[0] != digest and applied[0] != applied[1] and model_digest(again.patcher) == applied[0]
    nodes_model_advanced = importlib.import_module("comfy_extras.nodes_model_advanced")
    shifts = [model_digest(nodes_model_advanced.ModelSamplingAuraFlow().patch_aura(model, s)[0]) for s in (3.0, 6.0)]
    assert None not in shifts and len({*shifts, digest}) == 3  # the stock Z-Image workflow's shift node
    opaque = model.clone()
    opaque.add_object_patch("diffusion_model.norm_final.forward", lambda x: x)  # another node's callable
    assert model_digest(opaque) is None  # nothing stable to compare: never reused
    import functools

    def patched(fn):
        clone = model.clone()
        clone.add_object_patch("diffusion_model.norm_final.forward", fn)
        return model_digest(clone)

    bound = [patched(_PackA().forward), patched(_PackB().forward), patched(functools.partial(_randomise)),
             patched(functools.partial(encode)), patched(functools.partial(_randomise, seed=2))]
    # Two nodes' bound methods, or partials of two functions, were digested alike ("method", "partial"): a ComfyUI
    # review found a finished LoRA reused for a model patched otherwise.
    assert None not in bound and len(set(bound)) == len(bound)
    assert patched(_PackA().forward) == bound[0]  # and each the same again
    # An extension's patch that keeps the patcher it patched was described without end: a review found RecursionError,
    # which failed Z-Erase Train. Now it is not described (no reuse); without the cycle it is.
    kept, keeper = model.clone(), _Keeper()
    kept.cached_patcher_init = (importlib.import_module("comfy.sd").load_diffusion_model, (str(weights), {}))
    keeper.patcher = kept
    kept.add_object_patch("diffusion_model.norm_final.forward", keeper.forward)
    assert model_digest(kept) is None
    keeper.patcher = None
    assert model_digest(kept) is not None
    other_file = tmp_path / "finetune.safetensors"
    other_file.write_bytes(b"weights")
    model.cached_patcher_init = (lambda *a, **k: None, (str(other_file), {}))
    assert model_digest(model) != digest


def test_gpu_script_measures_the_nodes_backend_on_bf16_and_fp8_weights(tmp_path):
    """scripts/gpu_bench.py --host comfy (the GPU check of the nodes' backend and of fp8 base weights), run at toy
    size on the CPU: one model after the other, every row measured, the fp8 one really stored in fp8."""
    from gpu_script import load_gpu_bench

    out = tmp_path / "gpu.json"
    argv = ["--tiny", "--host", "comfy", "--weights", "bf16", "fp8", "--steps", "1", "--pool", "1", "--out", str(out)]
    assert load_gpu_bench().main(argv) == 0
    result = json.loads(out.read_text())
    wide, fp8 = result["models"]
    assert (wide["stored_as"], fp8["stored_as"]) == ("float32", "float8_e4m3fn")  # the tiny model computes in fp32
    assert fp8["weights_gib"] == wide["weights_gib"] / 4  # 1 byte against fp32's 4: every parameter in fp8
    assert [(r["weights"], r["gradient_checkpointing"]) for r in result["rows"]] == [
        ("bf16", False), ("bf16", True), ("fp8", False), ("fp8", True)]
    for row in result["rows"]:
        assert "error" not in row and row["model"] == f"z-image-tiny-comfy-{row['weights']}"
        assert all(s > 0 for s in row["seconds_per_step"].values())
    for partial in result["checkpointing"]:  # k of the main layers checkpointed, through the nodes' backend
        peaks = [r["peak_mib"] for r in partial["rows"]]
        assert [r["checkpointed_layers"] for r in partial["rows"]] == [0, 1, 2] and peaks[0] > peaks[1]
    assert [p["weights"] for p in result["checkpointing"]] == ["bf16", "fp8"]


def test_the_fingerprint_records_the_caption_width_only_where_the_model_tells_it():
    """Apply compares every fact a LoRA and the model both record: a width the model's config does not tell, kept as
    0, would refuse every LoRA trained elsewhere (the command line records the real width)."""
    from zerase_core.apply import check_applicable
    from zerase_core.lora_file import ErasureLoRA

    backend = ComfyZImageBackend(tiny_zimage(comfy))
    told = backend.fingerprint()
    assert told["cap_feat_dim"] == backend.cap_feat_dim > 0
    lora = ErasureLoRA({(0, "q"): (torch.zeros(2, backend.dim), torch.zeros(backend.dim, 2))}, fingerprint=told)
    backend.cap_feat_dim = 0  # a config without it
    assert "cap_feat_dim" not in backend.fingerprint()
    check_applicable(backend, lora)  # not refused for a width the model does not know
    backend.cap_feat_dim = told["cap_feat_dim"] * 2
    with pytest.raises(ZEraseError, match="cap_feat_dim: LoRA"):
        check_applicable(backend, lora)


def test_other_nodes_diffusion_model_wrappers_stay_out_of_the_engines_calls():
    """ComfyUI's EasyCache wraps the diffusion model: it reads the sampler's sigmas and answers steps from outputs
    cached at earlier ones. The engine's calls (training steps, the viewer's maps, previews) are no sampler's steps:
    they failed with its KeyError 'sigmas' (a review), and given the sigmas would have been answered from its cache.
    They leave it out; the MODEL samplers get keeps it."""
    from comfy.patcher_extension import WrappersMP
    from comfy_extras.nodes_easycache import EasyCacheNode
    from comfy_support import empty_latent, ksample

    model, clip = tiny_zimage(comfy), tiny_clip(comfy)
    (cached,) = EasyCacheNode.execute(model, 0.2, 0.15, 0.95, False)
    cond = encode(clip, "a cat")
    ksample(comfy, cached, cond, cond, empty_latent(), steps=4)  # EasyCache now holds a sampling's state
    plain, wrapped = ComfyZImageBackend(model, clip), ComfyZImageBackend(cached, clip)
    _randomise(wrapped.install(LoRAConfig(rank=2)))
    prompts = plain.encode(["a photo of a cat"])
    for seed in (0, 1):  # two inputs: a cache would answer the second from the first
        x, sigma = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.tensor([0.5])
        assert torch.equal(wrapped.velocity(x, sigma, prompts, lora=False)[0], plain.velocity(x, sigma, prompts)[0])
    assert wrapped.patcher.get_wrappers(WrappersMP.DIFFUSION_MODEL, "easycache")  # still there for samplers
    assert len(wrapped.patcher.get_wrappers(WrappersMP.DIFFUSION_MODEL, wrapped.key)) == 1


def test_uninstall_on_a_model_without_erasure_loras_takes_every_wrapper_off():
    """uninstall() on a clone that came with no erasure LoRA leaves no qkv patch behind (the stacked case alone
    cannot tell a popped patch from one overwritten by the inherited one)."""
    backend = ComfyZImageBackend(tiny_zimage(comfy))
    backend.install(LoRAConfig(rank=2))
    assert any(".qkv." in k for k in backend.patcher.object_patches)
    backend.uninstall()
    assert not any(".qkv." in k for k in backend.patcher.object_patches)


def test_latent_shape_refuses_a_width_off_the_patch_grid():
    """A width that is no multiple of the VAE's downscale times the patch size is refused, as a height is."""
    backend = ComfyZImageBackend(tiny_zimage(comfy))
    step = int(backend.patcher.model.latent_format.spacial_downscale_ratio) * backend.patch
    backend.latent_shape(2 * step, 3 * step)  # on the grid: fine
    with pytest.raises(ZEraseError, match="must be a multiple of"):
        backend.latent_shape(2 * step, 3 * step + step // 2)


def test_the_digest_tells_a_file_rewritten_in_place_and_the_clips_last_layer(tmp_path):
    """A fine-tune saved over the model file (same path) is another model; CLIPSetLastLayer's layer gives other
    prompt features: neither may reuse a LoRA trained before."""
    import os

    from zerase_core.backends.comfy_zimage.digest import model_digest, text_encoder_digest

    weights = tmp_path / "z_image_turbo.safetensors"
    weights.write_bytes(b"weights")
    model = tiny_zimage(comfy)
    model.cached_patcher_init = (lambda *a, **k: None, (str(weights), {}))
    digest = model_digest(model)
    weights.write_bytes(b"fine-tuned weights")
    os.utime(weights, ns=(1, 1))
    assert digest is not None and model_digest(model) != digest

    clip = tiny_clip(comfy)
    clip.patcher.cached_patcher_init = (lambda *a, **k: None, (str(weights), {}))
    last = text_encoder_digest(clip)
    clip.clip_layer(-2)
    assert last is not None and text_encoder_digest(clip) != last
