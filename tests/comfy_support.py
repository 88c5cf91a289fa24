"""Find a ComfyUI checkout and build tiny Z-Image models from ComfyUI's own classes.

Integration tests call :func:`require_comfyui` at module level. Without a checkout the whole
module is skipped with the reason; with one, ComfyUI is imported in process (CPU unless
``ZERASE_TEST_DEVICE=gpu``) and the tiny builders below need no downloads: the DiT comes from
``supported_models.ZImage`` at toy sizes, the text encoder is ComfyUI's Qwen3 "4B" class with a
``qwen3_4b_model_config`` override, and the Qwen tokenizer files ship inside ComfyUI.
Weights are drawn from a seeded generator, so every build with the same seed is identical.

A checkout is found through ``COMFYUI_PATH`` or by this pack sitting in ``ComfyUI/custom_nodes/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tiny Z-Image sizes. ComfyUI's limits: dim >= 256 (the Z-Image time embedding is 256 wide) and
# dim // n_heads == sum(axes_dims); Qwen3's head_dim is fixed at 128 by its config class.
TINY_DIT = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=64, n_layers=2,
    n_refiner_layers=1, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
    z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
)
TINY_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1)


def find_comfyui() -> tuple[Path | None, str]:
    """(checkout, how it was found) or (None, why not)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if (path / "comfy" / "ldm" / "lumina" / "model.py").is_file():
            return path, f"COMFYUI_PATH={path}"
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout with Z-Image (comfy/ldm/lumina/model.py missing)"
    if REPO.parent.name == "custom_nodes" and (REPO.parent.parent / "comfy").is_dir():
        return REPO.parent.parent, "pack sits in ComfyUI/custom_nodes/"
    return None, ("no ComfyUI checkout: set COMFYUI_PATH to a ComfyUI v0.18.1+ checkout "
                  "(or put this pack in ComfyUI/custom_nodes/) to run the ComfyUI integration tests")


_COMFY: SimpleNamespace | None = None


def import_comfy(path: Path) -> SimpleNamespace:
    """Import ComfyUI from ``path`` in process, once. CPU unless ZERASE_TEST_DEVICE=gpu."""
    global _COMFY
    if _COMFY is not None:
        return _COMFY
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options

    comfy.options.enable_args_parsing(False)  # ComfyUI would otherwise parse pytest's argv
    import comfy.cli_args

    if os.environ.get("ZERASE_TEST_DEVICE", "cpu") != "gpu":
        comfy.cli_args.args.cpu = True  # read when comfy.model_management is first imported
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.z_image
    import comfy.utils
    import folder_paths

    _COMFY = SimpleNamespace(
        path=path, torch=torch, mm=comfy.model_management, model_patcher=comfy.model_patcher,
        sample=comfy.sample, samplers=comfy.samplers, sd=comfy.sd, supported_models=comfy.supported_models,
        supported_models_base=comfy.supported_models_base, z_image=comfy.text_encoders.z_image,
        utils=comfy.utils, folder_paths=folder_paths,
    )
    return _COMFY


