"""Resumable training state: LoRA + optimizer + λ + RNG + step + history, as safetensors.

Resuming from a checkpoint continues exactly where the run stopped: the same prompts,
noise and timesteps follow, because both random generators are restored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from .config import OUT_OF_MEMORY, TrainConfig
from .errors import ZEraseError, shown
from .files import atomic_save, check_writable, decode_metadata
from .history import StepRecord
from .lagrangian import rule_for
from .run_files import resumable
from .typed import json_object, settle

if TYPE_CHECKING:
    from .backends.base import Backend
    from .trainer import ZEraseTrainer

KIND = "zerase-checkpoint"
log = logging.getLogger(__name__)


def save_checkpoint(trainer: "ZEraseTrainer", path: Path, non_finite_stop: bool = False) -> Path:
    tensors = {"rng.torch": trainer.gen.get_state()} | {_name(key, part): p for key, part, p in _lora_params(trainer)}
    optim = trainer.optimizer.state_dict()
    for index, state in optim["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    meta = {
        "kind": KIND,
        "step": trainer.step,
        "seconds": trainer.seconds,
        "lambda": trainer.lambda_rule.state(),
        "python_rng": _jsonable(trainer.rng.getstate()),
        "param_groups": optim["param_groups"],
        "config": trainer.config.to_dict(),
        "fingerprint": trainer.backend.fingerprint(),
        "base": trainer.base_digest,
        "history": [asdict(r) for r in trainer.history],
        "caller": trainer.checkpoint_meta,
        "non_finite_stop": non_finite_stop,
        # From which step and why the run checkpointed: a run that ran out of memory under "auto" keeps it when
        # resumed, from that step (GradientCheckpointing.resume).
        "gradient_checkpointing_from": trainer.checkpointing.from_step,
        "gradient_checkpointing_reason": trainer.checkpointing.reason,
    }
    return atomic_save(tensors, path, meta)


def check_run_files(lora: Path, checkpoint: Path, config: TrainConfig, backend: "Backend | None", resume: bool,
                    advice: str) -> None:
    """Before any work: both files of a run of ``config`` on ``backend`` can be written, and its checkpoint is one
    this run may continue (``resume``) or, starting anew, no stopped run's that it would replace (``advice``: how to
    continue or start over, in the caller's words). ``backend`` None: all but the model's architecture and digest,
    for a caller about to load the model (minutes), which checks them again once it is loaded."""
    for path in (lora, checkpoint):
        check_writable(path)  # not at the first save, after the model is loaded and the x_t pool sampled
    if not resume:
        _refuse_replacing(checkpoint, advice)
    elif checkpoint.exists():  # before any work; the model's digest is made only here, where it is compared
        meta = _read(checkpoint, tensors=False)[1]
        if backend is None:
            _refuse_other_settings(checkpoint, meta, config)
        else:
            _refuse_mismatch(checkpoint, meta, config, backend.fingerprint(), backend.base_digest())


def _refuse_replacing(path: Path, advice: str) -> None:
    """A new run must not write over the checkpoint of a stopped one: that run could not be continued any more.

    ``advice``: how the caller resumes it, or starts over elsewhere.
    """
    if not path.exists():
        return
    try:
        meta = _read(path, tensors=False)[1]
        if meta.get("non_finite_stop"):  # resuming would repeat the failed step: the fix is a new run, here
            log.warning("%s: replacing the checkpoint of a run stopped by NaN at step %s", path,
                        shown(str(meta["step"])))
            return
        _saved_config(path, meta)  # one this version cannot read cannot be resumed by it either
        at = f" stopped at step {int(meta['step'])} of {int(meta['config']['steps'])}"
    except Exception as err:  # a damaged checkpoint is still the user's file: refuse all the same, but no resume
        cause = err.__cause__ if isinstance(err, ZEraseError) and err.__cause__ else err
        raise ZEraseError(f"{path} is a checkpoint that cannot be read ({type(cause).__name__}: {shown(str(cause))}), "
                          "so no run can resume from it; a new run here would replace it. Delete or move that file, or "
                          "start the run elsewhere.") from err
    raise ZEraseError(f"{path} holds a run{at} that can still be resumed; starting another here would replace it. "
                      f"{advice}")


# A checkpoint that cannot be resumed still refuses a new run beside it (it is the user's file): the way out.
START_ELSEWHERE = ("Start a fresh run under another name (the command line's --out, the node's save_name); this "
                   "file stays as it is")


def _read(path: Path, tensors: bool) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            meta = decode_metadata(raw)
            if isinstance(meta.get("base"), (int, float)):  # a digest stored unquoted before quoting ("1234e5…")
                meta["base"] = raw["base"]                   # reads back as a number; its text is the digest
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), meta
    except Exception as err:  # safetensors raises several types for damaged files
        raise ZEraseError(f"Cannot read the checkpoint {path}: {shown(str(err))}. {START_ELSEWHERE}.") from err


def _saved_config(path: Path, meta: dict) -> TrainConfig:
    """The settings a checkpoint was made with, refused by name when this version cannot read them."""
    try:
        return TrainConfig.from_dict(meta["config"])
    # a setting this version does not know, or none at all; one the settings refuse (lr: 10**400, which no float holds)
    except (KeyError, TypeError, ValueError) as err:
        raise ZEraseError(f"The checkpoint {path.name} holds settings this version of the pack cannot read "
                          f"({shown(str(err))}); it was made by another version, or is damaged. {START_ELSEWHERE}."
                          ) from err


def _refuse_mismatch(path: Path, meta: dict, config: TrainConfig, fingerprint: dict, base: str | None) -> None:
    """Refuse a checkpoint that a run of ``config`` on this model (its architecture ``fingerprint`` and ``base``
    digest: see Backend.base_digest) cannot continue."""
    if meta.get("kind") == KIND:  # a checkpoint of ours records its model's architecture
        try:
            recorded = json_object(meta.get("fingerprint"), "its fingerprint")  # not text past JSON's limits, a list
        except TypeError as err:
            raise ZEraseError(_damaged(path, err)) from err
        if recorded != fingerprint:  # told first: its settings do not matter
            raise ZEraseError(f"The checkpoint {path.name} belongs to another model architecture; resume on the "
                              "model it was trained on, or start a fresh run.")
    _refuse_other_settings(path, meta, config)
    if meta.get("base") is not None and meta["base"] != base:
        # base None: this model carries something the digest cannot describe, so it cannot be told the same
        raise ZEraseError(f"The checkpoint {path} was trained on another model: on the command line another "
                          "--model folder (a fine-tune of the same sizes); in ComfyUI another model file or other "
                          "LoRAs applied to it, or this one carries a change that cannot be identified (hooks, bypass "
                          "LoRAs). Resume on the same model or start a fresh run.")


def _refuse_other_settings(path: Path, meta: dict, config: TrainConfig) -> None:
    """Refuse a checkpoint whose settings or step a run of ``config`` cannot continue, whatever the model."""
    if meta.get("kind") != KIND:
        raise ZEraseError(f"{path} is not a Z-Erase training checkpoint.")
    saved, wanted = (_flat_settings(resumable(c.to_dict())) for c in (_saved_config(path, meta), config))
    changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if changed:
        changes = "; ".join(f"{k}: {_brief(saved.get(k))} then, {_brief(wanted.get(k))} now" for k in changed)
        raise ZEraseError(
            f"The checkpoint {path.name} was made with different settings ({changes}); resume with the same settings "
            "(only the number of steps, the checkpoint interval and gradient checkpointing may change) or start a "
            "fresh run.")
    try:
        step = int(meta["step"])
    except (KeyError, TypeError, ValueError, OverflowError) as err:  # OverflowError: int(Infinity)
        raise ZEraseError(_damaged(path, err)) from err
    if step < 0:  # no run writes one: resumed, it trained past its steps (a huge one never ended), mislabelled
        raise ZEraseError(_damaged(path, ValueError(f"step {step} is negative")))
    if step > config.steps:  # the loop would not run, and the LoRA would be past its steps
        raise ZEraseError(
            f"The checkpoint {path.name} is at step {step}, past this run's {config.steps} steps; "
            f"set the steps (--steps) to {step} or more to continue it, or start a fresh run.")


def _brief(value, most: int = 80) -> str:
    """A setting as a refusal shows it: a long one cut (the demo's templates, drawn from its seed, ran to thousands
    of characters)."""
    text = repr(value)
    if len(text) <= most:
        return text
    count = f", {len(value)} in all" if isinstance(value, (list, tuple)) else ""
    return f"{text[: most - 20]}…{count}"


def _flat_settings(settings: dict) -> dict:
    """The LoRA's settings as ``lora.rank`` and so on: a changed rank was told as two whole dicts."""
    flat = {k: v for k, v in settings.items() if not isinstance(v, dict)}
    return flat | {f"{k}.{sub}": v for k, d in settings.items() if isinstance(d, dict) for sub, v in d.items()}


