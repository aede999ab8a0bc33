"""How a ViT sees, read from its own tensors: the patch grid, the patch-embedding filters, the position
embeddings and the distances its heads attend over (Dosovitskiy et al. 2021, figure 7).

Each quantity is a pure function of the model's tensors (the crop the model saw, `patch_embed.proj.weight`,
`pos_embed`, the attention probabilities of `VisionTransformer(x, return_attn=True)`), and each has a
`draw_*` companion that turns it into a PIL image. Tokens are in the model's order: the prefix tokens (class,
and distillation for distilled DeiT) first, then the patches in row-major order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .explain import colorize, tile


GRID_COLOR = (255, 214, 0)  # patch-grid lines: yellow shows on dark and light photos alike


def prefix_names(num_prefix: int) -> list[str]:
    """The names of the prefix tokens: ["class"], or ["class", "distillation"] for distilled DeiT."""
    names = ["class", "distillation"][:num_prefix]
    return names + ["register"] * (num_prefix - len(names))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


# --- patches ---------------------------------------------------------------------------------------------------


def patch_grid(crop: torch.Tensor, patch_size: int, num_prefix: int = 1, min_cell: int = 40) -> tuple[Image.Image, dict]:
    """The crop the model saw, cut into its patches: grid lines drawn and each patch token numbered.

    Args:
        crop: uint8 (C, H, W), C = 1 or 3: the pixels the model saw.
        patch_size: side of each square patch, in crop pixels.
        num_prefix: prefix tokens before the patches (1, or 2 for distilled DeiT).
        min_cell: small crops are enlarged by a whole factor until each patch is at least this many
            pixels wide, so that the numbers stay legible (a 28x28 crop with 4-pixel patches: 8 times).
    Returns:
        (an RGB image, counts) where the counts are a dict with "patches", "grid" (gh, gw),
        "prefix_tokens", "prefix" (their names), "sequence_length", "patch_size" and "crop" (H, W).
        Each patch is numbered with its position in the token sequence: the first patch is token
        num_prefix, after the class (and distillation) token.
    """
    C, H, W = crop.shape
    gh, gw = H // patch_size, W // patch_size
    scale = max(1, math.ceil(min_cell / patch_size))
    cell = patch_size * scale
    rgb = crop.expand(3, H, W).permute(1, 2, 0).numpy()  # (H, W, 3)
    image = Image.fromarray(np.ascontiguousarray(rgb)).resize((W * scale, H * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    line = max(1, scale // 4)
    for r in range(gh + 1):
        y = min(r * cell, gh * cell - 1)  # the last line inside the image
        draw.line([(0, y), (gw * cell - 1, y)], fill=GRID_COLOR, width=line)
    for c in range(gw + 1):
        x = min(c * cell, gw * cell - 1)
        draw.line([(x, 0), (x, gh * cell - 1)], fill=GRID_COLOR, width=line)
    n = gh * gw
    font = _font(cell // (2 if num_prefix + n < 100 else 3))
    for k in range(n):
        r, c = divmod(k, gw)
        draw.text(((c + 0.5) * cell, (r + 0.5) * cell), str(num_prefix + k), fill="white", font=font,
                  anchor="mm", stroke_width=max(1, cell // 16), stroke_fill="black")
    counts = {
        "patches": n,
        "grid": (gh, gw),
        "prefix_tokens": num_prefix,
        "prefix": prefix_names(num_prefix),
        "sequence_length": num_prefix + n,
        "patch_size": patch_size,
        "crop": (H, W),
    }
    return image, counts


# --- patch-embedding filters -----------------------------------------------------------------------------------


def filter_components(weight: torch.Tensor, k: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal components of the patch-embedding filters (`patch_embed.proj.weight`).

    Each of the D filters is flattened to a vector of C * p * p numbers; the vectors are centred (their mean
    over the D filters subtracted) and decomposed by SVD. Each component's sign is chosen so that its entry
    of largest magnitude is positive.

    Args:
        weight: (D, C, p, p).
        k: how many components; at most min(D, C * p * p) are returned.
    Returns:
        (components (k, C, p, p), unit length, in order of explained variance;
         explained_variance_ratio (k,), the share of the filters' total variance each explains).
    """
    D, C, p, q = weight.shape
    X = weight.detach().double().cpu().reshape(D, C * p * q)  # (D, C*p*p)
    X = X - X.mean(dim=0, keepdim=True)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)  # S (r,), Vh (r, C*p*p), r = min(D, C*p*p)
    var = S**2
    ratio = var / var.sum().clamp_min(1e-300)
    k = min(k, Vh.shape[0])
    comps = Vh[:k]  # (k, C*p*p)
    idx = comps.abs().argmax(dim=1, keepdim=True)  # (k, 1)
    comps = comps * torch.sign(comps.gather(1, idx))
    return comps.reshape(k, C, p, q).float(), ratio[:k].float()


def draw_filters(components: torch.Tensor, tile_px: int = 48, columns: int = 7, gap: int = 4) -> Image.Image:
    """Draws filters (or their principal components) as small tiles, in order, row by row.

    Args:
        components: (k, C, p, p), C = 1 (drawn grey) or 3 (drawn as RGB).
        tile_px: the side of each tile; each filter is enlarged by a whole factor, without smoothing.
        columns: tiles per row.
    Returns:
        An RGB image. Each tile is min-max normalised on its own (all channels together), so a tile shows
        the pattern, not its scale or sign.
    """
    k, C, p, _ = components.shape
    scale = max(1, round(tile_px / p))
    tiles = []
    for comp in components.detach().float().cpu():
        lo, hi = comp.min(), comp.max()
        x = ((comp - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8)  # (C, p, p)
        x = x.expand(3, p, p) if C == 1 else x[:3]
        im = Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy()))  # (p, p, 3)
        tiles.append(im.resize((p * scale, p * scale), Image.NEAREST))
    return tile(tiles, columns=min(columns, k), gap=gap)


