"""The toy text encoder: a word-level tokenizer and a small transformer, trained with the DiT.

Like Z-Image's LLM encoder it wraps every prompt in a template (``<bos> ... <eos>``), so the
empty prompt still encodes to a short non-empty sequence, and padding is dropped per prompt.
It implements the engine's :class:`~zerase_core.prompts.PromptEncoder` protocol.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from ..prompts import EncodedPrompt, Span
from .world import vocabulary

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
_WORD = re.compile(r"\w+|[^\w\s]")  # a word, or one punctuation character


@dataclass(frozen=True)
class TextConfig:
    """Sizes of the toy text encoder; ``dim`` is the caption feature width the DiT consumes."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_tokens: int = 48  # prompts are cut to this many tokens including <bos>/<eos>

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"TextConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.max_tokens < 2:
            raise ValueError("TextConfig: max_tokens must leave room for <bos> and <eos>")


class WordTokenizer:
    """Lowercase words and punctuation with their character spans; unknown words map to <unk>."""

    def __init__(self, words: Sequence[str]):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def tokenize(self, text: str, max_tokens: int) -> tuple[list[int], list[Span]]:
        """Token ids and spans, template included: <bos> words... <eos> (spans None for the template)."""
        ids, spans = [self.stoi[BOS]], [None]
        for m in _WORD.finditer(text):
            if len(ids) >= max_tokens - 1:
                break  # keep room for <eos>
            ids.append(self.stoi.get(m.group().lower(), self.stoi[UNK]))
            spans.append(m.span())
        ids.append(self.stoi[EOS])
        spans.append(None)
        return ids, spans


class ToyTextEncoder(nn.Module):
    """Embedding + learned positions + a pre-norm transformer encoder."""

    def __init__(self, config: TextConfig = TextConfig(), words: Sequence[str] | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = WordTokenizer(vocabulary() if words is None else words)
        self.embed = nn.Embedding(len(self.tokenizer), config.dim)
        self.pos = nn.Parameter(torch.zeros(config.max_tokens, config.dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            config.dim, config.n_heads, 4 * config.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    @property
    def feat_dim(self) -> int:
        return self.config.dim

    def features(self, prompts: Sequence[str]) -> tuple[list[torch.Tensor], list[list[Span]]]:
        """Per prompt (n_tokens, dim) features with gradients (training path) and the spans."""
        tokenized = [self.tokenizer.tokenize(p, self.config.max_tokens) for p in prompts]
        lengths = [len(ids) for ids, _ in tokenized]
        n = max(lengths)
        device = self.embed.weight.device
        ids = torch.full((len(prompts), n), self.tokenizer.stoi[PAD], dtype=torch.long, device=device)
        for row, (tok, _) in enumerate(tokenized):
            ids[row, : len(tok)] = torch.tensor(tok, device=device)
        pad = ids == self.tokenizer.stoi[PAD]  # (B, n) True where padding
        h = self.embed(ids) + self.pos[:n]  # (B, n, dim)
        h = self.norm(self.blocks(h, src_key_padding_mask=pad))
        return [h[row, :length] for row, length in enumerate(lengths)], [spans for _, spans in tokenized]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        feats, spans = self.features(prompts)
        return [EncodedPrompt(text, f, tuple(s)) for text, f, s in zip(prompts, feats, spans)]

    def metadata(self) -> dict[str, str]:
        return {"text_config": repr(asdict(self.config)), "vocabulary": " ".join(self.tokenizer.itos)}
