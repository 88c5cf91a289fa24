"""The toy demo end to end at a tiny size (random toy weights, few steps): every output file,
metrics in range, and exact metric helpers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from zerase_core.errors import ZEraseError
from zerase_core.lora import LoRAConfig
from zerase_core.lora_file import load_lora
from zerase_core.toy.erasure_metrics import frechet_distance, parse_concept, prompt_sets

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def random_toy():
    """A ToyBundle with the shipped architecture but random DiT weights and a 2-step sampler."""
    from zerase_core.toy import ToyBundle, world
    from zerase_core.toy.classifier import ToyClassifier
    from zerase_core.toy.model import DiTConfig, build_transformer, to_image, to_latent
    from zerase_core.toy.sampling import SamplerConfig
    from zerase_core.toy.text import TextConfig, ToyTextEncoder
    from functools import partial

    torch.manual_seed(0)
    dit = DiTConfig(dim=64, n_layers=2, n_heads=2, axes_dims=(8, 12, 12))
    encoder = ToyTextEncoder(TextConfig(), words=world.vocabulary())
    text_dim = encoder.encode(["red"])[0].features.shape[1]
    dit = DiTConfig(dim=64, n_layers=2, n_heads=2, axes_dims=(8, 12, 12), cap_feat_dim=text_dim)
    return ToyBundle(
        transformer=build_transformer(dit).eval().requires_grad_(False),
        encoder=encoder.eval().requires_grad_(False),
        classifier=ToyClassifier().eval(),
        sampling=SamplerConfig(steps=2, shift=1.0, cfg=2.0),
        dit_config=dit,
        latent_shape=dit.latent_shape,
        to_latent=partial(to_latent, config=dit),
        to_image=partial(to_image, config=dit),
        world=world,
        metadata={},
    )


def test_short_demo_writes_every_output(tmp_path, random_toy, monkeypatch):
    from zerase_core.toy.demo import run_demo

    run_demo("crimson", None, steps=3, seed=0, out=tmp_path, n_eval=6, bundle=random_toy)
    for name in ("erasure_lora.safetensors", "before_after.png", "curves.png", "attention_maps.png", "report.json",
                 "history.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(list((tmp_path / "previews").glob("step_*.png"))) == 3  # a preview callback every step at 3 steps
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["concept"] == "crimson" and saved["value"] == "red"
    assert saved["preserve"] == ["green", "blue", "yellow", "purple", "orange"]
    for part in ("original", "erased"):
        for key in ("acc_e", "acc_ir", "acc_e_synonym", "acc_e_shuffled", "acc_e_paraphrase"):
            assert 0.0 <= saved[part][key] <= 1.0
        assert saved[part]["h_a"] == pytest.approx(saved[part]["acc_ir"] - saved[part]["acc_e"])
    assert saved["seconds"] > 0 and saved["fd_before"] >= 0
    import zerase_core.toy.demo as demo

    # Run again into the same folder: refused before the original model is measured, the first run's files kept.
    monkeypatch.setattr(demo, "erasure_report", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(ZEraseError, match="holds erasure_lora.safetensors, .* of an earlier run; choose another"):
        run_demo("crimson", None, steps=3, seed=0, out=tmp_path, n_eval=6, bundle=random_toy)
    assert json.loads((tmp_path / "report.json").read_text()) == saved
    # A folder holding only the demo's own files (its LoRA moved away) is refused too: the report stays.
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text("an earlier report")
    with pytest.raises(ZEraseError, match=r"other holds report.json of an earlier run"):
        run_demo("crimson", None, steps=3, seed=0, out=other, n_eval=6, bundle=random_toy)
    assert (other / "report.json").read_text() == "an earlier report"
    monkeypatch.undo()
    again = run_demo("crimson", None, steps=4, seed=0, out=tmp_path, n_eval=6, bundle=random_toy, resume=True)
    assert again["steps"] == 4 and load_lora(tmp_path / "erasure_lora.safetensors").training["steps_done"] == 4


def test_demo_with_defaults_erases_red_and_keeps_the_other_attributes(tmp_path):
    """Issue 5's must-show on the shipped model, the demo exactly as `python -m zerase_core demo` runs it
    (~4 min on one thread: 3.8 measured alone). h_a ≥ 0.6 is the issue's floor (seeds 0–2 gave 0.86 / 0.91 /
    0.67). The issue's "≤ 5 points" is met by the committed report (shape −5, the rest ≤ 1) but with no margin: seeds
    give −4 to −6
    and 100 prompts carry ±2.5 points of sampling error, and float differences between CPUs change a training
    run. So this guard allows 8 points — the previous default's −9 (triangles never preserved) fails it."""
    from zerase_core.toy.demo import run_demo
    from zerase_core.toy.world import ATTRIBUTES

    report = run_demo("red", None, steps=1000, seed=0, out=tmp_path, n_eval=100)
    assert report["original"]["acc_e"] == 1.0 and report["h_a"] >= 0.6, report["h_a"]
    before = report["original"]["adherence_other_prompts"]
    after = report["erased"]["adherence_other_prompts"]
    drops = {a: before[a] - after[a] for a in ATTRIBUTES if a != "colour"}
    assert max(drops.values()) <= 0.08 + 1e-9, drops


