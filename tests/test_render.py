"""Heatmap rows for the Attention Map Viewer and the demo: one colour scale across models, A − B about 0."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from zerase_core.render import curves, word_map_rows


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


def test_a_map_over_whole_patches_is_cut_to_the_picture_not_squeezed_into_it():
    """A 9 × 7 latent (an IMAGE of 72 × 56 px encoded) is padded to whole patches of 2: a 5 × 4 map over 80 × 64 px.
    Stretched over the picture, token (2, 1) was drawn up to half a patch toward the top-left (a review); cut, its
    heat is centred on its own pixels, rows 32–47 and columns 16–31."""
    from zerase_core.attention_maps import shown_share

    picture = Image.new("RGB", (56, 72), (128, 128, 128))  # PIL: (width, height)
    heat = torch.zeros(1, 5, 4)
    heat[0, 2, 1] = 1.0
    shown = shown_share((9, 7), patch=2)
    assert shown == (9 / 10, 7 / 8)
    red = np.asarray(word_map_rows(picture, [heat], shown=shown)[0][0], dtype=np.float32)[..., 0]
    rows, cols = np.nonzero(red == red.max())
    assert abs(rows.mean() - 39.5) <= 1 and abs(cols.mean() - 23.5) <= 1, (rows.mean(), cols.mean())


def test_latent_rgb_maps_each_latent_pixel_to_its_colour_block():
    """Channel 0 drives red up and green down; the bias lifts blue. Each latent pixel becomes an 8×8 block."""
    from zerase_core.render import latent_rgb

    latent = torch.zeros(1, 2, 2, 3)
    latent[0, 0, 0, 0] = 1.0  # top-left latent pixel: channel 0 on
    rgb = latent_rgb(latent, [[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0, 0.5])
    assert rgb.shape == (1, 16, 24, 3)
    assert torch.equal(rgb[0, :8, :8], torch.tensor([1.0, 0.0, 0.75]).expand(8, 8, 3))
    assert torch.equal(rgb[0, 8:, 8:], torch.tensor([0.5, 0.5, 0.75]).expand(8, 16, 3))


def test_images_of_one_channel_of_bfloat16_or_with_alpha_are_drawn_and_others_refused():
    """Some nodes make IMAGEs that are not float RGB: PIL's "Cannot handle this data type" and torch's "unsupported
    ScalarType BFloat16" reached the Compare node's user as tracebacks."""
    import pytest

    from zerase_core.errors import ZEraseError
    from zerase_core.render import rgb, to_pil

    grey = torch.rand(4, 5, 1)
    assert np.asarray(to_pil(grey)).shape == (4, 5, 3)
    assert torch.equal(rgb(grey), grey.expand(4, 5, 3)) and rgb(grey).dtype == torch.float32
    assert np.asarray(to_pil(grey.bfloat16())).shape == (4, 5, 3)
    with_alpha = torch.rand(4, 5, 4)
    assert torch.equal(rgb(with_alpha), with_alpha[..., :3])
    with pytest.raises(ZEraseError, match=r"An image of shape \(4, 5, 2\) is not .* with 1, 3 or 4 channels"):
        to_pil(torch.rand(4, 5, 2))


def test_a_picture_of_other_proportions_is_fitted_into_its_cell_not_squashed():
    """A 128×32 erased image beside a 64×64 original was squashed to a square."""
    from zerase_core.render import grid

    black = Image.new("RGB", (64, 64), (0, 0, 0))
    wide = Image.new("RGB", (128, 32), (0, 0, 0))
    out = (grid([[black, wide]], ["original", "erased"])[0].numpy() * 255).round()
    cell = out[18:18 + 64, 64:128]  # the second column, below the labels' 18 rows
    dark_rows = np.flatnonzero(cell.max(axis=(1, 2)) < 10)
    assert dark_rows.tolist() == list(range(24, 40))  # 128×32 at half size: 64×16, centred
    assert (out[18:18 + 64, :64] < 10).all()  # the square one fills its cell


def test_a_caption_without_spaces_is_wrapped_and_a_long_one_cut():
    """A CJK prompt has no spaces: it ran on one clipped line; a 1600-word prompt made a grid 3000 pixels tall."""
    from zerase_core.render import CAPTION_LINES, _wrap, columns

    assert columns("a cat") == 5 and columns("一只猫") == 6  # drawn about twice as wide
    lines = _wrap("一只猫在草地上" * 20, 30)  # 140 characters, 280 columns: 10 lines of 15
    assert len(lines) == 10 and all(columns(line) <= 30 for line in lines) and "".join(lines) == "一只猫在草地上" * 20
    long = _wrap("word " * 1600, 40, CAPTION_LINES)
    assert len(long) == CAPTION_LINES and long[-1].endswith("...") and all(columns(line) <= 40 for line in long)


