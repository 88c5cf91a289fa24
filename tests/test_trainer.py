"""Algorithm 1 end to end on a tiny diffusers Z-Image: learning, λ, resume, guards, bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import weakref
from dataclasses import replace

import pytest
import torch

from zerase_core import memory_fit
from zerase_core.config import OUT_OF_MEMORY, TOO_LITTLE_MEMORY, TrainConfig
from zerase_core.errors import ZEraseError
from zerase_core.lora import LoRAConfig
from zerase_core.lora_file import load_lora, save_lora
from zerase_core.objectives import loss_erase
from zerase_core.tiny import TinyZImageConfig, tiny_zimage_backend
from zerase_core.trainer import NonFiniteLoss, ZEraseTrainer

from device_errors import DEVICES, MESSAGES, NOT_OUT_OF_MEMORY, ran_out


def _config(**over):
    base = dict(
        concept="red",
        preserve=("blue",),
        templates=("a photo of a {} ball", "{} sky at night"),
        steps=30,
        height=64,
        width=64,
        sample_steps=4,
        lora=LoRAConfig(rank=4),
        checkpoint_every=10,
    )
    return TrainConfig(**(base | over))


def _fixed_erase_loss(trainer: ZEraseTrainer) -> float:
    """L_erase on a fixed batch (every erase prompt, fixed noise and σ) — a noise-free yardstick."""
    backend, pool = trainer.backend, trainer.prompts
    g = torch.Generator().manual_seed(123)
    n = len(pool.erase)
    x = torch.randn(n, *trainer.latent_shape, generator=g)
    sigma = torch.linspace(0.3, 0.9, n)
    with torch.no_grad():
        v_c, _ = backend.velocity(x, sigma, list(pool.erase), lora=False)
        v_u, _ = backend.velocity(x, sigma, [pool.uncond] * n, lora=False)
        v_s, _ = backend.velocity(x, sigma, list(pool.erase), lora=True)
    return float(loss_erase(v_s, v_u, v_c, trainer.config.eta))


def test_a_lora_trained_on_top_of_an_applied_one_learns_against_the_model_as_applied():
    """θ of Eq. 5 and Eq. 8 is the frozen model being erased. Trained on top of an erasure LoRA applied on the same
    backend (diffusers' and the toy's backends hold every LoRA on one gate), the teacher and the x_t pool switched
    every LoRA off and learned against the bare base: L_pr pulled the new LoRA towards undoing the applied erasure.
    At θ₀ (B = 0) the student is the model as applied, and so is the teacher now: the first step's L_pr is 0, as on a
    bare model; the applied LoRA stays as it was."""
    from zerase_core.apply import export_lora, install_lora

    donor = tiny_zimage_backend()
    donor_set = donor.install(LoRAConfig(rank=2))
    with torch.no_grad():
        for p in donor_set.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.5)
    backend = tiny_zimage_backend()
    applied = install_lora(backend, export_lora(donor_set, concept="blue", fingerprint=donor.fingerprint()))
    before = [p.clone() for p in applied.parameters()]
    result = ZEraseTrainer(backend, _config(steps=2)).run()
    assert result.history[0].pr < 1e-10 and result.history[1].pr > 0
    assert all(torch.equal(p, q) for p, q in zip(applied.parameters(), before))


def test_thirty_steps_lower_erase_loss_and_keep_lambda_valid():
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(lr=1e-2))
    before = _fixed_erase_loss(trainer)
    result = trainer.run()
    after = _fixed_erase_loss(trainer)
    assert after < 0.6 * before, (before, after)  # measured 0.32×: a run that learns half as well fails
    assert len(result.history) == 30 and result.completed
    assert all(r.lam >= 0 for r in result.history)
    assert all(math.isfinite(v) for r in result.history for v in (r.erase, r.attn, r.pr, r.lam))
    # B = 0 at θ₀: the student equals the teacher (up to float noise: the pool's teacher ran in other batches)
    assert result.history[0].pr < 1e-10
    assert any(r.lam > 0 for r in result.history)  # the constraint engaged at this learning rate
    assert result.lora.training["steps_done"] == 30 and result.lora.concept == "red"


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = ZEraseTrainer(tiny_zimage_backend(), _config(steps=12, checkpoint_every=5),
                         checkpoint_path=tmp_path / "a.ckpt")
    reference = full.run()

    first = ZEraseTrainer(tiny_zimage_backend(), _config(steps=5, checkpoint_every=5),
                          checkpoint_path=tmp_path / "b.ckpt")
    first.run()
    second = ZEraseTrainer(tiny_zimage_backend(), _config(steps=12, checkpoint_every=5),
                           checkpoint_path=tmp_path / "b.ckpt", resume_from=tmp_path / "b.ckpt")
    assert second.step == 5 and second.xt_pool is not None  # the pool, sampled after the checkpoint was read
    resumed = second.run()

    flat = lambda history: [v for r in history for v in (r.erase, r.attn, r.pr, r.lam)]  # noqa: E731
    assert flat(resumed.history) == pytest.approx(flat(reference.history), rel=1e-5, abs=1e-8)
    for key, (a, b) in reference.lora.factors.items():
        assert torch.allclose(resumed.lora.factors[key][0], a, atol=1e-6)
        assert torch.allclose(resumed.lora.factors[key][1], b, atol=1e-6)


def test_resuming_a_finished_command_line_run_samples_no_pool_and_trains_nothing(tmp_path, monkeypatch, caplog):
    """`train --resume` of a run with every step done sampled the whole x_t pool again (minutes on the real model)
    before finding nothing to train."""
    import zerase_core.trainer as trainer_module
    from zerase_core.run import PlannedRun, train_and_save

    config = _config(steps=3)
    done, _ = train_and_save(PlannedRun(tiny_zimage_backend(), config, tmp_path))
    (tmp_path / "curves.png").unlink()  # a file the user deleted is written again; the others stay as they were
    for f in tmp_path.iterdir():  # times no rewrite can land on, however coarse the file system's clock
        os.utime(f, ns=(1, 1))
    written = {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    monkeypatch.setattr(trainer_module, "TrajectoryPool", lambda *a, **k: pytest.fail("the pool was sampled again"))
    with caplog.at_level("INFO", logger="zerase_core.run"):
        again, path = train_and_save(PlannedRun(tiny_zimage_backend(), config, tmp_path, resume=True))
    assert "every one of its 3 steps is done; nothing to train" in caplog.text
    assert _flat(again.history) == _flat(done.history) and again.lora.training["steps_done"] == 3
    assert {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir() if f.name != "curves.png"} == written
    assert (tmp_path / "curves.png").exists()
    kept = load_lora(path)  # the file, as the finished run left it, and the LoRA the resumed run returns
    for key, (a, b) in done.lora.factors.items():
        for lora in (kept, again.lora):
            assert torch.equal(lora.factors[key][0], a) and torch.equal(lora.factors[key][1], b)
    # Files a stop left behind while they were written (a LoRA and history of an earlier step) are written again.
    save_lora(replace(kept, training=kept.training | {"steps_done": 2}), path)
    (tmp_path / "history.json").write_text(json.dumps(json.loads((tmp_path / "history.json").read_text())[:2]))
    train_and_save(PlannedRun(tiny_zimage_backend(), config, tmp_path, resume=True))
    assert load_lora(path).training["steps_done"] == 3
    assert len(json.loads((tmp_path / "history.json").read_text())) == 3
    (tmp_path / "history.json").write_text("[" * 100_000)  # damaged past JSON's limits: a RecursionError traceback
    train_and_save(PlannedRun(tiny_zimage_backend(), config, tmp_path, resume=True))
    assert len(json.loads((tmp_path / "history.json").read_text())) == 3


def _flat(history) -> list[float]:
    return [v for r in history for v in (r.erase, r.attn, r.pr, r.lam, r.sigma)]


def test_a_run_stopped_mid_step_resumes_into_the_run_an_uninterrupted_one_takes(tmp_path):
    """Out of memory in step 7's forward: the checkpoint then saved holds the state before step 7, random generators
    included (they had already drawn step 7's prompts and x_t), so the resumed run (here with gradient checkpointing
    on, as the README advises after running out of memory) takes the same steps as one never stopped."""
    reference = ZEraseTrainer(tiny_zimage_backend(), _config(steps=10, checkpoint_every=5)).run()

    backend = tiny_zimage_backend()
    trainer = ZEraseTrainer(backend, _config(steps=10, checkpoint_every=5, gradient_checkpointing="off"),
                            checkpoint_path=tmp_path / "a.ckpt")

    def out_of_memory(module, args):
        if torch.is_grad_enabled() and trainer.step == 6:
            raise ran_out()

    hook = backend.transformer.layers[-1].register_forward_pre_hook(out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.run()
    hook.remove()
    resumed = ZEraseTrainer(tiny_zimage_backend(), _config(steps=10, checkpoint_every=5, gradient_checkpointing="on"))
    resumed.resume(tmp_path / "a.ckpt")
    assert resumed.step == 6
    result = resumed.run()
    assert _flat(result.history) == pytest.approx(_flat(reference.history), rel=1e-5, abs=1e-8)


def test_ctrl_c_as_a_step_is_recorded_leaves_a_checkpoint_that_resumes_the_same_run(tmp_path, monkeypatch):
    """Ctrl-C after step 3's update, while its record was being made. First the step count had moved and the
    history not, and the checkpoint was refused as damaged on --resume; then (the step read off the history) the
    LoRA was a step ahead of the checkpoint's step, and the resumed run took one update too many (two reviews
    reproduced these). From the update to the record a Ctrl-C now waits: the run stops after step 3, and resumes
    into the run an uninterrupted one takes."""
    import signal

    import zerase_core.trainer as trainer_module

    reference = ZEraseTrainer(tiny_zimage_backend(), _config(steps=4)).run()
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=4, checkpoint_every=10),
                            checkpoint_path=tmp_path / "a.ckpt")
    record = trainer_module.StepRecord

    def interrupted(step, *values):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, between AdamW's update and the record
        return record(step, *values)

    monkeypatch.setattr(trainer_module, "StepRecord", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(trainer_module, "StepRecord", record)
    assert trainer.step == trainer.optimizer.state_dict()["state"][0]["step"] == 3  # the record and the update
    resumed = ZEraseTrainer(tiny_zimage_backend(), _config(steps=4, checkpoint_every=10))
    resumed.resume(tmp_path / "a.ckpt")
    result = resumed.run()
    assert _flat(result.history) == pytest.approx(_flat(reference.history), rel=1e-5, abs=1e-8)
    for key, (a, b) in reference.lora.factors.items():
        torch.testing.assert_close(result.lora.factors[key][0], a)
        torch.testing.assert_close(result.lora.factors[key][1], b)


def _out_of_memory_unless_checkpointing(trainer, from_step: int, where: str = "forward", device: str = "cuda",
                                       held: list | None = None):
    """A card too small to train without checkpointing from ``from_step`` on: the last layer's forward with
    gradients (or its backward) raises there unless every main layer is checkpointed, as ``device``'s allocator
    says it. The failed forward's input is kept by weak reference in the returned list; each error raised is
    appended to ``held`` where given (something that outlives the except clause holds it). The error is raised from
    a local, as code that keeps an error in a variable does: a reference cycle through the hook's frame, which the
    garbage collector, not the end of the except clause, would break."""
    backend, failed = trainer.backend, []
    transformer = backend.transformer

    def hook(module, *args):
        if (torch.is_grad_enabled() or where == "backward") and trainer.step + 1 >= from_step \
                and backend.checkpointed_layers < memory_fit.most_checkpointed(backend.n_layers):
            if where == "forward":
                failed.append(weakref.ref(args[0][0]))
            err = ran_out(device)
            if held is not None:
                held.append(err)
            raise err

    layer = transformer.layers[-1]
    register = layer.register_forward_pre_hook if where == "forward" else layer.register_full_backward_pre_hook
    return register(hook), failed


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_taken_again_has_the_failed_forwards_memory_even_where_its_error_is_held(device):
    """Before a step that ran out of memory is taken again, the failed forward's tensors are freed even where its
    error outlives the except clause (a debugger, a log handler, a reference cycle: a test run on Python 3.12 and
    torch 2.11 kept them there with MPS's plain RuntimeError): the retry needs their room."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=5))
    held = []
    hook, failed = _out_of_memory_unless_checkpointing(trainer, 4, "forward", device, held)
    start = trainer.checkpointing.start
    freed_at_retry = []
    trainer.checkpointing.start = lambda *a: (freed_at_retry.extend(ref() is None for ref in failed), start(*a))
    trainer.run()
    hook.remove()
    assert len(held) == 1 and freed_at_retry == [True]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_auto_checkpointing_takes_a_step_that_ran_out_of_memory_again_with_checkpointing(where, device, caplog):
    """gradient_checkpointing="auto" (the default) trains without checkpointing until a step runs out of memory (in
    its forward, or in its backward, where the graph is half consumed), then takes that step again with it and keeps
    it: the run is the one that never ran out (checkpointing gives the same gradients; the failed step left no
    trace). MPS and the CPU say it with a plain RuntimeError, which gets the same answer."""
    config = _config(steps=8, lr=1e-2)
    assert config.gradient_checkpointing == "auto"
    reference = ZEraseTrainer(tiny_zimage_backend(), config).run()

    backend = tiny_zimage_backend()
    trainer = ZEraseTrainer(backend, config)
    assert trainer.checkpointing.from_step is None and backend.checkpointed_layers == 0
    hook, failed = _out_of_memory_unless_checkpointing(trainer, 4, where, device)
    start = trainer.checkpointing.start
    freed_at_retry = []
    trainer.checkpointing.start = lambda *a: (freed_at_retry.extend(ref() is None for ref in failed), start(*a))
    result = trainer.run()
    hook.remove()
    # The failed forward's activations are freed before the step is taken again, not held by its traceback.
    assert freed_at_retry == ([True] if where == "forward" else [])
    assert trainer.checkpointing.from_step == 4
    assert backend.checkpointed_layers == memory_fit.most_checkpointed(backend.n_layers) == 1  # of 2: not the last
    assert trainer.checkpointing.reason == OUT_OF_MEMORY and "Out of memory on cpu at step 4" in caplog.text
    assert len(result.history) == 8 and [r.step for r in result.history] == list(range(1, 9))
    assert _flat(result.history) == pytest.approx(_flat(reference.history), rel=1e-5, abs=1e-8)
    for mine, theirs in zip(result.lora.factors.values(), reference.lora.factors.values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_auto_checkpointing_is_kept_by_a_resumed_run_that_ran_out_of_memory(tmp_path):
    """A run that ran out of memory without checkpointing records so in its checkpoint: resumed under "auto" it
    checkpoints from its first step, instead of running out once more, and still says from which step and why. A run
    that never switched resumes without it (and decides again at its first step)."""
    switched = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6), checkpoint_path=tmp_path / "a.ckpt")
    hook, _ = _out_of_memory_unless_checkpointing(switched, 2)
    for _ in range(3):
        switched.train_step()
    hook.remove()
    switched.save_checkpoint()
    plain = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6), checkpoint_path=tmp_path / "b.ckpt")
    plain.train_step()
    plain.save_checkpoint()
    for name, on in (("a.ckpt", True), ("b.ckpt", False)):
        resumed = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6))
        resumed.resume(tmp_path / name)
        assert resumed.backend.checkpointed_layers == (memory_fit.most_checkpointed(2) if on else 0)
        assert (resumed.checkpointing.from_step, resumed.checkpointing.reason) == \
            ((2, OUT_OF_MEMORY) if on else (None, None))
    off = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6, gradient_checkpointing="off"))
    off.resume(tmp_path / "a.ckpt")  # "off" is the user's word, whatever the run needed before
    assert off.backend.checkpointed_layers == 0
    # A run the estimate put on checkpointing decides again when resumed (on another card, or with more free).
    estimated = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6), checkpoint_path=tmp_path / "c.ckpt")
    estimated.checkpointing.start(TOO_LITTLE_MEMORY, 1)
    estimated.train_step()
    estimated.save_checkpoint()
    again = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6))
    again.resume(tmp_path / "c.ckpt")
    decided = []
    again.checkpointing.estimate = lambda shape, step: decided.append(again.step)
    again.train_step()
    assert decided == [1] and again.checkpointing.from_step is None


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_memory_inside_adamws_update_is_not_retried_and_the_last_checkpoint_resumes_exactly(device, tmp_path):
    """AdamW's update is not undone (but under the paired rule): a step that ran out of memory inside it may have
    moved part of the LoRA, and taking it again would move it twice. It fails as it is, under "auto" too, and saves
    nothing: the checkpoint of the step before stays, and resuming it ends where an uninterrupted run ends (a
    checkpoint saved at the failure held the half-applied update and resumed 0.011 away)."""
    config = _config(steps=4, checkpoint_every=1, lr=1e-2)
    reference = ZEraseTrainer(tiny_zimage_backend(), config).run()
    trainer = ZEraseTrainer(tiny_zimage_backend(), config, checkpoint_path=tmp_path / "c.ckpt")
    trainer.train_step()
    trainer.save_checkpoint()
    real = trainer.optimizer.step

    def half_done(*args, **kwargs):
        real(*args, **kwargs)
        raise ran_out(device)

    trainer.optimizer.step = half_done
    with pytest.raises(torch.OutOfMemoryError):
        trainer.run()
    assert trainer.checkpointing.from_step is None and trainer.step == 1 and not trainer.has_progress()
    resumed = ZEraseTrainer(tiny_zimage_backend(), config)
    resumed.resume(tmp_path / "c.ckpt")
    assert resumed.step == 1
    result = resumed.run()
    for key, (a, b) in reference.lora.factors.items():
        torch.testing.assert_close(result.lora.factors[key][0], a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result.lora.factors[key][1], b, rtol=1e-5, atol=1e-7)


