"""Main-layer attention handed to a recorder (attention mass, word maps) through ComfyUI's attention override."""

from __future__ import annotations

from typing import Callable

import torch


def _comfy_sdpa(mask: torch.Tensor | None):
    """ComfyUI's SDPA with an explicit scale, for the recorded layers' widened heads.

    ComfyUI's optimized attention functions take no scale (they use 1/√head size, wrong for
    widened heads), and SageAttention rejects head sizes over 128; ComfyUI's own SDPA takes
    both. ``mask`` is shaped by :func:`_sdpa_mask`.
    """
    import comfy.ops

    return lambda q, k, v, scale: comfy.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _sdpa_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A ComfyUI attention mask broadcast to (B, H, L, L) as ``attention_pytorch`` shapes it."""
    if mask is not None:
        mask = mask[None] if mask.ndim == 2 else mask
        mask = mask[:, None] if mask.ndim == 3 else mask
    return mask


def recording_override(inner: Callable | None, state: Callable[[], tuple]) -> Callable:
    """An attention override that hands main-layer attention to the recorder, else runs the stock path
    (``inner``: an override already in place, e.g. another node's). ``state()`` gives the running call's
    (recorder, layout).

    Recorded layers (the student's erase prediction while training, the Attention Map
    Viewer) run on ComfyUI's SDPA, not on ``func`` or an earlier override (see _comfy_sdpa).
    """

    def override(func, q, k, v, heads, mask=None, **kwargs):
        run = func if inner is None else (lambda *args, **kw: inner(func, *args, **kw))
        layer = (kwargs.get("transformer_options") or {}).get("block_index")
        recorder, layout = state()
        if layer is None or recorder is None or layout is None or not recorder.wants(int(layer)):
            return run(q, k, v, heads, mask, **kwargs)
        b = q.shape[0]
        if not kwargs.get("skip_reshape", False):  # (B, L, H·D) -> (B, H, L, D)
            q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        if q.shape[2] != layout.seq_len:
            return run(q, k, v, heads, mask, **(kwargs | {"skip_reshape": True}))
        mask4 = _sdpa_mask(mask)  # the kernel and a recorder that computes scores itself see one mask
        out = recorder.attend(int(layer), _comfy_sdpa(mask4), q, k, v, None, mask4)  # (B, H, L, D)
        if kwargs.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).reshape(b, -1, heads * v.shape[-1])

    return override
