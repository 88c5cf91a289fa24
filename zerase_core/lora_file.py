"""Erasure LoRA files: the native self-describing format, official Z-Erase imports, checks.

Native files are safetensors with keys ``zerase.layers.{i}.{q|k|v}.A`` (rank × in) and
``.B`` (out × rank), ΔW = scale · strength · B A, and metadata describing the gate, the
targets and the base architecture. The key names are deliberately unknown to stock LoRA
loaders (ComfyUI's LoraLoader, diffusers' ``load_lora_weights``): loaded by them the LoRA
would act on every token — the ungated collapse the paper warns of — so they must not
recognise it at all.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from .errors import ZEraseError, shown
from .files import as_json, atomic_save, decode_metadata
from .lora import finite_in_fp32
from .save_names import safe_output_path, saved_versions
from .typed import json_object, settle

FORMAT = "zerase-gated-lora"
# The newest version this pack reads. Version 2 adds the ungated gate kind ("all-tokens"); gated files are still
# written as version 1, and ungated ones as 2, so that a reader older than that field refuses them.
FORMAT_VERSION = 2
GATE = {"kind": "text-tokens", "covers": "caption and caption padding", "paper": "Eq. 4, S_T"}
# LoRAConfig.scope "all": the §3 ablation, written down as what it is so that no host applies it gated.
UNGATED = {"kind": "all-tokens", "covers": "every token (the §3 ablation, which collapses)", "paper": "§3"}
# LoRAConfig.scope -> (format_version written, gate written)
_WRITTEN = {"text": (1, GATE), "all": (2, UNGATED)}
_SCOPES = {gate["kind"]: scope for scope, (_, gate) in _WRITTEN.items()}  # the gate's kind in a file -> scope

Key = tuple[int, str]  # (main layer, projection)
# The most a LoRA is applied at: Apply's strength, and a merge's weight (the strength its LoRA enters the merge at).
# An official Z-Erase file needs about 15 (its code's lora_scale); 1 is a LoRA as trained.
STRENGTH_MAX = 20.0
# Tensor names (layer, projection, factor), matched whole (fullmatch: "$" matches before a final newline), their
# digits ASCII ("\d" takes any script's): one name per factor. The layouts take any index, so that a file of one is
# told as such; _factors then takes only an index as Python writes it: no leading zero ("00" was a second name for
# layer 0, read over the first), at most 4 digits (models have tens of layers; 5000 digits overran int()).
_NATIVE = re.compile(r"zerase\.layers\.([0-9]+)\.([qkv])\.([AB])")
_OFFICIAL = re.compile(r"(?:transformer\.)?layers\.([0-9]+)\.attention\.to_([qkv])\.lora_(down|up)\.weight")
_LAYER = re.compile(r"0|[1-9][0-9]{0,3}")
_STOCK_HINTS = ("lora_A", "lora_B", "lora_up", "lora_down", "lora_unet", "lora_te", ".alpha", "hada_", "lokr_")


def fits_float32(a: torch.Tensor, b: torch.Tensor, multiplier: float = 1.0) -> bool:
    """Whether factors and every entry of their ΔW = multiplier · B A are finite in float32, where the model computes:
    by the bound rank · max|A| · max|B| · |multiplier| on ΔW's entries, two reductions rather than the product."""
    peaks = float(a.abs().max()), float(b.abs().max())  # NaN where a factor holds one: not finite
    return finite_in_fp32(*peaks, a.shape[0] * peaks[0] * peaks[1] * abs(multiplier))


