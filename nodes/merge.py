"""Merge Erasure LoRAs: two or more LoRAs with weights -> one (exact, or re-ranked by SVD)."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from zerase_core.lora_file import saved_or_new
from zerase_core.merge import merge

from .common import ErasureLoRAType, listed, node_id, output_folder, parse_list, show_text, told_as

NODE = "Merge Erasure LoRAs"
log = logging.getLogger(__name__)


def parse_weights(text: str) -> list[float] | None:
    """The typed weights; None when empty: 1/N each (paper App. F). merge() checks their count and range."""
    return parse_list(text, "weights", float) or None


class MergeErasureLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZEraseMergeLoRAs",
            search_aliases=["multi-concept erasure", "combine erasure LoRAs"],
            display_name=NODE,
            category="Z-Erase",
            is_output_node=True,  # with a save_name it writes a file, wired onward or not
            description="Σ w_i ΔW_i over the products ΔW = B·A (rank concatenation is exact); optional SVD re-rank.",
            inputs=[
                ErasureLoRAType.Input("lora_1", tooltip="From Z-Erase Train or Load Erasure LoRA."),
                ErasureLoRAType.Input("lora_2", tooltip="The second LoRA. (One LoRA into both inputs, with empty "
                                      "weights and a rank: that LoRA re-ranked.)"),
                ErasureLoRAType.Input("lora_3", optional=True, tooltip="Optional: a third LoRA."),
                ErasureLoRAType.Input("lora_4", optional=True, tooltip="Optional: a fourth LoRA."),
                io.String.Input("weights", default="", tooltip=(
                    "Comma-separated, one per LoRA; empty: 1/N each (the paper's: each concept erased less than "
                    "alone). 1 each erases as the LoRAs stacked do (README). Each above 0 and at most 20, as a "
                    "strength.")),
                io.Int.Input("rank", default=0, min=0, max=1024, tooltip="0: exact merge; else re-rank by SVD."),
                io.String.Input("save_name", default="",
                                tooltip="Empty: do not save. Saved under models/loras/zerase/."),
            ],
            hidden=[io.Hidden.unique_id],  # the node its report is shown on
            outputs=[ErasureLoRAType.Output(display_name="erasure_lora"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, lora_1, lora_2, weights, rank, save_name, lora_3=None, lora_4=None) -> io.NodeOutput:
        loras = [x for x in (lora_1, lora_2, lora_3, lora_4) if x is not None]
        with told_as(NODE):
            merged, report = merge(loras, parse_weights(weights), rank or None)
            text = f"merged {len(loras)} LoRAs, rank {report.rank}, relative error {report.relative_error:.3g}"
            if save_name.strip():
                path, written = saved_or_new(merged, output_folder(), save_name)  # never over another file
                text += f"; saved {listed(path)}" if written else f"; {listed(path)} holds this merge already"
                log.info("Z-Erase: %s", text)
        show_text(node_id(cls), text)  # seen on the node, wired onward or not
        return io.NodeOutput(merged, text)
