"""Attention mass from the layer's own (widened) attention call equals the explicit softmax sum, value and gradient."""

from __future__ import annotations

import pytest
import torch
from recorders import keeping_recorders

from zerase_core.attention_mass import attention_with_mass, sdpa
from zerase_core.errors import ZEraseError
from zerase_core.lora import LoRAConfig


def test_one_widened_call_gives_the_attention_output_and_every_words_mass():
    """The layer's own call returns its usual output and the mass of several words, value and gradient,
    with a head size that needs padding, a non-default scale and a padding mask."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 24, 12, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    columns = torch.zeros(3, 2, 24)  # three words
    columns[0, :, [3, 4]] = 1
    columns[1, 0, 20] = 1
    columns[2, 1, [0, 7, 9]] = 1
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[1, 21:] = False
    scale = 0.3
    w_out, w_mass = torch.randn(2, 3, 24, 12, generator=g, dtype=torch.float64), torch.randn(3, 2, 3, 24, generator=g)

    out, mass = attention_with_mass(sdpa, q, k, v, columns, scale, keep[:, None, None, :])
    probs = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
    ref_out = probs @ v
    ref_mass = torch.stack([(probs * c.double()[:, None, None, :]).sum(-1) for c in columns])  # (3, B, H, L)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(mass.double(), ref_mass, rtol=0, atol=1e-6)  # mass is returned as float32
    ours = torch.autograd.grad((out * w_out).sum() + (mass.double() * w_mass).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * w_out).sum() + (ref_mass * w_mass).sum(), (q, k, v))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_in_bf16_the_widened_call_is_as_accurate_as_the_stock_one():
    """The scale goes to the kernel, q is not rescaled: in bf16 the output stays as close to float64 as stock SDPA's
    (rescaling q by √(136/128) instead rounds it again: 1.7× the stock error here)."""
    g = torch.Generator().manual_seed(2)
    q64, k64, v64 = (torch.randn(2, 4, 256, 128, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    q, k, v = (t.to(torch.bfloat16) for t in (q64, k64, v64))
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    stock = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    columns = torch.zeros(1, 2, 256)
    columns[0, :, 200:210] = 1
    ours, _ = attention_with_mass(sdpa, q, k, v, columns)
    err_stock = (stock.double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= 1.25 * err_stock


def test_backend_mass_is_a_probability_share(tiny_backend):
    """Image queries' mass on one word is less than on the whole caption, which is less than 1 (the image gets
    the rest)."""
    tiny_backend.install(LoRAConfig(rank=2))
    enc = tiny_backend.encode(["a red circle"])
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    layout = tiny_backend.layout(x, enc)
    t0, t1 = layout.text[0]
    with torch.no_grad():
        _, red = tiny_backend.velocity(x, sigma, enc, concept_tokens=[[2]])
        _, text = tiny_backend.velocity(x, sigma, enc, concept_tokens=[list(range(t1 - t0))])
    assert 0 < float(red) < float(text) < 1
    full = layout.columns([list(range(t1 - t0))])
    assert full.sum() == t1 - t0


def test_token_zeroing_removes_the_concept_columns(tiny_backend):
    """The §3 baseline: blocked columns get no attention mass, and outputs change only if something is blocked."""
    enc = tiny_backend.encode(["a red circle"])
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        plain, mass = tiny_backend.velocity(x, sigma, enc, concept_tokens=[[2]])
        bare, _ = tiny_backend.velocity(x, sigma, enc)
        with tiny_backend.zeroing_tokens(lambda prompts: [[2]]):
            zeroed, zeroed_mass = tiny_backend.velocity(x, sigma, enc, concept_tokens=[[2]])
        with tiny_backend.zeroing_tokens(lambda prompts: [[]]):
            untouched, _ = tiny_backend.velocity(x, sigma, enc)
    assert float(mass) > 0 and float(zeroed_mass) == 0.0
    assert not torch.allclose(zeroed, plain, atol=1e-3) and torch.equal(untouched, bare)
    # Measuring the mass (in the same attention call, widened) leaves the prediction as it was, up to rounding.
    torch.testing.assert_close(plain, bare, rtol=0, atol=1e-5)


def test_word_maps_are_image_shaped_shares_and_see_the_lora(tiny_backend):
    from zerase_core.attention_maps import word_maps
    from zerase_core.prompts import concept_token_indices

    (enc,) = tiny_backend.encode(["a red circle"])
    columns = [concept_token_indices(enc, "red"), concept_tokens := concept_token_indices(enc, "circle")]
    x0 = torch.randn(1, 4, 12, 8)
    before = word_maps(tiny_backend, enc, columns, x0, [0.3, 0.7], seed=0)
    assert before.shape == (2, 6, 4) and float(before.min()) >= 0 and float(before.max()) < 1
    lora_set = tiny_backend.install(LoRAConfig(rank=4))
    with torch.no_grad():
        for p in lora_set.parameters():
            p.normal_()
    after = word_maps(tiny_backend, enc, columns, x0, [0.3, 0.7], seed=0)
    off = word_maps(tiny_backend, enc, columns, x0, [0.3, 0.7], seed=0, lora=False)
    assert not torch.allclose(after, before) and torch.equal(off, before)
    assert concept_tokens  # "circle" was found
    with torch.no_grad():  # a forward that overflowed (fp16, a strong LoRA): drawn, NaN spoiled the shared colour scale
        next(iter(lora_set.parameters())).fill_(float("inf"))
    with pytest.raises(ZEraseError, match="The attention is not a finite number .NaN or inf. somewhere: the model's"):
        word_maps(tiny_backend, enc, columns, x0, [0.3, 0.7], seed=0)


def test_mass_is_recorded_whatever_attention_backend_diffusers_is_set_to(monkeypatch):
    """The recorded layers run their own SDPA in place of diffusers' attention dispatch, so the mass (and the
    prediction) do not depend on the backend diffusers is set to, here torch's flex attention, which never calls
    torch's SDPA (a hook watching for that call recorded nothing there)."""
    import warnings

    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    from zerase_core.tiny import tiny_zimage_backend

    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)  # set_attention_backend sets it too
    backend = tiny_zimage_backend()
    prompts = backend.encode(["a red ball", "blue sky at night"])
    x = torch.randn(2, *backend.latent_shape(64, 64), generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.7)
    runs = []
    for name in ("native", "flex"):
        backend.transformer.set_attention_backend(name)
        assert {layer.attention.processor.inner._attention_backend for layer in backend.transformer.layers} == {name}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex attention warns that it runs uncompiled
            runs.append(backend.velocity(x, sigma, prompts, concept_tokens=[[1], [0]]))
    (v_native, mass_native), (v_flex, mass_flex) = runs
    assert (mass_native > 0).all()
    torch.testing.assert_close(mass_flex, mass_native, rtol=0, atol=1e-6)
    torch.testing.assert_close(v_flex, v_native, rtol=0, atol=1e-5)  # the refiners ran on flex


