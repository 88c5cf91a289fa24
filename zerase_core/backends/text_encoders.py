"""Prompt encoders for the diffusers backend: Z-Image's chat-templated LLM, and a tiny stand-in.

Both return :class:`EncodedPrompt` rows with the character span of the user's prompt each
token came from, so concept localisation works inside the chat template.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import torch

from ..errors import ZEraseError
from ..prompts import EncodedPrompt, as_read, token_span
from ..seeds import offset_seed

# Z-Image's pipeline wraps prompts in Qwen3's chat template with a generation prompt.
CHAT_PREFIX = "<|im_start|>user\n"
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


class ChatTemplateEncoder:
    """Z-Image's text side: Qwen3 over the chat template, penultimate hidden state, padding dropped."""

    def __init__(self, tokenizer, text_model, max_length: int = 512):
        self.tokenizer, self.text_model, self.max_length = tokenizer, text_model, max_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        out = []
        device = next(self.text_model.parameters()).device
        for prompt in map(as_read, prompts):  # the tokenizer reads NFC anyway: spans are then into what it read
            templated = CHAT_PREFIX + prompt + CHAT_SUFFIX
            tok = self.tokenizer(templated, return_offsets_mapping=True, return_tensors="pt")
            n = tok["input_ids"].shape[1]
            if n > self.max_length:  # the pipeline cuts it there; a concept past the cut could not be found
                raise ZEraseError(f"The prompt '{prompt[:60]}…' is {n} tokens in Z-Image's chat template; its text "
                                  f"encoder reads at most {self.max_length}. Shorten it (in training: the template or "
                                  "the concept).")
            hidden = self.text_model(
                input_ids=tok["input_ids"].to(device),
                attention_mask=tok["attention_mask"].to(device),
                output_hidden_states=True,
            ).hidden_states[-2][0]
            out.append(EncodedPrompt(prompt, hidden.float().cpu(), _prompt_spans(tok["offset_mapping"][0], prompt)))
        return out


def _prompt_spans(offsets: torch.Tensor, prompt: str) -> tuple:
    """Map template offsets back into the user's prompt; template tokens get None."""
    start, end = len(CHAT_PREFIX), len(CHAT_PREFIX) + len(prompt)
    return tuple(token_span(a, b, start, end) for a, b in offsets.tolist())


class HashWordEncoder:
    """A deterministic stand-in encoder for tiny random models (tests, ``train --tiny``).

    Each lowercase word maps to a fixed random vector; prompts are wrapped in two template
    tokens so that, as with Z-Image's LLM, the empty prompt still encodes to a non-empty
    sequence.
    """

    def __init__(self, dim: int, seed: int = 0):
        self.dim, self.seed = dim, seed

    def _vector(self, word: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(offset_seed(self.seed * 1_000_003, zlib.crc32(word.encode())))
        return torch.randn(self.dim, generator=g)

    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        out = []
        for prompt in map(as_read, prompts):  # as Qwen's tokenizer reads: a concept typed decomposed is found
            words = [(m.group().lower(), m.span()) for m in re.finditer(r"\w+", prompt)]
            rows = [self._vector("<bos>")] + [self._vector(w) for w, _ in words] + [self._vector("<eos>")]
            spans = (None, *(s for _, s in words), None)
            out.append(EncodedPrompt(prompt, torch.stack(rows), spans))
        return out
