"""The token gate S_T (paper Eq. 4): which rows of a projection the LoRA may change.

One :class:`TokenGate` is shared by every gated layer of a patched model. The backend
sets the layout of the batch about to run (``with gate.active(layout)``); the layers read
it. Running a LoRA-carrying layer with no layout is an error rather than a silent,
ungated update — the collapse the paper warns of.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .layout import TokenLayout
from .scoped import scoped


class TokenGate:
    """Holds the layout of the current forward call and whether the LoRA is switched on."""

    def __init__(self) -> None:
        self.layout: TokenLayout | None = None
        self.lora_on: bool = True

    @contextmanager
    def active(self, layout: TokenLayout, lora_on: bool = True) -> Iterator["TokenGate"]:
        with scoped(self, layout=layout, lora_on=lora_on):
            yield self

    def text_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Flat indices of the text rows of ``x`` (B, L, d) viewed as (B·L, d): S_T."""
        return self._checked(x).text_rows(x.device)

    def token_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Flat indices of every real token, text or image (the ungated ablation's 'gate')."""
        return self._checked(x).token_rows(x.device)

    def _checked(self, x: torch.Tensor) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError(
                "A gated LoRA layer ran without a token layout; the backend must wrap every forward "
                "in gate.active(layout). Refusing to apply the LoRA ungated."
            )
        if x.ndim != 3 or tuple(x.shape[:2]) != (self.layout.batch, self.layout.seq_len):
            raise RuntimeError(
                f"Gated LoRA input {tuple(x.shape)} does not match the layout "
                f"(batch {self.layout.batch}, seq {self.layout.seq_len})"
            )
        return self.layout
