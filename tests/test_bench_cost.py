"""The cost benchmark's correctness: same losses as the reference, pool = fresh teacher, memory growth, CLI.

No timings are asserted here; the benchmark itself reports them.
"""

from __future__ import annotations

import argparse
import json
import weakref

import pytest
import torch

from zerase_core.bench.memory import attention_loss_bytes, growth_exponent
from zerase_core.config import TrainConfig
from zerase_core.lagrangian import rule_for
from zerase_core.lora import LoRAConfig
from zerase_core.bench.reference_step import reference_losses
from zerase_core.tiny import tiny_zimage_backend
from zerase_core.trainer import ZEraseTrainer
from zerase_core.xt_pool import PoolCancelled

from device_errors import DEVICES, ran_out


def _config(**over):
    base = dict(concept="red", preserve=("blue",), templates=("a photo of a {} ball",), steps=5, height=64,
                width=64, sample_steps=3, lora=LoRAConfig(rank=4), shuffle_pool=1, xt_pool=2)
    return TrainConfig(**(base | over))


def _nudged(trainer):
    with torch.no_grad():  # B = 0 would make student = teacher; move off it
        for p in trainer.params:
            p.add_(0.05)
    return trainer


def _grads(trainer, total):
    for p in trainer.params:
        p.grad = None
    total.backward()
    return torch.cat([p.grad.reshape(-1) for p in trainer.params])


@pytest.mark.parametrize("lam", [0.0, 1.0])  # λ = 0: L_pr without a graph; λ > 0: one batched forward
def test_reference_step_computes_our_losses_and_gradients(lam):
    trainer = _nudged(ZEraseTrainer(tiny_zimage_backend(), _config(lambda_mode="fixed", fixed_lambda=lam)))
    pool = trainer.prompts
    er, tokens, keep = pool.erase[0], list(pool.erase_tokens[0]), pool.keep[0]
    x_t = torch.randn(1, *trainer.latent_shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    ours = trainer._losses(er, tokens, keep, x_t, sigma)[:3]
    assert ours[2].requires_grad == (lam > 0)  # while λ = 0 no preservation graph is built
    total = lambda losses: losses[0] + losses[1] + (losses[2] if lam > 0 else 0)  # noqa: E731
    g_ours = _grads(trainer, total(ours))
    ref = reference_losses(trainer, er, tokens, keep, x_t, sigma)
    g_ref = _grads(trainer, total(ref))
    for a, b in zip(ours, ref):
        assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-7)
    assert ours[1].item() > 0  # the attention term is really there
    assert torch.allclose(g_ours, g_ref, rtol=1e-3, atol=1e-6)


def test_reference_step_does_the_work_the_official_organisation_does(monkeypatch):
    """The yardstick's seconds rest on how it organises the step, so each part is checked to happen: x_t sampled
    anew, three teacher and three student forwards of batch 1, full softmax maps in every recorded layer, and
    backward through all three student predictions even at λ = 0 (the paper rule's first step)."""
    from zerase_core.bench import reference_step as ref

    trainer = _nudged(ZEraseTrainer(tiny_zimage_backend(), _config()))
    calls, reached, maps, sampled = [], [], [], []
    velocity, sample, attend = trainer.backend.velocity, trainer.sample_xt, ref.MaterialisedMassRecorder.attend

    def watched(x, sigma, prompts, **kw):
        v, mass = velocity(x, sigma, prompts, **kw)
        if v.requires_grad:
            v.register_hook(lambda g, n=len(calls): reached.append(n))
        calls.append((x.shape[0], kw.get("lora", True), v.requires_grad))
        return v, mass

    monkeypatch.setattr(trainer.backend, "velocity", watched)
    monkeypatch.setattr(trainer, "sample_xt", lambda prompt: (sampled.append(1), sample(prompt))[1])
    monkeypatch.setattr(ref.MaterialisedMassRecorder, "attend", lambda self, *a, **k: (maps.append(1),
                                                                                         attend(self, *a, **k))[1])
    out = ref.reference_step(trainer)
    assert out["lam"] == 0.0 and sampled == [1]
    teacher = [c for c in calls if not c[1]]
    student = [i for i, c in enumerate(calls) if c[2]]
    assert teacher == [(1, False, False)] * 3 and [calls[i] for i in student] == [(1, True, True)] * 3
    assert sorted(reached) == student  # L_pr's two predictions are back-propagated too, although λ = 0
    assert len(maps) == len(trainer.mass_layers)


def test_bench_variants_run_the_lambda_their_names_say():
    """bench-cost times copies of one trainer: each must run its own λ rule. A copy that kept the base's
    (paper) rule timed the batch-3 path for the "λ = 0" variants too."""
    from zerase_core.bench.cost import _variant_trainers

    base = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="fresh"))
    trainers = _variant_trainers(base, base.build_pool())
    assert len({id(t.lambda_rule) for t in trainers.values()}) == len(trainers)
    for name, t in trainers.items():
        if name.startswith("ours_"):
            record = t.train_step()
            assert record.lam == (1.0 if name.endswith("lambda_positive") else 0.0), name
            assert t.lambda_rule.needs_pr_gradient() == name.endswith("lambda_positive"), name
    assert base.lambda_rule.state() == rule_for(base.config).state()  # the base's rule was never stepped


def test_pool_holds_the_frozen_teachers_predictions():
    trainer = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="pool"))
    xp, pool = trainer.xt_pool, trainer.prompts
    for j, k in ((0, 0), (1, 2)):
        prompts = [pool.erase[xp.erase_index[j]], pool.uncond, pool.keep[xp.keep_index[j]]]
        fresh = trainer.teacher_predictions(xp.x[j, k : k + 1], xp.sigmas[k].reshape(1), prompts)
        assert torch.allclose(xp.teacher[j, k], fresh, atol=1e-5)
    # consecutive levels are Euler steps of the erase prompt's velocity (cfg 1)
    step = xp.sigmas[1] - xp.sigmas[0]
    assert torch.allclose(xp.x[0, 1], xp.x[0, 0] + step * xp.teacher[0, 0, 0], atol=1e-5)
    # ... and with guidance (the demo samples at cfg 3): v_∅ + cfg (v_c − v_∅), from the teacher's rows there
    guided = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="pool", sample_cfg=2.0)).xt_pool
    t_c, t_u = guided.teacher[0, 0, 0], guided.teacher[0, 0, 1]
    assert torch.allclose(guided.x[0, 1], guided.x[0, 0] + step * (t_u + 2.0 * (t_c - t_u)), atol=1e-5)


def test_the_pool_covers_every_erase_prompt_and_draws_preservation_prompts_from_all_of_d_pr():
    """More erase prompts than trajectories (4 templates × 9 is 36 > the default 32): each still gets one; c_pr is
    drawn per trajectory from all of D_pr; and the memory the pool is checked against is what it allocates (a
    mutation audit found all three untested)."""
    from zerase_core.xt_pool import pool_bytes

    config = _config(templates=("a photo of a {} ball", "a {} car on a road"), preserve=("blue", "green", "tall"),
                     shuffle_pool=2, xt_pool=2)
    trainer = ZEraseTrainer(tiny_zimage_backend(), config)
    xp, prompts = trainer.xt_pool, trainer.prompts
    assert len(prompts.erase) == 6 and sorted(set(xp.erase_index)) == list(range(6)) and xp.trajectories == 6
    many = ZEraseTrainer(tiny_zimage_backend(), _config(preserve=("blue", "green", "tall"), xt_pool=24)).xt_pool
    assert set(many.keep_index) == set(range(3))
    held = xp.x.numel() * xp.x.element_size() + xp.teacher.numel() * xp.teacher.element_size()
    noise = xp.trajectories * xp.x[0, 0].numel() * 4  # each trajectory's starting noise, held while it is sampled
    assert pool_bytes(xp.trajectories, xp.x.shape[1], xp.teacher.shape[2], xp.x.shape[2:]) == held + noise


