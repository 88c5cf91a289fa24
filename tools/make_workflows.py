"""Writes the shipped workflows (UI and API format) from one description each.

    python tools/make_workflows.py

Model file names are those of ComfyUI's own Z-Image Turbo template: z_image_turbo_bf16.safetensors
(diffusion_models), qwen_3_4b.safetensors (text_encoders, CLIPLoader type lumina2), ae.safetensors (vae).
Outputs: workflows/<name>.json (UI), which ComfyUI's template browser lists for the pack, and
workflows/api/<name>.json (API), which it does not (it reads only a template folder's own files).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNET, CLIP, VAE = "z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors"
# Where the frontend's missing-model dialog downloads them from (ComfyUI's own Z-Image Turbo blueprints' addresses).
FILES = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files"
MODELS = {"UNETLoader": (UNET, "diffusion_models"), "CLIPLoader": (CLIP, "text_encoders"), "VAELoader": (VAE, "vae")}
# Which pack each node comes from and its version, as the frontend and ComfyUI-Manager read them (missing nodes).
PACK = ("z-erase", re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1])
CORE = ("comfy-core", "0.18.1")  # the ComfyUI release the workflows are tested against
PROMPT = "A photo of a cat sitting on a wooden table, soft light"
SEED = 42

# Per node type: widget names in the order the frontend stores widgets_values, and output (name, type).
NODES = {
    "UNETLoader": (["unet_name", "weight_dtype"], [("MODEL", "MODEL")]),
    "CLIPLoader": (["clip_name", "type", "device"], [("CLIP", "CLIP")]),
    "VAELoader": (["vae_name"], [("VAE", "VAE")]),
    "ModelSamplingAuraFlow": (["shift"], [("MODEL", "MODEL")]),
    "CLIPTextEncode": (["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": (["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": (["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"], [("LATENT", "LATENT")]),
    "VAEDecode": ([], [("IMAGE", "IMAGE")]),
    "SaveImage": (["filename_prefix"], []),
    "PreviewImage": ([], []),
    "ZEraseTrain": (["concept", "preset", "templates", "preserve", "steps", "learning_rate", "beta", "eta", "epsilon",
                     "rank", "targets", "resolution", "seed", "save_name",
                     "gradient_checkpointing", "resume", "xt_source"],
                    [("erasure_lora", "ZERASE_LORA"), ("erased_model", "MODEL"), ("curves", "IMAGE"),
                     ("previews", "IMAGE")]),
    "ZEraseApplyLoRA": (["lora_name", "strength"], [("MODEL", "MODEL")]),
    "ZEraseLoadLoRA": (["lora_name"], [("erasure_lora", "ZERASE_LORA"), ("concept", "STRING")]),
    "ZEraseMergeLoRAs": (["weights", "rank", "save_name"], [("erasure_lora", "ZERASE_LORA"), ("report", "STRING")]),
    "ZEraseAttentionMaps": (["prompt", "words", "sigmas", "layer_start", "layer_end", "seed"], [("IMAGE", "IMAGE")]),
    "ZEraseCompare": (["prompt", "label_original", "label_erased"], [("IMAGE", "IMAGE")]),
}

# Per node type: its socket (non-widget) inputs, (name, type), in the order the node defines them. A UI node lists
# every one, linked or not, and a link's target_slot is its index there, as the frontend saves them.
SOCKETS = {
    "ModelSamplingAuraFlow": [("model", "MODEL")],
    "CLIPTextEncode": [("clip", "CLIP")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
    "SaveImage": [("images", "IMAGE")],
    "PreviewImage": [("images", "IMAGE")],
    "ZEraseTrain": [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")],
    "ZEraseApplyLoRA": [("model", "MODEL"), ("erasure_lora", "ZERASE_LORA")],
    "ZEraseMergeLoRAs": [(f"lora_{i}", "ZERASE_LORA") for i in range(1, 5)],
    "ZEraseAttentionMaps": [("model", "MODEL"), ("clip", "CLIP"), ("latent", "LATENT"), ("image", "IMAGE"),
                            ("vae", "VAE"), ("model_b", "MODEL")],
    "ZEraseCompare": [("original", "IMAGE"), ("erased", "IMAGE")],
}


# Node sizes as the frontend computes them (fitted to the sizes ComfyUI's own Z-Image Turbo blueprint stores: a
# socket row 20 px, a widget 24, a multiline text box about four widgets), so a node opens with every widget inside it.
NOTE_TYPE = "MarkdownNote"  # the frontend's own note node
WIDTHS = {"ZEraseTrain": 360, "CLIPTextEncode": 400, "ZEraseAttentionMaps": 360, "ZEraseCompare": 360,
          "SaveImage": 480, NOTE_TYPE: 400}
MULTILINE = {"CLIPTextEncode": {"text"}, "ZEraseTrain": {"templates"}, "ZEraseAttentionMaps": {"prompt"},
             "ZEraseCompare": {"prompt"}}
SHOWS_IMAGES = {"SaveImage": 360, "ZEraseTrain": 240}  # room for the images the node shows once it ran
TITLE, GAP_X, GAP_Y = 30, 60, 50  # the frontend draws a node's title bar above its pos


def _size(node_type: str) -> list[int]:
    widgets, outputs = NODES[node_type]
    rows = max(len(SOCKETS.get(node_type, [])), len(outputs))
    shown = len(widgets) + (node_type == "KSampler")  # the seed's control_after_generate
    boxes = len(MULTILINE.get(node_type, ()))
    height = 20 * rows + 6 + (8 + 24 * shown + 72 * boxes if shown else 0) + SHOWS_IMAGES.get(node_type, 0)
    return [WIDTHS.get(node_type, 320), height]

FILES_NOTE = ("Model files: z_image_turbo_bf16 (diffusion_models), qwen_3_4b (text_encoders), ae (vae), as in "
              "ComfyUI's own Z-Image Turbo template.")
TRAIN_NOTE = f"""## Z-Erase: train and compare