@dataclass(frozen=True)
class ErasureLoRA:
    """An erasure LoRA in memory: fp32 factors per (layer, projection) plus what describes it."""

    factors: dict[Key, tuple[torch.Tensor, torch.Tensor]]  # (A (r, in), B (out, r))
    scale: float = 1.0  # alpha / rank of training
    strength: float = 1.0
    concept: str = ""
    preserve: tuple[str, ...] = ()
    fingerprint: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    source: str = "native"
    history: dict[str, list[float]] = field(default_factory=dict)  # history.stored_series of the run
    scope: str = "text"  # LoRAConfig.scope it was trained with; only "text" (gated) may be applied

    def __post_init__(self):
        settle(self)
        if not self.factors:
            raise ZEraseError("This erasure LoRA has no weights.")
        if not finite_in_fp32(self.scale, self.strength, self.multiplier):  # else the model's output is inf or NaN
            raise ZEraseError(f"This erasure LoRA's scale {self.scale:g}, strength {self.strength:g} and their "
                              f"product {self.multiplier:g} must be finite numbers in float32, as the model computes "
                              "with them.")
        if self.scale <= 0:  # alpha / rank of training, alpha > 0 (LoRAConfig): ≤ 0 would strengthen its concept
            raise ZEraseError(f"This erasure LoRA's scale must be > 0 (alpha / rank of its training); got "
                              f"{self.scale:g}.")
        if not 0 < self.strength <= STRENGTH_MAX:  # the pack writes 1; another comes from the Python API or an edit
            raise ZEraseError(f"This erasure LoRA's strength must be > 0 and at most {STRENGTH_MAX:g}; got "
                              f"{self.strength:g}. A negative one would apply the opposite of the erasure under the "
                              "concept's name, 0 nothing, and a merge would carry either into its file. Set strengths "
                              "on Apply Erasure LoRA or as merge weights; the pack writes 1.")
        if self.scope not in _SCOPES.values():
            raise ZEraseError(f"Unknown LoRA scope {self.scope!r}; expected 'text' or 'all'.")
        for key, (a, b) in self.factors.items():
            # no width 0 either: A (2**40, 0) and B (0, 2**40) hold nothing, and a merge wrote them as rank 2**40
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or 0 in (*a.shape, *b.shape):
                raise ZEraseError(f"LoRA factors for layer {key[0]} {key[1]} have inconsistent shapes "
                                  f"(A {tuple(a.shape)}, B {tuple(b.shape)}: rank × in and out × rank, each ≥ 1).")
            if not fits_float32(a, b, self.multiplier):  # 3e38 in A alone, each factor finite, made ΔW inf
                raise ZEraseError(f"This erasure LoRA's change to layer {key[0]} {key[1]} (ΔW = scale · strength · "
                                  "B A) leaves float32's range, or its factors are not finite numbers. Re-train or "
                                  "re-download it.")

    def require_gated(self) -> None:
        """Refuse to go on with a LoRA trained without the gate: every host applies LoRAs through it."""
        if self.scope != "text":
            raise ZEraseError(
                f"The LoRA for '{shown(self.concept)}' was trained without the token gate (scope 'all', the paper's §3 "
                "ablation): it changes every token's q/k/v, so applied or merged through the gate it would not be "
                "the model it was trained as. Train it with the default scope 'text' to use it.")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(p for p in "qkv" if any(k[1] == p for k in self.factors))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({k[0] for k in self.factors}))

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    @property
    def multiplier(self) -> float:
        """What ΔW carries beside its factors: ΔW = multiplier · B A (the scale of training times the strength)."""
        return self.scale * self.strength

    def delta_weight(self, key: Key) -> torch.Tensor:
        a, b = self.factors[key]
        return (b.double() @ a.double()) * self.multiplier

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": _WRITTEN[self.scope][0],
            "concept": self.concept,
            "preserve": list(self.preserve),
            "targets": list(self.targets),
            "layers": list(self.layers),
            "rank": self.rank,
            "alpha": self.scale * self.rank,
            "scale": self.scale,
            "strength": self.strength,
            "gate": _WRITTEN[self.scope][1],
            "fingerprint": self.fingerprint,
            "training": self.training,
            "source": self.source,
            "history": self.history,
        }


def save_lora(lora: ErasureLoRA, path: str | Path, exclusive: bool = False) -> Path:
    """Write ``lora`` atomically; ``exclusive``: as a new file, refusing to replace one (see files.atomic_save)."""
    tensors = {}
    for (layer, proj), (a, b) in sorted(lora.factors.items()):  # copies: factors that share memory (one tensor for
        tensors[f"zerase.layers.{layer}.{proj}.A"] = a.float().clone()  # two projections, slices of one) are refused
        tensors[f"zerase.layers.{layer}.{proj}.B"] = b.float().clone()  # by safetensors
    return atomic_save(tensors, path, lora.metadata(), exclusive)


def save_new(lora: ErasureLoRA, folder: str | Path, name: str) -> Path:
    """``lora`` under the next free name for ``name`` in ``folder`` (``name_001``, …), never over another file."""
    return save_lora(lora, safe_output_path(folder, name), exclusive=True)