def test_preserving_the_erased_concept_is_refused():
    from zerase_core.toy.demo import toy_train_config
    from zerase_core.toy.sampling import SamplerConfig

    red = parse_concept("red")
    with pytest.raises(ZEraseError, match="names the concept being erased"):
        toy_train_config(red, ("blue", "crimson"), 10, 0, SamplerConfig())
    with pytest.raises(ZEraseError, match="not one concept"):
        toy_train_config(red, ("banana",), 10, 0, SamplerConfig())


def test_concepts_parse_and_prompt_sets_name_them():
    assert (parse_concept("Crimson").attribute, parse_concept("Crimson").value) == ("colour", "red")
    assert parse_concept("left").attribute == "position"
    assert parse_concept("  Left   side ").word == "left side" and parse_concept("jet black").value == "black"
    # Text that names a concept but is more than its word trained "a small not red star" and reported red's erasure.
    for text in ("dragon", "not red", "the red", "red red", "red.", "red circle"):
        with pytest.raises(ZEraseError, match="not one concept of the toy world; give just its word"):
            parse_concept(text)
    named, named_prompts, other, _ = prompt_sets(parse_concept("crimson"), 20, 0)
    assert all(lab.colour == "red" for lab in named) and all(lab.colour != "red" for lab in other)
    assert all("crimson" in p for p in named_prompts)


def test_the_attention_picture_finds_its_words_for_every_concept_word(random_toy):
    """A shape or position synonym ("dot" for circle, "centre") trained and measured, then stopped the demo: the
    attention picture asked its prompt for the attribute's value, which the prompt names by the synonym (14 of the
    world's 63 words). Every word's picture now finds its words; one is drawn whole."""
    from zerase_core.backends.toy import toy_backend
    from zerase_core.prompts import concept_token_indices
    from zerase_core.toy.demo import attention_picture, map_words
    from zerase_core.toy.world import SYNONYMS

    backend = toy_backend(random_toy)
    for word in [w for words in SYNONYMS.values() for w in words]:
        words, prompts = map_words(parse_concept(word), seed=0)
        (encoded,) = backend.encode(prompts)
        assert all(concept_token_indices(encoded, w) for w in words), (word, prompts)
    backend.install(LoRAConfig(rank=2))
    picture = attention_picture(backend, random_toy, parse_concept("dot"), seed=0)
    assert picture.shape[0] == 1 and picture.shape[-1] == 3 and torch.isfinite(picture).all()  # (1, H, W, RGB)


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = [frechet_distance(a, a + d) for d in (0.5, 1.0, 2.0)]
    assert shifted == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-6)


def test_bench_runs_every_method_and_resumes(tmp_path, random_toy):
    from zerase_core.toy.bench import METHODS, run_bench

    rows = run_bench(["red"], [0], steps=2, n_eval=4, out=tmp_path, methods=None, command="test", bundle=random_toy)
    assert [r["method"] for r in rows] == [m.name for m in METHODS]
    assert (tmp_path / "bench.md").read_text().count("\n| ") == len(METHODS) + 1
    cells = sorted((tmp_path / "cells").iterdir())
    stamp = [c.stat().st_mtime_ns for c in cells]
    run_bench(["red"], [0], steps=2, n_eval=4, out=tmp_path, methods=None, command="test", bundle=random_toy)
    assert [c.stat().st_mtime_ns for c in sorted((tmp_path / "cells").iterdir())] == stamp  # cached, not re-run


