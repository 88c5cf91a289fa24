"""Attention Map Viewer: per-word heatmaps of image-token attention (paper Fig. 2), and A − B."""

from __future__ import annotations

from comfy_api.latest import io

from zerase_core import render
from zerase_core.attention_maps import (check_comparable, check_latent, check_request, layer_range, shown_share,
                                        word_maps)
from zerase_core.backends.comfy_zimage import ComfyZImageBackend, as_tokenized
from zerase_core.errors import ZEraseError
from zerase_core.prompts import concept_token_indices

from . import _render
from .common import check_vae, parse_list, told_as

NODE = "Attention Map Viewer"
NODE_B = f"{NODE} (model_b)"  # what is refused of the second model
FIX = ("Type words that occur in the prompt, or put them into it; separate words with commas ('cat, dog' is two words, "
       "'cat dog' one phrase).")


class AttentionMapViewer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZEraseAttentionMaps",
            search_aliases=["attention heatmap", "cross attention map", "word attention"],
            display_name=NODE,
            category="Z-Erase",
            description="Where image tokens attend to each chosen word of the prompt, over the picture.",
            inputs=[
                io.Model.Input("model", tooltip="A Z-Image model, with or without erasure LoRAs."),
                io.Clip.Input("clip", tooltip="Z-Image's text encoder (Load CLIP, type lumina2)."),
                io.String.Input("prompt", default="a photo of a cat", multiline=True,
                                tooltip="The prompt whose words are mapped; the words must occur in it."),
                io.String.Input("words", default="cat", tooltip="Comma-separated words or phrases of the prompt."),
                io.String.Input("sigmas", default="0.5", tooltip="Noise level(s) in (0, 1], comma-separated."),
                io.Int.Input("layer_start", default=0, min=0, max=1000, tooltip="First main layer averaged."),
                io.Int.Input("layer_end", default=-1, min=-1, max=1000, tooltip="Exclusive; -1: to the last layer."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the noise the maps are measured on. No randomize control, so the "
                             "maps stay comparable."),
                io.Latent.Input("latent", optional=True, tooltip="The picture the maps are measured on (its first "
                                "image); or connect an IMAGE and a VAE."),
                io.Image.Input("image", optional=True, tooltip="Measured on (encoded by the VAE) when no LATENT is "
                               "connected; a connected LATENT takes precedence."),
                io.Vae.Input("vae", optional=True, tooltip="Needed to encode an IMAGE; also draws the picture."),
                io.Model.Input("model_b", optional=True, tooltip="A second model (e.g. erased) to compare."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, model, clip, prompt, words, sigmas, layer_start, layer_end, seed, latent=None, image=None,
                vae=None, model_b=None) -> io.NodeOutput:
        with told_as(NODE):  # every check before any forward; model_b's backend tells its refusals by its name
            words = [as_tokenized(w) for w in parse_list(words, "words")]  # as the prompt is read: "\(cat\)"
            sigma_list = parse_list(sigmas, "sigmas", float)
            check_request(words, sigma_list)
            backend = ComfyZImageBackend(model, clip, node=NODE)
            check_vae(vae, backend.latent_channels)
            span = layer_range(backend.n_layers, layer_start, layer_end)
            other = None if model_b is None else ComfyZImageBackend(model_b, node=NODE_B)
            if other is not None:
                check_comparable(backend.fingerprint(), other.fingerprint())
            samples, pixels = _measured_on(model, latent, image, vae)
            check_latent(samples, backend.latent_channels)
            (encoded,) = backend.encode([prompt])  # after the cheap checks: this runs the text encoder
            columns = [concept_token_indices(encoded, w, FIX, what="word") for w in words]
        x0 = backend.patcher.model.process_latent_in(samples.float()).cpu()
        maps, labels = [], ["model"] if other is None else ["model A", "model B", "A - B"]
        for who, each in ((NODE, backend), (NODE_B, other)):
            if each is not None:
                with told_as(who):
                    maps.append(word_maps(each, encoded, columns, x0, sigma_list, seed, set(span)))
        # Drawn over the picture the maps were measured on: the LATENT's when one is connected, even beside an IMAGE.
        picture = render.to_pil(pixels[0] if latent is None else _render.decode(model, vae, samples)[0])
        rows = render.word_map_rows(picture, maps, difference=other is not None,
                                    shown=shown_share(samples.shape[-2:], backend.patch))
        levels = ", ".join(f"{s:g}" for s in sigma_list)
        # The settings first: a long prompt is cut at the caption's last line, and they tell two Viewer images apart.
        caption = f"sigma {levels} | layers {span.start}..{span.stop - 1} | {prompt}"
        return io.NodeOutput(render.grid(rows, words, labels, caption=caption))


def _measured_on(model, latent, image, vae):
    """The latent the maps are measured on (the LATENT's first image, else the IMAGE's first encoded by the VAE) and,
    for an IMAGE, the pixels it encodes: ComfyUI's VAE first crops each side to a multiple of its downscale, centred
    (Z-Image's: up to 7 px off a side), so drawn over the whole IMAGE a map was shifted and stretched by up to 4 px."""
    if latent is not None:  # an empty one of other channels (EmptyLatentImage's 4) as KSampler takes it: Z-Image's
        import comfy.sample

        return comfy.sample.fix_empty_latent_channels(model, latent["samples"][:1],
                                                      latent.get("downscale_ratio_spacial")), None
    if image is not None and vae is not None:
        render.check_images(image)
        pixels = vae.vae_encode_crop_pixels(render.rgb(image[:1]))  # the crop encode makes (it crops again: a no-op)
        return vae.encode(pixels), pixels
    raise ZEraseError("connect a LATENT, or an IMAGE together with a VAE.")
