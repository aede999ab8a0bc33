"""How far a map can be trusted: deletion and insertion (Petsiuk, Das & Saenko 2018, "RISE"), per patch.

Patches are taken in the map's order, most relevant first. Deletion sets them to 0 in normalised space (the
dataset's mean colour) and watches the target's softmax probability fall: a faithful map makes it fall at
once, so a low deletion AUC is good. Insertion starts from a Gaussian-blurred copy of the crop and puts the
patches back: a faithful map makes the probability rise at once, so a high insertion AUC is good. The
baseline is the mean of RANDOM_ORDERS seeded random patch orders (one order alone is one draw, not the
baseline); a map's tied values are ordered by a seeded shuffle of their own, independent of those orders.

SaCo (Wu et al. 2024, "On the Faithfulness of Vision Transformer Explanations") asks a question the AUCs can
miss: do the map's values say how much each part matters? The patches are cut, in the map's order, into
SACO_GROUPS groups of (nearly) equal size; each group alone is deleted, and the fall of the target's probability
is that group's effect. Over every pair of groups i < j, a weight s(G_i) - s(G_j) (the difference of the
groups' summed map values) is added when the effects agree with the map (G_i's effect >= G_j's) and subtracted
when they do not; SaCo is that sum over the sum of the weights' sizes, in [-1, 1], 1 being a map whose every
larger value has the larger effect. A random map scores about 0.

Steps: one patch per step for grids of up to 49 patches (the bundled 7x7 model). Larger grids go in
`default_steps` equal steps, chosen so that a first score, random baseline included, stays within
FORWARD_BUDGET forward passes: the full crop, the all-deleted crop and the blurred crop are shared by every
order and both curves, and each order adds (steps - 1) inner points per curve, so with the map and 3 random
orders 3 + 8 (steps - 1) <= 75 gives 10 steps (75 passes) for ViT-B/16's 196 patches, and 18 passes for each
further method on that photo once its baseline is kept; SaCo adds SACO_GROUPS passes per map.

The AUC is the trapezoid rule over the fraction of patches changed, [0, 1], both ends included. Deletion and
SaCo set patches to 0; insertion's blurred start covers the whole crop, so pixels past the last whole patch
(when the patch size does not divide the crop) stay blurred until the full crop's end point, where every pixel
is the photo's own. The model does not see those pixels either way.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torchvision.transforms.v2 import functional as TF

FORWARD_BUDGET = 75  # forward passes for a first score on a large grid, random baseline included
ONE_PATCH_PER_STEP_UP_TO = 49  # grids up to this many patches go one patch per step
RANDOM_ORDERS = 3  # the random baseline is the mean of this many seeded orders
RANDOM_SEED = 0  # the first of them: seeds RANDOM_SEED ... RANDOM_SEED + RANDOM_ORDERS - 1, the same every call
TIE_SEED = 104729  # the shuffle that orders a map's ties: none of the baseline's seeds
SACO_GROUPS = 10  # SaCo's K: groups of patches, most salient first


def default_steps(num_patches: int) -> int:
    """Steps per curve: one per patch up to 49 patches, else the most that keep 3 + 2 (steps - 1) (1 + RANDOM_ORDERS)
    within FORWARD_BUDGET (the map's curves and the baseline's)."""
    if num_patches <= ONE_PATCH_PER_STEP_UP_TO:
        return num_patches
    return min(num_patches, (FORWARD_BUDGET - 3) // (2 * (1 + RANDOM_ORDERS)) + 1)


def patch_counts(num_patches: int, steps: int) -> list[int]:
    """How many patches are changed at each of steps + 1 points: 0, about n / steps, ..., n (equal steps)."""
    if not 1 <= steps <= num_patches:
        raise ValueError(f"steps must be between 1 and the {num_patches} patches, not {steps}.")
    return [round(i * num_patches / steps) for i in range(steps + 1)]


def ranking(saliency: torch.Tensor, seed: int = TIE_SEED) -> torch.Tensor:
    """Patch indices (row-major), most relevant first. Equal values (a flat map, entries discarded to zero)
    come in a seeded random order, not top-left first, which would favour whatever sits there, and not in a
    random baseline's order, which would make the map's score that order's."""
    flat = saliency.flatten().double()
    shuffle = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
    return shuffle[torch.argsort(-flat[shuffle], stable=True)]