def saved_or_new(lora: ErasureLoRA, folder: str | Path, name: str) -> tuple[Path, bool]:
    """(``lora``'s file under ``name``, whether it was written now): a file saved earlier under the name that holds
    exactly ``lora`` (metadata and factors) is taken, else :func:`save_new`. A merge node runs again after every
    restart of ComfyUI (an output node), and each run wrote another identical ``name_00N``."""
    for path in saved_versions(folder, name):
        if _holds(path, lora):
            return path, False
    return save_new(lora, folder, name), True


def _holds(path: Path, lora: ErasureLoRA) -> bool:
    """Whether ``path`` holds exactly ``lora``: its metadata first (no tensor read), then every factor."""
    if read_description(path) != as_json(lora.metadata()):  # {} for a damaged file or one not ours
        return False
    try:
        saved = load_lora(path)
    except ZEraseError:  # damaged tensors
        return False
    return saved.factors.keys() == lora.factors.keys() and all(
        torch.equal(a, lora.factors[key][0].float()) and torch.equal(b, lora.factors[key][1].float())
        for key, (a, b) in saved.factors.items())


def _header(path: Path) -> tuple[list[str], dict[str, str]]:
    """A file's tensor names and metadata, read without its tensors: a refused file (an ordinary LoRA of gigabytes)
    is refused without loading it."""
    return _safely(path, lambda f: (list(f.keys()), dict(f.metadata() or {})))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return _finite(path, _safely(path, lambda f: {k: f.get_tensor(k) for k in f.keys()}))


