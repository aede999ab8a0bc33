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
    "balanced_relevance" relevance from balanced gradients (Mehri et al. 2025, "LibraGrad").
    "libra_fullgrad"    FullGrad+ under balanced gradients: input x gradient of the embedded tokens plus gradient x
                        value of every bias, per token. With the class-token part and the head's bias it adds up to
                        the logit.
    "input_x_gradient"  the pixels times their balanced gradient, summed per patch.
The first three do not depend on the class; the others do. Each method is one entry of METHOD_TABLE, which says
what it is made from (attention only, or plain or balanced gradients), the options it reads, and its sentence.

The read-out rows: attention, rollout and relevance read the rows of the tokens whose final state the head reads
(`VisionTransformer.readout_tokens`: the class token, the class and distillation tokens of distilled DeiT, the
patch tokens of an average-pooled model), averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HEAD_FUSIONS = ("mean", "max", "min")
DEFAULT_DISCARD_RATIO = 0.9  # for drawing: dropping the weakest 90% of attention gives crisper rollout maps

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


@dataclass
class Evidence:
    """What the maps of one image are made from.

    attns: per-layer attention probabilities, each (heads, N, N), N = num_prefix + patches.
    num_prefix: prefix tokens before the patches.
    rows: the read-out tokens (`VisionTransformer.readout_tokens`), whose rows the maps average.
    grads: the target logit's gradients with respect to attns (same shapes), plain or balanced as the method needs.
    tokens: (N,) the balanced input x gradient of the embedded tokens plus each token's bias x gradient.
    pixels: (patches,) the pixels times their balanced gradient, summed per patch.
    """

    attns: list
    num_prefix: int = 1
    rows: tuple = (0,)
    grads: list | None = None
    tokens: torch.Tensor | None = None
    pixels: torch.Tensor | None = None


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


def cls_attention(attns: list[torch.Tensor], num_prefix: int = 1, layer: int = -1, head: int | None = None,
                  rows: list[int] | tuple[int, ...] = (0,)) -> torch.Tensor:
    """How much the read-out tokens (the class token, by default) attend to each patch in one layer.

    Args:
        attns: per-layer attention, each (heads, N, N).
        num_prefix: prefix tokens before the patches (1, or 2 for distilled DeiT).
        layer: which layer, counted from 0 (negative counts from the end).
        head: one head, counted from 0, or None for the mean of all heads.
        rows: the read-out tokens, whose rows are averaged.
    Returns:
        (N - num_prefix,) weights over the patches, in row-major patch order.
    """
    a = attns[layer]  # (heads, N, N)
    a = a.mean(0) if head is None else a[head]  # (N, N)
    return a[list(rows)].mean(0)[num_prefix:]


def all_heads(attns: list[torch.Tensor], num_prefix: int = 1, layer: int = -1, rows: list[int] | tuple[int, ...] = (0,)) -> torch.Tensor:
    """(heads, N - num_prefix): the read-out tokens' attention to the patches, for every head of one layer."""
    return attns[layer][:, list(rows)].mean(1)[:, num_prefix:]


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
    attns: list[torch.Tensor], num_prefix: int = 1, head_fusion: str = "mean", discard_ratio: float = 0.0,
    rows: list[int] | tuple[int, ...] = (0,),
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): attention propagated through the layers.

    Each layer's heads are fused, the weakest `discard_ratio` of its entries are set to zero (keeping the
    class token's attention to itself), the identity is added for the residual connection and the rows are
    renormalised; the product over layers says how much each input token flows into the read-out tokens (the
    class token by default; `rows` averages several).

    Returns:
        (N - num_prefix,) weights over the patches.
    """
    fused = [_discard_weakest(fuse_heads(a.float(), head_fusion), discard_ratio) for a in attns]
    return _roll(fused)[list(rows)].mean(0)[num_prefix:]


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
        rows: the read-out tokens, whose rows are averaged (see `VisionTransformer.readout_tokens`).
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
        rows: the read-out tokens, whose rows are averaged (see `VisionTransformer.readout_tokens`).
    Returns:
        (N - num_prefix,) weights over the patches.
    """
    _check_pairs(attns, grads)
    weighted = [_discard_weakest((g.float() * a.float()).mean(0).clamp(min=0), discard_ratio) for a, g in zip(attns, grads)]
    return _roll(weighted)[list(rows)].mean(0)[num_prefix:]


