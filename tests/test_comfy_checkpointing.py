"""Gradient checkpointing on ComfyUI's Z-Image (tiny, real ComfyUI classes; skipped without a checkout).

Checkpointed main layers are recomputed during backward, after the gate's layout and the
attention capture have left: these tests check that the recomputation replays them (same
gradients, L_attn and the batched [c_er, ∅, c_pr] path included), that the gate still leaves
image rows alone in the recomputation, and that unpatching gives the original model back.
"""

import asyncio
from contextlib import contextmanager

import pytest
from comfy_support import REPO, empty_latent, encode, ksample, require_comfyui, tiny_clip, tiny_zimage
from recorders import keeping_recorders

comfy = require_comfyui()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from zerase_core import memory_fit  # noqa: E402
from zerase_core.backends.comfy_zimage import CheckpointedForward, ComfyZImageBackend, training_session  # noqa: E402
from zerase_core.config import TrainConfig  # noqa: E402
from zerase_core.lora import LoRAConfig  # noqa: E402
from zerase_core.lora_file import ErasureLoRA  # noqa: E402
from zerase_core.prompts import concept_token_indices  # noqa: E402
from zerase_core.scoped import scoped  # noqa: E402
from zerase_core.trainer import ZEraseTrainer  # noqa: E402

from device_errors import ran_out  # noqa: E402

LAYERS, DIM = 2, 256


