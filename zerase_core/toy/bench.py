"""``python -m zerase_core bench``: the paper's comparison (Tables 3-5, Fig. 8) on the toy world.

Every (method, concept, seed) cell trains (if the method trains) and is measured exactly by
the classifier; cells are cached as JSON under ``OUT/cells`` so an interrupted bench resumes
where it stopped. The table reports means ± standard deviation over concepts and seeds,
per attribute type, plus erasure under synonyms, shuffled word order and paraphrase.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.toy import toy_backend
from ..config import TrainConfig
from ..errors import ZEraseError
from ..files import atomic_write_text, check_writable
from ..prompts import concept_token_indices
from ..run_files import trained_as
from ..trainer import ZEraseTrainer
from .demo import toy_train_config
from .erasure_metrics import (
    EVAL_SEED_OFFSET, Concept, check_grid, check_n_eval, erasure_report, parse_concept, weights_identity,
)
from .world import PROMPT_STYLES

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Method:
    """One row of the table: how (and whether) a LoRA is trained, or an inference-time trick."""

    name: str
    description: str
    train: dict[str, Any] | None = None  # TrainConfig overrides; None: nothing is trained
    lora: dict[str, Any] = field(default_factory=dict)  # LoRAConfig overrides
    zero_tokens: bool = False


ESD = {"attn_weight": 0.0, "lambda_mode": "fixed", "fixed_lambda": 0.0}
METHODS = (
    Method("original", "the toy model as shipped"),
    Method("token_zeroing", "concept attention columns zeroed after the softmax at inference (§3)", zero_tokens=True),
    Method("naive_ungated", "LoRA on shared q/k/v for all tokens, L_erase only (§3: collapses)", ESD, {"scope": "all"}),
    Method("gated_erase", "gated LoRA, L_erase only (ESD in the safe subspace)", ESD),
    Method("gated_erase_attn", "gated, L_erase + L_attn, no preservation",
           {"lambda_mode": "fixed", "fixed_lambda": 0.0}),
    Method("gated_fixed_lambda", "gated, L_er + 1.0·L_pr (static weighting)",
           {"lambda_mode": "fixed", "fixed_lambda": 1.0}),
    Method("zerase", "Z-Erase: gated, L_er + λ L_pr, λ by Eq. 15 (ε = 1e-3)", {}),
    Method("zerase_fresh", "Z-Erase with x_t sampled fresh every step (ESD's way; the default is a pool)",
           {"xt_source": "fresh"}),
    Method("zerase_exact", "Z-Erase with the exact λ* of Eq. 12 (two backward passes)", {"lambda_mode": "exact"}),
    Method("zerase_paired", "Z-Erase, Eq. 15 with both L_pr values on one batch (before/after the update)",
           {"lambda_mode": "paired"}),
    Method("zerase_eps_1e-4", "Z-Erase, ε = 1e-4 (tighter than the toy's 1e-3)", {"epsilon": 1e-4}),
    Method("zerase_eps_1e-2", "Z-Erase, ε = 1e-2 (Table 6's value for abstractions and entities)", {"epsilon": 1e-2}),
)


def _zeroing_fn(concept: Concept):
    """Token indices of the concept's own word in each prompt; none when it is not there (brittleness)."""

    def indices(prompts):
        found = []
        for p in prompts:
            try:
                found.append(concept_token_indices(p, concept.word))
            except ZEraseError:  # the word is absent, so this baseline removes nothing
                found.append([])
        return found

    return indices


def cell_config(bundle, method: Method, concept: Concept, seed: int, steps: int) -> TrainConfig | None:
    """The training settings of one cell (None for the untrained rows)."""
    if method.train is None:
        return None
    base = toy_train_config(concept, None, steps, seed, bundle.sampling)
    return dataclasses.replace(base, lora=dataclasses.replace(base.lora, **method.lora), **method.train)


# How a run executes does not change what it trains (checkpointing gives the same gradients, tested): the key holds
# those settings at the values the committed cells were keyed with, so a new default ("auto" checkpointing) does not
# orphan them (docs/bench/toy was keyed with gradient_checkpointing False, before "auto").
KEYED_EXECUTION = {"checkpoint_every": 100, "gradient_checkpointing": False}