def test_cancel_while_the_pool_is_sampled():
    """Sampling the pool takes a while before step 1: should_stop is asked between trajectory batches."""
    asked = []
    with pytest.raises(PoolCancelled, match="8 of 20 trajectories"):  # batches of 8
        ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="pool", xt_pool=20, sample_steps=2),
                      should_stop=lambda: asked.append(1) or len(asked) > 1)  # no to the first batch, yes after


@pytest.mark.parametrize("device", DEVICES)
def test_pool_halves_its_batch_when_memory_runs_out(device, monkeypatch):
    """A pool batch is batch × 3 rows in one forward (gigabytes at 1024²): out of memory, as each device's allocator
    says it, it samples fewer trajectories at a time and ends with the pool it would have had."""
    from zerase_core.xt_pool import TrajectoryPool

    backend = tiny_zimage_backend()
    trainer = ZEraseTrainer(backend, _config())
    prompts = trainer.prompts
    args = (backend, prompts.erase, prompts.uncond, prompts.keep, trainer.latent_shape, trainer.sigmas, 6, 1.0, 0)
    reference = TrajectoryPool(*args)  # the default batch, which fits here
    real, rows_seen, failed, held = backend.velocity, [], [], []

    def small_memory(x, sigma, prompts, **kw):
        rows_seen.append(x.shape[0])
        if x.shape[0] > 6:  # room for two trajectories' three predictions, not more
            failed.append(weakref.ref(x))
            held.append(ran_out(device))  # the error outlives its except clause: its frames must not keep x
            raise held[-1]
        return real(x, sigma, prompts, **kw)

    monkeypatch.setattr(backend, "velocity", small_memory)
    pool = TrajectoryPool(*args, batch=8)
    assert rows_seen[:2] == [18, 12] and set(rows_seen[2:]) == {6}  # 6 trajectories at a time, then 4, then 2
    assert len(held) == 2 and [ref() for ref in failed] == [None, None]  # each failed batch freed
    torch.testing.assert_close(pool.x, reference.x, rtol=0, atol=1e-5)  # batch sizes round differently
    torch.testing.assert_close(pool.teacher, reference.teacher, rtol=0, atol=1e-5)


def test_pool_training_runs_and_resumes_identically(tmp_path):
    first = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="pool", steps=4),
                          checkpoint_path=tmp_path / "a.ckpt")
    full = first.run()
    second = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="pool", steps=2),
                           checkpoint_path=tmp_path / "b.ckpt")
    second.run()
    third = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="pool", steps=4))
    third.resume(tmp_path / "b.ckpt")
    resumed = third.run()
    assert [r.erase for r in resumed.history] == pytest.approx([r.erase for r in full.history], rel=1e-5)


def test_attention_loss_memory_is_linear_for_ours_and_quadratic_for_maps():
    tokens = [256, 1024, 4096]
    rows = [attention_loss_bytes(n, 64, heads=1, head_dim=32) for n in tokens]
    ours = growth_exponent(tokens, [r["ours"] for r in rows])
    maps = growth_exponent(tokens, [r["materialised"] for r in rows])
    assert 0.8 < ours < 1.2, ours
    assert 1.8 < maps < 2.2, maps
    assert rows[-1]["materialised"] > 20 * rows[-1]["ours"]


def test_saved_bytes_leaves_out_the_weights_a_layer_saves():
    """A linear layer saves its weight for its input's gradient; the weight is resident, not activation memory."""
    from zerase_core.bench.memory import saved_bytes

    linear = torch.nn.Linear(100, 100, bias=False).requires_grad_(False)
    x = torch.randn(1, 100, requires_grad=True)
    assert saved_bytes(lambda: linear(x))[0] == 100 * 100 * 4  # the weight, seen as saved
    assert saved_bytes(lambda: linear(x), resident=linear.parameters())[0] == 0  # x: not needed, no weight gradient
    assert saved_bytes(lambda: linear(x * 2), resident=linear.parameters())[0] == 0


def test_the_cpu_peak_follows_every_allocation_and_free_in_order():
    """4 MB, then 8 MB beside it, both freed, then 2 MB: the peak is 12 MB (placing each op's net change at its start
    read backward's peaks up to 17 % low)."""
    from zerase_core.bench.memory import cpu_peak_bytes

    def step():
        first = torch.empty(1_000_000)
        second = torch.empty(2_000_000)
        del first, second
        return torch.empty(500_000)

    assert cpu_peak_bytes(step) == 12_000_000


def test_the_memory_estimate_from_scaled_down_models_reproduces_the_issues_h100_figures():
    """Per-layer activations measured on Z-Images of width 256 and 512 and extrapolated to 3840 give the issue's four
    H100 figures (GB above the weights) within 16 %, never below. A layer's bytes are linear in its width once the
    weights it saves are left out (intercept near 0, the same per token at 4× the length); counted, they gave 15.3
    GB for the measured 7.2 without checkpointing."""
    from zerase_core.bench.estimate import measure_layers, real_zimage_estimate

    measured = measure_layers()
    fit = measured["fit"]
    assert abs(fit["intercept"]) < 0.01 * fit["slope_per_dim"] * 3840 and fit["length_linearity"] > 0.9
    for row in real_zimage_estimate(measured)["check_against_h100"]:
        assert 1.0 <= row["estimated_gb_above_weights"] / row["gb_above_weights"] <= 1.16, row


def test_bench_cost_command_prints_json_with_the_required_keys(capsys):
    from zerase_core.cli import main

    assert main(["bench-cost", "--tiny", "--steps", "1", "--no-estimate"]) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["speed"]
    for key in ("speedup_vs_reference", "overhead_vs_gated_esd", "overhead_vs_gated_esd_lambda_zero",
                "seconds_per_step", "split_seconds", "default_xt_source"):
        assert key in row
    for source in ("pool", "fresh"):  # both x_t sources, the ESD step with the same source as ours
        for key in (f"ours_{source}_lambda_positive", f"ours_{source}_lambda_zero", f"gated_esd_{source}"):
            assert row["seconds_per_step"][key] > 0
        assert f"overhead_vs_gated_esd_{source}_lambda_positive" in row
    assert row["seconds_per_step"]["reference"] > 0
    s = row["seconds_per_step"]  # the ratios are the issue's: reference ÷ ours, ours ÷ gated ESD (not inverted)
    for source in ("pool", "fresh"):
        ours = s[f"ours_{source}_lambda_positive"]
        assert row[f"speedup_vs_reference_{source}_lambda_positive"] == pytest.approx(s["reference"] / ours)
        assert row[f"overhead_vs_gated_esd_{source}_lambda_positive"] == pytest.approx(ours / s[f"gated_esd_{source}"])
    assert row["speedup_vs_reference"] == row[f"speedup_vs_reference_{row['default_xt_source']}_lambda_positive"]
    assert row["split_seconds"]["fresh_xt_mean"] > 0 and "attn_mass_fwd" in row["split_seconds"]
    assert set(result["attention_loss_memory"]["growth_exponent"]) == {"ours", "materialised"}
    assert "min_speedup_vs_reference" in result["summary"]
    assert "bench-cost --tiny" in result["command"]
    composition = result["real_zimage_run_time_estimate"]["toy_lambda_fractions"]
    assert set(composition["rows"]) == {"pool_ckpt", "pool_no_ckpt", "fresh_ckpt", "fresh_no_ckpt"}
    assert all(r["minutes"] > 0 for r in composition["rows"].values())


