"""The gradient and map work of a Classifier: the passes a map is made from, what is kept of them, and its score.

`trace` runs one forward pass on the explicit attention path and, for the class-specific methods, one backward
pass from the target logits: plain gradients, or balanced ones (`model.balanced_gradients`, Mehri et al. 2025),
which also give each token's share of the logit (input x gradient of the embedded tokens plus every bias x
gradient) and the pixels' input x gradient. `maps` and `faithfulness` are what `Classifier.heatmap`, `explain`
and `faithfulness` call; they keep their work in the Classifier's one cache, per caller-given key.

Completeness under balanced gradients: with LayerNorm's standard deviation, the softmax weights and GELU's gate
held constant, the logit is a linear function of the input and of every bias together, so it equals the sum of
each one times its gradient. The patches' shares, the prefix tokens' shares and the head's bias (with an
average-pooled model's final LayerNorm bias, which sits on no token) add up to the logit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from . import explain as ex
from . import faithfulness as faith
from .model import VisionTransformer, balanced_gradients


@dataclass
class Traces:
    """A batch's passes, on the CPU in float32.

    logits: (B, num_classes); targets: (B,) the class each image's gradients are of.
    attns: per layer (B, heads, N, N), the attention probabilities as the blocks used them.
    grads: per layer (B, heads, N, N), the target logit's gradient with respect to them (None: no backward pass).
    tokens: (B, N) balanced input x gradient of the embedded tokens plus each token's bias x gradient (balanced only).
    pixels: (B, patches) the pixels times their balanced gradient, summed per patch (balanced only).
    rest: (B,) the logit's part on no token: the head's bias, an average-pooled model's final LayerNorm bias.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    attns: list
    grads: list | None = None
    tokens: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    def image(self, i: int) -> Traces:
        """Image i's traces, batch dimension dropped."""
        pick = lambda t: None if t is None else t[i]  # noqa: E731
        return Traces(self.logits[i], self.targets[i], [a[i] for a in self.attns],
                      None if self.grads is None else [g[i] for g in self.grads],
                      pick(self.tokens), pick(self.pixels), pick(self.rest))


def trace(model: VisionTransformer, x: torch.Tensor, targets=None, gradients: str | None = "plain") -> Traces:
    """One forward pass on the explicit attention path, and one backward pass from each image's target logit.

    Args:
        model: the ViT, in any precision (the traces come back in float32).
        x: normalised inputs (B, C, H, W), on the model's device and in its dtype.
        targets: a class index per image, or None for each image's top class.
        gradients: None (no backward pass), "plain" or "balanced".
    """
    if gradients is None:
        with torch.inference_mode():
            logits, attns = model(x, return_attn=True)
        targets = logits.argmax(-1) if targets is None else torch.as_tensor(targets).view(-1)
        return Traces(logits.float().cpu(), targets.cpu(), [a.float().cpu() for a in attns])
    # Not under inference_mode: the attention must stay in the autograd graph. Only the gradients with respect to
    # the attention (and, balanced, the input and the taps) are computed, none for the weights.
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone().requires_grad_(True)
        taps: list = []
        if gradients == "balanced":
            with balanced_gradients(taps):
                logits, attns = model(x, return_attn=True)
        elif gradients == "plain":
            logits, attns = model(x, return_attn=True)
        else:
            raise ValueError(f"gradients must be None, 'plain' or 'balanced', not {gradients!r}")
        if targets is None:
            targets = logits.detach().argmax(-1)
        targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device).view(-1)
        y = logits.gather(1, targets[:, None]).sum()  # images are independent: each gets its own logit's gradient
        wrt = list(attns) + ([x] + [probe for probe, _ in taps] if gradients == "balanced" else [])
        found = torch.autograd.grad(y, wrt)
    out = Traces(logits.detach().float().cpu(), targets.cpu(), [a.detach().float().cpu() for a in attns],
                 [g.float().cpu() for g in found[: len(attns)]])
    if gradients == "balanced":
        out.pixels, out.tokens, out.rest = _shares(model, x.detach(), found[len(attns)], taps, found[len(attns) + 1 :], targets)
    return out


def _shares(model, x, x_grad, taps, tap_grads, targets):
    """(pixels (B, patches), tokens (B, N), rest (B,)) from the balanced backward pass."""
    p = model.cfg.patch_size
    B, _, H, W = x.shape
    gh, gw = H // p, W // p
    pixels = (x.float() * x_grad.float()).sum(1)[:, : gh * p, : gw * p]  # (B, gh * p, gw * p)
    pixels = pixels.reshape(B, gh, p, gw, p).sum((2, 4)).reshape(B, gh * gw)  # (B, patches)
    tokens, rest, first_input = 0, torch.zeros(B), True
    for (probe, value), g in zip(taps, tap_grads):
        if probe.shape == value.shape:  # a block's input: input x gradient, only the first block's
            if first_input:
                tokens = tokens + (value.float() * g.float()).sum(-1)  # (B, N)
                first_input = False
        elif g.ndim == 3:  # a bias added at every token
            tokens = tokens + (g.float() * value.float()).sum(-1)  # (B, N)
        else:  # a bias after pooling: on no token
            rest = rest + (g.float() * value.float()).sum(-1).cpu()
    heads = [model.head] + ([model.head_dist] if model.head_dist is not None else [])
    bias = sum(h.bias.detach().float()[targets] for h in heads) / len(heads)  # (B,)
    return pixels.cpu(), tokens.cpu(), rest + bias.cpu()


