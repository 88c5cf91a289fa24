"""Every node of the pack, loaded through ComfyUI's own custom-node loader, on tiny real models."""

import asyncio

import pytest
from comfy_support import (REPO, empty_latent, encode, ksample, node_texts, require_comfyui, tiny_clip, tiny_lumina2,
                           tiny_zimage)

comfy = require_comfyui()
import torch  # noqa: E402
from comfy_api.latest import io  # noqa: E402  (the node's hidden inputs, as ComfyUI's executor sets them)
from safetensors.torch import save_file  # noqa: E402

from zerase_core.errors import ZEraseError  # noqa: E402
from zerase_core.lora_file import ErasureLoRA, load_lora, save_lora  # noqa: E402

from device_errors import ran_out  # noqa: E402

DIM, LAYERS = 256, 2


@pytest.fixture(scope="module")
def pack():
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture
def loras_dir(tmp_path):
    fp = comfy.folder_paths
    saved = (fp.folder_names_and_paths["loras"][0][:], fp.get_temp_directory())
    fp.folder_names_and_paths["loras"][0][:] = [str(tmp_path / "loras")]
    (tmp_path / "loras").mkdir()
    fp.set_temp_directory(str(tmp_path / "temp"))
    fp.filename_list_cache.clear()
    yield tmp_path / "loras"
    fp.folder_names_and_paths["loras"][0][:] = saved[0]
    fp.set_temp_directory(saved[1])
    fp.filename_list_cache.clear()


def random_lora(seed=0, rank=2, dim=DIM, concept="cat") -> ErasureLoRA:
    g = torch.Generator().manual_seed(seed)
    factors = {(i, p): (torch.randn(rank, dim, generator=g) * 0.3, torch.randn(dim, rank, generator=g) * 0.3)
               for i in range(LAYERS) for p in "qkv"}
    return ErasureLoRA(factors, concept=concept, fingerprint={"family": "z-image", "dim": dim, "n_layers": LAYERS})


def test_pack_registers_every_node(pack):
    for node_id in ("ZEraseTrain", "ZEraseApplyLoRA", "ZEraseLoadLoRA", "ZEraseMergeLoRAs",
                    "ZEraseAttentionMaps", "ZEraseCompare"):
        assert node_id in pack
    # Nodes that write files run on Queue even when nothing downstream is wired (as SaveLoRA does).
    ours = {n: cls for n, cls in pack.items() if n.startswith("ZErase")}
    assert {n for n, cls in ours.items() if cls.OUTPUT_NODE is True} == {"ZEraseTrain", "ZEraseMergeLoRAs"}


def test_every_input_of_every_node_says_what_it_takes(pack):
    """The frontend shows an input's tooltip on hover; Apply's model, Merge's LoRAs and most of the Viewer's inputs had
    none (found by QA through /object_info)."""
    bare = [f"{node_id}.{i.id}" for node_id, cls in pack.items() if node_id.startswith("ZErase")
            for i in cls.define_schema().inputs if not i.tooltip]
    assert bare == []


def test_every_node_is_found_by_what_users_search_for(pack):
    """The node search matches names and aliases: "concept erasure", "unlearn" or "heatmap" found none of the nodes.
    What ComfyUI sends the frontend (/object_info) carries them."""
    info = {node_id: cls.GET_NODE_INFO_V1() for node_id, cls in pack.items() if node_id.startswith("ZErase")}
    assert all(node["search_aliases"] for node in info.values())
    assert "concept erasure" in info["ZEraseTrain"]["search_aliases"]


@pytest.mark.parametrize("name, smallest", [
    ("learning_rate", 1e-5),  # a hundredth of the paper's 1e-3
    ("beta", 1e-3),  # a hundredth of the paper's β = 0.1; 0 switches preservation off
    ("epsilon", 1e-5),  # a hundredth of the tightest preset's ε (Table 6: 1e-3)
])
def test_the_train_nodes_numbers_keep_small_values_the_frontend_rounds_to_the_step(pack, name, smallest):
    """ComfyUI's frontend rounds a FLOAT widget to as many decimals as its step has: β = 0.004 at step 0.01 was
    stored as 0.0, which switches the preservation constraint off without a word."""
    import math

    spec = pack["ZEraseTrain"].INPUT_TYPES()["required"][name][1]
    decimals = max(0, -math.floor(math.log10(spec["step"])))
    assert round(smallest, decimals) == smallest, spec


def test_lora_names_are_the_same_on_every_system(pack):
    """ComfyUI lists 'zerase\\cat.safetensors' on Windows; the shipped workflows store 'zerase/cat.safetensors'."""
    import sys

    common = next(mod for n, mod in sys.modules.items() if n.endswith(".nodes.common"))
    assert common.portable("zerase\\cat.safetensors", sep="\\") == "zerase/cat.safetensors"
    assert common.portable("zerase/cat.safetensors", sep="/") == "zerase/cat.safetensors"


