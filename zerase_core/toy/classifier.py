"""Per-attribute classifier for toy-world images: the judge of prompt adherence and erasure.

A small CNN with one linear head per attribute, trained on ground-truth world images.
``features`` returns the penultimate activations, used for a Fréchet distance between
image sets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .world import ATTRIBUTES, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierTraining:
    """How the shipped classifier was trained (defaults reproduce it)."""

    steps: int = 600
    batch: int = 128
    lr: float = 2e-3
    noise_std: float = 0.06  # max pixel noise added: generated images are never perfectly clean
    seed: int = 1234
    eval_samples: int = 2000
    eval_seed: int = 987_654  # held out: training seeds count up from `seed` and never reach it


class ToyClassifier(nn.Module):
    def __init__(self, width: int = 32, feat_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.GELU(),  # 16x16
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.GELU(),  # 8x8
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GELU(),
            nn.Flatten(),  # position is an attribute, so keep the spatial layout (no global pooling)
            nn.Linear(4 * width * 8 * 8, feat_dim), nn.GELU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({name: nn.Linear(feat_dim, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) images in [0, 1] -> (N, feat_dim) penultimate features."""
        return self.body(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Canonical value per attribute and image."""
        logits = self(images)
        return {name: [ATTRIBUTES[name][i] for i in logits[name].argmax(1).tolist()] for name in logits}


def world_batch(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N, 3, 32, 32) world images and per-attribute class indices."""
    images, labels = sample(n, seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
    y = {name: torch.tensor([lab.index(name) for lab in labels]) for name in ATTRIBUTES}
    return x, y


@torch.no_grad()
def accuracy(model: ToyClassifier, n: int, seed: int) -> dict[str, float]:
    x, y = world_batch(n, seed)
    logits = model(x)
    return {name: (logits[name].argmax(1) == y[name]).float().mean().item() for name in ATTRIBUTES}


def train_classifier(cfg: ClassifierTraining = ClassifierTraining()) -> tuple[ToyClassifier, dict[str, float]]:
    """Train on fresh world samples each step; returns the model (eval) and held-out accuracies."""
    torch.manual_seed(cfg.seed)
    noise_rng = np.random.default_rng(cfg.seed)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    for step in range(cfg.steps):
        x, y = world_batch(cfg.batch, cfg.seed + step)
        std = torch.from_numpy(noise_rng.uniform(0, cfg.noise_std, (cfg.batch, 1, 1, 1))).float()
        x = (x + std * torch.randn_like(x)).clamp(0, 1)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[name], y[name]) for name in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.info("classifier step %d loss %.4f", step, loss.item())
    model.eval()
    acc = accuracy(model, cfg.eval_samples, cfg.eval_seed)
    log.info("classifier held-out accuracy %s", acc)
    return model, acc

