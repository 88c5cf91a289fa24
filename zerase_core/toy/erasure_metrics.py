"""Exact erasure metrics on the toy world (counterparts of the paper's Acc_e, Acc_ir, H_a, and an FD).

Every generated image is judged by the shipped classifier, so "does the image still show
the concept" has a ground-truth answer instead of a CLIP guess:

* acc_e — share of images for prompts naming the erased concept that still show it;
* acc_ir — share of the *other* attributes rendered as prompted: the non-erased attributes
  of those images, and every attribute of images for prompts not naming the concept (the
  paper's Acc_ir scores the unaffected classes only; this pools every attribute, so it
  counts collateral damage anywhere in the picture);
* h_a = acc_ir − acc_e (paper Table 2);
* fd — Fréchet distance between classifier features of images for prompts not naming the
  concept and real world images of the same labels (collateral damage, like the paper's FID).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..backends.base import Backend
from ..errors import ZEraseError, shown
from ..sampling import euler
from ..seeds import SEED_RANGE, offset_seed, valid_seed
from . import world
from .world import ATTRIBUTES, Labels, make_prompt, random_labels

# The benches' evaluation prompts and noise: seeded apart from training (the run's seed draws its x_t and prompts).
EVAL_SEED_OFFSET = 10_000


@dataclass(frozen=True)
class Concept:
    """A concept of the world: the word the user typed and the (attribute, value) it denotes."""

    word: str
    attribute: str
    value: str

    @property
    def others(self) -> tuple[str, ...]:
        """The other values of the same attribute: the natural preservation set."""
        return tuple(v for v in ATTRIBUTES[self.attribute] if v != self.value)


def weights_identity(bundle) -> dict[str, Any]:
    """Which toy weights a result came from: training step and the DiT file's content hash."""
    import hashlib

    from . import DIT_FILE

    digest = hashlib.sha256(DIT_FILE.read_bytes()).hexdigest()[:16] if DIT_FILE.exists() else "n/a"
    return {"step": bundle.metadata.get("step"), "sha256_16": digest}


def check_n_eval(n_eval: int) -> None:
    """Refuse, before any training, an evaluation too small to measure: the robustness sets take half as many
    prompts, and each set needs one (the Fréchet distance needs two)."""
    if n_eval < 2:
        raise ZEraseError(f"--n-eval must be at least 2 (prompts per evaluation set); got {n_eval}.")


def check_grid(concepts: list[str], seeds: list[int]) -> None:
    """Refuse, before any cell runs, a grid that measures a cell twice (both copies went into the summary) or a seed
    torch does not take (methods that train nothing, the original model, checked no seed)."""
    twice = sorted({str(x) for xs in (concepts, seeds) for x in xs if xs.count(x) > 1})
    if twice:
        raise ZEraseError(f"{', '.join(twice)} named twice in --concepts or --seeds; each cell is measured once.")
    if not all(map(valid_seed, seeds)):
        raise ZEraseError(f"Seeds must be {SEED_RANGE}; got {seeds}.")


def parse_concept(word: str) -> Concept:
    named = world.concept_phrase(word)
    if named is None:
        known = ", ".join(v for values in ATTRIBUTES.values() for v in values)
        raise ZEraseError(f"'{shown(word)}' is not one concept of the toy world; give just its word, one of {known} "
                          "(or a synonym such as 'crimson').")
    return Concept(" ".join(word.lower().split()), *named)


def replace_word(text: str, word: str, by: str) -> str:
    """Replace the first whole-word occurrence ("red" in "a red ball", not in "coloured")."""
    return re.sub(r"(?<![a-z])" + re.escape(word) + r"(?![a-z])", lambda _: by, text, count=1)


def name_concept(text: str, concept: Concept) -> str:
    """Use the user's word (e.g. a synonym) where the prompt names the concept's canonical value."""
    return text if concept.word == concept.value else replace_word(text, concept.value, concept.word)


