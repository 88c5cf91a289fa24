"""The noise refiner runs once per distinct (x_t, σ), and sharing it changes no prediction."""

from __future__ import annotations

import pytest
import torch

from zerase_core.backends.row_sharing import RowGroups, take_rows
from zerase_core.lora import LoRAConfig


def _count_refiner_rows(backend):
    """Rows that reach each refiner layer's feed-forward (inside the layer, after any sharing)."""
    seen: list[int] = []
    hooks = [layer.feed_forward.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
             for layer in backend.transformer.noise_refiner]
    return seen, hooks


def _random_lora(backend) -> list[torch.Tensor]:
    """A LoRA whose B is not zero, so text rows really change; returns its parameters."""
    params = list(backend.install(LoRAConfig(rank=4), "t").parameters())
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    return params


def test_groups_of_equal_rows():
    x = torch.randn(2, 4, 8, 8)
    rows = torch.stack([x[0], x[1], x[0], x[0]])
    groups = RowGroups.of(rows, torch.tensor([0.5, 0.5, 0.5, 0.7]))  # row 3: same x, other σ
    assert groups.first.tolist() == [0, 1, 3] and groups.inverse.tolist() == [0, 1, 0, 2]
    assert RowGroups.of(x, torch.tensor([0.5, 0.5])) is None
    # σ is compared at its own precision: with bf16 latents, 0.600 and 0.601 (equal in bf16) stay apart.
    same_x = x[:1].to(torch.bfloat16).expand(2, -1, -1, -1)
    assert RowGroups.of(same_x, torch.tensor([0.600, 0.601])) is None
    assert RowGroups.of(same_x, torch.tensor([0.6, 0.6])).inverse.tolist() == [0, 0]


def test_a_guided_batch_is_grouped_by_first_appearance_and_by_bits():
    """A CFG call's torch.cat([x, x]) (the sampler's, the toy's measurements at 100 rows): each row with its copy, the
    groups numbered by first appearance whatever order sorting the rows gives them. Rows are equal by their bits,
    which is what makes the refiner's outputs equal: 0.0 and -0.0 (equal as numbers) stay apart, and a row holding a
    NaN is shared with its exact copy."""
    x = torch.randn(50, 3, 4, 4)
    x[7, 0, 0, 0] = float("nan")
    groups = RowGroups.of(torch.cat([x, x]), torch.full((100,), 0.25))
    assert groups.first.tolist() == list(range(50)) and groups.inverse.tolist() == list(range(50)) * 2
    zeros = torch.zeros(3, 2, 2, 2)
    zeros[1, 0, 0, 0] = -0.0
    signed = RowGroups.of(zeros, torch.full((3,), 0.5))
    assert signed.first.tolist() == [0, 1] and signed.inverse.tolist() == [0, 1, 0]


def test_tags_keep_rows_apart():
    """Rows equal in (x, σ) but of other tags (diffusers: captions padded to other lengths beside a padded image)."""
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)  # expanded: grouped without reading the rows
    groups = RowGroups.of(x, torch.full((3,), 0.5), tags=[64, 32, 32])
    assert groups.first.tolist() == [0, 1] and groups.inverse.tolist() == [0, 1, 1]
    assert RowGroups.of(x[:2], torch.full((2,), 0.5), tags=[64, 32]) is None
    # the trainer's own call, x_t and σ both expanded (no comparison at all): the tags still decide (a mutation audit
    # found this path untested; without them the tiny model's ∅ and c_pr rows were off by 7e-2)
    expanded = RowGroups.of(x, torch.full((1,), 0.5).expand(3), tags=[64, 32, 32])
    assert expanded.first.tolist() == [0, 1] and expanded.inverse.tolist() == [0, 1, 1]
    copies = torch.cat([x[:1], x[:1].clone(), x[:1].clone()])  # the same values in separate rows: compared
    groups = RowGroups.of(copies, torch.full((3,), 0.5), tags=[32, 64, 32])
    assert groups.first.tolist() == [0, 1] and groups.inverse.tolist() == [0, 1, 0]


def test_expanded_rows_are_grouped_without_reading_them():
    """x_t.expand(n) is one group by its strides: on a meta tensor (no data to read, no host sync
    possible) the comparison path would raise; the expanded rows still come out as one group."""
    x = torch.empty(1, 4, 8, 8, device="meta").expand(3, -1, -1, -1)
    sigma = torch.empty(1, device="meta").expand(3)
    groups = RowGroups.of(x, sigma)
    # one group, its indices made where x is (nothing copied from the host; meta tensors hold no values to read)
    assert groups.first.device.type == "meta" and groups.first.shape == (1,) and groups.inverse.shape == (3,)
    on_host = RowGroups.of(torch.zeros(1, 4, 8, 8).expand(3, -1, -1, -1), torch.zeros(1).expand(3))
    assert on_host.first.tolist() == [0] and on_host.inverse.tolist() == [0, 0, 0]
    # Equal values that are separate copies still go through the comparison, and σ must repeat too.
    with pytest.raises(NotImplementedError):
        RowGroups.of(torch.empty(3, 4, 8, 8, device="meta"), sigma)
    assert RowGroups.of(torch.zeros(1, 4, 8, 8).expand(2, -1, -1, -1), torch.tensor([0.5, 0.7])) is None
    # The ComfyUI backend splits a batch by caption length: a run of rows stays an expanded view.
    assert take_rows(x, [1, 2]).stride(0) == 0 and RowGroups.of(take_rows(x, [1, 2]), sigma[1:]) is not None
    picked = torch.arange(4.0)
    assert take_rows(picked, [0, 2]).tolist() == [0.0, 2.0] and take_rows(picked, [1, 2]).tolist() == [1.0, 2.0]
    assert take_rows(picked, []).numel() == 0