def test_a_runtime_error_that_is_not_out_of_memory_is_raised_as_it_is_and_not_retried():
    """Only an allocator's words make a RuntimeError out of memory: any other failure of a step (a shape, a kernel)
    is raised unchanged, and auto does not take the step again with checkpointing."""
    backend = tiny_zimage_backend()
    trainer = ZEraseTrainer(backend, _config(steps=3))
    failure = RuntimeError("mat1 and mat2 shapes cannot be multiplied (simulated)")

    def fails(module, args):
        if torch.is_grad_enabled():
            raise failure

    hook = backend.transformer.layers[-1].register_forward_pre_hook(fails)
    with pytest.raises(RuntimeError) as raised:
        trainer.train_step()
    hook.remove()
    assert raised.value is failure and backend.checkpointed_layers == 0 and trainer.checkpointing.from_step is None


def _free_for(layers: int) -> int:
    """Memory free in which auto must checkpoint ``layers`` of the tiny model's 2 main layers at _config's step
    (16 image tokens, 3 rows of the longest caption, width 64, fp32 on the CPU): the peak of that many, with the
    margin, and a byte."""

    caption, tiny = memory_fit.PAD, TinyZImageConfig()  # every _config caption pads to 32 tokens
    per_layer = memory_fit.step_bytes(16, caption, 3, tiny.n_layers, tiny.dim, 4) / tiny.n_layers
    kept = memory_fit.layer_input_bytes(16, caption, 3, tiny.dim, 4)
    return int(memory_fit.peak_bytes(tiny.n_layers, layers, per_layer, kept) * memory_fit.MARGIN) + 1