def test_apply_gates_image_rows_and_leaves_original_bit_identical(pack):
    apply = pack["ZEraseApplyLoRA"]
    model, clip = tiny_zimage(comfy), tiny_clip(comfy)
    pos, neg = encode(clip, "a photo of a cat"), encode(clip, "blurry")
    latent = empty_latent(1, 64, 80)  # 8 x 10 latent, 20 image tokens (padded to 32)
    before = ksample(comfy, model, pos, neg, latent, seed=3, steps=2, cfg=2.0)
    (erased,) = apply.execute(model=model, lora_name="(none)", strength=1.0, erasure_lora=random_lora())
    qkvs = [model.model.diffusion_model.layers[i].attention.qkv for i in range(LAYERS)]
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, i[0], o))) for n, m in enumerate(qkvs)]
    try:
        after = ksample(comfy, erased, pos, neg, latent, seed=3, steps=2, cfg=2.0)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 2 * 2 * LAYERS  # 2 steps x (cond, uncond) x layers
    for n, x, out in seen:
        text = 32  # both captions (13 and 10 tokens) pad to 32
        base = torch.nn.functional.linear(x, qkvs[n].weight)
        assert torch.equal(out[:, text:], base[:, text:])  # image rows: the unpatched projection's
        assert not torch.equal(out[:, :text], base[:, :text])
    assert not torch.equal(before, after)
    again = ksample(comfy, model, pos, neg, latent, seed=3, steps=2, cfg=2.0)
    assert torch.equal(before, again)  # the original MODEL is untouched after the clone ran
    # The erasure is the patch, not the weights: what a checkpoint save would write is the original model (README)
    saved, original = erased.model_state_dict(), model.model_state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def test_apply_stacks_and_refuses_what_does_not_fit(pack, loras_dir):
    apply = pack["ZEraseApplyLoRA"]
    model, clip = tiny_zimage(comfy), tiny_clip(comfy)
    pos, neg = encode(clip, "a photo of a cat"), encode(clip, "")
    lat = empty_latent()
    lora = random_lora(1)
    (twice,) = apply.execute(model=apply.execute(model=model, lora_name="(none)", strength=0.5, erasure_lora=lora)[0],
                             lora_name="(none)", strength=0.5, erasure_lora=lora)
    (once,) = apply.execute(model=model, lora_name="(none)", strength=1.0, erasure_lora=lora)
    a = ksample(comfy, twice, pos, neg, lat, seed=1)
    b = ksample(comfy, once, pos, neg, lat, seed=1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # files: native, stock, another architecture
    save_lora(lora, loras_dir / "native.safetensors")
    save_file({"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.zeros(2, DIM),
               "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.zeros(3 * DIM, 2)},
              str(loras_dir / "stock.safetensors"))
    save_lora(random_lora(2, dim=64), loras_dir / "small.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    (from_file,) = apply.execute(model=model, lora_name="native.safetensors", strength=1.0)
    torch.testing.assert_close(ksample(comfy, from_file, pos, neg, lat, seed=1), b, rtol=0, atol=0)
    with pytest.raises(ZEraseError, match="ordinary LoRA"):
        apply.execute(model=model, lora_name="stock.safetensors", strength=1.0)
    with pytest.raises(ZEraseError, match="different architecture"):
        apply.execute(model=model, lora_name="small.safetensors", strength=1.0)
    with pytest.raises(ZEraseError, match="not Z-Image"):
        apply.execute(model=tiny_lumina2(comfy), lora_name="native.safetensors", strength=1.0)
    assert apply.execute(model=model, lora_name="native.safetensors", strength=0.0)[0] is model  # as LoraLoader
    with pytest.raises(ZEraseError, match="choose a LoRA"):
        apply.execute(model=model, lora_name="(none)", strength=0.0)
    # At strength 0 too a choice that does not fit says so (it returned the model unchecked), under the node's name
    # as the node's own refusals are
    with pytest.raises(ZEraseError, match="^Apply Erasure LoRA: This erasure LoRA was made for a different arch"):
        apply.execute(model=model, lora_name="small.safetensors", strength=0.0)
    with pytest.raises(ZEraseError, match="not Z-Image"):
        apply.execute(model=tiny_lumina2(comfy), lora_name="native.safetensors", strength=0.0)
    with pytest.raises(ZEraseError, match="^Apply Erasure LoRA: 'stock.safetensors' is an ordinary LoRA"):
        apply.execute(model=model, lora_name="stock.safetensors", strength=1.0)
    for strength in (float("nan"), float("inf"), 1e39):  # ComfyUI's min/max check lets NaN through
        with pytest.raises(ZEraseError, match="^Apply Erasure LoRA: The strength must be a finite number .*got"):
            apply.execute(model=model, lora_name="native.safetensors", strength=strength)


def test_file_choices_are_cached_on_the_files_contents(pack, loras_dir):
    """A resumed Train run rewrites its cancelled run's file under the same name: Apply and Load must read it
    again, not serve the cached partial LoRA (ComfyUI keys a node's cache on fingerprint_inputs)."""
    import os

    apply, load = pack["ZEraseApplyLoRA"], pack["ZEraseLoadLoRA"]
    path = save_lora(random_lora(1), loras_dir / "run.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    before = (apply.fingerprint_inputs(lora_name="run.safetensors", strength=1.0),
              load.fingerprint_inputs(lora_name="run.safetensors"))
    assert before == (apply.fingerprint_inputs(lora_name="run.safetensors", strength=1.0),
                      load.fingerprint_inputs(lora_name="run.safetensors"))  # unchanged file: cached
    save_lora(random_lora(2), path)
    os.utime(path, ns=(1, 1))  # a different time even where the clock is coarse
    after = (apply.fingerprint_inputs(lora_name="run.safetensors", strength=1.0),
             load.fingerprint_inputs(lora_name="run.safetensors"))
    assert before[0] != after[0] and before[1] != after[1]
    # A linked name has no value while ComfyUI keys the node (None), so it is keyed on every file it may name. Keyed
    # as a constant, a file rewritten under the linked name was served from the cache; keyed as NaN (≠ itself), the
    # node and every sampler after it ran again at every queue (a review).
    def linked():
        return apply.fingerprint_inputs(lora_name=None, strength=1.0), load.fingerprint_inputs(lora_name=None)

    unchanged = linked()
    assert unchanged == linked()
    save_lora(random_lora(3), path)
    os.utime(path, ns=(2, 2))
    assert linked()[0] != unchanged[0] and linked()[1] != unchanged[1]


def test_a_connected_lora_is_not_keyed_on_the_file_it_overrides(pack, loras_dir):
    """Through ComfyUI's own cache (IsChangedCache): with erasure_lora connected, rewriting the file the widget names
    re-ran Apply and the sampler after it; unconnected, a rewrite is read again."""
    import asyncio
    import os

    import execution
    from comfy_execution.graph import DynamicPrompt

    def comfyuis_key(**inputs):
        prompt = DynamicPrompt({"7": {"class_type": "ZEraseApplyLoRA", "inputs": inputs}})
        return asyncio.run(execution.IsChangedCache("p", prompt, None).get("7"))

    path = save_lora(random_lora(1), loras_dir / "run.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    linked = dict(model=["1", 0], lora_name="run.safetensors", strength=1.0, erasure_lora=["21", 0])
    alone = {k: v for k, v in linked.items() if k != "erasure_lora"}
    before = comfyuis_key(**linked), comfyuis_key(**alone)
    save_lora(random_lora(2), path)
    os.utime(path, ns=(1, 1))  # a different time even where the clock is coarse
    assert comfyuis_key(**linked) == before[0] and comfyuis_key(**alone) != before[1]


def _train_module():
    """The pack's nodes/train.py as ComfyUI imported it (under custom_nodes.<folder>)."""
    import sys

    return next(mod for n, mod in sys.modules.items() if n.endswith(".nodes.train"))


def _train_inputs(**over):
    base = dict(concept="cat", preset="entity", templates="A photo of {}", preserve="dog", steps=2,
                learning_rate=1e-3, beta=0.1, eta=2.0, epsilon=-1.0, rank=2, targets="q,k,v", resolution=64,
                seed=0, save_name="cat")
    return base | over


def test_train_outputs_and_files(pack, loras_dir):
    train = pack["ZEraseTrain"]
    with torch.inference_mode():  # as in ComfyUI: nodes run in inference mode, loaders make inference tensors
        model = tiny_zimage(comfy, inference_tensors=True)
        clip = tiny_clip(comfy)
        out = train.execute(model=model, clip=clip, **_train_inputs())
    lora, erased, curves, previews = out
    assert len(out.ui["images"]) == 2  # curves and previews also shown on the node
    assert (loras_dir / "zerase" / "cat.safetensors").is_file()
    loaded = load_lora(loras_dir / "zerase" / "cat.safetensors")
    assert loaded.concept == "cat" and loaded.training["steps_done"] == 2
    assert curves.ndim == 4 and curves.shape[-1] == 3 and previews.shape[-1] == 3
    assert erased is not model and lora.concept == "cat"
    with torch.inference_mode():
        train.execute(model=model, clip=clip, **_train_inputs(steps=1, gradient_checkpointing="off", save_name=" ",
                                                              xt_source="fresh"))
    second = load_lora(loras_dir / "zerase" / "cat_001.safetensors")  # named for the concept; never overwrites
    assert second.training["xt_source"] == "fresh" and second.training["gradient_checkpointing"] == "off"
    assert loaded.training["shift"] == 3.0  # Z-Image's own schedule; a patched one is what x_t is sampled on
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    (shifted,) = ModelSamplingAuraFlow().patch_aura(model, 6.0)
    with torch.inference_mode():
        train.execute(model=shifted, clip=clip, **_train_inputs(steps=1, save_name="shifted"))
    assert load_lora(loras_dir / "zerase" / "shifted.safetensors").training["shift"] == 6.0
    with pytest.raises(ZEraseError, match="not allowed|leave"):
        train.execute(model=model, clip=clip, **_train_inputs(save_name="../escape"))
    with pytest.raises(ZEraseError, match="^Z-Erase Train: The concept is empty"):
        train.execute(model=model, clip=clip, **_train_inputs(concept="  ", save_name="x"))
    # the settings' refusals under the node's name, as every other refusal of the pack's nodes (they had none)
    with pytest.raises(ZEraseError, match="^Z-Erase Train: The learning rate must be between"):
        train.execute(model=model, clip=clip, **_train_inputs(learning_rate=5.0, save_name="x"))
    with pytest.raises(ZEraseError, match="not Z-Image"):
        train.execute(model=tiny_lumina2(comfy), clip=clip, **_train_inputs(save_name="y"))


def test_train_runs_after_a_sampler_met_its_token_layout_in_inference_mode(pack, loras_dir):
    """ComfyUI runs every node in inference mode. A KSampler with an applied erasure LoRA at the training size, on a
    prompt that pads as the concept's does, meets the token layout of Train's first step first, and the layout's row
    indices, shared by every call with that layout, were made as inference tensors: Train then stopped at its first
    step ("Inference tensors cannot be saved for backward")."""
    from zerase_core.layout import _layout

    _layout.cache_clear()  # the layout met first by the sampler, whatever earlier tests in this process met
    apply, train = pack["ZEraseApplyLoRA"], pack["ZEraseTrain"]
    with torch.inference_mode():
        model, clip = tiny_zimage(comfy, inference_tensors=True), tiny_clip(comfy)
        (erased,) = apply.execute(model=model, lora_name="(none)", strength=1.0, erasure_lora=random_lora(seed=4))
        ksample(comfy, erased, encode(clip, "A photo of cat"), encode(clip, ""), empty_latent(1, 64, 64), cfg=1.0)
        train.execute(model=erased, clip=clip, **_train_inputs(steps=1, save_name="after_sampling"))
    assert load_lora(loras_dir / "zerase" / "after_sampling.safetensors").training["steps_done"] == 1


def test_a_sampler_refuses_reference_latents_under_the_name_of_the_node_whose_model_it_samples(pack, loras_dir):
    """Z-Image's edit mode (reference latents in the conditioning) is refused inside the sampler. Train's erased
    MODEL is made as Apply makes it, and its refusals named Apply Erasure LoRA, a node the workflow may not have."""
    with torch.inference_mode():
        model, clip = tiny_zimage(comfy, inference_tensors=True), tiny_clip(comfy)
        (_, from_train, *_) = pack["ZEraseTrain"].execute(model=model, clip=clip, **_train_inputs(steps=1))
        (from_apply,) = pack["ZEraseApplyLoRA"].execute(model=model, lora_name="(none)", strength=1.0,
                                                        erasure_lora=random_lora())
    latent = empty_latent()
    pos = [[features, {**extra, "reference_latents": [latent["samples"]]}]
           for features, extra in encode(clip, "a photo of a cat")]
    neg = encode(clip, "blurry")
    for erased, node in ((from_train, "Z-Erase Train"), (from_apply, "Apply Erasure LoRA")):
        with pytest.raises(ZEraseError, match=f"^{node}: erasure LoRAs do not support Z-Image reference latents"):
            ksample(comfy, erased, pos, neg, latent, steps=1, cfg=2.0)
    ksample(comfy, from_train, encode(clip, "a photo of a cat"), neg, latent, steps=1, cfg=2.0)  # and without, runs


def test_cancel_during_training_leaves_a_loadable_lora_and_resume_finishes_the_run(pack, loras_dir, monkeypatch):
    train = pack["ZEraseTrain"]
    mm, utils = comfy.mm, comfy.utils
    calls = []

    def hook(value, total, preview, node_id=None):  # what the server's hook does, with a Cancel after step 2
        calls.append((value, total))
        if total == 50 and value >= 2:  # the bar counts the x_t pool's trajectories first, then the 50 steps
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    old = utils.PROGRESS_BAR_HOOK
    utils.set_progress_bar_global_hook(hook)
    told = node_texts(monkeypatch)
    monkeypatch.setattr(train, "hidden", io.HiddenHolder.from_dict({io.Hidden.unique_id: "7"}), raising=False)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train.execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), **_train_inputs(steps=50, save_name="stop"))
    finally:
        utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    lora = load_lora(loras_dir / "zerase" / "stop.safetensors")
    # ComfyUI's ProgressBar may skip hook calls between fast steps; Cancel lands at the step it saw.
    assert lora.training["steps_done"] == calls[-1][0] >= 2
    done = lora.training["steps_done"]  # the node says where the LoRA so far went
    assert told[-1] == ("7", f"stopped at step {done}; the LoRA so far: zerase/stop.safetensors")
    pool = [(v, t) for v, t in calls if t != 50]  # the pool's trajectories counted before the first step
    assert pool and pool[-1][0] == pool[-1][1] and calls.index(pool[-1]) < calls.index((1, 50))
    assert all(torch.isfinite(b).all() for _, b in lora.factors.values())
    # Resume (the step count may change): the run continues from the checkpoint kept beside the LoRAs, ends where an
    # uninterrupted run ends, and the finished run leaves no checkpoint behind.
    checkpoint = loras_dir / "zerase" / ".checkpoints" / "stop.zerase-ckpt"
    assert checkpoint.is_file()
    kept, trainer_class = checkpoint.read_bytes(), _train_module().ZEraseTrainer
    # Queued again with resume off (the default) it would be replaced; with other settings it cannot continue.
    # Both are told before any work (no trainer, no x_t pool) and the checkpoint stays as it was.
    monkeypatch.setattr(trainer_class, "__init__", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ZEraseError, match=r"stop.zerase-ckpt holds a run stopped at step \d+ of 50 .*Turn resume on"):
        train.execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), **_train_inputs(steps=6, save_name="stop"))
    with pytest.raises(ZEraseError, match=r"different settings \(lr: 0.001 then, 0.002 now\)"):
        train.execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                      **_train_inputs(steps=6, save_name="stop", resume=True, learning_rate=2e-3))
    monkeypatch.undo()
    assert checkpoint.read_bytes() == kept
    steps_run = []
    real_step = trainer_class.train_step
    monkeypatch.setattr(trainer_class, "train_step", lambda self: steps_run.append(1) or real_step(self))
    resumed_bar = []  # the node's bar starts where the run resumes, not at 0 until a step is done

    def record(value, total, preview, node_id=None):
        resumed_bar.append((value, total))

    utils.set_progress_bar_global_hook(record)
    try:
        resumed, *_ = train.execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                    **_train_inputs(steps=6, save_name="stop", resume=True))
    finally:
        utils.set_progress_bar_global_hook(old)
    monkeypatch.undo()
    assert next((v, t) for v, t in resumed_bar if t == 6) == (calls[-1][0], 6)  # ComfyUI's bar may skip later steps
    assert len(steps_run) == 6 - calls[-1][0]  # continued, not started again
    assert resumed.training["steps_done"] == 6 and not checkpoint.exists()
    # The finished LoRA replaces the one saved at Cancel instead of landing beside it as stop_001.
    assert load_lora(loras_dir / "zerase" / "stop.safetensors").training["steps_done"] == 6
    assert sorted(p.name for p in (loras_dir / "zerase").glob("*.safetensors")) == ["stop.safetensors"]
    whole, *_ = train.execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), **_train_inputs(steps=6, save_name="w"))
    for key, (a, b) in whole.factors.items():
        torch.testing.assert_close(resumed.factors[key][0], a, rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.factors[key][1], b, rtol=0, atol=1e-6)


