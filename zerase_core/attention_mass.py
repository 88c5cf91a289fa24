"""Attention probability mass on chosen key columns, without an L×L map (paper Eq. 6).

softmax(QKᵀ/√d) · v with v the 0/1 indicator of the chosen columns is, per query, exactly
the probability mass those columns receive. One extra attention call with a 1-wide value
therefore gives Σ_idx A[:, :, idx] for every query in O(L) memory, and autograd
differentiates it through the fused attention kernel like any other attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def column_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    columns: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query attention mass on ``columns``.

    q, k: (B, H, L, D) after norms and RoPE, exactly as attention sees them.
    columns: (B, L) 0/1 indicator of key columns.
    attn_mask: None, or a mask broadcastable to (B, H, L, L) as passed to SDPA (bool: True = keep).
    Returns (B, H, L) float32.
    """
    value = columns.to(q.dtype)[:, None, :, None].expand(q.shape[0], q.shape[1], -1, 1)  # (B, H, L, 1)
    out = F.scaled_dot_product_attention(q, k, value, attn_mask=attn_mask)  # (B, H, L, 1)
    return out[..., 0].float()


class MassRecorder:
    """Collects, per main layer, the mean mass that image queries put on the concept columns.

    ``columns`` and ``query_rows`` are (B, L) masks for the batch being run; the loss is the
    mean over recorded layers of the per-sample mean over heads and image query rows.
    """

    def __init__(self, columns: torch.Tensor, query_rows: torch.Tensor, layers: set[int] | None = None):
        self.columns = columns
        self.query_rows = query_rows.float()
        self.layers = layers
        self.per_layer: dict[int, torch.Tensor] = {}

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None):
        mass = column_mass(q, k, self.columns.to(q.device), attn_mask).mean(dim=1)  # (B, L)
        rows = self.query_rows.to(q.device)
        self.per_layer[layer] = (mass * rows).sum(dim=1) / rows.sum(dim=1).clamp_min(1.0)  # (B,)

    def result(self) -> torch.Tensor:
        """(B,) mean mass over recorded layers."""
        if not self.per_layer:
            raise RuntimeError("No attention was recorded: the backend's attention hook did not run")
        return torch.stack(list(self.per_layer.values())).mean(dim=0)