# --- position embeddings ---------------------------------------------------------------------------------------


def position_similarity(pos_embed: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of each patch's position embedding with every patch's.

    Args:
        pos_embed: (1, num_prefix + gh * gw, D), the model's `pos_embed`.
        num_prefix: prefix positions before the patches (their embeddings are left out).
        grid: (gh, gw), the grid the embeddings were learned for.
    Returns:
        (gh, gw, gh, gw): entry [i, j, k, l] is the similarity of patch (i, j) with patch (k, l), so
        [i, j] is patch (i, j)'s map over the grid.
    """
    gh, gw = grid
    P = pos_embed.detach().double().cpu().reshape(-1, pos_embed.shape[-1])[num_prefix:]  # (gh*gw, D)
    if P.shape[0] != gh * gw:
        raise ValueError(f"pos_embed holds {P.shape[0]} patch positions, not a {gh}x{gw} grid")
    P = P / P.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (P @ P.T).reshape(gh, gw, gh, gw).float()


def color_bar(vmin: float, vmax: float, width: int, height: int = 12, label: str = "") -> Image.Image:
    """A horizontal bar of the inferno colormap from vmin (left) to vmax (right), with both ends labelled."""
    ramp = colorize(np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1)))  # (height, width, 3)
    font = _font(12)
    bar = Image.new("RGB", (width, height + 18), "white")
    bar.paste(Image.fromarray(ramp), (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((0, height + 2), f"{vmin:.2f}", fill="black", font=font)
    draw.text((width // 2, height + 2), label, fill="black", font=font, anchor="ma")
    draw.text((width, height + 2), f"{vmax:.2f}", fill="black", font=font, anchor="ra")
    return bar


def draw_position_similarity(sim: torch.Tensor, map_px: int = 48, gap: int = 3,
                             vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """Draws position-embedding similarities as a gh x gw grid of small gh x gw maps, on one colour scale.

    Args:
        sim: (gh, gw, gh, gw) from `position_similarity`; map (i, j) sits at row i, column j.
        map_px: the rough side of each small map (each cell is enlarged by a whole factor).
        vmin, vmax: the ends of the shared colour scale (default: the smallest and largest similarity).
    Returns:
        An RGB image: the maps, and under them a colour bar labelled with vmin and vmax.
    """
    gh, gw = sim.shape[:2]
    s = sim.detach().double().cpu()
    lo = float(s.min()) if vmin is None else vmin
    hi = float(s.max()) if vmax is None else vmax
    cell = max(1, round(map_px / max(gh, gw)))
    heat = ((s - lo) / max(hi - lo, 1e-12)).numpy()  # (gh, gw, gh, gw)
    maps = [Image.fromarray(colorize(heat[i, j])).resize((gw * cell, gh * cell), Image.NEAREST)
            for i in range(gh) for j in range(gw)]
    sheet = tile(maps, columns=gw, gap=gap)
    bar = color_bar(lo, hi, sheet.width, label="cosine similarity")
    out = Image.new("RGB", (sheet.width, sheet.height + 6 + bar.height), "white")
    out.paste(sheet, (0, 0))
    out.paste(bar, (0, sheet.height + 6))
    return out


# --- attention distance ----------------------------------------------------------------------------------------


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(n, n) Euclidean distances between patch centres, in pixels, for n = gh * gw patches in row-major order."""
    gh, gw = grid
    r, c = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    centres = torch.stack([r.flatten(), c.flatten()], dim=1) * patch_size  # (n, 2); offsets cancel in differences
    return torch.cdist(centres, centres)


def mean_attention_distance(attns: list[torch.Tensor], num_prefix: int, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Mean attention distance of every head in every layer: how far, in pixels, a head looks.

    For a patch query i, the distance is sum_j a_ij * |centre_i - centre_j| over the patch keys j, with the
    distance between patch centres in pixels of the crop the model saw; it is averaged over the patch
    queries. Prefix tokens are left out as queries and as keys, and the remaining weights are used as they
    are (not renormalised), so attention given to the class token counts as distance 0.

    Args:
        attns: per-layer attention probabilities, each (heads, N, N) with N = num_prefix + gh * gw
            (or (B, heads, N, N) for a batch of images).
        num_prefix: prefix tokens before the patches (1, or 2 for distilled DeiT).
        grid: (gh, gw), the patch grid of the crop.
        patch_size: side of each patch in crop pixels.
    Returns:
        (layers, heads) in pixels (or (B, layers, heads) for a batch).
    """
    dist = patch_distances(grid, patch_size)  # (n, n)
    n = dist.shape[0]
    per_layer = []
    for a in attns:
        if a.shape[-1] != num_prefix + n:
            raise ValueError(f"attention over {a.shape[-1]} tokens does not fit {num_prefix} prefix tokens and a {grid[0]}x{grid[1]} grid")
        a = a.detach().double().cpu()[..., num_prefix:, num_prefix:]  # (..., heads, n, n)
        per_layer.append((a * dist).sum(-1).mean(-1))  # (..., heads)
    return torch.stack(per_layer, dim=-2).float()  # (..., layers, heads)