def test_a_file_written_meanwhile_under_the_same_name_is_kept(pack, loras_dir, monkeypatch):
    """Two Train nodes with one save_name in a queue: the name is resolved before training, so the second must
    not overwrite what the first wrote meanwhile."""
    module = _train_module()
    real_run = module.ZEraseTrainer.run

    def run_while_another_node_saves(self):
        (loras_dir / "zerase").mkdir(exist_ok=True)
        (loras_dir / "zerase" / "twin.safetensors").write_bytes(b"the other node's LoRA")
        return real_run(self)

    monkeypatch.setattr(module.ZEraseTrainer, "run", run_while_another_node_saves)
    pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), **_train_inputs(save_name="twin"))
    assert (loras_dir / "zerase" / "twin.safetensors").read_bytes() == b"the other node's LoRA"
    assert load_lora(loras_dir / "zerase" / "twin_001.safetensors").training["steps_done"] == 2


@pytest.mark.parametrize("when", ["pool", "step_one"])
def test_cancel_before_the_first_step_writes_nothing(pack, loras_dir, monkeypatch, when):
    """Cancel while the x_t pool is sampled, or right after it: ComfyUI's interrupt, no LoRA file (nothing trained)."""
    mm = comfy.mm
    if when == "pool":
        mm.interrupt_current_processing(True)
    else:
        real_run = _train_module().ZEraseTrainer.run
        monkeypatch.setattr(_train_module().ZEraseTrainer, "run",
                            lambda self: mm.interrupt_current_processing(True) or real_run(self))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                        **_train_inputs(steps=5, save_name="early"))
    finally:
        mm.interrupt_current_processing(False)
    assert not (loras_dir / "zerase" / "early.safetensors").exists()
    assert not (loras_dir / "zerase" / ".checkpoints" / "early.zerase-ckpt").exists()  # step 0: nothing to resume


def test_a_cancel_seen_between_steps_saves_the_lora_so_far_and_says_where(pack, loras_dir, monkeypatch):
    """ComfyUI's interrupt seen by the trainer between two steps (no progress hook raising it): the run ends there, its
    LoRA so far is saved, and the node says where before the interrupt is raised."""
    mm, train = comfy.mm, pack["ZEraseTrain"]
    told = node_texts(monkeypatch)
    monkeypatch.setattr(train, "hidden", io.HiddenHolder.from_dict({io.Hidden.unique_id: "7"}), raising=False)
    trainer_class = _train_module().ZEraseTrainer
    real_step = trainer_class.train_step

    def step_then_cancel(self):  # the Cancel button pressed during step 2
        record = real_step(self)
        if self.step == 2:
            mm.interrupt_current_processing(True)
        return record

    monkeypatch.setattr(trainer_class, "train_step", step_then_cancel)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train.execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), **_train_inputs(steps=5, save_name="halt"))
    finally:
        mm.interrupt_current_processing(False)
    assert load_lora(loras_dir / "zerase" / "halt.safetensors").training["steps_done"] == 2
    assert told[-1] == ("7", "cancelled; the LoRA so far: zerase/halt.safetensors (2 of 5 steps)")


def test_a_save_name_no_file_system_can_hold_is_refused_before_training(pack, loras_dir, monkeypatch):
    monkeypatch.setattr(_train_module().ZEraseTrainer, "__init__", lambda *a, **k: pytest.fail("trained"))
    (loras_dir / "zerase").mkdir(exist_ok=True)  # where the lookup of earlier files raised OSError
    with pytest.raises(ZEraseError, match="too long .*choose a shorter save name"):
        pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                    **_train_inputs(save_name="y" * 250))
    with pytest.raises(ZEraseError, match="too long .*choose a shorter save name"):
        pack["ZEraseMergeLoRAs"].execute(lora_1=random_lora(0), lora_2=random_lora(1), weights="", rank=0,
                                         save_name="y" * 250)


def test_a_template_without_the_concept_is_refused_by_train_before_the_model_is_loaded(pack, loras_dir, monkeypatch):
    """A review: it was told after the model was loaded for training (a second whole copy under dynamic VRAM) and
    every prompt encoded, without the node's name. A template of escaped parentheses (read by ComfyUI as plain ones,
    as the concept is) is not refused."""
    from zerase_core.backends.comfy_zimage import ComfyZImageBackend

    monkeypatch.setattr(ComfyZImageBackend, "for_training", lambda *a, **k: pytest.fail("loaded for training"))
    with pytest.raises(ZEraseError, match=r"^Z-Erase Train: The concept 'cat' does not occur in the prompt 'a photo "
                                          r"of a pet'\. Put the concept word into every erase prompt template"):
        pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                    **_train_inputs(templates="A photo of {}\na photo of a pet"))
    assert not (loras_dir / "zerase").exists() or not list((loras_dir / "zerase").iterdir())
    with pytest.raises(pytest.fail.Exception, match="loaded for training"):  # past the check: it is found
        pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                    **_train_inputs(concept="\\(cat\\)", templates="a photo of a \\(cat\\)"))


def test_another_models_vae_is_refused_before_training_or_the_viewers_forwards(pack, loras_dir, monkeypatch):
    """An SD VAE (4-channel latents) failed with torch's channel error when the previews or the picture were decoded:
    Train after training and saving (and again on every queue, on the reuse path), the viewer after its forwards."""
    from zerase_core.backends.comfy_zimage import ComfyZImageBackend

    sd_vae = comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.randn(512, 4, 3, 3)})  # ComfyUI's class, 4 channels
    assert sd_vae.latent_channels == 4
    monkeypatch.setattr(_train_module().ZEraseTrainer, "__init__", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(ComfyZImageBackend, "attention_maps", lambda *a, **k: pytest.fail("a forward ran"))
    told = r"this VAE takes 4-channel latents and Z-Image's have 16: connect Z-Image's VAE \(ae.safetensors\)"
    with pytest.raises(ZEraseError, match=rf"^Z-Erase Train: {told}"):
        pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), vae=sd_vae, **_train_inputs())
    assert not (loras_dir / "zerase").exists() or not list((loras_dir / "zerase").iterdir())
    with pytest.raises(ZEraseError, match=rf"^Attention Map Viewer: {told}"):
        pack["ZEraseAttentionMaps"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), prompt="a cat",
                                            words="cat", sigmas="0.5", layer_start=0, layer_end=-1, seed=0,
                                            latent={"samples": torch.randn(1, 16, 8, 8)}, vae=sd_vae)