@pytest.mark.parametrize("methods, named", [(["zerase", "bogus"], "['bogus']"), ([], "[]")])
def test_bench_refuses_unknown_methods_before_running_anything(tmp_path, random_toy, methods, named):
    """An unknown name (or --methods with none) would write an empty table and exit 0."""
    import re

    from zerase_core.errors import ZEraseError
    from zerase_core.toy.bench import run_bench

    with pytest.raises(ZEraseError, match=re.escape(f"Unknown bench methods {named}; choose from ['original'")):
        run_bench(["red"], [0], steps=2, n_eval=4, out=tmp_path, methods=methods, command="test", bundle=random_toy)
    assert not (tmp_path / "bench.md").exists()


def test_bench_cells_are_keyed_by_their_training_settings(random_toy):
    """A cell measured under other settings (templates, ε, …) must not be reused for a changed bench."""
    import dataclasses

    from zerase_core.toy.bench import METHODS, cell_config, config_key

    zerase = next(m for m in METHODS if m.name == "zerase")
    config = cell_config(random_toy, zerase, parse_concept("red"), 0, 10)
    assert config_key(config) == config_key(cell_config(random_toy, zerase, parse_concept("red"), 0, 10))
    assert config_key(dataclasses.replace(config, templates=config.templates[:1])) != config_key(config)
    assert config_key(dataclasses.replace(config, epsilon=1e-2)) != config_key(config)
    # how it runs is not what it trains: the same cell
    executed_otherwise = dataclasses.replace(config, gradient_checkpointing="on", checkpoint_every=7)
    assert config_key(executed_otherwise) == config_key(config)
    assert config_key(None) == "untrained"


def test_the_readmes_assemble_command_rebuilds_the_committed_toy_table(tmp_path):
    """The README re-assembles docs/bench/toy from its cells. When checkpointing's default became "auto" the cell keys
    moved with it, and the command silently wrote a table of two untrained rows over the committed twelve."""
    import shutil

    from zerase_core.toy.bench import run_bench

    committed = REPO / "docs" / "bench" / "toy"
    shutil.copytree(committed / "cells", tmp_path / "cells")
    run_bench(["red", "circle", "left"], [0, 1], 300, 24, tmp_path, None, "test", assemble_only=True)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == json.loads(
        (committed / "bench.json").read_text())["rows"]
    table = [(folder / "bench.md").read_text().split("\n", 1)[1] for folder in (tmp_path, committed)]
    assert table[0] == table[1]  # all but the first line, which says how the cells were made
    with pytest.raises(ZEraseError, match="holds no trained cell of these settings"):  # other --steps: none found
        run_bench(["red"], [0], 299, 24, tmp_path / "other", None, "test", assemble_only=True)
    assert not (tmp_path / "other").exists()  # "nothing was written": it made an empty cells/ there
    # A cell cut short (a full disk) or edited was a JSONDecodeError, KeyError or TypeError traceback
    cell = sorted((tmp_path / "cells").glob("zerase__red__0__*"))[0]
    for damage in (cell.read_text()[:50], "{}", "[1, 2]", '{"acc_e": "x"}'):
        cell.write_text(damage)
        with pytest.raises(ZEraseError, match=f"The bench cell {re.escape(str(cell))} is damaged .*delete it"):
            run_bench(["red", "circle", "left"], [0, 1], 300, 24, tmp_path, None, "test", assemble_only=True)


