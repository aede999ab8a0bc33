"""Where the transformer looked: attention maps, attention rollout, and overlays, as pure functions.

Every function takes the per-layer attention probabilities that `VisionTransformer(x, return_attn=True)`
returns for one image, each (heads, N, N) with N = num_prefix + gh * gw, and gives maps over the patch
grid (gh, gw). Prefix tokens (the class token, DeiT's distillation token) are read from but never drawn.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

METHODS = ("rollout", "attention", "heads")
HEAD_FUSIONS = ("mean", "max", "min")
DEFAULT_DISCARD_RATIO = 0.9  # for drawing: dropping the weakest 90% of attention gives crisper rollout maps

# The "inferno" colormap at five stops (dark purple -> yellow), interpolated linearly.
_INFERNO = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def grid_shape(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """The (gh, gw) patch grid of an image of that size holding num_patches patches."""
    gh = round(math.sqrt(num_patches * height / width))
    gw = num_patches // gh
    assert gh * gw == num_patches, f"{num_patches} patches do not tile a {height}x{width} image"
    return gh, gw


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(heads, N, N) -> (N, N) by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attn.mean(0)
    if head_fusion == "max":
        return attn.amax(0)
    if head_fusion == "min":
        return attn.amin(0)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, not {head_fusion!r}")


def cls_attention(attns: list[torch.Tensor], num_prefix: int = 1, layer: int = -1, head: int | None = None) -> torch.Tensor:
    """How much the class token attends to each patch in one layer.

    Args:
        attns: per-layer attention, each (heads, N, N).
        num_prefix: prefix tokens before the patches (1, or 2 for distilled DeiT).
        layer: which layer (negative counts from the end).
        head: one head, or None for the mean of all heads.
    Returns:
        (N - num_prefix,) weights over the patches, in row-major patch order.
    """
    a = attns[layer]  # (heads, N, N)
    a = a.mean(0) if head is None else a[head]  # (N, N)
    return a[0, num_prefix:]


def all_heads(attns: list[torch.Tensor], num_prefix: int = 1, layer: int = -1) -> torch.Tensor:
    """(heads, N - num_prefix): the class token's attention to the patches, for every head of one layer."""
    return attns[layer][:, 0, num_prefix:]


def rollout(
    attns: list[torch.Tensor], num_prefix: int = 1, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): attention propagated through the layers.

    Each layer's heads are fused, the weakest `discard_ratio` of its entries are set to zero (keeping the
    class token's attention to itself), the identity is added for the residual connection and the rows are
    renormalised; the product over layers says how much each input token flows into the class token.

    Returns:
        (N - num_prefix,) weights over the patches.
    """
    N = attns[0].shape[-1]
    eye = torch.eye(N)
    result = eye
    for attn in attns:
        a = fuse_heads(attn.float(), head_fusion)  # (N, N)
        if discard_ratio > 0:
            flat = a.flatten().clone()
            k = int(flat.numel() * discard_ratio)
            if k:
                _, weakest = flat.topk(k, largest=False)
                flat[weakest[weakest != 0]] = 0
            a = flat.view(N, N)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result  # (N, N)
    return result[0, num_prefix:]


def to_grid(weights: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(num_patches,) -> (gh, gw) for an image of that size."""
    return weights.reshape(grid_shape(weights.numel(), height, width))


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB through the inferno colormap."""
    x = np.clip(heat, 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_INFERNO) - 2)
    t = (x - lo)[..., None]
    return ((1 - t) * _INFERNO[lo] + t * _INFERNO[lo + 1]).round().astype(np.uint8)


def heatmap(grid: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(gh, gw) weights -> (height, width) in [0, 1]: min-max normalised, upsampled bilinearly."""
    g = grid.float()
    g = (g - g.min()) / (g.max() - g.min()).clamp_min(1e-12)
    up = F.interpolate(g[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return up[0, 0].clamp(0, 1).numpy()


def overlay(crop: torch.Tensor, grid: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """Draws a patch-grid map over the crop the model saw.

    Args:
        crop: uint8 (C, H, W), C = 1 or 3.
        grid: (gh, gw) weights.
        alpha: opacity of the heatmap, 0 (crop only) to 1 (heatmap only).
    """
    _, H, W = crop.shape
    base = crop.expand(3, H, W).permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, 3)
    heat = colorize(heatmap(grid, H, W)).astype(np.float32)
    return Image.fromarray(((1 - alpha) * base + alpha * heat).round().astype(np.uint8))


def tile(images: list[Image.Image], columns: int | None = None, gap: int = 4) -> Image.Image:
    """Lays equally sized images out in a grid with white gaps."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w + (columns - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return sheet


def render(
    crop: torch.Tensor,
    attns: list[torch.Tensor],
    num_prefix: int = 1,
    method: str = "rollout",
    layer: int = -1,
    head: int | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = DEFAULT_DISCARD_RATIO,
    alpha: float = 0.6,
) -> Image.Image:
    """One explanation, drawn: "rollout", "attention" (class token, one layer, one head or the mean) or
    "heads" (a grid of every head of one layer)."""
    _, H, W = crop.shape
    if method == "rollout":
        return overlay(crop, to_grid(rollout(attns, num_prefix, head_fusion, discard_ratio), H, W), alpha)
    if method == "attention":
        return overlay(crop, to_grid(cls_attention(attns, num_prefix, layer, head), H, W), alpha)
    if method == "heads":
        return tile([overlay(crop, to_grid(w, H, W), alpha) for w in all_heads(attns, num_prefix, layer)])
    raise ValueError(f"method must be one of {METHODS}, not {method!r}")