def test_load_and_merge(pack, loras_dir):
    save_lora(random_lora(3, concept="cat"), loras_dir / "a.safetensors")
    save_lora(random_lora(4, concept="dog"), loras_dir / "b.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    load, merge = pack["ZEraseLoadLoRA"], pack["ZEraseMergeLoRAs"]
    a, concept = load.execute(lora_name="a.safetensors")
    b, _ = load.execute(lora_name="b.safetensors")
    assert concept == "cat"
    merged, report = merge.execute(lora_1=a, lora_2=b, weights="", rank=0, save_name="both")
    key = (0, "q")
    torch.testing.assert_close(merged.delta_weight(key), 0.5 * a.delta_weight(key) + 0.5 * b.delta_weight(key))
    assert (loras_dir / "zerase" / "both.safetensors").is_file() and "rank 4" in report
    # queued again (after a restart the node runs again): the file it wrote is taken, no identical both_001
    _, report = merge.execute(lora_1=a, lora_2=b, weights="", rank=0, save_name="both")
    assert report.endswith("; zerase/both.safetensors holds this merge already")
    assert sorted(p.name for p in (loras_dir / "zerase").iterdir()) == ["both.safetensors"]
    small, report = merge.execute(lora_1=a, lora_2=b, weights="1, 1", rank=2, save_name="")
    assert small.rank == 2 and "relative error" in report
    with pytest.raises(ZEraseError, match=r"^Merge Erasure LoRAs: Got 1 weights for 2 LoRAs; give one weight per LoRA"):
        merge.execute(lora_1=a, lora_2=b, weights="1", rank=0, save_name="")
    with pytest.raises(ZEraseError, match="^Merge Erasure LoRAs: Merge weights must be finite numbers > 0"):
        merge.execute(lora_1=a, lora_2=b, weights="1, -1", rank=0, save_name="")
    itself, _ = merge.execute(lora_1=a, lora_2=a, weights="", rank=2, save_name="")  # lora_2's tooltip: a re-rank
    assert itself.concept == "cat" and itself.rank == 2
    with pytest.raises(ZEraseError, match="^Merge Erasure LoRAs: .*bad:name"):  # the file's refusal, under its name
        merge.execute(lora_1=a, lora_2=b, weights="", rank=0, save_name="bad:name")


def test_load_with_no_lora_file_to_choose_says_where_one_comes_from(pack, loras_dir):
    """With no file in the loras folders the node offers '' (ComfyUI needs an option): queued, it said "LoRA file ''
    is not in any loras folder"."""
    comfy.folder_paths.filename_list_cache.clear()
    assert pack["ZEraseLoadLoRA"].define_schema().inputs[0].options == [""]
    (loras_dir / "a_stock_lora.safetensors").write_bytes(b"")  # sorts before zerase/: a new node took it
    save_lora(random_lora(1, concept="cat"), loras_dir / "zerase" / "cat.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    assert pack["ZEraseLoadLoRA"].define_schema().inputs[0].default == "zerase/cat.safetensors"
    with pytest.raises(ZEraseError, match="^Load Erasure LoRA: there is no LoRA file to choose: train one"):
        pack["ZEraseLoadLoRA"].execute(lora_name="")


def test_merge_names_its_file_as_apply_lists_it_and_refuses_weights_that_keep_nothing(pack, loras_dir):
    """The report said "saved cat.safetensors" for loras/zerase/sub/cat.safetensors; weights "0, 0" saved a LoRA
    named "cat + dog" that erased nothing."""
    merge, a, b = pack["ZEraseMergeLoRAs"], random_lora(3, concept="cat"), random_lora(4, concept="dog")
    _, report = merge.execute(lora_1=a, lora_2=b, weights="", rank=0, save_name="sub/cat")
    assert report.endswith("; saved zerase/sub/cat.safetensors")
    assert (loras_dir / "zerase" / "sub" / "cat.safetensors").is_file()
    comfy.folder_paths.filename_list_cache.clear()
    assert "zerase/sub/cat.safetensors" in pack["ZEraseApplyLoRA"].define_schema().inputs[1].options
    for weights in ("0, 0", "0, 1"):
        with pytest.raises(ZEraseError, match="0 would keep nothing of its LoRA"):
            merge.execute(lora_1=a, lora_2=b, weights=weights, rank=0, save_name="nothing")
    assert not (loras_dir / "zerase" / "nothing.safetensors").exists()
    linked = loras_dir.parent / "linked_loras"  # a loras folder that is a link to another disk: a ValueError after
    linked.symlink_to(loras_dir, target_is_directory=True)  # the file was saved
    comfy.folder_paths.folder_names_and_paths["loras"][0][:] = [str(linked)]
    _, report = merge.execute(lora_1=a, lora_2=b, weights="", rank=0, save_name="dog")
    assert report.endswith("; saved zerase/dog.safetensors") and (loras_dir / "zerase" / "dog.safetensors").is_file()
    store = loras_dir.parent / "store"  # zerase/ itself a link: named from its parent it read "store/…"
    store.mkdir()
    (linked / "zerase").rename(linked / "zerase_before")
    (linked / "zerase").symlink_to(store, target_is_directory=True)
    _, report = merge.execute(lora_1=a, lora_2=b, weights="", rank=0, save_name="cow")
    assert report.endswith("; saved zerase/cow.safetensors") and (store / "cow.safetensors").is_file()


def test_the_viewer_tells_a_phrase_from_two_words_and_refuses_a_model_b_of_another_architecture(pack):
    viewer, model, clip = pack["ZEraseAttentionMaps"], tiny_zimage(comfy), tiny_clip(comfy)
    inputs = dict(model=model, clip=clip, prompt="a cat and a dog", sigmas="0.5", layer_start=0, layer_end=-1, seed=0,
                  latent={"samples": torch.randn(1, 16, 8, 8)})
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer: .*separate words with commas \('cat, dog' is two"):
        viewer.execute(words="cat dog", **inputs)
    with pytest.raises(ZEraseError, match="^Attention Map Viewer: model_b is another architecture than model"):
        viewer.execute(words="cat, dog", model_b=tiny_zimage(comfy, cap_feat_dim=128), **inputs)  # was rms_norm's error
    # model_b's own refusals are told under its name, once, after the first model's and the request's
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer \(model_b\): this MODEL is Lumina2") as told:
        viewer.execute(words="cat, dog", model_b=tiny_lumina2(comfy), **inputs)
    assert str(told.value).count("Attention Map Viewer") == 1
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer: this MODEL is Lumina2"):
        viewer.execute(words="cat, dog", model_b=tiny_lumina2(comfy), **(inputs | {"model": tiny_lumina2(comfy)}))
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer: give at least one word"):
        viewer.execute(words=",", model_b=tiny_lumina2(comfy), **inputs)


def test_the_viewer_refuses_what_it_cannot_draw_under_the_input_it_came_from(pack, monkeypatch):
    """A QA run in ComfyUI's executor: an overflowing model B (fp16, a strong LoRA) was drawn as a dark row, its NaN
    spoiling model A's row through the shared colour scale; a Lumina 2 model_b was refused as "this MODEL" after model
    A's forwards; a prompt the encoder could not spell out, or a LATENT or IMAGE without pixels, was told without the
    node's name or as a traceback; a long prompt cut the settings off the caption."""
    from zerase_core.backends.comfy_zimage import ComfyZImageBackend

    viewer, model, clip = pack["ZEraseAttentionMaps"], tiny_zimage(comfy), tiny_clip(comfy)
    inputs = dict(clip=clip, prompt="a photo of a cat on a mat", words="cat", sigmas="0.5", layer_start=0,
                  layer_end=-1, seed=0, latent={"samples": torch.randn(1, 16, 8, 8)})
    broken = tiny_zimage(comfy)  # as a forward that overflowed (fp16, a LoRA at strength 20): inf, then NaN
    with torch.no_grad():
        next(broken.model.diffusion_model.layers[0].parameters()).fill_(float("inf"))
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer \(model_b\): The attention is not a finite number"):
        viewer.execute(model=model, model_b=broken, **inputs)
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer: The attention is not a finite number .*bf16"):
        viewer.execute(model=broken, model_b=model, **inputs)
    forwards = []
    original = ComfyZImageBackend.attention_maps
    monkeypatch.setattr(ComfyZImageBackend, "attention_maps", lambda *a, **k: forwards.append(1) or original(*a, **k))
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer \(model_b\): this MODEL is Lumina2"):
        viewer.execute(model=model, model_b=tiny_lumina2(comfy), **inputs)
    assert forwards == []  # refused before model A ran
    nan = {"samples": torch.full((1, 16, 8, 8), float("nan"))}  # was blamed on the model ("fp16 weights")
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer: the latent is not finite numbers \(NaN or inf\)"):
        viewer.execute(model=model, **inputs | dict(latent=nan))
    assert forwards == []  # before any forward
    with pytest.raises(ZEraseError, match="^Attention Map Viewer: the text encoder's tokens do not spell out"):
        viewer.execute(model=model, **inputs | dict(prompt="embedding:cat a cat"))
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer: the latent has shape \(1, 16, 0, 8\)"):
        viewer.execute(model=model, **inputs | dict(latent={"samples": torch.randn(1, 16, 0, 8)}))
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer: An IMAGE of shape \(1, 64, 0, 3\) is not"):
        viewer.execute(model=model, **inputs | dict(latent=None, image=torch.rand(1, 64, 0, 3), vae=object()))
    with pytest.raises(ZEraseError, match="^Attention Map Viewer: The word 'dog' does not occur in the prompt"):
        viewer.execute(model=model, **inputs | dict(words="dog"))
    for image in (torch.rand(1, 64, 0, 3), torch.rand(1, 2, 16, 16, 3), torch.rand(64, 64, 3)):
        with pytest.raises(ZEraseError, match="^Z-Erase Compare: An IMAGE of shape .* is not .batch, height, width"):
            pack["ZEraseCompare"].execute(original=image, erased=image, prompt="", label_original="a",
                                          label_erased="b")
    captions = []
    render = next(m for n, m in __import__("sys").modules.items() if n.endswith(".nodes.attention_maps")).render
    monkeypatch.setattr(render, "grid", lambda *a, caption="": captions.append(caption) or torch.zeros(1, 8, 8, 3))
    viewer.execute(model=model, **inputs | dict(prompt="a photo of a cat on a mat" + ", in the rain" * 200))
    assert captions[0].startswith("sigma 0.5 | layers 0..1 | a photo of a cat")  # before the prompt, which is cut


def test_compare_draws_images_of_one_channel_or_bfloat16(pack):
    """Some nodes make such IMAGEs: PIL's and numpy's TypeErrors reached the user."""
    grey = torch.rand(1, 64, 64, 1)
    (grid,) = pack["ZEraseCompare"].execute(original=grey, erased=grey.bfloat16(), prompt="", label_original="a",
                                            label_erased="b")
    torch.testing.assert_close(grid[0, 18:82, :64], grey[0].expand(64, 64, 3), rtol=0, atol=0.5 / 255)
    with pytest.raises(ZEraseError, match="^Z-Erase Compare: "):  # the picture's own refusal, under the node's name
        pack["ZEraseCompare"].execute(original=torch.rand(1, 8, 8, 5), erased=torch.rand(1, 8, 8, 5), prompt="",
                                      label_original="a", label_erased="b")


def test_a_concept_with_comfyuis_escaped_parentheses_is_read_as_its_prompts_are(pack):
    """Prompts are unescaped as ComfyUI's tokenizer reads them; the concept was not, and was then "not in the
    prompt" although the template held it."""
    build_config = _train_module().build_config
    inputs = _train_inputs(concept="Mickey Mouse \\(Disney\\)", preserve="Donald \\(Duck\\)")
    config = build_config(**{k: v for k, v in inputs.items() if k != "save_name"}, gradient_checkpointing="off",
                          xt_source="pool", shift=3.0)
    assert config.concept == "Mickey Mouse (Disney)" and config.preserve == ("Donald (Duck)",)


def test_the_viewer_draws_an_image_as_the_vae_cropped_it(pack):
    """ComfyUI's VAE crops an IMAGE to a multiple of 8 px per side, centred, before it encodes: the maps cover that
    crop, so that is the picture they are drawn over (over the whole 70 px IMAGE they were shifted and stretched)."""
    vae = _zimage_vae()
    assert vae.latent_channels == 16 and vae.spacial_compression_encode() == 8
    inputs = dict(model=tiny_zimage(comfy), clip=tiny_clip(comfy), prompt="a photo of a cat", words="cat",
                  sigmas="0.5", layer_start=0, layer_end=-1, seed=0, vae=vae)
    image = torch.rand(1, 70, 70, 3, generator=torch.Generator().manual_seed(0))
    (whole,) = pack["ZEraseAttentionMaps"].execute(**inputs, image=image)
    (cropped,) = pack["ZEraseAttentionMaps"].execute(**inputs, image=image[:, 3:67, 3:67].clone())
    assert torch.equal(whole, cropped)  # the same latent, maps and picture
    (shifted,) = pack["ZEraseAttentionMaps"].execute(**inputs, image=image[:, :64, :64].clone())
    assert not torch.equal(whole, shifted)  # another crop: another picture


def test_attention_map_viewer_and_compare(pack):
    viewer, compare = pack["ZEraseAttentionMaps"], pack["ZEraseCompare"]
    model, clip = tiny_zimage(comfy), tiny_clip(comfy)
    (erased,) = pack["ZEraseApplyLoRA"].execute(model=model, lora_name="(none)", strength=1.0,
                                                erasure_lora=random_lora())
    latent = {"samples": torch.randn(1, 16, 8, 8)}
    (img,) = viewer.execute(model=model, clip=clip, prompt="a photo of a cat on a mat", words="cat, mat",
                            sigmas="0.3, 0.7", layer_start=0, layer_end=-1, seed=0, latent=latent, model_b=erased)
    assert img.ndim == 4 and img.shape[-1] == 3
    (same,) = viewer.execute(model=model, clip=clip, prompt="a photo of a cat on a mat", words="cat, mat",
                             sigmas="0.3, 0.7", layer_start=0, layer_end=-1, seed=0, latent=latent, model_b=model)
    row_a, row_b = (slice(18 + 64 * r, 82 + 64 * r) for r in range(2))  # 64 px heatmaps below the label strip
    assert torch.equal(same[0, row_a, 90:], same[0, row_b, 90:])  # model B = model A: the same maps
    assert not torch.equal(img[0, row_a, 90:], img[0, row_b, 90:])  # the erasure LoRA moved the attention
    beside = viewer.execute(model=model, clip=clip, prompt="a photo of a cat on a mat", words="cat, mat",
                            sigmas="0.3, 0.7", layer_start=0, layer_end=-1, seed=0, latent=latent, model_b=model,
                            image=torch.ones(1, 64, 64, 3))[0]
    assert torch.equal(beside, same)  # a connected LATENT is measured and drawn; an IMAGE beside it is not used
    with pytest.raises(ZEraseError, match="does not occur in the prompt 'a photo of a cat'. Type words that occur"):
        viewer.execute(model=model, clip=clip, prompt="a photo of a cat", words="dog", sigmas="0.5",
                       layer_start=0, layer_end=-1, seed=0, latent=latent)
    escaped = viewer.execute(model=model, clip=clip, prompt="a photo of a \\(cat\\) on a mat", words="\\(cat\\)",
                             sigmas="0.5", layer_start=0, layer_end=-1, seed=0, latent=latent)[0]  # ComfyUI escapes
    assert escaped.ndim == 4  # the word is read as the prompt is: "(cat)", which it holds
    with pytest.raises(ZEraseError, match="holds no image .batch size 0."):
        viewer.execute(model=model, clip=clip, prompt="a photo of a cat", words="cat", sigmas="0.5",
                       layer_start=0, layer_end=-1, seed=0, latent={"samples": torch.randn(0, 16, 8, 8)})
    with pytest.raises(ZEraseError, match=r"shape \(1, 4, 8, 8\); Z-Image's have 16 channels"):  # another's latent
        viewer.execute(model=model, clip=clip, prompt="a photo of a cat", words="cat", sigmas="0.5",
                       layer_start=0, layer_end=-1, seed=0, latent={"samples": torch.randn(1, 4, 8, 8)})
    # EmptyLatentImage's empty 4 channels are taken as KSampler takes them (16 empty ones); they were refused
    # (and at the spatial ratio the latent records, as KSampler reads it: 4×4 at 16 px per cell is Z-Image's 8×8)
    empties = [viewer.execute(model=model, clip=clip, prompt="a photo of a cat", words="cat", sigmas="0.5",
                              layer_start=0, layer_end=-1, seed=0, latent=empty)[0]
               for empty in ({"samples": torch.zeros(1, 4, 8, 8)}, {"samples": torch.zeros(1, 16, 8, 8)},
                             {"samples": torch.zeros(1, 4, 4, 4), "downscale_ratio_spacial": 16})]
    assert torch.equal(empties[0], empties[1]) and torch.equal(empties[0], empties[2])
    pics = torch.rand(2, 64, 64, 3)
    (grid,) = compare.execute(original=pics, erased=pics.flip(0), prompt="a photo of a cat",
                              label_original="original", label_erased="erased")
    assert grid.shape[0] == 1
    with pytest.raises(ZEraseError, match="same size"):
        compare.execute(original=pics, erased=pics[:1], prompt="", label_original="a", label_erased="b")
    with pytest.raises(ZEraseError, match="both batches are empty"):
        compare.execute(original=pics[:0], erased=pics[:0], prompt="", label_original="a", label_erased="b")
    # Row r holds original[r] | erased[r] at their own pixels (below an 18 px label strip, right of 90 px row labels).
    for r in range(2):
        rows = slice(18 + 64 * r, 82 + 64 * r)
        torch.testing.assert_close(grid[0, rows, 90:154], pics[r], rtol=0, atol=0.5 / 255)
        torch.testing.assert_close(grid[0, rows, 154:218], pics.flip(0)[r], rtol=0, atol=0.5 / 255)


def test_the_cheap_preview_matches_comfyuis_own_on_a_latents_samples(pack):
    """Without a VAE the nodes preview a LATENT's samples (VAE space) by the latent→RGB factors, which ComfyUI fits
    to the model's space (its sampling previews apply them to the sampler's x0). Fed VAE-space samples directly,
    Z-Image's (Flux format: ÷0.3611, shifted) preview came out 2.8× too contrasty, with channels clipped."""
    import sys

    import latent_preview
    import numpy as np

    render = next(mod for n, mod in sys.modules.items() if n.endswith(".nodes._render"))
    model = tiny_zimage(comfy)
    fmt = model.model.latent_format
    model_space = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    samples = model.model.process_latent_out(model_space)  # what a LATENT holds
    ours = render.latent_preview(model, samples)[0, ::8, ::8]  # one pixel per latent cell
    theirs = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)
    expected = torch.tensor(np.array(theirs.decode_latent_to_preview(model_space)), dtype=torch.float32)
    torch.testing.assert_close(ours * 255, expected, rtol=0, atol=1.0)


def test_queueing_again_takes_the_finished_lora_instead_of_training(pack, loras_dir, tmp_path, monkeypatch):
    """After ComfyUI's cache is gone (a restart, another workflow), the same settings on the same MODEL (its file and
    patches) and the same text encoder (its file and settings) take the saved LoRA; another seed, another file behind
    the model, another text encoder, or a CLIP that nothing identifies, trains again."""
    train, trainer_class = pack["ZEraseTrain"], _train_module().ZEraseTrainer
    weights = tmp_path / "z_image_turbo.safetensors"
    weights.write_bytes(b"weights")

    def model_from(path):
        model = tiny_zimage(comfy)
        model.cached_patcher_init = (lambda *a, **k: None, (str(path), {}))  # as Load Diffusion Model records
        return model

    encoder = tmp_path / "qwen_3_4b.safetensors"
    encoder.write_bytes(b"text encoder")

    def clip_from(path, seed=1):
        clip = tiny_clip(comfy, seed=seed)
        lumina2 = comfy.sd.CLIPType.LUMINA2  # as Load CLIP records: a list of files, the type, options
        clip.patcher.cached_patcher_init = (lambda *a, **k: None, ([str(path)], None, lumina2, {}))
        return clip

    first = train.execute(model=model_from(weights), clip=clip_from(encoder), **_train_inputs())
    steps_run = []
    real_step = trainer_class.train_step
    monkeypatch.setattr(trainer_class, "train_step", lambda self: steps_run.append(1) or real_step(self))
    told = node_texts(monkeypatch)
    monkeypatch.setattr(train, "hidden", io.HiddenHolder.from_dict({io.Hidden.unique_id: "7"}), raising=False)  # as run
    again = train.execute(model=model_from(weights), clip=clip_from(encoder), **_train_inputs())
    saved = sorted(p.name for p in (loras_dir / "zerase").glob("*.safetensors"))
    assert steps_run == [] and saved == ["cat.safetensors"]
    assert told == [("7", "zerase/cat.safetensors: a finished run of these settings on this model, reused")]
    for key, (a, b) in first[0].factors.items():
        assert torch.equal(again[0].factors[key][0], a) and torch.equal(again[0].factors[key][1], b)
    assert again[2].shape[-1] == 3 and len(again.ui["images"]) == 2  # its curves, from the file, and previews
    clip = tiny_clip(comfy)
    pos, neg, latent = encode(clip, "a photo of a cat"), encode(clip, "blurry"), empty_latent(1, 64, 80)
    original, trained, reused = (ksample(comfy, m, pos, neg, latent, seed=3, steps=2, cfg=2.0)
                                 for m in (model_from(weights), first[1], again[1]))
    assert torch.equal(trained, reused) and not torch.equal(trained, original)  # one erased MODEL, made one way
    train.execute(model=model_from(weights), clip=clip_from(encoder), **_train_inputs(seed=1))
    assert len(steps_run) == 2 and (loras_dir / "zerase" / "cat_001.safetensors").is_file()
    other = tmp_path / "finetune.safetensors"
    other.write_bytes(b"other weights")
    train.execute(model=model_from(other), clip=clip_from(encoder), **_train_inputs())
    assert len(steps_run) == 4 and (loras_dir / "zerase" / "cat_002.safetensors").is_file()
    other_encoder = tmp_path / "qwen_3_4b_fp8_scaled.safetensors"  # other prompt features
    other_encoder.write_bytes(b"other text encoder")
    train.execute(model=model_from(weights), clip=clip_from(other_encoder, seed=2), **_train_inputs())
    assert len(steps_run) == 6 and (loras_dir / "zerase" / "cat_003.safetensors").is_file()
    last_layer = clip_from(encoder)
    last_layer.clip_layer(-2)  # CLIPSetLastLayer: the same file, other features
    train.execute(model=model_from(weights), clip=last_layer, **_train_inputs())
    assert len(steps_run) == 8
    train.execute(model=model_from(weights), clip=tiny_clip(comfy), **_train_inputs())  # a CLIP of no file: no reuse
    assert len(steps_run) == 10


def test_a_run_stopped_by_nan_leaves_the_input_model_as_it_was(pack, loras_dir, monkeypatch):
    """A NaN stops the run in its second step, after a forward, with the LoRA already moved by the first. The input
    MODEL then samples bit-identically to before; once it has loaded again its layers carry none of the run's wrappers
    (ComfyUI restores the object patches of a clone that died loaded when it loads the next model) and nothing holds
    the run's LoRA any more."""
    import gc
    import weakref

    import zerase_core.trainer as trainer_module
    from zerase_core.backends.comfy_zimage import CheckpointedForward, GatedForward

    train, runs = pack["ZEraseTrain"], []
    with torch.inference_mode():
        model, clip = tiny_zimage(comfy, inference_tensors=True), tiny_clip(comfy)
        positive, negative = encode(clip, "a photo of a cat"), encode(clip, "")
        before = ksample(comfy, model, positive, negative, empty_latent())
    real_init, real_loss = trainer_module.ZEraseTrainer.__init__, trainer_module.loss_pr

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        runs.append(self)

    monkeypatch.setattr(trainer_module.ZEraseTrainer, "__init__", init)
    monkeypatch.setattr(trainer_module, "loss_pr",  # NaN from the second step on
                        lambda *a: real_loss(*a) * (float("nan") if runs[-1].step >= 1 else 1.0))
    with torch.inference_mode(), pytest.raises(trainer_module.NonFiniteLoss, match="step 2"):
        train.execute(model=model, clip=clip, **_train_inputs(steps=3, save_name="nan"))
    monkeypatch.undo()
    # As the message says: queued again with a lower learning rate, the run starts afresh. Its checkpoint is not
    # "a run that can still be resumed" (resuming would repeat the failed step), so it is not in the way.
    with torch.inference_mode():
        again = train.execute(model=model, clip=clip, **_train_inputs(steps=1, learning_rate=5e-4, save_name="nan"))
    assert again[0].training["steps_done"] == 1
    del again
    (run,) = runs
    moved = [p for p in run.params if p.abs().sum() > 0 and p.shape[-1] == 2]  # B factors (out × rank) moved
    assert moved, "the first step moved no B factor: a leftover wrapper would add exact zeros"
    lora = weakref.ref(moved[0])
    del run, runs[:], moved
    with torch.inference_mode():
        after = ksample(comfy, model, positive, negative, empty_latent())
    assert torch.equal(before, after)
    dit = model.model.diffusion_model
    patched = [vars(m).get("forward") for m in [*dit.layers, *(layer.attention.qkv for layer in dit.layers)]]
    assert not any(isinstance(f, (GatedForward, CheckpointedForward)) for f in patched)
    gc.collect()
    assert lora() is None


@pytest.fixture
def titles(pack, monkeypatch):
    """The titles the Train node gives its curves, as it draws them (the pack loaded first: the node module is its)."""
    module, seen = _train_module(), []
    real_curves = module.render.curves

    def curves(*args, title="", **kwargs):
        seen.append(title)
        return real_curves(*args, title=title, **kwargs)

    monkeypatch.setattr(module.render, "curves", curves)
    return seen


def test_the_curves_say_when_auto_checkpointing_switched_on(pack, loras_dir, monkeypatch, titles):
    """A run that auto switched is slower from that step: the curves' title says from which step, and why. A step of
    the node's own run runs out of memory without checkpointing (simulated), and the run goes on with it."""
    module = _train_module()
    real_step = module.ZEraseTrainer._step

    def step_that_runs_out_once(self):
        if self.step == 1 and self.checkpointing.from_step is None:
            raise ran_out()
        return real_step(self)

    monkeypatch.setattr(module.ZEraseTrainer, "_step", step_that_runs_out_once)
    with torch.inference_mode():
        pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                    **_train_inputs(steps=3, save_name="switched"))
    # 1 of 2: as many as "on", all but the last
    assert titles[-1].split("\n")[0].endswith(", checkpointing 1/2 layers from step 2 (out of memory without it)")
    assert load_lora(loras_dir / "zerase" / "switched.safetensors").training["steps_done"] == 3


def test_train_runs_a_compiled_model_uncompiled_and_leaves_its_input_compiled(pack, loras_dir):
    """TorchCompileModel before Z-Erase Train: dynamo traced the run's hooks and failed while the x_t pool was
    sampled (a ComfyUI review reproduced it with the eager backend). The run takes the wrapper off its own clone."""
    from comfy.patcher_extension import WrappersMP
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    trained = {}
    for compiled in (False, True):
        with torch.inference_mode():
            model = tiny_zimage(comfy, inference_tensors=True)
            if compiled:
                set_torch_compile_wrapper(model=model, backend="eager")
            out = pack["ZEraseTrain"].execute(model=model, clip=tiny_clip(comfy), **_train_inputs(
                steps=2, save_name=f"compiled_{compiled}", gradient_checkpointing="on"))
        trained[compiled] = out[0]
        assert bool(model.get_wrappers(WrappersMP.APPLY_MODEL, "torch.compile")) == compiled  # the input kept it
    for key, (a, b) in trained[False].factors.items():  # the same run: compiling changes nothing it computes
        assert torch.equal(a, trained[True].factors[key][0]) and torch.equal(b, trained[True].factors[key][1])


def _known_by_their_files(tmp_path):
    """A tiny model and CLIP that ComfyUI knows by the files they were loaded from (the reuse digest reads them)."""
    weights, encoder = tmp_path / "z.safetensors", tmp_path / "qwen.safetensors"
    weights.write_bytes(b"weights")
    encoder.write_bytes(b"text encoder")
    model, clip = tiny_zimage(comfy), tiny_clip(comfy)
    model.cached_patcher_init = (lambda *a, **k: None, (str(weights), {}))
    clip.patcher.cached_patcher_init = (lambda *a, **k: None, ([str(encoder)], None, comfy.sd.CLIPType.LUMINA2, {}))
    return model, clip


def test_the_curves_say_when_nothing_but_the_empty_prompt_is_preserved(pack, loras_dir, titles, tmp_path):
    """The paper always trains with preservation concepts; without them the engine's warning went to the console
    only. The curves, shown on the node, say it, also for a finished run taken again (a review: its title did not)."""
    model, clip = _known_by_their_files(tmp_path)  # so a repeat is reused
    for preserve, name in (("", "alone"), ("dog", "kept"), ("", "alone")):
        with torch.inference_mode():
            pack["ZEraseTrain"].execute(model=model, clip=clip,
                                        **_train_inputs(steps=1, preserve=preserve, save_name=name))
    assert titles[0].startswith("Z-Erase 'cat' (no preservation concepts): 1 steps")
    assert titles[1].startswith("Z-Erase 'cat': 1 steps")
    assert titles[2] == "Z-Erase 'cat' (no preservation concepts): 1 steps\nreused: zerase/alone.safetensors"
    assert [title.split("\n")[1] for title in titles[:2]] == ["saved: zerase/alone.safetensors",
                                                              "saved: zerase/kept.safetensors"]


def test_the_curves_say_how_many_layers_a_partial_plan_checkpoints(pack, loras_dir, monkeypatch, titles):
    """Where part of the layers fit (simulated: auto's plan says 1 of the tiny model's 2), the node's run checkpoints
    that many, through ComfyUI's patches, and its curves say so."""
    import zerase_core.memory_fit as memory_fit

    counts = []

    def one_layer(layers, per_layer, kept, available):
        counts.append(layers)
        return 1

    monkeypatch.setattr(memory_fit, "available_bytes", lambda device: 2**30)
    monkeypatch.setattr(memory_fit, "layers_to_checkpoint", one_layer)
    with torch.inference_mode():
        pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                    **_train_inputs(steps=2, save_name="partial"))
    assert counts == [2]  # decided once, over the model's 2 main layers
    first_line = titles[-1].split("\n")[0]
    assert first_line.endswith(", checkpointing 1/2 layers from step 1 (too little memory free without it)")