@pytest.mark.parametrize("card_gb, layers, minutes", [(80, 0, 7.24), (24, 17, 9.09), (16, 27, 10.18)])
def test_the_composed_default_runs_what_auto_checkpointing_chooses_on_the_card(card_gb, layers, minutes):
    """The 10-minute target is read for the defaults: the pool, and checkpointing "auto", which checkpoints no layer
    where the step fits (34 GB on an 80 GB H100) and as few as fit where it does not, by the trainer's own rule; the
    minutes lie that share of the way from no checkpointing (7.24) to all (10.51). A 16 GB card misses 10 minutes."""
    from zerase_core.bench.estimate import run_time_composition

    composition = run_time_composition(0.97, 0.02, memory_budget_gb=card_gb)
    default, rows = composition["default_settings"], composition["rows"]
    assert (default["xt_source"], default["checkpointed_layers"], default["of_layers"]) == ("pool", layers, 30)
    assert (rows["pool_no_ckpt"]["minutes"], rows["pool_ckpt"]["minutes"]) == pytest.approx((7.24, 10.51), abs=0.01)
    assert default["minutes"] == pytest.approx(minutes, abs=0.01) and default["meets_10_min"] == (card_gb > 16)


def test_bench_cost_refuses_an_unknown_row_before_measuring(capsys, monkeypatch):
    """A misspelt --models row is named with the rows there are, before a step is timed (it used to run the
    memory benchmark and then fail on an empty table)."""
    from zerase_core.bench import cost
    from zerase_core.cli import main

    timed = []
    monkeypatch.setattr(cost, "time_case", lambda case, *a, **k: timed.append(case))
    assert main(["bench-cost", "--tiny", "--models", "tiny-diffusers-16", "toy-65", "--no-estimate"]) == 2
    err = capsys.readouterr().err
    assert "no row toy-65; its rows are tiny-diffusers-16." in err and not timed


def test_step_kinds_count_from_lambda_history():
    from zerase_core.bench.lambda_kinds import step_kinds

    kinds = step_kinds([0.0, 0.5, 0.2, 0.0, 0.0, 0.3])
    assert (kinds["lambda_zero"], kinds["recomputed"], kinds["batched"]) == (2, 2, 2)


def test_toy_step_kinds_are_the_shipped_lambda_bench():
    """estimate.TOY_STEP_KINDS (weights of the composed run times) is the shipped bench-lambda run's summary:
    re-running bench-lambda without copying its fractions over fails here."""
    from pathlib import Path

    from zerase_core.bench.estimate import TOY_STEP_KINDS

    shipped = json.loads((Path(__file__).parents[1] / TOY_STEP_KINDS["source"]).read_text())["summary"]
    for key in ("fraction_batched", "fraction_recomputed"):
        assert TOY_STEP_KINDS[key] == pytest.approx(shipped[key], abs=1e-12)


def test_bench_result_records_its_command_and_threads(tmp_path, monkeypatch, capsys):
    """Every benchmark's JSON names the command that made it, with the OMP_NUM_THREADS it was started under."""
    from zerase_core.bench.report import emit

    out = tmp_path / "sub" / "r.json"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    emit({"x": 1}, argparse.Namespace(argv=["bench-xt", "--concepts", "red cube", "--out", str(out)], out=out))
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and [p.name for p in out.parent.iterdir()] == ["r.json"]
    assert printed["command"] == f"OMP_NUM_THREADS=3 python -m zerase_core bench-xt --concepts 'red cube' --out {out}"
    monkeypatch.delenv("OMP_NUM_THREADS")
    emit({}, argparse.Namespace(argv=["bench-lambda"], out=None))
    assert json.loads(capsys.readouterr().out)["command"] == "python -m zerase_core bench-lambda"
    import zerase_core.bench.report as report

    def reader_gone(text):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(report, "print_result", reader_gone)  # `bench-… | head`: minutes measured, then no reader
    with pytest.raises(BrokenPipeError):
        emit({"x": 2}, argparse.Namespace(argv=["bench-xt"], out=out))
    assert json.loads(out.read_text())["x"] == 2  # written all the same


def test_a_variant_out_of_memory_leaves_the_next_one_its_room_even_where_its_error_is_held():
    """A benchmark variant that runs out of memory is left out and the others are timed: before they run, what the
    failed one allocated is freed, even where its error outlives the except clause (out_of_memory.release), or on a
    GPU the next variants would measure, or run out, beside it."""
    from zerase_core.bench.timing import interleaved_medians

    held, failed, freed_when_next_ran = [], [], []

    def too_big():
        activations = torch.ones(1000)
        failed.append(weakref.ref(activations))
        held.append(ran_out())
        raise held[-1]

    def fits():
        freed_when_next_ran.append(failed[0]() is None)

    seconds = interleaved_medians({"too_big": too_big, "fits": fits}, steps=1, repeats=1, sync=lambda: None,
                                  on_oom=lambda name: None)
    assert len(held) == 1 and freed_when_next_ran and all(freed_when_next_ran)
    assert seconds["fits"] >= 0 and seconds["too_big"] != seconds["too_big"]  # NaN: not timed


def test_gpu_script_records_a_failed_row_and_goes_on(tmp_path, monkeypatch):
    """scripts/gpu_bench.py may get one device slot: a row that fails is written with its error, later rows run."""
    from gpu_script import load_gpu_bench

    gpu_bench = load_gpu_bench()
    real, calls = gpu_bench.time_case, []

    def first_fails(case, steps):
        calls.append(case.config.gradient_checkpointing)
        if len(calls) == 1:
            raise ran_out()
        return real(case, steps)

    monkeypatch.setattr(gpu_bench, "time_case", first_fails)
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--tiny", "--steps", "1", "--pool", "1", "--out", str(out)]) == 0  # both kinds of row
    failed, measured = json.loads(out.read_text())["rows"]
    assert calls == ["off", "on"]  # cheapest first: without checkpointing, then with
    assert "OutOfMemoryError" in failed["error"] and not failed["gradient_checkpointing"]
    assert measured["gradient_checkpointing"] and measured["seconds_per_step"]["ours_pool_lambda_positive"] > 0
    (partial,) = json.loads(out.read_text())["checkpointing"]  # k of the 2 main layers checkpointed
    peaks = [r["peak_mib"] for r in partial["rows"]]
    assert [r["checkpointed_layers"] for r in partial["rows"]] == [0, 1, 2] and peaks[0] > peaks[1]


