"""Load Erasure LoRA: a file from the loras folders -> ZERASE_LORA (for Merge and Apply)."""

from __future__ import annotations

from comfy_api.latest import io

from .common import SUBFOLDER, ErasureLoRAType, checked_choice, file_state, lora_files, read_lora_file

NODE = "Load Erasure LoRA"


def _first_ours(files: list[str]) -> str:
    """A new node's choice: the first file Train or Merge saved (the list's first is usually a stock LoRA, refused
    when the node runs)."""
    return next((name for name in files if name.startswith(f"{SUBFOLDER}/")), files[0])


class LoadErasureLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = lora_files()[1:] or [""]
        return io.Schema(
            node_id="ZEraseLoadLoRA",
            search_aliases=["erasure LoRA loader"],
            display_name=NODE,
            category="Z-Erase",
            description="Reads a Z-Erase LoRA file (native, or the official Z-Erase format) for Merge or Apply.",
            inputs=[io.Combo.Input("lora_name", options=files, default=_first_ours(files),
                                   tooltip="A file from the loras folders; Train saves under zerase/.")],
            outputs=[ErasureLoRAType.Output(display_name="erasure_lora"), io.String.Output(display_name="concept")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **_):
        return file_state(lora_name)

    @classmethod
    def validate_inputs(cls, lora_name) -> bool | str:
        """checked_choice; this replaces ComfyUI's own check that the name is in the list."""
        return checked_choice(NODE, lora_name)

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        lora = read_lora_file(NODE, lora_name)
        return io.NodeOutput(lora, lora.concept)
