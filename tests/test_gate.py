"""The invariant everything rests on: the LoRA never touches the image stream (paper Eq. 4)."""

from __future__ import annotations

import pytest
import torch

from zerase_core.attention_mass import MassRecorder
from zerase_core.backends.diffusers_zimage import DiffusersZImageBackend
from zerase_core.lora import GatedLoRALinear, LoRAConfig

from devices import ON_DEVICES


def _randomise_lora(lora_set, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_set.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _record_projections(transformer):
    """Hook every gated layer: keep (input, output, text mask) of each call."""
    calls = []
    handles = []
    for name, module in transformer.named_modules():
        if isinstance(module, GatedLoRALinear):

            def hook(mod, args, out, name=name):
                mask = mod.gate.layout.text_mask(args[0].device).clone()
                calls.append((name, mod, args[0].detach(), out.detach(), mask))

            handles.append(module.register_forward_hook(hook))
    return calls, handles


def _run(backend: DiffusersZImageBackend, hw, prompts, lora=True):
    encoded = backend.encode(prompts)
    c, h, w = backend.latent_shape(*hw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), c, h, w, generator=g)
    sigma = torch.full((len(prompts),), 0.7)
    with torch.no_grad():
        v, _ = backend.velocity(x, sigma, encoded, lora=lora)
    return v


