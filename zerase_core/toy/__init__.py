"""The built-in toy world: a shapes world, a tiny Z-Image-structured text-to-image model trained
on it, and a per-attribute classifier that judges what the model draws. Runs offline on a CPU.

    bundle = load_toy()
    images = generate(bundle, ["a large red circle on the left on a white background"], seed=0)
    evaluate_adherence(bundle, n_per_attr=100, seed=0)   # {"colour": 0.97, "shape": 0.93, ...}
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

from .classifier import ToyClassifier
from .evaluate import adherence
from .model import DiTConfig, build_transformer, to_image, to_latent
from .sampling import SamplerConfig, euler_sample
from .text import TextConfig, ToyTextEncoder
from .weights_io import WEIGHTS_DIR, load_weights
from . import world

DIT_FILE = WEIGHTS_DIR / "toy_dit.safetensors"
CLASSIFIER_FILE = WEIGHTS_DIR / "classifier.safetensors"


@dataclass(frozen=True)
class ToyBundle:
    """Everything needed to run, erase on, and judge the toy model. All modules are frozen (eval)."""

    transformer: torch.nn.Module  # diffusers ZImageTransformer2DModel
    encoder: ToyTextEncoder  # implements zerase_core.prompts.PromptEncoder
    classifier: ToyClassifier
    sampling: SamplerConfig  # the default sampler, as stored with the weights
    dit_config: DiTConfig
    latent_shape: tuple[int, int, int]  # (C, H, W) of one latent
    to_latent: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, 32, 32) in [0, 1] -> (N, C, H, W)
    to_image: Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) -> (N, 3, 32, 32) in [0, 1]
    world: object  # the zerase_core.toy.world module (labels, rendering, prompts)
    metadata: dict  # the DiT file's metadata (training settings, measured adherence)


def _frozen(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    module = module.to(device=device)
    if next(module.parameters()).dtype != dtype:  # diffusers warns on every dtype cast, even a no-op
        module = module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def load_toy(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    dit_path: Path = DIT_FILE,
    classifier_path: Path = CLASSIFIER_FILE,
) -> ToyBundle:
    """Load the shipped toy model, encoder and classifier."""
    state, meta = load_weights(dit_path)
    if meta.get("format") != "zerase-toy-dit":
        raise ValueError(f"{dit_path} is not a toy DiT file (format {meta.get('format')!r})")
    dit = _config_from(DiTConfig, meta["dit_config"])
    text = _config_from(TextConfig, meta["text_config"])
    sampler = _config_from(SamplerConfig, meta["sampler"])
    transformer = build_transformer(dit)
    transformer.load_state_dict(_prefixed(state, "transformer."))
    encoder = ToyTextEncoder(text, words=[w for w in meta["vocabulary"].split(" ") if w])
    encoder.load_state_dict(_prefixed(state, "encoder."))
    classifier = ToyClassifier()
    classifier.load_state_dict(load_weights(classifier_path)[0])
    return ToyBundle(
        transformer=_frozen(transformer, device, dtype),
        encoder=_frozen(encoder, device, torch.float32),  # tiny; its features are cast per use
        classifier=_frozen(classifier, device, torch.float32),
        sampling=sampler,
        dit_config=dit,
        latent_shape=dit.latent_shape,
        to_latent=partial(to_latent, config=dit),
        to_image=partial(to_image, config=dit),
        world=world,
        metadata=meta,
    )


def generate(
    bundle: ToyBundle,
    prompts: Sequence[str],
    seed: int,
    sampler: SamplerConfig | None = None,
    transformer: torch.nn.Module | None = None,
) -> torch.Tensor:
    """(N, 3, 32, 32) images in [0, 1]. ``transformer`` overrides the bundle's (e.g. one with a LoRA)."""
    model = transformer if transformer is not None else bundle.transformer
    param = next(model.parameters())
    return euler_sample(
        model, bundle.encoder, bundle.dit_config, prompts, seed, sampler or bundle.sampling, param.device, param.dtype
    )


def evaluate_adherence(
    bundle: ToyBundle, n_per_attr: int = 100, seed: int = 0, style: str = "canonical",
    sampler: SamplerConfig | None = None,
) -> dict[str, float]:
    """Per attribute, the fraction of ``n_per_attr`` random prompts whose image shows the prompted value.

    Every prompt names all attributes, so one set of ``n_per_attr`` images measures all of them.
    """
    return adherence(
        bundle.transformer, bundle.encoder, bundle.dit_config, bundle.classifier,
        sampler or bundle.sampling, n_per_attr, seed, style,
    )  # fmt: skip


def _config_from(cls, text: str):
    """Rebuild a frozen config from its repr(asdict(...)) metadata entry; tuples stay tuples."""
    fields = ast.literal_eval(text)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


__all__ = ["ToyBundle", "load_toy", "generate", "evaluate_adherence", "SamplerConfig", "DiTConfig", "world"]
