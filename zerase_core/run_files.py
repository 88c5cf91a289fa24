"""Which saved LoRA file belongs to which run, told by the file's metadata.

Two lookups: the partial file a resumed run replaces when it finishes (instead of landing beside it), and the
finished file a repeated run takes instead of training again. A file matches by the settings it was trained with,
the model's architecture and, where the host can tell, the model itself (``Backend.base_digest``: for a ComfyUI
MODEL its file and the patches on it, and its CLIP's).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .config import TrainConfig
from .files import as_json
from .lora_file import read_description

if TYPE_CHECKING:
    from .trainer import ZEraseTrainer


# How a run executes, not what it trains (checkpointing gives the same gradients, tested): a run resumes, and a
# finished file is reused, across a change of these. Checkpointing "on" (from "off") answers running out of memory.
EXECUTION_ONLY = ("checkpoint_every", "gradient_checkpointing")


def trained_as(settings: dict) -> dict:
    """The settings that decide what a run trains: all but :data:`EXECUTION_ONLY`."""
    return {k: v for k, v in settings.items() if k not in EXECUTION_ONLY}


def resumable(settings: dict) -> dict:
    """Settings that must match to continue a run: what it trains, but for the step count."""
    return {k: v for k, v in trained_as(settings).items() if k != "steps"}


def partial_lora(trainer: "ZEraseTrainer", candidates: Iterable[Path]) -> Path | None:
    """Which of ``candidates`` is the LoRA file a stopped run saved beside its checkpoint, once the trainer has
    resumed from that checkpoint: the same settings and model, stopped at the resumed step or before it (a run
    resumed once and then killed between checkpoints left its file from the earlier stop).

    The caller names the candidates (the node: the one file its checkpoint recorded), so another run's file is
    never taken for it.
    """
    wanted = as_json(_run(resumable(trainer.config.to_dict()), trainer.backend.fingerprint(), trainer.base_digest))
    for path in candidates:
        run, done = _run_of(path)
        if run is None:
            continue
        # A file saved before LoRAs recorded their model has no base: its settings and architecture decide.
        candidate = {**run, "settings": resumable(run["settings"]), "base": run["base"] or trainer.base_digest}
        if as_json(candidate) == wanted and isinstance(done, int) and 0 < done <= trainer.step:
            return path
    return None


def finished_lora(config: TrainConfig, fingerprint: dict, base: str | None, candidates: Iterable[Path]) -> Path | None:
    """Which of ``candidates`` is a finished run of exactly ``config`` on this model (all steps done), if any.

    Without a ``base`` digest nothing tells this model from another of its architecture (a fine-tune, another
    stack of LoRAs): no file is taken then.
    """
    if base is None:
        return None
    wanted = as_json(_run(trained_as(config.to_dict()), fingerprint, base))
    for path in candidates:
        run, done = _run_of(path)
        if run is not None and as_json(run) == wanted and done == config.steps:
            return path
    return None


def _run(settings: dict, fingerprint: dict, base: str | None) -> dict[str, Any]:
    return {"settings": settings, "fingerprint": fingerprint, "base": base}


def _run_of(path: Path) -> tuple[dict[str, Any] | None, Any]:
    """(the run a native LoRA file describes, by what it trained (:func:`trained_as`), the steps it had done);
    (None, None) for anything else."""
    info = read_description(path)
    if not info:
        return None, None
    settings = trained_as(dict(info.get("training", {})))
    done = settings.pop("steps_done", None)
    settings.pop("seconds", None)
    base = settings.pop("base", None)
    return _run(settings, info.get("fingerprint"), base), done
