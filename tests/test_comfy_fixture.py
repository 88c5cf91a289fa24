"""The tiny ComfyUI Z-Image fixture works: stock CLIPTextEncode and KSampler run on it."""

from comfy_support import empty_latent, encode, ksample, require_comfyui, tiny_clip, tiny_zimage

comfy = require_comfyui()
import torch  # noqa: E402


def test_clip_text_encode_matches_stock_node():
    import nodes  # ComfyUI's nodes.py

    clip = tiny_clip(comfy)
    (cond,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
    assert len(cond) == 1
    features, extra = cond[0]
    # chat template "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n" adds 9 tokens
    assert features.shape == (1, 4 + 9, 64)
    assert torch.equal(features, encode(clip, "a photo of a cat")[0][0])
    assert extra["attention_mask"].shape == (1, 13)


def test_builds_are_deterministic_by_seed():
    a, b, c = tiny_zimage(comfy, seed=3), tiny_zimage(comfy, seed=3), tiny_zimage(comfy, seed=4)
    wa = a.model.diffusion_model.layers[0].attention.qkv.weight
    assert torch.equal(wa, b.model.diffusion_model.layers[0].attention.qkv.weight)
    assert not torch.equal(wa, c.model.diffusion_model.layers[0].attention.qkv.weight)


def test_stock_ksampler_runs_and_is_reproducible():
    model, clip = tiny_zimage(comfy), tiny_clip(comfy)
    pos, neg = encode(clip, "a photo of a cat"), encode(clip, "")
    latent = empty_latent(1, 64, 96)
    out1 = ksample(comfy, model, pos, neg, latent, seed=7, steps=2, cfg=2.0)
    out2 = ksample(comfy, model, pos, neg, latent, seed=7, steps=2, cfg=2.0)
    assert out1.shape == (1, 16, 8, 12)
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, out2)


def test_common_ksampler_node_path():
    import nodes

    model, clip = tiny_zimage(comfy), tiny_clip(comfy)
    (pos,) = nodes.CLIPTextEncode().encode(clip, "a red car")
    (neg,) = nodes.CLIPTextEncode().encode(clip, "")
    (out,) = nodes.common_ksampler(model, 1, 2, 1.0, "euler", "simple", pos, neg, empty_latent())
    assert out["samples"].shape == (1, 16, 8, 8)