def test_bench_prints_its_table_under_a_locale_that_is_not_utf8(tmp_path):
    """bench.md is written as UTF-8 (↓, ±); printed back in the locale's encoding it was a UnicodeDecodeError
    traceback after the bench had run (a POSIX C locale; on Windows, cp1252, garbled). Python's UTF-8 mode is off
    here, as it is by default; what is printed goes out as UTF-8."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(REPO / "docs" / "bench" / "toy" / "cells", tmp_path / "cells")
    env = os.environ | {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                        "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "zerase_core", "bench", "--out", str(tmp_path), "--assemble-only"],
                          capture_output=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert "acc_e ↓" in done.stdout.decode("utf-8")


@pytest.mark.parametrize("word", ["red", "circle", "left"])
def test_templates_frame_the_concept_short_and_in_full_prompts_covering_every_value(word):
    """Short templates name only the concept; full ones show every value of each other attribute."""
    from zerase_core.toy.demo import toy_templates
    from zerase_core.toy.world import ATTRIBUTES, parse_prompt

    concept = parse_concept(word)
    templates = toy_templates(concept)
    named = [parse_prompt(t.replace("{}", concept.word)) for t in templates]
    assert all(n[concept.attribute] == concept.value for n in named)
    assert any(set(n) == {concept.attribute} for n in named)  # a short template
    full = [n for n in named if len(n) == len(ATTRIBUTES)]
    for attribute, values in ATTRIBUTES.items():
        if attribute != concept.attribute:
            assert {n[attribute] for n in full} == set(values)


def test_a_demo_stopped_while_it_measures_says_that_resume_measures_it(tmp_path, random_toy, monkeypatch):
    """Ctrl-C after training, while the erased model is measured: the run is trained and saved, only report.json is
    missing, and the same command without --resume is refused its folder. It said only "Stopped (Ctrl-C)"."""
    import zerase_core.toy.demo as demo

    real_report = demo.erasure_report

    def ctrl_c_on_the_erased_model(*args, lora=False, **kwargs):
        if lora:
            raise KeyboardInterrupt
        return real_report(*args, lora=lora, **kwargs)

    monkeypatch.setattr(demo, "erasure_report", ctrl_c_on_the_erased_model)
    with pytest.raises(ZEraseError, match="while measuring the erased model. Its 2 steps are trained and saved in "
                                          ".*run the same command with --resume to measure it") as stopped:
        demo.run_demo("red", None, steps=2, seed=0, out=tmp_path, n_eval=2, bundle=random_toy)
    assert isinstance(stopped.value.__cause__, KeyboardInterrupt)  # the command line exits 130
    monkeypatch.setattr(demo, "erasure_report", real_report)
    report = demo.run_demo("red", None, steps=2, seed=0, out=tmp_path, n_eval=2, bundle=random_toy, resume=True)
    assert report["steps"] == 2 and (tmp_path / "report.json").is_file()


def test_a_demo_that_cannot_write_a_picture_says_that_resume_writes_it(tmp_path, random_toy, monkeypatch):
    """A full disk after training and measuring: the LoRA and report.json are saved, a picture is not. The message
    said only "free disk space or choose a folder", which means training again; --resume writes it without."""
    import zerase_core.toy.demo as demo
    from zerase_core import trainer

    real_png = demo.save_png

    def disk_full(image, path):  # the disk fills after training's previews
        if Path(path).name != demo.GRID:
            return real_png(image, path)
        raise ZEraseError(f"Could not write {path}: No space left on device.")

    monkeypatch.setattr(demo, "save_png", disk_full)
    with pytest.raises(ZEraseError, match=r"(?s)No space left on device\.\nIts 2 steps are trained and saved in .*"
                                          r"run the same command with --resume to write them once they can be"):
        demo.run_demo("red", None, steps=2, seed=0, out=tmp_path, n_eval=2, bundle=random_toy)
    assert (tmp_path / "report.json").is_file() and not (tmp_path / demo.GRID).exists()
    monkeypatch.setattr(demo, "save_png", real_png)
    monkeypatch.setattr(trainer.ZEraseTrainer, "train_step", lambda self: pytest.fail("trained again"))
    demo.run_demo("red", None, steps=2, seed=0, out=tmp_path, n_eval=2, bundle=random_toy, resume=True)
    assert (tmp_path / demo.GRID).is_file() and (tmp_path / demo.ATTENTION).is_file()


def test_a_demo_stopped_before_its_first_step_leaves_nothing_that_refuses_the_next(tmp_path, random_toy, monkeypatch):
    """The previews folder was made before training: a run stopped before step 1 said "nothing was saved", and
    then refused its folder for holding previews/."""
    import zerase_core.trainer as trainer_module
    from zerase_core.toy.demo import run_demo

    def ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.ZEraseTrainer, "run", ctrl_c)
    with pytest.raises(ZEraseError, match="before the first step; nothing was saved"):
        run_demo("red", None, steps=2, seed=0, out=tmp_path / "demo", n_eval=2, bundle=random_toy)
    assert not (tmp_path / "demo").exists() or not list((tmp_path / "demo").iterdir())


def test_a_demo_into_a_folder_a_run_is_writing_into_is_refused_before_it_measures(tmp_path, random_toy, monkeypatch):
    """The demo holds its --out for the run, as train does (README: one run at a time writes into a folder)."""
    import zerase_core.toy.demo as demo
    from zerase_core.run_lock import run_lock

    monkeypatch.setattr(demo, "erasure_report", lambda *a, **k: pytest.fail("measured"))
    with run_lock(tmp_path / "red"):  # flock refuses a second open of the file in this process too
        with pytest.raises(ZEraseError, match="Another run is writing into"):
            demo.run_demo("red", None, steps=2, seed=0, out=tmp_path / "red", n_eval=2, bundle=random_toy)


def test_measure_gives_the_demos_numbers_for_its_lora_and_the_original(tmp_path, random_toy):
    """`measure` applies LoRA files to the toy and measures as the demo does: the demo's own LoRA measures as its
    report says, no file as its original model; a merge is measured on each of its concepts."""
    from zerase_core.lora_file import save_lora
    from zerase_core.merge import merge_exact
    from zerase_core.toy.demo import run_demo
    from zerase_core.toy.measure import measure

    report = run_demo("red", None, steps=2, seed=0, out=tmp_path / "red", n_eval=6, bundle=random_toy)
    lora = tmp_path / "red" / "erasure_lora.safetensors"
    erased = measure([lora], [], n_eval=6, seed=0, bundle=random_toy)["concepts"]
    original = measure([], ["red"], n_eval=6, seed=0, bundle=random_toy)["concepts"]
    for key in ("acc_e", "acc_ir", "fd"):
        assert erased["red"][key] == pytest.approx(report["erased"][key])
        assert original["red"][key] == pytest.approx(report["original"][key])
    assert erased["red"]["fd"] != original["red"]["fd"]  # the LoRA was applied, and removed after
    other = load_lora(lora)
    merged = save_lora(merge_exact([other, type(other)(other.factors, concept="circle", fingerprint=other.fingerprint)],
                                   [1.0, 1.0]), tmp_path / "merged.safetensors")
    assert sorted(measure([merged], [], n_eval=2, seed=0, bundle=random_toy)["concepts"]) == ["circle", "red"]
    with pytest.raises(ZEraseError, match="Name the concepts to measure"):
        measure([], [], n_eval=2, seed=0, bundle=random_toy)
    hostile = save_lora(type(other)(other.factors, concept="x\x1b[2J", fingerprint=other.fingerprint),
                        tmp_path / "hostile.safetensors")  # a shared file's concept reaches the message escaped
    with pytest.raises(ZEraseError, match=r"'x\\x1b\[2J' is not one concept of the toy world"):
        measure([hostile], [], n_eval=2, seed=0, bundle=random_toy)
    # Another model's LoRA: told as such, not as a concept ('cat') the user never typed that the toy does not know
    foreign = save_lora(type(other)(other.factors, concept="cat", fingerprint=other.fingerprint | {"dim": 3840}),
                        tmp_path / "foreign.safetensors")
    with pytest.raises(ZEraseError, match=f"{re.escape(str(foreign))}: This erasure LoRA was made for a different"):
        measure([foreign], [], n_eval=2, seed=0, bundle=random_toy)
    for seed in (-1, 2**64):  # as the demo refuses it: its report could not be matched
        with pytest.raises(ZEraseError, match="--seed must be between 0 and 2"):
            measure([lora], [], n_eval=2, seed=seed, bundle=random_toy)
    unnamed = save_lora(type(other)(other.factors, concept="", fingerprint=other.fingerprint),
                        tmp_path / "unnamed.safetensors")  # was "'' is not one concept of the toy world"
    with pytest.raises(ZEraseError, match=f"{re.escape(str(unnamed))} names no concept in its metadata: give the "
                                          "concepts to measure with --concepts"):
        measure([unnamed], [], n_eval=2, seed=0, bundle=random_toy)
    assert sorted(measure([unnamed], ["red"], n_eval=2, seed=0, bundle=random_toy)["concepts"]) == ["red"]
    # Within float32 as a file, too large for the model: its pictures were NaN and the FD a linalg traceback
    huge = {key: (a * 1e20, b * 1e20) for key, (a, b) in other.factors.items()}  # |ΔW| < 1e38
    blown = save_lora(type(other)(huge, concept="red", fingerprint=other.fingerprint), tmp_path / "blown.safetensors")
    with pytest.raises(ZEraseError, match="The toy model's pictures with the LoRA are not finite numbers .NaN or inf."):
        measure([blown], [], n_eval=2, seed=0, bundle=random_toy)


def test_frechet_distance_counts_the_covariance_term():
    """b = 2a: Cb = 4 Ca and (Ca^½ Cb Ca^½)^½ = 2 Ca, so FD = ‖μa − μb‖² + Tr(Ca + 4 Ca − 4 Ca) = ‖μa‖² + Tr(Ca)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    expected = a.mean(0).square().sum() + torch.cov(a.T).trace()
    assert frechet_distance(a, 2 * a) == pytest.approx(float(expected), rel=1e-6)


