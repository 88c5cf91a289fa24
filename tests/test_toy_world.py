"""The toy world: deterministic rendering, labels that match the pixels, prompts that parse back."""

import random
from dataclasses import replace

import numpy as np
import pytest

from zerase_core.toy import world
from zerase_core.toy.world import ATTRIBUTES, PROMPT_STYLES, Labels, make_prompt, parse_prompt, render, sample


def test_same_seed_same_batch_different_seed_different_batch():
    a, la = sample(16, seed=3)
    b, lb = sample(16, seed=3)
    c, _ = sample(16, seed=4)
    assert np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, c)
    assert a.shape == (16, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0


def _object_mask(image: np.ndarray, labels: Labels) -> np.ndarray:
    """Pixels closer to the object's colour than to the background's."""
    fg, bg = np.asarray(world.COLOURS[labels.colour]), np.asarray(world.BACKGROUNDS[labels.background])
    return np.linalg.norm(image - fg, axis=-1) < np.linalg.norm(image - bg, axis=-1)


@pytest.mark.parametrize("seed", range(3))
def test_pixels_match_labels(seed):
    images, labels = sample(60, seed)
    for image, lab in zip(images, labels):
        mask = _object_mask(image, lab)
        # The object's colour is exact at its centre and the corners show the background.
        cx, cy = world.object_centre(lab)
        assert np.allclose(image[int(cy), int(cx)], world.COLOURS[lab.colour], atol=1e-6)
        assert np.allclose(image[0, 0], world.BACKGROUNDS[lab.background], atol=1e-6)
        # Position: the object's centroid is where the label says, within the jitter.
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() + 0.5 - cx) < 1.5 and abs(ys.mean() + 0.5 - cy) < 1.5
        # Size: the area is nearer the un-jittered area of the labelled size than of the other size.
        areas = {size: _object_mask(render(replace(lab, size=size)), lab).sum() for size in world.SIZES}
        nearest = min(areas, key=lambda size: abs(np.log(mask.sum() / areas[size])))
        assert nearest == lab.size, (lab, mask.sum(), areas)


def test_all_labels_render_inside_the_frame():
    rng = np.random.default_rng(0)
    for values in np.array(np.meshgrid(*[range(len(v)) for v in ATTRIBUTES.values()])).T.reshape(-1, len(ATTRIBUTES)):
        lab = Labels(**{name: ATTRIBUTES[name][i] for name, i in zip(ATTRIBUTES, values)})
        mask = _object_mask(render(lab, rng), lab)
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert not border.any(), lab


def test_labels_reject_unknown_values():
    with pytest.raises(ValueError):
        Labels(colour="teal", shape="circle", size="small", position="left", background="black")


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_prompts_parse_back_to_their_labels(style):
    rng = random.Random(style)
    _, labels = sample(200, seed=11)
    for lab in labels:
        text = make_prompt(lab, style, rng)
        assert parse_prompt(text) == vars(lab), text


def test_omitted_attributes_are_absent_and_the_rest_parse():
    rng = random.Random(0)
    _, labels = sample(100, seed=12)
    for lab in labels:
        omit = rng.sample(list(ATTRIBUTES), 2)
        text = make_prompt(lab, rng.choice(PROMPT_STYLES), rng, omit=omit)
        assert parse_prompt(text) == {k: v for k, v in vars(lab).items() if k not in omit}, text
        assert ",," not in text.replace(" ", "") and not text.startswith(",")


def test_canonical_prompt_and_synonyms():
    lab = Labels(colour="red", shape="circle", size="large", position="left", background="white")
    assert make_prompt(lab) == "a large red circle on the left on a white background"
    texts = {make_prompt(lab, "synonym", random.Random(i)) for i in range(30)}
    assert any("crimson" in t or "scarlet" in t for t in texts)


def test_vocabulary_covers_every_generated_word():
    vocab = set(world.vocabulary())
    rng = random.Random(1)
    _, labels = sample(300, seed=13)
    for lab in labels:
        text = make_prompt(lab, rng.choice(PROMPT_STYLES), rng, omit=rng.sample(list(ATTRIBUTES), 1))
        words = set(text.lower().replace(",", " , ").replace(":", " : ").split())
        assert words <= vocab, words - vocab


# --- from a mutation audit: each kills a mutant the suite let through -------------------------------------------

def test_random_labels_draw_every_value_of_every_attribute():
    """Training batches and evaluation sets come from ``sample``: a value it never draws (the last of a list, say) is
    never trained nor measured, and nothing else would tell."""
    _, labels = sample(300, seed=5)
    for attribute, values in ATTRIBUTES.items():
        assert {getattr(lab, attribute) for lab in labels} == set(values), attribute


def test_different_seeds_draw_different_labels_not_only_different_jitter():
    """The seed chooses what is drawn, not only where: a labels stream fixed to one seed passed the seed test above,
    since the jitter alone made the pixels differ."""
    _, a = sample(16, seed=3)
    _, b = sample(16, seed=4)
    assert a != b


def test_shuffled_prompts_are_the_canonical_words_in_another_order():
    """The "shuffled" benchmark style is the canonical prompt's words (canonical phrase templates included) in a random
    order: not the canonical order itself, nor other templates' words."""
    lab = Labels(colour="red", shape="circle", size="large", position="top", background="white")
    canonical = make_prompt(lab)
    shuffled = [make_prompt(lab, "shuffled", random.Random(i)) for i in range(20)]
    assert all(sorted(t.split()) == sorted(canonical.split()) for t in shuffled), shuffled
    assert any(t != canonical for t in shuffled)


def test_a_paraphrase_without_its_position_leaves_no_dangling_and():
    """"{s} and {p}" with the position left out reads "small, on a ..." not "small and, on a ...": the tidy-up drops
    the "and" the gap leaves."""
    lab = Labels(colour="red", shape="circle", size="small", position="left", background="white")
    texts = {make_prompt(lab, "paraphrase", random.Random(i), omit=["position"]) for i in range(200)}
    assert any(t.startswith("red colored circle, small") for t in texts), texts  # the "and" template was drawn
    assert not any("and," in t or t.endswith(" and") for t in texts), texts