def _safely(path: Path, read: Callable[[Any], Any]) -> Any:
    """``read(f)`` of the opened safetensors file; a missing, unreadable or broken file is refused by name."""
    # os.path's checks, not Path's: a path the system cannot look up (a name too long) is then "not found", not a
    # traceback.
    if os.path.isdir(path):
        raise ZEraseError(f"{path} is a folder; give the LoRA file in it (a .safetensors file).")
    if not os.path.isfile(path):
        raise ZEraseError(f"LoRA file not found (or not readable as a path): {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except (SafetensorError, OSError, ValueError) as err:  # ``read`` raises none of the pack's own errors
        if path.suffix.lower() != ".safetensors":  # a .pt or .ckpt LoRA is whole, in a format not read here
            raise ZEraseError(f"'{path.name}' is not a safetensors file; Z-Erase LoRAs are .safetensors files (saved "
                              "by Z-Erase Train or Merge, or exported by the official Z-Erase code).") from err
        raise ZEraseError(f"'{path.name}' is not a readable safetensors file ({shown(str(err))}); re-download or "
                          "re-train it.") from err


def read_description(path: str | Path) -> dict[str, Any]:
    """A native file's decoded metadata without its tensors; {} for anything else (missing, damaged, not ours).

    Its metadata is checked as loading checks it: a shared file under a Train node's save name is read for a finished
    run, and a ``training`` that is no dict was a traceback there."""
    path = Path(path)
    try:
        meta = _header(path)[1]
        if meta.get("format") != FORMAT:
            return {}
        info = decode_metadata(meta)
        _description(path, meta, info)
    except ZEraseError:  # missing, a folder, damaged
        return {}
    return info


def load_lora(path: str | Path) -> ErasureLoRA:
    """Read a native or official Z-Erase file; refuse stock LoRAs and broken files with a clear reason."""
    path = Path(path)
    keys, meta = _header(path)
    if meta.get("format") == FORMAT:
        return _from_native(path, _tensors(path), meta)
    if keys and all(_OFFICIAL.fullmatch(k) for k in keys):
        tensors = _tensors(path)
        try:
            return _from_official(tensors, concept=path.stem)
        except ZEraseError as err:  # its factors' own complaint, which does not know the file
            raise ZEraseError(f"'{path.name}' has the official Z-Erase code's layout but cannot be used: {err} Export "
                              "it again from the official code.") from err
    raise _not_a_lora(path, keys, meta)


def _not_a_lora(path: Path, keys: list[str], meta: dict[str, str]) -> ZEraseError:
    """Why a file that is neither a native nor an official Z-Erase LoRA is refused, by what it is instead."""
    from .checkpoint import KIND  # here: checkpoint.py imports this module

    if meta.get("kind") == KIND:
        return ZEraseError(f"'{path.name}' is a Z-Erase training checkpoint (for resuming a run), not a LoRA; use the "
                           "run's LoRA file (erasure_lora.safetensors beside a command-line run's checkpoint; the "
                           "node's under models/loras/zerase/).")
    native = keys and all(_NATIVE.fullmatch(k) for k in keys)
    if native and "format" in meta:  # our tensors, described as another format: a later version's (or a tool's)
        return ZEraseError(f"'{path.name}' holds a Z-Erase LoRA's tensors with metadata of format "
                           f"{shown(repr(meta['format']))}, where this pack reads {FORMAT!r}: update the Z-Erase pack "
                           "to read it.")
    if native:  # re-saved by a tool that keeps tensors only (save_file)
        return ZEraseError(f"'{path.name}' holds a Z-Erase LoRA's tensors without its metadata (scale, concept, gate), "
                           "so it cannot be applied as trained; it was re-saved by a tool that drops metadata. Use the "
                           "file the training wrote, or re-train it.")
    if any(h in k for k in keys for h in _STOCK_HINTS):
        return ZEraseError(
            f"'{path.name}' is an ordinary LoRA, not a Z-Erase erasure LoRA. Ordinary LoRAs act on every "
            "token; applied through the text-token gate they would be misused. Load it with ComfyUI's "
            "LoraLoader instead, or train an erasure LoRA (the Z-Erase Train node, or python -m zerase_core train)."
        )
    return ZEraseError(f"'{path.name}' is not a Z-Erase LoRA (no Z-Erase metadata and no known key layout): choose a "
                       "LoRA saved by Z-Erase Train or Merge (in models/loras/zerase/; on the command line "
                       "erasure_lora.safetensors) or one exported by the official Z-Erase code.")


def _finite(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors``, once each is floating point (an integer or boolean factor is no trained weight: an edited or
    damaged file) and none holds NaN or inf (which would reach the model, or a merge, unnoticed), in float32 as they
    are used: a float64 1e300 is finite in the file and inf in the model."""
    not_float = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if not_float:
        raise ZEraseError(f"'{path.name}' holds {shown(not_float[0])} as {tensors[not_float[0]].dtype}, not as "
                          "floating point weights; the file is damaged. Re-train or re-download it.")
    if any(not torch.isfinite(_in_fp32(path, name, t)).all() for name, t in tensors.items()):
        raise ZEraseError(f"'{path.name}' contains NaN or infinite weights; it cannot be used.")
    return tensors


def _in_fp32(path: Path, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as the float32 the model computes with; a float type torch cannot convert (4-bit, packed two to a byte)
    was a NotImplementedError traceback out of load, inspect and merge."""
    try:
        return t.float()
    except NotImplementedError as err:  # not RuntimeError: running out of memory is no damaged file
        raise ZEraseError(f"'{path.name}' holds {shown(name)} as {t.dtype}, which cannot be read as float32 weights; "
                          "the file is damaged or from another tool. Re-train or re-download it.") from err


def _from_native(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> ErasureLoRA:
    info = decode_metadata(meta)
    described = _description(path, meta, info)
    try:
        factors = _factors(tensors, _NATIVE, {"A": "A", "B": "B"})
    except ZEraseError as err:
        raise ZEraseError(f"'{path.name}' {err}; the file is damaged.") from err
    try:
        lora = ErasureLoRA(factors=factors, **described)
    except ZEraseError as err:  # name the file, as every other refusal of a damaged one does
        raise ZEraseError(f"'{path.name}': {err} The file is damaged.") from err
    recorded = info.get("rank")
    if recorded is not None and lora.rank != recorded:  # A and B swapped fit together too, at rank = the width
        raise ZEraseError(f"'{path.name}': its factors have rank {lora.rank} where the file records rank "
                          f"{shown(str(recorded))} (A and B swapped, or tensors from another file). The file is "
                          "damaged; re-train or re-download it.")
    return lora


def _description(path: Path, meta: dict[str, str], info: dict[str, Any]) -> dict[str, Any]:
    """ErasureLoRA's describing fields from a native file's metadata (as stored, and ``info``: decoded); damaged
    metadata is refused by name."""
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = -1  # refused as damaged below
    if version > FORMAT_VERSION:  # before reading the rest: a newer format may describe itself differently
        raise ZEraseError(f"'{path.name}' uses format version {version}; update the Z-Erase pack to read it.")
    kind = _gate_kind(info)
    if version >= 2 and isinstance(kind, str) and kind not in _SCOPES:  # a kind added later than this pack
        raise ZEraseError(f"'{path.name}' has a gate of kind {shown(repr(kind))}, which this pack does not know; "
                          "update the Z-Erase pack to read it.")
    try:
        if version < 0:
            raise ValueError(f"format_version {meta['format_version']!r}")
        described = dict(
            scale=_number(info["scale"], "scale"),
            strength=_number(info.get("strength", 1.0), "strength"),
            concept=_string(info.get("concept", ""), "concept"),
            preserve=_strings(info.get("preserve", [])),
            fingerprint=_finite_json(json_object(info.get("fingerprint", {}), "fingerprint"), "fingerprint"),
            training=_training(info.get("training", {})),
            source=_string(info.get("source", "native"), "source"),
            history={str(k): _finite_numbers(vs) for k, vs in json_object(info.get("history", {}), "history").items()},
            scope=_SCOPES[kind],
        )
        if not finite_in_fp32(described["scale"], described["strength"]):  # told as the file's, not as a LoRA's
            raise ValueError(f"scale {described['scale']}, strength {described['strength']}")
    except (KeyError, TypeError, ValueError, OverflowError) as err:  # OverflowError: float() of 10**400
        raise ZEraseError(f"'{path.name}' has damaged Z-Erase metadata ({type(err).__name__}: {shown(str(err))}); "
                          "re-train or re-download it.") from err
    return described


def _gate_kind(info: dict[str, Any]) -> Any:
    """The gate's kind a file's metadata records (a file before the field: the text-token gate); None if damaged."""
    gate = info.get("gate", GATE)
    return gate.get("kind") if isinstance(gate, dict) else None


def _number(value: Any, name: str) -> float:
    """A number from metadata: ``true`` was read as 1.0 and a string of digits as its value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _string(value: Any, name: str) -> str:
    """A string from metadata: an object was kept as its Python repr. A JSON scalar is its text: files written before
    strings that read as JSON were quoted stored a concept "1984" or "null" bare."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise TypeError(f"{name} must be a string, got {value!r}")


def _finite_json(value: Any, name: str) -> Any:
    """``value`` once no number in it is NaN or infinite: training writes none, and ``inspect`` printed them as
    invalid JSON."""
    inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if inner is not None:
        for item in inner:
            _finite_json(item, name)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} holds {value}, not a finite number")
    return value


def _finite_numbers(values: Any) -> list[float]:
    """A recorded curve: training refuses a non-finite loss, so a NaN here was written by hand (and would print as
    invalid JSON in ``inspect``); a string was read letter by letter, an object by its keys."""
    if not isinstance(values, list):
        raise TypeError(f"history values must be lists of numbers, got {values!r}")
    numbers = [_number(v, "a history value") for v in values]
    if not all(map(math.isfinite, numbers)):
        raise ValueError(f"history values must be finite, got {[v for v in numbers if not math.isfinite(v)][:3]}")
    return numbers


def _training(value: Any) -> dict[str, Any]:
    """The training record from metadata; its ``base`` (the model's digest, or None) a string: merge compares and
    sorts the parts' digests, and a list or an int there stopped it with a traceback."""
    training = _finite_json(json_object(value, "training"), "training")
    base = training.get("base")
    if base is not None and not isinstance(base, str):
        raise TypeError(f"training.base must be a string (the base model's digest), got {base!r}")
    return training


def _strings(value: Any) -> tuple[str, ...]:
    """A list of strings from metadata; a bare string would be taken letter by letter."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _from_official(tensors: dict[str, torch.Tensor], concept: str) -> ErasureLoRA:
    """Official Z-Erase (diffusers) files: lora_down (r, in) is A, lora_up (out, r) is B, scale 1. They name no
    concept: ``concept`` is what they are known by (the file's name), so a merge is not named "red + "."""
    try:
        factors = _factors(tensors, _OFFICIAL, {"down": "A", "up": "B"})
    except ZEraseError as err:
        raise ZEraseError(f"The file {err}.") from err
    return ErasureLoRA(factors, concept=concept, source="official-z-erase")


def _factors(tensors: dict[str, torch.Tensor], pattern: re.Pattern,
             parts: dict[str, str]) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) in float32 by (layer, projection) from tensors named by ``pattern`` (layer, projection, part; ``parts``
    says which part is A and which B). A name off the pattern, a factor named twice and half a pair are refused (what
    is wrong, for the caller to say which file)."""
    found: dict[Key, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        m = pattern.fullmatch(name)
        if not m:
            raise ZEraseError(f"has an unexpected tensor '{shown(name)}'")
        if not _LAYER.fullmatch(m[1]):  # "00" beside "0" would name one slot twice; no writer makes either
            raise ZEraseError(f"has a tensor '{shown(name)}' whose layer index is not a plain number (no leading "
                              "zero, at most 4 digits)")
        pair = found.setdefault((int(m[1]), m[2]), {})
        if parts[m[3]] in pair:  # "transformer.layers.0…" and "layers.0…": one would silently replace the other
            raise ZEraseError(f"holds layer {m[1]} {m[2]}'s {m[3]} twice (one is '{shown(name)}')")
        pair[parts[m[3]]] = tensor.float()
    broken = [k for k, ab in found.items() if len(ab) != 2]
    if broken:
        raise ZEraseError(f"misses half of the factors for {broken}")
    return {k: (ab["A"], ab["B"]) for k, ab in found.items()}


def differing_facts(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The architecture facts two fingerprints both record and disagree on: a file of an older version records fewer,
    an official Z-Erase import none, and what one does not record cannot clash."""
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k])


