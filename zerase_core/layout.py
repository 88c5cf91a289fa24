"""Where the text and image tokens sit in a main-layer sequence, per sample.

Backends ask for a :class:`TokenLayout` on every call (:meth:`TokenLayout.of`, one object per
distinct layout) from what the transformer is given (latent sizes, caption lengths, batch), because
the layout depends on all of them:
diffusers orders each sample [image | caption], ComfyUI [caption | image], both pad each
segment to a multiple of 32 and pad the batch to its longest sample.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import torch

Segment = tuple[int, int]  # [start, end) in the main-layer sequence


def pad_to_multiple(n: int, multiple: int) -> int:
    """Length after padding ``n`` tokens up to a multiple (both Z-Image hosts pad to 32)."""
    return n + (-n) % multiple


@dataclass(frozen=True)
class TokenLayout:
    """Per-sample text and image segments of a batch of main-layer sequences of length ``seq_len``.

    ``text`` covers the caption *and its padding* (the paper's gate S_T is 1 on the whole
    text segment, as the official gate is); ``image`` covers image tokens and their padding,
    of which the first ``image_tokens[b]`` are real (all of them when not given). Positions in
    neither (batch padding) get no LoRA and no attention-loss weight.
    """

    seq_len: int
    text: tuple[Segment, ...]
    image: tuple[Segment, ...]
    image_tokens: tuple[int, ...] | None = None

    def __post_init__(self):
        if len(self.text) != len(self.image):
            raise ValueError("TokenLayout: text and image segments must be given per sample")
        for (ts, te), (is_, ie) in zip(self.text, self.image):
            if not (0 <= ts <= te <= self.seq_len and 0 <= is_ <= ie <= self.seq_len):
                raise ValueError(f"TokenLayout: segment outside a sequence of {self.seq_len}")
            if ts < ie and is_ < te:
                raise ValueError("TokenLayout: text and image segments overlap")
        if self.image_tokens is not None and (
            len(self.image_tokens) != self.batch
            or any(not 0 <= n <= e - s for n, (s, e) in zip(self.image_tokens, self.image))
        ):
            raise ValueError("TokenLayout: image_tokens must give per sample a count within its image segment")

    @classmethod
    def of(cls, seq_len: int, text: tuple[Segment, ...], image: tuple[Segment, ...],
           image_tokens: tuple[int, ...] | None = None) -> "TokenLayout":
        """The layout of these segments, one object per distinct layout (the last 64 kept): what it copies to a
        device (masks, row indices) is copied there once, not at every call (a review counted one copy per call).
        Traced by torch.compile (TorchCompileModel after Apply), a new one, as dynamo would trace the cache away."""
        if torch.compiler.is_compiling():
            return cls(seq_len, text, image, image_tokens)
        return _layout(cls, seq_len, text, image, image_tokens)

    @property
    def batch(self) -> int:
        return len(self.text)

    @cached_property
    def _text_mask_cpu(self) -> torch.Tensor:
        return self._segments_mask(self.text)

    @cached_property
    def _image_mask_cpu(self) -> torch.Tensor:
        return self._segments_mask(self.image)

    def _segments_mask(self, segments: tuple[Segment, ...]) -> torch.Tensor:
        """Made only inside :meth:`_cached`, so outside inference mode as the rest of a layout's tensors."""
        positions = torch.arange(self.seq_len)  # (L,)
        starts = torch.tensor([s for s, _ in segments])[:, None]  # (B, 1)
        ends = torch.tensor([e for _, e in segments])[:, None]
        return (positions >= starts) & (positions < ends)  # (B, L)

    @cached_property
    def _on_device(self) -> dict:
        return {}

    def _cached(self, name: str, make, device: torch.device | str) -> torch.Tensor:
        """``make()`` (a CPU tensor) on ``device``, copied there once per layout: every gated layer of a call asks,
        and each host→device copy would stall the host behind the GPU."""
        key = (name, str(torch.device(device)))
        if key not in self._on_device:
            # Outside inference mode: a layout is shared by every call with its segments, and one first met while
            # sampling in inference mode (ComfyUI runs nodes so) made inference tensors that a later training call
            # with the same layout could not save for backward (Z-Erase Train after sampling with an applied LoRA).
            with torch.inference_mode(False):
                self._on_device[key] = make().to(device)
        return self._on_device[key]

    def text_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, L) bool, True on text rows: the paper's S_T as a mask."""
        return self._cached("text_mask", lambda: self._text_mask_cpu, device)

    def image_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, L) bool, True on image rows (including image padding)."""
        return self._cached("image_mask", lambda: self._image_mask_cpu, device)

    def text_rows(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N,) flat indices of the text rows in a (B·L, d) view, ascending: S_T for index_select / index_copy,
        which need no host sync where boolean indexing needs one per use (it counts the rows first)."""
        return self._cached("text_rows", lambda: self._text_mask_cpu.flatten().nonzero().squeeze(1), device)

    def token_rows(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N,) flat indices of every real row, text or image (the ungated ablation's 'gate')."""
        mask = lambda: (self._text_mask_cpu | self._image_mask_cpu).flatten().nonzero().squeeze(1)  # noqa: E731
        return self._cached("token_rows", mask, device)

    def image_query_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, L) bool, True on real image tokens: the queries L_attn averages over (Eq. 6), padding left out."""
        if self.image_tokens is None:
            return self.image_mask(device)
        real = tuple((s, s + n) for (s, _), n in zip(self.image, self.image_tokens))
        return self._cached("image_query_mask", lambda: self._segments_mask(real), device)

    def columns(self, token_indices: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, L) float indicator of caption tokens ``token_indices[b]`` as sequence columns."""
        if len(token_indices) != self.batch:
            raise ValueError("TokenLayout.columns: one index list per sample is needed")
        out = torch.zeros(self.batch, self.seq_len)
        for b, indices in enumerate(token_indices):
            start, end = self.text[b]
            for i in indices:
                if not 0 <= i < end - start:  # a negative i too: from a text segment after the image, an image column
                    raise ValueError(f"caption token {i} lies outside the text segment of sample {b}")
                out[b, start + i] = 1.0
        return out.to(device)


@functools.lru_cache(maxsize=64)
def _layout(cls: type, seq_len: int, text: tuple, image: tuple, image_tokens: tuple | None) -> TokenLayout:
    return cls(seq_len, text, image, image_tokens)