@pytest.mark.parametrize("checkpointed", [0, 1, None])  # None: nothing fits
def test_auto_checkpointing_decides_before_the_first_step_by_the_memory_free(checkpointed, monkeypatch, caplog):
    """Running out of memory is not a sign everywhere: on Windows NVIDIA's driver spills to system memory instead and
    the step just runs slowly. So auto compares the step's estimated activations with the GPU memory free before the
    first step (the model loaded first), and checkpoints from the start as few main layers as let them fit."""

    caplog.set_level("INFO", logger="zerase_core")
    asked = []
    free = _free_for(checkpointed) if checkpointed is not None else 1024  # nothing fits: as many as "on"
    monkeypatch.setattr(memory_fit, "available_bytes", lambda device: asked.append(device) or free)
    estimated, real_estimate = [], memory_fit.step_bytes
    monkeypatch.setattr(memory_fit, "step_bytes", lambda *a: estimated.append(a) or real_estimate(*a))
    backend = tiny_zimage_backend()
    loads = []
    backend.load = lambda: loads.append(1)
    trainer = ZEraseTrainer(backend, _config(steps=2))
    assert trainer.checkpointing.from_step is None and not asked  # decided at the first step, not before
    trainer.run()
    assert len(asked) == 1 and loads == [1]  # once, with the model loaded
    # What is estimated: 64² is 4×8×8 latent cells, 16 image tokens of 2×2; the longest caption; the three rows
    # [c_er, ∅, c_pr]; the model's layers and width; 4 bytes per activation (the tiny model computes in fp32).
    caption = max(p.n_tokens for p in (*trainer.prompts.erase, trainer.prompts.uncond, *trainer.prompts.keep))
    assert estimated == [(16, caption, 3, 2, 64, 4)] and caption <= 32  # as _free_for takes it
    expected = memory_fit.most_checkpointed(2) if checkpointed is None else checkpointed
    assert backend.checkpointed_layers == expected
    assert (trainer.checkpointing.from_step, trainer.checkpointing.reason) == \
        ((1, TOO_LITTLE_MEMORY) if expected else (None, None))
    assert (f"checkpointing {expected} of 2 main layers from the start" in caplog.text) == bool(expected)
    # nothing fits even checkpointed: said before the step that swaps or fails
    assert ("even with gradient checkpointing" in caplog.text) == (checkpointed is None)


def test_auto_checkpointing_on_a_cpu_decides_by_the_system_memory_available(monkeypatch):
    """A CPU run past the memory available swaps, or the system stops it (ComfyUI's server with it): auto checkpoints
    there too, by what the system says is available."""

    free = _free_for(1)
    monkeypatch.setattr(memory_fit.psutil, "virtual_memory", lambda: type("Memory", (), {"available": free}))
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=1))
    assert trainer.backend.device.type == "cpu"
    trainer.run()
    assert trainer.backend.checkpointed_layers == 1
    assert (trainer.checkpointing.from_step, trainer.checkpointing.reason) == (1, TOO_LITTLE_MEMORY)


def test_out_of_memory_with_part_of_the_layers_checkpointed_checkpoints_as_many_as_on(caplog):
    """An estimate that was short for a partial plan: the step that ran out is taken again with as many layers
    checkpointed as "on" checkpoints (all but the last), from then on (the curves' title and a resumed run take that
    step); the run is the one that never ran out. Three layers: 1 checkpointed, then 2."""
    config = _config(steps=6, lr=1e-2)
    reference = ZEraseTrainer(tiny_zimage_backend(TinyZImageConfig(n_layers=3)), config).run()
    backend = tiny_zimage_backend(TinyZImageConfig(n_layers=3))
    trainer = ZEraseTrainer(backend, config)
    trainer.checkpointing.estimate = lambda shape, step: trainer.checkpointing.start(TOO_LITTLE_MEMORY, step, layers=1)
    hook, _ = _out_of_memory_unless_checkpointing(trainer, 3)
    result = trainer.run()
    hook.remove()
    assert backend.checkpointed_layers == 2
    assert "with 1 of 3 main layers checkpointed; taking it again with 2" in caplog.text
    assert (trainer.checkpointing.from_step, trainer.checkpointing.reason) == (3, OUT_OF_MEMORY)
    assert _flat(result.history) == pytest.approx(_flat(reference.history), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_out_of_memory_is_raised_when_checkpointing_is_not_auto(mode):
    """off: the user said never, so the step fails as it is; on: checkpointing already ran, nothing is left to try."""
    backend = tiny_zimage_backend()
    trainer = ZEraseTrainer(backend, _config(steps=3, gradient_checkpointing=mode))
    assert (trainer.checkpointing.from_step == 1) == (mode == "on")

    def always(module, args):
        if torch.is_grad_enabled():
            raise ran_out()

    backend.transformer.layers[-1].register_forward_pre_hook(always)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train_step()
    assert trainer.step == 0 and backend.checkpointed_layers == (1 if mode == "on" else 0)  # on: all but the last


def test_checkpointing_settings_of_older_files_read_as_on_and_off():
    """Checkpoints and LoRAs written before "auto" stored a bool; a bool from a caller is refused by name."""
    saved = _config().to_dict()
    for stored, read in ((True, "on"), (False, "off")):
        assert TrainConfig.from_dict(saved | {"gradient_checkpointing": stored}).gradient_checkpointing == read
    with pytest.raises(ZEraseError, match="gradient_checkpointing must be a str; got bool True"):
        _config(gradient_checkpointing=True)


def test_a_paired_step_failing_after_its_update_is_undone():
    """The paired rule measures L_pr again after the update; out of memory there finds the LoRA and AdamW already
    moved. The step is undone (LoRA, AdamW's state, λ, the random generators), so trying it again continues the run an
    uninterrupted one takes."""
    config = _config(steps=6, lr=1e-2, lambda_mode="paired")
    reference = ZEraseTrainer(tiny_zimage_backend(), config).run()
    trainer = ZEraseTrainer(tiny_zimage_backend(), config)
    for _ in range(3):
        trainer.train_step()
    stepped, real_step, real_pr = [], trainer.optimizer.step, trainer._pr_loss

    def pr_loss_after_the_update(*args):
        if stepped:
            raise ran_out()
        return real_pr(*args)

    trainer.optimizer.step = lambda *a: (real_step(*a), stepped.append(1))[0]
    trainer._pr_loss = pr_loss_after_the_update
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train_step()
    assert stepped and trainer.step == 3
    del trainer.optimizer.step, trainer._pr_loss
    while trainer.step < config.steps:
        trainer.train_step()
    assert _flat(trainer.history) == pytest.approx(_flat(reference.history), rel=1e-6, abs=1e-9)
    for key, (a, b) in reference.lora.factors.items():
        ours = trainer.export().factors[key]
        assert torch.allclose(ours[0], a, atol=1e-7) and torch.allclose(ours[1], b, atol=1e-7)


def test_a_paired_step_whose_l_pr_is_not_finite_around_its_update_is_refused_and_undone():
    """The paired rule's L_pr before and after the update were taken unchecked: a NaN there was kept as its pair, the
    next g̃ was NaN, max(0, λ − β·NaN) set λ to 0 without a word, and every later checkpoint was refused as damaged
    (a review). The step is refused as a non-finite one, and undone: LoRA, AdamW, λ."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6, lr=1e-2, lambda_mode="paired"))
    for _ in range(3):
        trainer.train_step()
    factors = {k: (a.clone(), b.clone()) for k, (a, b) in trainer.export().factors.items()}
    lam, moments = trainer.lambda_rule.state(), copy.deepcopy(trainer.optimizer.state_dict())
    real_step, real_pr, stepped = trainer.optimizer.step, trainer._pr_loss, []
    trainer.optimizer.step = lambda *a: (real_step(*a), stepped.append(1))[0]
    trainer._pr_loss = lambda *a: real_pr(*a) * float("nan") if stepped else real_pr(*a)
    with pytest.raises(NonFiniteLoss, match="L_pr after it=nan"):
        trainer.train_step()
    assert stepped and trainer.step == 3 and trainer.lambda_rule.state() == lam
    assert all(torch.equal(a, factors[k][0]) and torch.equal(b, factors[k][1])
               for k, (a, b) in trainer.export().factors.items())
    state = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], moments["state"][i]["exp_avg"]) for i in state)


def test_a_ctrl_c_held_during_an_update_that_then_runs_out_of_memory_stops_the_run():
    """Ctrl-C pressed during the paired rule's update is held back until the step's record; when the forward after
    the update then ran out of memory, the step was undone and taken again with every layer checkpointed (auto), and
    the Ctrl-C was lost: the run went on to its end (a review). The undone step now stops the run instead."""
    import signal

    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6, lambda_mode="paired",
                                                           gradient_checkpointing="auto"))
    for _ in range(2):
        trainer.train_step()
    factors = {k: a.clone() for k, (a, _) in trainer.export().factors.items()}
    real_step, real_pr, stepped = trainer.optimizer.step, trainer._pr_loss, []

    def step_with_ctrl_c(*args):
        signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, held back from here to the step's record
        stepped.append(1)
        return real_step(*args)

    trainer.optimizer.step = step_with_ctrl_c
    trainer._pr_loss = lambda *a: (_ for _ in ()).throw(ran_out()) if stepped else real_pr(*a)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_step()
    assert stepped == [1] and trainer.step == 2  # not taken again
    assert all(torch.equal(a, factors[k]) for k, (a, _) in trainer.export().factors.items())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Where nothing would take the step again (checkpointing on), out of memory keeps its own message and advice.
    trainer.checkpointing.can_retry = lambda: False
    stepped.clear()
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train_step()


def test_no_grad_preservation_changes_no_update(monkeypatch):
    """L_pr without a graph while λ_t = 0 (recomputed when λ turns > 0) = always back-propagating it."""
    runs = []
    for always_batched in (False, True):
        trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=12, lr=1e-2))
        if always_batched:
            monkeypatch.setattr(trainer.lambda_rule, "needs_pr_gradient", lambda: True)
        runs.append(trainer.run())
    ours, batched = runs
    assert [r.lam for r in ours.history] == pytest.approx([r.lam for r in batched.history], rel=1e-4, abs=1e-8)
    assert any(r.lam > 0 for r in ours.history)
    assert sum(r.pr_recomputed for r in ours.history) >= 1  # the recompute path ran, and changed nothing
    # batch-1 vs batch-3 forwards differ in the last float bits; 12 AdamW steps at lr 1e-2 carry
    # that to ~2e-5 (factors are ~1e-1), far below any real difference of update rule
    for key, (a, b) in batched.lora.factors.items():
        assert torch.allclose(ours.lora.factors[key][0], a, atol=1e-4)
        assert torch.allclose(ours.lora.factors[key][1], b, atol=1e-4)


def test_resume_refuses_other_settings(tmp_path):
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=tmp_path / "c.ckpt").run()
    other = ZEraseTrainer(tiny_zimage_backend(), _config(steps=4, eta=5.0))
    with pytest.raises(ZEraseError, match="different settings"):
        other.resume(tmp_path / "c.ckpt")


def test_resume_takes_execution_settings_and_refuses_steps_already_passed(tmp_path):
    """Out of memory mid-run, the README's answer is gradient checkpointing: the run must continue with it on. A
    checkpoint past the run's steps is refused (the loop would not run and the LoRA would be past its steps)."""
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=tmp_path / "c.ckpt").run()
    on = ZEraseTrainer(tiny_zimage_backend(), _config(steps=3, gradient_checkpointing="on", checkpoint_every=1))
    on.resume(tmp_path / "c.ckpt")
    assert on.step == 2 and on.run().lora.training["steps_done"] == 3
    with pytest.raises(ZEraseError, match=r"past this run's 1 steps; set the steps \(--steps\) to 2 or more"):
        ZEraseTrainer(tiny_zimage_backend(), _config(steps=1)).resume(tmp_path / "c.ckpt")