CASES = {
    "64px": ((64, 64), ["a red circle"]),
    "128x64px": ((128, 64), ["a red circle on the left of a very large blue square"]),
    "batch of two captions": ((64, 64), ["red", "a red circle on the left of a very large blue square " * 3]),
    "cfg pair": ((96, 96), ["a red circle", ""]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_image_rows_equal_base_and_text_rows_differ(tiny_backend, case):
    hw, prompts = CASES[case]
    lora_set = tiny_backend.install(LoRAConfig(rank=4))
    _randomise_lora(lora_set)
    calls, handles = _record_projections(tiny_backend.transformer)
    _run(tiny_backend, hw, prompts)
    for h in handles:
        h.remove()
    assert len(calls) == 3 * tiny_backend.n_layers  # every q, k, v of every main layer ran
    for name, module, x, y, text in calls:
        base = module.base_layer(x)
        image = ~text
        assert torch.equal(y[image], base[image]), f"{name}: image rows changed"
        assert not torch.allclose(y[text], base[text]), f"{name}: text rows unchanged although B != 0"


def test_layout_follows_the_call(tiny_backend):
    """Text spans come from each call: two resolutions and two caption lengths give different layouts."""
    enc = tiny_backend.encode(["red", "a red circle " * 12])
    small = tiny_backend.layout(torch.zeros(2, 4, 8, 8), enc)
    large = tiny_backend.layout(torch.zeros(2, 4, 16, 24), enc)  # 8 × 12 patches: 96 image tokens, not square
    assert small.image == ((0, 32), (0, 32)) and small.text == ((32, 64), (32, 96)) and small.seq_len == 96
    assert large.image == ((0, 96), (0, 96)) and large.text == ((96, 128), (96, 160)) and large.seq_len == 160


def test_attention_loss_queries_leave_image_padding_out(tiny_backend):
    """6 × 6 patches = 36 image tokens padded to 64: L_attn averages over the 36 real image queries only."""
    enc = tiny_backend.encode(["a red circle"])
    layout = tiny_backend.layout(torch.zeros(1, 4, 12, 12), enc)
    assert layout.image == ((0, 64),) and layout.image_mask().sum() == 64
    assert layout.image_query_mask()[0, :36].all() and layout.image_query_mask().sum() == 36
    seen = []
    def recorder(cols, rows, layers, **kw):
        seen.append(rows)
        return MassRecorder(cols, rows, layers, **kw)

    tiny_backend.recorder_factory = recorder
    tiny_backend.velocity(torch.zeros(1, 4, 12, 12), torch.tensor([0.5]), enc, concept_tokens=[[0]])
    assert torch.equal(seen[0], layout.image_query_mask())


def test_zero_lora_and_lora_off_match_base(tiny_backend):
    prompts = ["a red circle", ""]
    base = _run(tiny_backend, (64, 64), prompts)
    lora_set = tiny_backend.install(LoRAConfig(rank=4))
    assert torch.equal(_run(tiny_backend, (64, 64), prompts), base)  # B = 0 changes nothing
    _randomise_lora(lora_set)
    assert not torch.allclose(_run(tiny_backend, (64, 64), prompts), base)
    assert torch.equal(_run(tiny_backend, (64, 64), prompts, lora=False), base)  # switched off


def test_unpatch_restores_modules(tiny_backend):
    before = {n: m for n, m in tiny_backend.transformer.named_modules()}
    v0 = _run(tiny_backend, (64, 64), ["a red circle"])
    _randomise_lora(tiny_backend.install(LoRAConfig(rank=4)))
    tiny_backend.uninstall()
    after = {n: m for n, m in tiny_backend.transformer.named_modules()}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert torch.equal(_run(tiny_backend, (64, 64), ["a red circle"]), v0)


def test_only_lora_parameters_get_gradients(tiny_backend):
    # Layer 0 only: in the last main layer, text-row queries feed only text outputs, which the
    # final layer discards, so a q-LoRA there has an exactly zero gradient.
    lora_set = tiny_backend.install(LoRAConfig(rank=4, targets=("q", "v"), layers=(0, 1)))
    _randomise_lora(lora_set)
    for p in lora_set.parameters():
        p.requires_grad_(True)
    enc = tiny_backend.encode(["a red circle"])
    v, mass = tiny_backend.velocity(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), enc, concept_tokens=[[2]])
    (v.square().mean() + mass.sum()).backward()
    lora_params = {id(p) for p in lora_set.parameters()}
    for name, p in tiny_backend.transformer.named_parameters():
        if id(p) in lora_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"{name} got a gradient"
    # targets and layer range were honoured: layer 1 and k are untouched
    assert {k for k in lora_set.slots} == {(0, "q"), (0, "v")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_stays_fp32_on_low_precision_base(dtype):
    base = torch.nn.Linear(16, 48, bias=False).to(dtype)
    from zerase_core.gate import TokenGate
    from zerase_core.layout import TokenLayout

    gate = TokenGate()
    layer = GatedLoRALinear(base, {"q": (0, 16), "k": (16, 32), "v": (32, 48)}, gate)
    adapter = layer.add_adapter("a", ("q", "v"), rank=2, scale=1.0)
    with torch.no_grad():
        adapter.B["q"].fill_(0.1)
        adapter.B["v"].fill_(0.1)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    x = torch.randn(1, 8, 16).to(dtype)
    with gate.active(TokenLayout(8, ((5, 8),), ((0, 5),))):
        y = layer(x)
    base_y = base(x)
    assert y.dtype == dtype
    assert torch.equal(y[0, :5], base_y[0, :5])
    assert torch.equal(y[0, 5:, 16:32], base_y[0, 5:, 16:32])  # k slice has no adapter
    assert not torch.equal(y[0, 5:, :16], base_y[0, 5:, :16])


def test_a_gated_layer_brings_its_adapters_to_the_device_it_computes_on():
    """A host that offloads (ComfyUI, diffusers' group offloading) may leave the adapters where they were made: the
    layer moves them to its input's device and, called while sampling (inference mode), without making them inference
    tensors. A CPU has no second device: "meta" stands in (a move onto it makes new Parameters, where one between a
    CPU and a GPU keeps them, so the Parameters are not compared)."""
    from zerase_core.gate import TokenGate
    from zerase_core.layout import TokenLayout

    gate = TokenGate()
    layer = GatedLoRALinear(torch.nn.Linear(16, 16, device="meta"), {"q": (0, 16)}, gate)
    adapter = layer.add_adapter("a", ("q",), rank=2, scale=1.0, device=torch.device("cpu"))
    with torch.inference_mode(), gate.active(TokenLayout(8, ((5, 8),), ((0, 5),))):
        y = layer(torch.randn(1, 8, 16, device="meta"))
    params = list(adapter.parameters())
    assert y.device.type == "meta" and len(params) == 2
    assert all(p.device.type == "meta" and not p.is_inference() for p in params)
    # A second adapter made later where the base's weights wait (a second LoRA under leaf-level offloading) is
    # brought along, though the first is there already (only the first was looked at: a review)
    later = layer.add_adapter("b", ("q",), rank=2, scale=1.0, device=torch.device("cpu"))
    with gate.active(TokenLayout(8, ((5, 8),), ((0, 5),))):
        layer(torch.randn(1, 8, 16, device="meta"))
    assert all(p.device.type == "meta" for p in later.parameters())


def test_a_cast_with_a_move_moves_the_adapters_and_keeps_them_fp32():
    """``pipe.to(device, torch.bfloat16)`` reaches the adapters as submodules: the cast is refused them (their
    factors stay fp32) but the move in the same call goes through, else they stayed behind until the first call
    fetched them. "meta" stands in for a second device."""
    from zerase_core.gate import TokenGate

    layer = GatedLoRALinear(torch.nn.Linear(16, 16), {"q": (0, 16)}, TokenGate())
    adapter = layer.add_adapter("a", ("q",), rank=2, scale=1.0)
    layer.to("meta", torch.bfloat16)
    assert layer.base_layer.weight.device.type == "meta" and layer.base_layer.weight.dtype == torch.bfloat16
    assert [(p.device.type, p.dtype) for p in adapter.parameters()] == [("meta", torch.float32)] * 2


@pytest.mark.parametrize("device", ON_DEVICES)
def test_adapters_brought_to_the_layers_device_while_sampling_still_train_with_their_optimizer(device):
    """A LoRA applied while another trains on top (ComfyUI: Apply, then Z-Erase Train) is called first in inference
    mode and moved then: the move keeps each Parameter, so an optimizer made before it steps the moved factors, and
    leaves them trainable (not inference tensors)."""
    from zerase_core.gate import TokenGate
    from zerase_core.layout import TokenLayout

    gate = TokenGate()
    layer = GatedLoRALinear(torch.nn.Linear(16, 16, device=device), {"q": (0, 16)}, gate)
    adapter = layer.add_adapter("a", ("q",), rank=2, scale=1.0, device=torch.device("cpu"))
    params = [adapter.A["q"], adapter.B["q"]]
    optimizer = torch.optim.SGD(params, lr=1.0)
    x = torch.randn(1, 8, 16, device=device)
    layout = TokenLayout(8, ((5, 8),), ((0, 5),))
    with torch.inference_mode(), gate.active(layout):
        layer(x)
    assert adapter.A["q"] is params[0] and adapter.B["q"] is params[1]
    assert all(p.device.type == device and not p.is_inference() for p in params)
    with gate.active(layout):
        layer(x).sum().backward()
    before = params[1].detach().clone()
    optimizer.step()
    assert not torch.equal(params[1].detach(), before)


def test_a_layout_first_met_in_inference_mode_serves_a_later_training_call(tiny_backend):
    """One layout object serves every call with its segments (TokenLayout.of). Met first while sampling in inference
    mode (every ComfyUI node runs so: a sampler with an applied LoRA), its row indices were inference tensors, and a
    training call with the same layout could not save them for backward (tests/test_comfy_nodes.py has the nodes'
    case: Train after a KSampler)."""
    from zerase_core.layout import _layout

    _layout.cache_clear()  # the layout met first here, whatever earlier tests in this process met
    lora_set = tiny_backend.install(LoRAConfig(rank=2))
    prompts = tiny_backend.encode(["a red circle seen in inference mode"])
    x, sigma = torch.randn(1, *tiny_backend.latent_shape(64, 64)), torch.tensor([0.5])
    with torch.inference_mode():
        tiny_backend.velocity(x, sigma, prompts, lora=True)
    v, _ = tiny_backend.velocity(x, sigma, prompts, lora=True)
    v.float().square().sum().backward()
    assert all(p.grad is not None for p in lora_set.parameters())
    assert any(p.grad.abs().sum() > 0 for p in lora_set.parameters())


def test_gated_layer_refuses_to_run_without_layout():
    from zerase_core.gate import TokenGate

    layer = GatedLoRALinear(torch.nn.Linear(4, 4), {"q": (0, 4)}, TokenGate())
    layer.add_adapter("a", ("q",), rank=1, scale=1.0)
    with pytest.raises(RuntimeError, match="without a token layout"):
        layer(torch.randn(1, 3, 4))


def test_a_layout_places_concept_columns_in_its_text_segment_and_refuses_what_lies_outside():
    """diffusers' [image | caption]: a caption token's column is counted from the text segment's start, not from 0,
    which is an image token (L_attn would then push the mass off an image token). Indices outside the caption, and a
    layout whose segments overlap or an input of another shape, are refused: each would put a concept column or the
    LoRA on an image token."""
    from zerase_core.gate import TokenGate
    from zerase_core.layout import TokenLayout

    image_first = TokenLayout(8, ((4, 8),), ((0, 4),))
    assert image_first.columns([[1]])[0].nonzero().flatten().tolist() == [5]
    caption_first = TokenLayout(8, ((0, 4),), ((4, 8),))
    assert caption_first.columns([[1]])[0].nonzero().flatten().tolist() == [1]
    for layout, index in ((caption_first, 4), (image_first, 4), (image_first, -1)):
        with pytest.raises(ValueError, match=f"caption token {index} lies outside the text segment"):
            layout.columns([[index]])
    with pytest.raises(ValueError, match="overlap"):
        TokenLayout(8, ((0, 6),), ((4, 8),))
    gate = TokenGate()
    layer = GatedLoRALinear(torch.nn.Linear(4, 4), {"q": (0, 4)}, gate)
    layer.add_adapter("a", ("q",), rank=1, scale=1.0)
    with gate.active(TokenLayout(8, ((0, 4), (0, 4)), ((4, 8), (4, 8)))):
        with pytest.raises(RuntimeError, match=r"input \(1, 16, 4\) does not match the layout \(batch 2, seq 8\)"):
            layer(torch.randn(1, 16, 4))


def test_ungated_ablation_changes_image_rows(tiny_backend):
    """scope='all' is the paper's naive fine-tuning: it must touch image rows (and the gate must not)."""
    lora_set = tiny_backend.install(LoRAConfig(rank=4, scope="all"))
    _randomise_lora(lora_set)
    calls, handles = _record_projections(tiny_backend.transformer)
    _run(tiny_backend, (64, 64), ["a red circle"])
    for h in handles:
        h.remove()
    name, module, x, y, text = calls[0]
    assert not torch.allclose(y[~text], module.base_layer(x)[~text])


def test_fused_qkv_and_separate_projections_agree_from_the_same_weights():
    """One set of factors on diffusers' to_q/to_k/to_v and on ComfyUI's fused qkv gives the same q, k, v."""
    from zerase_core.gate import TokenGate
    from zerase_core.layout import TokenLayout

    torch.manual_seed(0)
    d = 16
    separate = {p: torch.nn.Linear(d, d, bias=False) for p in "qkv"}
    fused = torch.nn.Linear(d, 3 * d, bias=False)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([separate[p].weight for p in "qkv"]))
    gate = TokenGate()
    fused_layer = GatedLoRALinear(fused, {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}, gate)
    fused_adapter = fused_layer.add_adapter("e", ("q", "k", "v"), rank=3, scale=0.5)
    outputs = []
    for p in "qkv":
        layer = GatedLoRALinear(separate[p], {p: (0, d)}, gate)
        adapter = layer.add_adapter("e", (p,), rank=3, scale=0.5)
        with torch.no_grad():
            adapter.A[p].normal_()
            adapter.B[p].normal_()
            fused_adapter.A[p].copy_(adapter.A[p])
            fused_adapter.B[p].copy_(adapter.B[p])
        outputs.append(layer)
    x = torch.randn(2, 10, d)
    with gate.active(TokenLayout(10, ((6, 10), (4, 10)), ((0, 6), (0, 4)))):
        y_fused = fused_layer(x)
        y_separate = torch.cat([layer(x) for layer in outputs], dim=-1)
    assert torch.allclose(y_fused, y_separate, atol=1e-6)


def test_two_adapters_on_one_layer_both_reach_the_text_rows():
    """Several adapters on one gated layer add up (lora.py: an applied erasure LoRA and one trained on top of it, or two
    applied ones): text rows get base + Σ ΔW_i x, image rows stay the base's (a mutation audit: a layer that used
    only its first adapter failed no test)."""
    from zerase_core.gate import TokenGate
    from zerase_core.layout import TokenLayout

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 16, bias=False)
    gate = TokenGate()
    layer = GatedLoRALinear(base, {"q": (0, 8), "k": (8, 16)}, gate)
    first = layer.add_adapter("applied", ("q",), rank=2, scale=1.0, strength=0.5)
    second = layer.add_adapter("trained", ("q", "k"), rank=3, scale=2.0)
    with torch.no_grad():
        for p in (*first.parameters(), *second.parameters()):
            p.normal_()
    x = torch.randn(1, 6, 8)
    with gate.active(TokenLayout(6, ((4, 6),), ((0, 4),))):
        y = layer(x)
    text = x[0, 4:]
    expected_q = base(x)[0, 4:, :8] + first.delta("q", text) + second.delta("q", text)
    expected_k = base(x)[0, 4:, 8:] + second.delta("k", text)
    torch.testing.assert_close(y[0, 4:, :8], expected_q)
    torch.testing.assert_close(y[0, 4:, 8:], expected_k)
    assert torch.equal(y[0, :4], base(x)[0, :4])


