"""What a training run leaves behind: one record per step, and the finished run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .lora_file import ErasureLoRA


@dataclass(frozen=True)
class StepRecord:
    step: int
    erase: float  # L_erase
    attn: float  # L_attn
    pr: float  # L_pr
    lam: float  # λ used in this step's loss
    g: float  # g̃ of Eq. 15 (paper and paired modes), else 0
    sigma: float
    seconds: float
    pr_recomputed: bool = False  # λ_t = 0 but λ_{t+1} > 0: L_pr was rerun with a graph


@dataclass(frozen=True)
class TrainResult:
    lora: ErasureLoRA
    history: tuple[StepRecord, ...]
    seconds: float
    completed: bool  # False when stopped early (cancelled)


def loss_series(history: Sequence[StepRecord]) -> dict[str, list[float]]:
    """The per-step curves a run is judged by: the three terms and λ (what ``render.curves`` draws)."""
    return {"L_erase": [r.erase for r in history], "L_attn": [r.attn for r in history],
            "L_pr": [r.pr for r in history], "lambda": [r.lam for r in history]}


def stored_series(history: Sequence[StepRecord], points: int = 2000) -> dict[str, list[float]]:
    """:func:`loss_series` as a LoRA file keeps it (its curves can be drawn again without the run): at most
    ``points`` evenly spaced steps, 6 significant digits."""
    stride = max(1, math.ceil(len(history) / points))
    return {name: [float(f"{v:.6g}") for v in values[::stride]] for name, values in loss_series(history).items()}


def run_title(config, steps: int) -> str:
    """A run's name on its loss curves (a TrainConfig's concept) and its steps. Without preservation concepts the
    picture says so: the engine's warning goes to the console, which ComfyUI users rarely read, and the curves are
    shown on the node."""
    alone = "" if config.preserve else " (no preservation concepts)"
    return f"Z-Erase '{config.concept}'{alone}: {steps} steps"