def test_text_beyond_latin_is_drawn_with_a_system_font_that_has_it(monkeypatch):
    """PIL's default font draws Latin only: CJK words and σ came out as boxes in the Viewer's and Compare's labels."""
    import zerase_core.render as render

    found, tried, present = object(), [], render.WIDE_FONTS[2]

    def truetype(name, size):
        tried.append(name)
        if name == present:
            return found
        raise OSError("not on this system")

    monkeypatch.setattr(render.ImageFont, "truetype", truetype)
    render._wide_font.cache_clear()
    try:
        assert render._font("a photo of a cat, café") is render._FONT and tried == []  # Latin: the default
        assert render._font("一只猫") is found and render._font("σ 0.5") is found
        assert tried == list(render.WIDE_FONTS[:3])  # looked up once
        monkeypatch.setattr(render, "WIDE_FONTS", ("none.ttf",))
        render._wide_font.cache_clear()
        assert render._font("一只猫") is render._FONT  # none found: the default, the picture is still made
    finally:
        render._wide_font.cache_clear()


def test_a_column_label_stays_in_its_cell():
    """A QA run: at 64 px cells "wooden table" ran into the next column's label, reading "wooden table soft light"."""
    from zerase_core.render import grid

    cells = [[Image.new("RGB", (64, 64), (255, 255, 255))] * 2]
    strip = grid(cells, ["wooden table in the evening", ""])[0, :18].numpy()  # the label strip
    assert strip[:, 4:60].min() < 0.5  # the first label is drawn in its cell
    assert strip[:, 64:].min() == 1.0  # and nothing of it in the second's


def test_a_title_of_two_lines_gets_a_row_for_each():
    """The Train node's curves name the file they were saved to on a second line (the one thing shown on the node in
    every ComfyUI version): it was drawn over the first panel."""
    series = {"L_erase": [0.3, 0.2, 0.1]}
    one, two = curves(series, title="Z-Erase 'cat': 3 steps"), curves(series, title="Z-Erase 'cat'\nsaved: x")
    assert two.shape[1] == one.shape[1] + 14  # a row more, the panels below it as before
    assert torch.equal(two[0, 14 + 22:], one[0, 22:])
    blank = curves(series, title="Z-Erase 'cat'\n")  # the same rows, nothing written in the second
    assert (two[0, 22:36] < 0.5).any() and not (blank[0, 22:36] < 0.5).any()  # drawn there, above the first panel


def test_the_colour_scale_spans_every_models_maps_not_only_the_first():
    """Model B attending MORE than model A is drawn hotter than A, not clipped to A's maximum."""
    picture = Image.new("RGB", (16, 16), (128, 128, 128))
    a = torch.zeros(1, 4, 4)
    a[0, 1, 1] = 0.4
    rows = word_map_rows(picture, [a, a * 2])
    assert _red(rows[0][0]) < _red(rows[1][0])


def test_a_map_padded_on_one_side_only_is_cut_on_that_side():
    """A 9 × 4 latent with patches of 2 is padded in height only (shown (0.9, 1)); token (2, 0) covers rows 32-47."""
    from zerase_core.attention_maps import shown_share

    picture = Image.new("RGB", (32, 72), (128, 128, 128))
    heat = torch.zeros(1, 5, 2)
    heat[0, 2, 0] = 1.0
    shown = shown_share((9, 4), patch=2)
    assert shown == (0.9, 1.0)
    red = np.asarray(word_map_rows(picture, [heat], shown=shown)[0][0], dtype=np.float32)[..., 0]
    rows, cols = np.nonzero(red == red.max())
    assert abs(rows.mean() - 39.5) <= 1 and cols.max() < 16, (rows.mean(), cols.max())


def test_the_step_axis_ends_at_the_runs_step_count_when_given():
    """``steps`` labels the axis of curves that hold every k-th step only; without it, the series' length."""
    series = {"L_erase": [1.0, 0.5, 0.25, 0.2]}
    plain = curves(series)
    assert torch.equal(curves(series, steps=4), plain)  # "step 1 .. 4" either way
    assert not torch.equal(curves(series, steps=400), plain)  # "step 1 .. 400"


def test_a_curve_spans_the_panel_to_its_last_step():
    """The last value is drawn at the panel's right edge (x = width - 10)."""
    width = 640
    pixels = (curves({"L_erase": [0.0, 1.0, 0.5]}, width=width)[0].numpy() * 255).round()
    red = (abs(pixels[..., 0] - 220) < 30) & (pixels[..., 1] < 110) & (pixels[..., 2] < 110)
    columns = np.nonzero(red[22:115].any(axis=0))[0]  # the first panel's box, below the title row
    assert columns.max() >= width - 13, columns.max()  # the last of 3 values (a 2-pixel line), not 2/3 of the way


def test_text_that_fits_its_lines_is_not_cut():
    """Only text left out ends in "...": a word label that fits its cell, or a caption of exactly the most lines."""
    from zerase_core.render import _wrap

    assert _wrap("cat", 10, 1) == ["cat"]
    assert _wrap("one two three", 5, 3) == ["one", "two", "three"]
    assert _wrap("one two three four", 5, 3) == ["one", "two", "th..."]


def test_a_nan_gap_spoils_only_its_own_window_of_the_smoothed_curve():
    """A NaN (a caller's gap) is left out of the windows that hold it; the smoothed line goes on after it."""
    import math

    from zerase_core.render import _smoothed

    smooth = _smoothed([1.0, float("nan")] + [2.0] * 200, 4)
    assert smooth[:3] == [1.0, 1.0, 1.5] and smooth[-1] == 2.0
    assert _smoothed([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]  # the trailing mean, the first windows shorter
    assert math.isnan(_smoothed([float("nan")], 3)[0])  # a window of gaps only: nothing to draw