def test_erasure_report_scores_each_metric_on_its_own_set(monkeypatch):
    """acc_e: the erased attribute of images for prompts naming the concept; acc_ir: the other attributes of those and
    every attribute of the others; h_a = acc_ir − acc_e; fd: features of the others' images against real renders of
    their labels; a robustness style's acc_e over its own (half-size) set. The classifier and the pictures are
    stand-ins whose answers are set here, so every figure is known exactly."""
    from types import SimpleNamespace

    import numpy as np

    import zerase_core.toy.erasure_metrics as em
    from zerase_core.toy.world import ATTRIBUTES

    n, seed, concept = 4, 3, parse_concept("red")
    named, _, other, _ = prompt_sets(concept, n, seed)
    labels = named + other
    wrong = lambda a, v: next(x for x in ATTRIBUTES[a] if x != v)  # noqa: E731
    # named[3] no longer red (acc_e 3/4); a missed shape on named[0]; others: one colour and one size missed.
    mistakes = {(3, "colour"), (0, "shape"), (n + 1, "colour"), (n + 2, "size")}
    calls = []

    def generate(backend, bundle, prompts, seed, lora, batch=50):
        calls.append(len(prompts))
        return torch.arange(len(prompts), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 32, 32) / 10

    def predict(images):
        if len(calls) > 1:  # the robustness set: every picture still red
            return {a: [concept.value if a == "colour" else ATTRIBUTES[a][0]] * len(images) for a in ATTRIBUTES}
        return {a: [wrong(a, getattr(lab, a)) if (i, a) in mistakes else getattr(lab, a)
                    for i, lab in enumerate(labels)] for a in ATTRIBUTES}

    def features(images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)

    monkeypatch.setattr(em, "generate_through", generate)
    bundle = SimpleNamespace(classifier=SimpleNamespace(predict=predict, features=features))
    report = em.erasure_report(None, bundle, concept, n, seed, lora=False, styles=("canonical", "synonym"))
    checks = n * (len(ATTRIBUTES) - 1) + n * len(ATTRIBUTES)
    assert report["acc_e"] == 3 / 4
    assert report["acc_ir"] == pytest.approx((checks - 3) / checks)
    assert report["h_a"] == pytest.approx(report["acc_ir"] - 3 / 4)
    assert report["adherence_other_prompts"] == {a: (3 / 4 if a in ("colour", "size") else 1.0) for a in ATTRIBUTES}
    images = generate(None, None, [None] * 2 * n, seed, False)
    real = torch.from_numpy(np.stack([em.world.render(lab) for lab in other])).permute(0, 3, 1, 2).float()
    assert report["fd"] == pytest.approx(frechet_distance(features(images[n:]), features(real)))
    assert calls[1] == n // 2 and report["acc_e_synonym"] == 1.0