def prompt_sets(concept: Concept, n: int, seed: int, style: str = "canonical"):
    """(named labels, named prompts, other labels, other prompts): n each, deterministic."""
    rng = random.Random(seed)
    named, other = [], []
    while len(named) < n or len(other) < n:
        labels = random_labels(rng)
        if getattr(labels, concept.attribute) == concept.value:
            continue
        if len(other) < n:
            other.append(labels)
        if len(named) < n:
            named.append(replace(labels, **{concept.attribute: concept.value}))
    # Canonical prompts use the user's word (a synonym stays a synonym); other styles vary words themselves.
    named_prompts = [
        name_concept(make_prompt(lab, style, rng), concept) if style == "canonical" else make_prompt(lab, style, rng)
        for lab in named
    ]
    other_prompts = [make_prompt(lab, style, rng) for lab in other]
    return named, named_prompts, other, other_prompts


@torch.no_grad()
def generate_through(backend: Backend, bundle, prompts: list[str], seed: int, lora: bool,
                     batch: int = 50) -> torch.Tensor:
    """(N, 3, 32, 32) images with the toy's default sampler, through the engine's backend (LoRA on or off), as every
    measurement is taken; ``zerase_core.toy.generate`` samples the bare transformer."""
    s = bundle.sampling
    sigmas = s.sigmas()
    uncond = backend.encode([s.negative_prompt])[0]
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        g = torch.Generator().manual_seed(offset_seed(seed, start))
        noise = torch.randn((len(chunk), *bundle.latent_shape), generator=g)
        x0 = euler(backend, noise, sigmas, backend.encode(chunk), uncond=[uncond] * len(chunk), cfg=s.cfg, lora=lora)
        if not torch.isfinite(x0).all():  # measured, NaN pictures ended in a linear-algebra traceback
            raise ZEraseError(f"The toy model's pictures {'with the LoRA ' if lora else ''}are not finite numbers "
                              "(NaN or inf): its weights are too large for the model (an edited or damaged file). "
                              "Re-train it, or measure another file.")
        images.append(bundle.to_image(x0.cpu()))
    return torch.cat(images)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between two feature sets (N, d): ‖μa − μb‖² + Tr(Ca + Cb − 2 (Ca^½ Cb Ca^½)^½)."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).square().sum()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp_min(0).sqrt().sum()
    return float(mu + ca.trace() + cb.trace() - 2 * cross)


def _hits(predicted: dict[str, list[str]], labels: list[Labels], attributes) -> list[bool]:
    return [predicted[a][i] == getattr(lab, a) for i, lab in enumerate(labels) for a in attributes]


def erasure_report(backend: Backend, bundle, concept: Concept, n: int, seed: int, lora: bool,
                   styles: tuple[str, ...] = ("canonical",)) -> dict[str, float]:
    """acc_e, acc_ir, h_a, fd for the model with the LoRA on or off; acc_e per extra prompt style."""
    named, named_prompts, other, other_prompts = prompt_sets(concept, n, seed)
    images = generate_through(backend, bundle, named_prompts + other_prompts, seed, lora)
    predicted = bundle.classifier.predict(images)
    pred_named = {a: p[:n] for a, p in predicted.items()}
    pred_other = {a: p[n:] for a, p in predicted.items()}
    acc_e = sum(v == concept.value for v in pred_named[concept.attribute]) / n
    keep = [a for a in ATTRIBUTES if a != concept.attribute]
    checks = _hits(pred_named, named, keep) + _hits(pred_other, other, ATTRIBUTES)
    acc_ir = sum(checks) / len(checks)
    per_attribute = {a: sum(_hits(pred_other, other, [a])) / n for a in ATTRIBUTES}
    real = torch.from_numpy(np.stack([world.render(lab) for lab in other])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        fd = frechet_distance(bundle.classifier.features(images[n:]), bundle.classifier.features(real))
    report = {"acc_e": acc_e, "acc_ir": acc_ir, "h_a": acc_ir - acc_e, "fd": fd,
              "adherence_other_prompts": per_attribute}
    for style in styles:
        if style == "canonical":
            continue
        m = max(1, n // 2)  # robustness sets are half size: they estimate acc_e alone
        _, prompts, _, _ = prompt_sets(concept, m, seed + 1, style)
        images = generate_through(backend, bundle, prompts, seed + 1, lora)
        predicted = bundle.classifier.predict(images)[concept.attribute]
        report[f"acc_e_{style}"] = sum(v == concept.value for v in predicted) / m
    return report
