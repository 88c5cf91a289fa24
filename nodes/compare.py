"""Side-by-side comparison: original | erased images at the same seeds, the prompt as caption."""

from __future__ import annotations

from comfy_api.latest import io

from zerase_core import render
from zerase_core.errors import ZEraseError

from .common import told_as


NODE = "Z-Erase Compare"


class CompareGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZEraseCompare",
            search_aliases=["before after", "side by side", "image comparison grid"],
            display_name=NODE,
            category="Z-Erase",
            description="A labelled grid: one row per image of the batch, original left, erased right.",
            inputs=[
                io.Image.Input("original", tooltip="Images from the model without the erasure LoRA."),
                io.Image.Input("erased", tooltip="The same latent batch and seed sampled with the erased model."),
                io.String.Input("prompt", default="", multiline=True, tooltip="Shown as the grid's caption."),
                io.String.Input("label_original", default="original", tooltip="Heading of the left column."),
                io.String.Input("label_erased", default="erased", tooltip="Heading of the right column."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, original, erased, prompt, label_original, label_erased) -> io.NodeOutput:
        if len(original) != len(erased):
            raise ZEraseError(f"{NODE}: {len(original)} original and {len(erased)} erased images; give both batches "
                              "the same size (the same latent batch through both samplers).")
        if not len(original):
            raise ZEraseError(f"{NODE}: both batches are empty; connect the images of the two samplers.")
        with told_as(NODE):  # an IMAGE of a shape no picture has
            render.check_images(original)
            render.check_images(erased)
            rows = [[render.to_pil(a), render.to_pil(b)] for a, b in zip(original, erased)]
        # ComfyUI draws a batch's noise in one call from the seed: item i is not "seed + i", it is batch index i.
        labels = [f"batch {i}" for i in range(len(rows))] if len(rows) > 1 else []
        return io.NodeOutput(render.grid(rows, [label_original, label_erased], labels, caption=prompt))