def test_gpu_script_measures_only_the_partial_rows_without_resolutions(tmp_path):
    """`--resolutions` with none: what gradient checkpointing "auto" chooses between, without the full rows' minutes
    (their pool build) on a device slot."""
    from gpu_script import load_gpu_bench

    out = tmp_path / "gpu.json"
    assert load_gpu_bench().main(["--tiny", "--resolutions", "--steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == [] and [len(c["rows"]) for c in result["checkpointing"]] == [3]


def test_gpu_script_on_a_gpu_leaves_the_full_rows_out_with_resolutions_alone(monkeypatch):
    """On the GPU (not --tiny, whose rows are fixed at 64²) `--resolutions` with none plans no full row: the device
    slot goes to the partial rows alone, not to the default resolutions' pool builds; by default 512² without and with
    checkpointing, cheapest first, then 1024² with it (a mutation audit: an empty list read as the default passed every
    test, which run --tiny)."""
    from gpu_script import load_gpu_bench

    script = load_gpu_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    planned = []
    monkeypatch.setattr(script, "_measure_model", lambda args, weights, device, runs, result: planned.append(runs))
    for argv, runs in ((["--resolutions"], []), ([], [(512, False), (512, True), (1024, True)])):
        planned.clear()
        assert script.main(argv) == 0
        assert planned == [runs]


def test_gpu_script_refuses_fp8_weights_outside_comfyui(capsys):
    """fp8 base weights are ComfyUI's weight_dtype: asked of the diffusers host, the script says so and stops."""
    from gpu_script import load_gpu_bench

    with pytest.raises(SystemExit):
        load_gpu_bench().main(["--tiny", "--weights", "fp8"])
    assert "add --host comfy" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps and --repeats must be at least 1"),  # a JSON of NaN
    (["--out", "."], "is a folder; --out names the JSON file"),  # a traceback after the first row
    (["--pool", "0"], "at least 1 trajectory (xt_pool; --xt-pool or --pool on the command line); got 0"),  # was late
    (["--resolutions", "0"], "resolution must be positive; got 0×0"),
])
def test_gpu_script_refuses_what_would_fail_after_its_first_row_before_building_a_model(argv, message, capsys,
                                                                                        monkeypatch):
    from gpu_script import load_gpu_bench

    script = load_gpu_bench()
    monkeypatch.setattr(script, "_build", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(SystemExit):
        script.main(["--tiny", *argv])
    assert message in capsys.readouterr().err


def test_optimizer_state_is_made_without_moving_the_lora():
    """Before peak memory is read on a GPU, AdamW's buffers exist and the LoRA and learning rate are as they were."""
    from zerase_core.bench.cost_split import make_optimizer_state

    trainer = _nudged(ZEraseTrainer(tiny_zimage_backend(), _config()))
    before = [p.detach().clone() for p in trainer.params]
    make_optimizer_state(trainer)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))
    assert all("exp_avg" in trainer.optimizer.state[p] for p in trainer.params)
    assert trainer.optimizer.param_groups[0]["lr"] == trainer.config.lr and all(p.grad is None for p in trainer.params)


def _patches_made(backend, height: int, width: int, monkeypatch) -> list[int]:
    """Per sample, the patches diffusers' transformer cuts from a height × width picture (counted where it
    patchifies, before it pads the sequence to a multiple of 32)."""
    made, patchify = [], backend.transformer._patchify_image

    def counting(*args, **kwargs):
        patches = patchify(*args, **kwargs)
        made.append(patches[0].shape[0])
        return patches

    monkeypatch.setattr(backend.transformer, "_patchify_image", counting)
    x = torch.zeros(1, *backend.latent_shape(height, width))
    with torch.no_grad():
        backend.velocity(x, torch.tensor([0.5]), backend.encode(["a red circle"]), lora=False)
    return made


@pytest.mark.parametrize("tiny", [True, False])
def test_speed_cases_record_the_image_tokens_the_model_makes(tiny, monkeypatch):
    from zerase_core.bench.cost import speed_cases

    for case in speed_cases(tiny):
        made = _patches_made(case.backend, case.config.height, case.config.width, monkeypatch)
        assert made == [case.image_tokens], case.name