1. Set **concept** on Z-Erase Train (the word or phrase to erase), its **preset** (nsfw, style, entity, …) and
   **preserve** (what must stay, e.g. "person" when erasing "nude").
2. Queue. It trains 1000 steps (about 13 GiB of VRAM at 512²), saves `models/loras/zerase/<save_name>.safetensors`
   (save_name empty: named after the concept, here `zerase/cat.safetensors`, which the other workflows load) and
   shows its loss and λ curves and a before | after preview on the node.
3. The two samplers draw the prompt at one seed with the original and the erased model; Compare puts them side by side.

Queueing again with nothing changed reuses the saved LoRA. Cancel keeps the LoRA so far; turn **resume** on to
continue. {FILES_NOTE}"""
APPLY_NOTE = f"""## Z-Erase: apply and compare

Apply Erasure LoRA puts a trained erasure LoRA (from `models/loras/zerase/`) on any Z-Image model; stack several
by chaining the node. The two samplers draw the prompt at one seed with the original and the erased model, and
Compare puts them side by side. **strength** scales the erasure (1: as trained). {FILES_NOTE}"""
MERGE_NOTE = f"""## Z-Erase: merge several concepts

Load two to four erasure LoRAs, merge them into one (**weights** empty: 1/N each, the paper's; 1 each erases as the
LoRAs stacked do; **rank** 0 merges exactly, else re-ranks), optionally save it under **save_name**, and compare
the original and the erased model at one seed. {FILES_NOTE}"""
MAPS_NOTE = f"""## Z-Erase: attention maps

The Attention Map Viewer shows where the image attends to each of **words** (comma-separated words of the prompt) at
the chosen noise levels (**sigmas**) and layers, for the model and, wired into **model_b**, the erased model, with
their difference: an erased concept's map goes dark. {FILES_NOTE}"""


