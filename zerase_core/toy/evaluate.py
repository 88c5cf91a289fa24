"""Prompt adherence: prompt the model with random labels, judge the images with the classifier."""

from __future__ import annotations

import random

import torch

from ..seeds import offset_seed
from .classifier import ToyClassifier
from .model import DiTConfig
from .sampling import SamplerConfig, euler_sample
from .world import ATTRIBUTES, make_prompt, random_labels


@torch.no_grad()
def adherence(
    transformer,
    encoder,
    dit: DiTConfig,
    classifier: ToyClassifier,
    sampler: SamplerConfig,
    n: int,
    seed: int,
    style: str = "canonical",
    batch: int = 100,
) -> dict[str, float]:
    """Fraction of ``n`` samples whose classified attribute equals the prompted one, per attribute."""
    rng = random.Random(seed)
    labels = [random_labels(rng) for _ in range(n)]
    prompts = [make_prompt(lab, style, rng) for lab in labels]
    hits = {name: 0 for name in ATTRIBUTES}
    param = next(transformer.parameters())
    cls_device = next(classifier.parameters()).device
    for start in range(0, n, batch):
        chunk = slice(start, start + batch)
        images = euler_sample(transformer, encoder, dit, prompts[chunk], offset_seed(seed, start), sampler,
                              param.device, param.dtype)
        predicted = classifier.predict(images.to(cls_device, torch.float32))
        for name in ATTRIBUTES:
            hits[name] += sum(p == getattr(lab, name) for p, lab in zip(predicted[name], labels[chunk]))
    return {name: hits[name] / max(n, 1) for name in ATTRIBUTES}
