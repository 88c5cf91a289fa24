"""Bad input that the other test files do not reach: each is refused with a message that names the fix."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from zerase_core.apply import host_widths
from zerase_core.backends.diffusers_zimage import DiffusersZImageBackend
from zerase_core.config import TrainConfig
from zerase_core.errors import ZEraseError
from zerase_core.lora import LoRAConfig
from zerase_core.lora_file import ErasureLoRA, check_fits, save_lora
from zerase_core.tiny import TinyZImageConfig, tiny_zimage_backend
from zerase_core.trainer import ZEraseTrainer

from device_errors import DEVICES, ran_out


class _FullDisk:
    """os.fdopen on a full disk: the file opens, its data cannot be written."""

    def __init__(self, fd, mode):
        os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

REPO = Path(__file__).resolve().parent.parent


def _config(**over):
    base = dict(concept="red", preserve=("blue",), templates=("a {} ball",), steps=2, height=64, width=64,
                sample_steps=2, lora=LoRAConfig(rank=2), xt_pool=1, shuffle_pool=1)
    return TrainConfig(**(base | over))


def test_the_command_line_sets_beta_eta_and_the_attention_weight_and_refuses_a_negative_beta():
    """β is the preservation knob (README, Algorithm 1's λ): the command line sets it as the node does; L_attn's
    weight in Eq. 7 (TrainConfig.attn_weight) had no flag."""
    config = _cli_config("--beta", "0.5", "--eta", "3", "--attn-weight", "4")
    assert (config.beta, config.eta, config.attn_weight) == (0.5, 3.0, 4.0)
    default = _cli_config()
    assert (default.beta, default.eta, default.attn_weight) == \
        (TrainConfig.beta, TrainConfig.eta, TrainConfig.attn_weight)
    with pytest.raises(ZEraseError, match=r"β \(beta\) must be ≥ 0; got -1"):
        _cli_config("--beta", "-1")
    with pytest.raises(ZEraseError, match="attn_weight"):
        _cli_config("--attn-weight", "-1")


def test_every_train_flag_reaches_the_setting_it_names():
    """Each `train` flag the README lists must land in the TrainConfig field it names; a flag dropped (or wired to
    another field) in train_config_from_args silently trained with the default instead."""
    config = _cli_config("--lr", "0.02", "--epsilon", "0.004", "--lambda-mode", "exact", "--template", "a {} toy",
                         "--template", "the {} here", "--xt-source", "fresh", "--xt-pool", "5", "--resolution", "96",
                         "--preserve", "dog", "bird", "--steps", "7", "--seed", "3", "--preset", "style",
                         "--rank", "3", "--targets", "qk", "--eta", "2.5")
    assert (config.lr, config.epsilon, config.lambda_mode) == (0.02, 0.004, "exact")
    assert config.templates == ("a {} toy", "the {} here")
    assert (config.xt_source, config.xt_pool) == ("fresh", 5)
    assert (config.height, config.width) == (96, 96)
    assert config.preserve == ("dog", "bird")
    assert (config.steps, config.seed, config.preset, config.eta) == (7, 3, "style", 2.5)
    assert (config.lora.rank, config.lora.targets) == (3, ("q", "k"))


def test_train_prints_the_last_steps_record_and_builds_the_tiny_model_from_its_seed(tmp_path, capsys):
    """`train`'s result line reports the run's last record (step, L_erase, λ as history.json holds them), and
    --seed also seeds the tiny random model (cli._train: tiny_zimage_backend(seed=args.seed)): the LoRA is the one
    trained on that model; the default --out is out/train (README)."""
    import json

    from zerase_core.cli import _add_train, main
    from zerase_core.lora_file import load_lora
    from zerase_core.tiny import tiny_zimage_backend

    out = tmp_path / "run"
    assert main(["train", "--tiny", "--concept", "red", "--steps", "2", "--seed", "5", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    last = json.loads((out / "history.json").read_text())[-1]
    assert (printed["steps"], printed["L_erase"], printed["lambda"]) == (2, last["erase"], last["lam"])
    assert printed["lora"] == str(out / "erasure_lora.safetensors")
    import argparse

    from zerase_core.cli import TINY, train_config_from_args
    from zerase_core.run import PlannedRun, train_and_save

    parser = argparse.ArgumentParser()
    _add_train(parser)
    assert parser.parse_args(["--tiny", "--concept", "red"]).out == Path("out/train")
    config = train_config_from_args(parser.parse_args(["--tiny", "--concept", "red", "--steps", "2", "--seed", "5"]),
                                    **TINY)
    _, reference = train_and_save(PlannedRun(tiny_zimage_backend(seed=5), config, tmp_path / "reference"))
    trained, expected = load_lora(out / "erasure_lora.safetensors"), load_lora(reference)
    assert all(torch.equal(trained.factors[k][1], expected.factors[k][1]) for k in expected.factors)


def _tiny_cli_config(*flags: str) -> TrainConfig:
    """The TrainConfig `train --tiny --concept cat FLAGS` builds, with --tiny's own defaults (cli.TINY)."""
    import argparse

    from zerase_core.cli import TINY, _add_train, train_config_from_args

    parser = argparse.ArgumentParser()
    _add_train(parser)
    return train_config_from_args(parser.parse_args(["--tiny", "--concept", "cat", *flags]), **TINY)


def test_train_tiny_defaults_are_the_documented_ones_and_a_zero_flag_is_taken():
    """--tiny's documented defaults (--help: 50 steps, 64 px, rank 4) are those numbers; a flag's 0 is a value, not
    "not given" (README: --attn-weight 0 is L_erase alone, as ESD)."""
    plain = _tiny_cli_config()
    assert (plain.steps, plain.height, plain.width, plain.lora.rank) == (50, 64, 64, 4)
    assert _tiny_cli_config("--attn-weight", "0").attn_weight == 0.0
    assert _tiny_cli_config("--beta", "0").beta == 0.0


def test_a_second_run_into_the_folder_a_run_is_writing_into_is_refused_at_once(tmp_path, capsys):
    """Two runs into one --out (two terminals) both passed the folder's checks until the first one's checkpoint was
    written, then wrote the same files: one run was lost without a word. The folder is locked for a run; a process
    that ends, however it ends, lets go of it."""
    import subprocess
    import sys

    from zerase_core.cli import main
    from zerase_core.run_lock import LOCK, run_lock

    out = tmp_path / "run"
    argv = ["train", "--tiny", "--concept", "red", "--steps", "2", "--out", str(out)]
    code = ("import time\nfrom zerase_core.run_lock import run_lock\n"
            f"with run_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO) as holder:
        try:
            assert holder.stdout.readline() == "held\n", holder.stderr.read() if holder.poll() is not None else ""
            assert main(argv) == 2
            assert "Another run is writing into" in capsys.readouterr().err
            assert os.listdir(out) == [LOCK]  # nothing of the refused run
        finally:
            holder.kill()  # killed, not ended: the system lets go of its lock
            holder.wait()
    assert main(argv) == 0 and (out / "erasure_lora.safetensors").is_file()
    deeper = tmp_path / "new" / "deeper"  # a run refused inside its lock leaves no folder it made
    with pytest.raises(ZEraseError, match="refused"):
        with run_lock(deeper):
            raise ZEraseError("refused")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("fails", ["the lock file", "the run's folder", "the first file"])
def test_a_run_refused_by_a_full_disk_leaves_no_folder_it_made(fails, tmp_path, capsys, monkeypatch):
    """A disk that filled while the run's folder was made: the lock file (or the last folder) could not be made, and
    the folders made on the way stayed behind, empty. A folder that was there stays, even empty."""
    import errno

    import zerase_core.files as files
    from zerase_core.cli import main
    from zerase_core.run_lock import LOCK

    real_open, real_mkdir = os.open, os.mkdir

    def full(real, last):
        def call(path, *args, **kwargs):
            if os.path.basename(path) == last and os.path.isdir(os.path.dirname(path)):  # the folders above made
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, *args, **kwargs)

        return call

    outs = [tmp_path / "new" / "deeper" / "run", tmp_path / "there" / "run"]
    if fails == "the lock file":
        monkeypatch.setattr(os, "open", full(real_open, LOCK))
    elif fails == "the run's folder":
        monkeypatch.setattr(os, "mkdir", full(real_mkdir, "run"))
    else:
        monkeypatch.setattr(files.os, "fdopen", _FullDisk)
    if fails != "the run's folder":
        outs.append(tmp_path / "there")  # made by the user: kept
    (tmp_path / "there").mkdir()
    for out in outs:
        assert main(["train", "--tiny", "--concept", "red", "--steps", "1", "--out", str(out)]) == 2
        assert "No space left on device" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.rglob("*") if p.name != LOCK) == ["there"]  # "there" keeps a lock file


@pytest.mark.skipif(os.name == "nt", reason="POSIX: Windows removes no open file, so the case cannot arise there")
def test_a_lock_taken_on_a_lock_file_its_run_removed_meanwhile_is_refused(tmp_path):
    """An ending run removes the lock file of a folder it made; a run that opened the file just before holds a lock on
    a file no later run finds, which would let a third run in beside it."""
    from zerase_core.run_lock import LOCK, _lock

    (tmp_path / "run").mkdir()
    fd = os.open(tmp_path / "run" / LOCK, os.O_CREAT | os.O_RDWR)
    try:
        os.remove(tmp_path / "run" / LOCK)  # what the ending run does, holding its lock
        with pytest.raises(ZEraseError, match="Another run is writing into"):
            _lock(fd, tmp_path / "run")
    finally:
        os.close(fd)


@pytest.mark.skipif(os.name == "nt", reason="POSIX: Windows removes no open file, so the lock is released first there")
def test_an_ending_run_still_holds_its_folder_while_it_removes_the_folder_it_made(tmp_path, monkeypatch):
    """Released first, the lock let a second run take the folder and start writing in the moment before the ending
    run removed the folder (and the second run's lock file with it)."""
    import fcntl

    import zerase_core.run_lock as run_lock_module
    from zerase_core.run_lock import LOCK, run_lock

    held_while_removing = []
    real_remove_unused = run_lock_module._remove_unused

    def remove_unused(folder, made):
        fd = os.open(folder / LOCK, os.O_RDWR)  # a second run's open: flock refuses it while the first holds
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held_while_removing.append(False)
        except BlockingIOError:
            held_while_removing.append(True)
        finally:
            os.close(fd)
        real_remove_unused(folder, made)

    monkeypatch.setattr(run_lock_module, "_remove_unused", remove_unused)
    with run_lock(tmp_path / "new" / "run"):
        pass
    assert held_while_removing == [True]
    assert not (tmp_path / "new").exists()