def test_checkpointed_layers_replay_a_recorder_that_keeps_no_mass(tiny_backend, monkeypatch):
    """Under gradient checkpointing each main layer runs again in backward and computes its mass again. What it
    replays is the recorder's replay, which keeps nothing: a recorder that kept the recomputed masses held every
    recomputed layer's graph until it died (on the real model at 512², batch 3: 10 GiB above the weights where gated
    ESD took 0.5); a graph that held the recorder with the forward's masses held itself (test_trainer)."""
    from zerase_core.attention_mass import MassRecorder
    from zerase_core.scoped import scoped

    recorders, kept_by = [], []
    keep = MassRecorder.keep
    monkeypatch.setattr(MassRecorder, "keep", lambda self, layer, m: (kept_by.append(self), keep(self, layer, m)))
    tiny_backend.install(LoRAConfig(rank=2))
    tiny_backend.set_gradient_checkpointing(tiny_backend.n_layers)
    enc = tiny_backend.encode(["a red circle", "a blue square"])
    x, sigma = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5)
    with scoped(tiny_backend, recorder_factory=keeping_recorders(recorders)):
        _, mass = tiny_backend.velocity(x, sigma, enc, concept_tokens=[[2], [2]])
    (recorder,) = recorders
    first = {layer: id(t) for layer, t in recorder.per_layer.items()}
    assert len(first) == tiny_backend.n_layers and kept_by == [recorder] * tiny_backend.n_layers
    mass.sum().backward()
    replays = kept_by[tiny_backend.n_layers:]
    assert len(replays) == tiny_backend.n_layers and all(r is recorder.for_replay() for r in replays)
    assert {layer: id(t) for layer, t in recorder.per_layer.items()} == first
    assert recorder.for_replay().per_layer == {}


