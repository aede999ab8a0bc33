"""How far a map can be trusted: deletion and insertion (Petsiuk, Das & Saenko 2018, "RISE"), per patch.

Patches are taken in the map's order, most relevant first. Deletion sets them to 0 in normalised space (the
dataset's mean colour) and watches the target's softmax probability fall: a faithful map makes it fall at
once, so a low deletion AUC is good. Insertion starts from a Gaussian-blurred copy of the crop and puts the
patches back: a faithful map makes the probability rise at once, so a high insertion AUC is good. A random
patch order gives the baseline either way.

Steps: one patch per step for grids of up to 49 patches (the bundled 7x7 model). Larger grids go in
`default_steps` equal steps, chosen so that a first score, random baseline included, stays within
FORWARD_BUDGET forward passes: the full crop, the all-deleted crop and the blurred crop are shared by every
order and both curves, and each order adds (steps - 1) inner points per curve, so 3 + 4 (steps - 1) <= 40
gives 10 steps (39 passes) for ViT-B/16's 196 patches, and 18 passes for each further method on that photo
once its baseline is kept.

The AUC is the trapezoid rule over the fraction of patches changed, [0, 1], both ends included. Pixels past
the last whole patch (when the patch size does not divide the crop) are never changed: the model does not see
them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torchvision.transforms.v2 import functional as TF

FORWARD_BUDGET = 40  # forward passes for a first score on a large grid, random baseline included
ONE_PATCH_PER_STEP_UP_TO = 49  # grids up to this many patches go one patch per step
RANDOM_SEED = 0  # the random baseline's order: the same for every call, so scores can be compared


def default_steps(num_patches: int) -> int:
    """Steps per curve: one per patch up to 49 patches, else the most that keep 3 + 4 (steps - 1) <= 40."""
    if num_patches <= ONE_PATCH_PER_STEP_UP_TO:
        return num_patches
    return min(num_patches, (FORWARD_BUDGET - 3) // 4 + 1)


def patch_counts(num_patches: int, steps: int) -> list[int]:
    """How many patches are changed at each of steps + 1 points: 0, about n / steps, ..., n (equal steps)."""
    if not 1 <= steps <= num_patches:
        raise ValueError(f"steps must be between 1 and the {num_patches} patches, not {steps}.")
    return [round(i * num_patches / steps) for i in range(steps + 1)]


def ranking(saliency: torch.Tensor, seed: int = RANDOM_SEED) -> torch.Tensor:
    """Patch indices (row-major), most relevant first. Equal values (a flat map, entries discarded to zero)
    come in a seeded random order, not top-left first, which would favour whatever sits there."""
    flat = saliency.flatten().double()
    shuffle = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
    return shuffle[torch.argsort(-flat[shuffle], stable=True)]


def random_order(num_patches: int, seed: int = RANDOM_SEED) -> torch.Tensor:
    """A random patch order: the baseline a map must beat."""
    return torch.randperm(num_patches, generator=torch.Generator().manual_seed(seed))


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