def random_order(num_patches: int, seed: int = RANDOM_SEED) -> torch.Tensor:
    """A random patch order: one draw of the baseline a map must beat."""
    return torch.randperm(num_patches, generator=torch.Generator().manual_seed(seed))


def random_orders(num_patches: int, count: int = RANDOM_ORDERS, seed: int = RANDOM_SEED) -> dict[str, torch.Tensor]:
    """The baseline's seeded orders (seeds `seed` ... `seed + count - 1`), {"random 0": ..., ...}."""
    return {f"random {i}": random_order(num_patches, seed + i) for i in range(count)}


def mean_scores(scores: list[dict]) -> dict:
    """The mean of several orders' `deletion_insertion` results (their curves point by point), with the spread of
    their AUCs: {"deletion_auc", "insertion_auc", "curves", "orders", "deletion_auc_sd", "insertion_auc_sd"}."""
    out = {"curves": {"x": scores[0]["curves"]["x"]}, "orders": len(scores)}
    for curve in ("deletion", "insertion"):
        aucs = torch.tensor([s[f"{curve}_auc"] for s in scores], dtype=torch.float64)
        out[f"{curve}_auc"] = float(aucs.mean())
        out[f"{curve}_auc_sd"] = float(aucs.std()) if len(scores) > 1 else 0.0
        out["curves"][curve] = torch.tensor([s["curves"][curve] for s in scores], dtype=torch.float64).mean(0).tolist()
    return out


def saco(group_saliency: list[float], group_effect: list[float]) -> float:
    """SaCo (Wu et al. 2024) from the groups' summed map values s(G_i), most salient first, and their effects
    (the fall of the target's probability when the group alone is deleted).

    Raises:
        ValueError: every group has the same summed value, so the map ranks nothing (the weights sum to 0).
    """
    total, weights = 0.0, 0.0
    k = len(group_saliency)
    for i in range(k - 1):
        for j in range(i + 1, k):
            w = group_saliency[i] - group_saliency[j]
            w = w if group_effect[i] >= group_effect[j] else -w
            total += w
            weights += abs(w)
    if weights == 0:
        raise ValueError("SaCo is undefined for a map whose groups all weigh the same.")
    return total / weights


def saco_score(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    saliency: torch.Tensor,
    target: int,
    grid: tuple[int, int],
    patch_size: int,
    full: float,
    groups: int = SACO_GROUPS,
    batch_size: int = 32,
) -> tuple[float | None, int]:
    """SaCo of one map on one image: (its value, or None for a map that ranks nothing; forward passes made).

    Args:
        predict, x, target, grid, patch_size, batch_size: as for `deletion_insertion`.
        saliency: the map (gh, gw) or (gh * gw,).
        full: the target's probability on the whole crop.
        groups: K, at most the number of patches.
    """
    n = grid[0] * grid[1]
    groups = min(groups, n)
    flat = saliency.flatten().double()
    order = ranking(flat)
    counts = patch_counts(n, groups)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    sums, inputs = [], []
    H, W = x.shape[-2:]
    for lo, hi in zip(counts, counts[1:]):
        members = (rank >= lo) & (rank < hi)  # (n,) this group's patches
        sums.append(float(flat[members].sum()))
        m = members.view(1, 1, *grid).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
        m = torch.nn.functional.pad(m, (0, W - grid[1] * patch_size, 0, H - grid[0] * patch_size))  # (1, 1, H, W)
        inputs.append(torch.where(m, torch.zeros_like(x), x))
    batch = torch.cat(inputs)  # (groups, C, H, W)
    probs = torch.cat([predict(batch[i : i + batch_size]).float().softmax(-1)[:, target].cpu() for i in range(0, len(batch), batch_size)])
    effects = (full - probs).tolist()
    try:
        return saco(sums, effects), len(batch)
    except ValueError:
        return None, len(batch)


