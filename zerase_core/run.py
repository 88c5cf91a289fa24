"""A training run outside ComfyUI: progress bar, resumable checkpoint, LoRA + curves + history on disk."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from .backends.base import Backend
from .config import TrainConfig
from .errors import ZEraseError
from .history import TrainResult, loss_series
from .lora_file import save_lora
from .render import curves, to_pil
from .trainer import ZEraseTrainer

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LORA = "erasure_lora.safetensors"


def progress_bar(total: int, initial: int = 0, label: str = "Z-Erase"):
    """A tqdm bar whose postfix shows the per-term losses and λ; returns the step callback and the bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=label, unit="step", dynamic_ncols=True)

    def on_step(record, trainer) -> None:
        bar.update(1)
        bar.set_postfix(erase=f"{record.erase:.4f}", attn=f"{record.attn:.3f}", pr=f"{record.pr:.2e}",
                        lam=f"{record.lam:.3f}")

    return on_step, bar


def every(n: int, callback):
    """Run ``callback(record, trainer)`` every ``n`` steps (previews, logging, custom checkpoints)."""

    def maybe(record, trainer) -> None:
        if n > 0 and record.step % n == 0:
            callback(record, trainer)

    return maybe


def write_curves(result: TrainResult, path: Path, title: str) -> Path:
    to_pil(curves(loss_series(result.history), title=title)[0]).save(path)
    return path


def train_and_save(backend: Backend, config: TrainConfig, out: Path, resume: bool = False,
                   callbacks=(), release_encoder: bool = False) -> tuple[TrainResult, Path]:
    """Train into folder ``out``: erasure_lora.safetensors, curves.png, history.json, checkpoint.

    ``release_encoder`` frees the text encoder as soon as the run's prompts are encoded.
    """
    out.mkdir(parents=True, exist_ok=True)
    lora_path = out / LORA
    if lora_path.exists() and not resume:
        raise ZEraseError(f"{lora_path} exists; choose another output folder (files are never overwritten).")
    trainer = ZEraseTrainer(backend, config, checkpoint_path=out / CHECKPOINT, release_encoder=release_encoder)
    if resume:
        if not (out / CHECKPOINT).exists():
            raise ZEraseError(f"No checkpoint to resume in {out}; run without --resume.")
        trainer.resume(out / CHECKPOINT)
    on_step, bar = progress_bar(config.steps, trainer.step)
    trainer.callbacks.extend([on_step, *callbacks])
    try:
        result = trainer.run()
    finally:
        bar.close()
    save_lora(result.lora, lora_path)  # atomic; a resumed run replaces its own earlier file
    write_curves(result, out / "curves.png", f"Z-Erase '{config.concept}': {len(result.history)} steps")
    (out / "history.json").write_text(json.dumps([asdict(r) for r in result.history]))
    log.info("wrote %s", lora_path)
    return result, lora_path
