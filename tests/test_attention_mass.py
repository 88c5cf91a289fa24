"""Attention mass by the indicator-value trick equals the explicit softmax sum, value and gradient."""

from __future__ import annotations

import torch

from zerase_core.attention_mass import column_mass
from zerase_core.lora import LoRAConfig


def _explicit(q, k, columns, keep=None):
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, L, L)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return (probs * columns.double()[:, None, None, :]).sum(dim=-1)  # (B, H, L)


def test_mass_matches_float64_softmax_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    columns = torch.zeros(2, 40)
    columns[0, [5, 6, 30]] = 1
    columns[1, [0, 39]] = 1
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[1, 35:] = False  # batch padding of the second sample
    keep[1, 39] = False
    weights = torch.randn(2, 3, 40, generator=g, dtype=torch.float64)

    ours = column_mass(q, k, columns, keep[:, None, None, :])
    ref = _explicit(q, k, columns, keep)
    assert torch.allclose(ours.double(), ref, atol=1e-6)
    (g_q, g_k) = torch.autograd.grad((ours.double() * weights).sum(), (q, k))
    (r_q, r_k) = torch.autograd.grad((ref * weights).sum(), (q, k))
    assert torch.allclose(g_q, r_q, atol=1e-6) and torch.allclose(g_k, r_k, atol=1e-6)


def test_backend_mass_is_a_probability_share(tiny_backend):
    """Image queries' mass on one word is less than on the whole caption, which is less than 1 (the image gets the rest)."""
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
        with tiny_backend.zeroing_tokens(lambda prompts: [[2]]):
            zeroed, zeroed_mass = tiny_backend.velocity(x, sigma, enc, concept_tokens=[[2]])
        with tiny_backend.zeroing_tokens(lambda prompts: [[]]):
            untouched, _ = tiny_backend.velocity(x, sigma, enc)
    assert float(mass) > 0 and float(zeroed_mass) == 0.0
    assert not torch.allclose(zeroed, plain) and torch.equal(untouched, plain)


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
