"""How the page draws maps so that a visitor can read them: one colour scale per figure, stated by a colour bar,
and head grids with numbered tiles laid out for the number of heads.

Pure functions of tensors and images (no Gradio): `vit_demo.explain` computes the maps and colours them; this
module lays them out.
"""

from __future__ import annotations

import html

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .. import explain

GAP = 4  # white pixels between tiles
MIN_VIEW = 224  # maps of smaller crops are drawn larger, by a whole factor


def grid_columns(n: int) -> int:
    """Columns for n tiles with no blank tile: the smallest divisor of n that is at least sqrt(n).

    12 heads -> 4 x 3, 6 -> 3 x 2, 4 -> 2 x 2, 3 -> 3 x 1, 16 -> 4 x 4, 8 -> 4 x 2 (a prime n gives one row).
    """
    assert n >= 1, "no tiles to lay out"
    return next(c for c in range(1, n + 1) if n % c == 0 and c * c >= n)


def shade(crop: torch.Tensor, grid: torch.Tensor, low: float, high: float, alpha: float) -> Image.Image:
    """A patch-grid map over the crop, coloured on the fixed scale [low, high] (not the map's own range).

    Args:
        crop: uint8 (C, H, W), C = 1 or 3.
        grid: (gh, gw) weights.
        low, high: the values drawn darkest and brightest.
        alpha: opacity of the map, 0 (crop only) to 1 (map only).
    """
    _, H, W = crop.shape
    g = ((grid.float() - low) / max(high - low, 1e-12)).clamp(0, 1)
    up = F.interpolate(g[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]  # (H, W)
    heat = explain.colorize(up.clamp(0, 1).numpy()).astype(np.float32)  # (H, W, 3)
    base = crop.expand(3, H, W).permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, 3)
    return Image.fromarray(((1 - alpha) * base + alpha * heat).round().astype(np.uint8))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def number(tile: Image.Image, n: int) -> Image.Image:
    """`tile` with `n` in a dark box in its top-left corner."""
    tile = tile.copy()
    draw = ImageDraw.Draw(tile)
    size = max(12, tile.height // 9)
    font = _font(size)
    text = str(n)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(3, size // 4)
    draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=(20, 20, 20))
    draw.text((pad - left, pad - top), text, font=font, fill=(255, 255, 255))
    return tile


def numbered_sheet(tiles: list[Image.Image], gap: int = GAP) -> Image.Image:
    """Equally sized tiles numbered 1..n, in `grid_columns(n)` columns with white gaps and no blank tile."""
    columns = grid_columns(len(tiles))
    rows = len(tiles) // columns
    w, h = tiles[0].size
    sheet = Image.new("RGB", (columns * w + (columns - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(number(tile, i + 1), ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return sheet


def enlarge(crop: torch.Tensor, side: int = MIN_VIEW) -> torch.Tensor:
    """A crop (C, H, W) smaller than `side` enlarged by the smallest whole factor that reaches it, pixels kept
    sharp (the bundled model's 28x28 crops are drawn 224x224)."""
    scale = -(-side // max(crop.shape[1:]))
    if scale > 1:
        crop = crop.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (C, H * s, W * s)
    return crop


def draw(crop: torch.Tensor, grid_map: torch.Tensor, alpha: float) -> tuple[Image.Image, float, float]:
    """A map from `Classifier.maps` over the crop, and the values its colour scale runs between.

    (gh, gw): one overlay, coloured from the map's lowest to its highest value (as `explain.overlay`).
    (heads, gh, gw): one numbered tile per head on one shared scale, so that a nearly flat head looks flat.

    Returns:
        (image, low, high).
    """
    low, high = float(grid_map.min()), float(grid_map.max())
    if grid_map.ndim == 2:
        return explain.overlay(crop, grid_map, alpha), low, high
    return numbered_sheet([shade(crop, m, low, high, alpha) for m in grid_map]), low, high


def _stops(n: int = 9) -> str:
    colours = explain.colorize(np.linspace(0, 1, n))  # (n, 3)
    return ", ".join(f"rgb({r},{g},{b}) {100 * i / (n - 1):.0f}%" for i, (r, g, b) in enumerate(colours.tolist()))


def colour_bar(low: float | None = None, high: float | None = None, what: str = "this map") -> str:
    """HTML: the colour scale from low to high, with the values it spans when known."""
    ends = ("low", "high") if low is None else (f"low ({low:.3g})", f"high ({high:.3g})")
    caption = "" if low is None else f'<div class="scale-note">Darkest is the lowest value in {html.escape(what)}, brightest the highest.</div>'
    return (
        f'<div class="colour-bar"><span>{ends[0]}</span><div class="ramp" style="background: linear-gradient(to right, {_stops()})">'
        f"</div><span>{ends[1]}</span></div>{caption}"
    )