def test_the_curves_say_when_auto_checkpointed_from_the_start(pack, loras_dir, monkeypatch, titles):
    """Too little GPU memory free for a step without checkpointing (simulated): the node's run checkpoints from its
    first step, with ComfyUI's model loaded whole before it looks, and its curves say so."""
    import zerase_core.memory_fit as memory_fit

    loaded = []

    def nothing_free(device):
        import comfy.model_management as mm

        loaded.append([type(m.model.model).__name__ for m in mm.current_loaded_models if m.model is not None])
        return 0

    monkeypatch.setattr(memory_fit, "available_bytes", nothing_free)
    with torch.inference_mode():
        pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                    **_train_inputs(steps=2, save_name="small_card"))
    assert len(loaded) == 1 and "Lumina2" in loaded[0]  # asked once, with the diffusion model loaded
    first_line = titles[-1].split("\n")[0]
    # nothing fits: as many as "on", all but the last of 2
    assert first_line.endswith(", checkpointing 1/2 layers from step 1 (too little memory free without it)")


def test_a_saved_file_is_named_as_apply_lists_it_wherever_it_links(pack, loras_dir, tmp_path):
    """What Train and Merge show of a file they saved or reused: a numbered version that links out of the folder (a
    shared store) turned a reuse into a ValueError; a display name never fails a run."""
    listed = _train_module().listed
    store = tmp_path / "store"
    store.mkdir()
    (store / "cat.safetensors").write_bytes(b"")
    (loras_dir / "zerase").mkdir(exist_ok=True)
    link = loras_dir / "zerase" / "cat_001.safetensors"
    link.symlink_to(store / "cat.safetensors")
    assert listed(link) == "zerase/cat_001.safetensors"  # as Apply lists it, not where it links
    assert listed(store / "cat.safetensors") == "cat.safetensors"  # not under the folder: its own name