def blurred(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Insertion's start: x (B, C, H, W) blurred with a Gaussian whose sigma is one patch, so that no patch keeps
    its detail (blurring commutes with the per-channel normalisation, so normalised inputs may be blurred).

    On the bundled model a sigma of half a patch left the top class 48% of its probability on average, one patch
    24% (300 Fashion-MNIST test images; 84% on the full crops)."""
    sigma = float(patch_size)
    k = 2 * math.ceil(3 * sigma) + 1
    k = min(k, 2 * min(x.shape[-2:]) - 1)  # reflect padding must stay inside the image
    k = k if k % 2 else k - 1
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def masks(order: torch.Tensor, counts: list[int], grid: tuple[int, int], patch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """(len(counts), 1, H, W) booleans: True on the first counts[i] patches of `order`."""
    gh, gw = grid
    rank = torch.empty(gh * gw, dtype=torch.long)
    rank[order] = torch.arange(gh * gw)
    m = rank[None, :] < torch.tensor(counts)[:, None]  # (points, gh * gw)
    m = m.view(-1, 1, gh, gw).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)  # (points, 1, gh * p, gw * p)
    H, W = size
    return torch.nn.functional.pad(m, (0, W - gw * patch_size, 0, H - gh * patch_size))  # (points, 1, H, W)


def auc(fractions: list[float], scores: list[float]) -> float:
    """Area under a curve by the trapezoid rule."""
    return float(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(fractions, fractions[1:], scores, scores[1:])))


def deletion_insertion(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    orders: dict[str, torch.Tensor],
    target: int,
    grid: tuple[int, int],
    patch_size: int,
    steps: int | None = None,
    ends: dict[str, float] | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, dict], dict[str, float], int]:
    """Deletion and insertion curves of one image for several patch orders, their forward passes batched.

    Args:
        predict: normalised inputs (B, C, H, W) -> logits (B, num_classes).
        x: the normalised input (1, C, H, W).
        orders: name -> patch indices (row-major), most relevant first, e.g. {"map": ..., "random": ...}.
        target: the class whose softmax probability is the score.
        grid: the model's (gh, gw).
        patch_size: the model's patch side in pixels.
        steps: points per curve minus one; by default `default_steps`.
        ends: the probabilities of the three inputs every order shares ("full", "deleted", "blurred"), if known.
        batch_size: inputs per forward pass.
        progress: called as progress(done, total) after every batch, in forward passes.
    Returns:
        ({name: {"deletion_auc", "insertion_auc", "curves": {"x", "deletion", "insertion"}}}, ends, the number of
        forward passes made (images through the model)).
    """
    n = grid[0] * grid[1]
    steps = default_steps(n) if steps is None else steps
    counts = patch_counts(n, steps)
    H, W = x.shape[-2:]
    start = blurred(x, patch_size)
    zeros = torch.zeros_like(x)
    inputs = [] if ends is not None else [x, zeros, start]  # (1, C, H, W) each
    for order in orders.values():
        m = masks(order, counts[1:-1], grid, patch_size, (H, W))  # the inner points
        inputs.append(torch.where(m, zeros, x))  # deletion: the first k patches set to 0
        inputs.append(torch.where(m, x, start))  # insertion: the first k patches put back
    batch = torch.cat(inputs) if inputs else x[:0]  # (passes, C, H, W)
    probs = []
    for i in range(0, len(batch), batch_size):
        probs.append(predict(batch[i : i + batch_size]).float().softmax(-1)[:, target].cpu())
        if progress is not None:
            progress(min(i + batch_size, len(batch)), len(batch))
    probs = torch.cat(probs).tolist() if probs else []
    if ends is None:
        ends = dict(zip(("full", "deleted", "blurred"), probs[:3]))
        probs = probs[3:]
    inner = steps - 1
    fractions = [k / n for k in counts]
    out = {}
    for j, name in enumerate(orders):
        deletion = [ends["full"]] + probs[2 * j * inner : (2 * j + 1) * inner] + [ends["deleted"]]
        insertion = [ends["blurred"]] + probs[(2 * j + 1) * inner : (2 * j + 2) * inner] + [ends["full"]]
        out[name] = {
            "deletion_auc": auc(fractions, deletion),
            "insertion_auc": auc(fractions, insertion),
            "curves": {"x": fractions, "deletion": deletion, "insertion": insertion},
        }
    return out, ends, len(batch)
