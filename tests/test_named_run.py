"""A run saved by name into a LoRA folder (the Train node's files), on a tiny diffusers Z-Image: CI runs these
without ComfyUI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zerase_core.config import TrainConfig
from zerase_core.errors import ZEraseError
from zerase_core.lora import LoRAConfig
from zerase_core.lora_file import ErasureLoRA, load_lora, save_lora
from zerase_core.named_run import LORA_FILE, NamedRun
from zerase_core.tiny import tiny_zimage_backend
from zerase_core.trainer import ZEraseTrainer

ADVICE = "Turn resume on to continue it."


def _config(**over) -> TrainConfig:
    base = dict(concept="red", preserve=("blue",), templates=("a photo of a {} ball",), steps=6, height=64, width=64,
                sample_steps=2, lora=LoRAConfig(rank=2), xt_pool=2, shuffle_pool=1, checkpoint_every=2, lr=1e-2)
    return TrainConfig(**(base | over))


def _train(folder, config, resume=False, stop_after=None, backend=None, name=""):
    """What the node does with a NamedRun: plan, check, attach, train, save (also when stopped)."""
    backend = backend or tiny_zimage_backend()
    run = NamedRun.plan(folder, name, config, resume)
    run.check(backend, ADVICE)
    trainer = ZEraseTrainer(backend, config, resume_from=run.continues)
    if stop_after:  # a Cancel after that step
        trainer.should_stop = lambda: trainer.step >= stop_after
    run = run.attach(trainer)
    result = trainer.run()
    return run.save(result.lora), result


def test_a_save_name_with_the_files_suffix_names_the_same_files_and_checkpoint(tmp_path):
    """"cat.safetensors" wrote cat's LoRA files but a checkpoint of its own: queued again with resume on under that
    natural spelling, a cancelled "cat" run trained from step 0 into cat_001 without a word (a review)."""
    plain, *others = (NamedRun.plan(tmp_path, name, _config(), True)
                      for name in ("cat", " cat.safetensors ", "cat .safetensors"))
    assert all((run.lora, run.checkpoint) == (plain.lora, plain.checkpoint) for run in others)
    twice = NamedRun.plan(tmp_path, "cat.safetensors.safetensors", _config(), True)  # one suffix off, for both
    assert (twice.lora.name, twice.checkpoint.name) == ("cat.safetensors.safetensors", "cat.safetensors.zerase-ckpt")


def test_a_link_to_nothing_under_the_next_name_is_taken(tmp_path):
    """A dangling link looked free (Path.exists follows links); the exclusive save then refused it after the training,
    with advice to choose another name that abandoned the run, and a resume picked the same link again (a review)."""
    import os

    (tmp_path / "cat.safetensors").symlink_to(tmp_path / "gone.safetensors")
    assert not os.path.exists(tmp_path / "cat.safetensors")
    assert NamedRun.plan(tmp_path, "cat", _config(), False).lora == tmp_path / "cat_001.safetensors"


def test_a_stopped_and_resumed_run_leaves_one_file_equal_to_an_uninterrupted_run(tmp_path):
    whole, _ = _train(tmp_path / "whole", _config())
    folder = tmp_path / "loras"
    partial, stopped = _train(folder, _config(), stop_after=3)
    assert partial == (folder / "red.safetensors").resolve() and not stopped.completed
    with pytest.raises(ZEraseError, match="Turn resume on"):  # a new run would replace the stopped run's checkpoint
        NamedRun.plan(folder, "", _config(), resume=False).check(tiny_zimage_backend(), ADVICE)
    final, result = _train(folder, _config(), resume=True)
    assert final == partial and result.completed and result.history[0].step == 1  # the history carried over
    assert sorted(p.name for p in folder.iterdir()) == [".checkpoints", "red.safetensors"]
    assert not any((folder / ".checkpoints").iterdir())  # complete: nothing left to resume
    done, reference = load_lora(final), load_lora(whole)
    assert done.training["steps_done"] == 6
    for key, (a, b) in reference.factors.items():
        torch.testing.assert_close(done.factors[key][0], a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(done.factors[key][1], b, rtol=1e-5, atol=1e-7)


def test_a_run_cancelled_with_its_last_step_done_leaves_no_checkpoint_to_refuse_the_next(tmp_path):
    """ComfyUI's progress hook raises a Cancel at the last step's update: the run has done all its work but stops
    by an exception, and the node saves its LoRA as a stopped one's. That save finishes the run, or the checkpoint
    left beside a finished file (which a repeat reuses without training) refused every other run under the name."""
    folder, config = tmp_path / "loras", _config(steps=3)
    run = NamedRun.plan(folder, "", config, resume=False)
    backend = tiny_zimage_backend()
    trainer = ZEraseTrainer(backend, config)
    run = run.attach(trainer)

    def cancel_at_the_last_update(record, trainer):
        if record.step == config.steps:
            raise KeyboardInterrupt

    trainer.callbacks.append(cancel_at_the_last_update)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert trainer.step == 3 and run.checkpoint.exists()  # the trainer keeps its last good state, as on any stop
    path = run.save(trainer.export())  # as the node's except branch does
    assert load_lora(path).training["steps_done"] == 3 and not run.checkpoint.exists()
    _train(folder, _config(steps=3, seed=1))  # another run under the name: not refused, lands beside it
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["red.safetensors", "red_001.safetensors"]


def test_the_partial_file_is_the_one_its_checkpoint_recorded(tmp_path):
    """Two runs of one name and settings, both stopped at the same step, leave two partial files that look alike;
    the resumed run's checkpoint names the one it saved, and only that one is taken."""
    config = _config()
    fingerprint = {"family": "z-image", "dim": 32, "n_layers": 2}
    training = config.to_dict() | {"steps_done": 2, "seconds": 1.0}
    factors = {(i, p): (torch.randn(2, 32), torch.randn(32, 2)) for i in range(2) for p in "qkv"}
    for name in ("stop", "stop_001"):
        save_lora(ErasureLoRA(factors, concept="red", fingerprint=fingerprint, training=training),
                  tmp_path / f"{name}.safetensors")
    run = NamedRun.plan(tmp_path, "stop", config, resume=True)
    resumed = SimpleNamespace(step=2, config=config, checkpoint_meta={LORA_FILE: "stop_001"},
                              backend=SimpleNamespace(fingerprint=lambda: fingerprint), base_digest=None)
    assert run._partial_file(resumed) == (tmp_path / "stop_001.safetensors").resolve()
    resumed.step = 1  # that file stopped after the checkpoint's step: not this run's
    assert run._partial_file(resumed) is None
    # a note edited to lead out of the folder (or no text) is no file of this run: it was refused as a save name
    for note in ("../stop_001", "/etc/passwd", "a\nb"):
        resumed.step, resumed.checkpoint_meta = 2, {LORA_FILE: note}
        assert run._partial_file(resumed) is None


