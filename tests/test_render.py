"""Heatmap rows for the Attention Map Viewer and the demo: one colour scale across models, A − B about 0."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from zerase_core.render import word_map_rows


def _red(img: Image.Image) -> float:
    return float(np.asarray(img, dtype=np.float32)[..., 0].max())


def test_models_share_one_colour_scale_and_the_difference_is_centred():
    picture = Image.new("RGB", (16, 16), (128, 128, 128))
    a = torch.zeros(2, 4, 4)
    a[0, 1, 1], a[1, 2, 2] = 0.8, 0.4
    b = a * 0.5
    rows = word_map_rows(picture, [a, b], difference=True)
    assert [len(r) for r in rows] == [2, 2, 2]
    # One scale: model B's hottest cell is drawn cooler than A's (a per-row scale would draw them alike).
    assert _red(rows[1][0]) < _red(rows[0][0])
    same = word_map_rows(picture, [a, a], difference=True)[2][0]
    # A − B of identical maps is 0, the middle of a scale symmetric about 0: uniform, neither red nor blue.
    pixels = np.asarray(same, dtype=np.int32)
    assert pixels.min(axis=(0, 1)).tolist() == pixels.max(axis=(0, 1)).tolist()
    assert abs(int(pixels[0, 0, 0]) - int(pixels[0, 0, 2])) <= 1
    # A − B, not B − A: where A attends more (cell (1, 1): 0.8 vs 0.4) the difference is drawn red, not blue.
    diff = np.asarray(rows[2][0], dtype=np.int32)
    h, w = diff.shape[:2]
    red, _, blue = diff[int(h * 1.5 / 4), int(w * 1.5 / 4)]
    assert red > blue + 20


def test_latent_rgb_maps_each_latent_pixel_to_its_colour_block():
    """Channel 0 drives red up and green down; the bias lifts blue. Each latent pixel becomes an 8×8 block."""
    from zerase_core.render import latent_rgb

    latent = torch.zeros(1, 2, 2, 3)
    latent[0, 0, 0, 0] = 1.0  # top-left latent pixel: channel 0 on
    rgb = latent_rgb(latent, [[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0, 0.5])
    assert rgb.shape == (1, 16, 24, 3)
    assert torch.equal(rgb[0, :8, :8], torch.tensor([1.0, 0.0, 0.75]).expand(8, 8, 3))
    assert torch.equal(rgb[0, 8:, 8:], torch.tensor([0.5, 0.5, 0.75]).expand(8, 16, 3))