def test_a_resumed_run_refuses_a_folder_in_its_files_place_before_training(tmp_path, capsys):
    """It trained every step, then could not write its LoRA: "Is a directory" (on the real model, hours lost). A
    folder named as the checkpoint was "No such device"."""
    from zerase_core.checkpoint import _read
    from zerase_core.cli import main

    out = tmp_path / "run"
    argv = ["train", "--tiny", "--concept", "red", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    for name in ("erasure_lora.safetensors", "history.json", "curves.png"):
        (out / name).rename(out / f"{name}.kept")
        (out / name).mkdir()
        assert main([*argv[:-4], "--steps", "4", "--out", str(out), "--resume"]) == 2
        assert f"{out / name} is a folder, where the file {name} is to be written" in capsys.readouterr().err
        assert _read(out / "checkpoint.safetensors", tensors=False)[1]["step"] == 2  # nothing trained
        (out / name).rmdir()
        (out / f"{name}.kept").rename(out / name)
    (out / "checkpoint.safetensors").rename(out / "kept")
    (out / "checkpoint.safetensors").mkdir()
    assert main([*argv[:-4], "--steps", "4", "--out", str(out), "--resume"]) == 2
    assert "checkpoint.safetensors is a folder" in capsys.readouterr().err


def test_ctrl_c_while_the_commands_modules_load_is_one_line(tmp_path):
    """main()'s own handling starts after torch is imported (seconds): a Ctrl-C before it was a traceback."""
    import subprocess
    import sys

    from zerase_core.errors import STOPPED

    interrupted = ("import importlib.abc, runpy, sys\n"
                   "class Stop(importlib.abc.MetaPathFinder):\n"
                   "    def find_spec(self, name, path, target=None):\n"
                   "        if name == 'torch':\n"
                   "            raise KeyboardInterrupt\n"
                   "sys.meta_path.insert(0, Stop())\n"
                   "sys.argv = ['zerase_core', '--help']\n"
                   "runpy.run_module('zerase_core', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", interrupted], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, STOPPED + "\n")


def _two_lora_files(folder):
    from zerase_core.lora_file import ErasureLoRA, save_lora

    return [save_lora(ErasureLoRA({(0, "q"): (torch.ones(2, 8), torch.ones(8, 2))}, scale=1.0, concept=c),
                      folder / f"{c}.safetensors") for c in ("cat", "dog")]


def _cli_config(*flags: str) -> TrainConfig:
    """The TrainConfig `python -m zerase_core train --tiny --concept cat FLAGS` builds."""
    import argparse

    from zerase_core.cli import _add_train, train_config_from_args

    parser = argparse.ArgumentParser()
    _add_train(parser)
    return train_config_from_args(parser.parse_args(["--tiny", "--concept", "cat", *flags]))


def test_an_empty_preservation_concept_is_refused():
    with pytest.raises(ZEraseError, match="A preservation concept is empty; remove it or type a word"):
        _config(preserve=("blue", " "))


def test_another_transformer_is_refused_by_the_diffusers_backend():
    with pytest.raises(ZEraseError, match="Expected diffusers' ZImageTransformer2DModel, got Linear"):
        DiffusersZImageBackend(torch.nn.Linear(2, 2), encoder=None)


def test_a_lora_whose_fingerprint_differs_is_refused_even_when_the_shapes_fit(tiny_backend):
    """Same widths, another depth on record: a LoRA made for a 3-layer model is not silently half-applied."""
    widths = host_widths(tiny_backend)
    factors = {key: (torch.zeros(2, w_in), torch.zeros(w_out, 2)) for key, (w_in, w_out) in widths.items()}
    lora = ErasureLoRA(factors, fingerprint=tiny_backend.fingerprint() | {"n_layers": 3})
    with pytest.raises(ZEraseError, match="n_layers: LoRA 3 vs model 2"):
        check_fits(lora, tiny_backend.fingerprint(), widths)


def test_resume_refuses_what_is_not_a_checkpoint_of_this_model(tmp_path):
    saved = ZEraseTrainer(tiny_zimage_backend(), _config(), checkpoint_path=tmp_path / "run.ckpt")
    saved.run()
    (tmp_path / "broken.ckpt").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    lora_file = save_lora(saved.export(), tmp_path / "red.safetensors")
    fresh = ZEraseTrainer(tiny_zimage_backend(), _config())
    with pytest.raises(ZEraseError, match="Cannot read the checkpoint .* Start a fresh run under another name .the "
                                          "command line's --out"):
        fresh.resume(tmp_path / "broken.ckpt")
    with pytest.raises(ZEraseError, match="is not a Z-Erase training checkpoint"):
        fresh.resume(lora_file)
    deeper = ZEraseTrainer(tiny_zimage_backend(TinyZImageConfig(n_layers=3)), _config())
    with pytest.raises(ZEraseError, match="belongs to another model architecture"):
        deeper.resume(tmp_path / "run.ckpt")


def test_a_resume_refusal_tells_another_architecture_first_and_cuts_long_settings(tmp_path):
    """`train --tiny --out <a demo's folder> --resume` listed the settings that differ instead of saying the model
    differs; the demo with another seed, from which it draws its templates, printed both lists (2000 characters)."""
    saved = ZEraseTrainer(tiny_zimage_backend(), _config(), checkpoint_path=tmp_path / "run.ckpt")
    saved.run()
    deeper = ZEraseTrainer(tiny_zimage_backend(TinyZImageConfig(n_layers=3)), _config(eta=3.0))
    with pytest.raises(ZEraseError, match="belongs to another model architecture; resume on the model it was"):
        deeper.resume(tmp_path / "run.ckpt")
    many = tuple(f"a photo number {i} of a {{}} ball" for i in range(40))
    with pytest.raises(ZEraseError) as refused:
        ZEraseTrainer(tiny_zimage_backend(), _config(templates=many)).resume(tmp_path / "run.ckpt")
    message = str(refused.value)
    assert "templates: ['a {} ball'] then, ['a photo number 0 of a {} ball'" in message
    assert "…, 40 in all now" in message and len(message) < 400


@pytest.mark.parametrize("written", ["qk", "q,k", "q, k", "kq", "k,q"])
def test_cli_targets_take_the_nodes_comma_list_too(written):
    """The README and the Train node write targets as "q,k,v"; the CLI takes that as well as "qkv". They are a set,
    held in q, k, v order: a run resumed with "kq" where it began with "qk" was refused as changed settings."""
    assert _cli_config("--targets", written).lora.targets == ("q", "k")


@pytest.mark.parametrize("setting", ["epsilon", "lr", "beta", "eta"])
def test_a_setting_that_is_not_a_number_is_refused(setting):
    """NaN passes every comparison: ε = NaN gave max(0, NaN) = 0 and switched preservation off without a word."""
    with pytest.raises(ZEraseError, match=f"finite numbers; got {setting}=nan"):
        _config(**{setting: float("nan")})


def test_empty_targets_are_refused_not_taken_for_the_default():
    with pytest.raises(ZEraseError, match=r"LoRA targets must be a non-empty subset of q, k, v; got \(\)"):
        _cli_config("--targets", "")


def test_a_negative_epsilon_and_no_checkpoint_interval_are_refused():
    """ε < 0 trained (λ rising every step) where the Train node reads a negative ε as "the preset's"; a checkpoint
    interval of 0 divided by zero at the first step."""
    with pytest.raises(ZEraseError, match="ε is the rise of L_pr a step may cause .* got -1.0"):
        _cli_config("--epsilon", "-1")
    with pytest.raises(ZEraseError, match="checkpoint_every must be ≥ 1; got 0"):
        _config(checkpoint_every=0)


@pytest.mark.parametrize("out", ["folder", "file"])
def test_a_path_too_long_for_the_file_system_is_refused_by_name(out, tmp_path, capsys):
    """Path.exists() raises on a name the system cannot look up; the commands named it with a traceback."""
    from zerase_core.cli import main

    long = tmp_path / ("x" * 300)
    if out == "folder":  # a folder still to be made: its name is checked too
        argv = ["train", "--tiny", "--concept", "red", "--steps", "1", "--out", str(long)]
    else:
        parts = _two_lora_files(tmp_path)
        argv = ["merge", *map(str, parts), "--out", f"{long}.safetensors"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"The name '{'x' * 300}" in err and "is too long" in err
    assert main(["inspect", f"{long}.safetensors"]) == 2
    assert "LoRA file not found" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_not_offered_for_resuming(tmp_path):
    """A fresh run over a damaged checkpoint is refused (it is still the user's file), without advice to --resume
    from it: resuming said it could not be read, and the fresh run said to resume."""
    from zerase_core.run import PlannedRun

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"\x00" * 3000)
    with pytest.raises(ZEraseError, match="is a checkpoint that cannot be read .* Delete or move that file") as err:
        PlannedRun(tiny_zimage_backend(), _config(), out)
    assert "--resume" not in str(err.value) and "Start a fresh run" not in str(err.value)  # no advice it refuses
    with pytest.raises(ZEraseError, match="No checkpoint to resume"):
        PlannedRun(tiny_zimage_backend(), _config(), tmp_path / "new" / "run", resume=True)
    assert not (tmp_path / "new").exists()  # a refused run creates nothing


def _history(steps: int = 2, **first) -> str:
    """A checkpoint's history of ``steps`` steps, as stored, with ``first`` changed in the first record."""
    record = dict(step=1, erase=0.5, attn=0.1, pr=0.01, lam=0.0, g=0.001, sigma=0.5, seconds=0.1, pr_recomputed=False)
    return json.dumps([record | {"step": i + 1} | (first if i == 0 else {}) for i in range(steps)])