def libra_fullgrad(tokens: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """FullGrad+ under balanced gradients, per patch: the embedded patch token's input x gradient plus the
    gradient x value of every bias added at that token, in every block (see `vit_demo.attribution`).

    Args:
        tokens: (N,) each token's share of the target logit, prefix tokens first.
    Returns:
        (N - num_prefix,) the patches' shares. The prefix tokens' shares and the head's bias make up the rest of
        the logit (`completeness`).
    """
    return tokens[num_prefix:].float()


# --- the methods, one entry each --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One explanation method: what it is made from, the options it reads, how it is named and drawn."""

    label: str  # its name on the page
    note: str  # one sentence, for the page and the command line
    make: Callable[..., torch.Tensor]  # (Evidence, **options) -> (patches,) or (heads, patches)
    options: tuple[str, ...] = ()  # the options it reads; the others are ignored
    gradients: str | None = None  # None (attention only), "plain" or "balanced": the backward pass it needs
    panels: bool = False  # draws one map per head (scored one head at a time, with "attention")
    complete: bool = False  # its parts add up to the logit: the page shows the share it accounts for


METHOD_TABLE: dict[str, Method] = {
    "rollout": Method(
        "Attention rollout",
        "Attention rollout: how much each patch flows into the class token through all layers (the same for every class).",
        lambda ev, head_fusion="mean", discard_ratio=DEFAULT_DISCARD_RATIO: rollout(ev.attns, ev.num_prefix, head_fusion, discard_ratio, ev.rows),
        ("head_fusion", "discard_ratio"),
    ),
    "attention": Method(
        "Class-token attention (one layer)",
        "How strongly the class token attends to each patch in one layer (the same for every class).",
        lambda ev, layer=-1, head=None: cls_attention(ev.attns, ev.num_prefix, layer, head, ev.rows),
        ("layer", "head"),
    ),
    "heads": Method(
        "All heads of one layer",
        "The class token's attention in one layer, one panel per head (the same for every class).",
        lambda ev, layer=-1: all_heads(ev.attns, ev.num_prefix, layer, ev.rows),
        ("layer",), panels=True,
    ),
    "relevance": Method(
        "Relevance (Chefer et al. 2021): why this class",
        "Which patches raise the chosen class's score, from attention weighted by its gradients (Chefer et al. 2021).",
        lambda ev: relevance(ev.attns, ev.grads, ev.num_prefix, ev.rows),
        gradients="plain",
    ),
    "balanced_relevance": Method(
        "Relevance, balanced gradients (LibraGrad)",
        "Relevance (Chefer et al. 2021) from balanced gradients, which pass LayerNorm, softmax and GELU as "
        "constants and so follow the values the model adds up (Mehri et al. 2025).",
        lambda ev: relevance(ev.attns, ev.grads, ev.num_prefix, ev.rows),
        gradients="balanced",
    ),
    "libra_fullgrad": Method(
        "Libra FullGrad+: shares of the logit",
        "Each patch's share of the chosen class's score: input times balanced gradient plus every bias's part "
        "(Mehri et al. 2025); with the class token's share and the head's bias it adds up to the score.",
        lambda ev: libra_fullgrad(ev.tokens, ev.num_prefix),
        gradients="balanced", complete=True,
    ),
    "input_x_gradient": Method(
        "Input × balanced gradient",
        "The pixels times the chosen class's balanced gradient, summed per patch: the simplest map of the family.",
        lambda ev: ev.pixels.float(),
        gradients="balanced",
    ),
    "gradient_rollout": Method(
        "Gradient-weighted rollout",
        "Rollout of attention weighted by the chosen class's gradients (as in vit-explain, with its layer pairing "
        "and row normalisation fixed).",
        lambda ev, discard_ratio=DEFAULT_DISCARD_RATIO: gradient_rollout(ev.attns, ev.grads, ev.num_prefix, discard_ratio, ev.rows),
        ("discard_ratio",), gradients="plain",
    ),
}

# Views of the table, for callers that need one aspect.
METHODS = tuple(METHOD_TABLE)
CLASS_SPECIFIC = tuple(name for name, m in METHOD_TABLE.items() if m.gradients)
DESCRIPTIONS = {name: m.note for name, m in METHOD_TABLE.items()}
OPTIONS = {name: m.options for name, m in METHOD_TABLE.items()}


def method(name: str) -> Method:
    """The table entry of `name`.

    Raises:
        ValueError: not a method; the message lists them.
    """
    if name not in METHOD_TABLE:
        raise ValueError(f"'{name}' is not a method: use one of {', '.join(METHODS)}.")
    return METHOD_TABLE[name]


def patch_map(name: str, evidence: Evidence, grid: tuple[int, int] | None = None, **options) -> torch.Tensor:
    """One method's raw map over the patch grid, before colouring.

    Args:
        name: one of METHODS.
        evidence: what the map is made from; a method with gradients needs them in it.
        grid: (gh, gw); by default a square grid.
        options: the options the method reads (METHOD_TABLE[name].options); layer and head count from 0.
    Returns:
        (gh, gw), or (heads, gh, gw) for a method with panels.
    """
    m = method(name)
    if m.gradients and evidence.grads is None and evidence.tokens is None:
        raise ValueError(f"{name} needs the gradients of the target class: compute them with Classifier.heatmap.")
    if grid is None:
        side = math.isqrt(evidence.attns[0].shape[-1] - evidence.num_prefix)
        grid = (side, side)
    weights = m.make(evidence, **{k: v for k, v in options.items() if k in m.options})
    return to_grid(weights.float(), grid)


def completeness(tokens: torch.Tensor, rest: float, logit: float, num_prefix: int = 1) -> dict:
    """How a complete map's parts add up: {"logit", "patches", "prefix", "bias", "share"}.

    `patches` is the map's sum, `prefix` the prefix tokens' part, `bias` what the head adds on no token; `share` is
    patches / logit, the share of the target logit the drawn map accounts for.
    """
    patches, prefix = float(tokens[num_prefix:].sum()), float(tokens[:num_prefix].sum())
    return {"logit": float(logit), "patches": patches, "prefix": prefix, "bias": float(rest),
            "share": patches / logit if logit else float("nan")}


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
    """One explanation from attention (and plain gradients), drawn over the crop (see `patch_map` for the methods
    and their options).

    `grid` is the model's patch grid; by default it is the one the crop's size and the patch count imply
    (`infer_grid`), which also holds for a crop enlarged by a whole factor.
    """
    if grid is None:
        _, H, W = crop.shape
        grid = infer_grid(attns[0].shape[-1] - num_prefix, H, W)
    evidence = Evidence(attns, num_prefix, tuple(rows), grads)
    m = patch_map(method, evidence, grid, layer=layer, head=head, head_fusion=head_fusion, discard_ratio=discard_ratio)
    return draw(crop, m, alpha)
