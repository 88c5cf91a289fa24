"""All prompts a training run uses, encoded once so the text encoder can be released.

The erase prompts are the templates filled with the concept plus word-shuffled variants
(paper §4.1: shuffling keeps the concept's token indices moving); each carries its concept
token indices, found up front so a concept missing from a template fails before training.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable

from .backends.base import Backend
from .config import TrainConfig
from .errors import shown
from .prompts import (EncodedPrompt, absent, as_read, concept_token_indices, fill_template, mentions,
                      preservation_text, shuffle_words)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptPool:
    erase: tuple[EncodedPrompt, ...]
    erase_tokens: tuple[tuple[int, ...], ...]
    uncond: EncodedPrompt
    keep: tuple[EncodedPrompt, ...]

    @classmethod
    def build(cls, backend: Backend, config: TrainConfig) -> "PromptPool":
        texts = erase_texts(config)
        keep_texts = [preservation_text(t, config.concept, p) for p in config.preserve for t in config.erase_templates]
        encoded = backend.encode([*texts, "", *keep_texts])
        erase = tuple(encoded[: len(texts)])
        tokens = tuple(tuple(concept_token_indices(p, config.concept)) for p in erase)
        if not config.preserve:  # allowed (Eq. 8's first term still holds), but the paper always trains with a D_pr
            log.warning("No preservation concept: L_pr (Eq. 8) keeps only the empty prompt's predictions. The paper "
                        "always trains with a preservation set, e.g. 'person' when erasing 'nude' or a celebrity.")
        holding = [p for p in config.preserve if mentions(p, config.concept)]
        if holding:  # an exact match is refused (TrainConfig); a phrase around the concept may be meant, but rarely
            log.warning("The preservation concept %s contains the concept '%s': L_pr (Eq. 8) then keeps the very "
                        "tokens L_erase removes, and the two pull against each other. Preserve what should stay "
                        "without the concept (e.g. 'person' when erasing 'nude').",
                        ", ".join(f"'{shown(p)}'" for p in holding), shown(config.concept))
        return cls(erase, tokens, encoded[len(texts)], tuple(encoded[len(texts) + 1 :]))

    def pick(self, erase_index: int, keep_index: int | None) -> tuple[EncodedPrompt, list[int], EncodedPrompt | None]:
        """An erase prompt, its concept's token indices, and a preservation prompt (None: there are none)."""
        keep = self.keep[keep_index] if keep_index is not None else None
        return self.erase[erase_index], list(self.erase_tokens[erase_index]), keep

    def draw(self, rng: random.Random) -> tuple[EncodedPrompt, list[int], EncodedPrompt | None]:
        """:meth:`pick` at random: c_er ~ D_er and c_pr ~ D_pr (Algorithm 1)."""
        return self.pick(rng.randrange(len(self.erase)), rng.randrange(len(self.keep)) if self.keep else None)


def check_erase_templates(config: TrainConfig, read: Callable[[str], str] = as_read) -> None:
    """Every erase template, filled, holds the concept: told from the text, before a model is loaded. The token
    lookup in :meth:`PromptPool.build` refuses the same prompt, but only after the text encoder ran (and, in ComfyUI,
    the model was loaded for training): minutes on Z-Image. ``read``: a prompt as the backend's encoder reads it
    (ComfyUI's un-escapes "\\(")."""
    concept = as_read(config.concept.strip())  # as concept_token_indices looks it up
    for template in config.erase_templates:
        text = read(fill_template(template, config.concept))
        if not mentions(text, concept):
            raise absent(concept, text)


def first_erase_text(config: TrainConfig) -> str:
    """The first of :func:`erase_texts` (the first template, unshuffled), without shuffling the rest."""
    return fill_template(config.erase_templates[0], config.concept)


def erase_texts(config: TrainConfig) -> list[str]:
    """Templates filled with the concept, then distinct shuffled variants (seeded, so resumable)."""
    rng = random.Random(config.seed)
    texts: list[str] = []
    for template in config.erase_templates:
        base = fill_template(template, config.concept)
        variants = [base]
        n_words = len(base.split())
        for _ in range(config.shuffle_pool * 4 if n_words > 1 else 0):
            if len(variants) > config.shuffle_pool:
                break
            candidate = shuffle_words(base, rng, keep=config.concept)
            if candidate not in variants:
                variants.append(candidate)
        texts.extend(variants)
    if config.shuffle_pool > 0 and len(texts) == len(config.erase_templates):
        log.warning("The erase prompts ('%s', …) have nothing to shuffle: the concept sits at the same tokens every "
                    "step (§4.1 shuffles to avoid that). Add templates with context words, e.g. 'a photo of a {} "
                    "person'.", texts[0])
    return texts
