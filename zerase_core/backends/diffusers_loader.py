"""Load a diffusers Z-Image folder (transformer/, text_encoder/, tokenizer/) as a backend.

The text encoder (Qwen3, ~8 GB in bf16) is only needed to encode the run's prompts; the
trainer encodes them all up front, so it can be dropped right after (see ``release_encoder``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import ZEraseError
from ..out_of_memory import empty_cache, is_out_of_memory, release
from ..typed import json_object
from .base import combined_digest
from .diffusers_zimage import DiffusersZImageBackend, LatentSpec, check_on_grid, zimage_fingerprint
from .text_encoders import ChatTemplateEncoder

log = logging.getLogger(__name__)


def check_model_folder(folder: Path) -> float | None:
    """What can be told of a diffusers Z-Image folder before its slow loads (a mistyped path, a missing part, parts of
    other models, a damaged scheduler config); its flow shift (scheduler_shift)."""
    folder = Path(folder)  # the path first: a mistyped one is not told as a package to install
    if not folder.is_dir():
        raise ZEraseError(f"{folder} is not a folder; --model takes a diffusers Z-Image folder (transformer/, "
                          "text_encoder/, tokenizer/ inside), as Tongyi-MAI/Z-Image-Turbo is downloaded.")
    missing = [s for s in ("transformer", "text_encoder", "tokenizer") if not (folder / s).is_dir()]
    if missing:
        raise ZEraseError(f"{folder} is not a diffusers Z-Image folder: missing {', '.join(s + '/' for s in missing)}.")
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError as err:
        raise ZEraseError("Z-Image's text encoder needs transformers: pip install transformers accelerate") from err
    check_parts_agree(folder)
    return scheduler_shift(folder)


def load_diffusers_zimage(folder: Path, device: str | None = None, dtype: torch.dtype = torch.bfloat16):
    from diffusers import ZImageTransformer2DModel

    shift = check_model_folder(folder)
    folder = Path(folder)
    from transformers import AutoModel, AutoTokenizer

    tokenizer = _loaded(AutoTokenizer, folder, "tokenizer")  # seconds: checked before the minutes below
    check_vocabulary(folder, len(tokenizer))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        dtype = torch.float32  # bf16 matmuls on CPU are slow and gain nothing here
        log.warning("No CUDA GPU: the real Z-Image runs on the CPU in fp32 (~40 GB of RAM while the text encoder is "
                    "loaded, ~25 GB after; minutes per step). Install a CUDA build of torch to train on a GPU.")
    # The transformer waits on the CPU while the text encoder has the GPU: it moves there once the prompts are
    # encoded and the encoder is released (DiffusersZImageBackend.release_encoder), never both at once.
    transformer = _loaded_whole(ZImageTransformer2DModel, folder, "transformer", torch_dtype=dtype)
    text_model = _loaded_whole(AutoModel, folder, "text_encoder", torch_dtype=dtype).to(device)  # (dtype= from 4.56)
    encoder = ChatTemplateEncoder(tokenizer, text_model.eval())
    return DiffusersZImageBackend(transformer.eval(), encoder, LatentSpec(channels=transformer.config.in_channels),
                                  device=device, flow_shift=shift, digest=folder_digest(folder))


def load_decoder(folder: Path, device: torch.device, dtype: torch.dtype):
    """The folder's VAE as latents → (B, H, W, 3) pictures in [0, 1], decoded as ZImagePipeline decodes; None where
    the folder has no ``vae/``. Loaded on the CPU (a damaged file is refused before the run, not after it) and moved
    to ``device`` at the first decode, so it holds no GPU memory while the transformer trains."""
    folder = Path(folder)
    if not (folder / "vae").is_dir():
        return None
    config, transformer = _config(folder / "vae"), _config(folder / "transformer")
    latent, taken = config.get("latent_channels"), transformer.get("in_channels")
    if None not in (latent, taken) and latent != taken:
        raise ZEraseError(f"{folder / 'vae'}/ makes {latent}-channel latents and the transformer takes {taken}: they "
                          "are not one model's parts. Restore vae/ from the model's download.")
    from diffusers import AutoencoderKL

    vae = _loaded_whole(AutoencoderKL, folder, "vae", torch_dtype=dtype).eval()

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        vae.to(device)
        c = vae.config  # the model's latents are the VAE's scaled and shifted (Flux's VAE: 0.3611, 0.1159)
        z = latents.to(device, dtype) / c.scaling_factor + (c.shift_factor or 0.0)
        pixels = _decoded(vae, z, device).float()  # [-1, 1]
        return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    return decode


def _decoded(vae, z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``vae.decode(z)``; where that runs out of memory (1024² beside the transformer on a 16 GB card), again in tiles,
    and in tiles from then on: a fraction of the memory, the seams blended by diffusers."""
    try:
        return vae.decode(z, return_dict=False)[0]
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(err) or vae.use_tiling:
            raise
        release(err)  # the failed decode's tensors, as every retry after running out of memory frees them
    empty_cache(device)
    log.warning("The VAE ran out of memory decoding a %d×%d-cell latent: decoding in tiles.", *z.shape[-2:])
    vae.enable_tiling()
    return vae.decode(z, return_dict=False)[0]