def load_checkpoint(trainer: "ZEraseTrainer", path: Path) -> None:
    """Continue ``trainer`` from ``path``: every part is read and checked first, so a damaged file changes nothing."""
    tensors, meta = _read(path, tensors=True)
    _refuse_mismatch(path, meta, trainer.config, trainer.backend.fingerprint(), trainer.base_digest)
    try:  # each part fails its own way: a missing key, a wrong shape, a generator state of other bytes
        factors, moments = _lora_and_moments(trainer, tensors)
        torch_rng = torch.Generator().set_state(tensors["rng.torch"]).get_state()
        python_rng = _tupled(meta["python_rng"])
        random.Random().setstate(python_rng)
        lam = _lambda_rule(trainer, meta["lambda"])
        step, seconds = int(meta["step"]), _finite(float(meta["seconds"]), "seconds")
        history = _history(meta["history"], step)
        caller = _caller(meta.get("caller", {}))
        out_of_memory_from = (int(meta["gradient_checkpointing_from"])
                              if meta.get("gradient_checkpointing_reason") == OUT_OF_MEMORY else None)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, OverflowError) as err:  # 10**400 as a float
        raise ZEraseError(_damaged(path, err)) from err
    trainer.lora.load_factors(factors)
    # AdamW's hyperparameters are the run's settings, which resuming requires to be the same: the live optimizer's
    groups = trainer.optimizer.state_dict()["param_groups"]
    trainer.optimizer.load_state_dict({"state": moments, "param_groups": groups})
    trainer.gen.set_state(torch_rng)
    trainer.rng.setstate(python_rng)
    trainer.lambda_rule, trainer.seconds, trainer.history = lam, seconds, history  # its step: len(history)
    trainer.checkpoint_meta = caller
    trainer.checkpointing.resume(trainer.step + 1, out_of_memory_from)


