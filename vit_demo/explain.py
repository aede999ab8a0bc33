"""Where the transformer looked, and why it chose a class: attention maps, rollout, relevance, overlays.

Every function is pure. It takes the per-layer attention probabilities that `VisionTransformer(x,
return_attn=True)` returns for one image, each (heads, N, N) with N = num_prefix + gh * gw, and for the
class-specific methods the gradients of the target class's logit with respect to them (same shapes), and
gives maps over the patch grid (gh, gw). Prefix tokens (the class token, DeiT's distillation token) are
read from but never drawn.

Methods:
    "attention"         the class token's attention to the patches in one layer (one head or their mean).
    "heads"             the same for every head of one layer: (heads, gh, gw).
    "rollout"           attention rollout (Abnar & Zuidema 2020): attention propagated through the layers.
    "relevance"         gradient-weighted relevance (Chefer, Gur & Wolf 2021, ICCV): specific to a class.
    "gradient_rollout"  rollout of gradient-weighted attention, as in jacobgil/vit-explain, with its bugs
                        fixed (each gradient paired with its own layer; rows renormalised): specific to a class.
The first three do not depend on the class; the last two do.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

METHODS = ("rollout", "attention", "heads", "relevance", "gradient_rollout")
CLASS_SPECIFIC = ("relevance", "gradient_rollout")
HEAD_FUSIONS = ("mean", "max", "min")
DEFAULT_DISCARD_RATIO = 0.9  # for drawing: dropping the weakest 90% of attention gives crisper rollout maps

# One sentence per method, for the page and the command line.
DESCRIPTIONS = {
    "rollout": "Attention rollout: how much each patch flows into the class token through all layers "
    "(the same for every class).",
    "attention": "How strongly the class token attends to each patch in one layer (the same for every class).",
    "heads": "The class token's attention in one layer, one panel per head (the same for every class).",
    "relevance": "Which patches raise the chosen class's score, from attention weighted by its gradients "
    "(Chefer et al. 2021).",
    "gradient_rollout": "Rollout of attention weighted by the chosen class's gradients (as in vit-explain, "
    "with its layer pairing and row normalisation fixed).",
}

# The options each method reads; the others are ignored, so one set of controls serves every method.
OPTIONS = {
    "rollout": ("head_fusion", "discard_ratio"),
    "attention": ("layer", "head"),
    "heads": ("layer",),
    "relevance": (),
    "gradient_rollout": ("discard_ratio",),
}

# The "inferno" colormap at five stops (dark purple -> yellow), interpolated linearly.
_INFERNO = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


# --- the patch grid -------------------------------------------------------------------------------------------


def grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The (gh, gw) patch grid the model cuts a height x width input into: (H // p, W // p).

    Pixels past the last whole patch (when p does not divide a side) are not seen by the model.
    """
    return height // patch_size, width // patch_size


def infer_grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """The grid of `num_patches` patches on a height x width crop (or an integer enlargement of it), when the
    patch size is not at hand.

    Both H // p and W // p shrink as p grows, so every p that gives num_patches patches gives the same grid:
    this is the model's own grid, not a guess from the aspect ratio.

    Raises:
        ValueError: no patch size cuts that crop into num_patches patches.
    """
    for p in range(1, max(height, width) + 1):
        gh, gw = height // p, width // p
        if gh * gw == num_patches:
            return gh, gw
        if gh * gw < num_patches:
            break
    raise ValueError(f"{num_patches} patches do not tile a {height}x{width} crop: pass the model's grid.")


