"""Burn the site's notice (e.g. ``RESEARCH USE ONLY``) into a corner of every fused image.

The text is small (about 1/36 of the image side; Pillow's crisp bitmap font below 12 px, its
scalable font above), white with a black outline so it reads on any background, wrapped at word
boundaries to fit the width, and put in the corner that is darkest over the whole series, i.e.
outside the anatomy where the images allow it. The same corner is used on every slice so the
notice does not jump while scrolling.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")  # preference on ties
BITMAP_BELOW_PX = 12  # smaller text is drawn with the bitmap font: anti-aliased glyphs blur at 9 px


@dataclass(frozen=True)
class NoticeStamp:
    """The rendered notice: 2 = text, 1 = outline, 0 = untouched, and where it went."""

    stamp: np.ndarray  # (h, w) uint8
    corner: str
    top: int
    left: int


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=16)
def _font(size: int) -> Font:
    if size < BITMAP_BELOW_PX:
        return ImageFont.load_default_imagefont()
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: Font, width: int) -> list[str] | None:
    """Greedy word wrap to ``width`` pixels; None when a single word is wider."""
    lines: list[str] = []
    for word in text.split():
        if font.getlength(word) > width:
            return None
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def render_notice(text: str, rows: int, cols: int) -> np.ndarray | None:
    """The notice as a stamp (2 text, 1 outline) sized for a rows x cols image; None if empty."""
    text = " ".join(text.split())
    if not text or rows < 8 or cols < 8:
        return None
    margin = max(1, round(min(rows, cols) / 64))
    size = round(min(rows, cols) / 36)
    font = _font(size)
    lines = _wrap(text, font, cols - 2 * margin - 2)
    while lines is None and size >= BITMAP_BELOW_PX:
        size -= 1
        font = _font(size)
        lines = _wrap(text, font, cols - 2 * margin - 2)
    if lines is None:  # a word wider than the image even in the bitmap font: it is cut at the edge
        lines = text.split()
    line_h = int(font.getbbox("Ag")[3]) + 1
    width = int(max(font.getlength(line) for line in lines)) + 2
    height = line_h * len(lines) + 2
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(lines):
        draw.text((1, 1 + n * line_h), line, fill=255, font=font)
    ink = np.asarray(canvas) >= 96
    ys, xs = np.nonzero(ink)
    if ys.size == 0:
        return None
    ink = ink[max(ys.min() - 1, 0) : ys.max() + 2, max(xs.min() - 1, 0) : xs.max() + 2]
    padded = np.pad(ink, 1)
    grown = np.zeros_like(padded)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown |= np.roll(np.roll(padded, dy, axis=0), dx, axis=1)
    stamp = np.where(padded, 2, np.where(grown, 1, 0)).astype(np.uint8)
    return stamp[: rows - 2 * margin, : cols - 2 * margin]


def place_notice(pixels: np.ndarray, text: str) -> NoticeStamp | None:
    """Render the notice for ``pixels`` (N,H,W) or (N,H,W,3) and choose the darkest corner."""
    rows, cols = int(pixels.shape[1]), int(pixels.shape[2])
    stamp = render_notice(text, rows, cols)
    if stamp is None:
        return None
    margin = max(1, round(min(rows, cols) / 64))
    h, w = stamp.shape
    luma = pixels.max(axis=-1) if pixels.ndim == 4 else pixels
    origins = {
        "top-left": (margin, margin),
        "top-right": (margin, cols - margin - w),
        "bottom-left": (rows - margin - h, margin),
        "bottom-right": (rows - margin - h, cols - margin - w),
    }
    scores = {
        corner: float(luma[:, top : top + h, left : left + w].mean())
        for corner, (top, left) in origins.items()
    }
    corner = min(CORNERS, key=lambda c: (round(scores[c], 3), CORNERS.index(c)))
    top, left = origins[corner]
    return NoticeStamp(stamp=stamp, corner=corner, top=top, left=left)


def burn_notice(pixels: np.ndarray, text: str) -> tuple[np.ndarray, str | None]:
    """A copy of ``pixels`` (uint8) with the notice burned into every slice; and the corner used."""
    placed = place_notice(pixels, text)
    if placed is None:
        return pixels, None
    out = pixels.copy()
    h, w = placed.stamp.shape
    region = out[:, placed.top : placed.top + h, placed.left : placed.left + w]
    region[:, placed.stamp == 1] = 0
    region[:, placed.stamp == 2] = 255
    return out, placed.corner