def test_a_finished_run_of_these_settings_on_this_model_is_found_and_no_other(tmp_path):
    backend = tiny_zimage_backend()
    backend.base_digest = lambda: "this-model"  # an in-memory model has none, and nothing is ever reused for it
    path, _ = _train(tmp_path, _config(), backend=backend)
    assert NamedRun.plan(tmp_path, "", _config(), False).finished(backend) == path
    assert NamedRun.plan(tmp_path, "", _config(seed=1), False).finished(backend) is None
    other = tiny_zimage_backend()
    other.base_digest = lambda: "another-model"
    assert NamedRun.plan(tmp_path, "", _config(), False).finished(other) is None


def test_a_file_written_under_the_name_during_the_run_is_kept(tmp_path):
    """The name is resolved before training; what another writer saved there meanwhile is not overwritten."""
    backend = tiny_zimage_backend()
    run = NamedRun.plan(tmp_path, "cat", _config(steps=1), resume=False)
    trainer = ZEraseTrainer(backend, _config(steps=1))
    run = run.attach(trainer)
    result = trainer.run()
    run.lora.write_bytes(b"someone else's file")
    path = run.save(result.lora)
    assert path.name == "cat_001.safetensors" and run.lora.read_bytes() == b"someone else's file"


def test_damaged_files_under_the_name_are_no_finished_run(tmp_path):
    """Train reads every file saved under its name for a finished run to take: shared files are untrusted, and one
    whose metadata was nested too deep, held an integer of 5000 digits or a training that is no dict stopped Train
    with a traceback (RecursionError, ValueError) before any other file was looked at."""
    backend = tiny_zimage_backend()
    backend.base_digest = lambda: "this-model"
    finished, _ = _train(tmp_path, _config(), backend=backend)
    with safe_open(str(finished), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    kept = finished.rename(tmp_path / "red_003.safetensors")  # found after the damaged ones
    for name, training in (("red", "[" * 100_000), ("red_001", "1" * 5000), ("red_002", "[1, 2]")):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=meta | {"training": training})
    assert NamedRun.plan(tmp_path, "", _config(), False).finished(backend) == kept


