"""Side-by-side comparison: original | erased images at the same seeds, the prompt as caption."""

from __future__ import annotations

from comfy_api.latest import io

from . import _render

NODE = "Z-Erase Compare"


class CompareGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZEraseCompare",
            display_name=NODE,
            category="Z-Erase",
            description="A labelled grid: one row per image of the batch, original left, erased right.",
            inputs=[
                io.Image.Input("original"),
                io.Image.Input("erased"),
                io.String.Input("prompt", default="", multiline=True),
                io.String.Input("label_original", default="original"),
                io.String.Input("label_erased", default="erased"),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, original, erased, prompt, label_original, label_erased) -> io.NodeOutput:
        rows = [[_render.to_pil(a), _render.to_pil(b)] for a, b in zip(original, erased)]
        labels = [f"seed +{i}" for i in range(len(rows))] if len(rows) > 1 else []
        return io.NodeOutput(_render.grid(rows, [label_original, label_erased], labels, caption=prompt))