# The weight files each part loads: one file, or its shards (diffusers' names, then transformers').
LOADED = {"transformer": re.compile(r"^diffusion_pytorch_model(-\d{5}-of-\d{5})?\.safetensors$"),
          "text_encoder": re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")}
SAMPLES, SAMPLE_BYTES = 64, 1 << 16  # read from each weight file, evenly spread: 4 MiB, a fraction of a second


def folder_digest(folder: Path) -> str | None:
    """The model a run trains on: the transformer's weights and the text encoder's, whose prompt features the run
    trains on (:func:`weights_digest` of each). None where either cannot be told."""
    return combined_digest(*(weights_digest(folder / part, LOADED[part]) for part in ("transformer", "text_encoder")))


def weights_digest(folder: Path, loaded: re.Pattern = LOADED["transformer"]) -> str | None:
    """What a part's weights are, cheaply: sha256 over each weight file's name, size, its safetensors header (every
    tensor's name, dtype, shape and place) and 64 samples of 64 KiB spread evenly over it. A fine-tune of the same
    architecture differs there; a copy or a move of the folder does not. A model that differs from another in a few
    tensors only may escape the samples. Resuming a run checks it (Backend.base_digest), so a checkpoint is not
    continued on another model of the same sizes. None for weights in another format (.bin): not told apart.

    Only the files the part loads count (``loaded``: ``diffusion_pytorch_model.safetensors`` or its shards, not a
    variant such as ``.fp16``): a run whose --out lay inside the folder added its own LoRA and checkpoint to the
    digest, and could then never be resumed."""
    files = sorted(p for p in folder.glob("*.safetensors") if loaded.match(p.name))
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            header = int.from_bytes(f.read(8), "little")  # safetensors: an 8-byte length, then the JSON header
            h.update(f.read(min(header, size)))
            for k in range(SAMPLES):
                f.seek(size * k // SAMPLES)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def check_parts_agree(folder: Path) -> None:
    """Before minutes of loading: transformer/ holds Z-Image's class (diffusers loads another's config into it with a
    warning and leaves its weights unset), and the text encoder's width is the captions' the transformer takes."""
    transformer, text = (_config(folder / part) for part in ("transformer", "text_encoder"))
    kind = transformer.get("_class_name", "ZImageTransformer2DModel")
    if kind != "ZImageTransformer2DModel":
        raise ZEraseError(f"{folder / 'transformer'}/ holds a {kind}, not Z-Image's ZImageTransformer2DModel: "
                          "Z-Erase trains Z-Image. Point --model at a Z-Image folder (e.g. Tongyi-MAI/Z-Image-Turbo).")
    encoder = text.get("model_type", "qwen3")
    if encoder != "qwen3":  # a T5's width is d_model, unchecked below: it failed after the loads, inside the encoder
        raise ZEraseError(f"{folder / 'text_encoder'}/ holds a {encoder} model, not Z-Image's Qwen3 text encoder. "
                          "Restore text_encoder/ from the model's download.")
    width, captions = text.get("hidden_size"), transformer.get("cap_feat_dim")
    if None not in (width, captions) and width != captions:
        raise ZEraseError(f"{folder}: the text encoder gives {width}-wide features and the transformer takes "
                          f"{captions}: they are not one model's parts. Restore text_encoder/ from the model's "
                          "download.")


def check_vocabulary(folder: Path, tokens: int) -> None:
    """The tokenizer's ids fit the text encoder's embedding table (another model's tokenizer was an IndexError inside
    the encoder, after the loads)."""
    vocabulary = _config(folder / "text_encoder").get("vocab_size")
    if vocabulary is not None and tokens > vocabulary:
        raise ZEraseError(f"{folder / 'tokenizer'}/ has {tokens} tokens and the text encoder embeds {vocabulary}: they "
                          "are not one model's parts. Restore tokenizer/ from the model's download.")


def pixels_per_token(folder: Path) -> int:
    """Image pixels a side per transformer token, read off the folder before loading: the VAE's downsampling (the
    backend's LatentSpec) times the transformer's patch (its config's all_patch_size, 2 where it says none)."""
    patch = _config(Path(folder) / "transformer").get("all_patch_size", [2])[0]
    return LatentSpec.downsample * int(patch)


def check_size(folder: Path, height: int, width: int) -> None:
    """Refuse, before minutes of loading, a picture size off the folder's token grid (``pixels_per_token``)."""
    check_on_grid(height, width, pixels_per_token(folder))


def folder_fingerprint(folder: Path) -> dict:
    """What a LoRA file is checked against, read off transformer/config.json before the model is loaded."""
    return zimage_fingerprint(_config(Path(folder) / "transformer"))


def _config(part: Path) -> dict:
    """A part's config.json, {} where there is none (from_pretrained then names what is missing)."""
    path = part / "config.json"
    try:  # JSON that is no object (null, a list) failed later as an AttributeError traceback
        return json_object(json.loads(path.read_text(encoding="utf-8")), "it") if path.is_file() else {}
    except (OSError, ValueError, TypeError) as err:
        raise ZEraseError(f"Cannot read {path} ({type(err).__name__}: {err}). Restore it from the model's "
                          "download.") from err


def scheduler_shift(folder: Path) -> float | None:
    """The flow shift in the folder's ``scheduler/scheduler_config.json`` (Z-Image Turbo's: 3), None without one."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        shift = float(config.get("shift", 1.0))  # FlowMatchEulerDiscreteScheduler's default, as diffusers reads it
        if not 0 < shift < math.inf:  # also NaN
            raise ValueError(f"shift {shift}: it must be a finite number > 0")
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise ZEraseError(f"Cannot read the flow shift from {path} ({type(err).__name__}: {err}). Restore the file "
                          "from the model's download, or delete scheduler/ to train at Z-Image's shift of 3.") from err
    if config.get("use_dynamic_shifting"):
        log.warning("%s asks for dynamic shifting, which training does not follow: x_t is sampled at shift %g.",
                    path, shift)
    return shift


def _loaded_whole(cls, folder: Path, subfolder: str, **kwargs):
    """A model part with every tensor from its files. One the files lack is initialised at random by transformers
    (the text encoder then encodes wrongly, silently) and left unset by diffusers (a meta-tensor error at first use)."""
    model, info = _loaded(cls, folder, subfolder, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ZEraseError(f"Cannot load {folder / subfolder}/: its weight files lack {shown}. Restore it from the "
                          "model's download.")
    return model


def _loaded(cls, folder: Path, subfolder: str, **kwargs):
    """``cls.from_pretrained`` of one part of the folder, or an error that names the part."""
    try:
        return cls.from_pretrained(folder, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # a truncated weight file is a SafetensorError
        raise ZEraseError(f"Cannot load {folder / subfolder}/ ({type(err).__name__}: {err}). A diffusers Z-Image "
                          "folder (e.g. Tongyi-MAI/Z-Image-Turbo) has transformer/, text_encoder/ and tokenizer/ "
                          "with their config and weight files.") from err
