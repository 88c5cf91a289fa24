"""``python -m zerase_core bench-xt``: where x_t comes from — fresh ESD sampling vs the pool.

On the toy world (``load_toy()``), for each concept and seed, trains the same Z-Erase run
twice, once with ``xt_source="fresh"`` (x_t sampled every step) and once with ``"pool"``
(trajectories sampled once, :mod:`.xt_pool`), and reports each run's wall time (pool build
included) and the classifier-measured erasure: acc_e (concept still drawn; lower is better),
acc_ir (everything else still right; higher is better) and h_a = acc_ir − acc_e.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from ..cli import command, out_path
from ..config import XT_SOURCES, TrainConfig
from .report import check_out, emit

METRICS = ("acc_e", "acc_ir", "h_a")


def compare(concepts: list[str], seeds: list[int], steps: int, n_eval: int, pool: int) -> dict:
    from ..backends.toy import toy_backend
    from ..toy import load_toy
    from ..toy.demo import toy_train_config
    from ..toy.erasure_metrics import EVAL_SEED_OFFSET, check_grid, check_n_eval, erasure_report, parse_concept
    from ..trainer import ZEraseTrainer

    check_n_eval(n_eval)  # before any training, as a word that is no concept
    check_grid(concepts, seeds)
    parsed = [(word, parse_concept(word)) for word in concepts]
    bundle = load_toy()
    cells = []
    for word, concept in parsed:
        for seed in seeds:
            base = toy_train_config(concept, None, steps, seed, bundle.sampling)
            for source in XT_SOURCES:
                backend = toy_backend(bundle)
                start = time.perf_counter()
                trainer = ZEraseTrainer(backend, dataclasses.replace(base, xt_source=source, xt_pool=pool))
                pool_run = trainer.xt_pool  # at least one trajectory per erase prompt: may exceed --pool
                trainer.run()  # a finished run drops its pool
                seconds = time.perf_counter() - start
                report = erasure_report(backend, bundle, concept, n_eval, EVAL_SEED_OFFSET + seed, lora=True)
                backend.uninstall()
                cells.append({"concept": word, "seed": seed, "xt_source": source, "seconds": seconds,
                              "pool_trajectories": pool_run.trajectories if pool_run else 0,
                              "pool_build_s": pool_run.seconds if pool_run else 0.0,
                              **{m: report[m] for m in METRICS}})
    summary = {}
    for source in XT_SOURCES:
        rows = [c for c in cells if c["xt_source"] == source]
        summary[source] = {k: statistics.mean(c[k] for c in rows) for k in ("seconds", *METRICS)}
    summary["pool_speedup"] = summary["fresh"]["seconds"] / summary["pool"]["seconds"]
    return {"steps": steps, "n_eval": n_eval, "xt_pool": pool, "cells": cells, "summary": summary}


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", nargs="+", default=["red", "circle"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--pool", type=int, default=TrainConfig.xt_pool,
                   help="trajectories in the pool (xt_pool); it grows to one per erase prompt where there are more "
                   "(the toy's concepts have ~130 templates and shuffles): each cell records the count it ran")
    p.add_argument("--out", type=out_path)


@command("bench-xt", "toy world: erasure and cost with fresh ESD x_t vs the trajectory pool", _add)
def _bench_xt(args: argparse.Namespace) -> int:
    check_out(args.out)
    result = compare(args.concepts, args.seeds, args.steps, args.n_eval, args.pool)
    emit(result, args)
    s = result["summary"]
    for source in XT_SOURCES:
        row = s[source]
        print(f"{source:>6}: {row['seconds']:7.1f} s  acc_e {row['acc_e']:.3f}  acc_ir {row['acc_ir']:.3f}"
              f"  h_a {row['h_a']:.3f}", file=sys.stderr)
    return 0