def test_the_step_text_is_sent_at_most_twice_a_second_and_at_the_last_step(pack, monkeypatch):
    """A step of the tiny model takes milliseconds: a message per step would flood every open page's socket."""
    from types import SimpleNamespace

    from zerase_core.history import StepRecord

    told, clock = node_texts(monkeypatch), iter([0.0, 0.1, 0.2, 0.6, 0.7, 0.8])
    module = _train_module()
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=lambda: next(clock)))  # the node's clock only
    tell = module._progress_text("7", steps=6)
    for step in range(1, 7):
        tell(StepRecord(step, 0.25, 0.0123, 1e-4, 0.5, 0.0, 0.6, 0.01), None)
    assert [(node, text.split(" · ")[0]) for node, text in told] == [("7", "step 1/6"), ("7", "step 4/6"),
                                                                     ("7", "step 6/6")]
    assert told[-1][1] == "step 6/6 · L_erase 0.25 · L_attn 0.0123 · L_pr 0.0001 · λ 0.5"


def test_an_epsilon_of_zero_is_kept_and_only_a_negative_one_takes_the_presets(pack):
    """The widget's -1 means the preset's ε; 0 is a tolerance the user typed (no preservation loss allowed)."""
    build = _train_module().build_config
    fixed = dict(concept="cat", preset="entity", templates="", preserve="dog", steps=2, learning_rate=1e-3,
                 beta=0.1, eta=2.0, rank=2, targets="q,k,v", resolution=64, seed=0,
                 gradient_checkpointing="off", xt_source="pool", shift=3.0)
    assert build(epsilon=0.0, **fixed).epsilon == 0.0
    assert build(epsilon=-1.0, **fixed).epsilon is None


def test_the_viewer_measures_and_draws_a_latent_batchs_first_image(pack):
    """A LATENT of two images (a KSampler's batch) is drawn from its first, as the node says (a mutation audit: handing
    on the whole batch, which fails with "one index list per sample is needed", failed no test)."""
    viewer = pack["ZEraseAttentionMaps"]
    model, clip = tiny_zimage(comfy), tiny_clip(comfy)
    batch = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    args = dict(model=model, clip=clip, prompt="a photo of a cat", words="cat", sigmas="0.5", layer_start=0,
                layer_end=-1, seed=0)
    (both,) = viewer.execute(latent={"samples": batch}, **args)
    (first,) = viewer.execute(latent={"samples": batch[:1]}, **args)
    assert torch.equal(both, first)


# From a mutation audit of the nodes' own code: each test below pins a behaviour that a single change to that code
# broke without failing any test.


def _node_module(name: str):
    """The pack's nodes/<name>.py as ComfyUI imported it (under custom_nodes.<folder>)."""
    import sys

    return next(mod for n, mod in sys.modules.items() if n.endswith(f".nodes.{name}"))