def _edited(checkpoint, tensors=lambda t: t, **metadata):
    """The checkpoint re-written with its tensors passed through ``tensors`` and metadata entries replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(checkpoint), framework="pt") as f:
        meta, saved = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors(saved), str(checkpoint), metadata=meta | metadata)


@pytest.mark.parametrize("damage", [
    dict(step='"abc"'), dict(seconds='"x"'), dict(python_rng="[1, 2]"), dict(lambda_='"x"'),
    dict(lambda_='{"value": "x", "previous_pr": null, "last_g": null}'), dict(history='[{"x": 1}]'),
    dict(caller="[1]"), dict(fingerprint="[" * 100_000),  # past JSON's limits: a RecursionError, then text
    # numbers past float's range (an OverflowError traceback)
    dict(step="Infinity"), dict(seconds="1" + "0" * 400),
    dict(lambda_='{"value": 1' + "0" * 400 + ', "previous_pr": null, "last_g": 0.0}'),
    # a null where a run always holds a number: λ's comparison failed at the first step (a review reproduced it)
    dict(lambda_='{"value": null, "previous_pr": 0.1, "last_g": 0.0}'),
    dict(lambda_='{"value": 0.5, "previous_pr": 0.1, "last_g": null}'),
    dict(lambda_='{"value": [0.5], "previous_pr": 0.1, "last_g": 0.0}'),  # a list or a dict passed as well
    dict(lambda_='{"value": 0.5, "previous_pr": {"x": 0.1}, "last_g": 0.0}'),
    # a step edited apart from its history: a negative one trained past the run's steps (a huge one never ended)
    dict(step="-3"), dict(history=_history(steps=1)), dict(history=_history(steps=3)),
    # a record's field of another type or not finite trained to the end, then wrote a LoRA loading refuses (NaN) or
    # failed at its export ("oops"); the caller's notes: the Train node stopped with an AttributeError
    dict(history=_history(erase=float("nan"))), dict(history=_history(erase="oops")),
    dict(history=_history(step=1.5)), dict(history=_history(pr_recomputed="yes")),
    dict(history=_history(seconds=float("inf"))), dict(seconds="NaN"), dict(caller='{"lora_file": 5}'),
    # a list of pairs, which dict() took as the notes; a record that is no object
    dict(caller='[["lora_file", "red"]]'), dict(history='["step"]'),
    dict(tensors=lambda t: t | {"optim.0.step": torch.zeros(2)}),  # AdamW's .item() failed at the next step
    dict(tensors=lambda t: {k: v for k, v in t.items() if k != "optim.0.exp_avg_sq"}),  # AdamW failed a step later
    dict(tensors=lambda t: {k: v for k, v in t.items() if k != "lora.0.q.A"}),
    dict(tensors=lambda t: t | {"lora.0.q.A": t["lora.0.q.A"].reshape(1, -1)}),
    dict(tensors=lambda t: t | {"optim.0.exp_avg": t["optim.0.exp_avg"][:1]}),
    dict(tensors=lambda t: t | {"rng.torch": t["rng.torch"][:3]}),
    dict(tensors=lambda t: t | {"lora.1.v.B": torch.full_like(t["lora.1.v.B"], float("nan"))}),
], ids=lambda d: next(iter(d)))
def test_a_checkpoint_with_damaged_contents_is_refused_by_name_and_the_trainer_is_left_as_it_was(tmp_path, damage):
    """A checkpoint that opens but holds damaged parts was a traceback from --resume (KeyError, a shape mismatch,
    Random.setstate's ValueError, ...), or, with NaN weights, a run stopped later as if the settings were wrong."""
    from zerase_core.run import PlannedRun

    out = tmp_path / "run"
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=out / "checkpoint.safetensors").run()
    damage = {k.rstrip("_"): v for k, v in damage.items()}
    _edited(out / "checkpoint.safetensors", **damage)
    with pytest.raises(ZEraseError, match="The checkpoint .*checkpoint.safetensors is damaged .* Start a fresh run "
                                          "under another name"):
        PlannedRun(tiny_zimage_backend(), _config(steps=4), out, resume=True)  # refused here, or at the load:
        trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=4))
        before = [p.detach().clone() for p in trainer.params]
        try:
            trainer.resume(out / "checkpoint.safetensors")
        finally:  # nothing of a damaged file reaches the trainer
            assert trainer.step == 0 and all(torch.equal(p, q) for p, q in zip(trainer.params, before))


@pytest.mark.parametrize("pair", ["[]", "[0.1]", "[0.1, 0.2, 0.3]", "[[0.1, 0.2], [0.3, 0.4]]", "[0.1, [0.2]]",
                                  '{"a": 1, "b": 2}'])
def test_a_paired_rules_pair_must_be_two_numbers(tmp_path, pair):
    """The paired λ rule's observed pair: an empty one, nested lists or a dict passed and failed in the first step;
    three numbers are no pair either (the third was dropped without a word)."""
    config = _config(steps=2, lambda_mode="paired")
    out = tmp_path / "run"
    ZEraseTrainer(tiny_zimage_backend(), config, checkpoint_path=out / "checkpoint.safetensors").run()
    _edited(out / "checkpoint.safetensors", **{"lambda": '{"value": 0.5, "previous_pr": 0.1, "last_g": 0.0, '
                                                         f'"pair": {pair}}}'})
    with pytest.raises(ZEraseError, match="is damaged .*λ's state"):
        ZEraseTrainer(tiny_zimage_backend(), _config(steps=4, lambda_mode="paired")).resume(
            out / "checkpoint.safetensors")


@pytest.mark.parametrize("damage, reason", [
    (dict(step="-3"), "step -3 is negative"),  # the history-length rule alone would also refuse it, less clearly
    (dict(caller='[["lora_file", "red"]]'), "its notes of the run's files must be a JSON object, got list"),
    (dict(history='["step"]'), "a step record must be a JSON object, got str"),
    ({"lambda": '"x"'}, "λ's state must be a JSON object, got str"),  # not "string indices must be integers"
    *[(dict(history=_history(**{name: float("nan")})), f"step 1's {name} is nan")
      for name in ("erase", "attn", "pr", "lam", "g", "sigma", "seconds")],
])
def test_a_damaged_checkpoint_says_what_is_damaged(tmp_path, damage, reason):
    """Each check of a checkpoint's contents names what it found (a review: with one removed, the generic 'is damaged'
    of another still passed every case)."""
    from zerase_core.run import PlannedRun

    out = tmp_path / "run"
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=out / "checkpoint.safetensors").run()
    _edited(out / "checkpoint.safetensors", **damage)
    with pytest.raises(ZEraseError, match=f"is damaged .*{re.escape(reason)}"):
        PlannedRun(tiny_zimage_backend(), _config(steps=4), out, resume=True)
        ZEraseTrainer(tiny_zimage_backend(), _config(steps=4)).resume(out / "checkpoint.safetensors")


def test_a_checkpoint_at_step_minus_one_is_refused_when_the_run_is_planned(tmp_path):
    """Step -1 is as impossible as -3: refused by the folder's checks, before the model is loaded and the x_t pool is
    sampled, and by name; not only later, when loading finds its history one record longer than its step."""
    from zerase_core.run import PlannedRun

    out = tmp_path / "run"
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=out / "checkpoint.safetensors").run()
    _edited(out / "checkpoint.safetensors", step="-1")
    with pytest.raises(ZEraseError, match="is damaged .*step -1 is negative"):
        PlannedRun(tiny_zimage_backend(), _config(steps=4), out, resume=True)


def test_a_damaged_checkpoints_text_reaches_the_message_with_its_control_characters_escaped(tmp_path):
    """Python quotes an unknown keyword as it is: a record's field named with escape codes reached the terminal."""
    out = tmp_path / "run"
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=out / "checkpoint.safetensors").run()
    _edited(out / "checkpoint.safetensors", history='[{"x\\u001b[2J": 1}]')
    with pytest.raises(ZEraseError, match=r"is damaged .*argument 'x\\x1b\[2J'") as refused:
        ZEraseTrainer(tiny_zimage_backend(), _config(steps=4)).resume(out / "checkpoint.safetensors")
    assert "\x1b" not in str(refused.value)


def test_a_checkpoints_history_is_taken_as_it_was_written(tmp_path):
    """The records the damaged ones above are edited from: each field of its type, every number finite."""
    out = tmp_path / "run"
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=out / "checkpoint.safetensors").run()
    _edited(out / "checkpoint.safetensors", history=_history())
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=4))
    trainer.resume(out / "checkpoint.safetensors")
    assert [dataclasses.asdict(r) for r in trainer.history] == json.loads(_history())


def test_a_demo_without_evaluation_prompts_is_refused_before_any_work(tmp_path, capsys):
    from zerase_core.cli import main

    assert main(["demo", "--n-eval", "0", "--out", str(tmp_path / "demo")]) == 2
    assert "--n-eval must be at least 2" in capsys.readouterr().err and not (tmp_path / "demo").exists()