def test_measure_draws_only_the_pictures_its_numbers_are_measured_on(random_toy, monkeypatch):
    """acc_e, acc_ir, h_a and fd come from n pictures naming the concept and n naming none; the demo's other prompt
    styles (acc_e per style, from their own stream) are shown by the demo only, so `measure` draws no more (it drew
    75 % more, unshown). The numbers shown stay the demo's: the first measure test above."""
    from zerase_core.toy import erasure_metrics
    from zerase_core.toy.measure import measure

    drawn: list[int] = []
    generate = erasure_metrics.generate_through
    monkeypatch.setattr(erasure_metrics, "generate_through",
                        lambda backend, bundle, prompts, *a, **k: drawn.append(len(prompts)) or
                        generate(backend, bundle, prompts, *a, **k))
    measure([], ["red", "circle"], n_eval=4, seed=0, bundle=random_toy)
    assert drawn == [8, 8]


def test_measure_reports_h_a_as_acc_ir_less_acc_e(random_toy):
    from zerase_core.toy.measure import measure

    red = measure([], ["red"], n_eval=2, seed=0, bundle=random_toy)["concepts"]["red"]
    assert set(red) == {"acc_e", "acc_ir", "h_a", "fd"}
    assert red["h_a"] == pytest.approx(red["acc_ir"] - red["acc_e"])