def config_key(config: TrainConfig | None) -> str:
    """Short hash of every training setting, so a cell trained under other settings is not reused."""
    if config is None:
        return "untrained"
    settings = trained_as(config.to_dict()) | KEYED_EXECUTION
    if config.xt_source == "fresh":  # fresh x_t came from the frozen model before; those cells must not count
        settings["fresh_sampler"] = "trained model"
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def run_cell(bundle, method: Method, concept: Concept, seed: int, config: TrainConfig | None,
             n_eval: int) -> dict[str, Any]:
    """Train by ``config`` (from :func:`cell_config`; None: no training) and measure."""
    backend = toy_backend(bundle)
    start = time.perf_counter()
    lora_on = config is not None
    if lora_on:
        ZEraseTrainer(backend, config).run()
    train_seconds = time.perf_counter() - start

    def measure(lora: bool) -> dict[str, Any]:
        return erasure_report(backend, bundle, concept, n_eval, EVAL_SEED_OFFSET + seed, lora=lora,
                              styles=PROMPT_STYLES)

    if method.zero_tokens:
        with backend.zeroing_tokens(_zeroing_fn(concept)):
            report = measure(lora=False)
    else:
        report = measure(lora=lora_on)
    backend.uninstall()
    return report | {"train_seconds": round(train_seconds, 1)}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# What summarise reads of a cell.
CELL_KEYS = ("acc_e", "acc_ir", "h_a", "fd", "acc_e_synonym", "acc_e_shuffled", "acc_e_paraphrase", "train_seconds")


def _read_cell(path: Path) -> dict[str, Any]:
    """A measured cell; a damaged one (cut short by a full disk, edited) is refused by name, saying how to measure it
    anew."""
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in CELL_KEYS if not isinstance(cell.get(k), (int, float))]
        if missing:
            raise ValueError(f"no number for {', '.join(missing)}")
    except (OSError, ValueError, AttributeError) as err:  # AttributeError: JSON that is not an object
        raise ZEraseError(f"The bench cell {path} is damaged ({err}); delete it and run the same command again to "
                          "measure it anew.") from err
    return cell