def _history(records: list, step: int) -> list[StepRecord]:
    """The run's step records, one for each step done: a step edited apart from them trained on from it, its LoRA
    labelled with steps it did not train."""
    history = [_record(r) for r in records]
    if len(history) != step:
        raise ValueError(f"its step is {step} and its history holds {len(history)} step record(s)")
    return history


def _record(fields: dict) -> StepRecord:
    """One step's record, each field of its type and every number finite (training refuses a non-finite loss): a NaN
    or a string there trained to the end, then wrote a LoRA that loading refuses, or failed at its export."""
    record = StepRecord(**json_object(fields, "a step record"))
    settle(record)
    for field in dataclasses.fields(record):  # every number, so a field added later is checked too
        if field.type in ("float", float):  # the annotation, as a string under postponed evaluation
            _finite(getattr(record, field.name), f"step {record.step}'s {field.name}")
    return record


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}")
    return value


def _caller(notes) -> dict[str, str]:
    """What the program that ran the training kept in the checkpoint (the Train node: the name of its LoRA file),
    all text: a number there stopped the node with a traceback once the run was planned."""
    caller = json_object(notes, "its notes of the run's files")
    if not all(isinstance(v, str) for v in caller.values()):
        raise TypeError(f"its notes of the run's files {shown(repr(caller))} are not all text")
    return caller


ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}  # what AdamW keeps per parameter once it has stepped


def _lora_and_moments(trainer: "ZEraseTrainer", tensors: dict) -> tuple[dict, dict]:
    """The LoRA's factors and AdamW's per-parameter state (by the optimizer's index), each of the LoRA's shapes."""
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise ValueError("NaN or infinite values in its tensors")  # resumed, they stop the run as a training NaN
    optim: dict[str, dict] = {}  # AdamW's tensors by parameter index: "optim.{index}.{name}"
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim.setdefault(index, {})[name] = value
    factors, moments = {}, {}
    for index, (key, part, param) in enumerate(_lora_params(trainer)):
        name = _name(key, part)
        saved = tensors[name]
        if saved.shape != param.shape:
            raise ValueError(f"{name} has shape {tuple(saved.shape)} where the LoRA has {tuple(param.shape)}")
        factors.setdefault(key, {})[part] = saved
        kept = optim.get(str(index), {})
        if kept and (kept.keys() != ADAMW_STATE or kept["exp_avg"].shape != param.shape
                     or kept["exp_avg_sq"].shape != param.shape or kept["step"].numel() != 1):
            raise ValueError(f"AdamW's state of {name} holds {sorted(kept)}, not its moments of the LoRA's shape")
        if kept:
            moments[index] = kept
    return {key: (ab["A"], ab["B"]) for key, ab in factors.items()}, moments


def _lora_params(trainer: "ZEraseTrainer") -> list[tuple[tuple[int, str], str, torch.Tensor]]:
    """((layer, projection), "A" or "B", parameter) in the optimizer's order, which indexes AdamW's state."""
    where = {id(t): (key, part) for key, (a, b) in trainer.lora.factors().items() for part, t in (("A", a), ("B", b))}
    return [(*where[id(p)], p) for p in trainer.params]


def _name(key: tuple[int, str], part: str) -> str:
    return f"lora.{key[0]}.{key[1]}.{part}"


def _lambda_rule(trainer: "ZEraseTrainer", state):
    """A λ rule of the run's settings holding ``state`` (the rule checks each entry: ValueError)."""
    lam = rule_for(trainer.config)
    lam.load_state(json_object(state, "λ's state"))
    return lam


def _damaged(path: Path, err: BaseException) -> str:
    return (f"The checkpoint {path} is damaged ({type(err).__name__}: {shown(str(err))}); it cannot be resumed. "
            f"{START_ELSEWHERE}.")


def _jsonable(state):
    return [_jsonable(s) for s in state] if isinstance(state, (tuple, list)) else state


def _tupled(state):
    return tuple(_tupled(s) for s in state) if isinstance(state, list) else state