def test_a_run_that_fails_before_its_first_step_leaves_no_checkpoint(tmp_path, monkeypatch):
    """Out of memory at step 1 (say): a step-0 checkpoint holds nothing to resume, and kept it would make the next
    run with resume off refuse to replace it."""
    def out_of_memory(self):
        raise RuntimeError("CUDA out of memory")

    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=3), checkpoint_path=tmp_path / "c.ckpt")
    monkeypatch.setattr(ZEraseTrainer, "train_step", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.run()
    assert not (tmp_path / "c.ckpt").exists()


def test_the_partial_lora_of_a_resumed_run_is_found_and_no_other(tmp_path):
    """A run stopped at step 2 saved a checkpoint and a LoRA; the resumed run's finished LoRA replaces that file,
    also when the file is from an earlier stop of the same run (killed after a later checkpoint, nothing saved).
    Another run's LoRA (other settings, a later step, not ours at all) must never be taken for it."""
    from zerase_core.run_files import partial_lora

    stopped = ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=tmp_path / "p.ckpt")
    save_lora(stopped.run().lora, tmp_path / "mine.safetensors")
    save_lora(ZEraseTrainer(tiny_zimage_backend(), _config(steps=2, eta=5.0)).run().lora, tmp_path / "eta.safetensors")
    save_lora(ZEraseTrainer(tiny_zimage_backend(), _config(steps=3)).run().lora, tmp_path / "later.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    resumed = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6))
    resumed.resume(tmp_path / "p.ckpt")
    others = [tmp_path / f"{n}.safetensors" for n in ("junk", "eta", "later")]
    assert partial_lora(resumed, [*others, tmp_path / "mine.safetensors"]) == tmp_path / "mine.safetensors"
    assert partial_lora(resumed, others) is None
    save_lora(ZEraseTrainer(tiny_zimage_backend(), _config(steps=1)).run().lora, tmp_path / "earlier.safetensors")
    assert partial_lora(resumed, [tmp_path / "earlier.safetensors"]) == tmp_path / "earlier.safetensors"
    fresh = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6))  # not resumed: step 0 matches no stopped run
    assert partial_lora(fresh, [tmp_path / "mine.safetensors"]) is None


def test_a_file_recording_no_step_done_or_a_step_that_is_no_count_is_no_partial_lora(tmp_path):
    """The partial file a resumed run replaces holds at least one step of it, counted as a whole number: a file of the
    same settings recording 0 steps done (no stopped run writes one) or a count edited to 2.0 or "2" is another
    file, kept; only the stopped run's own is replaced."""
    import dataclasses

    from zerase_core.run_files import partial_lora

    stopped = ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=tmp_path / "p.ckpt")
    lora = stopped.run().lora
    save_lora(lora, tmp_path / "mine.safetensors")
    for name, done in (("none", 0), ("float", 2.0), ("text", "2")):
        edited = dataclasses.replace(lora, training=lora.training | {"steps_done": done})
        save_lora(edited, tmp_path / f"{name}.safetensors")
    resumed = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6))
    resumed.resume(tmp_path / "p.ckpt")
    for name in ("none", "float", "text"):
        assert partial_lora(resumed, [tmp_path / f"{name}.safetensors"]) is None, name
    assert partial_lora(resumed, [tmp_path / "mine.safetensors"]) == tmp_path / "mine.safetensors"


def test_exact_and_fixed_modes_run():
    for mode in ("exact", "fixed"):
        result = ZEraseTrainer(tiny_zimage_backend(), _config(steps=3, lambda_mode=mode, fixed_lambda=0.5)).run()
        assert all(math.isfinite(r.erase) for r in result.history)
        if mode == "fixed":
            assert all(r.lam == 0.5 for r in result.history)