def require_comfyui() -> SimpleNamespace:
    """Call at module level: skips the module with the reason, or returns the imported ComfyUI.

    With ZERASE_REQUIRE_COMFYUI=1 (a release check) a missing or broken checkout fails instead of skipping.
    """
    path, how = find_comfyui()
    if path is None:
        _skip_or_fail(how)
    try:
        return import_comfy(path)
    except ImportError as exc:  # a checkout whose requirements are not installed
        _skip_or_fail(f"ComfyUI at {path} ({how}) does not import: {exc}")


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("ZERASE_REQUIRE_COMFYUI") == "1":
        pytest.fail(f"ZERASE_REQUIRE_COMFYUI=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def _fill(module, seed: int, std: float = 0.05) -> None:
    """Deterministic weights: ComfyUI's ops leave parameters uninitialised (torch.empty)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float32) * std).to(p.dtype))


def _patcher_for(comfy, model_config, seed: int, inference_tensors: bool, weight_dtype=None):
    import torch

    if weight_dtype is None or weight_dtype == torch.float32:
        model_config.set_inference_dtype(torch.float32, None)
    else:  # stored in weight_dtype (e.g. fp8), computed in fp32 by ComfyUI's manual-cast ops
        model_config.set_inference_dtype(weight_dtype, torch.float32)

    def build():
        model = model_config.get_model({}, "")
        _fill(model, seed)
        return model

    if inference_tensors:  # as ComfyUI's loader nodes do: weights become inference tensors
        with torch.inference_mode():
            model = build()
    else:
        model = build()
    mm = comfy.mm
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_zimage(comfy, seed: int = 0, inference_tensors: bool = False, weight_dtype=None, **overrides):
    """A tiny Z-Image NextDiT (``model_base.Lumina2`` with a ``supported_models.ZImage`` config) in a ModelPatcher."""
    config = comfy.supported_models.ZImage({**TINY_DIT, **overrides})
    return _patcher_for(comfy, config, seed, inference_tensors, weight_dtype)


def tiny_lumina2(comfy, seed: int = 0):
    """A tiny plain Lumina 2 NextDiT (no Z-Image modulation), for refusal tests."""
    cfg = {k: v for k, v in TINY_DIT.items() if k not in ("z_image_modulation", "time_scale", "pad_tokens_multiple")}
    cfg.update(cap_feat_dim=64, axes_dims=[32, 48, 48], ffn_dim_multiplier=4.0, rope_theta=10000.0)
    return _patcher_for(comfy, comfy.supported_models.Lumina2(cfg), seed, False)


def tiny_clip(comfy, seed: int = 1, width: int = TINY_QWEN3["hidden_size"]):
    """ComfyUI's Z-Image text encoder (Qwen3 class, chat template, Qwen tokenizer) at toy size, as a CLIP."""
    import torch

    target = comfy.supported_models_base.ClipTarget(comfy.z_image.ZImageTokenizer, comfy.z_image.te())
    clip = comfy.sd.CLIP(target=target, model_options={"qwen3_4b_model_config": TINY_QWEN3 | {"hidden_size": width},
                                                        "dtype": torch.float32})
    _fill(clip.cond_stage_model, seed, std=0.02)
    return clip


def encode(clip, text: str):
    """What CLIPTextEncode returns: [[features (1, N, dim), {"pooled_output": None, "attention_mask": ...}]]."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def empty_latent(batch: int = 1, height: int = 64, width: int = 64):
    """A LATENT dict as EmptySD3LatentImage makes it for Z-Image (16 channels, /8)."""
    import torch

    return {"samples": torch.zeros(batch, 16, height // 8, width // 8)}


def ksample(comfy, model, positive, negative, latent, seed: int = 0, steps: int = 2, cfg: float = 1.0,
            sampler: str = "euler", scheduler: str = "simple"):
    """The stock KSampler path (nodes.common_ksampler minus the preview callback)."""
    samples = latent["samples"]
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    noise = comfy.sample.prepare_noise(samples, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, samples,
                               seed=seed, disable_pbar=True)


def node_texts(monkeypatch) -> list[tuple[str, str]]:
    """What the web UI would show on nodes, (node id, text), as the pack sends it: through ComfyUI's server as its
    main leaves it (``PromptServer.instance`` of the ``server`` module), and only to the client that queued the prompt
    (a concept's name can be private: broadcast, it showed on every connected client's node of that id)."""
    told: list[tuple[str, str]] = []
    server = SimpleNamespace(client_id="the queuing client")

    def send_progress_text(text, node_id, sid=None):
        assert sid == server.client_id, f"sent to {sid!r}, not to the client that queued the prompt"
        told.append((node_id, text))

    server.send_progress_text = send_progress_text
    monkeypatch.setitem(sys.modules, "server", SimpleNamespace(PromptServer=SimpleNamespace(instance=server)))
    return told