def to_grid(weights: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(..., gh * gw) -> (..., gh, gw), row-major."""
    gh, gw = grid
    assert weights.shape[-1] == gh * gw, f"{weights.shape[-1]} weights do not fill a {gh}x{gw} grid"
    return weights.reshape(*weights.shape[:-1], gh, gw)


def readout_rows(num_tokens: int, num_prefix: int = 1, global_pool: str = "token") -> list[int]:
    """The tokens whose final state the classifier reads; relevance and gradient rollout read their rows.

    - A class-token model reads token 0: its row.
    - A distilled DeiT (num_prefix 2) averages the logits of a head on the class token and a head on the
      distillation token: the map is the mean of rows 0 and 1, each token weighted as the logits weigh it.
    - An average-pooled model reads the mean of the patch tokens: the map is the mean of the patch rows.
    """
    if global_pool == "avg":
        return list(range(num_prefix, num_tokens))
    return [0, 1] if num_prefix == 2 else [0]


# --- class-agnostic maps ----------------------------------------------------------------------------------------


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
        layer: which layer, counted from 0 (negative counts from the end).
        head: one head, counted from 0, or None for the mean of all heads.
    Returns:
        (N - num_prefix,) weights over the patches, in row-major patch order.
    """
    a = attns[layer]  # (heads, N, N)
    a = a.mean(0) if head is None else a[head]  # (N, N)
    return a[0, num_prefix:]


def all_heads(attns: list[torch.Tensor], num_prefix: int = 1, layer: int = -1) -> torch.Tensor:
    """(heads, N - num_prefix): the class token's attention to the patches, for every head of one layer."""
    return attns[layer][:, 0, num_prefix:]


def _discard_weakest(a: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """(N, N) with its weakest `discard_ratio` of entries set to zero, except the class token's own [0, 0]."""
    if discard_ratio <= 0:
        return a
    N = a.shape[-1]
    flat = a.flatten().clone()
    k = int(flat.numel() * discard_ratio)
    if k:
        _, weakest = flat.topk(k, largest=False)
        flat[weakest[weakest != 0]] = 0
    return flat.view(N, N)


def _roll(layers: list[torch.Tensor]) -> torch.Tensor:
    """Product over layers of (A + I) with rows renormalised: (N, N), how much each token flows into each."""
    N = layers[0].shape[-1]
    eye = torch.eye(N)
    result = eye
    for a in layers:
        a = a + eye  # the residual connection
        a = a / a.sum(dim=-1, keepdim=True)  # rows renormalised
        result = a @ result  # (N, N)
    return result


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
    fused = [_discard_weakest(fuse_heads(a.float(), head_fusion), discard_ratio) for a in attns]
    return _roll(fused)[0, num_prefix:]


# --- class-specific maps ----------------------------------------------------------------------------------------


def _check_pairs(attns: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    assert len(attns) == len(grads), f"{len(attns)} attention maps but {len(grads)} gradients: one per layer"
    for i, (a, g) in enumerate(zip(attns, grads)):
        assert a.shape == g.shape, f"layer {i}: attention {tuple(a.shape)} and its gradient {tuple(g.shape)} differ"


def relevance(
    attns: list[torch.Tensor], grads: list[torch.Tensor], num_prefix: int = 1, rows: list[int] | tuple[int, ...] = (0,)
) -> torch.Tensor:
    """Gradient-weighted relevance (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability"): why the
    model gave the target class its score.

    R starts as the identity (N x N, prefix tokens included). For every block, in forward order,
    Ā = mean over heads of clamp(dy/dA ⊙ A, min=0), and R <- R + Ā R. The map is the read-out token's row
    of R over the patches.

    Args:
        attns: per-layer attention probabilities after softmax, each (heads, N, N), as the blocks used them.
        grads: per-layer gradients of the target class's logit (before softmax) with respect to them, same
            shapes and order: grads[i] belongs to attns[i].
        num_prefix: prefix tokens before the patches.
        rows: the read-out tokens, whose rows are averaged (see `readout_rows`).
    Returns:
        (N - num_prefix,) relevance of each patch.
    """
    _check_pairs(attns, grads)
    N = attns[0].shape[-1]
    R = torch.eye(N)
    for a, g in zip(attns, grads):
        cam = (g.float() * a.float()).clamp(min=0).mean(0)  # (N, N)
        R = R + cam @ R
    return R[list(rows)].mean(0)[num_prefix:]


def gradient_rollout(
    attns: list[torch.Tensor],
    grads: list[torch.Tensor],
    num_prefix: int = 1,
    discard_ratio: float = DEFAULT_DISCARD_RATIO,
    rows: list[int] | tuple[int, ...] = (0,),
) -> torch.Tensor:
    """Gradient-weighted attention rollout, as in jacobgil/vit-explain's `grad_rollout`, corrected.

    Per layer: the mean over heads of dy/dA ⊙ A, negatives set to zero, the weakest `discard_ratio` of the
    entries set to zero (keeping the class token's own), then rollout: A + I, rows renormalised, multiplied
    through the layers. Unlike vit-explain, each gradient is paired with its own layer (its backward hooks
    collect them last layer first, #6), every row is renormalised by its own sum (it divided by a broadcast
    of the row sums along the wrong axis, #16), and the attention comes from the explicit softmax path, so
    fused attention cannot leave the maps empty (#23).

    Args:
        attns, grads: as for `relevance`.
        num_prefix: prefix tokens before the patches.
        discard_ratio: the share of weakest entries dropped per layer, in [0, 1).
        rows: the read-out tokens, whose rows are averaged (see `readout_rows`).
    Returns:
        (N - num_prefix,) weights over the patches.
    """
    _check_pairs(attns, grads)
    weighted = [_discard_weakest((g.float() * a.float()).mean(0).clamp(min=0), discard_ratio) for a, g in zip(attns, grads)]
    return _roll(weighted)[list(rows)].mean(0)[num_prefix:]


def patch_map(
    method: str,
    attns: list[torch.Tensor],
    grads: list[torch.Tensor] | None = None,
    num_prefix: int = 1,
    grid: tuple[int, int] | None = None,
    rows: list[int] | tuple[int, ...] = (0,),
    layer: int = -1,
    head: int | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = DEFAULT_DISCARD_RATIO,
) -> torch.Tensor:
    """One method's raw map over the patch grid, before colouring.

    Args:
        method: one of METHODS.
        attns: per-layer attention, each (heads, N, N).
        grads: the target logit's gradients with respect to attns (needed by CLASS_SPECIFIC methods).
        num_prefix: prefix tokens before the patches.
        grid: (gh, gw); by default a square grid.
        rows: read-out tokens for the class-specific methods (see `readout_rows`).
        layer, head: for "attention" and "heads" (counted from 0).
        head_fusion, discard_ratio: for "rollout"; discard_ratio for "gradient_rollout" too.
    Returns:
        (gh, gw), or (heads, gh, gw) for "heads".
    """
    if grid is None:
        side = math.isqrt(attns[0].shape[-1] - num_prefix)
        grid = (side, side)
    if method in CLASS_SPECIFIC and grads is None:
        raise ValueError(f"{method} needs the gradients of the target class: compute them with Classifier.heatmap.")
    if method == "rollout":
        weights = rollout(attns, num_prefix, head_fusion, discard_ratio)
    elif method == "attention":
        weights = cls_attention(attns, num_prefix, layer, head)
    elif method == "heads":
        weights = all_heads(attns, num_prefix, layer)
    elif method == "relevance":
        weights = relevance(attns, grads, num_prefix, rows)
    elif method == "gradient_rollout":
        weights = gradient_rollout(attns, grads, num_prefix, discard_ratio, rows)
    else:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    return to_grid(weights.float(), grid)


# --- drawing --------------------------------------------------------------------------------------------------


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB through the inferno colormap."""
    x = np.clip(heat, 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_INFERNO) - 2)
    t = (x - lo)[..., None]
    return ((1 - t) * _INFERNO[lo] + t * _INFERNO[lo + 1]).round().astype(np.uint8)


def heatmap(grid: torch.Tensor, height: int, width: int, scale: tuple[float, float] | None = None) -> np.ndarray:
    """(gh, gw) weights -> (height, width) in [0, 1]: min-max normalised (or from scale's low to its high),
    upsampled bilinearly."""
    g = grid.float()
    low, high = (g.min(), g.max()) if scale is None else (torch.tensor(float(scale[0])), torch.tensor(float(scale[1])))
    g = ((g - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    up = F.interpolate(g[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return up[0, 0].clamp(0, 1).numpy()


def overlay(crop: torch.Tensor, grid: torch.Tensor, alpha: float = 0.6, scale: tuple[float, float] | None = None) -> Image.Image:
    """Draws a patch-grid map over the crop the model saw.

    Args:
        crop: uint8 (C, H, W), C = 1 or 3.
        grid: (gh, gw) weights.
        alpha: opacity of the heatmap, 0 (crop only) to 1 (heatmap only).
        scale: (low, high), the values drawn darkest and brightest; by default the map's own lowest and highest.
    """
    _, H, W = crop.shape
    base = crop.expand(3, H, W).permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, 3)
    heat = colorize(heatmap(grid, H, W, scale)).astype(np.float32)
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


def draw(crop: torch.Tensor, grid_map: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """A map from `patch_map` over the crop: one overlay for (gh, gw), a sheet of panels for (heads, gh, gw) on one
    colour scale shared by all heads (as on the page), so that a nearly flat head looks flat."""
    if grid_map.ndim == 3:
        scale = (float(grid_map.min()), float(grid_map.max()))
        return tile([overlay(crop, m, alpha, scale) for m in grid_map])
    return overlay(crop, grid_map, alpha)


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
    grads: list[torch.Tensor] | None = None,
    grid: tuple[int, int] | None = None,
    rows: list[int] | tuple[int, ...] = (0,),
) -> Image.Image:
    """One explanation, drawn over the crop (see `patch_map` for the methods and their options).

    `grid` is the model's patch grid; by default it is the one the crop's size and the patch count imply
    (`infer_grid`), which also holds for a crop enlarged by a whole factor.
    """
    if grid is None:
        _, H, W = crop.shape
        grid = infer_grid(attns[0].shape[-1] - num_prefix, H, W)
    m = patch_map(method, attns, grads, num_prefix, grid, rows, layer, head, head_fusion, discard_ratio)
    return draw(crop, m, alpha)
