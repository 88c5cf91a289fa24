"""Pictures from numbers: loss curves, labelled grids, heatmap overlays (PIL, no plotting library).

Images are (B, H, W, 3) float tensors in [0, 1] (ComfyUI's IMAGE layout) or PIL pictures.
Shared by the CLI demo and the ComfyUI nodes.
"""
from __future__ import annotations

import functools
import io
import math
import os
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import ZEraseError
from .files import atomic_write_bytes

_FONT = ImageFont.load_default()  # Aileron: Latin only, other scripts (a CJK prompt, σ) come out as boxes
# Fonts for the rest, by file name, which PIL looks up in the system's font folders (Windows, macOS, Linux's XDG ones):
# CJK first (they draw Greek and Latin too), DejaVu last (Greek, Cyrillic, no CJK).
WIDE_FONTS = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "wqy-microhei.ttc", "wqy-zenhei.ttc",
              "DroidSansFallbackFull.ttf", "msyh.ttc", "msgothic.ttc", "malgun.ttf", "PingFang.ttc",
              "Hiragino Sans GB.ttc", "Arial Unicode.ttf", "DejaVuSans.ttf")
CAPTION_LINES = 8  # a caption longer than this ends in "...": a 1600-word prompt made a 3000-pixel-tall grid
_COLOURS = [(220, 60, 60), (60, 120, 220), (60, 170, 90), (200, 140, 30), (150, 80, 200)]


@functools.cache
def _wide_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in WIDE_FONTS:
        try:
            return ImageFont.truetype(name, 11)
        except (OSError, ImportError):  # not on this system; a Pillow built without FreeType reads no font file
            continue
    return _FONT  # none found: boxes, as before, but the picture is made


def _font(text: str):
    """The default font for Latin text, a system font that draws the rest where one is found."""
    return _FONT if all(ord(c) < 0x250 for c in text) else _wide_font()


CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what rgb() makes RGB of
CONNECT_IMAGE = "connect an IMAGE output (a VAE Decode's, a Load Image's)."


def check_images(images: torch.Tensor) -> None:
    """A ComfyUI IMAGE with pictures in it: (batch, height, width, channels), at least one pixel each way."""
    if images.ndim != 4 or 0 in images.shape[1:3] or images.shape[-1] not in CHANNELS:
        raise ZEraseError(f"An IMAGE of shape {tuple(images.shape)} is not (batch, height, width, channels) with at "
                          f"least one pixel and 1, 3 or 4 channels; {CONNECT_IMAGE}")


def rgb(images: torch.Tensor) -> torch.Tensor:
    """(…, H, W, C) images as float32 RGB: any float dtype (bf16 from some nodes), one channel as grey, an alpha
    channel dropped. ComfyUI's IMAGE is RGB float, but not every node that makes one keeps to it."""
    channels = images.shape[-1]
    if images.ndim < 3 or channels not in CHANNELS:
        raise ZEraseError(f"An image of shape {tuple(images.shape)} is not (height, width, channels) with 1, 3 or 4 "
                          f"channels; {CONNECT_IMAGE}")
    images = images.detach().float()
    return images[..., :3] if channels == 4 else images.expand(*images.shape[:-1], 3)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(H, W, C) [0, 1] -> RGB PIL (C as :func:`rgb` takes it)."""
    return Image.fromarray((rgb(image).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """(H, W, 3) float [0, 1] as a PNG file, written whole or not at all: PIL's own save left a truncated picture on a
    full disk, and its OSError as a traceback."""
    data = io.BytesIO()
    to_pil(image).save(data, format="PNG")
    return atomic_write_bytes(path, data.getvalue())


def to_image(pictures: Sequence[Image.Image]) -> torch.Tensor:
    """PIL pictures of one size -> (B, H, W, 3) float."""
    return torch.stack([torch.from_numpy(np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0) for p in pictures])


def latent_rgb(latent: torch.Tensor, factors: Sequence[Sequence[float]], bias: Sequence[float] | None = None,
               upscale: int = 8) -> torch.Tensor:
    """Cheap (B, H·upscale, W·upscale, 3) preview of (B, C, H, W) latents by a linear latent→RGB map (no VAE).

    ``factors`` is (C, 3) and ``bias`` (3,), as a latent format ships them; the map's output is in [-1, 1].
    """
    weights = torch.tensor(factors, dtype=torch.float32)
    offset = torch.tensor(bias if bias is not None else [0.0, 0.0, 0.0], dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->brhw", latent.float().cpu(), weights) + offset.view(1, 3, 1, 1)
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1)
    return torch.nn.functional.interpolate(rgb, scale_factor=upscale, mode="nearest").permute(0, 2, 3, 1)


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average: per-step losses are noisy (a new x_t and σ every step). Each window averages the
    values it holds that are not NaN (a caller's gap): a running sum kept the NaN, and the bold line vanished from the
    gap on, its label "last nan"."""
    out = []
    for i in range(len(values)):
        kept = [v for v in values[max(0, i + 1 - window) : i + 1] if not math.isnan(v)]
        out.append(sum(kept) / len(kept) if kept else math.nan)
    return out


