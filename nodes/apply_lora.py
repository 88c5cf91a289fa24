"""Apply Erasure LoRA: MODEL + erasure LoRA + strength -> MODEL (a patched clone)."""

from __future__ import annotations

from comfy_api.latest import io

from zerase_core.apply import check_applicable, install_lora
from zerase_core.backends.comfy_zimage import ComfyZImageBackend
from zerase_core.lora_file import STRENGTH_MAX

from .common import NONE, ErasureLoRAType, checked_choice, file_state, lora_files, pick_lora, told_as

NODE = "Apply Erasure LoRA"
_UNLINKED = object()  # validate_inputs' erasure_lora when nothing is connected to it


def apply_erasure(model, lora, strength: float, node: str = NODE):
    """A clone of ``model`` carrying ``lora`` gated to text tokens; ``model`` itself is untouched. At strength 0 the
    model itself, once the LoRA is checked to fit it (as ComfyUI's LoraLoader, no clone; a wrong choice still says
    so). ``node``: whose output the clone is, named in its refusals (in a sampler too)."""
    backend = ComfyZImageBackend(model, node=node)
    with told_as(node):
        if strength == 0:
            check_applicable(backend, lora)
            return model
        install_lora(backend, lora, name=backend.key, strength=strength)
    return backend.patcher


class ApplyErasureLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZEraseApplyLoRA",
            search_aliases=["concept erasure", "erasure LoRA", "unlearn", "remove concept"],
            display_name=NODE,
            category="Z-Erase",
            description="Puts a Z-Erase LoRA on a Z-Image model, acting on text tokens only. Stack several "
            "to erase several concepts; bypass the node to get the original model back. The erasure lives in the "
            "patch, not the weights: a checkpoint saved from this MODEL is the original one (share the LoRA file).",
            inputs=[
                io.Model.Input("model", tooltip="A Z-Image model (Load Diffusion Model); not changed: a patched "
                               "clone is returned."),
                io.Combo.Input("lora_name", options=lora_files(), default=NONE,
                               tooltip="A Z-Erase LoRA file (native or official Z-Erase) from the loras folders. "
                               "Not in the stock LoRA loaders: an official file there acts on every token, ungated; "
                               "a native one does nothing."),
                io.Float.Input("strength", default=1.0, min=-STRENGTH_MAX, max=STRENGTH_MAX, step=0.05,
                               tooltip="Multiplies the file's own scale. Official Z-Erase files load at scale 1; "
                               "their code applies them at 15."),
                ErasureLoRAType.Input("erasure_lora", optional=True,
                                      tooltip="Overrides the file: a LoRA from Z-Erase Train or Merge."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, strength, **linked):
        # A connected erasure_lora arrives here as None (ComfyUI keys it on its own node) and overrides the file, whose
        # state then must not count: rewriting an unused file re-ran Apply and every sampler after it.
        return (lora_name if "erasure_lora" in linked else file_state(lora_name)), strength

    @classmethod
    def validate_inputs(cls, lora_name, erasure_lora=_UNLINKED) -> bool | str:
        """A file to read (checked_choice), unless a linked erasure_lora overrides it. Taking lora_name here, the
        function replaces ComfyUI's own check that it is in the list."""
        return erasure_lora is not _UNLINKED or checked_choice(NODE, lora_name)

    @classmethod
    def execute(cls, model, lora_name, strength, erasure_lora=None) -> io.NodeOutput:
        lora = pick_lora(NODE, lora_name, erasure_lora)  # checked even at strength 0: a wrong choice still says so
        return io.NodeOutput(apply_erasure(model, lora, strength))