@pytest.mark.parametrize("argv, message", [
    (["bench", "--concepts", "red", "--n-eval", "1"], "--n-eval must be at least 2"),
    (["bench", "--concepts", "red", "--steps", "0", "--out", "{tmp}"], "steps must be ≥ 1; got 0"),  # before cells
    (["bench-xt", "--concepts", "red", "--n-eval", "0"], "--n-eval must be at least 2"),
    (["bench-xt", "--concepts", "red", "not red"], "'not red' is not one concept"),
    (["bench-lambda", "--concepts", "red", "dragon"], "'dragon' is not one concept"),  # red would train first
    (["bench-cost", "--tiny", "--steps", "0"], "--steps and --repeats must be at least 1"),
    (["bench-xt", "--concepts", "red", "red"], "red named twice in --concepts or --seeds"),  # summarised twice
    (["bench", "--methods", "original", "--seeds", "-1", "--out", "{tmp}"], "Seeds must be between 0 and 2^64"),
])
def test_a_benchmark_refuses_what_would_fail_after_its_work_before_it(argv, message, capsys, monkeypatch, tmp_path):
    """Each of these used to train or time first, then crash (an empty evaluation, a word that is no concept) or
    write a result of NaNs."""
    import zerase_core.toy.bench as toy_bench
    import zerase_core.trainer as trainer_module
    from zerase_core.cli import main

    monkeypatch.setattr(trainer_module.ZEraseTrainer, "__init__", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(toy_bench, "run_cell", lambda *a, **k: pytest.fail("measured a cell"))
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench-xt", "bench-lambda", "bench-cost", "bench-checkpointing"])
def test_a_benchmark_refuses_an_out_it_cannot_write_before_measuring(command, tmp_path, capsys, monkeypatch):
    import zerase_core.trainer as trainer_module
    from zerase_core.bench.report import check_out
    from zerase_core.cli import main

    monkeypatch.setattr(trainer_module.ZEraseTrainer, "__init__", lambda *a, **k: pytest.fail("measured"))
    extra = {"bench-cost": ["--tiny"], "bench-checkpointing": []}.get(command, ["--concepts", "red"])
    assert main([command, *extra, "--out", str(tmp_path)]) == 2
    assert "is a folder; --out names the JSON file" in capsys.readouterr().err
    assert main([command, *extra, "--out", str(tmp_path / ("x" * 300))]) == 2
    assert "too long" in capsys.readouterr().err
    # A trained LoRA given as --out by mistake was replaced by the table; a JSON of an earlier result is replaced
    lora = _two_lora_files(tmp_path)[0]
    before = lora.read_bytes()
    for out, message in ((lora, "ending in .json"), (tmp_path / "notes.txt", "ending in .json")):
        assert main([command, *extra, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "lora.json").write_bytes(before)
    assert main([command, *extra, "--out", str(tmp_path / "lora.json")]) == 2
    assert "exists and is not JSON" in capsys.readouterr().err
    assert lora.read_bytes() == before == (tmp_path / "lora.json").read_bytes()
    (tmp_path / "earlier.json").write_text('{"old": 1}')
    check_out(tmp_path / "earlier.json")  # an earlier result is what --out replaces


def test_a_result_is_printed_before_it_is_written(tmp_path, capsys, monkeypatch):
    """A write that fails at the end (disk full) must not lose what was measured: it is on stdout already."""
    import argparse

    import zerase_core.bench.report as report

    def full_disk(path, text):
        raise ZEraseError("Could not write")

    monkeypatch.setattr(report, "atomic_write_text", full_disk)
    with pytest.raises(ZEraseError):
        report.emit({"speedup": 3.0}, argparse.Namespace(argv=["bench-xt"], out=tmp_path / "r.json"))
    assert '"speedup": 3.0' in capsys.readouterr().out


@pytest.mark.parametrize("empty", ["", " "])
@pytest.mark.parametrize("argv", [["train", "--tiny", "--concept", "red"], ["demo"], ["merge", "a", "b"],
                                  ["compare", "a", "--model", "m", "--prompts", "p"],
                                  ["bench-cost"], ["bench"], ["bench-xt"], ["bench-lambda"], ["bench-checkpointing"]])
def test_an_empty_out_is_refused_not_taken_for_the_current_folder(argv, empty, tmp_path, monkeypatch, capsys):
    """Path("") is ".": `train --out ""` wrote its LoRA, checkpoint, curves and history into the current folder."""
    from zerase_core.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--out", empty])
    assert stopped.value.code == 2 and "argument --out: it is empty; name the folder" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_refused_merge_creates_no_folder(tmp_path, capsys):
    from zerase_core.cli import main

    parts = _two_lora_files(tmp_path)
    out = tmp_path / "new" / "merged.safetensors"
    assert main(["merge", *map(str, parts), "--weights", "1", "--out", str(out)]) == 2  # one weight for two LoRAs
    assert not (tmp_path / "new").exists()


def test_a_merge_never_replaces_a_file_that_appeared_while_it_ran(tmp_path, capsys, monkeypatch):
    """The exists-check runs before the merge; a file written there meanwhile (another process) is kept."""
    import zerase_core.merge as merge_module
    from zerase_core.cli import main

    parts = _two_lora_files(tmp_path)
    out = tmp_path / "merged.safetensors"
    real = merge_module.merge

    def meanwhile(*args, **kwargs):
        out.write_text("written by someone else")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_module, "merge", meanwhile)
    assert main(["merge", *map(str, parts), "--out", str(out)]) == 2
    assert "appeared while this was written); it was not replaced" in capsys.readouterr().err
    assert out.read_text() == "written by someone else"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_merge_onto_an_existing_file_is_refused_before_any_lora_is_merged(tmp_path, capsys, monkeypatch):
    """--out that exists is refused by name before the LoRAs are read and merged (README: merge refuses before any
    work; files are never overwritten), not only by the exclusive write at the end."""
    import zerase_core.merge as merge_module
    from zerase_core.cli import main

    parts = _two_lora_files(tmp_path)
    out = tmp_path / "merged.safetensors"
    out.write_text("an earlier file")
    monkeypatch.setattr(merge_module, "merge", lambda *a, **k: pytest.fail("merged onto an existing --out"))
    assert main(["merge", *map(str, parts), "--out", str(out)]) == 2
    assert "exists; choose another --out" in capsys.readouterr().err
    assert out.read_text() == "an earlier file"


@pytest.mark.parametrize("resolution", ["0", "-64"])
def test_a_resolution_that_is_not_positive_is_refused(resolution):
    with pytest.raises(ZEraseError, match="resolution must be positive"):
        _cli_config("--resolution", resolution)


def test_a_command_line_run_stopped_by_nan_says_to_start_again_not_to_resume(tmp_path, monkeypatch):
    """Resuming a NaN-stopped run repeats the step that failed (the same settings, the same draws): the message says
    to start a fresh run with a lower learning rate, and the last good LoRA is kept."""
    import zerase_core.trainer as trainer_module
    from zerase_core.lora_file import load_lora
    from zerase_core.run import PlannedRun, train_and_save

    real = trainer_module.loss_pr
    calls = []
    monkeypatch.setattr(trainer_module, "loss_pr",
                        lambda *a: real(*a) * (float("nan") if calls.append(1) or len(calls) > 3 else 1.0))
    out = tmp_path / "run"
    with pytest.raises(ZEraseError, match="Resuming would repeat the step that failed: start a fresh run with "
                                          "another --out and a lower learning rate .train: --lr.") as err:
        train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=6), out))
    assert "--resume to continue" not in str(err.value)
    assert 1 <= load_lora(out / "erasure_lora.safetensors").training["steps_done"] < 6
    # Its checkpoint says so: a new run with a lower learning rate may replace it (the node's way on; see
    # test_comfy_nodes), where a checkpoint of a run stopped otherwise is refused.
    from zerase_core.checkpoint import check_run_files

    lower = _config(steps=6, lr=5e-4)
    check_run_files(out / "new.safetensors", out / "checkpoint.safetensors", lower, tiny_zimage_backend(), False, "")


def test_a_checkpoint_with_settings_this_version_does_not_know_is_refused_by_name(tmp_path):
    """One from a later version of the pack (a new setting) raised TypeError from TrainConfig(**settings)."""
    from zerase_core.checkpoint import _read, check_run_files
    from zerase_core.files import atomic_save
    from zerase_core.run import PlannedRun

    out = tmp_path / "run"
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=1), checkpoint_path=out / "checkpoint.safetensors").run()
    tensors, meta = _read(out / "checkpoint.safetensors", tensors=True)
    meta["config"]["new_setting_of_a_later_version"] = 1
    atomic_save(tensors, out / "checkpoint.safetensors", meta)
    with pytest.raises(ZEraseError, match="settings this version of the pack cannot read .*new_setting"):
        PlannedRun(tiny_zimage_backend(), _config(steps=2), out, resume=True)
    # A new run there is told the same (it said "a run that can still be resumed ... --resume")
    with pytest.raises(ZEraseError, match="cannot be read .*new_setting.*so no run can resume from it"):
        check_run_files(out / "new.safetensors", out / "checkpoint.safetensors", _config(steps=2),
                        tiny_zimage_backend(), False, "")
    del meta["config"]["new_setting_of_a_later_version"]
    meta["config"]["lr"] = 10**400  # JSON's integers have no bound: an OverflowError traceback
    atomic_save(tensors, out / "checkpoint.safetensors", meta)
    with pytest.raises(ZEraseError, match="settings this version of the pack cannot read .TrainConfig: lr must be a "
                                          "float; got int 1000+…"):
        PlannedRun(tiny_zimage_backend(), _config(steps=2), out, resume=True)
    # settings that are no JSON object (a string was told as "dictionary update sequence element #0 …")
    for config, name in (("red", "the settings"), (meta["config"] | {"lora": [["rank", 4]]}, "the LoRA's settings")):
        atomic_save(tensors, out / "checkpoint.safetensors", meta | {"config": config})
        with pytest.raises(ZEraseError, match=f"settings this version of the pack cannot read .{name} must be a "
                                              "JSON object, got (str|list)"):
            PlannedRun(tiny_zimage_backend(), _config(steps=2), out, resume=True)


def test_a_rank_beyond_the_models_width_is_refused_before_any_work():
    """--rank 99999999999 ended in an allocation failure of the LoRA's factors."""
    width = tiny_zimage_backend().fingerprint()["dim"]
    with pytest.raises(ZEraseError, match=f"rank {width + 1} exceeds the model's width {width}"):
        ZEraseTrainer(tiny_zimage_backend(), _config(lora=LoRAConfig(rank=width + 1)))


def test_the_rank_refusal_names_the_bound_and_no_default():
    """The refusal named LoRAConfig's default rank, the full model's, also where another was in force (--tiny):
    it names the model's width, the bound the rank must keep, and ends there."""
    width = tiny_zimage_backend().fingerprint()["dim"]
    with pytest.raises(ZEraseError, match=f"rank {width + 1} exceeds .*; choose a rank ≤ {width}\\.$"):
        LoRAConfig(rank=width + 1).check_width(width)


def test_ctrl_c_while_a_run_is_prepared_is_told_not_a_traceback(tmp_path, monkeypatch):
    """Encoding the prompts and sampling the x_t pool take minutes on the real model, before the first step."""
    import zerase_core.run as run_module
    from zerase_core.run import PlannedRun, train_and_save

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    stopped = tmp_path / "b" / "checkpoint.safetensors"  # a run to resume, before ZEraseTrainer is replaced
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=1), checkpoint_path=stopped).run()
    monkeypatch.setattr(run_module, "ZEraseTrainer", ctrl_c)
    with pytest.raises(ZEraseError, match="Stopped before the first step .while preparing the run.; nothing was"):
        train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=2), tmp_path / "run"))
    with pytest.raises(ZEraseError, match="preparing to continue the run; its checkpoint is as it was: .* --resume"):
        train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=2), tmp_path / "b", resume=True))