def test_input_gradient_includes_the_lora_on_text_rows_only():
    """The gated layer's gradient reaches its input through the LoRA too: d(x ΔWᵀ)/dx on text rows. Cut there (a detach
    of the text rows fed to the adapters), every LoRA before a later gated layer lost that path, and the update
    differed from ∇L_total; a mutation audit found no test that noticed (each compared the trainer's gradient with
    autograd's on the same, cut graph)."""
    from zerase_core.gate import TokenGate
    from zerase_core.layout import TokenLayout

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
    gate = TokenGate()
    layer = GatedLoRALinear(base, {"q": (0, 8)}, gate)
    adapter = layer.add_adapter("e", ("q",), rank=2, scale=0.5)
    with torch.no_grad():
        adapter.B["q"].normal_()
    x = torch.randn(1, 6, 8, requires_grad=True)
    w = torch.randn(1, 6, 8)
    with gate.active(TokenLayout(6, ((4, 6),), ((0, 4),))):
        (layer(x) * w).sum().backward()
    delta_w = 0.5 * adapter.B["q"] @ adapter.A["q"]  # (out, in)
    text = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.float32)[None, :, None]
    expected = w @ base.weight + text * (w @ delta_w)
    torch.testing.assert_close(x.grad, expected.detach())


def test_a_new_backend_over_a_transformer_with_a_lora_owns_its_gates_and_can_remove_it(tiny_backend):
    """A second backend made over a transformer whose layers an earlier backend gated takes those layers over: they
    read its gate (the earlier backend's has no layout for the new backend's calls) and its uninstall() puts the
    stock Linears back (else the LoRA could never be removed through the backend that now runs the model)."""
    before = {n: m for n, m in tiny_backend.transformer.named_modules()}
    v0 = _run(tiny_backend, (64, 64), ["a red circle"])
    _randomise_lora(tiny_backend.install(LoRAConfig(rank=4)))
    lora_v = _run(tiny_backend, (64, 64), ["a red circle"])
    second = DiffusersZImageBackend(tiny_backend.transformer, tiny_backend.encoder, tiny_backend.latent, "z-image")
    assert torch.equal(_run(second, (64, 64), ["a red circle"]), lora_v)  # the LoRA, gated by the new backend
    second.uninstall()
    after = {n: m for n, m in second.transformer.named_modules()}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert torch.equal(_run(second, (64, 64), ["a red circle"]), v0)