def test_word_maps_with_gradients_under_checkpointing_count_each_layer_once(tiny_backend):
    """The viewer's recorder replays as the mass recorder does: with gradients and checkpointing on, backward runs
    every layer again, and the maps are those of the plain run, each layer counted once (a replay that added would
    double them; before the shared Recorder the viewer's had no replay at all and backward failed)."""
    from zerase_core.attention_maps import WordMapRecorder

    tiny_backend.install(LoRAConfig(rank=2))
    (enc,) = tiny_backend.encode(["a red circle"])
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    sigma = torch.tensor([0.5])
    layout = tiny_backend.layout(x, [enc])

    def maps(checkpointing: bool):
        tiny_backend.set_gradient_checkpointing(tiny_backend.n_layers if checkpointing else 0)
        recorder = WordMapRecorder([layout.columns([[1]]), layout.columns([[2, 3]])], None)
        out = tiny_backend._run(x, sigma, [enc], layout, True, recorder)
        out.square().sum().backward()
        return recorder

    plain, replayed = maps(False), maps(True)
    assert replayed.seen == plain.seen == set(range(tiny_backend.n_layers))
    torch.testing.assert_close(replayed.per_query(), plain.per_query(), rtol=0, atol=1e-6)
    assert replayed.for_replay().sums is None and replayed.for_replay().seen == set()


def test_the_recorded_mass_is_the_mean_over_image_queries_and_then_over_layers():
    """Eq. 6's reduction on hand-worked numbers: image query rows only (padding and caption rows left out), then the
    mean over recorded layers. Averaging over every row or summing over layers would both pass a range check."""
    from zerase_core.attention_mass import MassRecorder

    recorder = MassRecorder(columns=torch.zeros(1, 4, dtype=torch.bool), query_rows=torch.tensor([[1, 1, 0, 0]]))
    recorder.keep(0, torch.tensor([[0.2, 0.4, 0.9, 0.9]]))  # image queries: (0.2 + 0.4) / 2 = 0.3
    recorder.keep(1, torch.tensor([[0.6, 0.8, 0.0, 0.0]]))  # 0.7
    assert recorder.result().tolist() == pytest.approx([0.5])  # (0.3 + 0.7) / 2


def test_a_map_request_is_checked_before_any_model_runs():
    """The Attention Map Viewer's inputs, checked in the engine (testable without ComfyUI): a word and a noise level
    in (0, 1], a layer range that is not empty (cut at the model's last layer), a latent of the model's channels."""
    from zerase_core.attention_maps import check_comparable, check_latent, check_request, layer_range
    from zerase_core.errors import ZEraseError

    check_request(["cat"], [0.5, 1.0])
    with pytest.raises(ZEraseError, match="^give at least one word and one noise level"):
        check_request([], [0.5])
    with pytest.raises(ZEraseError, match=r"noise levels must lie in \(0, 1\]; got \[0.0\]"):
        check_request(["cat"], [0.0])
    assert layer_range(30, 0, -1) == range(0, 30) and layer_range(30, 5, 100) == range(5, 30)
    with pytest.raises(ZEraseError, match=r"layer range 30..-1 is empty; the model has 30 layers"):
        layer_range(30, 30, -1)
    check_latent(torch.zeros(1, 16, 8, 8), 16)
    with pytest.raises(ZEraseError, match=r"holds no image \(batch size 0\)"):
        check_latent(torch.zeros(0, 16, 8, 8), 16)
    with pytest.raises(ZEraseError, match=r"the latent has shape \(1, 4, 8, 8\); Z-Image's have 16 channels"):
        check_latent(torch.zeros(1, 4, 8, 8), 16)
    with pytest.raises(ZEraseError, match=r"the latent has shape \(1, 16, 8, 0\)"):  # was reshape's RuntimeError
        check_latent(torch.zeros(1, 16, 8, 0), 16)
    for bad in (float("nan"), float("inf")):  # the maps' own check blamed the model's forward ("fp16 weights")
        broken = torch.zeros(1, 16, 8, 8)
        broken[0, 3, 2, 5] = bad
        with pytest.raises(ZEraseError, match=r"^the latent is not finite numbers \(NaN or inf\): the LATENT, or the "):
            check_latent(broken, 16)
    check_comparable({"dim": 64}, {"dim": 64})
    with pytest.raises(ZEraseError, match="model_b is another architecture than model"):
        check_comparable({"dim": 64}, {"dim": 3840})