@pytest.mark.parametrize("mode", ["fixed", "paper"])
def test_the_update_is_l_er_plus_lambda_l_pr_whichever_way_l_pr_was_computed(mode):
    """Algorithm 1's L_total = L_erase + w·L_attn + λ L_pr, checked term by term. fixed (λ = 0.5): L_pr from the
    batched student forward; paper with λ_t = 0 turning > 0 within the step: L_pr recomputed with a graph. Both ways
    the gradient handed to AdamW is ∇(L_erase + w·L_attn) + λ∇L_pr, each taken here on its own."""
    from zerase_core.objectives import loss_er

    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, lambda_mode=mode, fixed_lambda=0.5))
    with torch.no_grad():  # off B = 0, where ∇L_pr = 0 whatever λ does
        for p in trainer.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if mode == "paper":
        trainer.lambda_rule.previous_pr = 0.0  # L_pr rose from 0: g̃ < 0, so λ_{t+1} > 0 although λ_t = 0
    pool, w = trainer.prompts, trainer.config.attn_weight
    x_t = torch.randn(1, *trainer.latent_shape, generator=torch.Generator().manual_seed(1))
    step = trainer._losses(pool.erase[0], list(pool.erase_tokens[0]), pool.keep[0], x_t, torch.tensor([0.6]))
    assert step.pr.requires_grad == (mode == "fixed") and step.attn.item() > 0

    def grad(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainer.params, retain_graph=True)])

    g_er = grad(step.erase + w * step.attn)
    g_pr = grad(step.pr if step.pr.requires_grad else trainer._pr_loss(step.pr_batch))
    assert not torch.allclose(g_er, grad(step.erase), atol=1e-7)  # L_attn moves the update: a lost term shows
    lam, recomputed = trainer._backward(loss_er(step.erase, step.attn, w), step.pr, step.pr.item(), step.pr_batch)
    assert recomputed == (mode == "paper") and (lam == 0.5 if mode == "fixed" else lam > 0.01)
    applied = torch.cat([p.grad.reshape(-1) for p in trainer.params])
    assert torch.allclose(applied, g_er + lam * g_pr, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(applied, g_er, rtol=1e-3, atol=1e-7)  # λ L_pr is a visible part of it


def test_exact_mode_steps_along_eq_11_with_the_eq_12_lambda():
    """The gradient handed to AdamW is ∇L_er + λ*∇L_pr with λ* of Eq. 12, from gradients taken here separately."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, lambda_mode="exact", epsilon=1e-6))
    with torch.no_grad():  # off B = 0, where ∇L_pr = 0 and λ* is 0 whatever the wiring
        for p in trainer.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pool, eps = trainer.prompts, trainer.config.eps
    x_t = torch.randn(1, *trainer.latent_shape, generator=torch.Generator().manual_seed(1))
    args = (pool.erase[0], list(pool.erase_tokens[0]), pool.keep[0], x_t, torch.tensor([0.6]))

    def losses():
        step = trainer._losses(*args)
        return step.erase + trainer.config.attn_weight * step.attn, step.pr, step.pr.item(), step.pr_batch

    l_er, l_pr, _, _ = losses()
    g_er = torch.cat([g.reshape(-1) for g in torch.autograd.grad(l_er, trainer.params, retain_graph=True)]).double()
    g_pr = torch.cat([g.reshape(-1) for g in torch.autograd.grad(l_pr, trainer.params)]).double()
    lam_star = float((-g_er @ g_pr - eps) / (g_pr @ g_pr))
    assert lam_star > 0.1  # the constraint is active here, so a λ that is ignored or mis-signed shows
    lam, _ = trainer._backward(*losses())
    applied = torch.cat([p.grad.reshape(-1) for p in trainer.params]).double()
    assert lam == pytest.approx(lam_star, rel=1e-4)
    assert torch.allclose(applied, g_er + lam_star * g_pr, rtol=1e-4, atol=1e-9)
    assert float(g_pr @ applied) == pytest.approx(-eps, abs=1e-8)  # Eq. 9 holds with equality (KKT)


def test_nan_in_a_loss_stops_without_a_broken_lora(tmp_path, monkeypatch):
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6), checkpoint_path=tmp_path / "n.ckpt")
    for _ in range(3):
        trainer.train_step()
    good = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in trainer.lora.factors().items()}
    import zerase_core.trainer as trainer_module

    real = trainer_module.loss_pr
    monkeypatch.setattr(trainer_module, "loss_pr", lambda *a: real(*a) * float("nan"))
    with pytest.raises(NonFiniteLoss, match="non-finite value at step 4"):
        trainer.run()
    for key, (a, b) in trainer.lora.factors().items():
        assert torch.equal(a, good[key][0]) and torch.equal(b, good[key][1])
    saved = save_lora(trainer.export(), tmp_path / "ok.safetensors")
    assert all(torch.isfinite(t).all() for ab in load_lora(saved).factors.values() for t in ab)


def _nan_loss(backend, monkeypatch):
    import zerase_core.trainer as trainer_module

    real = trainer_module.loss_pr
    monkeypatch.setattr(trainer_module, "loss_pr", lambda *a: real(*a) * float("nan"))
    return NonFiniteLoss


def _out_of_memory_in_the_last_layer(backend, monkeypatch):
    def out_of_memory(module, args):
        if torch.is_grad_enabled():  # the student's forward; sampling and the teacher run without gradients
            raise ran_out()

    backend.transformer.layers[-1].register_forward_pre_hook(out_of_memory)
    return torch.OutOfMemoryError


@pytest.mark.parametrize("stop", [_nan_loss, _out_of_memory_in_the_last_layer], ids=["nan-loss", "oom-mid-forward"])
def test_a_step_stopped_before_backward_holds_nothing_under_checkpointing(stop, monkeypatch):
    """A step stopped at a NaN loss never runs backward; out of memory in a later layer stops the forward itself,
    after earlier layers recorded their masses. Under gradient checkpointing the graph holds what its layers replay;
    were that the recorder holding the masses, the graph would hold itself through autograd's nodes, where the
    garbage collector cannot see, and the step's activations and the model would stay in memory until the process
    ended (in ComfyUI: VRAM held after the node failed)."""
    import gc
    import weakref

    backend = tiny_zimage_backend()
    model = weakref.ref(backend.transformer)
    error = stop(backend, monkeypatch)
    trainer = ZEraseTrainer(backend, _config(steps=6, gradient_checkpointing="on"))
    with pytest.raises(error):
        trainer.train_step()
    del trainer, backend
    gc.collect()
    assert model() is None


def test_nan_gradient_leaves_lora_lambda_and_step_as_they_were():
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6, lr=1e-2))
    for _ in range(3):
        trainer.train_step()
    assert trainer.lambda_rule.value > 0  # λ moves on a good step at this learning rate, so a moved λ would show
    lam, factors = trainer.lambda_rule.state(), [p.detach().clone() for p in trainer.params]
    trainer.params[0].register_hook(lambda g: torch.full_like(g, float("nan")))  # finite losses, NaN gradient
    with pytest.raises(NonFiniteLoss, match="step 4"):
        trainer.train_step()
    assert trainer.lambda_rule.state() == lam and trainer.step == 3
    assert all(torch.equal(p, f) for p, f in zip(trainer.params, factors))
    assert all(p.grad is None for p in trainer.params)


def test_cancel_keeps_a_loadable_checkpoint(tmp_path):
    run = {}  # Cancel after step 4 (should_stop is also asked while the x_t pool is sampled, before run exists)
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=20), checkpoint_path=tmp_path / "k.ckpt",
                            should_stop=lambda: "trainer" in run and run["trainer"].step >= 4)
    run["trainer"] = trainer
    result = trainer.run()
    assert not result.completed and len(result.history) == 4
    again = ZEraseTrainer(tiny_zimage_backend(), _config(steps=20))
    again.resume(tmp_path / "k.ckpt")
    assert again.step == 4
    for (a, b), (a2, b2) in zip(trainer.lora.factors().values(), again.lora.factors().values()):
        assert torch.equal(a, a2) and torch.equal(b, b2)  # the resumed run starts from the cancelled one's LoRA


def test_a_cancelled_run_keeps_its_x_t_pool_and_a_finished_one_frees_it():
    """A cancelled run may be run on, from its pool; a finished one draws no x_t again, so its pool (about 1 GB of
    host memory at 1024²) is freed before what follows, the node's previews."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=4))
    trainer.should_stop = lambda: trainer.step == 2  # Cancel after step 2
    pool = weakref.ref(trainer.xt_pool)
    assert not trainer.run().completed and trainer.xt_pool is pool()
    trainer.should_stop = None
    assert trainer.run().completed and trainer.step == 4
    assert trainer.xt_pool is None and pool() is None  # no reference left anywhere, not only the trainer's


def test_gradient_checkpointing_gives_the_same_gradients():
    grads, runs = [], []
    for ckpt in ("off", "on"):
        config = _config(steps=1, gradient_checkpointing=ckpt, lambda_mode="fixed")
        trainer = ZEraseTrainer(tiny_zimage_backend(), config)
        with torch.no_grad():
            for p in trainer.params:
                p.add_(0.05)
        prompts = trainer.prompts
        losses = trainer._losses(prompts.erase[0], list(prompts.erase_tokens[0]), prompts.keep[0])
        layer = trainer.backend.transformer.layers[0]
        calls = []
        handle = layer.register_forward_pre_hook(lambda m, a: calls.append(1))
        (losses.erase + losses.attn + losses.pr).backward()  # with checkpointing, backward runs each main layer again
        handle.remove()
        runs.append(len(calls))
        grads.append(torch.cat([p.grad.reshape(-1) for p in trainer.params]))
    assert runs[0] == 0 and runs[1] >= 1  # checkpointing really recomputed (a no-op switch would give 0)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ZEraseError, match="concept is empty"):
        _config(concept="  ")
    with pytest.raises(ZEraseError, match="does not occur in the prompt"):
        ZEraseTrainer(tiny_zimage_backend(), _config(concept="red", templates=("a photo of a cat",)))
    with pytest.raises(ZEraseError, match="preset"):
        _config(preset="nudity-ish")
    with pytest.raises(ZEraseError, match="both the concept to erase and a preservation concept"):
        _config(concept="red", preserve=("blue", " Red"))


def test_text_encoder_is_released_before_the_lora_and_the_x_t_pool_take_memory(monkeypatch):
    """On the real model the encoder is 8 GB beside 12.3 GB of transformer: it goes as soon as the prompts are
    encoded, before anything else runs on the GPU."""
    backend = tiny_zimage_backend()
    events = []
    real_release, real_velocity, real_install = backend.release_encoder, backend.velocity, backend.install
    monkeypatch.setattr(backend, "release_encoder", lambda: events.append("release") or real_release())
    monkeypatch.setattr(backend, "velocity", lambda *a, **kw: events.append("forward") or real_velocity(*a, **kw))
    monkeypatch.setattr(backend, "install", lambda *a, **kw: events.append("install") or real_install(*a, **kw))
    trainer = ZEraseTrainer(backend, _config(steps=2, xt_source="pool", xt_pool=2), release_encoder=True)
    assert events[:2] == ["release", "install"] and events.count("release") == 1 and "forward" in events
    assert backend.encoder is None
    assert trainer.run().completed  # training never needs the encoder again
    with pytest.raises(RuntimeError, match="released"):
        backend.encode(["red"])


def test_paired_lambda_measures_the_update_not_the_batch_change():
    """g̃ of the paired rule is L_pr's change on one batch (≈ ∇L_pr·d, Eq. 14), while the paper rule's
    difference of consecutive batches carries the batches' own L_pr difference / α."""
    spread = {}
    for mode in ("paper", "paired"):
        trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=10, lr=1e-4, lambda_mode=mode))
        torch.manual_seed(0)
        with torch.no_grad():
            for p in trainer.params:  # a LoRA that already changes L_pr, so batches differ
                p.normal_(0, 0.2)
        steps = trainer.run().history
        assert all(math.isfinite(r.lam) and r.lam >= 0 for r in steps)
        spread[mode] = max(abs(r.g - trainer.config.eps) for r in steps[1:])
    # measured 0.027 (paired 3.08 vs paper 115.8): 0.1 leaves a 3.7× margin and still fails a rule reading batches apart
    assert spread["paired"] < 0.1 * spread["paper"]


