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
    # The value is as wide as a head and contiguous: fused kernels (flash on CPU and GPU)
    # need matching head sizes, and a 1-wide or stride-0 value falls back to the math
    # kernel, which materialises the L×L map this function exists to avoid.
    value = q.new_zeros(q.shape)  # (B, H, L, D)
    value[..., 0] = columns.to(q.dtype)[:, None, :]  # indicator in the first channel
    out = F.scaled_dot_product_attention(q, k, value, attn_mask=attn_mask)  # (B, H, L, D)
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
        columns, rows = self.columns.to(q.device), self.query_rows.to(q.device)
        # Samples without concept columns (e.g. preservation prompts batched with the erase
        # prompt) have mass 0 by definition: run the extra attention call on the others only.
        wanted = columns.any(dim=1)  # (B,)
        if not bool(wanted.any()):
            self.per_layer[layer] = q.new_zeros(wanted.shape[0], dtype=torch.float32)
            return
        if not bool(wanted.all()):
            q, k, columns, rows = q[wanted], k[wanted], columns[wanted], rows[wanted]
            if attn_mask is not None and attn_mask.shape[0] == wanted.shape[0]:
                attn_mask = attn_mask[wanted]
        mass = column_mass(q, k, columns, attn_mask).mean(dim=1)  # (B', L)
        per_sample = (mass * rows).sum(dim=1) / rows.sum(dim=1).clamp_min(1.0)  # (B',)
        self.per_layer[layer] = per_sample.new_zeros(wanted.shape[0]).index_put((wanted,), per_sample)  # (B,)

    def result(self) -> torch.Tensor:
        """(B,) mean mass over recorded layers."""
        if not self.per_layer:
            raise RuntimeError("No attention was recorded: the backend's attention hook did not run")
        return torch.stack(list(self.per_layer.values())).mean(dim=0)