def test_mass_recorder_averages_the_concept_mass_over_heads():
    """M3: MassRecorder.attend's per-query mass is the MEAN over heads of softmax(qkᵀ/√d)[:, concept columns],
    against a materialised softmax (heads made to differ, so max/sum/one head all miss by far more than 1e-5)."""
    from zerase_core.attention_mass import MassRecorder, sdpa

    g = torch.Generator().manual_seed(0)
    b, h, n, d = 1, 4, 6, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g) * 2 for _ in range(3))
    columns = torch.zeros(b, n)
    columns[0, 1] = 1.0
    rows = torch.tensor([[0, 0, 1, 1, 1, 1]])
    recorder = MassRecorder(columns, rows)
    recorder.attend(0, sdpa, q, k, v)
    p = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)[..., 1]  # (B, H, L)
    expected = (p.mean(dim=1) * rows).sum(dim=1) / rows.sum(dim=1)
    assert p.std(dim=1).mean() > 0.05  # heads really differ
    torch.testing.assert_close(recorder.result(), expected, rtol=1e-5, atol=1e-6)


def test_rows_without_concept_columns_are_attended_without_the_widened_heads():
    """A training step's [c_er, ∅, c_pr]: only c_er's row has mass to measure, yet all three ran with heads widened
    for the indicator channel (a quarter of their attention's cost at head size 32 on the CPU, a profile found). Now
    the other rows are attended as the host attends: the same output and mass, the widened call on one row."""
    from zerase_core.attention_mass import MassRecorder, sdpa
    from zerase_core.backends.base import _leading_rows

    cases = ([[3], [], []], [[3], [1], []], [[], [3]], [[3]], [[], []])
    assert [_leading_rows(tokens) for tokens in cases] == [1, 2, None, 1, 0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 24, 32, generator=g) for _ in range(3))
    columns, rows = torch.zeros(3, 24), torch.zeros(3, 24)
    columns[0, 20], rows[:, :16] = 1.0, 1.0
    mask = torch.ones(3, 1, 1, 24, dtype=torch.bool)
    mask[1:, ..., 22:] = False  # shorter captions' padding: each row keeps its own mask
    calls = []

    def attention(q, k, v, scale, mask):
        calls.append((q.shape[0], q.shape[-1]))
        return sdpa(q, k, v, scale, mask)

    whole, split = MassRecorder(columns, rows), MassRecorder(columns, rows, mass_rows=1)
    out_whole = whole.attend(0, attention, q, k, v, None, mask)
    out_split = split.attend(0, attention, q, k, v, None, mask)
    assert calls == [(3, 40), (1, 40), (2, 32)]  # 32 + 1 indicator channel, aligned to 8; then each part
    torch.testing.assert_close(out_split, out_whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(split.result(), whole.result(), atol=1e-7, rtol=0)
    assert split.result()[1:].eq(0).all() and split.result()[0] > 0
    # a mask of fewer dimensions broadcasts over the batch: each part takes it whole, not cut along another axis
    flat = torch.zeros(24, 24)
    flat[:, 22:] = -1e4
    torch.testing.assert_close(split.attend(0, sdpa, q, k, v, None, flat), whole.attend(0, sdpa, q, k, v, None, flat),
                               atol=1e-6, rtol=0)
    # ComfyUI runs ∅ alone when its caption pads shorter: a call without concept columns widens nothing
    none = MassRecorder(torch.zeros(3, 24), rows, mass_rows=0)
    calls.clear()
    torch.testing.assert_close(none.attend(0, attention, q, k, v, None, mask), out_whole, atol=1e-6, rtol=0)
    assert calls == [(3, 32)] and none.result().eq(0).all()


def test_a_batch_one_4d_mask_reaches_both_parts_of_a_split_call_whole():
    """MassRecorder's split call ([c_er] with mass, [∅, c_pr] without) with a 4-D mask of batch 1: ComfyUI's 2-D mask as
    _sdpa_mask shapes it, (1, 1, L, L). batch_rows must hand each part the mask whole; cut along its batch axis the
    tail's part got an empty mask (a mutation audit: dropping `mask.shape[0] == 1` failed no test)."""
    from zerase_core.attention_mass import MassRecorder

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 24, 32, generator=g) for _ in range(3))
    columns, rows = torch.zeros(3, 24), torch.zeros(3, 24)
    columns[0, 20], rows[:, :16] = 1.0, 1.0
    mask = torch.ones(1, 1, 24, 24, dtype=torch.bool)
    mask[..., 22:] = False  # a caption's padding, the same for every row
    whole, split = MassRecorder(columns, rows), MassRecorder(columns, rows, mass_rows=1)
    out_whole = whole.attend(0, sdpa, q, k, v, None, mask)
    out_split = split.attend(0, sdpa, q, k, v, None, mask)
    torch.testing.assert_close(out_split, out_whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(split.result(), whole.result(), atol=1e-7, rtol=0)
    unmasked = MassRecorder(columns, rows).attend(0, sdpa, q, k, v, None, None)
    assert not torch.allclose(out_whole, unmasked, atol=1e-3)  # the mask matters


def test_layer_range_end_is_exclusive_and_zero_is_empty():
    """layer_end is exclusive (the Viewer's tooltip); 0 is an empty range, not "to the last layer" (only -1 is)."""
    from zerase_core.attention_maps import layer_range

    assert layer_range(30, 0, 10) == range(0, 10) and layer_range(30, 29, 30) == range(29, 30)
    assert list(layer_range(30, 3, 5)) == [3, 4]
    with pytest.raises(ZEraseError, match=r"layer range 0..0 is empty"):
        layer_range(30, 0, 0)
    with pytest.raises(ZEraseError, match=r"layer range 5..5 is empty"):
        layer_range(30, 5, 5)


def test_image_maps_are_the_image_tokens_row_major_averaged_over_the_layers_seen():
    """A map's token (r, c) is image token r·w + c, and a map is the MEAN over the recorded layers (not their sum)."""
    from types import SimpleNamespace

    from zerase_core.attention_maps import WordMapRecorder

    recorder = WordMapRecorder([torch.ones(1, 10)], None)
    recorder.forget()
    recorder.sums, recorder.seen = [torch.arange(10.0) * 2], {0, 1}  # two layers' sums
    maps = recorder.image_maps(SimpleNamespace(image=((3, 9),)), 2, 3)
    assert torch.equal(maps, torch.tensor([[[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]]))


def test_word_map_recorder_averages_each_words_mass_over_heads():
    """WordMapRecorder's per-query map is the MEAN over heads of softmax(qkᵀ/√d)[:, the word's columns]."""
    from zerase_core.attention_maps import WordMapRecorder

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g) * 2 for _ in range(3))
    first, second = torch.zeros(1, 6), torch.zeros(1, 6)
    first[0, 1], second[0, [2, 3]] = 1.0, 1.0
    recorder = WordMapRecorder([first, second], None)
    recorder.forget()
    recorder.attend(0, sdpa, q, k, v)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)[0]  # (H, L, L)
    expected = torch.stack([p[..., 1].mean(dim=0), p[..., 2:4].sum(dim=-1).mean(dim=0)])
    torch.testing.assert_close(recorder.per_query(), expected, rtol=1e-5, atol=1e-6)


