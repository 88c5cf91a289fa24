"""The gated LoRA layer (paper Eq. 4): H' = H W + S_T H ΔW, ΔW = B A on chosen output slices.

:class:`GatedLoRALinear` wraps a frozen ``nn.Linear`` (kept as ``base_layer``, as peft's
tuner layers do) whose output is one projection (diffusers' ``to_q``) or several stacked
ones (ComfyUI's fused ``qkv``). Each named slice ("q", "k", "v") may carry a low-rank
update. Updates are computed on text rows only and written into a copy of the base output,
so image rows are the base projection's rows bit for bit. LoRA parameters are fp32 whatever
the base dtype; several adapters on one layer add up.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ZEraseError
from .gate import TokenGate
from .typed import settle

PROJECTIONS = ("q", "k", "v")
FP32_MAX = torch.finfo(torch.float32).max


def finite_in_fp32(*values: float) -> bool:
    """Finite as the model computes with it: a float64 1e39 is finite in Python and inf in a float32 LoRA."""
    return all(math.isfinite(v) and abs(v) <= FP32_MAX for v in values)


def targets_from(text: str) -> tuple[str, ...]:
    """LoRA targets as typed: "qkv", "q,k,v" (the Train node's) or "q, k"; LoRAConfig checks them."""
    return tuple(text.replace(",", "").replace(" ", ""))


@dataclass(frozen=True)
class LoRAConfig:
    """Where the erasure LoRA goes and how big it is."""

    rank: int = 16
    alpha: float | None = None  # None: alpha = rank, so the stored scale alpha/rank is 1
    targets: tuple[str, ...] = PROJECTIONS  # subset of q, k, v (paper: W_Q, W_K, W_V)
    layers: tuple[int, int] | None = None  # [first, stop) of the main layers; None: all
    strength: float = 1.0  # multiplier applied at inference, stored with the weights
    # "text" is Z-Erase's gate S_T. "all" applies the LoRA to every token — the naive
    # fine-tuning of shared projections the paper shows collapsing (§3); for ablations only.
    scope: str = "text"

    def __post_init__(self):
        settle(self)
        if self.rank < 1:
            raise ZEraseError(f"LoRA rank must be at least 1, got {self.rank}.")
        if not finite_in_fp32(self.alpha or 1.0, self.strength, self.scale * self.strength):
            raise ZEraseError(f"LoRA alpha, strength and alpha / rank · strength must be finite numbers in float32 "
                              f"(|x| ≤ {FP32_MAX:.1e}); got {self.alpha}, {self.strength}, "
                              f"{self.scale * self.strength:g}.")
        if self.alpha is not None and self.alpha <= 0:  # 0: a LoRA that cannot change anything, trained for nothing
            raise ZEraseError(f"LoRA alpha must be > 0 (or None: the rank); got {self.alpha}.")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ZEraseError(f"LoRA targets must be a non-empty subset of q, k, v; got {self.targets}.")
        # A set, kept in q, k, v order: "kq" trains what "qk" trains, and a run resumed with it was refused as changed
        object.__setattr__(self, "targets", tuple(t for t in PROJECTIONS if t in self.targets))
        if self.scope not in ("text", "all"):
            raise ZEraseError(f"LoRA scope must be 'text' (Z-Erase) or 'all' (ungated ablation); got {self.scope!r}.")
        if self.layers is not None and not (0 <= self.layers[0] < self.layers[1]):
            raise ZEraseError(f"LoRA layer range must be [first, stop) with first < stop; got {self.layers}.")

    def check_width(self, width: int | None) -> None:
        """Refuse a rank above the model's width (None: the host cannot tell), beyond which a rank adds nothing: rank
        10⁹ was an allocation failure after the x_t pool was sampled."""
        if width is not None and self.rank > width:
            raise ZEraseError(f"LoRA rank {self.rank} exceeds the model's width {width}, beyond which a rank adds "
                              f"nothing; choose a rank ≤ {width}.")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def layer_indices(self, n_layers: int) -> list[int]:
        first, stop = self.layers or (0, n_layers)
        if stop > n_layers:
            raise ZEraseError(f"LoRA layer range {self.layers} exceeds the model's {n_layers} main layers.")
        return list(range(first, stop))


class LoRAAdapter(nn.Module):
    """Low-rank factors for some slices of one linear layer: ΔW_s = B_s A_s, scaled.

    ``A[s]`` is (rank, in_features); ``B[s]`` is (slice width, rank), zero-initialised so a
    fresh adapter changes nothing (peft's default init).
    """

    def __init__(self, in_features: int, widths: dict[str, int], rank: int, scale: float, strength: float = 1.0):
        super().__init__()
        self.rank, self.scale, self.strength = rank, scale, strength
        # Part of the model θ (an applied LoRA): it stays on when the gate switches the LoRA off, so the frozen
        # teacher of a LoRA trained on top is the model as applied (see GatedLoRALinear.forward, apply.install_lora).
        self.frozen_in = False
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, width in widths.items():
            a = torch.empty(rank, in_features, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A[name] = nn.Parameter(a)
            self.B[name] = nn.Parameter(torch.zeros(width, rank, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Moves go through; casts do not: ``pipe.to(torch.bfloat16)`` after applying reaches the adapters as submodules
        of the transformer, and factors cast to bf16 both lost their precision and met fp32 text rows in ``delta``."""
        def kept_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(kept_fp32, recurse)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(N, in) fp32 -> (N, width) fp32 update for slice ``name``."""
        return (x @ self.A[name].T) @ self.B[name].T * (self.scale * self.strength)


class GatedLoRALinear(nn.Module):
    """A frozen linear layer plus text-gated LoRA adapters on named output slices."""

    def __init__(self, base_layer: nn.Linear, slices: dict[str, tuple[int, int]], gate: TokenGate, scope: str = "text"):
        super().__init__()
        self.base_layer = base_layer
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1][0]))
        self.gate = gate
        self.scope = scope  # see LoRAConfig.scope
        self.adapters = nn.ModuleDict()
        # Saved, this layer is its base layer (see _saved_as_base); loaded, the base layer's weights go into it.
        self.register_state_dict_post_hook(_saved_as_base)
        self.register_load_state_dict_pre_hook(_loaded_into_base)
        self.register_load_state_dict_post_hook(_adapters_not_loaded)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, targets: tuple[str, ...], rank: int, scale: float, strength: float = 1.0,
                    device: torch.device | None = None):
        """A new adapter on ``device`` (default: the base weight's; a host that pages its weights in per call
        passes its compute device, so the optimizer's state is made where the parameters stay)."""
        widths = {t: self.slices[t][1] - self.slices[t][0] for t in targets if t in self.slices}
        adapter = LoRAAdapter(self.in_features, widths, rank, scale, strength)
        self.adapters[name] = adapter.to(device or self.base_layer.weight.device)
        return self.adapters[name]

    def _follow(self, device: torch.device) -> None:
        """Adapters onto the device the layer computes on, once. A host that offloads its weights (ComfyUI, diffusers'
        group offloading) moves the modules it knows, and the adapters, added later or held where its hooks never
        fire, may be left behind. The move keeps each Parameter (training holds references), outside inference mode,
        where it would make them inference tensors that a LoRA trained later on top could not back-propagate."""
        if any(p.device != device for p in self.adapters.parameters()):  # each: one added later may lag behind
            with torch.inference_mode(False):
                self.adapters.to(device)

    def _delta(self, x_text: torch.Tensor, adapters: list[LoRAAdapter]) -> torch.Tensor:
        """Sum of ``adapters``' updates for text rows, laid out over the full output width."""
        chunks = []
        for name, (start, end) in self.slices.items():
            parts = [a.delta(name, x_text) for a in adapters if name in a.A]
            # No zeros added to and no one-chunk cat: three kernels per gated layer and call on a GPU, for nothing.
            width = end - start
            chunks.append(functools.reduce(torch.add, parts) if parts else x_text.new_zeros(x_text.shape[0], width))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)  # (N, out)

    def _switched_on(self) -> list[LoRAAdapter]:
        """Adapters that change this call: all, or with the LoRA switched off (the frozen model θ) the applied ones."""
        return [a for a in self.adapters.values() if a.strength != 0 and (self.gate.lora_on or a.frozen_in)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        adapters = self._switched_on()
        if not adapters:
            return y
        self._follow(x.device)
        rows = self.gate.text_rows(x) if self.scope == "text" else self.gate.token_rows(x)  # S_T as (N,) indices
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        y_text = (flat_y.index_select(0, rows).float() + self._delta(flat_x.index_select(0, rows).float(), adapters))
        # Out-of-place write: image rows of the result are y's rows, untouched.
        return flat_y.index_copy(0, rows, y_text.to(y.dtype)).view_as(y)


def _saved_as_base(layer: GatedLoRALinear, state: dict, prefix: str, _metadata) -> None:
    """A model's weights, saved, are the original model's under its own names: a gated LoRA cannot be merged into
    them (it changes text rows only) and lives in its own file. Under the wrapper's names (``base_layer.weight``,
    ``adapters.…``) a pipeline's ``save_pretrained`` reloaded with random q/k/v projections and only a warning."""
    items = list(state.items())
    state.clear()
    for key, value in items:
        rest = key[len(prefix):] if key.startswith(prefix) else None
        if rest is not None and rest.startswith("adapters."):
            continue
        if rest is not None and rest.startswith("base_layer."):
            key = prefix + rest[len("base_layer."):]
        state[key] = value


def _loaded_into_base(layer: GatedLoRALinear, state: dict, prefix: str, *_) -> None:
    """The original model's weights (what :func:`_saved_as_base` writes) load into the base layer."""
    layer._loading_prefix = prefix
    for name in [key[len(prefix):] for key in state if key.startswith(prefix) and "." not in key[len(prefix):]]:
        state[f"{prefix}base_layer.{name}"] = state.pop(prefix + name)


def _adapters_not_loaded(layer: GatedLoRALinear, incompatible) -> None:
    """The adapters are no weights of the model: a state without them (an original model's) misses nothing."""
    adapters = f"{layer.__dict__.pop('_loading_prefix', '')}adapters."
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(adapters)]