def test_bench_checkpointing_reports_each_count_with_the_memory_it_keeps(tmp_path, capsys):
    """bench-checkpointing on a 4-layer tiny Z-Image: a row per count of checkpointed layers, ratios against none,
    and the peak falling with each layer (memory is deterministic; time is not asserted)."""
    from zerase_core.cli import main

    out = tmp_path / "ckpt.json"
    assert main(["bench-checkpointing", "--layers", "4", "--resolution", "64", "--steps", "1", "--repeats", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result and "bench-checkpointing --layers 4" in result["command"]
    rows = result["rows"]
    assert [r["checkpointed_layers"] for r in rows] == [0, 1, 2, 3, 4] and result["layers"] == 4
    assert rows[0]["time_ratio"] == rows[0]["peak_ratio"] == 1.0
    peaks = [r["peak_mib"] for r in rows]  # the profiler's timeline: lower with each layer up to the last but one
    assert all(a > b for a, b in zip(peaks[:-1], peaks[1:-1])) and peaks[-1] < 0.5 * peaks[0]
    assert result["peak_saved_mib_per_layer"] > 0
    assert all(r["seconds_per_step"] > 0 for r in rows)


def test_ctrl_c_in_the_gpu_script_is_told_in_a_line_and_its_finished_rows_stay(tmp_path, monkeypatch, capsys):
    """It was a traceback; the rows before it are in --out already (written after each row)."""
    from gpu_script import load_gpu_bench

    gpu_bench = load_gpu_bench()
    real, calls = gpu_bench.time_case, []

    def ctrl_c_in_the_second_row(case, steps):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(case, steps)

    monkeypatch.setattr(gpu_bench, "time_case", ctrl_c_in_the_second_row)
    out = tmp_path / "gpu.json"
    assert gpu_bench.cli(["--tiny", "--steps", "1", "--pool", "1", "--out", str(out)]) == 130
    assert capsys.readouterr().err.endswith("Stopped (Ctrl-C); every row finished before it is in --out, where one "
                                            "was given.\n")
    (first,) = json.loads(out.read_text())["rows"]
    assert first["seconds_per_step"]["ours_pool_lambda_positive"] > 0


def test_reference_step_samples_a_new_x_t_every_step(monkeypatch):
    """The reference samples x_t anew on every step, not once (a cached x_t would make the yardstick cheaper)."""
    from zerase_core.bench import reference_step as ref

    trainer = _nudged(ZEraseTrainer(tiny_zimage_backend(), _config()))
    sampled, sample = [], trainer.sample_xt
    monkeypatch.setattr(trainer, "sample_xt", lambda prompt: (sampled.append(1), sample(prompt))[1])
    for _ in range(3):
        ref.reference_step(trainer)
    assert sampled == [1, 1, 1]


@pytest.mark.parametrize("source", ["fresh", "pool"])
def test_gated_esd_step_does_l_erase_only(source, monkeypatch):
    """The overhead yardstick does a plain gated ESD step: fresh, x_t sampled and one no-grad teacher forward of
    [c_er, ∅]; pool, neither; then one batch-1 student forward of c_er, back-propagated, and one optimizer step."""
    from zerase_core.bench.gated_esd import gated_esd_step

    trainer = _nudged(ZEraseTrainer(tiny_zimage_backend(), _config(xt_source=source)))
    calls, sampling, sampled, stepped = [], [], [], []
    velocity, sample, step = trainer.backend.velocity, trainer.sample_xt, trainer.optimizer.step

    def watched(x, sigma, prompts, **kw):
        v, mass = velocity(x, sigma, prompts, **kw)
        if not sampling:
            calls.append((len(prompts), kw.get("lora", True), v.requires_grad))
        return v, mass

    def sample_xt(prompt):
        sampled.append(1)
        sampling.append(1)
        try:
            return sample(prompt)
        finally:
            sampling.clear()

    monkeypatch.setattr(trainer.backend, "velocity", watched)
    monkeypatch.setattr(trainer, "sample_xt", sample_xt)
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: (stepped.append(1), step(*a, **k))[1])
    gated_esd_step(trainer)
    teacher = [(2, False, False)] if source == "fresh" else []
    assert sampled == ([1] if source == "fresh" else [])
    assert calls == teacher + [(1, True, True)] and stepped == [1]


def _fake_seconds():
    return {"ours_pool_lambda_positive": 2.0, "ours_pool_lambda_zero": 1.0, "gated_esd_pool": 1.5,
            "ours_fresh_lambda_positive": 4.0, "ours_fresh_lambda_zero": 3.0, "gated_esd_fresh": 2.5,
            "reference": 60.0}


def test_time_case_warms_up_each_variant_and_takes_every_ratio_against_its_own_yardstick(monkeypatch):
    """Timed after a warm-up (on the CPU the medians' own); the pool's build spread over the run for every pool
    variant, ESD's included; each λ regime's overhead against ESD of its source; the paper-λ weighing as documented."""
    from zerase_core.bench import cost

    asked = []
    monkeypatch.setattr(cost, "interleaved_medians", lambda timed, steps, repeats, sync, warm_up=True, on_oom=None:
                        asked.append(warm_up) or {k: v for k, v in _fake_seconds().items() if k in timed})
    case = cost.speed_cases(tiny=True)[0]
    out = cost.time_case(case, steps=1, run_steps=10)
    assert asked == [True]
    build, raw, s = out["pool"]["build_s"] / 10, _fake_seconds(), out["seconds_per_step"]
    assert build > 0
    for name, v in raw.items():
        assert s[name] == pytest.approx(v + (build if "_pool" in name else 0.0)), name
    for source in ("pool", "fresh"):
        for lam in ("lambda_positive", "lambda_zero"):
            ours = s[f"ours_{source}_{lam}"]
            assert out[f"speedup_vs_reference_{source}_{lam}"] == pytest.approx(s["reference"] / ours)
            assert out[f"overhead_vs_gated_esd_{source}_{lam}"] == pytest.approx(ours / s[f"gated_esd_{source}"])
        w = out["paper_lambda_weighted"]
        f_b, f_r = w["fractions"]["batched"], w["fractions"]["recomputed"]
        weighted = (f_b * s[f"ours_{source}_lambda_positive"] + (1 - f_b) * s[f"ours_{source}_lambda_zero"]
                    + f_r * out["split_seconds"]["student_pr_fwd_bwd"])
        assert w[source]["seconds_per_step"] == pytest.approx(weighted)
        assert w[source]["minutes_per_run"] == pytest.approx(weighted * 10 / 60)
        assert w[source]["speedup_vs_reference"] == pytest.approx(s["reference"] / weighted)
        assert w[source]["overhead_vs_gated_esd"] == pytest.approx(weighted / s[f"gated_esd_{source}"])


def test_each_variant_runs_the_step_its_name_says_with_its_x_t_source(monkeypatch):
    """Each timed variant is the step its name says (ESD, the reference, ours), on its x_t source: the pool only for
    the `_pool` variants (a mutation audit: fresh ESD running our step, or pool ESD sampling fresh, failed nothing)."""
    from zerase_core.bench import cost

    base = ZEraseTrainer(tiny_zimage_backend(), _config(xt_source="fresh"))
    pool = base.build_pool()
    trainers = cost._variant_trainers(base, pool)
    ran = []
    monkeypatch.setattr(cost, "gated_esd_step", lambda t: ran.append(("esd", t)))
    monkeypatch.setattr(cost, "reference_step", lambda t: ran.append(("reference", t)))
    for name, t in trainers.items():
        assert t.xt_pool is (pool if "_pool" in name else None), name
    for name, kind in (("gated_esd_pool", "esd"), ("gated_esd_fresh", "esd"), ("reference", "reference")):
        ran.clear()
        cost._step_of(name, trainers[name])()
        assert ran == [(kind, trainers[name])], name
    for name in ("ours_pool_lambda_positive", "ours_fresh_lambda_zero"):
        assert cost._step_of(name, trainers[name]) == trainers[name].train_step


def test_the_summary_takes_the_least_speedup_and_the_most_overhead_over_the_rows(monkeypatch):
    """The verdicts are the worst row's: the least speedup, the most overhead (the tiny run has one row, where the
    least and the most are the same, so a summary taking the best passed)."""
    from zerase_core.bench import cost

    class Row:
        def __init__(self, row):
            self.row = row

    rows = {"a": 1.0, "b": 2.0}
    monkeypatch.setattr(cost, "speed_cases", lambda tiny: [Row("a"), Row("b")])

    def fake(case, steps, repeats=1):
        k = rows[case.row]
        s = {name: v * (k if name.startswith("ours") else 1.0) for name, v in _fake_seconds().items()}
        return cost._ratios(s, {"student_pr_fwd_bwd": 0.1}, 1000)

    monkeypatch.setattr(cost, "time_case", fake)
    result = cost.run(tiny=True)
    summary, (a, b) = result["summary"], result["speed"]
    for source in ("pool", "fresh"):
        for lam in ("lambda_positive", "lambda_zero"):
            sp, ov = f"speedup_vs_reference_{source}_{lam}", f"overhead_vs_gated_esd_{source}_{lam}"
            assert summary[f"min_{sp}"] == b[sp] < a[sp] and summary[f"max_{ov}"] == b[ov] > a[ov]
    assert summary["min_speedup_vs_reference"] == b["speedup_vs_reference"]
    assert summary["max_overhead_vs_gated_esd"] == b["overhead_vs_gated_esd"]


def test_interleaved_medians_are_medians_of_timed_calls_after_an_untimed_warm_up(monkeypatch):
    """Medians, not means, of calls timed after one untimed warm-up call each, variants interleaved (a fake clock whose
    durations give the median, the mean and a timed warm-up three different answers)."""
    from zerase_core.bench import timing

    clock, order = [0.0], []
    durations = {"a": iter([1000.0, 1000.0, 1.0, 2.0]), "b": iter([1000.0, 5.0, 6.0, 700.0])}

    def fn(name):
        def call():
            order.append(name)
            clock[0] += next(durations[name])
        return call

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    s = timing.interleaved_medians({"a": fn("a"), "b": fn("b")}, steps=3, repeats=1, sync=lambda: None)
    assert s == {"a": 2.0, "b": 6.0}
    assert order == ["a", "b"] + ["a"] * 3 + ["b"] * 3


def test_attention_memory_scales_one_layers_bytes_to_the_real_model_in_bf16():
    """The real-model GiB: one layer's fp32 bytes per head (one head here) × 30 layers × 30 heads, halved (bf16)."""
    from zerase_core.bench.cost import attention_memory
    from zerase_core.bench.estimate import REAL

    out = attention_memory(tokens=(64, 128), heads=1)
    for row, real in zip(out["rows"], out["real_zimage_all_layers_no_checkpointing"]):
        for ours, key in (("ours", "ours_gib"), ("materialised", "materialised_gib")):
            assert real[key] == pytest.approx(row[ours] * REAL["n_layers"] * REAL["n_heads"] / 2 / 2**30)


def test_the_composed_rows_follow_their_documented_parts():
    """Each row's reference (fresh x_t + 3 batch-1 teacher forwards + 3 batch-1 student fwd+bwd) and gated ESD
    (student fwd+bwd of batch 1 without the mass term; its x_t: sampling + a batch-2 teacher, or a pool of batch 2),
    recomputed from the issue's H100 seconds; overhead = ours ÷ ESD, speedup = reference ÷ ours."""
    from zerase_core.bench.estimate import H100_SECONDS, run_time_composition

    c = run_time_composition(0.97, 0.02, pool_trajectories=32, levels=8, steps=1000)
    h100 = H100_SECONDS[512]
    f1, f3 = h100["student_fwd_bwd_b1"] / 2, h100["teacher_fwd_b3"]  # a backward costs about one forward (A1)
    f2 = (f1 + f3) / 2
    fb1 = {True: h100["student_fwd_bwd_b1"] + f1, False: h100["student_fwd_bwd_b1"]}  # checkpointed: + a forward
    for key, row in c["rows"].items():
        ckpt, fresh = row["gradient_checkpointing"], row["xt_source"] == "fresh"
        sampling = 7 / 2 * f1
        reference = sampling + 3 * f1 + 3 * fb1[ckpt]
        esd = 1000 * (fb1[ckpt] + (sampling + f2 if fresh else 0.0)) + (0.0 if fresh else 32 * 8 * f2)
        assert row["reference_minutes_lower_bound"] == pytest.approx(1000 * reference / 60), key
        assert row["gated_esd_minutes"] == pytest.approx(esd / 60), key
        assert row["overhead_vs_gated_esd"] == pytest.approx(row["minutes"] * 60 / esd), key
        assert row["speedup_vs_reference_at_least"] == pytest.approx(1000 * reference / (row["minutes"] * 60)), key


def test_attention_loss_bytes_are_what_the_mass_adds_to_the_plain_attention():
    """"ours" is the bytes the mass adds beyond the plain attention's own (q, k, v, output...), not those included."""
    from zerase_core.attention_mass import sdpa
    from zerase_core.bench.memory import _qkv, saved_bytes

    q, k, v = _qkv(256 + 64, 1, 32, torch.float32)
    plain = saved_bytes(lambda: sdpa(q, k, v, 32**-0.5).sum())[0]
    row = attention_loss_bytes(256, 64, heads=1, head_dim=32)
    assert 0 < row["ours"] < plain / 2
    assert row["materialised"] >= (256 + 64) ** 2 * 4  # at least the (L, L) fp32 map


def test_the_memory_estimate_adds_its_terms_as_documented():
    """Term by term on a given fit: a layer's bytes per token × tokens × batch; without checkpointing every layer's
    plus two hidden states, with it every block input plus one layer plus two; the LoRA (rank 16 on 3 projections of
    30 layers, 3840 → 3840) in fp32 with its gradient and AdamW's two moments."""
    from zerase_core.bench.estimate import CONTEXT_ALLOWANCE_GIB, REAL, MemoryCase, estimate
    from zerase_core.bench.memory import GiB

    dim, layers = REAL["dim"], REAL["n_layers"]
    fit = {"slope_per_dim": 10.0, "intercept": 100.0}
    lora_and_adam = layers * 3 * 16 * 2 * dim * 16  # 16 bytes: fp32 parameter, gradient, m and v
    for batch, ckpt in ((1, False), (3, True)):
        est = estimate(MemoryCase(512, batch, ckpt), fit)
        tokens = 32 * 32 + REAL["caption_tokens"]  # 512² → 32 × 32 image tokens
        layer, hidden = (10.0 * dim + 100.0) * tokens * batch, tokens * dim * 2 * batch
        activations = (layers * hidden + layer if ckpt else layers * layer) + 2 * hidden
        assert est["tokens"] == tokens
        assert est["activations_gib"] == pytest.approx(activations / GiB)
        assert est["lora_and_adam_gib"] == pytest.approx(lora_and_adam / GiB)
        assert est["total_gib"] == pytest.approx((REAL["params"] * 2 + activations + lora_and_adam) / GiB
                                                 + CONTEXT_ALLOWANCE_GIB)


def test_the_pool_reports_its_progress_after_each_batch_and_ends_at_the_total():
    """The Train node's bar is update_absolute(done, total): each batch's end, the last one the whole pool."""
    from zerase_core.xt_pool import TrajectoryPool

    backend = tiny_zimage_backend()
    trainer = ZEraseTrainer(backend, _config())
    prompts, seen = trainer.prompts, []
    TrajectoryPool(backend, prompts.erase, prompts.uncond, prompts.keep, trainer.latent_shape, trainer.sigmas, 6,
                   1.0, 0, batch=4, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 6), (6, 6)]