# --- from a mutation audit: each kills a mutant the suite let through -------------------------------------------

def test_measure_refuses_an_evaluation_too_small_before_applying_anything(random_toy, monkeypatch):
    """`measure --n-eval 1` is refused by name, as the demo refuses it, before any LoRA is read or image generated."""
    import zerase_core.toy.measure as measure_module

    monkeypatch.setattr(measure_module, "load_lora", lambda *a: pytest.fail("read a LoRA"))
    monkeypatch.setattr(measure_module, "erasure_report", lambda *a, **k: pytest.fail("measured"))
    for n_eval in (1, 0):
        with pytest.raises(ZEraseError, match="--n-eval must be at least 2"):
            measure_module.measure([Path("x.safetensors")], ["red"], n_eval=n_eval, seed=0, bundle=random_toy)


def test_an_empty_preserve_list_stays_empty_and_only_none_means_the_default():
    """`--preserve` with no words asks for no preservation concept; only a missing --preserve (None) takes the other
    values of the attribute."""
    from zerase_core.toy.demo import toy_train_config
    from zerase_core.toy.sampling import SamplerConfig

    red = parse_concept("red")
    assert toy_train_config(red, (), 10, 0, SamplerConfig()).preserve == ()
    assert toy_train_config(red, None, 10, 0, SamplerConfig()).preserve == red.others


def _fake_trainers(monkeypatch, lams_for):
    """ZEraseTrainer replaced by one that records its config and returns a history of the given λ per step."""
    from types import SimpleNamespace

    import zerase_core.trainer as trainer_module

    made = []

    class FakeTrainer:
        def __init__(self, backend, config):
            self.config = config
            made.append(config)
            pool = config.xt_source == "pool"
            self.xt_pool = SimpleNamespace(trajectories=config.xt_pool, seconds=0.25) if pool else None

        def run(self):
            lams = lams_for(self.config)
            return SimpleNamespace(history=[SimpleNamespace(lam=x) for x in lams])

    monkeypatch.setattr(trainer_module, "ZEraseTrainer", FakeTrainer)
    return made


