"""What ``demo`` measures, for any erasure LoRA files applied together to the shipped toy model: a merge, several
stacked, a LoRA of another run. Each concept is measured on the demo's own prompt sets and seeds, so a file the demo
trained measures as its report says."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..apply import check_applicable, install_lora
from ..backends.toy import toy_backend
from ..errors import ZEraseError
from ..lora_file import load_lora
from ..merge import concepts_of
from ..seeds import SEED_RANGE, valid_seed
from .erasure_metrics import check_n_eval, erasure_report, parse_concept

SHOWN = ("acc_e", "acc_ir", "h_a", "fd")


def measure(files: Sequence[Path], concepts: Sequence[str], n_eval: int, seed: int, bundle=None) -> dict[str, Any]:
    """acc_e, acc_ir, h_a and fd per concept with every file in ``files`` applied (none: the original model).
    ``concepts`` default to the files' own (a merge's split into its parts)."""
    from . import load_toy

    check_n_eval(n_eval)
    if not valid_seed(seed):  # as the demo refuses it: its report could not be matched
        raise ZEraseError(f"--seed must be {SEED_RANGE}; got {seed}.")
    loras = [load_lora(f) for f in files]
    bundle = bundle or load_toy()
    backend = toy_backend(bundle)
    for path, lora in zip(files, loras):  # first: another model's LoRA names no concept of the toy world
        try:
            check_applicable(backend, lora)
        except ZEraseError as err:
            raise ZEraseError(f"{path}: {err}") from err
    unnamed = [str(path) for path, lora in zip(files, loras) if not lora.concept.strip()]
    if unnamed and not concepts:  # a file's concept is metadata, which an edit or another tool may leave empty
        raise ZEraseError(f"{unnamed[0]} names no concept in its metadata: give the concepts to measure with "
                          "--concepts (e.g. --concepts red).")
    concepts = list(concepts) or list(dict.fromkeys(c for lora in loras for c in concepts_of(lora)))
    if not concepts:
        raise ZEraseError("Name the concepts to measure (--concepts red circle): without LoRA files there are none "
                          "to take them from.")
    parsed = [parse_concept(c) for c in concepts]  # an unknown concept is told before any LoRA is applied
    try:
        for i, lora in enumerate(loras):
            install_lora(backend, lora, name=f"measured_{i}")
        # seed + 1000: the stream the demo's report is measured on. Its other prompt styles are drawn after the
        # numbers shown, from a stream of their own, and give only acc_e per style: left out, they cost 75 %
        # more pictures for nothing shown.
        reports = {c.word: erasure_report(backend, bundle, c, n_eval, seed + 1000, lora=bool(loras))
                   for c in parsed}
    finally:
        backend.uninstall()  # give the bundle back as it came
    return {"files": [str(f) for f in files], "n_eval": n_eval, "seed": seed,
            "concepts": {word: {k: r[k] for k in SHOWN} for word, r in reports.items()}}