def test_fingerprint_and_latent_shape_read_the_models_own_sizes():
    """The fingerprint (what a resumed run or a LoRA file is matched against) names each size from its own field, and
    latent_shape refuses a width as well as a height off the patch grid, allows exactly the longest side RoPE's
    tables hold (the shorter of the two axes), and keeps height before width."""
    from zerase_core.errors import ZEraseError
    from zerase_core.tiny import HashWordEncoder, LatentSpec, small_zimage

    transformer = small_zimage(dim=64, n_layers=3, n_refiner_layers=1, n_heads=2, axes_dims=(8, 12, 12),
                               axes_lens=(256, 32, 64), in_channels=4, patch_size=2, cap_feat_dim=48)
    backend = DiffusersZImageBackend(transformer, HashWordEncoder(48, 0), LatentSpec(4, 8), "z-image-odd")
    assert backend.fingerprint() == {"family": "z-image-odd", "dim": 64, "n_layers": 3, "n_heads": 2,
                                     "cap_feat_dim": 48}
    assert backend.latent_shape(64, 128) == (4, 8, 16)
    assert backend.latent_shape(512, 16) == (4, 64, 2)  # 32 positions of 16 pixels: 512 is the most
    for height, width in ((64, 72), (72, 64), (528, 16), (16, 528)):
        with pytest.raises(ZEraseError):
            backend.latent_shape(height, width)