def test_a_pool_that_fits_exactly_one_trajectory_per_erase_prompt_still_says_how_many_fit(monkeypatch):
    """The refusal names 'at most N trajectories' whenever N covers every erase prompt, N equal to their count too."""
    import psutil

    from zerase_core import memory_fit, xt_pool
    from zerase_core.errors import ZEraseError

    latent = (4, 8, 8)
    one = xt_pool.pool_bytes(1, levels=2, predictions=3, latent_shape=latent)
    memory = type("Memory", (), {"available": int(3.5 * one * memory_fit.MARGIN)})
    swap = type("Swap", (), {"free": 0})
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    monkeypatch.setattr(psutil, "swap_memory", lambda: swap)
    with pytest.raises(ZEraseError, match=r"Choose at most 3 trajectories"):
        xt_pool.check_host_memory(5, 3, levels=2, predictions=3, latent_shape=latent)


def test_pool_halves_its_batch_down_to_one_trajectory_at_a_time(monkeypatch):
    """Where only one trajectory's forward fits, the pool still samples (batch 8 → 4 → 2 → 1), the same pool."""
    from zerase_core.xt_pool import TrajectoryPool

    backend = tiny_zimage_backend()
    trainer = ZEraseTrainer(backend, _config())
    prompts = trainer.prompts
    args = (backend, prompts.erase, prompts.uncond, prompts.keep, trainer.latent_shape, trainer.sigmas, 3, 1.0, 0)
    reference = TrajectoryPool(*args)
    real = backend.velocity

    def one_at_a_time(x, sigma, prompts, **kw):
        if x.shape[0] > 3:  # one trajectory's three predictions
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, sigma, prompts, **kw)

    monkeypatch.setattr(backend, "velocity", one_at_a_time)
    pool = TrajectoryPool(*args, batch=8)
    torch.testing.assert_close(pool.x, reference.x, rtol=0, atol=1e-5)


def test_step_kinds_fractions_are_each_kinds_own_share_of_the_steps():
    """The composed run times weigh the recomputed and the batched steps by their own fractions
    (estimate.TOY_STEP_KINDS): here 1 of 4 steps recomputes L_pr and 2 of 4 are batched, so a fraction taken from
    the other kind shows."""
    from zerase_core.bench.lambda_kinds import step_kinds

    kinds = step_kinds([0.0, 0.5, 0.2, 0.3])
    assert kinds == {"steps": 4, "lambda_zero": 1, "recomputed": 1, "batched": 2, "fraction_lambda_positive": 0.75,
                     "fraction_batched": 0.5, "fraction_recomputed": 0.25}