def test_a_stopped_command_line_run_keeps_its_work_and_says_how_to_continue(tmp_path):
    """Ctrl-C mid-run: the LoRA so far and the checkpoint stay, the message names --resume; a new run there is
    refused (it would replace them) and the resumed one finishes where an uninterrupted run would."""
    from zerase_core.lora_file import load_lora
    from zerase_core.run import PlannedRun, train_and_save

    def ctrl_c(record, trainer):
        if record.step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(ZEraseError, match="Stopped at step 2 of 4. The LoRA so far is in .*--resume to continue"):
        train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=4), out), callbacks=[ctrl_c])
    assert load_lora(out / "erasure_lora.safetensors").training["steps_done"] == 2
    with pytest.raises(ZEraseError, match="holds erasure_lora.safetensors of an earlier run; choose another --out "
                                          ".* or add --resume"):
        PlannedRun(tiny_zimage_backend(), _config(steps=4), out)
    with pytest.raises(ZEraseError, match=r"different settings \(eta: 2.0 then, 3.0 now\)"):
        PlannedRun(tiny_zimage_backend(), _config(steps=4, eta=3.0), out, resume=True)
    result, path = train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=4), out, resume=True))
    assert load_lora(path).training["steps_done"] == 4 and len(result.history) == 4
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ZEraseError, match="is a file; --out names a folder"):
        PlannedRun(tiny_zimage_backend(), _config(), tmp_path / "a_file")


def test_ctrl_c_while_the_last_checkpoint_is_written_leaves_a_run_that_resumes(tmp_path, monkeypatch):
    """The checkpoint after the last step (steps not a multiple of the interval) was written outside the run's own
    handling: Ctrl-C there left no checkpoint, a message saying none could be saved, and a folder where neither
    --resume nor a fresh run was taken."""
    import zerase_core.checkpoint as checkpoint
    from zerase_core.run import PlannedRun, train_and_save

    real, calls = checkpoint.atomic_save, []

    def ctrl_c_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "atomic_save", ctrl_c_once)
    out = tmp_path / "run"
    with pytest.raises(ZEraseError, match="Stopped at step 3 of 3. .* the checkpoint beside it: run the same command "
                                          "with --resume"):
        train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=3), out))
    result, _ = train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=3), out, resume=True))
    assert len(result.history) == 3 and (out / "curves.png").exists() and (out / "history.json").exists()


def test_a_fresh_run_refuses_a_folder_holding_an_earlier_runs_curves_or_history(tmp_path):
    """Only the LoRA was guarded: a folder whose LoRA was moved away lost its curves and history to a new run."""
    from zerase_core.run import PlannedRun

    (tmp_path / "history.json").write_text("[]")
    (tmp_path / "curves.png").write_bytes(b"png")
    with pytest.raises(ZEraseError, match="holds curves.png, history.json of an earlier run; choose another --out"):
        PlannedRun(tiny_zimage_backend(), _config(), tmp_path)
    assert (tmp_path / "history.json").read_text() == "[]" and (tmp_path / "curves.png").read_bytes() == b"png"
    assert PlannedRun(tiny_zimage_backend(), _config(), tmp_path / "new").folder == tmp_path / "new"


def test_resume_refuses_a_model_that_cannot_be_told_to_be_the_one_trained(tmp_path, monkeypatch):
    """The checkpoint knows its model; a model whose digest cannot be made (hooks, bypass LoRAs) is not taken for
    it. (Both without a digest, a model built in memory, the architecture decides.)"""
    monkeypatch.setattr(DiffusersZImageBackend, "base_digest", lambda self: "model-a")
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=1), checkpoint_path=tmp_path / "a.ckpt").run()
    monkeypatch.setattr(DiffusersZImageBackend, "base_digest", lambda self: None)
    with pytest.raises(ZEraseError, match="carries a change that cannot be identified"):
        ZEraseTrainer(tiny_zimage_backend(), _config(steps=2)).resume(tmp_path / "a.ckpt")
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=1), checkpoint_path=tmp_path / "b.ckpt").run()
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=2)).resume(tmp_path / "b.ckpt")


def test_a_preservation_concept_that_is_the_concept_spaced_otherwise_is_refused():
    with pytest.raises(ZEraseError, match="both the concept to erase and a preservation concept"):
        _config(concept="big  cat", preserve=("Big cat",))
    with pytest.raises(ZEraseError, match="both the concept to erase and a preservation concept"):
        _config(concept="cafe\u0301", preserve=("café",))  # a pasted NFD "café" is the typed one


@pytest.mark.parametrize("flags, message", [
    # η < 0: the target would be the concept itself, or beyond it
    (("--eta", "-2"), r"η \(eta\) must be ≥ 0 \(η < 0 would strengthen the concept, not erase it\); got -2"),
    (("--lr", "1e308"), "learning rate must be between 1e-08 and 1 .* got 1e[+]308"),  # AdamW's step overflows
    (("--lr", "1e-300"), "learning rate must be between"),  # β/α overflows λ
    (("--seed", "99999999999999999999"), "seed must be between 0 and 2.64 − 1"),
    (("--seed", "-1"), "seed must be between 0"),
])
def test_settings_that_would_not_train_what_they_say_are_refused(flags, message, capsys, monkeypatch):
    with pytest.raises(ZEraseError, match=message):
        _cli_config(*flags)
    # ... and by the command, before it builds a model (the tiny one seeded torch first; the real one loads minutes)
    import zerase_core.tiny as tiny
    from zerase_core.cli import main

    monkeypatch.setattr(tiny, "tiny_zimage_backend", lambda **k: pytest.fail("a model was built"))
    assert main(["train", "--tiny", "--concept", "cat", *flags]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_run_refused_after_its_files_were_checked_leaves_no_folder(tmp_path, capsys):
    """The files' check makes --out to write a probe into; a run refused later (a resolution past the model's
    position tables, told when the trainer is built) took the folder away again, where it used to leave an empty one
    behind."""
    from zerase_core.cli import main

    out = tmp_path / "new" / "run"
    assert main(["train", "--tiny", "--concept", "cat", "--resolution", "2048", "--steps", "1",
                 "--out", str(out)]) == 2
    assert "Resolution 2048×2048 is past this model's position tables" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_template_without_the_concept_is_refused_before_a_model_is_built(tmp_path, monkeypatch, capsys):
    """It was told by the token lookup after the text encoder ran (minutes of loading Z-Image's); the filled
    template's text tells it before anything is loaded, in the lookup's words."""
    import zerase_core.tiny
    from zerase_core.cli import main

    monkeypatch.setattr(zerase_core.tiny, "tiny_zimage_backend", lambda *a, **k: pytest.fail("a model was built"))
    assert main(["train", "--tiny", "--concept", "cat", "--template", "a photo of {}", "--template",
                 "a photo of cats", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert ("The concept 'cat' does not occur in the prompt 'a photo of cats'. Put the concept word into every erase "
            "prompt template (use '{}' where it goes).") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_flow_shift_that_is_not_positive_is_refused():
    """ModelSamplingAuraFlow takes 0; σ would be NaN at the first level and the run fail with a misleading NaN."""
    with pytest.raises(ZEraseError, match="flow shift must be > 0; got 0.0"):
        _config(shift=0.0)


def test_an_x_t_pool_the_system_memory_cannot_hold_is_refused_before_it_is_allocated(monkeypatch, caplog):
    """--xt-pool 10⁹ ended in a traceback from torch's allocator; a pool a little over the free memory, on Linux,
    in the process being killed (ComfyUI's server with it) while the pool filled."""
    import psutil

    from zerase_core import memory_fit, xt_pool

    with pytest.raises(ZEraseError, match=r"x_t pool of 1000000000 trajectories × 2 levels needs \d+\.\d GiB of "
                                          r"system memory .* xt_source 'fresh'"):
        ZEraseTrainer(tiny_zimage_backend(), _config(xt_pool=10**9))
    one = xt_pool.pool_bytes(1, levels=2, predictions=3, latent_shape=tiny_zimage_backend().latent_shape(64, 64))
    memory = type("Memory", (), {"available": int(6.5 * one * memory_fit.MARGIN)})
    swap = type("Swap", (), {"free": int(4 * one * memory_fit.MARGIN)})  # 10.5 trajectories' room in all
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    monkeypatch.setattr(psutil, "swap_memory", lambda: swap)
    with pytest.raises(ZEraseError, match=r"Choose at most 10 trajectories \(TrainConfig.xt_pool, --xt-pool\)"):
        ZEraseTrainer(tiny_zimage_backend(), _config(xt_pool=11))
    with caplog.at_level("WARNING", logger="zerase_core.xt_pool"):  # past the memory, within the swap: it pages
        assert ZEraseTrainer(tiny_zimage_backend(), _config(xt_pool=10)).xt_pool.trajectories == 10
    assert "it will use swap" in caplog.text
    caplog.clear()
    assert ZEraseTrainer(tiny_zimage_backend(), _config(xt_pool=6)).xt_pool.trajectories == 6
    assert "swap" not in caplog.text


def test_the_pools_memory_check_counts_what_the_pool_allocates(tiny_backend):
    """pool_bytes is what the check compares with the free memory: the tensors a built pool keeps, and the starting
    noise it held while sampling."""
    from zerase_core.xt_pool import pool_bytes

    pool = ZEraseTrainer(tiny_backend, _config(xt_pool=3)).xt_pool
    trajectories, levels, predictions, *latent = pool.teacher.shape
    kept = sum(t.nbytes for t in vars(pool).values() if isinstance(t, torch.Tensor) and t is not pool.sigmas)
    noise = pool.x[:, 0].nbytes  # every trajectory's start
    assert (trajectories, levels, predictions) == (3, 2, 3)
    assert pool_bytes(trajectories, levels, predictions, latent) == kept + noise


def test_a_resolution_past_the_models_position_tables_is_refused_before_any_work(capsys):
    """The tiny model's RoPE tables hold 64 patches a side (1024 pixels); 2048 was an IndexError inside diffusers."""
    from zerase_core.cli import main

    backend = tiny_zimage_backend()
    x = torch.randn(1, *backend.latent_shape(1024, 1024))  # the largest it holds runs
    v, _ = backend.velocity(x, torch.tensor([0.5]), backend.encode(["a cat"]), lora=False)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert main(["train", "--tiny", "--concept", "cat", "--resolution", "2048", "--steps", "1"]) == 2
    assert "Resolution 2048×2048 is past this model's position tables: at most 1024 pixels a side (64 patches of " \
           "16). Choose a resolution ≤ 1024." in capsys.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
def test_a_command_line_run_out_of_memory_keeps_its_work_and_says_what_to_do(device, tmp_path, monkeypatch):
    """Out of memory after the trainer's own answer was a traceback from the command line (only ZEraseError and
    Ctrl-C were told); in the x_t pool's sampling, before the first step, too. MPS and the CPU say it with a plain
    RuntimeError, which was a traceback however it came."""
    from zerase_core.lora_file import load_lora
    from zerase_core.run import PlannedRun, train_and_save

    backend, out = tiny_zimage_backend(), tmp_path / "run"
    real, calls = backend.velocity, []

    def runs_out_at_step_3(*args, **kwargs):
        if kwargs.get("lora"):  # one student forward a step here
            calls.append(1)
            if len(calls) > 2:
                raise ran_out(device)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "velocity", runs_out_at_step_3)
    config = _config(steps=4, gradient_checkpointing="off", lambda_mode="fixed", fixed_lambda=1.0)
    told = re.escape(str(ran_out(device)))
    with pytest.raises(ZEraseError, match=rf"Out of memory \({told}\). .* a lower --resolution or --rank; or run again "
                                          r"with --gradient-checkpointing on \(the least memory\) and --resume.\n"
                                          r"Stopped at step 2 of 4"):
        train_and_save(PlannedRun(backend, config, out))
    assert load_lora(out / "erasure_lora.safetensors").training["steps_done"] == 2
    assert (out / "checkpoint.safetensors").exists()

    def no_memory(*args, **kwargs):
        raise ran_out(device)

    monkeypatch.setattr(backend, "velocity", no_memory)  # the pool's sampling, one trajectory at a time
    with pytest.raises(ZEraseError, match=r"Out of memory \(x_t pool: out of memory sampling one trajectory at a "
                                          r"time\). .* or choose a lower --resolution.\nStopped before the first step "
                                          r"\(while preparing the run\);"):
        train_and_save(PlannedRun(backend, _config(steps=2), tmp_path / "other"))
    # At the first step nothing can be resumed: run again, not --resume (which finds no checkpoint)
    with pytest.raises(ZEraseError, match=r"or run again with --gradient-checkpointing on \(the least memory\).\n"
                                          r"Stopped before the first step; nothing was saved"):
        train_and_save(PlannedRun(backend, _config(steps=2, xt_source="fresh", gradient_checkpointing="off"),
                                  tmp_path / "third"))


def test_a_command_line_run_out_of_memory_inside_the_optimizers_update_saves_nothing(tmp_path, monkeypatch):
    """AdamW's update had moved part of the LoRA: a file saved then would hold neither step (the trainer's
    has_progress), yet the command line saved it as "the LoRA so far"."""
    import zerase_core.trainer as trainer_module
    from zerase_core.checkpoint import _read
    from zerase_core.run import PlannedRun, train_and_save

    real_step, steps = torch.optim.AdamW.step, []

    def half_done(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            raise ran_out()

    monkeypatch.setattr(trainer_module.torch.optim.AdamW, "step", half_done)
    out = tmp_path / "run"
    with pytest.raises(ZEraseError, match=r"after step 2, inside the optimizer's update; nothing was saved: its last "
                                          r"checkpoint resumes exactly: run the same command with --resume"):
        train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=4, checkpoint_every=1), out))
    assert not (out / "erasure_lora.safetensors").exists()
    assert _read(out / "checkpoint.safetensors", tensors=False)[1]["step"] == 2  # what resumes