def test_paired_pair_is_measured_by_one_call_shape(monkeypatch):
    """With λ_t > 0 the step's L_pr comes from the batched mass-recording call; the pair handed to the paired rule
    must still be two _pr_loss values (before and after the update), not one of each kind."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=2, lambda_mode="paired"))
    trainer.lambda_rule.value = 0.5  # λ_t > 0: the batched path
    values, pairs = [], []
    real = trainer._pr_loss
    monkeypatch.setattr(trainer, "_pr_loss", lambda *a: values.append(real(*a)) or values[-1])
    monkeypatch.setattr(trainer.lambda_rule, "observe", lambda before, after: pairs.append((before, after)))
    trainer.train_step()
    assert len(values) == 2 and pairs == [(values[0].item(), values[1].item())]


def test_same_seed_same_run_whatever_the_global_rng():
    """LoRA A's random init comes from the run's seed: two runs agree bit for bit even when something else
    drew from torch's global RNG in between (the demo's results once varied from run to run because of it)."""
    runs = []
    for global_seed in (1, 2):
        backend = tiny_zimage_backend()  # seeds the global RNG itself, to build the model
        torch.manual_seed(global_seed)
        runs.append(ZEraseTrainer(backend, _config(steps=2)).run())
    for key, (a, b) in runs[0].lora.factors.items():
        assert torch.equal(runs[1].lora.factors[key][0], a) and torch.equal(runs[1].lora.factors[key][1], b)
    other = ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, seed=1))
    assert not torch.equal(next(iter(other.lora.parameters())), next(iter(runs[0].lora.factors.values()))[0])


def test_fresh_x_t_is_sampled_by_the_model_being_trained():
    """ESD and the official code sample x_t with the LoRA on (on-policy); the targets stay the frozen model's."""
    from zerase_core.sampling import euler

    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="fresh"))
    with torch.no_grad():
        for p in trainer.params:
            p.add_(0.05)  # B = 0 would make both samplers agree
    state = trainer.gen.get_state()
    er = trainer.prompts.erase[0]
    x_t, sigma = trainer.sample_xt(er)
    trainer.gen.set_state(state)
    noise = torch.randn((1, *trainer.latent_shape), generator=trainer.gen)
    k = int(torch.randint(0, trainer.config.sample_steps, (1,), generator=trainer.gen))
    assert k > 0  # at σ_0 = 1 x_t is the noise itself, whatever samples it
    sample = dict(uncond=[trainer.prompts.uncond], cfg=trainer.config.sample_cfg)
    on = euler(trainer.backend, noise, trainer.sigmas[: k + 1], [er], lora=True, **sample)
    off = euler(trainer.backend, noise, trainer.sigmas[: k + 1], [er], lora=False, **sample)
    assert torch.equal(x_t, on) and not torch.allclose(x_t, off)


def test_a_finished_lora_is_found_only_for_the_same_settings_on_the_same_model(tmp_path, monkeypatch):
    """The file a repeated run takes instead of training: every setting equal, all steps done, and the same model
    by the host's digest (without one nothing is taken); a checkpoint of another model is refused on resume."""
    from zerase_core.backends.diffusers_zimage import DiffusersZImageBackend
    from zerase_core.checkpoint import check_run_files
    from zerase_core.run_files import finished_lora, partial_lora

    monkeypatch.setattr(DiffusersZImageBackend, "base_digest", lambda self: "model-a")
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=2), checkpoint_path=tmp_path / "a.ckpt")
    path = save_lora(trainer.run().lora, tmp_path / "cat.safetensors")
    fingerprint = trainer.backend.fingerprint()
    assert finished_lora(_config(steps=2), fingerprint, "model-a", [path]) == path
    assert finished_lora(_config(steps=3), fingerprint, "model-a", [path]) is None  # not all steps done
    assert finished_lora(_config(steps=2, eta=5.0), fingerprint, "model-a", [path]) is None
    how = dict(gradient_checkpointing="on", checkpoint_every=1)  # how it runs, not what it trains
    assert finished_lora(_config(steps=2, **how), fingerprint, "model-a", [path]) == path
    assert finished_lora(_config(steps=2), fingerprint, "model-b", [path]) is None
    assert finished_lora(_config(steps=2), fingerprint, None, [path]) is None
    stored = load_lora(path).history["L_erase"]  # its curves travel with it (6 significant digits)
    assert stored == pytest.approx([r.erase for r in trainer.history], rel=1e-5)
    resumed = ZEraseTrainer(tiny_zimage_backend(), _config(steps=4))
    resumed.resume(tmp_path / "a.ckpt")
    assert partial_lora(resumed, [path]) == path  # the file of this run, on this model
    import dataclasses

    saved = load_lora(path)
    unrecorded = {k: v for k, v in saved.training.items() if k != "base"}  # saved before files recorded their model
    older = save_lora(dataclasses.replace(saved, training=unrecorded), tmp_path / "older.safetensors")
    assert partial_lora(resumed, [older]) == older
    monkeypatch.setattr(DiffusersZImageBackend, "base_digest", lambda self: "model-b")
    with pytest.raises(ZEraseError, match="another model"):
        ZEraseTrainer(tiny_zimage_backend(), _config(steps=4)).resume(tmp_path / "a.ckpt")
    # ... and already when the run's files are checked, before a trainer samples its x_t pool (minutes on Z-Image)
    with pytest.raises(ZEraseError, match="another model"):
        check_run_files(tmp_path / "cat.safetensors", tmp_path / "a.ckpt", _config(steps=4), tiny_zimage_backend(),
                        resume=True, advice="")


def test_every_erase_prompt_marks_its_own_concept_tokens():
    """L_attn is measured on erase_tokens[i] of erase[i]: shuffled variants move the concept (§4.1), so tokens found
    in one prompt and used for another would put the loss on other words."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, shuffle_pool=6))
    pool = trainer.prompts
    assert len(pool.erase) == len(pool.erase_tokens) > 2
    for prompt, tokens in zip(pool.erase, pool.erase_tokens):
        assert {prompt.text[slice(*prompt.spans[i])].strip() for i in tokens} == {"red"}, prompt.text
    assert len({tuple(tokens) for tokens in pool.erase_tokens}) > 1  # the concept does move


def test_a_run_without_preservation_concepts_warns_that_l_pr_keeps_only_the_empty_prompt(caplog):
    """Allowed (Eq. 8's first term still holds), but the paper always trains with a preservation set: said, once."""
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, preserve=()))
    assert caplog.text.count("No preservation concept: L_pr (Eq. 8) keeps only the empty prompt") == 1
    caplog.clear()
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=1))
    assert "No preservation concept" not in caplog.text


def test_a_preservation_concept_around_the_concept_is_warned_about(caplog):
    """Preserving "dark red" while erasing "red" keeps the very tokens the erase term removes (an exact match is
    refused by TrainConfig): said, naming it; a word that only contains the concept's letters ("bored") is not."""
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, preserve=("dark red", "blue")))
    assert caplog.text.count("The preservation concept 'dark red' contains the concept 'red'") == 1
    caplog.clear()
    ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, preserve=("bored", "blue")))
    assert "contains the concept" not in caplog.text


@pytest.mark.parametrize("raised, told", [*((ran_out(d), True) for d in MESSAGES),
                                          *((RuntimeError(m), False) for m in NOT_OUT_OF_MEMORY)])
def test_each_allocators_words_for_running_out_are_known_and_no_others(raised, told):
    """Each allocator's out of memory, as it raises it (the CPU's words differ on Windows: "not enough memory", which
    the POSIX words alone left a plain RuntimeError); a bare "out of memory" is not taken for the device's."""
    from zerase_core.out_of_memory import is_out_of_memory

    assert is_out_of_memory(raised) is told


# --- from a mutation audit (stop 24): each kills a mutant the suite let through ---------------------------

def test_fresh_x_t_carries_the_sigma_it_was_sampled_to():
    """T9: sample_xt integrates sigmas[:k+1], so x_t sits at σ_k; the σ handed to the student must be σ_k, not a
    neighbour (the schedule's neighbours differ by ≥ 0.1 at 4 steps)."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="fresh"))
    state = trainer.gen.get_state()
    for _ in range(4):
        start = trainer.gen.get_state()
        torch.randn((1, *trainer.latent_shape), generator=trainer.gen)
        k = int(torch.randint(0, trainer.config.sample_steps, (1,), generator=trainer.gen))
        trainer.gen.set_state(start)
        _, sigma = trainer.sample_xt(trainer.prompts.erase[0])
        assert float(sigma) == float(trainer.sigmas[k])
    trainer.gen.set_state(state)


def test_the_trainer_weighs_l_attn_by_attn_weight():
    """T10: L_er handed to the update is L_erase + w·L_attn for the configured w (not the paper's 1)."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, attn_weight=0.25))
    seen = {}
    real_losses, real_descend = trainer._losses, trainer._descend

    def losses(*a, **kw):
        seen["losses"] = real_losses(*a, **kw)
        return seen["losses"]

    def descend(l_er, *a, **kw):
        seen["l_er"] = l_er.item()
        return real_descend(l_er, *a, **kw)

    trainer._losses, trainer._descend = losses, descend
    trainer.train_step()
    erase, attn = seen["losses"].erase.item(), seen["losses"].attn.item()
    assert attn > 1e-3
    assert seen["l_er"] == pytest.approx(erase + 0.25 * attn, rel=1e-6)


def test_guidance_is_the_negative_prompt_plus_cfg_times_the_difference_also_in_euler():
    """S4/S5: guide on hand numbers, and sampling.euler with cfg ≠ 1 takes the guided step (fresh x_t at
    sample_cfg ≠ 1 samples as the pool does)."""
    from zerase_core.sampling import euler, guide

    assert guide(torch.tensor(1.0), torch.tensor(0.0), 3.0).item() == 3.0
    assert guide(torch.tensor(2.0), torch.tensor(1.0), 0.0).item() == 1.0
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="pool", sample_cfg=2.0, xt_pool=1))
    pool, prompts = trainer.xt_pool, trainer.prompts
    erase = prompts.erase[pool.erase_index[0]]
    x = euler(trainer.backend, pool.x[0, 0:1], pool.sigmas[:3], [erase], uncond=[prompts.uncond], cfg=2.0)
    torch.testing.assert_close(x[0], pool.x[0, 2], rtol=1e-4, atol=1e-5)
    plain = euler(trainer.backend, pool.x[0, 0:1], pool.sigmas[:3], [erase])
    assert not torch.allclose(plain, x, atol=1e-3)
    # a cfg below 1 (allowed: sample_cfg ≥ 0) guides too, toward the negative prompt, rather than sampling unguided
    weak = euler(trainer.backend, pool.x[0, 0:1], pool.sigmas[:3], [erase], uncond=[prompts.uncond], cfg=0.5)
    assert not torch.allclose(plain, weak, atol=1e-3) and not torch.allclose(weak, x, atol=1e-3)


