"""The toy world: one flat-coloured shape on a plain background, with a prompt grammar.

Every sample is fully described by :class:`Labels` (one value per attribute), rendered
deterministically from a seed, and paired with prompts in several styles. The object
colours and the background colours are disjoint sets, so a prompt's meaning survives any
word order -- which is what the "shuffled" benchmark variant relies on.

Rendering is an anti-aliased signed-distance fill in numpy: cheap enough (~50 us/image)
to generate training batches on the fly.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

IMAGE_SIZE = 32

# Canonical value -> RGB in [0, 1]. Saturated and far apart so one pixel identifies them.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
# Backgrounds are achromatic so they never equal an object colour.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")

# Radii in pixels: the shape's circumradius-like extent. Far apart so size is unambiguous.
SIZE_RADIUS = {"small": 7.0, "large": 10.0}
# Unit offsets of the object's centre; scaled per size so the object stays inside the frame.
POSITION_OFFSET = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
MARGIN = 2.0  # pixels kept between a shifted object's extent and the border
JITTER = 0.75  # max centre jitter in pixels; small, so position classes never overlap

# Synonyms per canonical value (the canonical word itself is always first).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "amber", "tangerine"),
    "black": ("black", "dark", "jet black"),
    "white": ("white", "ivory", "snow white"),
    "gray": ("gray", "grey", "silver"),
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "pyramid", "wedge"),
    "star": ("star", "pentagram", "sparkle"),
    "cross": ("cross", "plus", "plus sign"),
    "small": ("small", "tiny", "little"),
    "large": ("large", "big", "huge"),
    "center": ("center", "middle", "centre"),
    "left": ("left", "left side", "left edge"),
    "right": ("right", "right side", "right edge"),
    "top": ("top", "upper part", "top edge"),
    "bottom": ("bottom", "lower part", "bottom edge"),
}


@dataclass(frozen=True)
class Labels:
    """Ground truth of one sample; every field holds a canonical value."""

    colour: str
    shape: str
    size: str
    position: str
    background: str

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) not in ATTRIBUTES[f.name]:
                raise ValueError(f"Labels: {f.name}={getattr(self, f.name)!r} not in {ATTRIBUTES[f.name]}")

    def index(self, attribute: str) -> int:
        return ATTRIBUTES[attribute].index(getattr(self, attribute))


ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}


def random_labels(rng: random.Random) -> Labels:
    return Labels(**{name: rng.choice(values) for name, values in ATTRIBUTES.items()})


# ----------------------------------------------------------------------------- rendering


def _polygon(kind: str) -> np.ndarray:
    """Vertices (k, 2) of a unit-sized polygon, y pointing down (image coordinates)."""
    if kind == "square":
        s = 0.80  # a square of half-side 0.8 has about the circle's area; looks the same "size"
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if kind == "triangle":
        # Upward triangle with its centroid at the origin, so "position" means the same for every shape.
        return np.array([[0.0, -1.0], [1.0, 0.5], [-1.0, 0.5]])
    if kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if kind == "cross":
        a, b = 0.33, 0.95  # arm half-width, arm half-length
        return np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
        )
    raise ValueError(f"no polygon for shape {kind!r}")


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points to a simple polygon, vectorised over points."""
    dist = np.full(px.shape, np.inf)
    inside = np.zeros(px.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        (x0, y0), (x1, y1) = verts[i], verts[i - 1]
        ex, ey = x1 - x0, y1 - y0
        wx, wy = px - x0, py - y0
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(wx - ex * t, wy - ey * t))
        # Even-odd crossing test for the sign.
        crosses = ((y0 > py) != (y1 > py)) & (px < (x1 - x0) * (py - y0) / (y1 - y0 + 1e-12) + x0)
        inside ^= crosses
    return np.where(inside, -dist, dist)


