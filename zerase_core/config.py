"""Training settings: one frozen dataclass, each default in exactly one place.

Defaults are the paper's (§5.1: AdamW, 1000 steps, α = 1e-3, β = 0.1, η = 2) and its
Table 6 tolerances and Table 7 templates, chosen by concept type through a preset.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ZEraseError, shown
from .lagrangian import MODES
from .lora import LoRAConfig
from .lora_file import STRENGTH_MAX
from .prompts import EMPTY_CONCEPT, concept_words, is_blank
from .sampling import flow_sigmas
from .seeds import SEED_RANGE, valid_seed
from .typed import json_object, settle


XT_SOURCES = ("pool", "fresh")  # where x_t comes from, the default first: see trainer.py and xt_pool.py
# Gradient checkpointing, the default first. auto: from the start where a step would not fit the memory free on the
# device without it (memory_fit.py), else without it (faster), or from a step that runs out of memory after all (the
# same gradients; trainer.py). on: from the start, every main layer but the last (whose checkpointing saves nothing:
# memory_fit.most_checkpointed). off: never.
CHECKPOINTING_MODES = ("auto", "on", "off")
# Why "auto" turned it on (kept beside the step, in checkpoints too; the Train node's curves say it).
TOO_LITTLE_MEMORY = "too little memory free without it"
OUT_OF_MEMORY = "out of memory without it"


@dataclass(frozen=True)
class Preset:
    epsilon: float  # Table 6
    template: str  # Table 7's prompt template for the category


PRESETS: dict[str, Preset] = {
    "nsfw": Preset(1e-3, "{}"),  # nudity, violence: sensitive, tight preservation
    "style": Preset(1e-3, "An art in the style of {}"),
    "entity": Preset(1e-2, "A photo of {}"),
    "abstract": Preset(1e-2, "A close scene of {}"),
    "celebrity": Preset(1e-2, "A photo of {}"),
    "utility": Preset(5e-3, "{}"),  # post-erase LoRA use: editability
}


LR_RANGE = (1e-8, 1.0)  # AdamW's α: the nodes offer 1e-6 … 1


@dataclass(frozen=True)
class TrainConfig:
    concept: str
    preset: str = "entity"
    templates: tuple[str, ...] = ()  # erase prompt templates with '{}'; empty: the preset's
    preserve: tuple[str, ...] = ()  # preservation concepts (paper's D_pr), e.g. ("person",)
    steps: int = 1000
    lr: float = 1e-3  # α
    beta: float = 0.1  # β, the λ learning rate
    eta: float = 2.0  # η, negative guidance
    epsilon: float | None = None  # ε; None: the preset's
    lambda_mode: str = "paper"  # paper | paired | exact | fixed (lagrangian.py)
    fixed_lambda: float = 1.0  # λ in fixed mode
    attn_weight: float = 1.0  # weight of L_attn in L_er (Eq. 7 uses 1); 0 switches it off
    shuffle_pool: int = 8  # shuffled-word variants per template, encoded once (§4.1)
    height: int = 512
    width: int = 512
    sample_steps: int = 8  # Euler steps of the ESD-style trajectory to x_t (Turbo: 8)
    shift: float = 3.0  # Z-Image's flow shift
    sample_cfg: float = 1.0  # CFG while sampling x_t (Turbo runs without: 1.0)
    # pool: trajectories sampled once from the frozen model (xt_pool.py); fresh: sampled every step by the
    # model being trained, as ESD does. The pool is the default by cost: fresh erased more on the toy but
    # takes about twice as long and misses the speed targets (README, "Where x_t comes from").
    xt_source: str = "pool"
    xt_pool: int = 32  # trajectories in the pool (each gives sample_steps training points)
    seed: int = 0
    checkpoint_every: int = 100
    gradient_checkpointing: str = "auto"  # one of CHECKPOINTING_MODES
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        settle(self)  # first: every check below reads the values as their types
        if is_blank(self.concept):
            raise ZEraseError(EMPTY_CONCEPT)
        self._check_choices()
        self._check_numbers()
        self._check_preserve()

    def _check_choices(self) -> None:
        if self.preset not in PRESETS:
            raise ZEraseError(f"Unknown concept-type preset '{self.preset}'; choose one of {sorted(PRESETS)}.")
        if self.lambda_mode not in MODES:
            raise ZEraseError(f"Unknown λ mode '{self.lambda_mode}'; choose one of {MODES}.")
        if self.gradient_checkpointing not in CHECKPOINTING_MODES:
            raise ZEraseError(f"gradient_checkpointing must be one of {CHECKPOINTING_MODES}; got "
                              f"{self.gradient_checkpointing!r}.")
        if self.xt_source not in XT_SOURCES:
            raise ZEraseError(f"xt_source must be one of {XT_SOURCES}; got {self.xt_source!r}.")

    def _check_numbers(self) -> None:
        if self.xt_pool < 1:
            raise ZEraseError(f"The x_t pool needs at least 1 trajectory (xt_pool; --xt-pool or --pool on the command "
                              f"line); got {self.xt_pool}.")
        # Only floats can be NaN or infinite: every float setting is checked, one added later too.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        unreal = [f"{name}={value}" for name, value in values.items() if isinstance(value, float)
                  and not math.isfinite(value)]
        if unreal:  # NaN passes every comparison below: max(0, NaN) is 0 and would switch preservation off
            raise ZEraseError(f"Settings must be finite numbers; got {', '.join(unreal)}.")
        bounds = (("steps", self.steps, self.steps >= 1, "≥ 1"),
                  ("checkpoint_every", self.checkpoint_every, self.checkpoint_every >= 1, "≥ 1"),
                  ("sample_steps", self.sample_steps, self.sample_steps >= 1, "≥ 1 (Turbo samples in 8)"),
                  ("shuffle_pool", self.shuffle_pool, self.shuffle_pool >= 0, "≥ 0 (0: no shuffled variants)"),
                  ("sample_cfg", self.sample_cfg, self.sample_cfg >= 0, "≥ 0 (Turbo samples without CFG: 1)"),
                  ("β (beta)", self.beta, self.beta >= 0, "≥ 0"),
                  ("η (eta)", self.eta, self.eta >= 0, "≥ 0 (η < 0 would strengthen the concept, not erase it)"),
                  # < 0 would reward the attention on the concept (Eq. 6), or the rise of L_pr (Eq. 8)
                  ("attn_weight", self.attn_weight, self.attn_weight >= 0, "≥ 0 (0 switches L_attn off)"),
                  ("fixed_lambda", self.fixed_lambda, self.fixed_lambda >= 0, "≥ 0 (0 switches L_pr off)"),
                  # it multiplies ΔW in training and is stored in the file: 0 trains nothing (no gradient reaches
                  # the LoRA), and outside these bounds the trained LoRA (lora_file.ErasureLoRA) is refused, after
                  # the run
                  ("lora.strength", self.lora.strength, 0 < self.lora.strength <= STRENGTH_MAX,
                   f"> 0 and ≤ {STRENGTH_MAX:g} (1: as trained; Apply's strength scales it later)"))
        broken = [f"{name} must be {rule}; got {value}" for name, value, ok, rule in bounds if not ok]
        if broken:  # each named with its value: "--steps 0" is told as such
            raise ZEraseError("; ".join(broken) + ".")
        if not LR_RANGE[0] <= self.lr <= LR_RANGE[1]:  # beyond: AdamW's step overflows the LoRA, or β/α does λ
            raise ZEraseError(f"The learning rate must be between {LR_RANGE[0]:g} and {LR_RANGE[1]:g} (the paper's "
                              f"is 1e-3); got {self.lr:g}.")
        if not valid_seed(self.seed):
            raise ZEraseError(f"The seed must be {SEED_RANGE}; got {self.seed}.")
        if self.epsilon is not None and self.epsilon < 0:  # the Train node reads a negative ε as "the preset's"
            raise ZEraseError(f"ε is the rise of L_pr a step may cause (Eq. 9), ≥ 0; got {self.epsilon}. Leave it "
                              "out for the preset's (Table 6).")
        if self.shift <= 0:  # σ' = shift·σ/(1 + (shift − 1)·σ) is 0/0 at σ = 1 for shift 0
            raise ZEraseError(f"The flow shift must be > 0; got {self.shift} (Z-Image's is 3: check "
                              "ModelSamplingAuraFlow).")
        if not _falling(flow_sigmas(self.sample_steps, self.shift)):
            raise ZEraseError(f"A flow shift of {self.shift:g} with {self.sample_steps} sampling steps gives σ levels "
                              "that float32 cannot tell apart or hold (the x_t pool keeps x_t at each level); choose a "
                              "shift between 0.01 and 100 (Z-Image's is 3; ComfyUI's ModelSamplingAuraFlow takes up "
                              "to 100) or fewer sample_steps.")
        if self.height < 1 or self.width < 1:
            raise ZEraseError(f"The resolution must be positive; got {self.height}×{self.width}.")

    def _check_preserve(self) -> None:
        if any(is_blank(p) for p in self.preserve):
            raise ZEraseError("A preservation concept is empty; remove it or type a word.")
        if any(concept_words(p) == concept_words(self.concept) for p in self.preserve):
            raise ZEraseError(
                f"'{shown(self.concept)}' is both the concept to erase and a preservation concept; "
                "remove it from the preservation list (preserve what should stay, e.g. 'person' when erasing 'nude')."
            )

    @property
    def eps(self) -> float:
        return PRESETS[self.preset].epsilon if self.epsilon is None else self.epsilon

    @property
    def erase_templates(self) -> tuple[str, ...]:
        return self.templates or (PRESETS[self.preset].template,)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"epsilon": self.eps, "templates": list(self.erase_templates)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(json_object(data, "the settings"))
        # JSON's lists become tuples in the settings (typed.settle)
        lora = LoRAConfig(**json_object(data.pop("lora", {}), "the LoRA's settings"))
        if isinstance(data.get("gradient_checkpointing"), bool):  # files before "auto" stored on/off as a bool
            data["gradient_checkpointing"] = "on" if data["gradient_checkpointing"] else "off"
        return cls(**data, lora=lora)


def _falling(sigmas) -> bool:
    """Whether a σ schedule is finite and strictly falling. The x_t pool finds each level by its σ: where two levels
    rounded to one float32 (a shift of about 1e7 or more) the earlier ones were never sampled and training drew
    uninitialised memory as x_t; a shift of about 6e-8 or less made σ₀ infinite."""
    return bool(sigmas.isfinite().all()) and bool((sigmas[1:] < sigmas[:-1]).all())