def test_word_maps_average_the_maps_at_each_noise_level_of_one_seeded_noise(tiny_backend):
    """x_σ = σ·ε + (1 − σ)·x0 with ε from ``seed``, and the maps' mean over the levels."""
    from zerase_core.attention_maps import word_maps
    from zerase_core.prompts import concept_token_indices

    (enc,) = tiny_backend.encode(["a red circle"])
    columns = [concept_token_indices(enc, "red")]
    x0 = torch.randn(1, 4, 8, 8)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    at = {s: tiny_backend.attention_maps(s * noise + (1 - s) * x0, torch.tensor([s]), enc, columns, None)
          for s in (0.3, 0.7)}
    torch.testing.assert_close(word_maps(tiny_backend, enc, columns, x0, [0.3], seed=5), at[0.3])
    torch.testing.assert_close(word_maps(tiny_backend, enc, columns, x0, [0.3, 0.7], seed=5), (at[0.3] + at[0.7]) / 2)


def test_scoped_puts_the_old_values_back_when_the_body_raises():
    """A cancelled or failed forward must not leave its per-call state (a layout, a recorder) on the backend: the next
    call would be gated by it."""
    from types import SimpleNamespace

    from zerase_core.scoped import scoped

    obj = SimpleNamespace(layout="old", recorder=None)
    with pytest.raises(KeyboardInterrupt):
        with scoped(obj, layout="new", recorder="r") as inside:
            assert (inside.layout, inside.recorder) == ("new", "r")
            raise KeyboardInterrupt
    assert (obj.layout, obj.recorder) == ("old", None)


