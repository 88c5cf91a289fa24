"""Train the toy world's models from scratch on CPU.

    python -m zerase_core.toy.train classifier
    python -m zerase_core.toy.train dit --run-dir /work/toy_runs/final [--steps N ...]

The DiT run is resumable: it checkpoints model, EMA, optimizer, step and RNG state into
``--run-dir`` every few minutes and resumes from there when restarted with the same
command. Each training batch is a pure function of (seed, step), so a resumed run sees the
same data as an uninterrupted one. It exports shippable weights (EMA, fp16) on every
evaluation, into the run dir, and to ``--export`` when adherence improves.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import pickle
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ZEraseError
from .classifier import ClassifierTraining, ToyClassifier, train_classifier
from .evaluate import adherence
from .model import DiTConfig, build_transformer, config_metadata, predict, to_latent
from .sampling import SamplerConfig
from .text import TextConfig, ToyTextEncoder
from .weights_io import WEIGHTS_DIR, load_weights, save_weights
from .world import ATTRIBUTES, PROMPT_STYLES, make_prompt, sample

log = logging.getLogger("zerase_core.toy.train")

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class DiTTraining:
    """Rectified-flow training of the toy DiT and text encoder.

    The shipped weights came from a run whose settings changed at a few steps; the defaults are
    its first phase and ``scripts/train_toy.py`` lists all of them.
    """

    steps: int = 7000
    batch: int = 32  # ~0.6 s/step on one core, so the whole run fits in about 80 minutes
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.999
    caption_dropout: float = 0.1  # empty prompt, so the unconditional branch for CFG is learnt
    omit_attribute: float = 0.15  # leave single attributes out so each word is learnt on its own
    style_weights: tuple[float, ...] = (0.35, 0.25, 0.25, 0.15)  # PROMPT_STYLES order
    sigma_mean: float = 0.0  # logit-normal sigma sampling (SD3): most steps at mid noise
    sigma_std: float = 1.0
    # Extra loss weight on pixels near the object's outline. Form (circle vs star) lives in a thin
    # band of pixels, a tiny share of a plain MSE, and a small DiT learns it last; this raises its share.
    edge_weight: float = 0.0
    seed: int = 0
    eval_every: int = 500
    eval_samples: int = 200
    checkpoint_seconds: float = 180.0

    def __post_init__(self):
        if len(self.style_weights) != len(PROMPT_STYLES):
            raise ValueError(f"DiTTraining: style_weights needs {len(PROMPT_STYLES)} entries")


def adaln_zero(transformer) -> None:
    """DiT's adaLN-zero init: every block starts as identity and the output at zero; trains faster."""
    for module in transformer.modules():
        mod = getattr(module, "adaLN_modulation", None)
        if mod is not None:
            last = [m for m in mod.modules() if isinstance(m, torch.nn.Linear)][-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
    for final in transformer.all_final_layer.values():
        torch.nn.init.zeros_(final.linear.weight)
        torch.nn.init.zeros_(final.linear.bias)


def batch_prompts(labels, cfg: DiTTraining, rng: random.Random) -> list[str]:
    prompts = []
    for lab in labels:
        if rng.random() < cfg.caption_dropout:
            prompts.append("")
            continue
        style = rng.choices(PROMPT_STYLES, weights=cfg.style_weights)[0]
        omit = [name for name in ATTRIBUTES if rng.random() < cfg.omit_attribute]
        prompts.append(make_prompt(lab, style, rng, omit=omit))
    return prompts


def training_batch(step: int, cfg: DiTTraining, dit: DiTConfig):
    """(x0 latents, prompts, noise, sigma) for ``step``: a pure function of (seed, step)."""
    seed = cfg.seed * 1_000_003 + step
    images, labels = sample(cfg.batch, seed)
    x0 = to_latent(torch.from_numpy(images).permute(0, 3, 1, 2), dit)  # (B, H, W, 3) -> (B, C, h, w)
    prompts = batch_prompts(labels, cfg, random.Random(seed))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(cfg.sigma_mean + cfg.sigma_std * torch.randn(cfg.batch, generator=gen))
    return x0, prompts, noise, sigma


def edge_weights(x0: torch.Tensor, dit: DiTConfig, strength: float) -> torch.Tensor:
    """Per-element loss weights (same shape as latents ``x0``), 1 + strength within ~1 px of an edge."""
    image = F.pixel_shuffle(x0, dit.unshuffle)  # (B, C, h, w) -> (B, 3, H, W)
    spread = F.max_pool2d(image, 3, 1, 1) + F.max_pool2d(-image, 3, 1, 1)  # local max - local min
    edge = (spread.amax(1, keepdim=True) > 0.1).float()  # (B, 1, H, W): a colour change nearby
    weight = 1.0 + strength * edge.expand_as(image)
    return F.pixel_unshuffle(weight, dit.unshuffle)  # back to the latent layout


def lr_at(step: int, cfg: DiTTraining) -> float:
    """Linear warmup, then cosine to 10% so the last checkpoints settle."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint of this trainer, read without unpickling objects (reading a file cannot run code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # written before 25759ae: its best score was numpy's float
        raise ZEraseError(
            f"{path} holds Python objects beyond tensors and numbers (a checkpoint written before checkpoints were "
            "read without unpickling: its score is numpy's float). If you wrote it yourself, convert it once: "
            f"python -c \"import torch; p = r'{path}'; s = torch.load(p, weights_only=False); "
            "s['best'] = float(s['best']); torch.save(s, p)\"") from err


class Trainer:
    def __init__(self, run_dir: Path, cfg: DiTTraining, dit: DiTConfig, text: TextConfig, sampler: SamplerConfig):
        self.run_dir, self.cfg, self.dit, self.text, self.sampler = run_dir, cfg, dit, text, sampler
        torch.manual_seed(cfg.seed)
        self.transformer = build_transformer(dit)
        adaln_zero(self.transformer)
        self.encoder = ToyTextEncoder(text)
        self.ema_transformer = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        self.ema_encoder = copy.deepcopy(self.encoder).eval().requires_grad_(False)
        params = list(self.transformer.parameters()) + list(self.encoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.step = 0
        self.best = -1.0
        self.classifier = _load_classifier()

    # -------------------------------------------------------------- checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "best": float(self.best),  # a plain float: the file loads with weights_only (no pickled objects)
            "transformer": self.transformer.state_dict(),
            "encoder": self.encoder.state_dict(),
            "ema_transformer": self.ema_transformer.state_dict(),
            "ema_encoder": self.ema_encoder.state_dict(),
            "opt": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": repr(asdict(self.cfg)),
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)  # a crash mid-write leaves the previous checkpoint intact
        log.info("checkpoint at step %d", self.step)

    def warm_start(self, path: Path) -> None:
        """Start from another run's live weights; tensors whose name or shape differ stay fresh.

        The transformer blocks do not depend on the patch size (only the embedder and final layer
        do), so a patch-2 run can seed a patch-1 run and keep what it learnt about the prompts.
        """
        state = _read_checkpoint(path)
        pairs = ((self.transformer, self.ema_transformer, "transformer"), (self.encoder, self.ema_encoder, "encoder"))
        for module, ema, key in pairs:
            own = module.state_dict()
            fits = {k: v for k, v in state[key].items() if k in own and own[k].shape == v.shape}
            module.load_state_dict(fits, strict=False)
            ema.load_state_dict(module.state_dict())
            log.info("warm start %s: %d of %d tensors from %s", key, len(fits), len(own), path)

    def try_resume(self) -> None:
        if not self.ckpt_path.exists():
            return
        state = _read_checkpoint(self.ckpt_path)
        self.transformer.load_state_dict(state["transformer"])
        self.encoder.load_state_dict(state["encoder"])
        self.ema_transformer.load_state_dict(state["ema_transformer"])
        self.ema_encoder.load_state_dict(state["ema_encoder"])
        self.opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.best = state["step"], state["best"]
        log.info("resumed from step %d (best mean adherence %.3f)", self.step, self.best)

    # -------------------------------------------------------------- training
    def train_step(self) -> float:
        x0, prompts, noise, sigma = training_batch(self.step, self.cfg, self.dit)
        s = sigma.view(-1, 1, 1, 1)
        x_t = s * noise + (1.0 - s) * x0
        caps, _ = self.encoder.features(prompts)
        out = predict(self.transformer, x_t, sigma, caps, self.dit.patch_size)
        err = (out - (x0 - noise)).square()  # the raw output is x0 - eps (= -velocity)
        if self.cfg.edge_weight:
            w = edge_weights(x0, self.dit, self.cfg.edge_weight)
            loss = (w * err).sum() / w.sum()  # normalised: the step size stays that of a plain MSE
        else:
            loss = err.mean()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], 1.0)
        self.opt.step()
        self.update_ema()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))  # short memory while weights move fast
        for ema, live in ((self.ema_transformer, self.transformer), (self.ema_encoder, self.encoder)):
            ema_p, live_p = list(ema.parameters()), list(live.parameters())
            torch._foreach_lerp_(ema_p, live_p, 1.0 - decay)

    def evaluate_and_export(self, export: Path | None) -> None:
        if self.classifier is None:
            log.warning("no classifier weights: skipping adherence evaluation")
            return
        t0 = time.time()
        acc = adherence(
            self.ema_transformer, self.ema_encoder, self.dit, self.classifier, self.sampler,
            self.cfg.eval_samples, seed=10_000,
        )  # fmt: skip
        score = min(acc["colour"], acc["shape"])
        log.info("step %d adherence %s (%.0f s)", self.step, {k: round(v, 3) for k, v in acc.items()}, time.time() - t0)
        self.export(self.run_dir / f"toy_dit_step{self.step}.safetensors", acc)
        if export is not None and score > self.best:
            self.best = score
            self.export(export, acc)
            log.info("exported to %s (min(colour, shape) = %.3f)", export, score)

    def export(self, path: Path, acc: dict[str, float]) -> None:
        state = {f"transformer.{k}": v for k, v in self.ema_transformer.state_dict().items()}
        state.update({f"encoder.{k}": v for k, v in self.ema_encoder.state_dict().items()})
        metadata = {
            "format": "zerase-toy-dit",
            "format_version": FORMAT_VERSION,
            "step": self.step,  # stored as "40000" (a str would be quoted, JSON-like: files.atomic_save)
            "training": repr(asdict(self.cfg)),
            "adherence": repr(acc),
            "adherence_samples": self.cfg.eval_samples,
            **config_metadata(self.dit),
            **self.ema_encoder.metadata(),
            **self.sampler.metadata(),
        }
        save_weights(path, state, metadata)

    def run(self, export: Path | None, stop_at: int | None = None, init_from: Path | None = None) -> None:
        """Train to ``cfg.steps`` (or pause at ``stop_at``, checkpointed, e.g. to change settings there)."""
        if init_from is not None and not self.ckpt_path.exists():
            self.warm_start(init_from)
        self.try_resume()
        last_ckpt = time.time()
        t0, losses = time.time(), []
        end = self.cfg.steps if stop_at is None else min(stop_at, self.cfg.steps)
        while self.step < end:
            losses.append(self.train_step())
            if self.step % 50 == 0:
                log.info(
                    "step %d loss %.4f lr %.2e %.2f s/step",
                    self.step, sum(losses) / len(losses), lr_at(self.step, self.cfg), (time.time() - t0) / len(losses),
                )  # fmt: skip
                t0, losses = time.time(), []
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                self.evaluate_and_export(export)
                self.save_checkpoint()
                last_ckpt = time.time()
            elif time.time() - last_ckpt > self.cfg.checkpoint_seconds:
                self.save_checkpoint()
                last_ckpt = time.time()
        self.save_checkpoint()
        log.info("stopped at step %d of %d", self.step, self.cfg.steps)


def _load_classifier() -> ToyClassifier | None:
    path = WEIGHTS_DIR / "classifier.safetensors"
    if not path.exists():
        return None
    state, _ = load_weights(path)
    model = ToyClassifier()
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def _train_classifier_cli(args) -> None:
    cfg = ClassifierTraining(steps=args.steps) if args.steps else ClassifierTraining()
    model, acc = train_classifier(cfg)
    metadata = {
        "format": "zerase-toy-classifier",
        "format_version": FORMAT_VERSION,
        "training": repr(asdict(cfg)),
        "heldout_accuracy": repr(acc),
    }
    save_weights(WEIGHTS_DIR / "classifier.safetensors", model.state_dict(), metadata)
    log.info("saved classifier; held-out accuracy %s", acc)


def _train_dit_cli(args) -> None:
    cfg = DiTTraining()
    overrides = {k: v for k, v in vars(args).items() if k in DiTTraining.__dataclass_fields__ and v is not None}
    cfg = replace(cfg, **overrides)
    dit = replace(DiTConfig(), **({"patch_size": args.patch_size} if args.patch_size else {}))
    args.run_dir.mkdir(parents=True, exist_ok=True)
    log_file = str((args.run_dir / "train.log").resolve())
    root = logging.getLogger()
    if not any(getattr(h, "baseFilename", None) == log_file for h in root.handlers):  # phases share one log
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        root.addHandler(handler)
    log.info("training %s %s", cfg, dit)
    Trainer(args.run_dir, cfg, dit, TextConfig(), SamplerConfig()).run(args.export, args.stop_at, args.init_from)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep 1 on a shared machine)")
    sub = parser.add_subparsers(dest="what", required=True)
    p_cls = sub.add_parser("classifier")
    p_cls.add_argument("--steps", type=int)
    p_dit = sub.add_parser("dit")
    p_dit.add_argument("--run-dir", type=Path, required=True)
    p_dit.add_argument("--export", type=Path, help="where to write the best weights (e.g. the shipped file)")
    for name in ("steps", "batch", "eval_every", "eval_samples", "seed", "warmup"):
        p_dit.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("lr", "sigma_mean", "sigma_std", "caption_dropout", "omit_attribute", "ema", "edge_weight"):
        p_dit.add_argument("--" + name.replace("_", "-"), type=float)
    p_dit.add_argument("--patch-size", type=int)
    p_dit.add_argument("--init-from", type=Path, help="checkpoint.pt of another run to start from (fresh optimizer)")
    p_dit.add_argument("--stop-at", type=int, help="pause at this step (checkpointed); resume with new settings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    {"classifier": _train_classifier_cli, "dit": _train_dit_cli}[args.what](args)


if __name__ == "__main__":
    main()
