"""Attention probability mass on chosen key columns, in the attention call itself (paper Eq. 6).

softmax(QKᵀ/√d) · v with v the 0/1 indicator of the chosen columns is, per query, exactly
the probability mass those columns receive. So the layer's own attention call can return the
mass too: its value is widened by indicator channels, and q and k by zero channels (scores
unchanged) so that fused kernels, which want one head size, still run; the softmax scale is
passed to the kernel explicitly (rescaling q instead would round q again in bf16). One call,
O(L) memory, no L×L map; autograd differentiates the mass through the same kernel as the output.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from .layout import pad_to_multiple

# An attention call on (B, H, L, D) q, k, v with an explicit softmax scale and the host's mask (broadcastable to
# (B, H, L, L), or None), returning (B, H, L, D): the host's SDPA.
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], torch.Tensor]

CHANNEL_ALIGN = 8  # head sizes fused kernels accept: multiples of 8


def attention_with_mass(
    attention: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    columns: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output and, per indicator, the mass each query puts on its columns.

    q, k, v: (B, H, L, D) as the host hands them to its kernel (after norms and RoPE).
    columns: (N, B, L) 0/1 indicators of key columns (N words, or 1 concept).
    scale: the host's softmax scale if not the default 1/√D; mask: the host's attention mask.
    Returns out (B, H, L, D) and mass (N, B, H, L) float32.
    """
    n, d, dv = columns.shape[0], q.shape[-1], v.shape[-1]
    width = pad_to_multiple(max(d, dv + n), CHANNEL_ALIGN)
    indicators = columns.to(v.device, v.dtype).permute(1, 2, 0)[:, None].expand(-1, v.shape[1], -1, -1)
    value = torch.cat([v, indicators, v.new_zeros(*v.shape[:-1], width - dv - n)], dim=-1)  # (B, H, L, width)
    out = attention(_widened(q, width), _widened(k, width), value, softmax_scale(scale, q), mask)
    return out[..., :dv], out[..., dv : dv + n].permute(3, 0, 1, 2).float()


def softmax_scale(scale: float | None, q: torch.Tensor) -> float:
    """The host's softmax scale, or the default 1/√D of q's own head size (not of widened heads)."""
    return scale if scale is not None else q.shape[-1] ** -0.5


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one part: itself, not a copy