def _zimage_vae():
    """ComfyUI's VAE class as it reads Z-Image's ae.safetensors (16 channels, four levels: its x4 upscaler's has
    three), its weights seeded: ComfyUI leaves those a file did not hold uninitialised."""
    vae = comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.randn(512, 16, 3, 3),
                           "encoder.down.2.downsample.conv.weight": torch.randn(512, 512, 3, 3)})
    torch.manual_seed(0)
    for p in vae.first_stage_model.parameters():
        p.data.normal_(0, 0.02)
    return vae


def test_apply_offers_none_first_and_load_every_file_taking_the_lists_first_when_none_is_ours(pack, loras_dir):
    """Apply's list is "(none)" (its default: a connected LoRA needs no file) and then every file; Load's is every file
    and nothing else, a new node taking the first Train or Merge saved, else the list's first, as ComfyUI's own
    combos do. Without "(none)" in the shared list, Load dropped the first file and Apply's default was no option."""
    (loras_dir / "a_stock_lora.safetensors").write_bytes(b"")
    (loras_dir / "b_stock_lora.safetensors").write_bytes(b"")
    comfy.folder_paths.filename_list_cache.clear()
    apply_choice = pack["ZEraseApplyLoRA"].define_schema().inputs[1]
    load_choice = pack["ZEraseLoadLoRA"].define_schema().inputs[0]
    files = ["a_stock_lora.safetensors", "b_stock_lora.safetensors"]
    assert (apply_choice.options, apply_choice.default) == (["(none)", *files], "(none)")
    assert (load_choice.options, load_choice.default) == (files, "a_stock_lora.safetensors")


def test_node_text_goes_to_the_node_with_an_id_and_nowhere_without_one(pack, loras_dir, monkeypatch):
    """ComfyUI run as a library (no executor) gives a node no id: its text has no node to go to and is not sent
    (ComfyUI's server sends it to a node named "None", str(None)); with an id, to that node only."""
    told, merge = node_texts(monkeypatch), pack["ZEraseMergeLoRAs"]
    inputs = dict(lora_1=random_lora(3), lora_2=random_lora(4), weights="", rank=0, save_name="")
    monkeypatch.setattr(merge, "hidden", io.HiddenHolder.from_dict({}), raising=False)
    merge.execute(**inputs)
    assert told == []
    monkeypatch.setattr(merge, "hidden", io.HiddenHolder.from_dict({io.Hidden.unique_id: "7"}), raising=False)
    (_, report) = merge.execute(**inputs)
    assert told == [("7", report)]


def test_typed_lists_take_semicolons_and_refuse_what_is_no_number_under_the_nodes_name(pack):
    """Merge's weights and the viewer's sigmas (and words) are lists typed into a text widget: ';' separates as ','
    does, and an item that is not a number is told as that input's, under the node's name, before any work (a bare
    ValueError would reach the user as a traceback)."""
    merge, a, b = pack["ZEraseMergeLoRAs"], random_lora(3, concept="cat"), random_lora(4, concept="dog")
    semicolons, _ = merge.execute(lora_1=a, lora_2=b, weights="1; 3", rank=0, save_name="")
    key = (1, "k")
    torch.testing.assert_close(semicolons.delta_weight(key), a.delta_weight(key) + 3 * b.delta_weight(key))
    with pytest.raises(ZEraseError, match=r"^Merge Erasure LoRAs: weights must be comma-separated values, e\.g\. "):
        merge.execute(lora_1=a, lora_2=b, weights="1, half", rank=0, save_name="")
    with pytest.raises(ZEraseError, match=r"^Attention Map Viewer: sigmas must be comma-separated values"):
        pack["ZEraseAttentionMaps"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), prompt="a cat",
                                            words="cat", sigmas="0.5, high", layer_start=0, layer_end=-1, seed=0,
                                            latent={"samples": torch.randn(1, 16, 8, 8)})


def test_files_are_saved_under_the_first_loras_folder(pack, loras_dir):
    """With several loras folders (extra_model_paths.yaml) files go to the first's zerase/ (README): ComfyUI looks a
    name up in the folders in order, so a file saved in a later one is shadowed by one of its name in the first."""
    later = loras_dir.parent / "more_loras"
    later.mkdir()
    comfy.folder_paths.folder_names_and_paths["loras"][0][:] = [str(loras_dir), str(later)]  # the fixture restores
    _, report = pack["ZEraseMergeLoRAs"].execute(lora_1=random_lora(3), lora_2=random_lora(4), weights="", rank=0,
                                                 save_name="both")
    assert report.endswith("; saved zerase/both.safetensors")
    assert (loras_dir / "zerase" / "both.safetensors").is_file() and not (later / "zerase").exists()


def test_a_connected_lora_overrides_the_file_choice(pack, loras_dir):
    """Apply's erasure_lora wins over lora_name (its tooltip: "Overrides the file"): the file is not read, so a file
    that fits, one of another model or one no longer there all give the connected LoRA's model."""
    apply, model, clip = pack["ZEraseApplyLoRA"], tiny_zimage(comfy), tiny_clip(comfy)
    save_lora(random_lora(1), loras_dir / "native.safetensors")
    save_lora(random_lora(2, dim=64), loras_dir / "small.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    pos, neg, lat, connected = encode(clip, "a photo of a cat"), encode(clip, ""), empty_latent(), random_lora(5)

    def sampled(lora_name):
        (erased,) = apply.execute(model=model, lora_name=lora_name, strength=1.0, erasure_lora=connected)
        return ksample(comfy, erased, pos, neg, lat, seed=1)

    expected = sampled("(none)")
    for name in ("native.safetensors", "small.safetensors", "gone.safetensors"):
        assert torch.equal(sampled(name), expected), name


def test_a_vae_of_more_latent_channels_than_z_images_is_refused_too(pack, loras_dir, monkeypatch):
    """Not only fewer channels (SD's 4): Flux 2's VAE (128-channel latents, ComfyUI's class as it reads that file's
    keys) is another model's too, refused before any forward instead of failing in the decode."""
    from zerase_core.backends.comfy_zimage import ComfyZImageBackend

    flux2 = comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.randn(512, 32, 3, 3), "bn.running_mean": torch.zeros(128)})
    assert flux2.latent_channels == 128
    monkeypatch.setattr(_train_module().ZEraseTrainer, "__init__", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(ComfyZImageBackend, "attention_maps", lambda *a, **k: pytest.fail("a forward ran"))
    told = "this VAE takes 128-channel latents and Z-Image's have 16"
    with pytest.raises(ZEraseError, match=f"^Z-Erase Train: {told}"):
        pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), vae=flux2, **_train_inputs())
    with pytest.raises(ZEraseError, match=f"^Attention Map Viewer: {told}"):
        pack["ZEraseAttentionMaps"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy), prompt="a cat",
                                            words="cat", sigmas="0.5", layer_start=0, layer_end=-1, seed=0,
                                            latent={"samples": torch.randn(1, 16, 8, 8)}, vae=flux2)


def test_compare_heads_its_columns_and_rows_and_captions_the_prompt(pack, monkeypatch):
    """The columns are headed by the two labels in input order, the rows by batch index from 0 ("batch i", README),
    none for a single row, and the prompt is the caption: the pixel tests see only the pictures, not the text."""
    module, drawn = _node_module("compare"), []
    real_grid = module.render.grid

    def grid(rows, columns, labels=(), caption=""):
        drawn.append((len(rows), list(columns), list(labels), caption))
        return real_grid(rows, columns, labels, caption=caption)

    monkeypatch.setattr(module.render, "grid", grid)
    pics = torch.rand(2, 16, 16, 3)
    for batch in (pics, pics[:1]):
        pack["ZEraseCompare"].execute(original=batch, erased=batch.flip(0), prompt="a photo of a cat",
                                      label_original="before", label_erased="after")
    assert drawn == [(2, ["before", "after"], ["batch 0", "batch 1"], "a photo of a cat"),
                     (1, ["before", "after"], [], "a photo of a cat")]


def test_a_negative_strength_applies_the_lora_reversed(pack):
    """Apply's strength runs from -20 to 20 (README: ±20); below 0 the LoRA's change is subtracted: +0.5 and -0.5
    stacked sample as the model alone, and -0.5 alone as neither the model nor +0.5 (a negative strength passed the
    model through unpatched, or applied at its size, and no test failed)."""
    apply = pack["ZEraseApplyLoRA"]
    strength = next(i for i in apply.define_schema().inputs if i.id == "strength")
    assert (strength.min, strength.max) == (-20.0, 20.0)
    model, clip, lora = tiny_zimage(comfy), tiny_clip(comfy), random_lora(1)
    pos, neg, lat = encode(clip, "a photo of a cat"), encode(clip, ""), empty_latent()

    def applied(base, s):
        return apply.execute(model=base, lora_name="(none)", strength=s, erasure_lora=lora)[0]

    original, plus, minus, undone = (ksample(comfy, m, pos, neg, lat, seed=1) for m in (
        model, applied(model, 0.5), applied(model, -0.5), applied(applied(model, 0.5), -0.5)))
    torch.testing.assert_close(undone, original, rtol=1e-4, atol=1e-4)
    assert (minus - original).abs().max() > 1e-2 and (minus - plus).abs().max() > 1e-2


def test_merge_takes_its_third_and_fourth_loras_and_saves_nothing_under_a_blank_name(pack, loras_dir):
    """lora_3 and lora_4 count in the merge, 1/4 each by default; a save name of spaces is empty (README: empty =
    don't save), not a name to refuse or save under."""
    loras = [random_lora(seed, concept=c) for seed, c in enumerate(("cat", "dog", "cow", "owl"), start=3)]
    merged, report = pack["ZEraseMergeLoRAs"].execute(lora_1=loras[0], lora_2=loras[1], lora_3=loras[2],
                                                      lora_4=loras[3], weights="", rank=0, save_name="  ")
    assert report == "merged 4 LoRAs, rank 8, relative error 0" and merged.concept == "cat + dog + cow + owl"
    key = (1, "v")
    torch.testing.assert_close(merged.delta_weight(key), sum(lora.delta_weight(key) for lora in loras) / 4)
    assert not (loras_dir / "zerase").exists()


