"""``python -m zerase_core demo``: erase one concept from the shipped toy model, measured exactly.

Loads the toy, measures the original model, trains a Z-Erase LoRA with the paper's defaults,
measures again, and writes to the output folder: the LoRA, a before/after grid at fixed
seeds with prompts as captions, the per-term loss and λ curves, and report.json.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..backends.toy import toy_backend
from ..config import TrainConfig
from ..errors import ZEraseError
from ..files import atomic_write_text
from ..lora import LoRAConfig
from ..render import grid, save_png, to_pil
from ..run import CURVES, PlannedRun, every, train_and_save
from ..run_lock import run_lock
from ..sampling import preview_seed
from .erasure_metrics import (
    Concept, check_n_eval, erasure_report, generate_through, name_concept, parse_concept, prompt_sets, replace_word,
    weights_identity,
)
from .world import ATTRIBUTES, PROMPT_STYLES, Labels, make_prompt, random_labels

log = logging.getLogger(__name__)

# The demo's own files beside the run's (run.py): the comparison grid, the attention maps, the report, the previews.
GRID, ATTENTION, REPORT, PREVIEWS = "before_after.png", "attention_maps.png", "report.json", "previews"



def toy_templates(concept: Concept, n: int = 10, seed: int = 0) -> tuple[str, ...]:
    """Erase prompt templates from the world's grammar, '{}' where the concept's word goes.

    Two kinds, n drawn of each (duplicates dropped):

    * short — the concept alone ("a {} object"), as the paper's Table 7 templates frame a
      concept in a few words: L_erase's negative guidance then pushes away from the concept
      only, not from the shapes and places a full prompt also names;
    * full — whole world prompts, every other attribute's values dealt out evenly (n = 10: each
      shape twice), so erasure reaches the contexts users write, and the preservation prompts
      (these templates with the other values filled in) show every shape: random draws once left
      out every triangle, and triangles were the collateral damage.

    On "red" at 1000 steps (100 prompts each; one run each): full only — acc_e 0.01, shape on
    other prompts 0.83; short only — acc_e 0.39, shape 0.90; both — acc_e 0.17, shape 0.95
    (original 0.98). The README's toy section has the seeded demo and other seeds.
    """
    others = [a for a in ATTRIBUTES if a != concept.attribute]
    rng = random.Random(seed)
    short = [
        _template(replace(random_labels(rng), **{concept.attribute: concept.value}), concept, i, rng, omit=others)
        for i in range(n)
    ]
    rng = random.Random(seed)
    dealt = {a: _dealt(ATTRIBUTES[a], n, rng) for a in others}
    full = [
        _template(Labels(**{a: v[i] for a, v in dealt.items()}, **{concept.attribute: concept.value}), concept, i, rng)
        for i in range(n)
    ]
    return tuple(dict.fromkeys(t for t in short + full if "{}" in t))


def _template(labels: Labels, concept: Concept, i: int, rng: random.Random, omit: Sequence[str] = ()) -> str:
    """One prompt for ``labels`` (canonical and paraphrase in turn) with the concept's word as '{}'."""
    style = "canonical" if i % 2 == 0 else "paraphrase"
    text = name_concept(make_prompt(labels, style, rng, omit=omit), concept)
    return replace_word(text, concept.word, "{}")