def _widened(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero channels up to ``width``: q·k is unchanged."""
    extra = width - t.shape[-1]
    return t if extra == 0 else torch.cat([t, t.new_zeros(*t.shape[:-1], extra)], dim=-1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's SDPA as an :data:`Attention`."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def batch_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """An attention mask for some rows of the batch: its rows, or itself where it is broadcast over the batch (fewer
    than 4 dimensions broadcast from the right: none is the batch's)."""
    return mask if mask is None or mask.ndim < 4 or mask.shape[0] == 1 else mask[rows]


class Recorder:
    """What a backend's attention hook hands a main layer's attention to: :meth:`wants` a layer, :meth:`attend` in it,
    keeping what it measures on the way. Under gradient checkpointing a layer runs again in backward; that run gets
    :meth:`for_replay`, the same recorder keeping nothing (see :func:`checkpointed`)."""

    def __init__(self, layers: set[int] | None):
        self.layers = layers
        self.keeps = True  # False for the replay: the same calls, nothing kept
        self._replay: Recorder | None = None
        self.forget()

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def for_replay(self) -> "Recorder":
        """This recorder as a checkpointed layer's recomputation runs it: the same inputs, so the recomputation saves
        what the forward saved; nothing kept, and nothing of what the forward kept reachable."""
        if self._replay is None:
            self._replay = copy.copy(self)
            self._replay.keeps = False
            self._replay.forget()
        return self._replay

    def forget(self) -> None:
        """Let go of everything kept (the replay's own copy starts empty)."""
        raise NotImplementedError

    def attend(self, layer: int, attention: Attention, q, k, v, scale=None, attn_mask=None) -> torch.Tensor:
        """This layer's attention output, measured on the way. ``attention`` is the host's SDPA, called with
        ``attn_mask`` (which recorders that compute scores themselves, materialised maps, apply too)."""
        raise NotImplementedError


class MassRecorder(Recorder):
    """Runs the chosen main layers' attention with the concept's mass, and keeps the mass.

    ``columns`` and ``query_rows`` are (B, L) masks for the batch being run; the loss is the
    mean over recorded layers of the per-sample mean over heads and image query rows. Rows
    without concept columns (preservation prompts batched with the erase prompt) get mass 0;
    ``mass_rows``: how many leading rows have any (None: all), the rest are attended as the host
    attends, without the widened heads. Checkpointed layers reach it through :func:`checkpointed`.
    """

    def __init__(self, columns: torch.Tensor, query_rows: torch.Tensor, layers: set[int] | None = None,
                 mass_rows: int | None = None):
        super().__init__(layers)
        self.mass_rows = mass_rows
        self.columns = columns  # on the device the layers run on: no copy per layer
        self.query_rows = query_rows.float()
        self.n_queries = self.query_rows.sum(dim=1).clamp_min(1.0)  # (B,), once per call rather than per layer

    def forget(self) -> None:
        self.per_layer: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, attention: Attention, q, k, v, scale=None, attn_mask=None) -> torch.Tensor:
        """This layer's attention output; its mass on the concept columns is recorded on the way."""
        b, r = q.shape[0], self.mass_rows
        if r is None or r == b:
            out, mass = attention_with_mass(attention, q, k, v, self.columns[None].to(q.device), scale, attn_mask)
            self.keep(layer, mass[0].mean(dim=1))
            return out
        # The step's [c_er, ∅, c_pr]: only c_er's row has mass to measure. Widening the other two rows' heads cost a
        # quarter of their attention (head size 32 → 40, CPU bench) to put mass 0 on no column.
        head, tail = slice(0, r), slice(r, b)
        parts, masses = [], []
        if r > 0:  # else a call of rows without concept columns (ComfyUI runs ∅ alone when its caption pads shorter)
            out, mass = attention_with_mass(attention, q[head], k[head], v[head],
                                            self.columns[None, head].to(q.device), scale, batch_rows(attn_mask, head))
            parts, masses = [out], [mass[0].mean(dim=1)]
        parts.append(attention(q[tail], k[tail], v[tail], softmax_scale(scale, q), batch_rows(attn_mask, tail)))
        masses.append(q.new_zeros(b - r, q.shape[2], dtype=torch.float32))
        self.keep(layer, _joined(masses))  # (B, L)
        return _joined(parts)

    def keep(self, layer: int, mass: torch.Tensor) -> None:
        """Record (B, L) per-query mass (mean over heads) as the per-sample mean over image queries."""
        rows, n = self.query_rows.to(mass.device), self.n_queries.to(mass.device)  # no-ops when built there
        per_sample = (mass * rows).sum(dim=1) / n  # (B,); computed even when dropped: a recomputation must match
        if self.keeps:
            self.per_layer[layer] = per_sample

    def result(self) -> torch.Tensor:
        """(B,) mean mass over recorded layers."""
        if not self.per_layer:
            raise RuntimeError("No attention was recorded: the backend's attention hook did not run")
        return torch.stack(list(self.per_layer.values())).mean(dim=0)


def checkpointed(recorder: Recorder | None) -> Callable[[], Recorder | None]:
    """The recorder a checkpointed layer runs with: ``recorder`` on its first run (the forward), its replay on every
    later one (the recomputations in backward).

    The autograd graph holds the function a checkpointed layer recomputes with, and so what that function reaches.
    Were that ``recorder``, which holds the masses, which hold the graph, the graph would hold itself through
    autograd's nodes, where Python's garbage collector cannot see: a forward whose backward never ran (a NaN loss, out
    of memory in a later layer) would keep its activations and the model until the process ended. So ``recorder`` is
    let go once the forward has used it. And the replay keeps no mass: kept, each would hold its layer's recomputed
    graph until the recorder died (measured on the real model at 512², batch 3: 10 GiB above the weights where gated
    ESD took 0.5).
    """
    if recorder is None:
        return lambda: None
    pending, replay = [recorder], recorder.for_replay()
    return lambda: pending.pop() if pending else replay