def _disk_full(_, path, *rest, **kwargs):
    """A writer (save_checkpoint, save_lora, save_png) on a full disk: each takes its path second."""
    raise ZEraseError(f"Could not write {path}: No space left on device.")


def test_a_run_whose_checkpoint_could_not_be_written_does_not_say_to_resume_it(tmp_path, monkeypatch):
    """A full disk at the first checkpoint: the message said to --resume from a checkpoint that was never written,
    and --resume then said there was none."""
    import zerase_core.trainer as trainer_module
    from zerase_core.lora_file import load_lora
    from zerase_core.run import PlannedRun, train_and_save

    monkeypatch.setattr(trainer_module, "save_checkpoint", _disk_full)
    out = tmp_path / "run"
    with pytest.raises(ZEraseError, match=r"No space left on device.*\nStopped at step 2 of 3.*no checkpoint could be "
                                          r"saved, so the run cannot be continued: start it anew in another --out"):
        train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=3, checkpoint_every=2), out))
    assert load_lora(out / "erasure_lora.safetensors").training["steps_done"] == 2  # the work so far, kept


def test_a_full_disk_at_a_stop_still_says_where_the_run_stopped_and_what_resumes_it(tmp_path, monkeypatch):
    """Ctrl-C after step 3; the stop's LoRA cannot be written (a full disk). Its error replaced the whole message:
    nothing said the run had stopped, nor that the checkpoint of step 3 resumes it."""
    import zerase_core.run as run_module
    from zerase_core.checkpoint import _read
    from zerase_core.run import PlannedRun, train_and_save

    monkeypatch.setattr(run_module, "save_lora", _disk_full)
    backend, out = tiny_zimage_backend(), tmp_path / "run"
    with pytest.raises(ZEraseError, match=r"Stopped at step 3 of 6. The LoRA so far could not be saved \(Could not "
                                          r"write .*No space left on device.\)\nThe last checkpoint written, .*"
                                          r"checkpoint.safetensors, resumes the run: free disk space and run the same "
                                          r"command with --resume"):
        train_and_save(PlannedRun(backend, _config(steps=6, checkpoint_every=2), out),
                       callbacks=[lambda record, trainer: _ctrl_c_after(record, 3)])
    assert _read(out / "checkpoint.safetensors", tensors=False)[1]["step"] == 3


def _ctrl_c_after(record, step: int) -> None:
    if record.step == step:
        raise KeyboardInterrupt


def test_a_run_trained_whose_outputs_cannot_be_written_says_resume_writes_them(tmp_path, monkeypatch):
    """Every step trained and in the checkpoint, then curves.png fails (a full disk): the message now says --resume
    writes the files without training again, and it does."""
    import zerase_core.run as run_module
    from zerase_core.run import PlannedRun, train_and_save

    real_save_png = run_module.save_png

    monkeypatch.setattr(run_module, "save_png", _disk_full)
    out, config = tmp_path / "run", _config(steps=3)
    with pytest.raises(ZEraseError, match=r"curves.png: No space left on device.\nAll 3 steps are trained and kept in "
                                          r".*checkpoint.safetensors: once the file can be written, run the same "
                                          r"command with --resume to write it \(nothing is trained again\)"):
        train_and_save(PlannedRun(tiny_zimage_backend(), config, out))
    monkeypatch.setattr(run_module, "save_png", real_save_png)
    result, _ = train_and_save(PlannedRun(tiny_zimage_backend(), config, out, resume=True))
    assert (out / "curves.png").is_file() and len(result.history) == 3