# --- a Classifier's maps, with its cache ----------------------------------------------------------------------------


def check_options(clf, method: str, options: dict) -> None:
    """Refuses an unknown method or option, or a layer or head out of range, in one sentence."""
    ex.method(method)
    known = {name for names in ex.OPTIONS.values() for name in names}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"Unknown option {sorted(unknown)[0]!r}: the methods take {', '.join(sorted(known))}.")
    depth, heads = clf.config.depth, clf.config.num_heads
    layer, head = options.get("layer", -1), options.get("head")
    if not -depth <= int(layer) < depth:
        raise ValueError(f"Layer {layer} is out of range: this model has {depth} layers, numbered 0 to {depth - 1} (or -1 for the last).")
    if head is not None and not 0 <= int(head) < heads:
        raise ValueError(f"Head {head} is out of range: this model has {heads} heads per layer, numbered 0 to {heads - 1}.")


def attention(clf, crop: torch.Tensor, key) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(crop, every layer's attention (heads, N, N), logits (num_classes,)) of one crop, kept per key."""
    done = clf.cache.get((key, "attention"))
    if done is None:
        x = clf.preprocessor.normalize(crop).to(clf.device, clf.dtype)
        t = trace(clf.model, x, gradients=None).image(0)
        done = crop, t.attns, clf.served_logits(crop, key)
        clf.cache.put((key, "attention"), done)
    return done


def traces(clf, crop: torch.Tensor, target, key, gradients: str) -> tuple[Traces, int]:
    """One crop's traces for a class (None: the top class) and a kind of gradients, kept per key, class and kind
    (the attention once, as `attention` keeps it)."""
    seen = clf.cache.get((key, "attention"))
    served = clf.served_logits(crop, key)  # the answer predict gives: the default class, whatever the precision
    t = clf.target_index(target, served)
    kept = clf.cache.get((key, gradients, t))
    if seen is not None and kept is not None:
        logits, *rest = kept
        return Traces(logits, torch.tensor(t), seen[1], *rest), t
    x = clf.preprocessor.normalize(crop).to(clf.device, clf.dtype)
    done = trace(clf.model, x, [t], gradients).image(0)
    if key is not None:
        if seen is None:
            clf.cache.put((key, "attention"), (crop, done.attns, served))
        clf.cache.put((key, gradients, t), (done.logits, done.grads, done.tokens, done.pixels, done.rest))
    return done, t


def maps(clf, image, method: str, target, key, **options) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, Traces | None]:
    """(crop uint8 (C, H, W), map, target index, logits (num_classes,), the traces of a class-specific map)."""
    check_options(clf, method, options)
    m = ex.method(method)
    crop = clf.crop(image, key)
    if m.gradients:
        t_, t = traces(clf, crop, target, key, m.gradients)
        attns, logits = t_.attns, clf.served_logits(crop, key)
    else:
        _, attns, logits = attention(clf, crop, key)
        t, t_ = clf.target_index(target, logits), None  # not used by the map, but a wrong target is still an error
    num_prefix = clf.config.num_prefix_tokens
    rows = tuple(clf.model.readout_tokens(attns[0].shape[-1]))
    evidence = ex.Evidence(attns, num_prefix, rows, None if t_ is None else t_.grads,
                           None if t_ is None else t_.tokens, None if t_ is None else t_.pixels)
    return crop, ex.patch_map(method, evidence, clf.grid(crop), **options), t, logits, t_


def faithfulness(clf, image, method: str, target=None, steps: int | None = None, progress=None, key=None,
                 batch_size: int = 32, **options) -> dict:
    """See `Classifier.faithfulness`."""
    if ex.method(method).panels:
        raise ValueError("Faithfulness scores one map, and 'heads' draws one per head: use method='attention' with head=... instead.")
    crop, m, t, logits, t_ = maps(clf, image, method, target, key, **options)
    grid = clf.grid(crop)
    n = grid[0] * grid[1]
    steps = faith.default_steps(n) if steps is None else int(steps)
    faith.patch_counts(n, steps)  # checks steps
    digest = hashlib.sha1(crop.numpy().tobytes()).hexdigest()
    baseline_key = ("baseline", digest, tuple(crop.shape), t, steps)
    kept = clf.cache.get(baseline_key)
    orders = {"map": faith.ranking(m)}
    if kept is None:
        orders.update(faith.random_orders(n))
    x = clf.preprocessor.normalize(crop)

    @torch.inference_mode()
    def predict(batch):
        return clf.model(batch.to(clf.device, clf.dtype))

    scored, ends, passes = faith.deletion_insertion(
        predict, x, orders, t, grid, clf.config.patch_size, steps, None if kept is None else kept[0], batch_size, progress
    )
    if kept is None:
        kept = ends, faith.mean_scores([scored[name] for name in orders if name != "map"])
        clf.cache.put(baseline_key, kept)
    saco, saco_passes = faith.saco_score(predict, x, m, t, grid, clf.config.patch_size, kept[0]["full"], batch_size=batch_size)
    out = {
        "method": method,
        "target": clf.labels[t],
        "target_index": t,
        "probability": kept[0]["full"],
        **scored["map"],
        "saco": saco,
        "random": kept[1],
        "steps": steps,
        "forward_passes": passes + saco_passes,
    }
    if ex.method(method).complete:
        out["completeness"] = ex.completeness(t_.tokens, float(t_.rest), float(t_.logits[t]), clf.config.num_prefix_tokens)
    return out