def check_fits(lora: ErasureLoRA, fingerprint: dict[str, Any], widths: dict[Key, tuple[int, int]] | None) -> None:
    """Refuse a LoRA that does not fit the target model, saying exactly what does not fit.

    ``widths`` maps each (layer, proj) the model can host to (in_features, out_width); None before the model is
    loaded, when only its fingerprint is known.
    """
    problems = [f"{name}: LoRA {shown(str(lora.fingerprint[name]))} vs model {fingerprint[name]}"
                for name in differing_facts(lora.fingerprint, fingerprint)]
    if widths is not None:
        problems += _width_problems(lora, widths)
    if problems:
        trained = shown(str(lora.fingerprint.get("family", "another model")))
        raise ZEraseError(
            f"This erasure LoRA was made for a different architecture ({trained}) and does not fit this model: "
            f"{listed_problems(problems)}. Use a LoRA trained on this model."
        )
    _check_ranks(lora)


def _width_problems(lora: ErasureLoRA, widths: dict[Key, tuple[int, int]]) -> list[str]:
    """Each factor pair the model has no projection for, or whose in→out widths are not the projection's."""
    problems = []
    for key, (a, b) in sorted(lora.factors.items()):
        if key not in widths:
            problems.append(f"layer {key[0]} {key[1]}: the model has no such projection")
        elif (a.shape[1], b.shape[0]) != widths[key]:
            problems.append(f"layer {key[0]} {key[1]}: LoRA maps {a.shape[1]}→{b.shape[0]}, model needs "
                            f"{widths[key][0]}→{widths[key][1]}")
    return problems


def _check_ranks(lora: ErasureLoRA) -> None:
    """Refuse factors of a rank above min(in, out) of their projection (which check_fits has matched to the model's),
    before anything is allocated: a matrix of that shape holds no more, and applied, every slot the LoRA spans is
    padded to its largest rank, so one such factor in a file made memory grow a hundredfold."""
    over = [f"layer {i} {p}: rank {a.shape[0]} on a {a.shape[1]}→{b.shape[0]} projection"
            for (i, p), (a, b) in sorted(lora.factors.items()) if a.shape[0] > max_rank(a, b)]
    if over:
        raise ZEraseError(f"This erasure LoRA's rank exceeds what its projections can hold ({listed_problems(over)}): "
                          "a rank above min(in, out) of the matrix adds nothing (training refuses one). The file is "
                          "damaged, or a merge of very many LoRAs: re-train or re-download it, or merge them again "
                          "with a rank of at most min(in, out).")


def max_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """The most rank factors A (r, in) and B (out, r) can hold: min(in, out), the rank of an in → out matrix."""
    return min(a.shape[1], b.shape[0])


def listed_problems(problems: list[str]) -> str:
    """The first six of ``problems``, then how many more."""
    return "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