# Gaps a mutation audit of the files/resume layer found (each test fails under its mutant).

def test_saved_versions_are_only_the_names_the_numbering_writes(tmp_path):
    """cat_1 and cat_0001 are no Z-Erase numbering of "cat": taken for its versions, they could be reused as a
    finished run or merged."""
    from zerase_core.save_names import saved_versions

    for name in ("cat", "cat_1", "cat_0001", "cat_002"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"x")
    assert [p.name for p in saved_versions(tmp_path, "cat")] == ["cat.safetensors", "cat_002.safetensors"]


def test_a_save_name_through_a_linked_subfolder_leading_outside_is_refused(tmp_path):
    from zerase_core.save_names import safe_output_path

    outside, folder = tmp_path / "outside", tmp_path / "loras"
    outside.mkdir(), folder.mkdir()
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ZEraseError, match="would leave the folder"):
        safe_output_path(folder, "sub/cat")


def test_a_concept_exactly_as_long_as_a_name_may_be_is_kept_whole():
    """Cut one character short, such a concept's runs would be renamed by a later fix."""
    from zerase_core.save_names import _NAME_ROOM, name_from

    assert name_from("a" * _NAME_ROOM) == "a" * _NAME_ROOM


def test_a_run_without_resume_never_continues_the_checkpoint_under_its_name(tmp_path):
    _train(tmp_path, _config(), stop_after=3)
    run = NamedRun.plan(tmp_path, "", _config(), resume=False)
    assert run.checkpoint.exists() and run.continues is None


def test_no_finished_file_is_taken_for_a_model_without_a_digest(tmp_path):
    """A model that cannot tell what it is (in memory, LoRAs stacked by hooks) may be another fine-tune: it trains."""
    backend = tiny_zimage_backend()
    assert backend.base_digest() is None
    _train(tmp_path, _config(), backend=backend)
    assert NamedRun.plan(tmp_path, "", _config(), False).finished(backend) is None


def test_a_stopped_runs_partial_file_is_no_finished_run(tmp_path):
    backend = tiny_zimage_backend()
    backend.base_digest = lambda: "this-model"
    _train(tmp_path, _config(), stop_after=3, backend=backend)
    assert NamedRun.plan(tmp_path, "", _config(), False).finished(backend) is None


def test_a_blank_save_name_falls_back_to_the_name_made_from_the_concept(tmp_path):
    """A save_name of only spaces (a cleared widget) is no name: the run is saved under its concept's name, as an empty
    one is, not refused as a name that is not allowed."""
    for blank in ("", "   ", "\t"):
        run = NamedRun.plan(tmp_path, blank, _config(concept="red"), False)
        assert (run.name, run.lora, run.checkpoint.name) == ("red", tmp_path / "red.safetensors", "red.zerase-ckpt")


def test_a_save_name_ending_in_the_suffix_twice_resumes_into_its_partial_file(tmp_path):
    """The checkpoint recorded its LoRA's name without ".safetensors" and read it back through path_inside, which
    takes that suffix off once more: a run saved as "cat.safetensors.safetensors" (the file the name gives, see above),
    stopped and resumed, did not find its partial file and saved a second one, cat.safetensors_001.safetensors (a
    mutation audit). A checkpoint of the earlier kind, recording "cat", still finds cat.safetensors."""
    _train(tmp_path, _config(), stop_after=2, name="cat.safetensors.safetensors")
    final, _ = _train(tmp_path, _config(), resume=True, name="cat.safetensors.safetensors")
    assert final.name == "cat.safetensors.safetensors"
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["cat.safetensors.safetensors"]
    assert load_lora(final).training["steps_done"] == 6
    _train(tmp_path, _config(), stop_after=2, name="cat")
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(), resume_from=tmp_path / ".checkpoints" / "cat.zerase-ckpt")
    trainer.checkpoint_meta[LORA_FILE] = "cat"  # as checkpoints recorded it before
    run = NamedRun.plan(tmp_path, "cat", _config(), True).attach(trainer)
    assert run.replaces_partial and run.lora == (tmp_path / "cat.safetensors").resolve()
