"""Run the noise refiner once per distinct image input, not once per prompt.

Z-Image's noise refiner sees only image tokens and the timestep, before any gated layer:
its output depends on neither the prompt nor the LoRA (in diffusers it sees the caption's padded
length through the image tokens' positions: rows are grouped by that too, ``tags``). A Z-Erase step asks for several
predictions at one x_t (student c_er, ∅, c_pr; the teacher's three; [c, ∅] in every CFG
sampling step), so sharing the refiner across rows with equal (x_t, σ) skips work that
could only repeat itself. The share on the real model is small (2 refiner layers beside 30
main layers: ~6 % of a forward); on the tiny benchmark model (1 beside 2) it is a third.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass(frozen=True)
class RowGroups:
    """Rows of a batch with equal inputs: ``first[g]`` is group g's first row, ``inverse[i]`` row i's group."""

    # Both made on the device the refiner runs on (``of``'s ``device``): every argument of every refiner layer uses
    # them, and a host→device copy there would stall the host behind the GPU (a review counted 8 per call).
    first: torch.Tensor  # (G,)
    inverse: torch.Tensor  # (B,)

    @classmethod
    def of(cls, x: torch.Tensor, sigma: torch.Tensor, tags: Sequence[int] | None = None,
           device: torch.device | None = None) -> "RowGroups | None":
        """Groups of rows equal in (x, σ) and in ``tags`` (what else of a row the shared layers see, if anything: see
        the diffusers backend's ``_refiner_tags``), numbered by first appearance, indexed on ``device`` (x's by
        default; a host passes where the refiner runs when x is not there yet); None when every row is distinct."""
        if x.shape[0] < 2:
            return None  # nothing to share, and no host sync for it
        tags = list(tags) if tags is not None else [0] * x.shape[0]
        if _one_row_repeated(x) and _one_row_repeated(sigma.reshape(-1)):
            # The step's batches are x_t.expand(n, …): equal by construction, so no comparison and no
            # host sync (on a GPU a sync stalls the queue of kernels the step has launched).
            return cls._numbered([tags.index(t) for t in tags], device or x.device)
        # Rows equal bit for bit (what makes the refiner's outputs equal), σ at its own precision, not x's, on x's
        # device (the pool and the sampler keep σ on the host): one sort of the rows, where a table of every row
        # against every other cost B² row reads (a CFG batch of 100 on the toy: 5 % of its forward).
        key = torch.cat([_bits(x.flatten(1)), _bits(sigma.reshape(-1, 1).to(x.device)),
                         torch.tensor(tags, device=x.device)[:, None]], dim=1)
        _, group = torch.unique(key, dim=0, return_inverse=True)
        rows = torch.arange(key.shape[0], device=x.device)
        first = torch.full_like(rows, key.shape[0]).scatter_reduce(0, group, rows, "amin")  # each group's first row
        return cls._numbered(first[group].tolist(), device or x.device)  # a sync here, and on a GPU in unique

    @classmethod
    def _numbered(cls, first_equal: list[int], device: torch.device) -> "RowGroups | None":
        """The groups of rows that name the same first equal row, indices on ``device``; None when no two rows do."""
        first = sorted(set(first_equal))
        if len(first) == len(first_equal):
            return None
        if first == [0]:  # one group, every training step's: made on the device, nothing copied from the host
            return cls(torch.zeros(1, dtype=torch.long, device=device),
                       torch.zeros(len(first_equal), dtype=torch.long, device=device))
        return cls(torch.tensor(first, device=device),
                   torch.tensor([first.index(j) for j in first_equal], device=device))

    @property
    def batch(self) -> int:
        return self.inverse.numel()

    def shrink(self, value: Any) -> Any:
        """One row per group of a per-row tensor; anything else unchanged."""
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.batch:
            return value.index_select(0, self.first.to(value.device))  # no-op: made where the refiner runs
        return value

    def expand(self, value: torch.Tensor) -> torch.Tensor:
        return value.index_select(0, self.inverse.to(value.device))


def take_rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Rows ``idx`` of ``t``; consecutive rows as a view, so an expanded x_t stays expanded (see RowGroups.of)."""
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return t[idx[0] : idx[0] + len(idx)]
    return t[idx]


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as int64: one key for rows of any float type, equal exactly where the bits are."""
    return t.contiguous().view(_SAME_SIZE_INT[t.element_size()]).long()


def _one_row_repeated(t: torch.Tensor) -> bool:
    """A view whose rows share one memory row (an ``expand`` of a single row)."""
    return t.stride(0) == 0 or t.shape[0] == 1


class SharedRowsForward:
    """A refiner layer's forward that runs on one row per group while the host sets groups.

    A plain callable (not a Module), patched onto the layer instance; ``groups`` is asked at
    call time, so the backend that owns the layer decides per call.
    """

    def __init__(self, inner: Callable[..., torch.Tensor], groups: Callable[[], RowGroups | None]):
        self.inner, self.groups = inner, groups

    @classmethod
    def around(cls, forward: Callable[..., torch.Tensor],
               groups: Callable[[], RowGroups | None]) -> "SharedRowsForward":
        """Wrap a layer's forward; an earlier backend's wrapper is replaced, not nested."""
        return cls(forward.inner if isinstance(forward, cls) else forward, groups)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        groups = self.groups()
        if groups is None or not isinstance(args[0], torch.Tensor) or args[0].shape[0] != groups.batch:
            return self.inner(*args, **kwargs)
        shrunk = [groups.shrink(a) for a in args]
        return groups.expand(self.inner(*shrunk, **{k: groups.shrink(v) for k, v in kwargs.items()}))
