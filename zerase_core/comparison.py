"""Original | erased pictures on a diffusers Z-Image: ``train --model``'s before_after.png (the run's prompts) and
``compare`` (any prompts, any LoRA files applied together), each prompt from one noise, without and with the LoRAs.

The nodes draw their pictures with the workflow's VAE (Z-Erase Train's previews, Z-Erase Compare); the command line
has only the model folder, so it decodes with the folder's own VAE (``vae/``), as ZImagePipeline does.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .backends.base import Backend
from .config import TrainConfig
from .errors import ZEraseError
from .out_of_memory import is_out_of_memory
from .prompt_pool import first_erase_text
from .prompts import EncodedPrompt, preservation_text
from .render import grid, save_png, to_pil
from .sampling import before_after

log = logging.getLogger(__name__)

GRID = "before_after.png"
MOST_KEPT = 3  # preservation prompts shown beside the erase prompt: each costs two samplings of the model

Decode = Callable[[torch.Tensor], torch.Tensor]  # (B, C, h, w) latents -> (B, H, W, 3) pictures in [0, 1]


def comparison_texts(config: TrainConfig) -> list[str]:
    """The first erase prompt and, from the same template, up to MOST_KEPT preservation prompts (Eq. 8's c_pr)."""
    template = config.erase_templates[0]
    kept = [preservation_text(template, config.concept, keep) for keep in config.preserve[:MOST_KEPT]]
    return [first_erase_text(config), *kept]


def comparison(backend: Backend, prompts: Sequence[EncodedPrompt], config: TrainConfig, decode: Decode) -> torch.Tensor:
    """(1, H, W, 3): a row per prompt, original | erased, on the run's sampler from its preview noise."""
    cells = [[to_pil(decode(x0)[0]) for x0 in before_after(backend, prompt, config)] for prompt in prompts]
    return grid(cells, ["original", "erased"], row_labels=[p.text[:14] for p in prompts],
                caption=" | ".join(f"{i + 1}: {p.text}" for i, p in enumerate(prompts)))


def write_comparison(backend: Backend, prompts: Sequence[EncodedPrompt], config: TrainConfig, decode: Decode | None,
                     folder: Path) -> Path | None:
    """``folder``/before_after.png, or None where the model has no VAE or the pictures do not fit in memory: the
    run's LoRA and files are written before, and a picture is not worth failing the command for."""
    if decode is None:
        log.info("The model folder has no vae/: no %s (the LoRA is written; Apply it in ComfyUI to see it).", GRID)
        return None
    try:
        picture = comparison(backend, prompts, config, decode)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(err):
            raise
        log.warning("%s was not drawn: out of memory while sampling or decoding it (the LoRA and the run's files are "
                    "written).", GRID)
        return None
    return save_png(picture[0], folder / GRID)


def compare_files(folder: Path, files: Sequence[Path], texts: Sequence[str], strengths: Sequence[float],
                  sampling: TrainConfig, out: Path) -> Path:
    """``out``: ``texts`` as rows, original | with every file in ``files`` applied (each at its strength), sampled
    as ``sampling`` says (seed, size, steps; the folder's shift). Files and folder are checked before the loads."""
    from .apply import check_before_loading, install_lora
    from .backends.diffusers_loader import (check_model_folder, check_size, folder_fingerprint, load_decoder,
                                            load_diffusers_zimage)
    from .lora_file import load_lora

    loras = [load_lora(f) for f in files]  # a damaged or foreign file is told before minutes of loading
    shift = check_model_folder(folder)
    if not (Path(folder) / "vae").is_dir():
        raise ZEraseError(f"{folder} has no vae/ to decode the pictures with; restore it from the model's download.")
    check_size(folder, sampling.height, sampling.width)
    model = folder_fingerprint(folder)
    for path, lora in zip(files, loras):
        _named(path, check_before_loading, lora, model)
    backend = load_diffusers_zimage(folder)
    decode = load_decoder(folder, backend.device, backend.dtype)
    prompts = backend.encode(texts)
    backend.release_encoder()
    for i, (path, lora) in enumerate(zip(files, loras)):  # install checks the projections' widths, now loaded
        _named(path, install_lora, backend, lora, name=f"compared_{i}", strength=strengths[i], frozen_in=False)
    sampling = replace(sampling, shift=shift if shift is not None else sampling.shift)
    return save_png(comparison(backend, prompts, sampling, decode)[0], out)


def _named(path: Path, work: Callable[..., Any], *args, **kwargs) -> Any:
    """``work(*args, **kwargs)``, its refusal prefixed with the file it is about (several are compared at once)."""
    try:
        return work(*args, **kwargs)
    except ZEraseError as err:
        raise ZEraseError(f"{path}: {err}") from err