def test_a_picture_that_cannot_be_written_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """PIL's own save left a truncated curves.png on a full disk, and its OSError reached the user as a traceback."""

    import zerase_core.files as files
    from zerase_core.render import save_png

    path = save_png(torch.zeros(8, 8, 3), tmp_path / "curves.png")
    before = path.read_bytes()

    monkeypatch.setattr(files.os, "fdopen", _FullDisk)
    with pytest.raises(ZEraseError, match=r"Could not write .*curves.png: No space left on device. .*no earlier file "
                                          r"was changed"):
        save_png(torch.ones(8, 8, 3), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_ctrl_c_outside_a_runs_own_handling_is_told_not_a_traceback(monkeypatch, capsys):
    """Ctrl-C while a --model loads (minutes on the real one), or while the demo measures, printed a traceback."""
    import zerase_core.tiny as tiny
    from zerase_core.cli import main

    def ctrl_c(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "tiny_zimage_backend", ctrl_c)
    assert main(["train", "--tiny", "--concept", "cat", "--steps", "1"]) == 130
    assert "Stopped (Ctrl-C); every file written before is whole" in capsys.readouterr().err
    import zerase_core.cli as cli  # while the subcommands' modules are imported (seconds): was a traceback

    monkeypatch.setattr(cli, "_load_plugins", lambda: ctrl_c())
    assert main(["inspect", "x"]) == 130 and "Stopped (Ctrl-C)" in capsys.readouterr().err


def test_ctrl_c_during_a_run_exits_as_ctrl_c_does_anywhere_else(tmp_path, capsys, monkeypatch):
    """Stopped mid-run it exited with 2 (the code of bad input), where Ctrl-C elsewhere exits with 130."""
    from zerase_core.cli import main
    from zerase_core.run import progress_bar
    import zerase_core.run as run

    def bar_then_ctrl_c(total, initial=0, label="Z-Erase"):
        on_step, bar = progress_bar(total, initial, label)

        def step(record, trainer):
            on_step(record, trainer)
            raise KeyboardInterrupt

        return step, bar

    monkeypatch.setattr(run, "progress_bar", bar_then_ctrl_c)
    code = main(["train", "--tiny", "--concept", "cat", "--steps", "3", "--out", str(tmp_path / "run")])
    assert code == 130 and "Stopped at step 1 of 3" in capsys.readouterr().err


def _ctrl_c_while(files, writes):
    """``files._atomic_write`` as if the user pressed Ctrl-C while each file ``writes(path)`` names was written."""
    import signal

    real = files._atomic_write

    def pressed(path, data, exclusive=False):
        if writes(path):
            signal.raise_signal(signal.SIGINT)  # delivered at once in the main thread, as a real Ctrl-C is
        return real(path, data, exclusive)

    return pressed


def test_a_run_stopped_by_sigterm_or_sighup_keeps_its_work_as_ctrl_c_does(tmp_path):
    """``timeout``, ``docker stop`` or a job scheduler stop a run with SIGTERM, a closed terminal with SIGHUP. Left to
    the system they ended the process at once: no LoRA so far, the steps since the last checkpoint lost (a review).
    They take Ctrl-C's way now, in a process of its own (without the fix the signal ends that process, not pytest),
    and the handlers are put back after the command."""
    import signal
    import subprocess
    import sys

    from zerase_core.lora_file import load_lora

    for name in ("SIGTERM", "SIGHUP"):
        if not hasattr(signal, name):
            continue  # Windows has no SIGHUP
        out = tmp_path / name
        # the signal left to the system, as a terminal starts a command (under nohup SIGHUP stays ignored, by design)
        code = (f"import signal\nsignal.signal(signal.{name}, signal.SIG_DFL)\n"
                "import zerase_core.run as run\nfrom zerase_core.cli import main\n"
                "bar = run.progress_bar\n"
                "def stopped_at_2(total, initial=0, label=''):\n"
                "    on_step, b = bar(total, initial, label)\n"
                "    def step(record, trainer):\n"
                "        on_step(record, trainer)\n"
                f"        if record.step == 2: signal.raise_signal(signal.{name})\n"
                "    return step, b\n"
                "run.progress_bar = stopped_at_2\n"
                f"code = main(['train', '--tiny', '--concept', 'cat', '--steps', '5', '--out', {str(out)!r}])\n"
                f"print(code, signal.getsignal(signal.{name}) == signal.SIG_DFL)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0 and done.stdout.split()[-2:] == ["130", "True"], (name, done.returncode,
                                                                                     done.stderr[-2000:])
        assert "Stopped at step 2 of 5" in done.stderr and "--resume" in done.stderr
        assert load_lora(out / "erasure_lora.safetensors").training["steps_done"] == 2


def test_ctrl_c_pressed_again_while_a_stopped_run_saves_waits_until_its_files_are_written(tmp_path, capsys,
                                                                                          monkeypatch):
    """A second Ctrl-C while the stop saved its checkpoint and the LoRA so far aborted both saves: the run was lost,
    and the command said only "Stopped". Held back while they are written, it stops nothing more; Ctrl-C's handler is
    put back after."""
    import signal

    import zerase_core.files as files
    import zerase_core.run as run
    from zerase_core.checkpoint import _read
    from zerase_core.cli import main
    from zerase_core.lora_file import read_description

    stopped, progress_bar = [], run.progress_bar

    def bar_then_ctrl_c(total, initial=0, label="Z-Erase"):
        on_step, bar = progress_bar(total, initial, label)

        def step(record, trainer):
            on_step(record, trainer)
            stopped.append(record.step)
            raise KeyboardInterrupt

        return step, bar

    monkeypatch.setattr(run, "progress_bar", bar_then_ctrl_c)
    monkeypatch.setattr(files, "_atomic_write", _ctrl_c_while(files, lambda path: bool(stopped)))
    out = tmp_path / "run"
    code = main(["train", "--tiny", "--concept", "cat", "--steps", "3", "--resolution", "32", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and "Stopped at step 1 of 3. The LoRA so far is in" in err, err
    assert "the checkpoint beside it: run the same command with --resume to continue" in err
    assert read_description(out / "erasure_lora.safetensors")["training"]["steps_done"] == 1
    assert _read(out / "checkpoint.safetensors", tensors=False)[1]["step"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_a_finished_run_writes_its_files_stops_once_they_are_written(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the LoRA of a finished run was written left it, the curves and the history unwritten (a --resume
    wrote them, after loading the model again). Held back for that second, it stops the command once all are."""
    import signal

    import zerase_core.files as files
    from zerase_core.cli import main
    from zerase_core.errors import STOPPED
    from zerase_core.run_lock import LOCK

    lora = "erasure_lora.safetensors"
    monkeypatch.setattr(files, "_atomic_write", _ctrl_c_while(files, lambda path: path.name == lora))
    out = tmp_path / "run"
    code = main(["train", "--tiny", "--concept", "cat", "--steps", "2", "--resolution", "32", "--out", str(out)])
    assert code == 130 and STOPPED in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "checkpoint.safetensors", "curves.png", lora, "history.json"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_is_held_back_only_where_python_lets_a_handler_be_set():
    """Signal handlers can be set in the main thread only (signal.signal raises ValueError elsewhere): ComfyUI runs
    the engine in a worker thread, where the body runs as it is. In the main thread a Ctrl-C in the body is delivered
    after it, or, for a caller stopping already, not at all."""
    import signal
    import threading

    from zerase_core.ctrl_c import ctrl_c_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("written")
    with ctrl_c_deferred(stopping=True):
        signal.raise_signal(signal.SIGINT)
        done.append("saved")
    assert done == ["written", "saved"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # A body that fails goes on raising its own error (a full disk says so), and tells what it held back: a caller
    # that takes the body again (a step out of memory) must not swallow the stop.
    with pytest.raises(RuntimeError, match="No space left"):
        with ctrl_c_deferred() as held:
            signal.raise_signal(signal.SIGINT)
            raise RuntimeError("No space left on device")
    assert held == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Where Ctrl-C is ignored (a background job), a Ctrl-C held back stays ignored, but the command line's SIGTERM
    # (stop_as_ctrl_c) stops: sent on as a SIGINT, it was lost (a review); held, it is delivered as KeyboardInterrupt.
    from zerase_core.ctrl_c import stop_as_ctrl_c

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_deferred():
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_deferred():
                stop_as_ctrl_c()
                done.append("held")
        assert done[-1] == "held" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        with pytest.raises(KeyboardInterrupt):
            stop_as_ctrl_c()  # outside a hold: at once
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Nested holds: a stop asked for after the inner one ended is the outer one's (removed by equality, the two empty
    # lists were confused, and the outer's end raised ValueError).
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred():
            with ctrl_c_deferred():
                pass
            stop_as_ctrl_c()
    failed = []

    def worker():
        try:
            with ctrl_c_deferred():
                done.append("in a worker")
        except BaseException as err:  # ValueError: signal only works in main thread
            failed.append(err)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert not failed and done[-1] == "in a worker"


def test_the_largest_seed_the_settings_take_trains(tmp_path, capsys):
    """Seeds up to 2⁶⁴ − 1 are accepted, but a seed above about 1.8e13 overflowed torch where it was offset (the tiny
    encoder's word vectors, the previews, the demo's measuring noise); derived seeds below the top are unchanged."""
    from zerase_core.cli import main
    from zerase_core.sampling import preview_seed

    assert preview_seed(5) == 5 + 1_000_003 and preview_seed(2**64 - 1) == 1_000_002
    assert main(["train", "--tiny", "--concept", "cat", "--seed", str(2**64 - 1), "--steps", "1", "--resolution", "32",
                 "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err


def test_a_prompt_past_the_models_position_tables_is_refused_by_name(capsys):
    """The tiny model's first RoPE axis holds 256 positions; a 250-word concept (in the template "A photo of {}") was
    an IndexError inside diffusers."""
    from zerase_core.cli import main

    backend = tiny_zimage_backend()
    longest = backend.encode([" ".join(["cat"] * 222)])  # the most it holds (2 tokens around the words) runs
    assert longest[0].n_tokens == 224
    v, _ = backend.velocity(torch.randn(1, *backend.latent_shape(64, 64)), torch.tensor([0.5]), longest, lora=False)
    assert torch.isfinite(v).all()
    concept = " ".join(["cat"] * 250)
    assert main(["train", "--tiny", "--concept", concept, "--steps", "1"]) == 2
    told = capsys.readouterr().err
    assert "is 255 tokens; this model's position tables hold 224. Shorten it (in training: the template" in told


def test_the_command_lines_curves_say_when_a_run_has_no_preservation_concepts(tmp_path, monkeypatch):
    """The node's curves said so (the console's warning is easily missed) and the command line's did not: one title
    for both (history.run_title)."""
    from zerase_core import run
    from zerase_core.run import PlannedRun, train_and_save

    titles, real = [], run.curves
    monkeypatch.setattr(run, "curves", lambda series, title="", **kw: titles.append(title) or real(series, title=title))
    for folder, preserve in (("alone", ()), ("kept", ("blue",))):
        train_and_save(PlannedRun(tiny_zimage_backend(), _config(steps=1, preserve=preserve), tmp_path / folder))
    assert titles == ["Z-Erase 'red' (no preservation concepts): 1 steps", "Z-Erase 'red': 1 steps"]


@pytest.mark.parametrize("step", ['"abc"', "Infinity"])
def test_a_fresh_run_beside_a_checkpoint_with_a_damaged_step_is_refused_by_name(tmp_path, step):
    """A mutation audit: a ValueError or OverflowError from the damaged step was a traceback once only the pack's
    own errors were caught."""
    from zerase_core.checkpoint import check_run_files

    ckpt = tmp_path / "checkpoint.safetensors"
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=1), checkpoint_path=ckpt).run()
    _edited(ckpt, step=step)
    with pytest.raises(ZEraseError, match="is a checkpoint that cannot be read"):
        check_run_files(tmp_path / "l.safetensors", ckpt, _config(steps=1), tiny_zimage_backend(), False, "")


def test_a_fresh_run_refuses_a_folder_holding_the_callers_own_files(tmp_path):
    """The demo's report.md of an earlier run would be overwritten by a new run into its folder."""
    from zerase_core.run import PlannedRun

    (tmp_path / "report.md").write_text("an earlier demo's report")
    with pytest.raises(ZEraseError, match="holds report.md of an earlier run"):
        PlannedRun(tiny_zimage_backend(), _config(), tmp_path, also_writes=("report.md",))


def test_the_command_lines_stop_signals_leave_a_handler_someone_else_set():
    """nohup's ignored SIGHUP stays ignored, a host's own SIGTERM handler stays its own, inside and after (a mutation
    audit: taking them over failed no test)."""
    import signal

    from zerase_core.ctrl_c import other_stops_as_ctrl_c

    def hosts(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, hosts), signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with other_stops_as_ctrl_c():
            assert signal.getsignal(signal.SIGTERM) is hosts and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is hosts and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous[0]), signal.signal(signal.SIGHUP, previous[1])


def test_a_ctrl_c_held_where_it_is_ignored_does_not_stop_and_a_nested_stop_ends_the_innermost_hold():
    """A held-back Ctrl-C where SIGINT is ignored (a script's background job) stops nothing, which a step out of
    memory reads before it is taken again; a stop asked for (SIGTERM's) inside nested holds is delivered when the
    innermost ends, not after the outer body went on (a mutation audit: both changes failed no test)."""
    import signal

    from zerase_core.ctrl_c import _ASKED, _IGNORED, ctrl_c_deferred, stop_as_ctrl_c, stops

    assert not stops([signal.SIGINT, _IGNORED]) and stops([signal.SIGINT]) and stops([_IGNORED, _ASKED])
    went_on = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred():
            with ctrl_c_deferred():
                stop_as_ctrl_c()
            went_on.append("the outer body after the inner hold")
    assert went_on == []


def test_the_gradient_checkpointing_flag_alone_means_on_and_its_default_is_auto():
    """`--gradient-checkpointing` given bare asks for it (on); left out, the run decides (auto)."""
    assert _cli_config().gradient_checkpointing == "auto"
    assert _cli_config("--gradient-checkpointing").gradient_checkpointing == "on"
    assert _cli_config("--gradient-checkpointing", "off").gradient_checkpointing == "off"


def test_a_rank_of_zero_is_refused_not_taken_for_not_given():
    """`--rank 0` is a wrong rank, told as such, not read as the flag left out (the default rank)."""
    with pytest.raises(ZEraseError, match="LoRA rank must be at least 1, got 0"):
        _cli_config("--rank", "0")


def test_flags_given_with_tiny_override_tinys_settings_and_targets_keep_its_rank():
    """`train --tiny` builds its config over TINY's settings (cli._train): a flag given wins over them, and --targets
    alone keeps TINY's rank 4."""
    import argparse

    from zerase_core.cli import TINY, _add_train, train_config_from_args

    parser = argparse.ArgumentParser()
    _add_train(parser)

    def tiny(*flags):
        return train_config_from_args(parser.parse_args(["--tiny", "--concept", "cat", *flags]), **TINY)

    assert tiny().steps == TINY["steps"] and tiny().lora.rank == 4
    config = tiny("--steps", "3", "--resolution", "32", "--targets", "q")
    assert (config.steps, config.height, config.width) == (3, 32, 32)
    assert config.lora.rank == 4 and config.lora.targets == ("q",)  # TINY's rank 4, not LoRAConfig's default
    assert tiny("--rank", "2", "--targets", "qk").lora.rank == 2


# --- from a mutation audit (toy and helpers): each kills a mutant the suite let through ---------------------------

def test_a_ctrl_c_held_where_sigint_is_ignored_is_marked_so_a_retried_step_goes_on():
    """ctrl_c_deferred itself marks the held list where SIGINT is ignored: without the mark, stops() read the held
    Ctrl-C as a stop, and a step out of memory that ignores Ctrl-C gave up instead of being taken again."""
    import signal

    from zerase_core.ctrl_c import ctrl_c_deferred, stops

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_deferred() as held:
            signal.raise_signal(signal.SIGINT)
        assert signal.SIGINT in held and not stops(held)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_sigterm_and_sighup_take_ctrl_c_s_way_only_where_no_one_set_a_handler():
    """nohup's ignored SIGHUP (or an embedding program's handler) stays as it was inside the command, and the
    system's default comes back after it."""
    import signal

    from zerase_core.ctrl_c import other_stops_as_ctrl_c

    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    kept = {n: signal.getsignal(getattr(signal, n)) for n in names}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if "SIGHUP" in names:
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with other_stops_as_ctrl_c():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            if "SIGHUP" in names:
                assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        if "SIGHUP" in names:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        for n, handler in kept.items():
            signal.signal(getattr(signal, n), handler)


def test_a_seed_is_valid_from_zero_to_two_to_the_64_minus_one():
    """torch's generators take seeds below 2**64: 2**64 itself is refused with the others, as -1 is."""
    from zerase_core.seeds import offset_seed, valid_seed

    assert valid_seed(0) and valid_seed(2**64 - 1)
    assert not valid_seed(2**64) and not valid_seed(-1)
    assert offset_seed(2**64 - 1, 1) == 0 and offset_seed(5, 3) == 8


def test_an_out_that_is_a_file_is_refused_as_the_folder_out_names(tmp_path, capsys):
    """The run's lock is taken first (before the model loads), so its check is what a file given as --out meets: told
    as --out naming a folder, not as a lock file that cannot be made inside it; the file is left as it was."""
    from zerase_core.cli import main
    from zerase_core.run_lock import run_lock

    (tmp_path / "a_file").write_text("mine")
    assert main(["train", "--tiny", "--concept", "red", "--steps", "1", "--out", str(tmp_path / "a_file")]) == 2
    assert f"{tmp_path / 'a_file'} is a file; --out names a folder for the run's files." in capsys.readouterr().err
    with pytest.raises(ZEraseError, match="is a file; --out names a folder"):
        with run_lock(tmp_path / "a_file"):
            pass
    assert (tmp_path / "a_file").read_text() == "mine" and os.listdir(tmp_path) == ["a_file"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's open files in /proc")
def test_a_run_refused_by_the_lock_keeps_no_file_open(tmp_path):
    """A refused run closes the lock file it opened: a ComfyUI process whose queued runs were refused kept one open
    per refusal (on Windows an open file cannot be removed, so the folder could not be cleaned up either)."""
    from zerase_core.run_lock import run_lock

    def open_files():
        return len(os.listdir("/proc/self/fd"))

    (tmp_path / "run").mkdir()  # the user's: its lock file stays after each run
    with run_lock(tmp_path / "run"):  # flock: a second open of the file in this process is refused too
        before = open_files()
        for _ in range(3):
            with pytest.raises(ZEraseError, match="Another run is writing into"):
                with run_lock(tmp_path / "run"):
                    pass
        assert open_files() == before
    with run_lock(tmp_path / "run"):  # released at the end, the same lock file taken again
        pass
    assert open_files() == before - 1


def _stopped_trainer(tmp_path, checkpointed: int, n_layers: int = 4):
    """What run._stopped and run._out_of_memory read of a trainer stopped at step 3 of 10, its checkpoint written."""
    from types import SimpleNamespace

    checkpoint = tmp_path / "checkpoint.safetensors"
    checkpoint.write_bytes(b"written")
    backend = SimpleNamespace(checkpointed_layers=checkpointed, n_layers=n_layers)
    return SimpleNamespace(step=3, torn=False, params_finite=lambda: True, config=SimpleNamespace(steps=10),
                           export=lambda: None, checkpoint_path=checkpoint, backend=backend)


def test_a_nan_stop_whose_lora_cannot_be_saved_says_to_start_anew_not_to_resume(tmp_path, monkeypatch):
    """After NaN the checkpoint would run into the same step with the same settings, so even when the LoRA so far
    cannot be written (a full disk) the message must not send the user to --resume; a Ctrl-C stop in the same state
    is resumable and says so (a mutation audit: dropping the NaN case passed every test)."""
    from zerase_core import run
    from zerase_core.trainer import NonFiniteLoss

    def full_disk(*args, **kwargs):
        raise ZEraseError("Could not write it: No space left on device.")

    monkeypatch.setattr(run, "save_lora", full_disk)
    trainer = _stopped_trainer(tmp_path, checkpointed=0)
    nan = run._stopped(trainer, tmp_path / "lora.safetensors", NonFiniteLoss("L_erase is NaN at step 4."))
    assert "start the run anew elsewhere" in nan and "--resume" not in nan
    stopped = run._stopped(trainer, tmp_path / "lora.safetensors", KeyboardInterrupt())
    assert "run the same command with --resume" in stopped


def test_out_of_memory_advises_checkpointing_only_where_a_layer_is_left_to_checkpoint(tmp_path):
    """With as many main layers checkpointed as "on" checkpoints (all but the last) or more, "--gradient-checkpointing
    on" would change nothing: the advice is resolution and rank only; with fewer, checkpointing is advised, with
    --resume where a checkpoint was written (a mutation audit: advising it always passed every test)."""
    from zerase_core.run import _out_of_memory

    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    for checkpointed in (3, 4):  # of 4
        every = _out_of_memory(err, _stopped_trainer(tmp_path, checkpointed=checkpointed))
        assert "--resolution or --rank." in every and "--gradient-checkpointing" not in every
    part = _out_of_memory(err, _stopped_trainer(tmp_path, checkpointed=2))
    assert part.endswith("or run again with --gradient-checkpointing on (the least memory) and --resume.")


def test_bench_refuses_a_file_or_a_name_too_long_as_its_out_before_measuring(tmp_path, capsys, monkeypatch):
    """bench's --out is a folder for its cells and table: a file given there, or a name the file system cannot hold,
    is told before the first cell is measured, not after hours of them when bench.json cannot be written."""
    import zerase_core.toy.bench as toy_bench
    from zerase_core.cli import main

    monkeypatch.setattr(toy_bench, "run_cell", lambda *a, **k: pytest.fail("measured a cell"))
    (tmp_path / "a_file").write_text("mine")
    assert main(["bench", "--concepts", "red", "--methods", "original", "--out", str(tmp_path / "a_file")]) == 2
    assert "a_file is a file; --out names a folder for the cells and the table." in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "mine"
    assert main(["bench", "--concepts", "red", "--methods", "original", "--out", str(tmp_path / ("x" * 300))]) == 2
    assert "is too long" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--layers", "0"], "--layers must be at least 1; got 0"),
    (["--steps", "0"], "--steps and --repeats must be at least 1"),
    (["--repeats", "0"], "--steps and --repeats must be at least 1"),
])
def test_bench_checkpointing_refuses_no_layers_and_no_timed_steps_before_building_a_model(argv, message, capsys,
                                                                                            monkeypatch):
    """No layers leaves nothing to checkpoint (and ratios against an empty model); no timed step gives no median: each
    is told before a model is built or a step is timed."""
    import zerase_core.bench.checkpointing as checkpointing
    import zerase_core.bench.cost as cost
    from zerase_core.cli import main

    monkeypatch.setattr(cost, "bench_tiny_backend", lambda *a, **k: pytest.fail("built a model"))
    monkeypatch.setattr(checkpointing, "measure", lambda *a, **k: pytest.fail("measured"))
    assert main(["bench-checkpointing", *argv]) == 2
    assert message in capsys.readouterr().err


def test_velocity_refuses_a_latent_batch_that_does_not_match_its_prompts():
    """One prompt per latent row: a mismatch is refused by name before any work, not a shape error deep inside."""
    backend = tiny_zimage_backend()
    prompts = backend.encode(["a red circle"])
    with pytest.raises(ValueError, match="2 latents but 1 prompts"):
        backend.velocity(torch.randn(2, 4, 8, 8), torch.full((2,), 0.5), prompts)