def test_bench_xt_summarises_the_mean_of_its_cells_and_the_speedup_as_fresh_over_pool(random_toy, monkeypatch):
    """bench-xt's summary is what it claims: per x_t source the mean over cells of seconds and of acc_e/acc_ir/h_a,
    pool_speedup = fresh seconds / pool seconds; each run gets --pool as its xt_pool and is measured at the
    evaluation seed (EVAL_SEED_OFFSET + seed), not the training one."""
    import statistics
    from types import SimpleNamespace

    import zerase_core.toy as toy
    import zerase_core.toy.erasure_metrics as metrics
    from zerase_core.bench import xt

    monkeypatch.setattr(toy, "load_toy", lambda: random_toy)
    made = _fake_trainers(monkeypatch, lambda config: [0.0])
    seeds_measured = []

    def report(backend, bundle, concept, n_eval, seed, lora):
        seeds_measured.append(seed)
        k = len(seeds_measured)
        return {"acc_e": k / 10, "acc_ir": 1 - k / 100, "h_a": k ** 2 / 100}

    monkeypatch.setattr(metrics, "erasure_report", report)
    # seconds per run (start, end pairs), pool then fresh for seeds 0, 1, 2: pool 1, 1, 4; fresh 3, 3, 9
    ticks = iter([0, 1, 10, 13, 20, 21, 30, 33, 40, 44, 50, 59])
    monkeypatch.setattr(xt, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    result = xt.compare(["red"], [0, 1, 2], steps=1, n_eval=4, pool=3)
    assert [c.xt_pool for c in made] == [3] * 6
    assert seeds_measured == [metrics.EVAL_SEED_OFFSET + s for s in (0, 0, 1, 1, 2, 2)]
    summary = result["summary"]
    for source in ("fresh", "pool"):
        cells = [c for c in result["cells"] if c["xt_source"] == source]
        for key in ("seconds", "acc_e", "acc_ir", "h_a"):
            assert summary[source][key] == pytest.approx(statistics.fmean(c[key] for c in cells))
    assert summary["fresh"]["seconds"] == pytest.approx(5.0) and summary["pool"]["seconds"] == pytest.approx(2.0)
    assert summary["pool_speedup"] == pytest.approx(2.5)
    assert [c["pool_trajectories"] for c in result["cells"]] == [3, 0] * 3


def test_bench_lambda_weighs_each_cells_fraction_by_its_steps(random_toy, monkeypatch):
    """bench-lambda's summary fraction of steps with λ > 0 is over all steps of all cells (each cell's fraction
    weighted by its steps), and the counts are summed over cells."""
    import zerase_core.toy as toy
    from zerase_core.bench import lambda_kinds

    monkeypatch.setattr(toy, "load_toy", lambda: random_toy)
    histories = {"pool": [0.0, 0.5, 0.2, 0.0], "fresh": [0.0, 0.0, 0.0, 0.3]}
    _fake_trainers(monkeypatch, lambda config: histories[config.xt_source])
    result = lambda_kinds.measure(["red"], [0], steps=4, sources=["pool", "fresh"])
    summary = result["summary"]
    assert (summary["steps"], summary["lambda_zero"], summary["recomputed"], summary["batched"]) == (8, 4, 2, 2)
    assert summary["fraction_lambda_positive"] == pytest.approx(3 / 8)
    assert summary["fraction_batched"] == pytest.approx(2 / 8)
    assert [c["lambda_last"] for c in result["cells"]] == [0.0, 0.3]


def test_bench_json_records_the_settings_its_rows_were_measured_under(tmp_path, random_toy):
    """bench.json is the record of a table: the concepts, seeds, steps and n_eval its rows come from, beside them."""
    from zerase_core.toy.bench import run_bench

    run_bench(["red", "circle"], [0], steps=2, n_eval=4, out=tmp_path, methods=["original"], command="cmd",
              bundle=random_toy)
    table = json.loads((tmp_path / "bench.json").read_text())
    assert (table["concepts"], table["seeds"], table["steps"], table["n_eval"], table["command"]) == (
        ["red", "circle"], [0], 2, 4, "cmd")


def test_a_bench_cell_is_measured_anew_for_another_n_eval_and_untrained_cells_alone_assemble_nothing(
        tmp_path, random_toy):
    """A cell is keyed by n_eval (its numbers are counts over that many pictures): one of another n_eval is not reused.
    And --assemble-only that finds only the untrained rows' cells refuses, as it does when it finds none: a table of
    the original model alone would stand for the comparison."""
    from zerase_core.toy.bench import run_bench

    for n_eval in (4, 6):
        run_bench(["red"], [0], steps=2, n_eval=n_eval, out=tmp_path, methods=["original"], command="t",
                  bundle=random_toy)
    assert len(list((tmp_path / "cells").iterdir())) == 2
    with pytest.raises(ZEraseError, match="holds no trained cell of these settings"):
        run_bench(["red"], [0], steps=2, n_eval=4, out=tmp_path, methods=None, command="t", bundle=random_toy,
                  assemble_only=True)


def test_a_bench_cell_is_measured_on_evaluation_seeds_and_leaves_the_shared_model_as_it_was(random_toy, monkeypatch):
    """Cells share the bundle's model: a trained cell must restore its modules, or every later cell wraps the layers
    of the one before (gated layers nesting deeper with each cell, their LoRAs kept alive and back-propagated through
    while inert). And a cell is measured on seeds EVAL_SEED_OFFSET apart from those it trains on."""
    import zerase_core.toy.bench as bench
    from zerase_core.lora import GatedLoRALinear
    from zerase_core.toy.erasure_metrics import EVAL_SEED_OFFSET

    original, zerase = (next(m for m in bench.METHODS if m.name == name) for name in ("original", "zerase"))
    red = parse_concept("red")
    modules = dict(random_toy.transformer.named_modules())
    bench.run_cell(random_toy, zerase, red, 0, bench.cell_config(random_toy, zerase, red, 0, 2), 4)
    assert dict(random_toy.transformer.named_modules()) == modules
    assert not any(isinstance(m, GatedLoRALinear) for m in random_toy.transformer.modules())
    seeds = []
    monkeypatch.setattr(bench, "erasure_report",
                        lambda backend, bundle, concept, n, seed, **k: seeds.append(seed) or {})
    bench.run_cell(random_toy, original, red, 3, None, 4)
    assert seeds == [EVAL_SEED_OFFSET + 3]
