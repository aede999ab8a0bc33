"""How a ViT sees, read from its own tensors: the patch grid, the patch-embedding filters, the position
embeddings and the distances its heads attend over (Dosovitskiy et al. 2021, figure 7), and one photo's walk
through the forward pass: the tokens as colours, a picked patch's attention and feature similarity, the answer
read out after every block, and the lines of `model.py` that compute each step.

Each quantity is a pure function of the model's tensors (the crop the model saw, `patch_embed.proj.weight`,
`pos_embed`, the attention probabilities and tokens of `VisionTransformer(x, return_attn=True,
return_tokens=True)`), and each picture has a `draw_*` companion that turns it into a PIL image. Tokens are in the
model's order: the prefix tokens (class, and distillation for distilled DeiT) first, then the patches in row-major
order.
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


def color_bar(vmin: float, vmax: float, width: int, height: int = 12, label: str = "", fmt: str = ".2f") -> Image.Image:
    """A horizontal bar of the inferno colormap from vmin (left) to vmax (right), with both ends labelled."""
    ramp = colorize(np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1)))  # (height, width, 3)
    font = _font(12)
    bar = Image.new("RGB", (width, height + 18), "white")
    bar.paste(Image.fromarray(ramp), (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((0, height + 2), f"{vmin:{fmt}}", fill="black", font=font)
    draw.text((width // 2, height + 2), label, fill="black", font=font, anchor="ma")
    draw.text((width, height + 2), f"{vmax:{fmt}}", fill="black", font=font, anchor="ra")
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
    """Mean attention distance of every head in every layer: how far, in pixels, a head looks among the patches.

    For a patch query i, the distance is sum_j a_ij * |centre_i - centre_j| / sum_j a_ij over the patch keys j,
    with the distance between patch centres in pixels of the crop the model saw; it is averaged over the patch
    queries. The weights are renormalised over the patch keys: the attention a query gives to the prefix tokens
    (class, distillation), which have no place on the grid, is left out here and measured by `prefix_share`. A
    query that gives the patches no attention at all counts as distance 0.

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
        _check_fits(a, num_prefix, grid)
        a = a.detach().double().cpu()[..., num_prefix:, num_prefix:]  # (..., heads, n, n)
        mass = a.sum(-1)  # (..., heads, n): each patch query's attention on the patches
        per_query = (a * dist).sum(-1) / mass.clamp_min(1e-300)  # (..., heads, n)
        per_layer.append(per_query.mean(-1))  # (..., heads)
    return torch.stack(per_layer, dim=-2).float()  # (..., layers, heads)


