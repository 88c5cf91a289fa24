"""Multi-concept merging (paper App. F): Δθ_mul = Σ w_i Δθ_i on the products ΔW = B A.

Averaging A and B separately is wrong (Σ w B_i · Σ w A_i ≠ Σ w B_i A_i). Concatenating
ranks is exact: [w_1 s_1 B_1 | … | w_N s_N B_N] · [A_1; …; A_N] = Σ w_i s_i B_i A_i.
Re-ranking truncates that product by SVD and reports the relative Frobenius error.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace

import torch

from .prompts import concept_words
from .errors import ZEraseError, shown
from .lora_file import STRENGTH_MAX, ErasureLoRA, Key, differing_facts, fits_float32, listed_problems, max_rank

log = logging.getLogger(__name__)

JOIN = " + "  # a merged LoRA's concept: its parts' concepts joined by this (split again when it is merged further)


@dataclass(frozen=True)
class MergeReport:
    rank: int
    relative_error: float  # ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F over all projections; 0 for an exact merge


def _same_architecture(loras: list[ErasureLoRA]) -> dict:
    """The fingerprint all ``loras`` agree on (the union of what each records), or a refusal naming the clash.

    Only keys two files both record are compared: a file from an older version records fewer, and an official
    Z-Erase import none (as :func:`~zerase_core.lora_file.check_fits` compares against a model).
    """
    agreed: dict = {}
    for lora in loras:
        clash = differing_facts(agreed, lora.fingerprint)
        if clash:
            raise ZEraseError(
                f"Cannot merge LoRAs of different architectures: {shown(str(agreed))} vs "
                f"{shown(str(lora.fingerprint))} (differ in {shown(', '.join(clash))}). Merge only LoRAs trained on "
                "the same base model."
            )
        agreed |= lora.fingerprint
    return agreed


def _same_base(loras: list[ErasureLoRA]) -> dict:
    """The base model's digest (Backend.base_digest) all ``loras`` were trained on, kept in the merge; LoRAs of one
    architecture trained on different bases (Turbo and a fine-tune) still merge, with a warning: each part's change
    was made for its own base."""
    bases = {lora.training.get("base") for lora in loras}
    if len(bases - {None}) > 1:
        log.warning("Merging LoRAs trained on different base models (digests %s): each erases its concept from its "
                    "own base; check the merge on the model it is applied to.",
                    ", ".join(map(shown, sorted(bases - {None}))))
    return {"base": bases.pop()} if len(bases) == 1 and None not in bases else {}


def _fits_agreed(factors: dict[Key, tuple[torch.Tensor, torch.Tensor]], fingerprint: dict) -> None:
    """Every merged factor fits the architecture the merge records. An official import records none, so one made for
    another model whose layers no other part has passed every comparison, and the file contradicted itself (refused
    only at Apply, as the file's fault)."""
    dim, n_layers = fingerprint.get("dim"), fingerprint.get("n_layers")
    # q, k and v each map dim → dim in Z-Image (its heads span the width; no grouped keys): both sides are checked
    misfits = [f"layer {i} {p} ({a.shape[1]}→{b.shape[0]})" for (i, p), (a, b) in sorted(factors.items())
               if (type(dim) is int and (a.shape[1], b.shape[0]) != (dim, dim))
               or (type(n_layers) is int and i >= n_layers)]
    if misfits:
        raise ZEraseError(f"Cannot merge: a LoRA here was made for a different model than the others were trained on "
                          f"(width {dim}, {n_layers} layers); it does not fit at {listed_problems(misfits)}. Merge "
                          "only LoRAs trained on the same base model.")


def _lossy_parts(loras: list[ErasureLoRA]) -> dict:
    """The re-ranks inside the parts (their ``training.rerank``, and those their own parts had): the merge itself is
    exact, and a file built on a lossy one still says so (``inspect`` shows it)."""
    lossy = [{"concept": lora.concept, "rerank": lora.training["rerank"]} for lora in loras
             if "rerank" in lora.training]
    lossy += [part for lora in loras if isinstance(lora.training.get("lossy_parts"), list)
              for part in lora.training["lossy_parts"]]
    # Once each: a LoRA merged with itself, or with a merge that holds it, doubled the list at every re-merge.
    unique = list({json.dumps(part, sort_keys=True): part for part in lossy}.values())
    return {"lossy_parts": unique} if unique else {}


def _same_widths(key: Key, loras: list[ErasureLoRA]) -> None:
    """The factors of one projection fit together (an official import records no architecture to compare)."""
    widths = {(lora.factors[key][0].shape[1], lora.factors[key][1].shape[0]) for lora in loras}
    if len(widths) > 1:
        maps = " vs ".join(f"{i}→{o}" for i, o in sorted(widths))
        raise ZEraseError(f"Cannot merge: layer {key[0]} {key[1]} maps {maps} in different LoRAs, so they were made "
                          "for different models. Merge only LoRAs trained on the same base model.")


def merge_exact(loras: list[ErasureLoRA], weights: list[float] | None = None) -> ErasureLoRA:
    """Rank-concatenating merge; default weights 1/N (the paper's normalised blend)."""
    if len(loras) < 2:
        raise ZEraseError("Merging needs at least two erasure LoRAs.")
    if weights is None:
        weights = [1.0 / len(loras)] * len(loras)
        log.info("Merge weights 1/%d each, the paper's blend: each concept is erased less than by its LoRA alone "
                 "(README, Merge Erasure LoRAs); weights of 1 each erase as the LoRAs applied together do.",
                 len(loras))
    weights = list(weights)
    _check_weights(weights, len(loras))
    for lora in loras:
        lora.require_gated()  # the merge is written as a gated LoRA
        if lora.source == "official-z-erase":  # its code applies it at lora_scale 15; a file does not say so
            log.warning("'%s' is an official Z-Erase file, which its code applies at a strength of about 15: in this "
                        "merge it counts at its weight × 1. Give it a weight near 15 × the others' to keep its "
                        "erasure.", shown(lora.concept))  # a shared file's text: no escape codes to the console
    fingerprint = _same_architecture(loras)
    factors = _concatenated(loras, weights)
    _fits_agreed(factors, fingerprint)
    # What the merge preserves: every part's preservation concepts but those a part erases ("cat" keeping "dog"
    # merged with "dog" erases both); a part that is itself a merge erases each concept of its "a + b".
    concepts = list(dict.fromkeys(c for lora in loras for c in concepts_of(lora)))  # one LoRA twice: its own name
    erased = {tuple(concept_words(c)) for c in concepts}
    return ErasureLoRA(
        factors,
        scale=1.0,
        strength=1.0,
        concept=JOIN.join(concepts),
        preserve=tuple(dict.fromkeys(p for lora in loras for p in lora.preserve
                                     if tuple(concept_words(p)) not in erased)),
        fingerprint=fingerprint,
        training={"merged_from": [lora.concept for lora in loras], "weights": weights} | _same_base(loras)
        | _lossy_parts(loras),
        source="merge",
    )


def _check_weights(weights: list[float], n: int) -> None:
    if len(weights) != n:
        raise ZEraseError(f"Got {len(weights)} weights for {n} LoRAs; give one weight per LoRA.")
    # w < 0 adds the concept back, as η < 0 would; w = 0 keeps nothing of its LoRA, yet the merge would be named for
    # its concept (and drop it from the preservation list): a merge of all-zero weights said it erased what it did not
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ZEraseError(f"Merge weights must be finite numbers > 0 (a negative one would strengthen its concept, "
                          f"not erase it; 0 would keep nothing of its LoRA: leave that LoRA out); got {weights}.")
    # Merged at w and applied at 1, a LoRA acts as applied alone at strength w: a weight takes the strengths Apply
    # takes. 1e38 passed (finite in float32) and wrote a file whose ΔW was 1e38 times the one trained.
    too_large = [w for w in weights if w > STRENGTH_MAX]
    if too_large:
        raise ZEraseError(f"Merge weights {too_large} are above {STRENGTH_MAX:g}: a weight is the strength its LoRA "
                          f"enters the merge at, and {STRENGTH_MAX:g} is the most Apply Erasure LoRA's strength takes "
                          "(an official Z-Erase file needs about 15). Use weights near 1: 1 each erases as the LoRAs "
                          "applied together, 1/N each is the paper's blend.")


def _concatenated(loras: list[ErasureLoRA], weights: list[float]) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """Per projection [w_1 s_1 B_1 | … | w_N s_N B_N] and [A_1; …; A_N], whose product is Σ w_i s_i B_i A_i."""
    factors, kept = {}, set()
    for key in sorted(set().union(*(lora.factors for lora in loras))):
        parts = [(i, lora.factors[key], w * lora.multiplier)
                 for i, (lora, w) in enumerate(zip(loras, weights)) if key in lora.factors]
        _same_widths(key, [loras[i] for i, _, _ in parts])
        scaled = [b * m for _, (_, b), m in parts]
        kept |= {i for (i, _, _), b in zip(parts, scaled) if b.any()}
        a, b = torch.cat([a for _, (a, _), _ in parts]), torch.cat(scaled, dim=1)
        if a.shape[0] > max_rank(a, b):  # the ranks add up; past min(in, out) the matrix holds no more,
            a, b, _ = _best_rank(a, b, max_rank(a, b))  # so this rank is exact (and what Apply takes)
        factors[key] = (a, b)
        _check_finite(key, a, b, weights)
    # Its factors scaled to all zeros by its weight: the second test is needed, as a LoRA all zero from the start (B
    # is zero at init) is no weight's doing.
    vanished = [w for i, (lora, w) in enumerate(zip(loras, weights))
                if i not in kept and any(b.any() for _, b in lora.factors.values())]
    if vanished:  # as a weight of 0: the merge would be named for a concept it keeps nothing of
        raise ZEraseError(f"Merge weights {vanished} are so small that their LoRAs' changes round to 0 in float32, "
                          "keeping nothing of them, as a weight of 0 would; leave those LoRAs out, or use weights "
                          "near 1.")
    return factors


def _check_finite(key: Key, a: torch.Tensor, b: torch.Tensor, weights: list[float] | None) -> None:
    """A merged projection's factors and its ΔW must be finite in float32, where the model computes: inf or NaN there
    turns every image it touches into NaN. Refused before the merge is returned, so no file of it is written."""
    if not fits_float32(a, b):  # finite weights times a file's scale or strength, or factors whose product is not
        raise ZEraseError(f"The merge overflows at layer {key[0]} {key[1]}: weights {shown(str(weights))} times the "
                          "LoRAs' scales and strengths leave float32's range (or a LoRA's own factors are not "
                          "finite); no file was written. Use weights near 1, and check each LoRA's scale and strength "
                          "with inspect: no trained LoRA holds values that large; re-train or re-download the one "
                          "that does.")


def concepts_of(lora: ErasureLoRA) -> list[str]:
    """The concepts a LoRA erases: a merge's are those of its "a + b"."""
    return lora.concept.split(JOIN) if lora.source == "merge" else [lora.concept]


def check_rank(rank: int) -> None:
    if rank < 1:
        raise ZEraseError(f"The merge rank must be at least 1, got {rank}.")


def rerank(lora: ErasureLoRA, rank: int) -> tuple[ErasureLoRA, MergeReport]:
    """Best rank-``rank`` approximation of every ΔW (Eckart–Young), via QR of the thin factors.

    ΔW = B A with B = Q_b R_b, Aᵀ = Q_a R_a, so the SVD of the small R_b R_aᵀ gives ΔW's;
    no out × in matrix is formed.
    """
    check_rank(rank)
    factors, err2, total2 = {}, 0.0, 0.0
    for key, (a, b) in lora.factors.items():
        a, b, sv = _best_rank(a, b * lora.multiplier, rank)
        factors[key] = (a, b)
        _check_finite(key, a, b, lora.training.get("weights"))  # computed in float64: may not fit float32
        err2 += float((sv[a.shape[0]:] ** 2).sum())
        total2 += float((sv**2).sum())
    rel = (err2 / total2) ** 0.5 if total2 > 0 else 0.0
    training = lora.training | {"rerank": {"rank": rank, "relative_error": rel}}  # a lossy file says so itself
    merged = replace(lora, factors=factors, scale=1.0, strength=1.0, training=training)  # the rest as it was
    return merged, MergeReport(rank, rel)


def _best_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ΔW = B A (at most min(in, out)) and all of ΔW's singular values."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, sv, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, sv.numel())
    root = sv[:k].sqrt()
    return (root[:, None] * (vh[:k] @ q_a.T)).float(), ((q_b @ u[:, :k]) * root).float(), sv


def merge(loras: list[ErasureLoRA], weights: list[float] | None = None, rank: int | None = None):
    """Exact merge, optionally re-ranked; returns (lora, report)."""
    if rank is not None:
        check_rank(rank)  # before the merge, which logs its advice on weights
    merged = merge_exact(loras, weights)
    if rank is None or rank >= merged.rank:
        return merged, MergeReport(merged.rank, 0.0)
    return rerank(merged, rank)