class Graph:
    def __init__(self, note: str):
        self.nodes: dict[str, dict] = {}
        self.titles: dict[str, str] = {}
        self.note = note  # what the workflow does and what to set, shown beside it (the frontend's note node)

    def add(self, node_type: str, title: str | None = None, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": node_type, "inputs": inputs}
        if title:
            self.titles[node_id] = title
        return node_id

    def api(self) -> dict:
        return {k: {**v, **({"_meta": {"title": self.titles[k]}} if k in self.titles else {})}
                for k, v in self.nodes.items()}

    def _positions(self) -> dict[str, list[int]]:
        """Column by column, left to right, each stacked top down in the order its nodes were added."""
        column = self._columns()
        columns = [[NOTE_TYPE]] + [[k for k in self.nodes if column[k] == c] for c in sorted(set(column.values()))]
        positions, x = {}, 60
        for members in columns:
            y = 60 + TITLE
            for node_id in members:
                positions[node_id] = [x, y]
                y += self._size(node_id)[1] + TITLE + GAP_Y
            x += max(self._size(k)[0] for k in members) + GAP_X
        return positions

    def _columns(self) -> dict[str, int]:
        """Loaders (nodes without inputs) in column 1 (0: the note), every other node as far right as the nodes that
        take its output allow: the original's and the erased model's samplers, decoders, stand side by side."""
        to_output = dict.fromkeys(self.nodes, 0)  # the longest path from the node to an output node
        for node_id in reversed(self.nodes):  # a node is added after those it takes inputs from
            for source in self._sources(node_id):
                to_output[source] = max(to_output[source], to_output[node_id] + 1)
        last = max(to_output.values())
        return {k: 1 + (last - to_output[k] if self._sources(k) else 0) for k in self.nodes}

    def _sources(self, node_id: str) -> list[str]:
        return [v[0] for v in self.nodes[node_id]["inputs"].values() if isinstance(v, list)]

    def _size(self, node_id: str) -> list[int]:
        return self._note_size() if node_id == NOTE_TYPE else _size(self.nodes[node_id]["class_type"])

    def _note_size(self) -> list[int]:
        lines = sum(1 + len(line) // 48 for line in self.note.splitlines())  # ~48 characters a line at 400 px
        return [WIDTHS[NOTE_TYPE], 40 + 22 * lines]

    def ui(self) -> dict:
        nodes, links, positions = [], [], self._positions()
        for n, (node_id, node) in enumerate(self.nodes.items()):
            widgets, outputs = NODES[node["class_type"]]
            sockets = SOCKETS.get(node["class_type"], [])
            inputs, values = [{"name": name, "type": typ, "link": None} for name, typ in sockets], []
            for name, value in node["inputs"].items():
                if isinstance(value, list):  # a link [from_id, slot]
                    src, slot = value
                    link_id, target = len(links) + 1, [socket for socket, _ in sockets].index(name)
                    out_type = NODES[self.nodes[src]["class_type"]][1][slot][1]
                    links.append([link_id, int(src), slot, int(node_id), target, out_type])
                    inputs[target]["link"] = link_id
            for name in widgets:
                values.append(node["inputs"][name])
                if name == "seed" and node["class_type"] == "KSampler":
                    values.append("fixed")  # control_after_generate, stored after the seed (ours declare none)
            nodes.append({
                "id": int(node_id), "type": node["class_type"], "pos": positions[node_id],
                "size": _size(node["class_type"]), "flags": {}, "order": n, "mode": 0, "inputs": inputs,
                "outputs": [{"name": name, "type": typ, "links": []} for name, typ in outputs],
                "properties": _properties(node["class_type"]), "widgets_values": values,
                **({"title": self.titles[node_id]} if node_id in self.titles else {}),
            })
        by_id = {node["id"]: node for node in nodes}
        for link_id, src, slot, *_ in links:
            by_id[src]["outputs"][slot]["links"].append(link_id)
        nodes.append({  # drawn by the frontend, never queued: not in the API format
            "id": len(nodes) + 1, "type": NOTE_TYPE, "pos": positions[NOTE_TYPE], "size": self._note_size(),
            "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [self.note],
        })
        return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
                "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _properties(node_type: str) -> dict:
    """A UI node's properties: its pack and version, its search name, and a loader's model file with its address."""
    cnr_id, ver = PACK if node_type.startswith("ZErase") else CORE
    properties = {"cnr_id": cnr_id, "ver": ver, "Node name for S&R": node_type}
    if node_type in MODELS:
        name, folder = MODELS[node_type]
        properties["models"] = [{"name": name, "url": f"{FILES}/{folder}/{name}", "directory": folder}]
    return properties


def base(g: Graph):
    """The stock Z-Image Turbo front half: loaders, shift 3, prompt, empty latent."""
    unet = g.add("UNETLoader", unet_name=UNET, weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name=CLIP, type="lumina2", device="default")
    vae = g.add("VAELoader", vae_name=VAE)
    model = g.add("ModelSamplingAuraFlow", model=[unet, 0], shift=3.0)
    pos = g.add("CLIPTextEncode", "Prompt", text=PROMPT, clip=[clip, 0])
    neg = g.add("CLIPTextEncode", "Negative (unused at cfg 1)", text="", clip=[clip, 0])
    latent = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    return model, clip, vae, pos, neg, latent


def sample(g: Graph, which: str, model, pos, neg, latent) -> str:
    """Z-Image Turbo's own sampling (8 steps, res_multistep, cfg 1) of the prompt at the shared seed."""
    return g.add("KSampler", f"Sample: {which}", model=[model, 0], positive=[pos, 0], negative=[neg, 0],
                 latent_image=[latent, 0], seed=SEED, steps=8, cfg=1.0, sampler_name="res_multistep",
                 scheduler="simple", denoise=1.0)


def sample_pair(g: Graph, original, erased, vae, pos, neg, latent, prefix: str):
    """original | erased at the same seed, decoded, as a labelled grid."""
    images = []
    for model, which in ((original, "original"), (erased, "erased")):
        s = sample(g, which, model, pos, neg, latent)
        images.append(g.add("VAEDecode", f"Decode: {which}", samples=[s, 0], vae=[vae, 0]))
    grid = g.add("ZEraseCompare", original=[images[0], 0], erased=[images[1], 0], prompt=PROMPT,
                 label_original="original", label_erased="erased")
    g.add("SaveImage", images=[grid, 0], filename_prefix=prefix)


def train_and_compare() -> Graph:
    g = Graph(TRAIN_NOTE)
    model, clip, vae, pos, neg, latent = base(g)
    train = g.add("ZEraseTrain", model=[model, 0], clip=[clip, 0], vae=[vae, 0], concept="cat", preset="entity",
                  templates="", preserve="dog", steps=1000, learning_rate=1e-3, beta=0.1, eta=2.0, epsilon=-1.0,
                  rank=16, targets="q,k,v", resolution=512, seed=0, save_name="",
                  gradient_checkpointing="auto", resume=False, xt_source="pool")  # curves, previews: on the node
    sample_pair(g, model, train, vae, pos, neg, latent, "zerase/train_compare")
    # the erased model is output 1 of Train
    for node in g.nodes.values():
        if node["class_type"] == "KSampler" and node["inputs"]["model"] == [train, 0]:
            node["inputs"]["model"] = [train, 1]
    return g


def apply_and_compare() -> Graph:
    g = Graph(APPLY_NOTE)
    model, clip, vae, pos, neg, latent = base(g)
    erased = g.add("ZEraseApplyLoRA", model=[model, 0], lora_name="zerase/cat.safetensors", strength=1.0)
    sample_pair(g, model, erased, vae, pos, neg, latent, "zerase/apply_compare")
    return g


def multi_concept_merge() -> Graph:
    g = Graph(MERGE_NOTE)
    model, clip, vae, pos, neg, latent = base(g)
    a = g.add("ZEraseLoadLoRA", lora_name="zerase/cat.safetensors")
    b = g.add("ZEraseLoadLoRA", lora_name="zerase/dog.safetensors")
    merged = g.add("ZEraseMergeLoRAs", lora_1=[a, 0], lora_2=[b, 0], weights="", rank=0, save_name="cat_dog")
    erased = g.add("ZEraseApplyLoRA", model=[model, 0], erasure_lora=[merged, 0], lora_name="(none)", strength=1.0)
    sample_pair(g, model, erased, vae, pos, neg, latent, "zerase/merge_compare")
    return g


def attention_maps() -> Graph:
    g = Graph(MAPS_NOTE)
    model, clip, vae, pos, neg, latent = base(g)
    erased = g.add("ZEraseApplyLoRA", model=[model, 0], lora_name="zerase/cat.safetensors", strength=1.0)
    s = sample(g, "original", model, pos, neg, latent)
    maps = g.add("ZEraseAttentionMaps", model=[model, 0], clip=[clip, 0], latent=[s, 0], vae=[vae, 0],
                 model_b=[erased, 0], prompt=PROMPT, words="cat, table", sigmas="0.3, 0.6", layer_start=0,
                 layer_end=-1, seed=0)
    g.add("SaveImage", images=[maps, 0], filename_prefix="zerase/attention_maps")
    return g


WORKFLOWS = {
    "zerase_train_and_compare": train_and_compare,
    "zerase_apply_and_compare": apply_and_compare,
    "zerase_multi_concept_merge": multi_concept_merge,
    "zerase_attention_maps": attention_maps,
}


def main() -> None:
    for name, build in WORKFLOWS.items():
        g = build()
        for folder, data in ((ROOT / "workflows", g.ui()), (ROOT / "workflows" / "api", g.api())):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
