"""Prompts through a ComfyUI CLIP, with the character span of the user's prompt behind every feature row."""

from __future__ import annotations

from typing import Any, Sequence

from ...errors import ZEraseError
from ...prompts import EncodedPrompt, Span, as_read, token_span


def _inner_tokenizer(clip: Any, node: str):
    """(SD tokenizer holding the HF tokenizer, chat template) of a Z-Image CLIP."""
    outer = clip.tokenizer
    inner = getattr(outer, getattr(outer, "clip", ""), None)
    template = getattr(outer, "llama_template", None)
    if inner is None or template is None or "{}" not in template:
        raise ZEraseError(
            f"{node}: this CLIP is not Z-Image's text encoder (Qwen3 with its chat template). Load "
            "qwen_3_4b.safetensors with Load CLIP, type 'lumina2'."
        )
    return inner, template


def token_spans(hf_tokenizer: Any, ids: list[int], text: str, start: int, end: int,
                node: str) -> tuple[Span, ...]:
    """Per token: its (start, end) inside ``text[start:end]`` (the user's prompt), else None.

    Character offsets come from decoding growing prefixes, which works for any tokenizer whose
    decode round-trips (byte-level BPE does); a token that ends inside a multi-byte character
    joins the next one.
    """
    spans: list[Span] = []
    done, pending = 0, 0
    for k in range(1, len(ids) + 1):
        prefix = hf_tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if prefix.endswith("\ufffd") and k < len(ids):
            pending += 1
            continue
        spans.extend([token_span(done, len(prefix), start, end)] * (pending + 1))
        done, pending = len(prefix), 0
    if done != len(text):
        raise ZEraseError(
            f"{node}: the text encoder's tokens do not spell out the prompt (does it name an 'embedding:'? "
            "ComfyUI drops or replaces those); write Z-Erase prompts as plain text."
        )
    return tuple(spans)


def as_tokenized(prompt: str) -> str:
    """Text as ComfyUI's tokenizer spells it out: its escaped parentheses \\( \\) as plain ones, in NFC. The nodes
    read a concept and the viewer's words this way too, so that they are found in the prompts they are part of."""
    return as_read(prompt.replace("\\(", "(").replace("\\)", ")"))


def encode_with_clip(clip: Any, prompts: Sequence[str], node: str = "Z-Erase") -> list[EncodedPrompt]:
    """Encode like CLIPTextEncode, plus per feature row the character span of the user's prompt; refusals start with
    ``node``."""
    inner, template = _inner_tokenizer(clip, node)
    out = []
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        (cond, extra), *_ = clip.encode_from_tokens_scheduled(tokens)
        ids = [int(t[0]) for batch in tokens[inner.embedding_key] for t in batch]
        mask = extra.get("attention_mask")
        features = cond[0]
        if mask is not None and mask.shape[-1] == features.shape[0]:
            keep = mask[0].bool().to(features.device)
            features, ids = features[keep], [i for i, k in zip(ids, keep.tolist()) if k]
        read = as_tokenized(prompt)
        text = template.format(read)
        begin = template.index("{}")
        spans = token_spans(inner.tokenizer, ids, text, begin, begin + len(read), node)
        if len(spans) != features.shape[0]:
            raise ZEraseError(
                f"{node}: {features.shape[0]} caption features but {len(spans)} tokens for '{prompt}'."
            )
        out.append(EncodedPrompt(read, features.detach().float().cpu(), spans))
    return out
