"""A training run outside ComfyUI: progress bar, resumable checkpoint, LoRA + curves + history on disk."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import memory_fit
from .backends.base import Backend
from .config import TrainConfig
from .checkpoint import check_run_files
from .errors import ZEraseError
from .ctrl_c import ctrl_c_deferred
from .files import atomic_write_text, check_writable
from .history import TrainResult, loss_series, run_title
from .lora_file import read_description, save_lora
from .render import curves, save_png
from .run_lock import refuse_a_file
from .trainer import NonFiniteLoss, ZEraseTrainer

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LORA = "erasure_lora.safetensors"
CURVES = "curves.png"
HISTORY = "history.json"


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
    return save_png(curves(loss_series(result.history), title=title)[0], path)


@dataclass(frozen=True)
class PlannedRun:
    """A run of ``config`` on ``backend`` into ``folder``, continuing a stopped one when ``resume``.

    Made only once it is sure its LoRA and checkpoint can be written and nothing is lost: everything that would stop
    the run later (a folder that cannot be written, a checkpoint of other settings) is refused when it is built,
    before any work (the demo's measurements included). ``also_writes`` names the caller's own files in the folder
    (the demo's report and pictures): a fresh run refuses a folder that holds any of them, as it refuses one that
    holds a LoRA, so nothing of an earlier run is overwritten.
    """

    backend: Backend
    config: TrainConfig
    folder: Path
    resume: bool = False
    also_writes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_folder(self.folder, self.config, self.resume, self.also_writes, self.backend)

    @property
    def lora(self) -> Path:
        return self.folder / LORA

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT


def check_folder(folder: Path, config: TrainConfig, resume: bool, also_writes: tuple[str, ...] = (),
                 backend: Backend | None = None) -> None:
    """What PlannedRun refuses (see it). ``backend`` None: all of it that needs no model, for a caller about to load
    one (minutes on Z-Image): the folder, and a checkpoint of other settings; its model is compared once loaded."""
    # os.path's checks, which answer False where Path's raise (a name too long): check_run_files then refuses such a
    # folder by name. Nothing is created before a refusal.
    checkpoint = folder / CHECKPOINT
    refuse_a_file(folder)
    if resume and not os.path.exists(checkpoint):
        raise ZEraseError(f"No checkpoint to resume in {folder}; run without --resume.")
    taken = [name for name in (LORA, CURVES, HISTORY, *also_writes) if os.path.lexists(folder / name)]
    if not resume and taken:
        more = ", or add --resume to continue (or extend) its run" if os.path.exists(checkpoint) else ""
        raise ZEraseError(f"{folder} holds {', '.join(taken)} of an earlier run; choose another --out (files are "
                          f"never overwritten){more}.")
    for name in (CURVES, HISTORY):  # the run's other files; the LoRA and the checkpoint: check_run_files
        check_writable(folder / name)  # a folder in a file's place: refused now, not after the training
    check_run_files(folder / LORA, checkpoint, config, backend, resume,
                    "Run the same command with --resume to continue it; to start over instead, choose another --out "
                    "or delete that file.")


def train_and_save(run: PlannedRun, callbacks=(), release_encoder: bool = False) -> tuple[TrainResult, Path]:
    """Train ``run`` into its folder: erasure_lora.safetensors, curves.png, history.json, checkpoint.

    ``release_encoder`` frees the text encoder as soon as the run's prompts are encoded. A stopped run (Ctrl-C, NaN)
    leaves its LoRA so far and its checkpoint, and says how to continue it.
    """
    config = run.config
    try:  # encoding the prompts and sampling the x_t pool take a while on a real model: Ctrl-C lands here too
        trainer = ZEraseTrainer(run.backend, config, checkpoint_path=run.checkpoint, release_encoder=release_encoder,
                                resume_from=run.checkpoint if run.resume else None)
    except (KeyboardInterrupt, torch.OutOfMemoryError) as err:
        why = _why(err)
        if run.resume:
            raise ZEraseError(f"{why} while preparing to continue the run; its checkpoint is as it was: run the same "
                              "command with --resume.") from err
        raise ZEraseError(f"{why} before the first step (while preparing the run); nothing was saved.") from err
    finished = trainer.step == config.steps  # a finished run resumed: nothing to train
    if finished:
        log.info("%s: every one of its %d steps is done; nothing to train (a larger --steps extends the run)",
                 run.checkpoint, config.steps)
    on_step, bar = progress_bar(config.steps, trainer.step)
    trainer.callbacks.extend([on_step, *callbacks])
    try:
        result = trainer.run()
    except (KeyboardInterrupt, ZEraseError, torch.OutOfMemoryError) as err:
        raise ZEraseError(_stopped(trainer, run.lora, err)) from err
    finally:
        bar.close()
    try:
        with ctrl_c_deferred():  # a second or so: Ctrl-C stops the run once all are written, not some left to --resume
            _write_outputs(run, result, trained=not finished)
    except ZEraseError as err:  # every step is in the checkpoint: say how to get the files without training again
        raise ZEraseError(f"{err}\nAll {config.steps} steps are trained and kept in {run.checkpoint}: once the file "
                          "can be written, run the same command with --resume to write it (nothing is trained "
                          "again).") from err
    return result, run.lora


def _write_outputs(run: PlannedRun, result: TrainResult, trained: bool) -> None:
    """The run's LoRA, curves and history, each written atomically (a resumed run replaces its own). A finished run
    resumed (nothing ``trained``) keeps those that already hold every step: only one missing, or left behind by a stop
    while they were written, is written again."""
    done, history = len(result.history), run.folder / HISTORY
    lora_done = not trained and read_description(run.lora).get("training", {}).get("steps_done") == done
    history_done = not trained and _records(history) == done
    if not lora_done:
        save_lora(result.lora, run.lora)
        log.info("wrote %s", run.lora)
    if not (history_done and (run.folder / CURVES).exists()):
        write_curves(result, run.folder / CURVES, run_title(run.config, done))
    if not history_done:
        atomic_write_text(history, json.dumps([asdict(r) for r in result.history]))


def _records(path: Path) -> int | None:
    """How many steps a history.json holds; None for none or a damaged one (also one nested past the parser's
    recursion limit)."""
    try:
        return len(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, RecursionError):
        return None


def _stopped(trainer: ZEraseTrainer, lora_path: Path, err: BaseException) -> str:
    """What a stopped run left (its last good LoRA, saved here, and its checkpoint) and how to continue it."""
    why = _why(err, trainer)
    if trainer.step == 0:
        return f"{why} before the first step; nothing was saved."
    if trainer.torn:  # out of memory inside AdamW's update, which moved part of the LoRA: it is neither step's
        again = ("its last checkpoint resumes exactly: run the same command with --resume" if
                 trainer.checkpoint_path.exists() else "start it anew in another --out")
        return f"{why} after step {trainer.step}, inside the optimizer's update; nothing was saved: {again}."
    if not trainer.params_finite():  # an update overflowed the LoRA: nothing of it is worth keeping
        return (f"{why} at step {trainer.step} with the LoRA's weights no longer finite; nothing was saved. Start a "
                "fresh run with a lower learning rate (train: --lr).")
    at = f"{why} at step {trainer.step} of {trainer.config.steps}."
    try:
        with ctrl_c_deferred(stopping=True):  # a second Ctrl-C waits for it (it aborted it): the run stops anyway
            save_lora(trainer.export(), lora_path)  # as the node does at Cancel: the LoRA so far, replaced when resumed
    except ZEraseError as failed:  # a full disk: its message must not hide what stopped the run and what resumes it
        resumes = trainer.checkpoint_path.exists() and not isinstance(err, NonFiniteLoss)
        then = (f"The last checkpoint written, {trainer.checkpoint_path}, resumes the run: free disk space and run "
                "the same command with --resume." if resumes else "Free disk space and start the run anew elsewhere.")
        return f"{at} The LoRA so far could not be saved ({failed})\n{then}"
    where = f"{at} The LoRA so far is in {lora_path}"
    if isinstance(err, NonFiniteLoss):  # the checkpoint would run into the same step, with the same settings
        return (f"{where} (its last good weights). Resuming would repeat the step that failed: start a fresh run "
                "with another --out and a lower learning rate (train: --lr).")
    if not trainer.checkpoint_path.exists():  # its first save failed (a full disk): nothing to resume from
        return f"{where}; no checkpoint could be saved, so the run cannot be continued: start it anew in another --out."
    return f"{where}, the checkpoint beside it: run the same command with --resume to continue."


def _why(err: BaseException, trainer: ZEraseTrainer | None = None) -> str:
    """The first words of a stopped run's message: what stopped it (Ctrl-C says nothing more)."""
    if isinstance(err, KeyboardInterrupt):
        return "Stopped"
    detail = _out_of_memory(err, trainer) if isinstance(err, torch.OutOfMemoryError) else str(err)
    return f"{detail}\nStopped"


def _out_of_memory(err: torch.OutOfMemoryError, trainer: ZEraseTrainer | None = None) -> str:
    """What to do when the device ran out of memory after the trainer's own answer (auto: as many layers
    checkpointed as on, the step taken again), or while the x_t pool was sampled (``trainer`` None). Resolution and
    rank decide what a run trains, so a resumed run keeps them: only a new run can lower them."""
    detail = str(err).splitlines()[0] if str(err) else "no detail"
    if trainer is None:  # the pool is sampled without the LoRA, one trajectory at a time by then
        return f"Out of memory ({detail}). Free what other programs hold, or choose a lower --resolution."
    backend, more = trainer.backend, ""
    if backend.checkpointed_layers < memory_fit.most_checkpointed(backend.n_layers):
        resumable = trainer.step > 0 and trainer.checkpoint_path.exists()
        more = f"; or run again with --gradient-checkpointing on (the least memory){' and --resume' * resumable}"
    return (f"Out of memory ({detail}). Free what other programs hold, or start a new run with a lower "
            f"--resolution or --rank{more}.")
