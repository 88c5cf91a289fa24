"""The pack's ComfyExtension: the list of its nodes."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply_lora import ApplyErasureLoRA
from .attention_maps import AttentionMapViewer
from .compare import CompareGrid
from .load_lora import LoadErasureLoRA
from .merge import MergeErasureLoRAs
from .train import ZEraseTrain

NODES: list[type[io.ComfyNode]] = [
    ZEraseTrain, ApplyErasureLoRA, LoadErasureLoRA, MergeErasureLoRAs, AttentionMapViewer, CompareGrid,
]


class ZEraseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