def summarise(cells: dict[tuple[str, str, int], dict], concepts: list[Concept]) -> list[dict[str, Any]]:
    """Per method: mean ± sd of each metric, per attribute type and overall."""
    rows = []
    kinds = sorted({c.attribute for c in concepts})
    for method in METHODS:
        mine = {k: v for k, v in cells.items() if k[0] == method.name}
        if not mine:
            continue
        row: dict[str, Any] = {"method": method.name, "description": method.description, "n": len(mine)}
        for kind in kinds + ["all"]:
            part = [v for (m, c, s), v in mine.items() if kind == "all" or parse_concept(c).attribute == kind]
            for metric in ("acc_e", "acc_ir", "h_a"):
                if part:
                    row[f"{kind}.{metric}"] = _mean_sd([p[metric] for p in part])
        everything = list(mine.values())
        for metric in ("fd", "acc_e_synonym", "acc_e_shuffled", "acc_e_paraphrase", "train_seconds"):
            row[metric] = _mean_sd([p[metric] for p in everything])
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, Any]], kinds: list[str], command: str) -> str:
    fmt = lambda ms: f"{ms[0]:.2f} ± {ms[1]:.2f}"  # noqa: E731
    head = (["method"] + [f"{k} acc_e ↓ / h_a ↑" for k in kinds]
            + ["acc_e synonym", "acc_e shuffled", "acc_e paraphrase", "FD ↓", "train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"]]
        cells += [f"{fmt(r[f'{k}.acc_e'])} / {fmt(r[f'{k}.h_a'])}" if f"{k}.acc_e" in r else "–" for k in kinds]
        cells += [fmt(r[m]) for m in ("acc_e_synonym", "acc_e_shuffled", "acc_e_paraphrase", "fd")]
        cells.append(f"{r['train_seconds'][0]:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    shown = {r["method"] for r in rows}
    legend = "\n".join(f"- **{m.name}**: {m.description}" for m in METHODS if m.name in shown)
    return f"Produced by `{command}`; mean ± sd over concepts × seeds.\n\n" + "\n".join(lines) + "\n\n" + legend + "\n"


def run_bench(concept_words: list[str], seeds: list[int], steps: int, n_eval: int, out: Path,
              methods: list[str] | None, command: str, bundle=None,
              assemble_only: bool = False) -> list[dict[str, Any]]:
    """Run (or, with ``assemble_only``, only collect) every cell, then write bench.json and bench.md.

    Cells are independent files, so several processes may fill one ``out`` folder in parallel.
    """
    from . import load_toy

    chosen, concepts = _checked(concept_words, seeds, n_eval, out, methods)
    bundle = bundle or load_toy()
    # Every cell's settings first: one that TrainConfig refuses (--steps 0) is told before any cell is measured.
    configs = {(m.name, c.word, seed): cell_config(bundle, m, c, seed, steps)
               for m in chosen for c in concepts for seed in seeds}
    identity = weights_identity(bundle)  # at load time: the file may be replaced while the bench runs
    cells = _cells(bundle, configs, chosen, concepts, seeds, f"{steps}__{n_eval}__{identity['sha256_16']}", n_eval,
                   out / "cells", assemble_only)
    if assemble_only and all(configs[key] is None for key in cells):  # an empty or untrained-only table
        raise ZEraseError(f"{out / 'cells'} holds no trained cell of these settings (concepts, seeds, --steps, "
                          "--n-eval, the toy's weights and the methods' training settings): nothing was written. Run "
                          "without --assemble-only to measure them.")
    rows = summarise(cells, [c for c in concepts if any(k[1] == c.word for k in cells)])
    kinds = sorted({c.attribute for c in concepts})
    table = {"command": command, "steps": steps, "n_eval": n_eval, "seeds": seeds, "concepts": concept_words,
             "toy_weights": identity, "rows": rows}
    atomic_write_text(out / "bench.json", json.dumps(table, indent=2))
    atomic_write_text(out / "bench.md", to_markdown(rows, kinds, command))
    return rows


def _checked(concept_words, seeds, n_eval, out: Path, methods):
    """The methods chosen and the concepts parsed, every argument checked before the toy loads."""
    unknown = sorted(set(methods or ()) - {m.name for m in METHODS})
    if unknown or methods == []:
        raise ZEraseError(f"Unknown bench methods {unknown}; choose from {[m.name for m in METHODS]}.")
    check_n_eval(n_eval)
    check_grid(concept_words, seeds)
    concepts = [parse_concept(w) for w in concept_words]
    if os.path.isfile(out):
        raise ZEraseError(f"{out} is a file; --out names a folder for the cells and the table.")
    check_writable(out / "bench.json")  # a name too long, a folder that cannot be written: before hours of cells
    return [m for m in METHODS if methods is None or m.name in methods], concepts


def _cells(bundle, configs, chosen, concepts, seeds, run_key: str, n_eval: int, folder: Path, assemble_only: bool):
    """Each cell's result, measured where its file is missing (unless ``assemble_only``): a cell is a file named by
    its method, concept, seed, the run's steps, n_eval and the toy's weights (``run_key``), and its settings, so one
    measured on other ones is not reused. ``folder`` is made by the first cell written: --assemble-only that finds
    none leaves nothing behind."""
    cells = {}
    for method in chosen:
        for concept in concepts:
            for seed in seeds:
                config = configs[(method.name, concept.word, seed)]
                path = folder / f"{method.name}__{concept.word}__{seed}__{run_key}__{config_key(config)}.json"
                if not path.exists():
                    if assemble_only:
                        continue
                    log.info("bench cell: %s / %s / seed %d", method.name, concept.word, seed)
                    atomic_write_text(path, json.dumps(run_cell(bundle, method, concept, seed, config, n_eval)))
                cells[(method.name, concept.word, seed)] = _read_cell(path)
    return cells