def test_bench_checkpointing_measures_what_on_checkpoints_beside_the_quarters(tmp_path, monkeypatch):
    """On 8 layers the quarters are 0, 2, 4, 6, 8; "on" checkpoints 7 (all but the last), so that count is measured
    too: the command's table shows what the default setting costs and that the eighth layer saves nothing."""
    import zerase_core.bench.checkpointing as checkpointing
    from zerase_core.cli import main

    asked = []
    monkeypatch.setattr(checkpointing, "measure", lambda backend, config, counts, steps, repeats: asked.append(counts)
                        or {"rows": [], "layers": 8})
    assert main(["bench-checkpointing", "--layers", "8", "--resolution", "64", "--steps", "1", "--repeats", "1",
                 "--out", str(tmp_path / "ckpt.json")]) == 0
    assert asked == [[0, 2, 4, 6, 7, 8]]


def test_bench_checkpointing_takes_time_ratios_and_the_per_layer_time_from_the_timings(tmp_path, capsys, monkeypatch):
    """Timings are not deterministic, so the test pins them: 1 s per step plus 0.5 s per checkpointed layer must read
    as ratios 1, 1.5, 2 against none checkpointed and 0.5 s added per layer (the slope of the time, not the memory).
    Each peak's ratio is against none checkpointed too, and the step measured is the batch-3 one (λ pinned at 1)."""
    import zerase_core.bench.checkpointing as checkpointing
    import zerase_core.trainer as trainer_module
    from zerase_core.cli import main

    monkeypatch.setattr(checkpointing, "interleaved_medians",
                        lambda variants, *a, **k: {n: 1.0 + 0.5 * n for n in variants})
    configs, init = [], trainer_module.ZEraseTrainer.__init__
    monkeypatch.setattr(trainer_module.ZEraseTrainer, "__init__",
                        lambda self, backend, config, *a, **k: configs.append(config) or init(self, backend, config,
                                                                                              *a, **k))
    assert main(["bench-checkpointing", "--layers", "2", "--resolution", "64", "--steps", "1", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [(r["checkpointed_layers"], r["time_ratio"]) for r in rows] == [(0, 1.0), (1, 1.5), (2, 2.0)]
    assert result["added_time_per_layer_s"] == pytest.approx(0.5)
    assert [r["peak_ratio"] for r in rows] == pytest.approx([r["peak_mib"] / rows[0]["peak_mib"] for r in rows])
    assert rows[-1]["peak_ratio"] < 1
    assert [(c.lambda_mode, c.fixed_lambda, c.gradient_checkpointing) for c in configs] == [("fixed", 1.0, "off")]


def test_cost_split_times_each_part_with_its_own_prompts_and_derives_the_differences(monkeypatch):
    """Each part of the split runs the call its name says (teacher batch 2 = [c_er, ∅], batch 3 = [c_er, ∅, c_pr];
    the concept's tokens on the erase prompt only; the λ_t = 0 forward without a graph), and the derived rows are
    the right differences of the timed ones (an inverted difference or a wrong base reads as a plausible number)."""
    from zerase_core.bench import cost_split as split

    trainer = ZEraseTrainer(tiny_zimage_backend(), _config())
    pool = trainer.prompts
    er, tokens, keep = pool.erase[0], list(pool.erase_tokens[0]), pool.keep[0]
    calls: dict[str, list] = {}
    velocity, teacher = trainer.backend.velocity, trainer.teacher_predictions
    current = [None]

    def recording_velocity(x, sigma, prompts, **kw):
        calls.setdefault(current[0], []).append(("student", list(prompts), kw.get("concept_tokens"),
                                                 torch.is_grad_enabled()))
        return velocity(x, sigma, prompts, **kw)

    def recording_teacher(x_t, sigma, prompts):
        calls.setdefault(current[0], []).append(("teacher", list(prompts)))
        with monkeypatch.context() as m:
            m.setattr(trainer.backend, "velocity", velocity)
            return teacher(x_t, sigma, prompts)

    monkeypatch.setattr(trainer.backend, "velocity", recording_velocity)
    monkeypatch.setattr(trainer, "teacher_predictions", recording_teacher)
    seconds = {"student_er_fwd": 1.0, "student_er_fwd_attn": 3.0, "student_er_fwd_attn_bwd": 10.0,
               "student_b3_fwd_attn": 20.0, "student_b3_fwd_attn_bwd": 50.0}

    left: dict[str, list] = {}  # gradients a part leaves for the next part's backward to add to

    def fake_medians(parts, steps, repeats, sync):
        for name, fn in parts.items():
            current[0] = name
            fn()
            left[name] = [p for p in trainer.params if p.grad is not None]
        current[0] = None
        return {name: seconds.get(name, 0.5) for name in parts}

    monkeypatch.setattr(split, "interleaved_medians", fake_medians)
    from zerase_core.bench import memory

    saved, real_saved_bytes = [], memory.saved_bytes
    monkeypatch.setattr(memory, "saved_bytes", lambda *a, **k: saved.append(real_saved_bytes(*a, **k)) or saved[-1])
    clock, sample_xt = [0.0], trainer.sample_xt
    durations = iter([0.0] + [1.0] * 7 + [9.0])  # x_t sampling is timed by its mean (2), not its median (1)

    def timed_sample_xt(prompt):
        clock[0] += next(durations)
        return sample_xt(prompt)

    monkeypatch.setattr(trainer, "sample_xt", timed_sample_xt)
    monkeypatch.setattr(split.time, "perf_counter", lambda: clock[0])
    out = split.cost_split(trainer, 1, 1, lambda: None)
    assert out["fresh_xt_mean"] == 2.0
    (held,) = saved
    assert held[0] > 0 and out["student_pr_graph_saved_mib"] == held[0] / 2**20  # MiB
    assert (out["attn_mass_fwd"], out["student_er_bwd"], out["student_b3_bwd"]) == (2.0, 7.0, 30.0)
    assert calls["teacher_fwd_b2"] == [("teacher", [er, pool.uncond])]
    assert calls["teacher_fwd_b3"] == [("teacher", [er, pool.uncond, keep])]
    assert calls["student_er_fwd"] == [("student", [er], None, True)]
    assert calls["student_er_fwd_attn"] == [("student", [er], [tokens], True)]
    assert calls["student_b3_fwd_attn"] == [("student", [er, pool.uncond, keep], [tokens, [], []], True)]
    assert calls["student_pr_fwd_nograd"] == [("student", [pool.uncond, keep], None, False)]
    assert calls["student_pr_fwd_graph"] == [("student", [pool.uncond, keep], None, True)]
    assert not any(left.values()) and all(p.grad is None for p in trainer.params)


def test_the_cpu_peak_is_an_error_not_zero_where_the_profiler_records_no_allocation(monkeypatch):
    """A peak of 0 would read as "this step needs no memory": a run that allocates nothing, or a torch whose profiler
    lacks the event tree (AttributeError as well as ImportError), is refused by name instead."""
    import torch.profiler

    from zerase_core.bench.memory import cpu_peak_bytes
    from zerase_core.errors import ZEraseError

    with pytest.raises(ZEraseError, match="recorded no allocation"):
        cpu_peak_bytes(lambda: None)

    class NoEventTree:
        profiler = argparse.Namespace(kineto_results=object())  # no experimental_event_tree

        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.profiler, "profile", NoEventTree)
    with pytest.raises(ZEraseError, match="does not record allocations the way the CPU peak is read"):
        cpu_peak_bytes(lambda: torch.zeros(1000))


def test_the_cost_table_prints_each_figure_in_its_own_column():
    """bench-cost's stderr table, from a result whose every figure differs: a swapped column, an inverted default
    marker, a dropped split row, a wrong unit or λ regime would print a plausible table with the wrong numbers."""
    from zerase_core.bench.cost_table import SPLIT_ROWS, table

    s = {"reference": 9.0, "ours_pool_lambda_positive": 3.0, "ours_pool_lambda_zero": 1.5, "gated_esd_pool": 2.0,
         "ours_fresh_lambda_positive": 4.0, "ours_fresh_lambda_zero": 2.5, "gated_esd_fresh": 3.2}
    row = {"model": "tiny", "image_tokens": 16, "default_xt_source": "pool", "seconds_per_step": s,
           "split_seconds": {part: 0.0001 * (i + 1) for i, part in enumerate(SPLIT_ROWS)},
           "paper_lambda_weighted": {src: {"seconds_per_step": w, "speedup_vs_reference": 9.0 / w,
                                           "overhead_vs_gated_esd": w / s[f"gated_esd_{src}"]}
                                     for src, w in (("pool", 2.5), ("fresh", 3.5))}}
    for src in ("pool", "fresh"):
        for lam in ("lambda_positive", "lambda_zero"):
            row[f"speedup_vs_reference_{src}_{lam}"] = 9.0 / s[f"ours_{src}_{lam}"]
            row[f"overhead_vs_gated_esd_{src}_{lam}"] = s[f"ours_{src}_{lam}"] / s[f"gated_esd_{src}"]
    rows = {k: {"minutes": m, "gated_esd_minutes": 5.0, "overhead_vs_gated_esd": 1.1,
                "reference_minutes_lower_bound": 30.0, "speedup_vs_reference_at_least": 4.0,
                "peak_gb_estimate": 40.0, "meets_10_min": True}
            for k, m in (("pool_ckpt", 8.0), ("pool_no_ckpt", 7.0))}
    regime = lambda minutes: {"rows": {k: {"minutes": minutes} for k in rows}}  # noqa: E731
    result = {"device": "cpu", "speed": [row],
              "attention_loss_memory": {"rows": [{"image_tokens": 256, "ours": 3 * 2**20, "materialised": 5 * 2**20}],
                                        "growth_exponent": {"ours": 1.01, "materialised": 1.98}},
              "real_zimage_run_time_estimate": {
                  "toy_lambda_fractions": {"fractions": {"batched": 0.97, "recomputed": 0.02, "lambda_zero": 0.01},
                                           "rows": rows, "memory_budget_gb": 80, "assumptions": {"a": "b"},
                                           "default_settings": {"xt_source": "pool", "checkpointed_layers": 0,
                                                                "of_layers": 30, "minutes": 7.0, "meets_10_min": True}},
                  "lambda_always_zero": regime(6.0), "lambda_always_positive": regime(9.0)}}
    lines = table(result).splitlines()
    assert "x_t source: pool (default)" in lines and "x_t source: fresh" in lines
    assert any(line.split() == ["tiny", "16", "9.000", "3.000", "/", "1.500", "2.000", "3.00×", "/", "6.00×",
                                "1.50", "/", "0.75"] for line in lines)
    assert any(line.split() == ["tiny", "16", "pool", "2.500", "3.60×", "1.25"] for line in lines)
    split = {line.split()[0]: line.split()[1] for line in lines if line.split()[:1] and line.split()[0] in SPLIT_ROWS}
    assert {"fresh_xt_mean", "teacher_fwd_b3", "teacher_fwd_b2", "attn_mass_fwd", "student_er_bwd",
            "student_pr_graph_saved_mib", "student_b3_bwd", "adamw"} <= set(split)
    assert split == {part: f"{0.0001 * (i + 1):.4f}" for i, part in enumerate(SPLIT_ROWS)}
    assert "     256       3.00 MiB       5.00 MiB" in lines
    assert any(line.split()[:4] == ["pool_ckpt", "8.0", "(6.0", "/"] and line.split()[4] == "9.0)" for line in lines)


def test_saved_bytes_count_the_whole_storage_a_saved_view_keeps_alive():
    """A saved slice holds its whole storage for backward: the activation memory is the storage's bytes, not the
    slice's (counting t.nbytes read a step that saves views of a big buffer as nearly free)."""
    from zerase_core.bench.memory import saved_bytes

    y = torch.randn(1000, requires_grad=True) * 2  # a 4000-byte storage
    assert saved_bytes(lambda: y[:10] ** 2)[0] == 4000


def test_growth_exponent_takes_a_zero_measurement_as_flat_not_an_error():
    """A layer whose attention loss saves 0 bytes (nothing beyond the attention itself) has no logarithm: it counts
    as 1 byte, a flat growth, instead of failing the benchmark after its measurements."""
    assert growth_exponent([256, 512, 1024], [0.0, 0.0, 0.0]) == 0.0


def test_interleaved_medians_drop_a_variant_that_runs_out_and_switch_before_each_round(monkeypatch):
    """A variant out of memory at its warm-up is reported once and timed no more (NaN); each round switches to a
    variant before its timed calls; without warm-up the first call is timed; repeats < 1 is refused like steps < 1."""
    from zerase_core.bench import timing
    from zerase_core.errors import ZEraseError

    with pytest.raises(ZEraseError, match="must be at least 1"):
        timing.check_timing(3, 0)
    events, oom = [], []

    def out_of_memory():
        raise ran_out()

    s = timing.interleaved_medians({"big": out_of_memory, "a": lambda: events.append("a")}, steps=2, repeats=2,
                                   sync=lambda: None, on_oom=oom.append,
                                   switch=lambda name: events.append(name[0] + "!"))
    assert oom == ["big"] and s["big"] != s["big"] and s["a"] >= 0  # NaN: no timing of a variant that ran out
    assert events == ["b!", "a!", "a"] + ["a!", "a", "a"] * 2  # warm-up, then each round switches first
    clock = [0.0]
    durations = iter([7.0, 1.0, 1.0])

    def tick():
        clock[0] += next(durations)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    assert timing.interleaved_medians({"c": tick}, steps=3, repeats=1, sync=lambda: None, warm_up=False) == {"c": 1.0}


def test_peak_gib_is_above_what_is_resident(monkeypatch):
    """A variant's peak is what it adds above the weights and pool already held, in GiB; inf where it runs out."""
    from zerase_core.bench import timing

    allocated = {"now": 5 * 2**30, "peak": 5 * 2**30}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def step():
        allocated["peak"] = allocated["now"] + 2**29

    held, failed = [], []

    def too_big():
        activations = torch.ones(1000)
        failed.append(weakref.ref(activations))
        held.append(ran_out())  # outlives the except clause: its frames must not keep the activations
        raise held[-1]

    assert timing.peak_gib({"step": step, "big": too_big}, sync=lambda: None) == {"step": 0.5, "big": float("inf")}
    assert failed[0]() is None