def test_a_new_nodes_inputs_start_at_the_defaults_the_readme_documents(pack):
    """README's node reference gives these defaults (Train's paper settings, resume off, ε -1 = the preset's; Merge's
    rank 0 = exact; the viewer's layers 0 to -1 = all): a workflow made from a new node runs with them."""
    def defaults(node, names):
        inputs = {i.id: i for i in pack[node].define_schema().inputs}
        return {name: inputs[name].default for name in names}

    train = dict(preset="entity", templates="", preserve="", steps=1000, learning_rate=1e-3, beta=0.1, eta=2.0,
                 epsilon=-1.0, rank=16, targets="q,k,v", resolution=512, save_name="", gradient_checkpointing="auto",
                 resume=False, xt_source="pool")
    assert defaults("ZEraseTrain", train) == train
    assert defaults("ZEraseApplyLoRA", ["lora_name", "strength"]) == {"lora_name": "(none)", "strength": 1.0}
    assert defaults("ZEraseMergeLoRAs", ["weights", "rank", "save_name"]) == {"weights": "", "rank": 0, "save_name": ""}
    assert defaults("ZEraseAttentionMaps", ["layer_start", "layer_end"]) == {"layer_start": 0, "layer_end": -1}


def test_the_viewers_seed_noise_levels_and_layers_reach_both_models_maps_and_a_difference_row(pack, monkeypatch):
    """Every map is measured at the seed, every noise level and the layers from layer_start to layer_end as typed,
    for model_b as for model; with model_b the picture has a third row, A - B (only the first level, layer 0 or a
    fixed seed gave pictures no test told apart)."""
    module, measured, drawn = _node_module("attention_maps"), [], []
    real_maps, real_grid = module.word_maps, module.render.grid

    def word_maps(backend, encoded, columns, x0, sigmas, seed, layers):
        measured.append((list(sigmas), seed, sorted(layers)))
        return real_maps(backend, encoded, columns, x0, sigmas, seed, layers)

    def grid(rows, columns, labels=(), caption=""):
        drawn.append((len(rows), list(labels)))
        return real_grid(rows, columns, labels, caption=caption)

    monkeypatch.setattr(module, "word_maps", word_maps)
    monkeypatch.setattr(module.render, "grid", grid)
    inputs = dict(clip=tiny_clip(comfy), prompt="a photo of a cat", words="cat", sigmas="0.3; 0.7", layer_start=1,
                  layer_end=-1, seed=5, latent={"samples": torch.randn(1, 16, 8, 8)})
    model = tiny_zimage(comfy)
    pack["ZEraseAttentionMaps"].execute(model=model, **inputs)
    pack["ZEraseAttentionMaps"].execute(model=model, model_b=tiny_zimage(comfy, seed=1), **inputs)
    assert measured == [([0.3, 0.7], 5, [1])] * 3
    assert drawn == [(1, ["model"]), (3, ["model A", "model B", "A - B"])]


def test_the_viewer_measures_an_images_first_picture_and_draws_it_as_given(pack, monkeypatch):
    """An IMAGE batch (a sampler's, decoded) is measured on its first picture, as a LATENT batch is, and drawn from its
    pixels, with no VAE decode (a second, lossy copy, seconds on the real VAE); a LATENT with a VAE is decoded once.
    An IMAGE needs a VAE to be measured: without one, or with neither input, the node says what to connect."""
    viewer, vae = pack["ZEraseAttentionMaps"], _zimage_vae()
    decoded, real_decode = [], vae.decode
    monkeypatch.setattr(vae, "decode", lambda samples: decoded.append(samples.shape) or real_decode(samples))
    inputs = dict(model=tiny_zimage(comfy), clip=tiny_clip(comfy), prompt="a photo of a cat", words="cat",
                  sigmas="0.5", layer_start=0, layer_end=-1, seed=0)
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (both,) = viewer.execute(**inputs, image=images, vae=vae)
    (first,) = viewer.execute(**inputs, image=images[:1].clone(), vae=vae)
    assert torch.equal(both, first) and decoded == []
    viewer.execute(**inputs, latent={"samples": torch.randn(2, 16, 8, 8)}, vae=vae)
    assert decoded == [(1, 16, 8, 8)]
    for missing in (dict(image=images), {}):
        with pytest.raises(ZEraseError, match=r"^Attention Map Viewer: connect a LATENT, or an IMAGE together with a "
                                              r"VAE\.$"):
            viewer.execute(**inputs, **missing)


def test_train_reads_its_text_inputs_without_spaces_around_them_or_blank_template_lines(pack):
    """The concept, each template line and each preservation concept are read without the spaces around them, and a
    blank line of the templates (one typed after the last) is no template: refused as holding no concept, it failed
    the run; a concept " cat" was another setting than "cat" (no reuse) and the file's concept read " cat"."""
    build = _train_module().build_config
    fixed = dict(preset="entity", steps=2, learning_rate=1e-3, beta=0.1, eta=2.0, epsilon=-1.0, rank=2,
                 targets="q,k,v", resolution=64, seed=0, gradient_checkpointing="off", xt_source="pool", shift=3.0)
    config = build(concept="  cat ", templates="A photo of {}\n  \na painting of {} \n\n", preserve=" dog ;person,",
                   **fixed)
    assert config.concept == "cat" and config.preserve == ("dog", "person")
    assert config.templates == ("A photo of {}", "a painting of {}")
    assert build(concept="cat", templates=" \n", preserve="", **fixed).templates == ()  # blank: the preset's


def test_train_releases_its_text_encoder_and_its_erased_model_is_applys_at_strength_1(pack, loras_dir, monkeypatch):
    """The prompts are encoded once and the run lets the CLIP go before its steps (README: "then is released"; the
    memory is the x_t pool's and the LoRA's); the erased MODEL is the LoRA applied as Apply applies it at strength 1."""
    train, trainer_class = pack["ZEraseTrain"], _train_module().ZEraseTrainer
    held, real_step = [], trainer_class.train_step
    monkeypatch.setattr(trainer_class, "train_step", lambda self: held.append(self.backend.clip) or real_step(self))
    with torch.inference_mode():
        model, clip = tiny_zimage(comfy, inference_tensors=True), tiny_clip(comfy)
        lora, erased, *_ = train.execute(model=model, clip=clip, **_train_inputs(steps=1, learning_rate=1e-2))
        (applied,) = pack["ZEraseApplyLoRA"].execute(model=model, lora_name="(none)", strength=1.0, erasure_lora=lora)
    assert held == [None]
    pos, neg, lat = encode(clip, "a photo of a cat"), encode(clip, "blurry"), empty_latent()
    original, trained, expected = (ksample(comfy, m, pos, neg, lat, seed=3, cfg=2.0) for m in (model, erased, applied))
    assert torch.equal(trained, expected) and not torch.equal(trained, original)


def test_a_run_that_fails_in_its_first_step_saves_nothing(pack, loras_dir, monkeypatch):
    """An error before any step is done (here a RuntimeError; out of memory, a NaN in step 1) leaves no LoRA file:
    one saved there would be the untrained LoRA, the model unchanged under an erasure's name."""
    trainer_class = _train_module().ZEraseTrainer

    def failing_step(self):
        raise RuntimeError("the first step failed")

    monkeypatch.setattr(trainer_class, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="the first step failed"):
        pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                    **_train_inputs(steps=3, save_name="failed"))
    assert not list((loras_dir / "zerase").glob("*.safetensors"))


def test_a_cancel_seen_between_the_pools_batches_is_comfyuis_interrupt(pack, loras_dir):
    """Cancel while the x_t pool is sampled, seen by the pool between two batches of trajectories (not by one of
    ComfyUI's ops, which raises the interrupt itself, nor by a progress hook that raises): the pool's own stop
    reaches ComfyUI as its interrupt, which the UI shows as a cancel, not as the node's error; nothing is saved."""
    mm, utils = comfy.mm, comfy.utils
    seen = []

    def hook(value, total, preview, node_id=None):  # a Cancel pressed after the first of the pool's 4 batches
        seen.append((value, total))
        if (value, total) == (8, 32):
            mm.interrupt_current_processing(True)

    old = utils.PROGRESS_BAR_HOOK
    utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            pack["ZEraseTrain"].execute(model=tiny_zimage(comfy), clip=tiny_clip(comfy),
                                        **_train_inputs(steps=5, save_name="early"))
    finally:
        utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert seen == [(8, 32)] and not list(loras_dir.rglob("*.safetensors"))


def test_trains_previews_draw_the_sampled_x0_as_a_latent_holds_it(pack, monkeypatch):
    """before_after samples x0 in the model's space; the previews draw it as a LATENT holds it (VAE space), the space
    the decode (and the cheap preview) takes, as a sampler's output goes to VAE Decode."""
    from zerase_core.backends.comfy_zimage import ComfyZImageBackend

    module, render = _train_module(), _node_module("_render")
    model, gen = tiny_zimage(comfy), torch.Generator().manual_seed(0)
    x0s = [torch.randn(1, 16, 8, 8, generator=gen) for _ in range(2)]
    monkeypatch.setattr(module, "before_after", lambda backend, prompt, config: iter(x0s))
    backend = ComfyZImageBackend(model, tiny_clip(comfy))
    (prompt,) = backend.encode(["a photo of a cat"])
    config = module.build_config("cat", "entity", "", "", 2, 1e-3, 0.1, 2.0, -1.0, 2, "q,k,v", 64, 0, "off", "pool",
                                 3.0)
    pictures = module._previews(backend, prompt, model, None, config)
    for column, x0 in enumerate(x0s):  # 64 px cells below the 18 px label strip
        expected = render.latent_preview(model, model.model.process_latent_out(x0))[0].clamp(0, 1)
        torch.testing.assert_close(pictures[0, 18:82, 64 * column:64 * (column + 1)], expected, rtol=0,
                                   atol=0.5 / 255)


def test_a_reused_runs_previews_show_its_lora(pack, loras_dir, tmp_path, monkeypatch):
    """Queued again, a finished run's previews are drawn as a trained run's are: "after" with the file's LoRA on
    (without it, "before" twice, the same bits: the model unchanged). The file's LoRA is made strong enough to move
    the tiny model's picture by a few of 255 levels (the one step trained moves it by none)."""
    import dataclasses

    model, clip = _known_by_their_files(tmp_path)  # so a repeat is reused
    with torch.inference_mode():
        pack["ZEraseTrain"].execute(model=model, clip=clip, **_train_inputs(steps=1, save_name="strong"))
    path = loras_dir / "zerase" / "strong.safetensors"
    trained, strong = load_lora(path), random_lora(7)
    factors = {key: (strong.factors[key][0], 10 * strong.factors[key][1]) for key in trained.factors}
    save_lora(dataclasses.replace(trained, factors=factors), path)
    monkeypatch.setattr(_train_module().ZEraseTrainer, "__init__", lambda *a, **k: pytest.fail("trained again"))
    with torch.inference_mode():
        previews = pack["ZEraseTrain"].execute(model=model, clip=clip, **_train_inputs(steps=1, save_name="strong"))[3]
    before, after = previews[0, 18:82, :64], previews[0, 18:82, 64:128]
    assert not torch.equal(before, after)