@contextmanager
def _qkv_calls(model):
    """Inside, forward hooks on every main layer's qkv record (layer, input, output, base projection) per call."""
    qkvs = [model.model.diffusion_model.layers[i].attention.qkv for i in range(LAYERS)]
    seen = []

    def hook(module, inputs, output, n):
        with torch.no_grad():
            seen.append((n, inputs[0].detach(), output.detach(), F.linear(inputs[0], module.weight).detach()))

    handles = [m.register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n, m in enumerate(qkvs)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _erased(model):
    """``model`` with an erasure LoRA already applied (as Apply Erasure LoRA outputs it)."""
    from zerase_core.apply import install_lora

    g = torch.Generator().manual_seed(5)
    factors = {(i, p): (torch.randn(2, DIM, generator=g) * 0.3, torch.randn(DIM, 2, generator=g) * 0.3)
               for i in range(LAYERS) for p in "qkv"}
    lora = ErasureLoRA(factors, concept="dog", fingerprint={"family": "z-image", "dim": DIM, "n_layers": LAYERS})
    backend = ComfyZImageBackend(model)
    install_lora(backend, lora, name=backend.key)
    return backend.patcher


def _one_step_gradient(checkpointing: bool, mode: str, stacked: bool, layers=None):
    """LoRA gradient of one training step at a fixed x_t; also the losses and qkv calls in backward."""
    model = tiny_zimage(comfy)
    backend = ComfyZImageBackend(_erased(model) if stacked else model, tiny_clip(comfy))
    config = TrainConfig(concept="cat", preserve=("dog",), steps=1, height=64, width=64, sample_steps=2,
                         lora=LoRAConfig(rank=2, layers=layers), shuffle_pool=2, xt_source="fresh", lambda_mode=mode,
                         fixed_lambda=0.7, gradient_checkpointing="on" if checkpointing else "off")
    with training_session(backend):
        trainer = ZEraseTrainer(backend, config)
        assert backend.checkpointed_layers == (memory_fit.most_checkpointed(LAYERS) if checkpointing else 0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in trainer.params:  # a LoRA away from zero, the same in every run
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        x_t = torch.randn((1, *trainer.latent_shape), generator=g)
        sigma = torch.tensor([0.6])
        er, keep = trainer.prompts.erase[0], trainer.prompts.keep[0]
        losses = trainer._losses(er, list(trainer.prompts.erase_tokens[0]), keep, x_t, sigma)
        l_erase, l_attn, l_pr = losses.erase, losses.attn, losses.pr
        assert l_pr.requires_grad  # λ > 0 expected: the batched [c_er, ∅, c_pr] student forward
        with _qkv_calls(model) as seen:
            lam, _ = trainer._backward(l_erase + config.attn_weight * l_attn, l_pr, l_pr.item(), losses.pr_batch)
        grad = torch.cat([p.grad.reshape(-1) for p in trainer.params])
    return grad, torch.stack([l_erase, l_attn, l_pr]).detach(), lam, seen


# fixed: λ > 0, one backward; exact: two backward passes through the checkpoints (the first retains
# the graph); stacked: training on a MODEL that already carries an erasure LoRA (its gate is replayed
# too); layers (0, 1): L_attn on layer 0 only, so the replay must see the layer's own block_index.
@pytest.mark.parametrize("mode,stacked,layers", [("fixed", False, None), ("exact", False, None),
                                                 ("fixed", True, None), ("fixed", False, (0, 1))])
def test_checkpointing_gives_the_same_gradients(mode, stacked, layers):
    g0, losses0, lam0, recomputed0 = _one_step_gradient(False, mode, stacked, layers)
    g1, losses1, lam1, recomputed1 = _one_step_gradient(True, mode, stacked, layers)
    assert losses0[1] > 0 and g0.abs().sum() > 0  # L_attn is captured and there is a gradient
    torch.testing.assert_close(losses1, losses0, rtol=1e-6, atol=1e-7)
    assert lam1 == pytest.approx(lam0, rel=1e-5, abs=1e-9)  # exact: two backward passes, the first retaining
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    assert not recomputed0 and recomputed1  # the layers did run again in backward


def test_recomputed_layers_keep_image_rows_and_the_attention_capture():
    model = tiny_zimage(comfy)
    backend = ComfyZImageBackend(model, tiny_clip(comfy))
    lora_set = backend.install(LoRAConfig(rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_set.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    backend.set_gradient_checkpointing(backend.n_layers)
    prompts = backend.encode(["a photo of a cat"])
    tokens = [concept_token_indices(prompts[0], "cat")]
    x, sigma = torch.randn(1, 16, 8, 12, generator=g), torch.tensor([0.7])
    recorders = []
    with _qkv_calls(model) as seen, training_session(backend), \
            scoped(backend, recorder_factory=keeping_recorders(recorders)):
        v, mass = backend.velocity(x, sigma, prompts, concept_tokens=tokens, mass_layers={0, 1})
        forward_calls, (recorder,) = len(seen), recorders
        first = {n: id(t) for n, t in recorder.per_layer.items()}
        (v.square().mean() + mass.sum()).backward()
    assert forward_calls == LAYERS and len(seen) == 2 * LAYERS  # each layer recomputed once in backward
    # The recomputation replays a recorder that keeps no mass: kept, it would hold the recomputed layer's graph, and
    # a graph holding the recorder with the forward's masses would hold itself (test_attention_mass).
    assert len(first) == LAYERS and {n: id(t) for n, t in recorder.per_layer.items()} == first
    assert recorder.for_replay().per_layer == {}
    text = 32  # 13 caption tokens padded to 32
    for _, _, out, base in seen:
        assert torch.equal(out[:, text:], base[:, text:])  # image rows: the base projection, bit for bit
        assert not torch.equal(out[:, :text], base[:, :text])  # text rows: the LoRA's
    for (n0, x0, out0, _), (n1, x1, out1, _) in zip(seen[:LAYERS], reversed(seen[LAYERS:])):
        assert n0 == n1 and torch.equal(x0, x1) and torch.equal(out0, out1)  # the recomputation is the forward
    assert sum(p.grad.abs().sum() for p in lora_set.parameters()) > 0
    backend.set_gradient_checkpointing(0)
    assert not any(k.startswith("diffusion_model.layers.") and k.endswith(".forward") and ".attention." not in k
                   for k in backend.patcher.object_patches)  # the refiner's row sharing stays; it is not checkpointing


def _lora_and_inputs(backend):
    """A rank-2 LoRA away from zero on ``backend``, and one prompt with its concept tokens, x and σ to run it on."""
    lora_set = backend.install(LoRAConfig(rank=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_set.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    prompts = backend.encode(["a photo of a cat"])
    tokens = [concept_token_indices(prompts[0], "cat")]
    return lora_set, prompts, tokens, torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.7])


def _lora_gradient(backend, lora_set, prompts, tokens, x, sigma) -> torch.Tensor:
    """The LoRA's gradient of one training forward (velocity and attention mass over every layer) and backward."""
    for p in lora_set.parameters():
        p.grad = None
    with training_session(backend):
        v, mass = backend.velocity(x, sigma, prompts, concept_tokens=tokens, mass_layers=set(range(LAYERS)))
        (v.square().mean() + mass.sum()).backward()
    return torch.cat([p.grad.reshape(-1) for p in lora_set.parameters()])


def test_partial_checkpointing_patches_and_recomputes_the_first_layers_only():
    """What auto runs where part of the layers fit: the first k main layers checkpointed (patched, run again in
    backward), the others as they are, and the LoRA's gradient that of no checkpointing."""
    from zerase_core.backends.comfy_zimage.object_patches import LAYER_FORWARD

    model = tiny_zimage(comfy)
    backend = ComfyZImageBackend(model, tiny_clip(comfy))
    lora_set, prompts, tokens, x, sigma = _lora_and_inputs(backend)

    def gradient(checkpointed: int):
        backend.set_gradient_checkpointing(checkpointed)
        with _qkv_calls(model) as seen:
            grad = _lora_gradient(backend, lora_set, prompts, tokens, x, sigma)
        patched = [LAYER_FORWARD.format(i) in backend.patcher.object_patches for i in range(LAYERS)]
        return grad, [n for n, *_ in seen], patched

    plain, runs, patched = gradient(0)
    assert runs == [0, 1] and patched == [False, False]
    partial, runs, patched = gradient(1)
    assert runs == [0, 1, 0] and patched == [True, False]  # layer 0 again in backward, layer 1 not
    torch.testing.assert_close(partial, plain, rtol=1e-5, atol=1e-7)


def test_a_model_that_comes_checkpointed_is_checkpointed_once():
    """A MODEL cloned from a checkpointed backend's patcher carries its CheckpointedForward patches; this backend's
    checkpointing takes their place instead of wrapping them. Wrapped, each layer is a checkpoint inside a
    checkpoint, and backward through the attention mass fails (torch's CheckpointError: the recomputation saves
    other tensors than the forward did). Kept on a layer this backend does not checkpoint (none, or part of them),
    the other backend's replay runs there and fails alike: they are dropped when this backend is made."""
    model = tiny_zimage(comfy)
    first = ComfyZImageBackend(model)
    first.set_gradient_checkpointing(first.n_layers)
    backend = ComfyZImageBackend(first.patcher, tiny_clip(comfy))
    lora_set, prompts, tokens, x, sigma = _lora_and_inputs(backend)

    grads = []
    for checkpointed in (0, 1, LAYERS):  # none first: the inherited patches would still be in place
        backend.set_gradient_checkpointing(checkpointed)
        with _qkv_calls(model) as seen:
            grads.append(_lora_gradient(backend, lora_set, prompts, tokens, x, sigma))
        assert len(seen) == LAYERS + checkpointed  # each layer once in forward, the checkpointed ones again
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-7)


def test_another_extensions_layer_patch_survives_checkpointing_on_and_off():
    """A layer forward patched by another extension before us: checkpointing wraps it, and taking checkpointing away
    (this backend's, or one inherited from the input MODEL's clone) puts it back rather than the bare forward."""
    model = tiny_zimage(comfy)
    layer0 = model.model.diffusion_model.layers[0]
    calls = []

    def theirs(*args, **kwargs):
        calls.append(1)
        return type(layer0).forward(layer0, *args, **kwargs)

    from zerase_core.backends.comfy_zimage.object_patches import LAYER_FORWARD

    model.add_object_patch(LAYER_FORWARD.format(0), theirs)
    first = ComfyZImageBackend(model)
    first.set_gradient_checkpointing(LAYERS)
    assert first.checkpointed_layers == LAYERS
    first.set_gradient_checkpointing(0)
    assert first.patcher.object_patches[LAYER_FORWARD.format(0)] is theirs
    first.set_gradient_checkpointing(LAYERS)
    backend = ComfyZImageBackend(first.patcher, tiny_clip(comfy))  # inherits first's patches, drops them
    assert backend.checkpointed_layers == 0 and backend.patcher.object_patches[LAYER_FORWARD.format(0)] is theirs
    assert LAYER_FORWARD.format(1) not in backend.patcher.object_patches
    lora_set, prompts, tokens, x, sigma = _lora_and_inputs(backend)
    backend.set_gradient_checkpointing(1)
    _lora_gradient(backend, lora_set, prompts, tokens, x, sigma)
    assert len(calls) == 2  # theirs ran in the forward and in the recomputation


@pytest.fixture(scope="module")
def pack():
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))
    return nodes.NODE_CLASS_MAPPINGS


def test_train_node_with_checkpointing_leaves_the_original_bit_identical(pack, tmp_path):
    fp = comfy.folder_paths
    saved = (fp.folder_names_and_paths["loras"][0][:], fp.get_temp_directory())
    fp.folder_names_and_paths["loras"][0][:] = [str(tmp_path / "loras")]
    fp.set_temp_directory(str(tmp_path / "temp"))
    try:
        with torch.inference_mode():  # as in ComfyUI: nodes run in inference mode on inference-tensor weights
            model = tiny_zimage(comfy, inference_tensors=True)
            clip = tiny_clip(comfy)
            pos, neg = encode(clip, "a photo of a cat"), encode(clip, "blurry")
            latent = empty_latent(1, 64, 64)
            before = ksample(comfy, model, pos, neg, latent, seed=3, steps=2, cfg=2.0)
            lora, erased, _, _ = pack["ZEraseTrain"].execute(
                model=model, clip=clip, concept="cat", preset="entity", templates="A photo of {}", preserve="dog",
                steps=2, learning_rate=1e-2, beta=0.1, eta=2.0, epsilon=-1.0, rank=2, targets="q,k,v",
                resolution=64, seed=0, save_name="cat", gradient_checkpointing="on")
            assert lora.training["steps_done"] == 2
            assert any(b.abs().sum() > 0 for _, b in lora.factors.values())
            after = ksample(comfy, erased, pos, neg, latent, seed=3, steps=2, cfg=2.0)
            again = ksample(comfy, model, pos, neg, latent, seed=3, steps=2, cfg=2.0)
    finally:
        fp.folder_names_and_paths["loras"][0][:] = saved[0]
        fp.set_temp_directory(saved[1])
        fp.filename_list_cache.clear()
    assert not torch.equal(before, after)
    assert torch.equal(before, again)  # the original MODEL samples as before training, bit for bit
    for layer in model.model.diffusion_model.layers:
        assert not isinstance(layer.forward, CheckpointedForward)  # the patch is gone from the shared module


def test_a_forward_whose_backward_never_runs_leaves_nothing_held():
    """A training forward with the attention mass, under checkpointing, dropped before its backward (a NaN loss, an
    error): with the outputs gone, the model goes too. The graph holds the recorder; a recorder that held the
    masses closed a cycle the garbage collector cannot see, and the clone's VRAM stayed taken after the node failed."""
    import gc
    import weakref

    model = tiny_zimage(comfy)
    backend = ComfyZImageBackend(model, tiny_clip(comfy))
    backend.install(LoRAConfig(rank=2))
    backend.set_gradient_checkpointing(backend.n_layers)
    prompts = backend.encode(["a photo of a cat"])
    with training_session(backend):
        v, mass = backend.velocity(torch.randn(1, 16, 8, 8), torch.tensor([0.7]), prompts,
                                   concept_tokens=[concept_token_indices(prompts[0], "cat")])
    assert mass.requires_grad
    dit = weakref.ref(model.model.diffusion_model)
    del v, mass, backend, model
    comfy.mm.unload_all_models()
    gc.collect()
    assert dit() is None


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_auto_checkpointing_switches_on_mid_run_on_comfys_model(where, caplog):
    """gradient_checkpointing "auto" on ComfyUI's model, loaded whole for training: a step that runs out of memory
    without checkpointing (in its forward, or in its backward) is taken again with the checkpointing patches added
    mid-run, which ComfyUI applies when it loads the model again, and the run equals one that never ran out. The
    simulated card fails while the layer ComfyUI runs is not the checkpointed one, so a patch recorded but never
    applied would fail again."""
    def run(out_of_memory_from: int | None):
        model = tiny_zimage(comfy)
        backend = ComfyZImageBackend(model, tiny_clip(comfy))
        config = TrainConfig(concept="cat", preserve=("dog",), steps=4, height=64, width=64, sample_steps=2,
                             lora=LoRAConfig(rank=2), shuffle_pool=2, xt_pool=2, lr=1e-2)
        layer = model.model.diffusion_model.layers[0]  # a checkpointed one: the retry checkpoints all but the last
        applied = []

        def hook(module, *args):
            applied.append(isinstance(module.forward, CheckpointedForward))
            if (out_of_memory_from is not None and (torch.is_grad_enabled() or where == "backward")
                    and not applied[-1] and trainer.step + 1 >= out_of_memory_from):
                raise ran_out()

        with training_session(backend):
            trainer = ZEraseTrainer(backend, config)
            register = layer.register_forward_pre_hook if where == "forward" else layer.register_full_backward_pre_hook
            handle = register(hook)
            result = trainer.run()
            handle.remove()
        return trainer, result, applied

    def flat(history):
        return [v for r in history for v in (r.erase, r.attn, r.pr, r.lam)]

    _, reference, _ = run(None)
    trainer, result, applied = run(3)
    assert trainer.checkpointing.from_step == 3 and applied[-1]  # the patch really ran by the end
    assert "Out of memory on cpu at step 3" in caplog.text
    assert flat(result.history) == pytest.approx(flat(reference.history), rel=1e-5, abs=1e-8)
    for mine, theirs in zip(result.lora.factors.values(), reference.lora.factors.values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