def test_every_step_marks_the_concept_in_the_prompt_it_draws():
    """P7: the concept tokens a step hands the backend are those of the erase prompt it drew (shuffled variants
    move the concept), for every draw: read back through the prompt's spans they spell the concept."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=6, shuffle_pool=6, xt_pool=8))
    seen = []
    real = trainer.backend.velocity

    def velocity(x, sigma, prompts, **kw):
        if kw.get("concept_tokens") is not None:
            seen.append((prompts[0], kw["concept_tokens"][0]))
        return real(x, sigma, prompts, **kw)

    trainer.backend.velocity = velocity
    trainer.run()
    assert len(seen) == 6 and len({p.text for p, _ in seen}) > 1
    for prompt, tokens in seen:
        assert {prompt.text[slice(*prompt.spans[i])].strip().lower() for i in tokens} == {"red"}, prompt.text


def test_the_pool_draws_every_level_uniformly_including_pure_noise():
    """X5: a pool draw is uniform over levels k = 0 … K−1 (σ_0 = 1, x_t the noise itself, included), as fresh
    sampling draws k. 400 draws over 4 levels: 100 expected each, binomial sd ≈ 8.7; 60–140 is a 4.6 sd band."""
    import random
    from collections import Counter

    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="pool", xt_pool=2))
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    counts = Counter(float(trainer.xt_pool.draw(rng, gen, torch.device("cpu")).sigma) for _ in range(400))
    assert sorted(counts) == sorted(trainer.sigmas[:-1].tolist())
    assert all(60 <= c <= 140 for c in counts.values()), counts


def test_previews_show_the_model_without_the_lora_before_and_with_it_after():
    """S6: before_after's first image is sampled with the LoRA off, the second with it on (a LoRA that changes the
    model: at B = 0 the two would agree whatever the order)."""
    from zerase_core.sampling import before_after, euler, flow_sigmas, preview_seed

    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="fresh"))
    with torch.no_grad():
        for p in trainer.params:
            p.add_(0.05)
    config, backend, prompt = trainer.config, trainer.backend, trainer.prompts.erase[0]
    before, after = before_after(backend, prompt, config)
    noise = torch.randn((1, *trainer.latent_shape), generator=torch.Generator().manual_seed(preview_seed(config.seed)))
    sigmas = flow_sigmas(config.sample_steps, config.shift)
    off, on = (euler(backend, noise, sigmas, [prompt], lora=lora) for lora in (False, True))
    assert not torch.allclose(off, on, atol=1e-4)
    assert torch.equal(before, off) and torch.equal(after, on)


def test_each_draw_carries_the_sigma_and_teacher_of_its_own_level():
    """A pool draw hands the step x_t, σ and the teacher's predictions of one (trajectory, level): the teacher of
    another level, or the σ of the next, trains on a target from elsewhere on the trajectory (a mutation audit: the
    teacher one level off failed only the thirty-step learning threshold, by a 2 % margin)."""
    import random

    pool = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="pool", xt_pool=2)).xt_pool
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    levels = set()
    for _ in range(40):
        d = pool.draw(rng, gen, torch.device("cpu"))
        (j, k), = [(j, k) for j in range(pool.trajectories) for k in range(pool.x.shape[1])
                   if torch.equal(pool.x[j, k : k + 1], d.x_t)]
        levels.add(k)
        assert float(d.sigma) == float(pool.sigmas[k]) and torch.equal(d.teacher, pool.teacher[j, k])
        assert d.erase_index == pool.erase_index[j] and d.keep_index == pool.keep_index[j]
    assert len(levels) > 1


def test_a_pool_step_trains_with_its_trajectorys_preservation_prompt():
    """xt_source="pool" (the default): the step's c_pr is its trajectory's, so L_pr keeps Eq. 8's preservation term (a
    mutation audit: a pool step without c_pr, L_pr on ∅ alone, failed no test)."""
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(xt_pool=2))
    pool, prompts = trainer.xt_pool, trainer.prompts
    assert pool is not None and prompts.keep
    for _ in range(8):
        draw = trainer.draw()
        (j, k), = [(j, k) for j in range(pool.trajectories) for k in range(pool.x.shape[1])
                   if torch.equal(pool.x[j, k : k + 1], draw.x_t)]
        assert draw.erase is prompts.erase[pool.erase_index[j]], draw.erase.text
        assert draw.keep is prompts.keep[pool.keep_index[j]], f"c_pr {draw.keep and draw.keep.text!r}"
        assert torch.equal(draw.teacher, pool.teacher[j, k]) and len(draw.teacher) == 3  # [c_er, ∅, c_pr]
    seen = []
    real = trainer._losses
    trainer._losses = lambda *a, **kw: (seen.append(real(*a, **kw)), seen[-1])[1]
    trainer.train_step()
    assert seen[0].pr_batch.keep is not None


def test_fresh_x_t_is_sampled_with_the_configured_guidance():
    """xt_source="fresh" at sample_cfg ≠ 1 samples x_t with classifier-free guidance against ∅, as the pool does (a
    mutation audit: sample_xt handing euler no negative prompt, so sampling unguided whatever sample_cfg says,
    failed no test; the tests of guided sampling called euler themselves)."""
    from zerase_core.sampling import euler

    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="fresh", sample_cfg=2.0))
    er = trainer.prompts.erase[0]
    state = trainer.gen.get_state()
    x_t, _ = trainer.sample_xt(er)
    trainer.gen.set_state(state)
    noise = torch.randn((1, *trainer.latent_shape), generator=trainer.gen)
    k = int(torch.randint(0, trainer.config.sample_steps, (1,), generator=trainer.gen))
    assert k > 0  # at σ_0 = 1 x_t is the noise itself, however it is sampled
    sigmas = trainer.sigmas[: k + 1]
    guided = euler(trainer.backend, noise, sigmas, [er], uncond=[trainer.prompts.uncond], cfg=2.0, lora=True)
    plain = euler(trainer.backend, noise, sigmas, [er], lora=True)
    assert torch.equal(x_t, guided) and not torch.allclose(x_t, plain, atol=1e-4)


def _concept_tokens_asked(trainer):
    """Where the step asks for attention mass: only on c_er's row of the batched student forward (the [∅, c_pr] rows are
    attended as the host attends, without widened heads), and not at all when attn_weight = 0 ("0 switches L_attn
    off", ESD's objective: the step records L_attn = 0). A mutation audit found neither tested: marking the concept
    in every row of the batched call, or measuring the mass at weight 0, changed no tested value (the extra work
    only costs time, and the mass is multiplied by 0)."""
    calls, real = [], trainer.backend.velocity

    def velocity(*a, **kw):
        calls.append(kw.get("concept_tokens"))
        return real(*a, **kw)

    trainer.backend.velocity = velocity
    return calls


def test_the_batched_student_forward_marks_the_concept_on_the_erase_row_only():
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, lambda_mode="fixed", fixed_lambda=0.5))
    calls = _concept_tokens_asked(trainer)
    trainer.train_step()
    marked = [c for c in calls if c is not None]
    assert len(marked) == 1 and len(marked[0]) == 3  # [c_er, ∅, c_pr] in one forward
    assert marked[0][0] and marked[0][1:] == [[], []]


def test_attn_weight_zero_measures_no_mass_and_records_l_attn_zero():
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(steps=1, attn_weight=0.0))
    calls = _concept_tokens_asked(trainer)
    record = trainer.train_step()
    assert calls and all(c is None for c in calls)
    assert record.attn == 0.0


class _Counting:
    """A backend stand-in whose velocity is x·σ, counting the rows of each call."""

    def __init__(self):
        self.rows = []

    def velocity(self, x, sigma, prompts, lora=False):
        self.rows.append(len(prompts))
        return x * sigma[:, None, None, None], None


def test_euler_at_cfg_one_runs_the_prompt_alone_even_with_a_negative_prompt():
    """sampling.euler guides only at cfg ≠ 1: at cfg = 1 (Turbo's, the default sample_cfg) the fresh x_t is sampled with
    one row per step, not [c, ∅] — the same x_t up to rounding at twice the cost (a mutation audit: guiding at cfg =
    1 failed no test)."""
    from zerase_core.sampling import euler, flow_sigmas

    backend = _Counting()
    euler(backend, torch.ones(1, 4, 2, 2), flow_sigmas(3, 3.0), ["c"], uncond=["∅"], cfg=1.0)
    assert backend.rows == [1, 1, 1]
    backend.rows.clear()
    euler(backend, torch.ones(1, 4, 2, 2), flow_sigmas(3, 3.0), ["c"], uncond=["∅"], cfg=2.0)
    assert backend.rows == [2, 2, 2]


def test_a_resumed_run_that_ran_out_of_memory_keeps_every_layer_and_does_not_estimate_again():
    """auto's estimate was short on this card: the resumed run keeps as many layers checkpointed as "on" from the step
    that ran out, and its first step does not estimate again (a partial plan there would replace the full one)."""
    from zerase_core.gradient_checkpointing import GradientCheckpointing

    backend = tiny_zimage_backend()
    checkpointing = GradientCheckpointing(backend, "auto")
    checkpointing.resume(next_step=3, out_of_memory_from=2)
    checkpointing.estimate = lambda shape, step: pytest.fail("estimated again")
    checkpointing.before_step(3, lambda: pytest.fail("shape asked"))
    assert backend.checkpointed_layers == memory_fit.most_checkpointed(backend.n_layers)
    assert (checkpointing.from_step, checkpointing.reason) == (2, OUT_OF_MEMORY)


def test_auto_does_not_retry_a_step_that_ran_out_of_memory_with_every_layer_checkpointed():
    """Taken again with the same plan, the step would only run out once more: retried only while fewer layers are
    checkpointed than "on" checkpoints (all but the last of 3)."""
    from zerase_core.gradient_checkpointing import GradientCheckpointing

    backend = tiny_zimage_backend(TinyZImageConfig(n_layers=3))
    checkpointing = GradientCheckpointing(backend, "auto")
    assert checkpointing.can_retry()
    checkpointing.start(TOO_LITTLE_MEMORY, 1, layers=1)
    assert checkpointing.can_retry()
    checkpointing.start(TOO_LITTLE_MEMORY, 1)  # nothing fitted: as many as "on" from the start
    assert backend.checkpointed_layers == 2 and not checkpointing.can_retry()


# --- from a mutation audit (toy and helpers): each kills a mutant the suite let through ---------------------------

def test_an_allocators_runtime_error_is_told_as_out_of_memory_with_the_original_chained():
    """The CPU's plain RuntimeError becomes torch.OutOfMemoryError with the allocator's own error as its cause (what
    a bug report needs); CUDA's own and any other error pass as they were raised."""
    from zerase_core.out_of_memory import told_as_out_of_memory

    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
    with pytest.raises(torch.OutOfMemoryError) as told:
        with told_as_out_of_memory():
            raise cpu
    assert told.value.__cause__ is cpu
    cuda = torch.OutOfMemoryError("CUDA out of memory")
    for raised in (cuda, RuntimeError("shape mismatch")):
        with pytest.raises(type(raised)) as passed:
            with told_as_out_of_memory():
                raise raised
        assert passed.value is raised


def test_emptying_the_cache_reaches_the_devices_allocator_only(monkeypatch):
    """After a failed attempt the cached blocks go back on CUDA and MPS (the retry's layout must fit), and the CPU's
    allocator, which has no cache, is left alone."""
    from zerase_core.out_of_memory import empty_cache

    called = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: called.append("cuda"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: called.append("mps"))
    for device in ("cpu", "cuda", "mps"):
        empty_cache(torch.device(device))
    assert called == ["cuda", "mps"]


def _failed_forward(refs: list, device: str = "cuda"):
    """A forward that runs out of memory holding its activations in a local; a weak reference to them in ``refs``."""
    activations = torch.ones(1024)
    refs.append(weakref.ref(activations))
    raise ran_out(device)


def test_releasing_an_error_frees_its_frames_even_where_a_log_record_keeps_its_traceback(caplog):
    """A log handler that keeps its records (ComfyUI's log window, pytest's caplog) holds the traceback itself, not
    only the error: release clears the frames' locals, so the failed forward's activations go all the same (a
    mutation audit: dropping clear_frames passed every test)."""
    import logging

    from zerase_core.out_of_memory import release

    refs = []
    try:
        _failed_forward(refs)
    except torch.OutOfMemoryError as err:
        logging.getLogger("zerase_core.test").error("step failed", exc_info=True)
        held = err
    assert caplog.records[0].exc_info[2] is not None and refs[0]() is not None  # kept, by the record
    release(held)
    assert refs[0]() is None


def test_releasing_an_error_frees_what_it_was_raised_from_and_while():
    """The failed attempt's frames may hang off the error two ways: an error raised while another was handled (its
    __context__: a fallback that ran out too) and one raised from another (its __cause__, also where another was
    being handled, which then holds frames of its own); release follows both (a mutation audit: following one link
    only passed every test, since told_as_out_of_memory sets both to the same error)."""
    from zerase_core.out_of_memory import release

    refs = []
    try:
        try:
            _failed_forward(refs, "mps")
        except RuntimeError:
            _failed_forward(refs)  # the fallback runs out too: the first error is its __context__ only
    except torch.OutOfMemoryError as err:
        implicit = err
    try:
        _failed_forward(refs, "mps")
    except RuntimeError as err:
        earlier = err
    try:
        raise torch.OutOfMemoryError("out of memory, told later") from earlier  # a __cause__, no __context__
    except torch.OutOfMemoryError as err:
        explicit = err
    del earlier
    try:
        _failed_forward(refs, "mps")
    except RuntimeError as err:
        allocators = err
    try:
        try:
            _failed_forward(refs, "mps")  # another failure, being handled when the allocator's error is told
        except RuntimeError:
            raise torch.OutOfMemoryError(str(allocators)) from allocators  # its context: that other failure
    except torch.OutOfMemoryError as err:
        both = err
    del allocators
    assert implicit.__cause__ is None and explicit.__context__ is None and both.__cause__ is not both.__context__
    assert all(ref() is not None for ref in refs)  # 5 forwards' activations, each held through an error's frames
    for err in (implicit, explicit, both):
        release(err)
    assert [ref() is None for ref in refs] == [True] * 5


def test_releasing_errors_chained_in_a_cycle_ends():
    """Re-raising the original error from the one raised from it chains the two both ways (Python breaks cycles of
    __context__ only): release frees both and returns instead of following the cycle for ever."""
    import threading

    from zerase_core.out_of_memory import release

    refs = []
    try:
        try:
            _failed_forward(refs)
        except torch.OutOfMemoryError as original:
            try:
                raise torch.OutOfMemoryError("again") from original
            except torch.OutOfMemoryError as again:
                raise original from again
    except torch.OutOfMemoryError as err:
        held = err
    assert held.__cause__.__cause__ is held  # the cycle
    releasing = threading.Thread(target=release, args=(held,), daemon=True)
    releasing.start()
    releasing.join(timeout=10)
    assert not releasing.is_alive() and refs[0]() is None


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_memory_that_is_not_retried_is_raised_with_its_traceback(device):
    """Under "off" a step that runs out of memory fails as it is, with its traceback down to the layer that ran out
    (on MPS and the CPU in the allocator's own error, chained under torch's), what a bug report needs; only an error
    the trainer takes again is released (a mutation audit: releasing before deciding to retry passed every test)."""
    import traceback

    backend = tiny_zimage_backend()
    trainer = ZEraseTrainer(backend, _config(steps=3, gradient_checkpointing="off"))

    def ran_out_here(module, args):
        if torch.is_grad_enabled():
            raise ran_out(device)

    backend.transformer.layers[-1].register_forward_pre_hook(ran_out_here)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        trainer.train_step()
    allocators = raised.value.__cause__ if device == "mps" else raised.value  # MPS's: chained under torch's
    assert "ran_out_here" in [frame.name for frame in traceback.extract_tb(allocators.__traceback__)]


def test_the_tiny_model_is_another_model_for_another_seed_encoder_included():
    """`--tiny` is deterministic by its seed: the same seed, the same word vectors; another seed, others (the encoder
    ignored it and only the transformer changed)."""
    a, b, c = (tiny_zimage_backend(seed=s).encode(["a cat"])[0].features for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_a_lora_file_keeps_at_most_its_points_of_each_curve_evenly_spaced():
    """A long run's curves are thinned to at most 2000 points per series in its LoRA file; a stride rounded down
    (3000 steps: stride 1) kept every step, and the file's metadata grew with the run."""
    from zerase_core.history import StepRecord, stored_series

    def records(n):
        return [StepRecord(step=i, erase=float(i), attn=0.5, pr=0.25, lam=0.0, g=0.0, sigma=0.5, seconds=0.1)
                for i in range(1, n + 1)]

    for n, stride in ((2000, 1), (2001, 2), (3000, 2), (4001, 3)):
        series = stored_series(records(n))
        assert len(series["L_erase"]) <= 2000 and series["L_erase"][:2] == [1.0, 1.0 + stride]
        assert sorted(series) == ["L_attn", "L_erase", "L_pr", "lambda"]
    assert stored_series(records(10), points=4)["L_erase"] == [1.0, 4.0, 7.0, 10.0]


def test_every_calls_back_on_the_multiples_of_n_only():
    """run.every(n, cb): cb runs at steps n, 2n, … (previews, custom checkpoints), never for n ≤ 0."""
    from types import SimpleNamespace

    from zerase_core.run import every

    seen = []
    maybe = every(3, lambda record, trainer: seen.append(record.step))
    for step in range(1, 10):
        maybe(SimpleNamespace(step=step), None)
    assert seen == [3, 6, 9]
    never = every(0, lambda record, trainer: seen.append("zero"))
    never(SimpleNamespace(step=3), None)
    assert seen == [3, 6, 9]


def test_a_finished_run_resumed_writes_again_only_its_deleted_curves(tmp_path, capsys):
    """README: `--resume` with every step done trains nothing and leaves the run's files as they are, but for one
    that was deleted, which is written again: curves.png deleted alone comes back; history.json is not rewritten."""
    from zerase_core.cli import main

    out = tmp_path / "run"
    argv = ["train", "--tiny", "--concept", "red", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    history = (out / "history.json").stat().st_mtime_ns
    (out / "curves.png").unlink()
    assert main([*argv, "--resume"]) == 0
    assert (out / "curves.png").is_file()
    assert (out / "history.json").stat().st_mtime_ns == history
