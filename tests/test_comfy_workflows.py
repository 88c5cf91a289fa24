"""Every shipped workflow: node types known to ComfyUI + this pack, UI and API forms agree, and the
API form runs end to end on tiny models (loaders swapped for the tiny fixture; the VAE for a
latent-preview stand-in, since no tiny Z-Image VAE can be built without weights)."""

import asyncio
import json

import pytest
from comfy_support import REPO, node_texts, require_comfyui, tiny_clip, tiny_zimage

comfy = require_comfyui()
import torch  # noqa: E402

from test_comfy_nodes import _train_module, loras_dir, random_lora  # noqa: E402,F401  (fixture reuse)
from zerase_core.lora_file import save_lora  # noqa: E402

NAMES = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))


@pytest.fixture(scope="module")
def mappings():
    import nodes
    from comfy_extras import nodes_model_advanced, nodes_sd3  # noqa: F401

    assert asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))
    table = dict(nodes.NODE_CLASS_MAPPINGS)
    table["ModelSamplingAuraFlow"] = nodes_model_advanced.ModelSamplingAuraFlow
    table["EmptySD3LatentImage"] = nodes_sd3.EmptySD3LatentImage
    return table


class _StandInVAE:
    """Decodes through the model's latent→RGB preview factors (no tiny Z-Image VAE can be built without weights)."""

    def __init__(self, model):
        import sys

        self.model = model
        self.render = next(mod for n, mod in sys.modules.items() if n.endswith(".nodes._render"))

    def decode(self, samples):
        return self.render.latent_preview(self.model, samples)

    def encode(self, pixels):
        b, h, w, _ = pixels.shape
        return torch.zeros(b, 16, h // 8, w // 8)


def _run(graph: dict, table: dict, model, clip, images: list):
    cache = {}

    def out(node_id):
        if node_id in cache:
            return cache[node_id]
        node = graph[node_id]
        kind, raw = node["class_type"], node["inputs"]
        args = {k: (out(v[0])[v[1]] if isinstance(v, list) else v) for k, v in raw.items()}
        if kind == "UNETLoader":
            result = (model,)
        elif kind == "CLIPLoader":
            result = (clip,)
        elif kind == "VAELoader":
            result = (_StandInVAE(model),)
        elif kind in ("SaveImage", "PreviewImage"):
            images.append(args["images"])
            result = ()
        else:
            cls = table[kind]
            if hasattr(cls, "define_schema"):
                result = cls.execute(**args).args
            else:
                result = getattr(cls(), cls.FUNCTION)(**args)
        cache[node_id] = result
        return result

    for node_id in graph:
        out(node_id)


def _shrink(graph: dict) -> dict:
    """Same graph, toy sizes: 64 px, 2 sampling steps, 2 training steps."""
    for node in graph.values():
        i = node["inputs"]
        if node["class_type"] == "EmptySD3LatentImage":
            i.update(width=64, height=64)
        if node["class_type"] == "KSampler":
            i.update(steps=2)
        if node["class_type"] == "ZEraseTrain":
            i.update(steps=2, resolution=64, rank=2)
    return graph


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_consistent(name, mappings):
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    missing = {n["class_type"] for n in api.values()} - set(mappings)
    assert not missing, f"unknown node types {missing}"
    assert {str(n["id"]) for n in _queued(ui)} == set(api)
    assert {n["type"] for n in _queued(ui)} == {n["class_type"] for n in api.values()}
    assert [n["type"] for n in ui["nodes"] if n not in _queued(ui)] == ["MarkdownNote"]  # what to set, beside it
    for node in api.values():  # model files are those of ComfyUI's Z-Image Turbo template
        i = node["inputs"]
        if node["class_type"] == "UNETLoader":
            assert i["unet_name"] == "z_image_turbo_bf16.safetensors"
        if node["class_type"] == "CLIPLoader":
            assert (i["clip_name"], i["type"]) == ("qwen_3_4b.safetensors", "lumina2")
        if node["class_type"] == "VAELoader":
            assert i["vae_name"] == "ae.safetensors"


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _queued(ui: dict) -> list[dict]:
    """The UI nodes ComfyUI runs: all but the frontend's note, which it only draws."""
    return [node for node in ui["nodes"] if node["type"] != "MarkdownNote"]


def _widget_names(cls) -> list[str]:
    """Widget names in the order the frontend stores ``widgets_values``; its rule for INT inputs adds a control
    widget (stored right after the value) when ``control_after_generate`` is set or, unset, the name is a seed's."""
    names = []
    for section in ("required", "optional"):
        for name, entry in cls.INPUT_TYPES().get(section, {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            names.append(name)
            control = opts.get("control_after_generate")
            if kind == "INT" and (name in ("seed", "noise_seed") if control is None else control):
                names.append(f"{name}:control")
    return names


def _socket_names(cls) -> list[str]:
    """The node's non-widget inputs (required, then optional) in the order it defines them: the slots of its UI
    node."""
    return [name for section in ("required", "optional") for name, entry in cls.INPUT_TYPES().get(section, {}).items()
            if not (isinstance(entry[0], list) or entry[0] in WIDGET_TYPES) or (entry[1:] or [{}])[0].get("forceInput")]


@pytest.mark.parametrize("name", NAMES)
def test_ui_nodes_list_every_socket_and_links_land_on_their_own(name, mappings):
    """As the frontend saves a node: every socket, linked or not, in the node's order, and a link's target_slot is
    its socket's index (listing only the linked ones left an unlinked IMAGE socket out of the Viewer, and shifted
    the slots after it onto other sockets)."""
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    by_id = {node["id"]: node for node in ui["nodes"]}
    for node in _queued(ui):
        assert [i["name"] for i in node["inputs"]] == _socket_names(mappings[node["type"]]), node["type"]
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        socket = by_id[dst]["inputs"][dst_slot]
        assert socket["link"] == link_id and socket["type"] == typ == by_id[src]["outputs"][src_slot]["type"]
        assert api[str(dst)]["inputs"][socket["name"]] == [str(src), src_slot]
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
    assert sorted(i["link"] for n in ui["nodes"] for i in n["inputs"] if i["link"]) == [link[0] for link in ui["links"]]


@pytest.mark.parametrize("name", NAMES)
def test_ui_widget_values_line_up_with_the_node_schemas(name, mappings):
    """A value in the wrong slot loads silently (a save_name of 'True'): every slot must hold its widget's value."""
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    for node in _queued(ui):
        names = _widget_names(mappings[node["type"]])
        assert len(node["widgets_values"]) == len(names), (node["type"], names, node["widgets_values"])
        stored = dict(zip(names, node["widgets_values"]))
        for key, value in api[str(node["id"])]["inputs"].items():
            if not isinstance(value, list):  # links are not widgets
                assert stored[key] == value, (node["type"], key)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_headless_on_tiny_models(name, mappings, loras_dir):  # noqa: F811
    save_lora(random_lora(0, concept="cat"), loras_dir / "zerase" / "cat.safetensors")
    save_lora(random_lora(1, concept="dog"), loras_dir / "zerase" / "dog.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    graph = _shrink(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    images = []
    _run(graph, mappings, tiny_zimage(comfy), tiny_clip(comfy), images)
    assert images and all(img.ndim == 4 and img.shape[-1] == 3 and torch.isfinite(img).all() for img in images)


class _Server:
    """What PromptExecutor reports to: keeps the errors."""

    client_id = last_node_id = last_prompt_id = None

    def __init__(self):
        self.errors = []

    def send_sync(self, event, data, sid=None):
        if event == "execution_error":
            self.errors.append((data.get("node_type"), data.get("exception_message")))


def _stub_loader(table, monkeypatch, name: str, widgets: dict, kind: str, value) -> None:
    """A loader node of ComfyUI's name and widgets that hands out a tiny model instead of reading a file."""

    class Loader:
        RETURN_TYPES, FUNCTION = (kind,), "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {k: ([v],) for k, v in widgets.items()}}

        def load(self, **_):
            return (value,)

    monkeypatch.setitem(table, name, Loader)


def _stub_workflow_nodes(mappings, monkeypatch, model=None, clip=None, vae=None) -> None:
    """ComfyUI's loaders of the workflows' files, handing out the given stand-ins, and the core nodes they use."""
    import nodes

    for name, widgets, kind, value in [
        ("UNETLoader", {"unet_name": "z_image_turbo_bf16.safetensors", "weight_dtype": "default"}, "MODEL", model),
        ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}, "CLIP", clip),
        ("VAELoader", {"vae_name": "ae.safetensors"}, "VAE", vae),
    ]:
        _stub_loader(nodes.NODE_CLASS_MAPPINGS, monkeypatch, name, widgets, kind, value)
    for name in ("ModelSamplingAuraFlow", "EmptySD3LatentImage"):
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, name, mappings[name])


def test_an_empty_concept_is_refused_when_the_prompt_is_queued(mappings, loras_dir, monkeypatch):  # noqa: F811
    """ComfyUI validates a queued prompt before it runs any node: Train's empty concept is told then, once, under the
    concept input (it was told after the loaders had read the model and the text encoder, minutes on Z-Image)."""
    import execution
    import nodes

    _stub_workflow_nodes(mappings, monkeypatch)
    graph = _shrink(json.loads((REPO / "workflows" / "api" / "zerase_train_and_compare.json").read_text()))
    train_id = next(i for i, node in graph.items() if node["class_type"] == "ZEraseTrain")
    _stub_loader(nodes.NODE_CLASS_MAPPINGS, monkeypatch, "StringFromAnotherNode", {}, "STRING", "")
    graph["99"] = {"class_type": "StringFromAnotherNode", "inputs": {}}
    # a linked concept has no value yet when ComfyUI validates: it is checked when Train runs
    for concept, refused in [(" \u200b", True), ("cat", False), (["99", 0], False)]:
        graph[train_id]["inputs"]["concept"] = concept
        valid, _, _, node_errors = asyncio.run(execution.validate_prompt("1", graph, None))
        assert valid is not refused
        errors = node_errors.get(train_id, {}).get("errors", [])
        assert [(e["extra_info"]["input_name"], "The concept is empty" in e["details"]) for e in errors] == \
            [("concept", True)] * refused


def test_a_missing_lora_file_is_refused_when_the_prompt_is_queued(mappings, loras_dir, monkeypatch):  # noqa: F811
    """Apply with no file chosen and nothing connected, or a file that is not there, and Load with none to choose,
    were told after the loaders had read the model (minutes on Z-Image); now when the prompt is queued, once, under
    lora_name. A connected erasure LoRA overrides the file choice, which then need not exist."""
    import execution
    import nodes

    _stub_workflow_nodes(mappings, monkeypatch)
    save_lora(random_lora(1, concept="cat"), loras_dir / "zerase" / "cat.safetensors")
    save_lora(random_lora(1, concept="dog"), loras_dir / "zerase" / "dog.safetensors")
    comfy.folder_paths.filename_list_cache.clear()

    _stub_loader(nodes.NODE_CLASS_MAPPINGS, monkeypatch, "ComboFromAnotherNode", {}, "COMBO", "zerase/cat.safetensors")

    def refusals(name: str, node_type: str, **inputs) -> list[tuple[str, str]]:
        graph = _shrink(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
        graph["99"] = {"class_type": "ComboFromAnotherNode", "inputs": {}}
        node_id = next(i for i, node in graph.items() if node["class_type"] == node_type)
        graph[node_id]["inputs"] |= inputs
        for key in [k for k, v in inputs.items() if v is None]:
            del graph[node_id]["inputs"][key]
        _, _, _, node_errors = asyncio.run(execution.validate_prompt("1", graph, None))
        return [(e["extra_info"]["input_name"], e["details"]) for e in node_errors.get(node_id, {}).get("errors", [])]

    apply, merge = "zerase_apply_and_compare", "zerase_multi_concept_merge"
    assert refusals(apply, "ZEraseApplyLoRA") == []
    assert refusals(apply, "ZEraseApplyLoRA", lora_name="(none)") == [
        ("lora_name", "lora_name - Apply Erasure LoRA: choose a LoRA file or connect an erasure LoRA.")]
    assert refusals(apply, "ZEraseApplyLoRA", lora_name="zerase/gone.safetensors") == [
        ("lora_name", "lora_name - Apply Erasure LoRA: LoRA file 'zerase/gone.safetensors' is not in any loras "
                      "folder.")]
    assert refusals(merge, "ZEraseApplyLoRA") == []  # "(none)", with the merge connected
    assert refusals(merge, "ZEraseApplyLoRA", lora_name="zerase/gone.safetensors") == []  # overridden: not read
    assert refusals(merge, "ZEraseApplyLoRA", erasure_lora=None) == [
        ("lora_name", "lora_name - Apply Erasure LoRA: choose a LoRA file or connect an erasure LoRA.")]
    # a linked name has no value yet when ComfyUI validates (None): it is read when the node runs
    assert refusals(apply, "ZEraseApplyLoRA", lora_name=["99", 0]) == []
    assert refusals(merge, "ZEraseLoadLoRA", lora_name=["99", 0]) == []
    assert refusals(merge, "ZEraseLoadLoRA", lora_name="") == [
        ("lora_name", "lora_name - Load Erasure LoRA: there is no LoRA file to choose: train one with Z-Erase Train, "
                      "or put a Z-Erase LoRA into models/loras/ and refresh the page.")]


def test_workflows_run_through_comfyuis_executor(mappings, loras_dir, tmp_path, monkeypatch):  # noqa: F811
    """The shipped API workflows as ComfyUI queues them: validated (the 'zerase/…' file choices included), run by
    its PromptExecutor under inference mode, and cached: queueing train-and-compare again trains no step. Train
    shows each step's losses and λ on the node as progress text (the curves come only at the end)."""
    import execution

    told = node_texts(monkeypatch)
    train = _train_module()
    with torch.inference_mode():  # as ComfyUI's loaders leave them
        model, clip = tiny_zimage(comfy, inference_tensors=True), tiny_clip(comfy)
    _stub_workflow_nodes(mappings, monkeypatch, model, clip, _StandInVAE(model))
    saved_output = comfy.folder_paths.get_output_directory()
    comfy.folder_paths.set_output_directory(str(tmp_path / "output"))
    steps = []
    step = train.ZEraseTrainer.train_step
    monkeypatch.setattr(train.ZEraseTrainer, "train_step", lambda self: steps.append(1) or step(self))
    server = _Server()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"ram": 0})

    def queue(name: str, prompt_id: str) -> None:
        graph = _shrink(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, graph, None))
        assert valid, (name, error, node_errors)
        executor.execute(graph, prompt_id, {}, outputs)
        assert executor.success and not server.errors, (name, server.errors)

    try:
        queue("zerase_train_and_compare", "1")
        assert len(steps) == 2 and (loras_dir / "zerase" / "cat.safetensors").is_file()
        graph = json.loads((REPO / "workflows" / "api" / "zerase_train_and_compare.json").read_text())
        train_id = next(i for i, node in graph.items() if node["class_type"] == "ZEraseTrain")
        texts = [text for node_id, text in told if node_id == train_id]  # the first step, and the last however soon
        assert [text.split(" · ")[0] for text in texts[:2]] == ["step 1/2", "step 2/2"] and len(told) == 3
        assert [part.split(" ")[0] for part in texts[1].split(" · ")[1:]] == ["L_erase", "L_attn", "L_pr", "λ"]
        assert texts[2] == "saved: zerase/cat.safetensors (2 of 2 steps)"  # the name Apply lists it by
        queue("zerase_train_and_compare", "2")
        assert len(steps) == 2  # nothing changed: ComfyUI's cache answered, no step was trained again
        save_lora(random_lora(1, concept="dog"), loras_dir / "zerase" / "dog.safetensors")
        comfy.folder_paths.filename_list_cache.clear()  # the files appeared after ComfyUI last listed them
        for prompt_id, name in enumerate(["zerase_apply_and_compare", "zerase_attention_maps",
                                          "zerase_multi_concept_merge"], start=3):
            queue(name, str(prompt_id))
        graph = json.loads((REPO / "workflows" / "api" / "zerase_multi_concept_merge.json").read_text())
        merge_id = next(i for i, node in graph.items() if node["class_type"] == "ZEraseMergeLoRAs")
        (shown_on, report), = told[3:]  # the report, seen on the Merge node though the workflow wires it nowhere
        assert shown_on == merge_id and report.startswith("merged 2 LoRAs, rank ")
        assert report.endswith("; saved zerase/cat_dog.safetensors")
    finally:
        comfy.folder_paths.set_output_directory(saved_output)
    assert len(list((tmp_path / "output").rglob("*.png"))) >= 4  # each workflow saved its comparison
