"""Resumable training state: LoRA + optimizer + λ + RNG + step + history, as safetensors.

Resuming from a checkpoint continues exactly where the run stopped: the same prompts,
noise and timesteps follow, because both random generators are restored.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
from safetensors import safe_open

from .config import TrainConfig
from .errors import ZEraseError
from .files import atomic_save, decode_metadata
from .history import StepRecord
from .lora_file import read_description

if TYPE_CHECKING:
    from .trainer import ZEraseTrainer

KIND = "zerase-checkpoint"


def save_checkpoint(trainer: "ZEraseTrainer", path: Path) -> Path:
    tensors = {"rng.torch": trainer.gen.get_state()}
    for (layer, proj), (a, b) in trainer.lora.factors().items():
        tensors[f"lora.{layer}.{proj}.A"] = a
        tensors[f"lora.{layer}.{proj}.B"] = b
    optim = trainer.optimizer.state_dict()
    for index, state in optim["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    meta = {
        "kind": KIND,
        "step": trainer.step,
        "seconds": trainer.seconds,
        "lambda": trainer.lam.state(),
        "python_rng": _jsonable(trainer.rng.getstate()),
        "param_groups": optim["param_groups"],
        "config": trainer.config.to_dict(),
        "fingerprint": trainer.backend.fingerprint(),
        "history": [asdict(r) for r in trainer.history],
        "caller": trainer.checkpoint_meta,
    }
    return atomic_save(tensors, path, meta)


def _jsonable(state):
    return [_jsonable(s) for s in state] if isinstance(state, (tuple, list)) else state


def _tupled(state):
    return tuple(_tupled(s) for s in state) if isinstance(state, list) else state


def load_checkpoint(trainer: "ZEraseTrainer", path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = decode_metadata(f.metadata() or {})
    except Exception as err:  # safetensors raises several types for damaged files
        raise ZEraseError(f"Cannot read the checkpoint {path}: {err}. Start a fresh run instead.") from err
    if meta.get("kind") != KIND:
        raise ZEraseError(f"{path} is not a Z-Erase training checkpoint.")
    saved = TrainConfig.from_dict(meta["config"])
    if _comparable(saved) != _comparable(trainer.config):
        raise ZEraseError(
            f"The checkpoint {path.name} was made with different settings; resume with the same settings "
            "(only the number of steps may change) or start a fresh run."
        )
    if meta["fingerprint"] != trainer.backend.fingerprint():
        raise ZEraseError(f"The checkpoint {path.name} belongs to another model architecture.")
    factors = {}
    for (layer, proj) in trainer.lora.factors():
        factors[(layer, proj)] = (tensors[f"lora.{layer}.{proj}.A"], tensors[f"lora.{layer}.{proj}.B"])
    trainer.lora.load_factors(factors)
    state = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    trainer.gen.set_state(tensors["rng.torch"])
    trainer.rng.setstate(_tupled(meta["python_rng"]))
    trainer.lam.load_state(meta["lambda"])
    trainer.step, trainer.seconds = int(meta["step"]), float(meta["seconds"])
    trainer.history = [StepRecord(**r) for r in meta["history"]]
    trainer.checkpoint_meta = dict(meta.get("caller", {}))


def partial_lora(trainer: "ZEraseTrainer", candidates: Iterable[Path]) -> Path | None:
    """Which of ``candidates`` is the LoRA file a stopped run saved beside its checkpoint, once the trainer has
    resumed from that checkpoint: trained with these settings on this architecture, stopped at the resumed step
    or before it (a run resumed once and then killed between checkpoints left its file from the earlier stop).

    The finished run replaces that file instead of landing beside it under the next free name. The caller names
    the candidates (the node: the one file its checkpoint recorded), so another run's file is never taken for it.
    """
    wanted = _as_json([_comparable(trainer.config), trainer.backend.fingerprint()])
    for path in candidates:
        info = read_description(path)
        training = dict(info.get("training", {}))
        done = training.pop("steps_done", None)
        training.pop("seconds", None)
        same_run = _as_json([_comparable_dict(training), info.get("fingerprint")]) == wanted
        if same_run and isinstance(done, int) and 0 < done <= trainer.step:
            return path
    return None


def _as_json(value):
    """``value`` as its JSON metadata round trip holds it (tuples become lists)."""
    return json.loads(json.dumps(value))


def _comparable(config: TrainConfig) -> dict:
    return _comparable_dict(config.to_dict())


def _comparable_dict(data: dict) -> dict:
    """Settings that must match to continue a run: all but the step count and the checkpoint interval."""
    return {k: v for k, v in data.items() if k not in ("steps", "checkpoint_every")}
