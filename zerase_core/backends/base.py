"""What the engine needs from a model implementation, and the LoRA bookkeeping they share.

A backend knows module paths, the token layout of each call, how to get a velocity and
how to watch attention. Conventions every backend follows (so objectives never branch):

* latents ``x`` are (B, C, H, W); ``sigma`` is (B,) with σ = 1 pure noise and
  x_σ = σ·ε + (1 − σ)·x0 (rectified flow, as both hosts use);
* velocity is v = ε − x0 = dx_σ/dσ. Each backend converts its host's output to this
  sign where it calls the host, and says so there.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..attention_mass import MassRecorder
from ..errors import ZEraseError
from ..gate import TokenGate
from ..layout import TokenLayout
from ..lora import GatedLoRALinear, LoRAAdapter, LoRAConfig
from ..prompts import EncodedPrompt


@dataclass(frozen=True)
class HostSlot:
    """One linear layer of main layer ``layer`` that can host LoRA slices (e.g. ``to_q``: {"q": (0, d)})."""

    layer: int
    path: str  # dotted module path inside the backend's root module
    slices: dict[str, tuple[int, int]]
    in_features: int


class LoRASet:
    """The adapters one erasure LoRA installed, addressed by (main layer, projection).

    Canonical names ``layers.{i}.{proj}`` are the same on every backend, so a LoRA trained
    on diffusers loads on ComfyUI's fused ``qkv`` and back.
    """

    def __init__(self, name: str, config: LoRAConfig):
        self.name, self.config = name, config
        self.slots: dict[tuple[int, str], LoRAAdapter] = {}

    def add(self, layer: int, proj: str, adapter: LoRAAdapter) -> None:
        self.slots[(layer, proj)] = adapter

    def parameters(self) -> Iterator[nn.Parameter]:
        for (_, proj), adapter in sorted(self.slots.items()):
            yield adapter.A[proj]
            yield adapter.B[proj]

    def factors(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, proj) -> (A, B) fp32 tensors (views; detach before storing)."""
        return {key: (ad.A[key[1]], ad.B[key[1]]) for key, ad in sorted(self.slots.items())}

    @torch.no_grad()
    def load_factors(self, factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        missing = sorted(set(self.slots) - set(factors))
        if missing:
            raise KeyError(f"no factors for {missing}")
        for key, (a, b) in factors.items():
            adapter = self.slots[key]
            adapter.A[key[1]].copy_(a)
            adapter.B[key[1]].copy_(b)


class Backend(ABC):
    """A Z-Image implementation as the engine sees it."""

    gate: TokenGate
    patch: int  # the side of an image patch, in latent cells: a token is patch² cells
    # How attention mass is measured; the benchmark's official-style reference swaps in a
    # recorder that materialises softmax maps, to compare against on the same model.
    recorder_factory = MassRecorder
    # The shift of the σ schedule the host samples with, where the host says (ComfyUI's MODEL, a diffusers folder's
    # scheduler config); None: not known, and training samples x_t at TrainConfig.shift.
    flow_shift: float | None = None

    @property
    @abstractmethod
    def n_layers(self) -> int: ...

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Architecture facts a LoRA depends on (family, dim, layers, heads); JSON-serialisable."""

    @abstractmethod
    def host_slots(self) -> list[HostSlot]:
        """Every linear layer of the main layers that can carry q/k/v LoRA slices."""

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        """Encode prompts with the host's text encoder (no grad)."""

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent for an image of height × width pixels."""

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens of a height × width picture as the model cuts it: latent cells over a patch's cells."""
        _, h, w = self.latent_shape(height, width)
        return h * w // self.patch**2

    @abstractmethod
    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        prompts: Sequence[EncodedPrompt],
        *,
        lora: bool = True,
        concept_tokens: list[list[int]] | None = None,
        mass_layers: set[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """v = ε − x0 for each sample, and, when ``concept_tokens`` are given, the attention mass
        (B,) image queries put on those caption tokens, averaged over ``mass_layers``."""

    @abstractmethod
    def layout(self, x: torch.Tensor, prompts: Sequence[EncodedPrompt]) -> TokenLayout:
        """Where each sample's caption and image tokens sit in the main layers' sequence for this call."""

    @abstractmethod
    def attention_maps(self, x: torch.Tensor, sigma: torch.Tensor, prompt: EncodedPrompt, columns: list[list[int]],
                       layers: set[int] | None = None, lora: bool = True) -> torch.Tensor:
        """(n_words, h, w): per word (its caption token ``columns``), the attention mass each image token puts on
        it, averaged over heads and ``layers`` (paper Fig. 2). ``lora`` off: the model without this backend's
        trained LoRA, where the host can switch it (a ComfyUI MODEL carries its LoRAs as patches: pass both)."""

    @property
    @abstractmethod
    def checkpointed_layers(self) -> int:
        """How many main layers are recomputed in backward now (set_gradient_checkpointing), as the host has it."""

    def set_gradient_checkpointing(self, layers: int) -> None:
        """Recompute the first ``layers`` main layers in backward instead of keeping their activations (0: none;
        ``n_layers``: all). The gradients are the same.

        The first ones, because backward reaches them last: by the time one is recomputed the later layers'
        activations are freed, so the recomputation adds one layer's activations to a peak that has already fallen.
        """
        if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= self.n_layers:
            raise ValueError(f"layers to checkpoint: a count from 0 to {self.n_layers}, got {layers!r}")  # True: 1
        self._checkpoint_first(layers)

    @abstractmethod
    def _checkpoint_first(self, layers: int) -> None:
        """Checkpoint main layers ``0 .. layers-1`` and no other."""

    @abstractmethod
    def install(self, config: LoRAConfig, name: str = "zerase", replace: bool = True) -> LoRASet:
        """Put a fresh (B = 0) gated adapter on the targeted slots and return it. ``replace``: one already installed
        under ``name`` is replaced (a new training run's adapter replaces an earlier run's); False refuses it, as
        applying LoRAs does (they add up, each under its own name)."""

    @abstractmethod
    def uninstall(self) -> None:
        """Remove every gated layer, restoring the original modules exactly."""

    def rest(self, lora_set: LoRASet) -> None:
        """Put an applied (frozen) LoRA where it waits until the model runs: here, where it was made. A host that
        loads its model only to run it overrides this (ComfyUI: with the model's offloaded weights)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes its activations in (what a step's memory scales with)."""
        return torch.float32

    @abstractmethod
    def weights(self) -> Iterator[torch.Tensor]:
        """The model's parameters and buffers: held for the whole run, so no activation memory (the memory benches
        leave them out of what a step saves for backward)."""

    def base_digest(self) -> str | None:
        """A short digest of what this model is beyond its architecture (a training host's includes its text
        encoder, whose prompt features a run trains on), stable across restarts, or None where the host cannot tell
        (then a saved LoRA is never taken for a run on this model without training)."""
        return None

    def load(self) -> None:
        """Put the model where it trains, if it is not there yet (ComfyUI loads it at the first forward)."""

    def weight_casts_bytes(self) -> int:
        """Bytes of the compute-dtype copies of the main layers' weights that a forward with gradients keeps for
        backward where weights are stored narrower (ComfyUI's fp8 weight_dtype casts each per op); 0 where they are
        used as stored."""
        return 0

    def release_encoder(self) -> None:
        """Free the text encoder once every prompt a run needs is encoded (the trainer encodes up front)."""

    def _mass_recorder(self, layout: TokenLayout, concept_tokens: list[list[int]] | None,
                       mass_layers: set[int] | None) -> MassRecorder | None:
        """The recorder of one call's attention mass on each sample's concept tokens (None: no mass wanted)."""
        if concept_tokens is None:
            return None
        return self.recorder_factory(layout.columns(concept_tokens, self.device), layout.image_query_mask(self.device),
                                     mass_layers, mass_rows=_leading_rows(concept_tokens))


def _leading_rows(concept_tokens: list[list[int]]) -> int | None:
    """How many leading rows have concept tokens, where none after them has (a training step's [c_er, ∅, c_pr]: 1;
    a call of ∅ alone: 0); None (every row measured) otherwise. Read off the host's lists: no device sync."""
    n = next((i for i, tokens in enumerate(concept_tokens) if not tokens), len(concept_tokens))
    return n if not any(concept_tokens[n:]) else None


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return root.get_submodule(parent_path) if parent_path else root, attr


class InPlaceInstaller:
    """Swaps host linears for :class:`GatedLoRALinear` wrappers on a module the backend owns.

    For hosts where the engine owns the model (diffusers, the toy). ComfyUI models are
    shared between clones, so its backend goes through ModelPatcher object patches instead.
    """

    def __init__(self, root: nn.Module, gate: TokenGate):
        self.root, self.gate = root, gate
        self.originals: dict[str, nn.Module] = {}

    def wrap(self, slot: HostSlot, scope: str = "text") -> GatedLoRALinear:
        parent, attr = _resolve(self.root, slot.path)
        current = getattr(parent, attr)
        if isinstance(current, GatedLoRALinear):
            if current.scope != scope:
                raise ValueError(f"{slot.path} already carries a LoRA with scope {current.scope!r}")
            return current
        wrapped = GatedLoRALinear(current, slot.slices, self.gate, scope)
        self.originals[slot.path] = current
        setattr(parent, attr, wrapped)
        return wrapped

    def install(self, slots: list[HostSlot], config: LoRAConfig, name: str, n_layers: int,
                replace: bool = True) -> LoRASet:
        wrapped = (getattr(*_resolve(self.root, path)) for path in self.originals)  # read only when not replacing
        return install_on(slots, config, name, n_layers, lambda slot: self.wrap(slot, config.scope), replace=replace,
                          installed=wrapped)

    def uninstall(self) -> None:
        for path, original in self.originals.items():
            parent, attr = _resolve(self.root, path)
            setattr(parent, attr, original)
        self.originals.clear()


def combined_digest(*parts: str | None) -> str | None:
    """One digest of several (a model and its text encoder); None where any part cannot be told."""
    return None if None in parts else hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]


def install_on(slots: list[HostSlot], config: LoRAConfig, name: str, n_layers: int,
               wrap: Callable[[HostSlot], GatedLoRALinear], device: torch.device | None = None,
               replace: bool = True, installed: Iterable[GatedLoRALinear] = ()) -> LoRASet:
    """One adapter named ``name`` on every slot ``config`` targets, each slot made gated by the host's ``wrap``;
    ``device``: where the adapters live (default: the base weight's); ``replace``: see Backend.install, against the
    host's gated layers so far (``installed``): the name is the model's, not a layer's."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):  # torch's KeyError
        raise ZEraseError(f"A LoRA's name must be a word without dots that no torch module's attribute has (not "
                          f"'train' or 'to'): it names the LoRA's adapter in every layer. Got {name!r}; use e.g. "
                          "'van_gogh', or the default.")
    if not replace and any(name in layer.adapters for layer in installed):  # before anything is wrapped
        raise ZEraseError(f"A LoRA named '{name}' is already installed on this model, and a second under the same "
                          "name would replace it; give each LoRA its own name (install_lora(..., name=...)).")
    lora_set = LoRASet(name, config)
    wanted = set(config.layer_indices(n_layers))
    for slot in slots:
        targets = tuple(t for t in config.targets if t in slot.slices)
        if slot.layer not in wanted or not targets:
            continue
        adapter = wrap(slot).add_adapter(name, targets, config.rank, config.scale, config.strength, device=device)
        for proj in targets:
            lora_set.add(slot.layer, proj, adapter)
    return lora_set