def prefix_share(attns: list[torch.Tensor], num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """The share of attention that the patch queries give the prefix tokens, per head and layer.

    sum_k a_ik over the prefix keys k (class, distillation), averaged over the patch queries i: 0 for a head that
    looks only at patches, 1 for one that looks only at the class token. It is what `mean_attention_distance`
    leaves out.

    Args:
        attns, num_prefix, grid: as `mean_attention_distance`.
    Returns:
        (layers, heads) in [0, 1] (or (B, layers, heads) for a batch).
    """
    per_layer = []
    for a in attns:
        _check_fits(a, num_prefix, grid)
        a = a.detach().double().cpu()[..., num_prefix:, :num_prefix]  # (..., heads, n, prefix)
        per_layer.append(a.sum(-1).mean(-1))  # (..., heads)
    return torch.stack(per_layer, dim=-2).float()  # (..., layers, heads)


def _check_fits(a: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> None:
    if a.shape[-1] != num_prefix + grid[0] * grid[1]:
        raise ValueError(f"attention over {a.shape[-1]} tokens does not fit {num_prefix} prefix tokens and a {grid[0]}x{grid[1]} grid")


# --- the forward pass, step by step ----------------------------------------------------------------------------
# The walk of the Inside tab follows one photo through `VisionTransformer.forward(x, return_attn=True,
# return_tokens=True)`: the tokens after the embedding and after every block, and every block's attention.


def token_components(tokens: torch.Tensor, num_prefix: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch tokens projected on their first k principal components.

    The patch tokens (the prefix tokens left out) are centred (their mean over the patches subtracted) and
    decomposed by SVD. Each component's sign is chosen so that its entry of largest magnitude is positive.
    Where the tokens span fewer than k directions, the missing components are zeros.

    Args:
        tokens: (num_prefix + n, D), one image's tokens at some depth.
        num_prefix: prefix tokens before the patches.
        k: how many components.
    Returns:
        (projections (n, k), explained_variance_ratio (k,)).
    """
    X = tokens.detach().double().cpu()[num_prefix:]  # (n, D)
    X = X - X.mean(dim=0, keepdim=True)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)  # S (r,), Vh (r, D), r = min(n, D)
    var = S**2
    ratio = var / var.sum().clamp_min(1e-300)
    idx = Vh.abs().argmax(dim=1, keepdim=True)  # (r, 1)
    Vh = Vh * torch.sign(Vh.gather(1, idx))
    proj = X @ Vh[:k].T  # (n, min(k, r))
    out, share = torch.zeros(X.shape[0], k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    out[:, : proj.shape[1]], share[: proj.shape[1]] = proj, ratio[:k]
    return out.float(), share.float()


def token_colours(tokens: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens as colours: the first three principal components of the patch tokens as red, green and blue.

    Each component is scaled on its own from its lowest value over the patches (0) to its highest (1); a
    component that does not vary is 0.5. Patches whose tokens are alike get alike colours.

    Args:
        tokens: (num_prefix + gh * gw, D), one image's tokens at some depth.
        num_prefix: prefix tokens before the patches.
        grid: (gh, gw).
    Returns:
        (colours (gh, gw, 3) in [0, 1], explained_variance_ratio (3,) of the three components).
    """
    gh, gw = grid
    if tokens.shape[0] != num_prefix + gh * gw:
        raise ValueError(f"{tokens.shape[0]} tokens do not fit {num_prefix} prefix tokens and a {gh}x{gw} grid")
    proj, ratio = token_components(tokens, num_prefix, 3)  # (n, 3)
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    span = hi - lo
    flat = span <= 1e-12 * proj.abs().max().clamp_min(1e-30)  # a component the patches do not vary along
    rgb = (proj - lo) / torch.where(flat, torch.ones_like(span), span)
    rgb[:, flat] = 0.5
    return rgb.reshape(gh, gw, 3), ratio  # (gh, gw, 3)


def draw_token_colours(colours: torch.Tensor, side: int = 224) -> Image.Image:
    """Draws `token_colours` as a grid of flat cells, enlarged by a whole factor to about `side` pixels."""
    gh, gw, _ = colours.shape
    cell = max(1, round(side / max(gh, gw)))
    rgb = (colours.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # (gh, gw, 3)
    return Image.fromarray(np.ascontiguousarray(rgb)).resize((gw * cell, gh * cell), Image.NEAREST)


def cosine_similarity(tokens: torch.Tensor, index: int) -> torch.Tensor:
    """Cosine similarity of token `index` with every token (the prefix tokens too): (N,) from tokens (N, D)."""
    T = tokens.detach().double().cpu()
    T = T / T.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return (T @ T[index]).float()


def patch_view(attns: list[torch.Tensor], tokens: list[torch.Tensor], num_prefix: int, grid: tuple[int, int],
               row: int, col: int, layer: int, head: int | None = None) -> dict:
    """What one patch sees at one layer: where it attends, and how alike its features are to every other token's.

    Args:
        attns: every layer's attention (heads, N, N), as `VisionTransformer(x, return_attn=True)` gives it.
        tokens: the tokens after the embedding and after every block (depth + 1 tensors (N, D)), as
            `VisionTransformer(x, return_tokens=True)` gives them.
        num_prefix: prefix tokens before the patches.
        grid: (gh, gw).
        row, col: the patch, counted from 0.
        layer: the block, counted from 0: its attention, and the tokens it outputs.
        head: one head (from 0), or None for the mean of the heads.
    Returns:
        {"token": the patch's place in the sequence, "attention": (gh, gw) its attention row over the patches,
         "attention_prefix": (num_prefix,) its attention to the prefix tokens, "similarity": (gh, gw) the cosine
         similarity of its output token with every patch's, "similarity_prefix": (num_prefix,) with the prefix
         tokens'}. The attention row, prefix and patches together, sums to 1.
    """
    gh, gw = grid
    q = num_prefix + row * gw + col
    a = attns[layer].detach().float().cpu()  # (heads, N, N)
    a = a.mean(0) if head is None else a[head]  # (N, N)
    sim = cosine_similarity(tokens[layer + 1], q)  # (N,)
    return {
        "token": q,
        "attention": a[q, num_prefix:].reshape(gh, gw),
        "attention_prefix": a[q, :num_prefix],
        "similarity": sim[num_prefix:].reshape(gh, gw),
        "similarity_prefix": sim[:num_prefix],
    }


def readout_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The answer the model would give if it stopped after each block: its final LayerNorm and head applied to
    the tokens that the head reads (the class token; the class and distillation heads averaged for distilled
    DeiT; the mean of the patch tokens for average-pooled models): `VisionTransformer.forward_head`, which ends
    `forward` too.

    Args:
        model: the VisionTransformer the tokens came from (its `norm`, `fc_norm`, `head` and `head_dist` are used).
        tokens: (L, N, D), the tokens after L blocks (or any stack of token sets).
    Returns:
        logits (L, num_classes), in float32.
    """
    weight = model.head.weight
    with torch.no_grad():
        logits = model.forward_head(tokens.to(weight.device, weight.dtype))  # (L, num_classes)
    return logits.float().cpu()


def readout_name(cfg) -> str:
    """In words, which tokens the head reads."""
    if cfg.global_pool == "avg":
        return "the mean of the patch tokens"
    if cfg.distilled:
        return "the class token and the distillation token, each through its own head, the two answers averaged"
    return "the class token"


# --- the code that computes each step --------------------------------------------------------------------------

# Where each step of the walk is computed in vit_demo/model.py: (object, method, first line, last line), the lines
# found by what they start with. The excerpts are read from the source when asked for, so they show the code
# that runs.
STEP_CODE = {
    "patches": [("VisionTransformer", "embed", "B, _, H, W = x.shape", "x = self.patch_embed(x)")],
    "embedding": [("PatchEmbed", "forward", "x = self.proj(x)", "return x.flatten(2)")],
    "prefix": [("VisionTransformer", "embed", "prefix = [", "return x + pos")],
    "blocks": [("VisionTransformer", "forward", "for blk in self.blocks:", "tokens.append(x)"),
               ("Block", "forward", "y, attn = self.attn(", "x = x + self.mlp(")],
    "attention": [("Attention", "forward", "attn = (q * self.scale)", "attn = attn.float().softmax(")],
    "head": [("VisionTransformer", "forward_head", "x = self.norm(x)", "logits = self.head(x[:, 0])")],
}


def code_excerpt(obj: str, method: str, first: str, last: str) -> dict:
    """The lines of `obj.method` in vit_demo/model.py from the one starting with `first` to the next one
    starting with `last`, read from the source now.

    Returns:
        {"function": "Obj.method", "start": first line number in model.py, "end": last line number,
         "code": the lines, dedented}.
    Raises:
        LookupError: no such lines in that function.
    """
    import inspect
    import textwrap

    from . import model as model_module

    fn = getattr(getattr(model_module, obj), method)
    lines, start = inspect.getsourcelines(fn)
    stripped = [line.strip() for line in lines]
    try:
        i = next(k for k, s in enumerate(stripped) if s.startswith(first))
        j = next(k for k in range(i, len(lines)) if stripped[k].startswith(last))
    except StopIteration:
        raise LookupError(f"{obj}.{method} has no lines from {first!r} to {last!r}") from None
    return {"function": f"{obj}.{method}", "start": start + i, "end": start + j,
            "code": textwrap.dedent("".join(lines[i : j + 1])).rstrip()}


def step_code(step: str) -> list[dict]:
    """The excerpts of vit_demo/model.py that compute a step of the walk (see STEP_CODE)."""
    return [code_excerpt(*where) for where in STEP_CODE[step]]


# --- drawing a picked patch's view -----------------------------------------------------------------------------

PICK_COLOR = (0, 229, 255)  # the picked patch's outline: cyan, apart from every colour of the inferno map


def cell_scale(patch_size: int, min_cell: int = 40) -> int:
    """The whole factor `patch_grid` and `draw_pick` enlarge a crop by, so that each patch is min_cell pixels."""
    return max(1, math.ceil(min_cell / patch_size))


def _outline(image: Image.Image, row: int, col: int, cell: int) -> Image.Image:
    draw = ImageDraw.Draw(image)
    width = max(2, cell // 10)
    draw.rectangle([col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1], outline=PICK_COLOR, width=width)
    return image


def draw_pick(crop: torch.Tensor, patch_size: int, row: int, col: int, min_cell: int = 40) -> Image.Image:
    """The crop with its patch grid and the picked patch (row, col, from 0) outlined, enlarged as `patch_grid`."""
    C, H, W = crop.shape
    gh, gw = H // patch_size, W // patch_size
    scale = cell_scale(patch_size, min_cell)
    cell = patch_size * scale
    rgb = crop.expand(3, H, W).permute(1, 2, 0).numpy()  # (H, W, 3)
    image = Image.fromarray(np.ascontiguousarray(rgb)).resize((W * scale, H * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    for r in range(gh + 1):
        y = min(r * cell, gh * cell - 1)
        draw.line([(0, y), (gw * cell - 1, y)], fill=GRID_COLOR, width=1)
    for c in range(gw + 1):
        x = min(c * cell, gw * cell - 1)
        draw.line([(x, 0), (x, gh * cell - 1)], fill=GRID_COLOR, width=1)
    return _outline(image, row, col, cell)


def draw_patch_map(crop: torch.Tensor, values: torch.Tensor, patch_size: int, row: int, col: int, label: str,
                   alpha: float = 0.7, min_cell: int = 40) -> Image.Image:
    """A (gh, gw) map over the crop, one flat cell per patch, coloured from its lowest value (dark) to its highest
    (bright), the picked patch outlined, and a colour bar under it that names both ends.

    Args:
        crop: uint8 (C, H, W).
        values: (gh, gw).
        patch_size: side of each patch in crop pixels.
        row, col: the picked patch, from 0.
        label: what the colour bar measures.
        alpha: opacity of the colours over the crop.
    """
    C, H, W = crop.shape
    gh, gw = values.shape
    scale = cell_scale(patch_size, min_cell)
    cell = patch_size * scale
    v = values.detach().double().cpu()
    lo, hi = float(v.min()), float(v.max())
    heat = colorize(((v - lo) / max(hi - lo, 1e-12)).numpy()).astype(np.float32)  # (gh, gw, 3)
    heat = heat.repeat(cell, axis=0).repeat(cell, axis=1)  # (gh * cell, gw * cell, 3)
    base = crop.expand(3, H, W).permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, 3)
    base = base.repeat(scale, axis=0).repeat(scale, axis=1)[: gh * cell, : gw * cell]  # (gh * cell, gw * cell, 3)
    image = _outline(Image.fromarray(((1 - alpha) * base + alpha * heat).round().astype(np.uint8)), row, col, cell)
    bar = color_bar(lo, hi, image.width, label=label, fmt=".3g")
    out = Image.new("RGB", (image.width, image.height + 6 + bar.height), "white")
    out.paste(image, (0, 0))
    out.paste(bar, (0, image.height + 6))
    return out