def test_token_zeroing_zeroes_the_columns_after_the_softmax_as_the_paper_does():
    """§3 zeroes the concept's attention columns, A_attn[:, :, idx] = 0, leaving the other columns' weights as they
    were; the baseline removed the keys before the softmax instead, which hands their weight to the other columns."""
    from zerase_core.backends.diffusers_zimage import _AttentionCall

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, 8, generator=g) for _ in range(3))  # diffusers' (B, L, H, D)
    blocked = torch.zeros(2, 6, dtype=torch.bool)
    blocked[0, 2] = blocked[1, 4] = True
    out = _AttentionCall(None, 0, blocked)(q, k, v)
    weights = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / 8 ** 0.5, dim=-1)  # (B, H, L, L)
    zeroed = weights.masked_fill(blocked[:, None, None, :], 0)
    removed = zeroed / zeroed.sum(dim=-1, keepdim=True)
    want, renormalised = (torch.einsum("bhlm,bmhd->blhd", w, v) for w in (zeroed, removed))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert not torch.allclose(out, renormalised, atol=1e-3)


def test_attention_maps_under_token_zeroing_show_no_mass_on_the_zeroed_word(tiny_backend):
    """The maps, like the mass, read A_attn: zeroed columns hold none. Zeroing acts on the values, so the recorders
    see the softmax before it, and the maps drew the word's attention as if nothing were zeroed (a review)."""
    enc = tiny_backend.encode(["a red circle"])[0]
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    plain = tiny_backend.attention_maps(x, sigma, enc, [[2], [3]])
    with tiny_backend.zeroing_tokens(lambda prompts: [[2]]):
        zeroed = tiny_backend.attention_maps(x, sigma, enc, [[2], [3]])
    assert float(plain[0].sum()) > 0 and float(zeroed[0].sum()) == 0.0 and float(zeroed[1].sum()) > 0


def test_token_zeroing_applies_without_measuring_mass(tiny_backend):
    """Zeroing is the §3 baseline's own forward: it removes the columns whether or not the call also measures the
    concept's attention mass (a sampling call measures none)."""
    enc = tiny_backend.encode(["a red circle"])
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        bare, _ = tiny_backend.velocity(x, sigma, enc)
        with tiny_backend.zeroing_tokens(lambda prompts: [[2]]):
            zeroed, _ = tiny_backend.velocity(x, sigma, enc)
            measured, mass = tiny_backend.velocity(x, sigma, enc, concept_tokens=[[2]])
    assert float(mass) == 0.0 and not torch.allclose(zeroed, bare, atol=1e-3)
    torch.testing.assert_close(zeroed, measured, rtol=0, atol=1e-5)


def test_token_zeroing_keeps_the_batchs_padding_mask(tiny_backend):
    """Zeroing leaves diffusers' own mask of each row's padding in place: a short prompt batched beside a long one (a
    longer padded sequence) gets the same zeroed prediction as alone, not attention on padding."""
    short, long = tiny_backend.encode(["a red circle", " ".join(["red"] * 40)])
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    with torch.no_grad(), tiny_backend.zeroing_tokens(lambda prompts: [[2]] * len(prompts)):
        alone, _ = tiny_backend.velocity(x, sigma, [short])
        batched, _ = tiny_backend.velocity(x.expand(2, -1, -1, -1), sigma.expand(2), [short, long])
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-5)


def test_attention_maps_see_the_lora_unless_told_not_to(tiny_backend):
    """Backend.attention_maps documents ``lora=True`` as its default: a caller that does not say (a script drawing
    the erased model's maps) sees the trained LoRA, not the base model."""
    (enc,) = tiny_backend.encode(["a red circle"])
    lora_set = tiny_backend.install(LoRAConfig(rank=4))
    with torch.no_grad():
        for p in lora_set.parameters():
            p.normal_()
    x, sigma, columns = torch.randn(1, 4, 8, 8), torch.tensor([0.5]), [[2]]
    default = tiny_backend.attention_maps(x, sigma, enc, columns)
    on = tiny_backend.attention_maps(x, sigma, enc, columns, lora=True)
    off = tiny_backend.attention_maps(x, sigma, enc, columns, lora=False)
    assert torch.equal(default, on) and not torch.allclose(default, off)