def curves(series: dict[str, list[float]], width: int = 640, panel_height: int = 110, title: str = "",
           steps: int | None = None) -> torch.Tensor:
    """One panel per named series: raw values faint, a moving average bold, min/max/last labelled. ``steps``: the
    run's step count when the series hold every k-th step only (a LoRA file's stored curves). ``title`` may hold
    line breaks: each line gets its own row above the panels."""
    n = max(1, len(series))
    top_margin = 8 + 14 * (title.count("\n") + 1)
    img = Image.new("RGB", (width, top_margin + n * panel_height + 16), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((8, 5), title, fill=(0, 0, 0), font=_font(title))
    left, right = 60, width - 10
    for k, (name, values) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        faint = tuple(int(255 - 0.3 * (255 - c)) for c in colour)
        top = top_margin + k * panel_height
        bottom = top + panel_height - 18
        d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
        # A NaN (a caller's gap; training records none) is skipped: the axis from min/max with it would be NaN.
        vals = [v for v in values if not math.isnan(v)]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        span = hi - lo or 1.0
        smooth = _smoothed(values, max(1, len(values) // 50))

        def point(i: int, v: float) -> tuple[float, float]:
            return left + (right - left) * i / max(1, len(values) - 1), bottom - (bottom - top) * (v - lo) / span

        for line, fill, w in ((values, faint, 1), (smooth, colour, 2)):
            pts = [point(i, v) for i, v in enumerate(line) if not math.isnan(v)]
            if len(pts) > 1:
                d.line(pts, fill=fill, width=w)
        d.text((4, top), f"{hi:.3g}", fill=(90, 90, 90), font=_FONT)
        d.text((4, bottom - 10), f"{lo:.3g}", fill=(90, 90, 90), font=_FONT)
        last = f"{smooth[-1]:.3g}" if smooth else "-"
        d.text((left + 6, top + 3), f"{name} (smoothed, last {last})", fill=colour, font=_font(name))
    last_step = steps if steps is not None else max((len(v) for v in series.values()), default=0)
    d.text((left, img.height - 14), f"step 1 .. {last_step}", fill=(0, 0, 0), font=_FONT)
    return to_image([img])


def grid(cells: Sequence[Sequence[Image.Image]], col_labels: Sequence[str], row_labels: Sequence[str] = (),
         caption: str = "") -> torch.Tensor:
    """A labelled grid: rows of equally sized pictures, column labels on top, caption below."""
    cw, ch = cells[0][0].size
    label_w = 90 if row_labels else 0
    caption_lines = _wrap(caption, max(20, (cw * len(cells[0]) + label_w) // 6), CAPTION_LINES) if caption else []
    W = label_w + cw * len(cells[0])
    H = 18 + ch * len(cells) + 14 * len(caption_lines) + (6 if caption_lines else 0)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for c, text in enumerate(col_labels):  # cut to its cell: at 64 px "wooden table" ran into the next label
        text = (_wrap(text, max(4, (cw - 6) // 6), 1) or [""])[0]
        d.text((label_w + c * cw + 4, 3), text, fill=(0, 0, 0), font=_font(text))
    for r, row in enumerate(cells):
        if r < len(row_labels):
            d.text((4, 18 + r * ch + ch // 2), row_labels[r], fill=(0, 0, 0), font=_font(row_labels[r]))
        for c, pic in enumerate(row):
            img.paste(*_fitted(pic, (cw, ch), (label_w + c * cw, 18 + r * ch)))
    for i, line in enumerate(caption_lines):
        d.text((4, 18 + ch * len(cells) + 3 + 14 * i), line, fill=(0, 0, 0), font=_font(line))
    return to_image([img])


def _fitted(pic: Image.Image, size: tuple[int, int], at: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """``pic`` scaled to fit ``size`` with its proportions kept, and where to paste it to sit centred in the cell at
    ``at``: a 128×32 picture beside a 64×64 one was squashed to a square, a comparison that misleads."""
    scale = min(size[0] / pic.width, size[1] / pic.height)
    fitted = pic.resize((max(1, round(pic.width * scale)), max(1, round(pic.height * scale))))
    return fitted, (at[0] + (size[0] - fitted.width) // 2, at[1] + (size[1] - fitted.height) // 2)


def _wrap(text: str, width: int, most: int | None = None) -> list[str]:
    """``text`` in lines of at most ``width`` columns (:func:`columns`), a word wider than that (a CJK prompt has no
    spaces) cut; at most ``most`` lines, the last ending in "..." where text was left out."""
    lines, line = [], ""
    for word in (piece for w in text.split() for piece in _cut(w, width)):
        if line and columns(line) + 1 + columns(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines += [line] if line else []
    if most is not None and len(lines) > most:
        lines = lines[:most - 1] + [_cut(lines[most - 1], width - 3)[0] + "..."]
    return lines


def columns(text: str) -> int:
    """Width in columns of a Latin letter: a CJK character is drawn about twice as wide (East Asian Wide, Fullwidth)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cut(word: str, width: int) -> list[str]:
    """``word`` in pieces of at most ``width`` columns."""
    pieces, piece = [], ""
    for c in word:
        if piece and columns(piece + c) > width:
            pieces.append(piece)
            piece = ""
        piece += c
    return pieces + [piece]


def heatmap(picture: Image.Image, heat: torch.Tensor, lo: float, hi: float,
            shown: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
    """Overlay a (h, w) map (scaled by lo..hi) on a picture, red = more attention. ``shown``: the share of the map's
    height and width the picture shows, from its top-left (a map over whole patches reaching past the picture)."""
    h = ((heat.float() - lo) / (hi - lo or 1.0)).clamp(0, 1)
    size = (round(picture.height / shown[0]), round(picture.width / shown[1]))
    h = torch.nn.functional.interpolate(h[None, None], size=size, mode="bilinear")[0, 0]
    h = h[:picture.height, :picture.width]
    base = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    colour = np.stack([h.numpy(), np.zeros_like(h.numpy()), 1.0 - h.numpy()], axis=-1)
    out = 0.45 * base + 0.55 * colour
    return Image.fromarray((out.clip(0, 1) * 255).round().astype(np.uint8))


def word_map_rows(picture: Image.Image, maps: Sequence[torch.Tensor], difference: bool = False,
                  shown: tuple[float, float] = (1.0, 1.0)) -> list[list[Image.Image]]:
    """One row of heatmaps per model's (n_words, h, w) maps, on one colour scale so models compare;
    with ``difference``, a last row maps[0] − maps[1] on a scale symmetric about 0. ``shown``: see :func:`heatmap`."""
    lo, hi = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    rows = [[heatmap(picture, m[n], lo, hi, shown) for n in range(m.shape[0])] for m in maps]
    if difference:
        diff = maps[0] - maps[1]
        r = float(diff.abs().max()) or 1.0
        rows.append([heatmap(picture, diff[n], -r, r, shown) for n in range(diff.shape[0])])
    return rows
