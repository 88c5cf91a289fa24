"""Prompts as a backend encodes them, and where a concept sits among their tokens.

Every backend's text encoder returns an :class:`EncodedPrompt`: the caption features the
transformer consumes plus, for each feature row, the character span of the user's prompt
that produced it. Template and special tokens (Z-Image wraps prompts in a chat template)
carry ``None``. Localising a concept is then the same for every backend: find the
word's occurrences in the text and take every token whose span overlaps one.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .errors import ZEraseError

Span = tuple[int, int] | None


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt, encoded. ``features`` is (n_tokens, feat_dim); ``spans`` has n_tokens entries."""

    text: str
    features: torch.Tensor
    spans: tuple[Span, ...]

    def __post_init__(self):
        if self.features.ndim != 2 or self.features.shape[0] != len(self.spans):
            raise ValueError(
                f"EncodedPrompt: features {tuple(self.features.shape)} do not match {len(self.spans)} spans"
            )

    @property
    def n_tokens(self) -> int:
        return self.features.shape[0]


class PromptEncoder(Protocol):
    """What a backend's text side provides: prompts in, EncodedPrompts out (no grad)."""

    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]: ...


def _occurrences(text: str, word: str) -> list[tuple[int, int]]:
    """Case-insensitive, whole-word occurrences of ``word`` (may be several words) in ``text``.

    Whole word: not inside a longer word ("red" is not in "bored"). Scripts written without spaces between
    words have no word edges: CJK (Chinese and Japanese, which Z-Image reads) and the unspaced scripts of South-
    East Asia (Thai, Lao, Khmer, Myanmar). An edge between such a character and the phrase does not count ("梵高"
    is in "一幅梵高风格的画", "Van Gogh" in "梵高Van Gogh的画", "แมว" in "รูปแมวสีดำ").
    """
    word = word.strip()
    pattern = re.compile(r"\s+".join(re.escape(w) for w in word.split()), flags=re.IGNORECASE)
    hits, m = [], pattern.search(text)
    while m:
        start, end = m.span()
        if _joined(text[start - 1 : start], word[0]) or _joined(text[end : end + 1], word[-1]):
            m = pattern.search(text, start + 1)  # a rejected match may overlap a good one ("Cabora Bora Bora")
        else:
            hits.append((start, end))
            m = pattern.search(text, end)
    return hits


_UNSPACED_SCRIPTS = ("THAI", "LAO", "KHMER", "MYANMAR")  # Unicode name prefixes; CJK is found by its width


def mentions(text: str, word: str) -> bool:
    """``word`` occurs in ``text`` as a whole word (see :func:`_occurrences`)."""
    return bool(_occurrences(text, word))


def _joined(neighbour: str, edge: str) -> bool:
    """Whether ``neighbour`` continues the word that ``edge`` (the phrase's first or last character) is part of."""
    return bool(neighbour) and _word_char(neighbour) and _word_char(edge)


def _word_char(ch: str) -> bool:
    """A character of a script whose words are delimited by spaces or punctuation."""
    if not (ch.isalnum() or ch == "_") or unicodedata.east_asian_width(ch) in ("W", "F"):
        return False
    return not unicodedata.name(ch, "").startswith(_UNSPACED_SCRIPTS)


TEMPLATE_FIX = "Put the concept word into every erase prompt template (use '{}' where it goes)."


def as_read(text: str) -> str:
    """``text`` in the form Qwen's tokenizer reads it (it normalises to NFC), so that a prompt's character spans and
    a word looked up in it agree however the user's text was composed (a pasted "café" may be NFD)."""
    return unicodedata.normalize("NFC", text)


EMPTY_CONCEPT = "The concept is empty: type the word or phrase to erase, e.g. 'red' or 'Van Gogh'."


def is_blank(text: str) -> bool:
    """Nothing a prompt could show: spaces, and characters that take no place (a zero-width space, a direction mark,
    a control character) pasted alone."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def concept_words(text: str) -> list[str]:
    """``text`` as prompts see it: its words, whatever the case, spacing and Unicode composition ("Big  cat" is "big
    cat"; a pasted NFD "café" is the typed one). Two concepts with the same words are one concept."""
    return as_read(text).lower().split()


def token_span(a: int, b: int, start: int, end: int) -> Span:
    """A token's characters [a, b) of a templated text, as a span into the user's prompt that sits at [start, end)
    in it; None for a token outside the prompt (the template's, or an empty one)."""
    if not (a < end and b > start and b > a):
        return None
    return max(a, start) - start, min(b, end) - start


def concept_token_indices(prompt: EncodedPrompt, word: str, fix: str = TEMPLATE_FIX,
                          what: str = "concept") -> list[int]:
    """Indices of the tokens of ``prompt`` that encode ``word`` (all occurrences, all sub-tokens).

    Raises :class:`ZEraseError` when the word is empty or not in the prompt, since an
    attention loss on no columns would silently do nothing; ``fix`` tells the caller's user what to change, ``what``
    names the word as the caller does (the Viewer's are words, not concepts).
    """
    word = as_read(word.strip())
    if not word:
        raise ZEraseError(EMPTY_CONCEPT)
    hits = _occurrences(prompt.text, word)
    if not hits:
        raise absent(word, prompt.text, fix, what)
    indices = [
        i
        for i, span in enumerate(prompt.spans)
        if span is not None and any(span[0] < end and start < span[1] for start, end in hits)
    ]
    if not indices:
        raise ZEraseError(
            f"The {what} '{word}' is in the prompt '{prompt.text}' but no token of the encoder covers it; "
            "this encoder cannot localise it. Report this with the prompt."
        )
    return indices


def absent(word: str, text: str, fix: str = TEMPLATE_FIX, what: str = "concept") -> ZEraseError:
    """The refusal of a prompt ``text`` that does not hold ``word``; ``fix``, ``what``: see
    :func:`concept_token_indices`."""
    return ZEraseError(f"The {what} '{word}' does not occur in the prompt '{text}'. {fix}")


def fill_template(template: str, concept: str) -> str:
    """Put the concept where the template has '{}'; a template without '{}' is used as written
    (it must then name the concept itself, which localisation checks)."""
    return template.replace("{}", concept)


def preservation_text(template: str, concept: str, keep: str) -> str:
    """c_pr of Eq. 8 from an erase template: its erase prompt with ``keep`` wherever the concept is. A template that
    names the concept itself (one without '{}' must) filled with ``keep`` alone still held the concept, and L_pr then
    kept what L_erase removes."""
    text, done, parts = fill_template(template, concept), 0, []
    for start, end in _occurrences(text, concept):
        parts += [text[done:start], keep]
        done = end
    return "".join(parts) + text[done:]


def shuffle_words(text: str, rng: random.Random, keep: str | None = None) -> str:
    """Shuffle the word order of ``text`` (paper §4.1: keeps the concept's token indices moving).

    A multi-word ``keep`` phrase (e.g. "van gogh") moves as one unit so it stays findable.
    """
    units: list[str] = []
    done = 0
    for start, end in _occurrences(text, keep) if keep else []:
        units += [*text[done:start].split(), text[start:end]]
        done = end
    units += text[done:].split()
    rng.shuffle(units)
    return " ".join(units)