def object_centre(labels: Labels) -> tuple[float, float]:
    """Centre (x, y) in pixels before jitter: shifted to the side by as much as the frame allows."""
    radius = SIZE_RADIUS[labels.size]
    shift = IMAGE_SIZE / 2 - radius - MARGIN
    ox, oy = POSITION_OFFSET[labels.position]
    return IMAGE_SIZE / 2 + ox * shift, IMAGE_SIZE / 2 + oy * shift


def render(labels: Labels, rng: np.random.Generator | None = None) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE, 3) float32 image in [0, 1]; ``rng`` adds the small jitter."""
    cx, cy = object_centre(labels)
    radius = SIZE_RADIUS[labels.size]
    if rng is not None:
        cx, cy = cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)
        radius *= rng.uniform(0.97, 1.03)
    coords = np.arange(IMAGE_SIZE) + 0.5  # pixel centres
    px, py = np.meshgrid(coords, coords)  # (H, W) each
    ux, uy = (px - cx) / radius, (py - cy) / radius
    if labels.shape == "circle":
        sdf = np.hypot(ux, uy) - 1.0
    else:
        sdf = _polygon_sdf(ux, uy, _polygon(labels.shape))
    coverage = np.clip(0.5 - sdf * radius, 0.0, 1.0)[..., None]  # one-pixel anti-aliasing band
    fg = np.asarray(COLOURS[labels.colour])
    bg = np.asarray(BACKGROUNDS[labels.background])
    return (coverage * fg + (1.0 - coverage) * bg).astype(np.float32)


def sample(n: int, seed: int) -> tuple[np.ndarray, list[Labels]]:
    """``n`` images (n, H, W, 3) in [0, 1] with their labels; the same seed gives the same batch."""
    label_rng = random.Random(seed)
    pixel_rng = np.random.default_rng(seed)
    labels = [random_labels(label_rng) for _ in range(n)]
    images = np.stack([render(lab, pixel_rng) for lab in labels]) if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3))
    return images.astype(np.float32), labels


# ----------------------------------------------------------------------------- prompts

PROMPT_STYLES = ("canonical", "synonym", "shuffled", "paraphrase")

_POSITION_PHRASES = {
    "center": ("in the {}",),
    "left": ("on the {}", "at the {}"),
    "right": ("on the {}", "at the {}"),
    "top": ("at the {}", "near the {}"),
    "bottom": ("at the {}", "near the {}"),
}
_BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "over {}")
# Paraphrase templates: {s} size, {c} colour, {h} shape, {p} position phrase, {b} background phrase.
_PARAPHRASES = (
    "{p}, a {s} {c} {h} {b}",
    "a {h} coloured {c}, {s}, {p}, {b}",
    "there is a {s} {h} in {c} {p} {b}",
    "{b}: a {c} {h}, {s}, {p}",
    "{s} {c} {h} {p} {b}",
    "a {c} {s} {h} {b}, {p}",
    "{c} colored {h}, {s} and {p}, {b}",
)
# When an attribute is left out of a training prompt the model must still produce a sensible
# sample: these fill the grammatical gap.
_NO_SHAPE = ("shape", "object", "thing")


def _word(value: str, rng: random.Random | None) -> str:
    return rng.choice(SYNONYMS[value]) if rng is not None else value


def make_prompt(
    labels: Labels,
    style: str = "canonical",
    rng: random.Random | None = None,
    omit: Sequence[str] = (),
) -> str:
    """A prompt for ``labels``.

    canonical: "a large red circle on the left on a white background" (fixed order, canonical words)
    synonym:   canonical order, every word drawn from its synonyms ("a huge crimson disc ...")
    shuffled:  canonical words in a random word order
    paraphrase: a random template from :data:`_PARAPHRASES` with canonical words
    ``omit`` leaves attributes out (used for training so each word is learnt on its own).
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"style {style!r} not in {PROMPT_STYLES}")
    rng = rng if rng is not None else random.Random(0)
    syn_rng = rng if style == "synonym" else None
    c = "" if "colour" in omit else _word(labels.colour, syn_rng)
    h = rng.choice(_NO_SHAPE) if "shape" in omit else _word(labels.shape, syn_rng)
    s = "" if "size" in omit else _word(labels.size, syn_rng)
    p = "" if "position" in omit else _position_phrase(labels.position, syn_rng, rng, style)
    b = "" if "background" in omit else _background_phrase(labels.background, syn_rng, rng, style)
    if style == "paraphrase":
        text = rng.choice(_PARAPHRASES).format(s=s, c=c, h=h, p=p, b=b)
    else:
        text = f"a {s} {c} {h} {p} {b}"
    text = _tidy(text)
    if style == "shuffled":
        words = text.split()
        rng.shuffle(words)
        text = " ".join(words)
    return text


