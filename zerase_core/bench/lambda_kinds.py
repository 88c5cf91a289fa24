"""``python -m zerase_core bench-lambda``: how often the paper's λ rule leaves λ > 0 (toy world).

A step's cost depends on λ (see :mod:`.trainer`): while λ_t = 0 the preservation
predictions run without a graph; when λ_t > 0 the three student predictions run as one
batch-3 forward/backward; when λ_t = 0 but λ_{t+1} > 0 L_pr is recomputed with a graph.
This trains the toy with the demo's settings (:func:`~.toy.demo.toy_train_config`: the
paper's α, β, η, λ rule and the preset's ε) and counts the three kinds of step from the
history alone, so the real-model run time (:func:`.estimate.run_time_composition`)
can weigh them. No timing is taken here.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..cli import command, out_path
from ..config import XT_SOURCES
from .report import check_out, emit


def step_kinds(lams: list[float]) -> dict:
    """Counts of each step kind from the λ used in each step's loss (λ_{t+1}; λ₀ = 0)."""
    before = [0.0, *lams[:-1]]
    n = len(lams)
    kinds = {
        "lambda_zero": sum(1 for a, b in zip(before, lams) if a == 0 and b == 0),  # no-grad L_pr only
        "recomputed": sum(1 for a, b in zip(before, lams) if a == 0 and b > 0),  # L_pr recomputed with a graph
        "batched": sum(1 for a in before if a > 0),  # one batch-3 student forward/backward
    }
    return {"steps": n, **kinds,
            "fraction_lambda_positive": sum(1 for b in lams if b > 0) / n,
            "fraction_batched": kinds["batched"] / n,
            "fraction_recomputed": kinds["recomputed"] / n}


def measure(concepts: list[str], seeds: list[int], steps: int, sources: list[str]) -> dict:
    from ..backends.toy import toy_backend
    from ..toy import load_toy
    from ..toy.demo import toy_train_config
    from ..toy.erasure_metrics import check_grid, parse_concept
    from ..trainer import ZEraseTrainer

    check_grid(concepts, seeds)
    parsed = [(word, parse_concept(word)) for word in concepts]  # all before the first one trains
    bundle = load_toy()
    cells = []
    for word, concept in parsed:
        for seed in seeds:
            base = toy_train_config(concept, None, steps, seed, bundle.sampling)
            for source in sources:
                backend = toy_backend(bundle)
                trainer = ZEraseTrainer(backend, dataclasses.replace(base, xt_source=source))
                result = trainer.run()
                backend.uninstall()
                lams = [r.lam for r in result.history]
                cells.append({"concept": word, "seed": seed, "xt_source": source, "epsilon": base.eps,
                              **step_kinds(lams), "lambda_max": max(lams), "lambda_last": lams[-1]})
    total = {k: sum(c[k] for c in cells) for k in ("steps", "lambda_zero", "recomputed", "batched")}
    pos = sum(c["fraction_lambda_positive"] * c["steps"] for c in cells)
    summary = total | {"fraction_lambda_positive": pos / total["steps"],
                       "fraction_batched": total["batched"] / total["steps"],
                       "fraction_recomputed": total["recomputed"] / total["steps"]}
    return {"settings": "zerase_core.toy.demo.toy_train_config (paper α, β, η, λ rule; ε = 1e-3)",
            "cells": cells, "summary": summary}


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", nargs="+", default=["red", "circle"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--sources", nargs="+", default=list(XT_SOURCES), choices=XT_SOURCES)
    p.add_argument("--out", type=out_path)


@command("bench-lambda", "toy world: fraction of steps with λ > 0 under the paper's λ rule", _add)
def _bench_lambda(args: argparse.Namespace) -> int:
    check_out(args.out)
    result = measure(args.concepts, args.seeds, args.steps, args.sources)
    emit(result, args)
    return 0