def test_shared_refiner_matches_separate_rows(tiny_backend):
    """[c_er, ∅, c_pr] at one x_t, LoRA on: batched with sharing == three batch-1 calls."""
    backend = tiny_backend
    _random_lora(backend)
    prompts = backend.encode(["a red car on a road", "", "a blue house"])
    x = torch.randn(1, 4, 16, 16).expand(3, -1, -1, -1)
    sigma = torch.full((3,), 0.6)
    seen, hooks = _count_refiner_rows(backend)
    batched, _ = backend.velocity(x, sigma, prompts, lora=True)
    for hook in hooks:
        hook.remove()
    assert seen == [1] * len(backend.transformer.noise_refiner)  # the refiner saw one row, not three
    separate = torch.cat([backend.velocity(x[:1], sigma[:1], [p], lora=True)[0] for p in prompts])
    assert torch.allclose(batched, separate, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # the prompts still differ


def test_distinct_rows_are_not_shared(tiny_backend):
    backend = tiny_backend
    prompts = backend.encode(["a red car", "a red car"])
    seen, hooks = _count_refiner_rows(backend)
    backend.velocity(torch.randn(2, 4, 16, 16), torch.full((2,), 0.6), prompts, lora=False)
    for hook in hooks:
        hook.remove()
    assert seen == [2] * len(backend.transformer.noise_refiner)


def test_shared_refiner_gradients_match(tiny_backend):
    """The student's batched forward/backward gives the LoRA the same gradient with sharing."""
    backend = tiny_backend
    params = _random_lora(backend)
    prompts = backend.encode(["a red car on a road", "", "a blue house"])
    x, sigma = torch.randn(1, 4, 16, 16), torch.full((3,), 0.6)
    v, _ = backend.velocity(x.expand(3, -1, -1, -1), sigma, prompts, lora=True)
    shared = torch.autograd.grad(v.square().mean(), params)
    v = torch.cat([backend.velocity(x, sigma[:1], [p], lora=True)[0] for p in prompts])
    separate = torch.autograd.grad(v.square().mean(), params)
    for a, b in zip(shared, separate):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_captions_of_other_padded_lengths_beside_a_padded_image(tiny_backend):
    """diffusers numbers image positions from the padded caption's length on and attends to the image padding at
    position 0: at 16 image tokens (padded to 32) a 40-word caption and the empty one see other refiner outputs, so
    they are not shared (the empty prompt's v was off by up to a third of |v| when they were)."""
    backend = tiny_backend
    _random_lora(backend)
    long = "a red car on a road " + " ".join(f"word{i}" for i in range(40))
    prompts = backend.encode([long, "", "a blue house"])
    assert prompts[0].n_tokens > 32 >= max(p.n_tokens for p in prompts[1:])
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)  # 4 × 4 patches: 16 image tokens
    sigma = torch.full((3,), 0.6)
    seen, hooks = _count_refiner_rows(backend)
    batched, _ = backend.velocity(x, sigma, prompts, lora=True)
    for hook in hooks:
        hook.remove()
    assert seen == [2] * len(backend.transformer.noise_refiner)  # the two short captions still share
    separate = torch.cat([backend.velocity(x[:1], sigma[:1], [p], lora=True)[0] for p in prompts])
    assert torch.allclose(batched, separate, rtol=1e-4, atol=1e-5)


def test_captions_of_other_padded_lengths_are_not_shared_where_the_image_is_not_padded(tiny_backend):
    """Where the image is not padded RoPE cancels the caption's offset exactly, but bf16 rounds the rotated q and k:
    shared with a short caption's row, a 40-word caption's row was off by 7.8e-3 in bf16 (a review). Its refiner row
    is its own now: the refiner sees two rows, the empty prompt's and the short one's shared."""
    backend = tiny_backend
    long = "a " + " ".join(f"word{i}" for i in range(40)) + " cat"
    prompts = backend.encode(["", long, "a dog"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)).expand(3, -1, -1, -1)  # 64 tokens
    seen, hooks = _count_refiner_rows(backend)
    with torch.no_grad():
        backend.velocity(x, torch.full((3,), 0.5), prompts, lora=False)
    for hook in hooks:
        hook.remove()
    assert seen == [2] * len(backend.transformer.noise_refiner)


def test_a_shared_refiner_runs_unshared_on_a_call_of_another_batch():
    """The groups belong to the call that set them: a refiner call of another batch size (another model's call inside
    it) runs as it is, not squeezed through groups made for other rows."""
    from zerase_core.backends.row_sharing import SharedRowsForward

    groups = RowGroups(torch.tensor([0]), torch.tensor([0, 0, 0]))  # three equal rows
    shared = SharedRowsForward.around(lambda x: x * 2, lambda: groups)
    x = torch.arange(4.0).reshape(2, 2)
    assert shared(x).tolist() == [[0.0, 2.0], [4.0, 6.0]]
    assert shared(torch.ones(3, 2)).tolist() == [[2.0, 2.0]] * 3  # the batch the groups were made for

