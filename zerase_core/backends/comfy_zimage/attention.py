"""Main-layer attention handed to a recorder (attention mass, word maps) through ComfyUI's attention override."""

from __future__ import annotations

from typing import Callable

import torch


def _comfy_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                mask: torch.Tensor | None) -> torch.Tensor:
    """ComfyUI's SDPA with an explicit scale, for the recorded layers' widened heads.

    ComfyUI's optimized attention functions take no scale (they use 1/√head size, wrong for
    widened heads), and SageAttention rejects head sizes over 128; ComfyUI's own SDPA takes
    both. ``mask`` is shaped by :func:`_sdpa_mask`.
    """
    import comfy.ops

    return comfy.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _differentiable() -> Callable:
    """ComfyUI's SDPA attention function: autograd's own kernels (flash or memory-efficient on a GPU)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch


def _sdpa_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A ComfyUI attention mask broadcast to (B, H, L, L) as ``attention_pytorch`` shapes it."""
    if mask is not None:
        mask = mask[None] if mask.ndim == 2 else mask
        mask = mask[:, None] if mask.ndim == 3 else mask
    return mask


def recording_override(inner: Callable | None, state: Callable[[], tuple], training: bool = False) -> Callable:
    """An attention override that hands main-layer attention to the recorder, else runs the stock path
    (``inner``: an override already in place, e.g. another node's), or in ``training`` ComfyUI's SDPA. ``state()``
    gives the running call's (recorder, layout).

    Recorded layers (the student's erase prediction while training, the Attention Map
    Viewer) run on ComfyUI's SDPA, not on ``func`` or an earlier override (see _comfy_sdpa).
    """

    forced = _differentiable() if training else None  # resolved once, not in every layer's call

    def override(func, q, k, v, heads, mask=None, **kwargs):
        stock = inner
        if forced is not None:
            # A kernel with a backward. ComfyUI's pick (or another node's override) may be one without: SageAttention
            # returns outputs cut off from q, k and v, and the LoRA then learns nothing of that forward, without a
            # word. The forwards without a graph too (the teacher, L_pr while λ = 0): λ compares L_pr values, which
            # must come from one kernel. The recorded layers below use ComfyUI's SDPA anyway.
            func, stock = forced, None
        run = func if stock is None else (lambda *args, **kw: stock(func, *args, **kw))
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
        out = recorder.attend(int(layer), _comfy_sdpa, q, k, v, None, mask4)  # (B, H, L, D)
        if kwargs.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).reshape(b, -1, heads * v.shape[-1])

    return override