def _position_phrase(value: str, syn_rng, rng: random.Random, style: str) -> str:
    phrases = _POSITION_PHRASES[value]
    template = phrases[0] if style in ("canonical", "shuffled") else rng.choice(phrases)
    return template.format(_word(value, syn_rng))


def _background_phrase(value: str, syn_rng, rng: random.Random, style: str) -> str:
    template = _BACKGROUND_PHRASES[0] if style in ("canonical", "shuffled") else rng.choice(_BACKGROUND_PHRASES)
    return template.format(_word(value, syn_rng))


def _tidy(text: str) -> str:
    """Collapse the gaps and dangling punctuation that omitted attributes leave behind."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(\s*,)+", ",", text)  # ", ," -> ","
    text = re.sub(r"\s+([,:])", r"\1", text)
    text = re.sub(r"(^[,:\s]+)|([,:\s]+$)", "", text)
    text = re.sub(r"\band\b,", ",", text)
    text = re.sub(r"\b(a|in|colou?red) ,", r"\1", text)
    return text.strip()


def vocabulary() -> list[str]:
    """Every word the grammar can emit (lowercase), sorted; a word-level tokenizer builds on this."""
    texts = [" ".join(v) for v in SYNONYMS.values()]
    texts += list(_PARAPHRASES) + list(_NO_SHAPE) + list(_BACKGROUND_PHRASES)
    texts += [t for ts in _POSITION_PHRASES.values() for t in ts]
    texts.append("a colored coloured there is and")
    words = set()
    for text in texts:
        words.update(w for w in re.findall(r"[a-z]+|[,:]", re.sub(r"\{\w*\}", " ", text.lower())))
    return sorted(words)


# ----------------------------------------------------------------------------- parsing


def _phrase_table() -> list[tuple[str, str, str]]:
    """(phrase, attribute, canonical value), longest phrase first so "jet black" wins over "black"."""
    table = []
    for attribute, values in ATTRIBUTES.items():
        for value in values:
            for phrase in SYNONYMS[value]:
                table.append((phrase, attribute, value))
    return sorted(table, key=lambda row: -len(row[0]))


_PHRASES = _phrase_table()


def concept_phrase(text: str) -> tuple[str, str] | None:
    """(attribute, canonical value) when the whole of ``text`` is one concept's word or phrase ("Crimson", "left
    side"), else None ("not red" names red, but is not its word)."""
    text = " ".join(text.lower().split())
    return next(((attribute, value) for phrase, attribute, value in _PHRASES if phrase == text), None)


def parse_prompt(text: str) -> dict[str, str]:
    """Attributes a prompt names, as canonical values (bag of words: word order does not matter)."""
    found: dict[str, str] = {}
    rest = " " + text.lower() + " "
    for phrase, attribute, value in _PHRASES:
        pattern = r"(?<![a-z])" + r"\s+".join(re.escape(w) for w in phrase.split()) + r"(?![a-z])"
        if re.search(pattern, rest):
            found.setdefault(attribute, value)
            rest = re.sub(pattern, " ", rest)  # consumed, so "jet black" does not also count as "black"
    return found