def _dealt(values: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """n values, each as often as n allows, in random order."""
    dealt = list(values) * (n // len(values)) + rng.sample(list(values), n % len(values))
    rng.shuffle(dealt)
    return dealt


def toy_train_config(concept: Concept, preserve: tuple[str, ...] | None, steps: int, seed: int,
                     sampling) -> TrainConfig:
    """Paper defaults (α, β, η, λ rule, ε of the preset) at toy scale.

    The preservation set defaults to the other values of the concept's attribute (erasing
    "red" must keep "blue"); x_t comes from the toy's own sampler settings.
    """
    for word in preserve or ():
        kept = parse_concept(word)  # a word of the world, or the pack's error naming the choices
        if (kept.attribute, kept.value) == (concept.attribute, concept.value):
            raise ZEraseError(f"'{word}' names the concept being erased ('{concept.word}'); drop it from --preserve.")
    return TrainConfig(
        concept=concept.word,
        preset="abstract" if concept.attribute == "colour" else "entity",  # Table 7 lists colours as abstractions
        # 1e-3: the paper's Fig. 8 choice (Table 6 gives 1e-2 for entities and abstractions). Once it measured
        # better for "red" (h_a 0.73 vs 0.46 at 1000 steps, one seed, before the LoRA's init was tied to the
        # seed, when one setting alone spread over 0.62-0.73); the bench's ε sweep does not separate the values
        # from noise, as the README's telescoped λ predicts. Kept: the shipped results are measured at it.
        epsilon=1e-3,
        templates=toy_templates(concept, seed=seed),
        preserve=concept.others if preserve is None else preserve,
        steps=steps,
        height=32,
        width=32,
        sample_steps=sampling.steps // 2,
        shift=sampling.shift,
        sample_cfg=sampling.cfg,
        seed=seed,
        lora=LoRAConfig(rank=4),
    )


def comparison_grid(backend, bundle, concept: Concept, seed: int, n: int = 6):
    """Rows of (original | erased) at the same seed, the prompt as each row's caption."""
    _, named, _, other = prompt_sets(concept, n // 2, seed + 7)
    prompts = named + other
    before = generate_through(backend, bundle, prompts, preview_seed(seed), lora=False)  # not the training noise
    after = generate_through(backend, bundle, prompts, preview_seed(seed), lora=True)
    cells = [[to_pil(b.permute(1, 2, 0)).resize((96, 96)), to_pil(a.permute(1, 2, 0)).resize((96, 96))]
             for b, a in zip(before, after)]
    return grid(cells, ["original", "erased"], row_labels=[p[:14] for p in prompts],
                caption=" | ".join(f"{i + 1}: {p}" for i, p in enumerate(prompts)))


def attention_picture(backend, bundle, concept: Concept, seed: int):
    """Paper Fig. 2 on the toy: per-word attention of image tokens, original vs erased, over the picture."""
    from ..attention_maps import word_maps
    from ..prompts import concept_token_indices
    from ..render import word_map_rows

    words, prompts = map_words(concept, seed)
    picture = generate_through(backend, bundle, prompts, preview_seed(seed), lora=False)  # (1, 3, 32, 32)
    (encoded,) = backend.encode(prompts)
    columns = [concept_token_indices(encoded, w) for w in words]
    x0 = bundle.to_latent(picture)
    maps = [word_maps(backend, encoded, columns, x0, (0.3, 0.6, 0.9), preview_seed(seed), lora=lora)
            for lora in (False, True)]
    base = to_pil(picture[0].permute(1, 2, 0)).resize((128, 128))
    return grid(word_map_rows(base, maps), words, ["original", "erased"],
                caption=f"{prompts[0]} (attention of image tokens to each word)")


def map_words(concept: Concept, seed: int) -> tuple[list[str], list[str]]:
    """The words whose maps the attention picture shows (the concept, and the shape and position beside it) and its
    one prompt. The prompt names the concept by the user's word, a synonym too ("dot"), the rest by their values: the
    value of a synonym's attribute ("circle") is not in it, and asking for it stopped the demo after training."""
    labels, prompts, _, _ = prompt_sets(concept, 1, seed + 11)
    return [concept.word] + [getattr(labels[0], a) for a in ("shape", "position") if a != concept.attribute], prompts


def preview(backend, bundle, concept: Concept, seed: int, out: Path):
    """A training callback: the erased model on two prompts naming the concept, beside the original."""
    _, prompts, _, _ = prompt_sets(concept, 2, seed + 7)
    original = generate_through(backend, bundle, prompts, preview_seed(seed), lora=False)

    def show(record, trainer) -> None:
        # Made at the first preview: a run stopped before it leaves no folder that would refuse the next run.
        (out / PREVIEWS).mkdir(parents=True, exist_ok=True)
        now = generate_through(backend, bundle, prompts, preview_seed(seed), lora=True)
        cells = [[to_pil(o.permute(1, 2, 0)).resize((96, 96)), to_pil(n.permute(1, 2, 0)).resize((96, 96))]
                 for o, n in zip(original, now)]
        save_png(grid(cells, ["original", f"step {record.step}"], caption=" | ".join(prompts))[0],
                 out / PREVIEWS / f"step_{record.step:05d}.png")

    return show


def run_demo(concept_word: str, preserve: tuple[str, ...] | None, steps: int, seed: int, out: Path, n_eval: int,
             bundle=None, resume: bool = False) -> dict:
    """The whole demo; ``bundle`` defaults to the shipped toy (tests pass a small random one); ``resume``
    continues the training run a stopped demo left in ``out`` (or extends a finished one to more steps)."""
    from . import load_toy

    check_n_eval(n_eval)
    start = time.perf_counter()
    bundle = bundle or load_toy()
    identity = weights_identity(bundle)  # now, not at the end: the file may be replaced meanwhile
    backend = toy_backend(bundle)
    concept = parse_concept(concept_word)
    config = toy_train_config(concept, preserve, steps, seed, bundle.sampling)
    with run_lock(out):  # one demo or run at a time in ``out``
        return _measured_run(bundle, backend, concept, config, out, n_eval, resume, identity, start)


def _measured_run(bundle, backend, concept, config: TrainConfig, out: Path, n_eval: int, resume: bool,
                  identity: dict, start: float) -> dict:
    """The demo's run in its locked folder: the original measured, trained, the erased measured, the files."""
    steps, seed = config.steps, config.seed
    # A taken --out is told now, not after measuring the original.
    run = PlannedRun(backend, config, out, resume, also_writes=(GRID, ATTENTION, REPORT, PREVIEWS))
    log.info("measuring the original model on %d + %d prompts", n_eval, n_eval)
    # seed + 1000, not EVAL_SEED_OFFSET: the demo's shipped report (docs/bench) was measured on this stream
    original = erasure_report(backend, bundle, concept, n_eval, seed + 1000, lora=False, styles=PROMPT_STYLES)
    previews = every(max(1, steps // 4), preview(backend, bundle, concept, seed, out))
    result, lora_path = train_and_save(run, callbacks=[previews])
    log.info("measuring the erased model")
    try:
        erased = erasure_report(backend, bundle, concept, n_eval, seed + 1000, lora=True, styles=PROMPT_STYLES)
    except KeyboardInterrupt as err:  # the run is trained and saved: only the measurement is lost
        raise ZEraseError(f"Stopped while measuring the erased model. {_kept(steps, out, 'measure it')}") from err
    report = {
        "concept": concept.word, "attribute": concept.attribute, "value": concept.value,
        "preserve": list(config.preserve), "steps": steps, "seed": seed, "n_eval": n_eval,
        **{k: erased[k] for k in ("acc_e", "acc_ir", "h_a")},
        "fd_before": original["fd"], "fd_after": erased["fd"],
        "original": original, "erased": erased,
        "train_seconds": round(result.seconds, 1), "seconds": round(time.perf_counter() - start, 1),
        "toy_weights": identity,
        "files": {"lora": lora_path.name, "grid": GRID, "curves": CURVES, "attention": ATTENTION,
                  "previews": PREVIEWS + "/"},
    }
    try:
        atomic_write_text(out / REPORT, json.dumps(report, indent=2))  # first: what was measured outlives a picture
        save_png(comparison_grid(backend, bundle, concept, seed)[0], out / GRID)
        save_png(attention_picture(backend, bundle, concept, seed)[0], out / ATTENTION)
    except ZEraseError as err:  # a full disk: "choose another folder" alone would mean training again
        raise ZEraseError(f"{err}\n{_kept(steps, out, 'write them once they can be written')}") from err
    backend.uninstall()  # its LoRA off the bundle's model (the watching wrappers stay, passing through when idle)
    return report


def _kept(steps: int, out: Path, then: str) -> str:
    """What a demo stopped after its training keeps, and how to finish it."""
    return (f"Its {steps} steps are trained and saved in {out}: run the same command with --resume to {then} "
            "(nothing is trained again).")
