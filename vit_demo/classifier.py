"""Classifier: a ViT with its preprocessing and labels; what the CLI, the app and Python callers use."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

from . import explain as explain_lib
from . import faithfulness as faith
from . import inside as inside_lib
from .hub import Checkpoint, ModelLoadError, load_checkpoint
from .model import VisionTransformer
from .preprocess import Preprocessor
from .runtime import Runtime, inference_dtype


def default_device() -> torch.device:
    """CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Classifier:
    """A loaded ViT checkpoint, ready to classify and explain PIL images.

    Attributes:
        model: the VisionTransformer; `model(x)` gives logits (B, num_classes).
        labels: class names in index order.
        config: the model's ViTConfig.
        preprocessor: image -> the exact crop the model sees -> normalised tensor.
        name: where the checkpoint came from.
        dtype: the precision inference runs in (by default `runtime.inference_dtype`'s choice: bfloat16 where the
            device is fast at it, else float32; VIT_DEMO_PRECISION overrides).
        runtime: runs `predict`'s forward passes (CUDA graph for batch 1, concurrent callers batched).
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else inference_dtype(self.device, checkpoint.config)
        self.config = checkpoint.config
        try:
            self.model = VisionTransformer(self.config)
            result = self.model.load_state_dict(checkpoint.state_dict, strict=False)
        except (RuntimeError, AssertionError) as e:
            detail = str(e).strip().splitlines()[-1].strip()
            raise ModelLoadError(
                f"The weights of {checkpoint.name} do not fit together as a ViT ({detail}): the file may be damaged or edited."
            ) from e
        if result.missing_keys or result.unexpected_keys:
            raise ModelLoadError(
                f"{checkpoint.name} does not fit a ViT: missing {_few(result.missing_keys)}, "
                f"unexpected {_few(result.unexpected_keys)}; it may be a variant vit_demo does not implement."
            )
        self.model.to(self.device, self.dtype).eval()
        self.runtime = Runtime(self.model, self.device, self.dtype)
        self.labels = checkpoint.labels
        self.preprocessor = Preprocessor(checkpoint.preprocess)
        self.name = checkpoint.name
        self.format = checkpoint.format
        # Work kept per caller-given key (the app uses the upload's content-addressed path): the crop from
        # predict, then the attention maps, so /explain after /classify and every slider move reuse them.
        self._memo: OrderedDict[str, dict] = OrderedDict()
        self._memo_lock = threading.Lock()
        self.memo_size = 4
        # Faithfulness's random-order baseline, kept per photo (by the crop's content), class and steps.
        self._baselines: OrderedDict[tuple, tuple] = OrderedDict()
        self.baselines_size = 32
        self._label_index: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            self._label_index.setdefault(label, i)

    def _remember(self, key, **work) -> None:
        if key is None:
            return
        with self._memo_lock:
            self._memo.setdefault(key, {}).update(work)
            self._memo.move_to_end(key)
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)

    def _recall(self, key) -> dict:
        with self._memo_lock:
            return dict(self._memo.get(key, {})) if key is not None else {}

    def crop(self, image: Image.Image | str | Path | torch.Tensor, key: str | None = None) -> torch.Tensor:
        """The pixels the model sees, uint8 (C, H, W); `image` may be a path, opened only if `key` is new, or
        this crop already made (the app decodes uploads in worker processes)."""
        crop = self._recall(key).get("crop")
        if crop is None:
            if isinstance(image, torch.Tensor):
                crop = image
            elif isinstance(image, (str, Path)):
                with Image.open(image) as im:
                    crop = self.preprocessor.crop(im)
            else:
                crop = self.preprocessor.crop(image)
            self._remember(key, crop=crop)
        return crop

    def kept_crop(self, key: str | None) -> torch.Tensor | None:
        """The crop kept under `key` by an earlier call, if it is still kept."""
        return self._recall(key).get("crop")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised input (1, C, H, W) on the CPU, exactly as the checkpoint was trained."""
        return self.preprocessor(image)

    @torch.inference_mode()
    def predict(self, image: Image.Image | str | Path, k: int = 5, key: str | None = None) -> list[tuple[str, float]]:
        """Top-k classes of one image.

        Args:
            image: a PIL image or its path; it is put upright (EXIF) and converted to the model's mode.
            k: how many classes to return (at most the number of classes).
            key: names this image's content, so that a later `attention(..., key)` reuses the preprocessing.
        Returns:
            [(label, probability), ...], best first.
        """
        return self.top_k(self._served_logits(self.crop(image, key), key), k)

    def _served_logits(self, crop: torch.Tensor, key: str | None) -> torch.Tensor:
        """The classification path's logits (num_classes,), kept per `key`: the answer that predict gives and that
        the maps name and explain by default, so that the fast and the explicit attention paths, which round
        differently in bfloat16, never name two answers for one photo."""
        logits = self._recall(key).get("logits")
        if logits is None:
            logits = self.runtime(self.preprocessor.normalize(crop))[0]
            self._remember(key, logits=logits)
        return logits

    def top_k(self, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
        probs = logits.float().softmax(-1)
        values, indices = probs.topk(min(k, len(self.labels)))
        return [(self.labels[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]

    @torch.inference_mode()
    def attention(self, image: Image.Image | str | Path, key: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Runs the explicit attention path (once per `key`).

        Returns:
            (crop the model saw, uint8 (C, H, W); every layer's attention (heads, N, N) on the CPU; logits (num_classes,)).
        """
        done = self._recall(key).get("attention")
        return done if done is not None else self._attend(self.crop(image, key), key)

    @torch.inference_mode()
    def _attend(self, crop: torch.Tensor, key: str | None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        done = self._recall(key).get("attention")
        if done is not None:
            return done
        x = self.preprocessor.normalize(crop).to(self.device, self.dtype)
        _, attns = self.model(x, return_attn=True)
        done = crop, [a[0].float().cpu() for a in attns], self._served_logits(crop, key)
        self._remember(key, attention=done)
        return done

    @torch.inference_mode()
    def walk(self, image: Image.Image | str | Path, key: str | None = None) -> dict:
        """One forward pass with everything the Inside tab's walk shows, kept per `key` (as `attention` is).

        Returns:
            {"crop": uint8 (C, H, W), "attns": every layer's attention (heads, N, N), "tokens": the tokens after
             the embedding and after every block (depth + 1 tensors (N, D)), "layer_logits": the answer read out
             after every block (depth, num_classes), "logits": (num_classes,)}, on the CPU in float32.
        """
        done = self._recall(key).get("walk")
        if done is not None:
            return done
        crop = self.crop(image, key)
        x = self.preprocessor.normalize(crop).to(self.device, self.dtype)
        logits, attns, tokens = self.model(x, return_attn=True, return_tokens=True)
        layer_logits = inside_lib.readout_logits(self.model, torch.cat(tokens[1:]))  # (depth, num_classes)
        done = {"crop": crop, "attns": [a[0].float().cpu() for a in attns], "tokens": [t[0].float().cpu() for t in tokens],
                "layer_logits": layer_logits, "logits": logits[0].float().cpu()}
        self._remember(key, walk=done, **({} if "attention" in self._recall(key) else
                                          {"attention": (crop, done["attns"], done["logits"])}))
        return done

    def attention_gradients(self, x: torch.Tensor, targets: torch.Tensor | list[int] | None = None):
        """One forward pass on the explicit attention path and one backward pass from the target logits.

        Args:
            x: normalised inputs (B, C, H, W), e.g. from `preprocess`.
            targets: a class index per image, or None for each image's top class.
        Returns:
            (logits (B, num_classes), attns, grads, targets (B,)), on the CPU in float32: attns[i] is layer i's
            attention after softmax (B, heads, N, N), as the block used it, and grads[i] the gradient of each
            image's target logit (before softmax) with respect to it.
        """
        # Not under inference_mode: the attention must stay in the autograd graph. Only the gradients with respect
        # to the attention are computed (autograd.grad), none for the weights, and nothing is left in .grad.
        with torch.inference_mode(False), torch.enable_grad():
            x = x.to(self.device, self.dtype).clone().requires_grad_(True)
            logits, attns = self.model(x, return_attn=True)  # attns: float32 softmax outputs, (B, heads, N, N) each
            if targets is None:
                targets = logits.detach().argmax(-1)
            targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device).view(-1)
            y = logits.gather(1, targets[:, None]).sum()  # images are independent: each gets its own logit's gradient
            grads = torch.autograd.grad(y, attns)
        return (logits.detach().float().cpu(), [a.detach().float().cpu() for a in attns],
                [g.float().cpu() for g in grads], targets.cpu())

    def target_index(self, target: int | str | None, logits: torch.Tensor | None = None) -> int:
        """A class index from an index, a label or None (the top class of `logits`).

        Raises:
            ValueError: the label or index is not one of this model's classes; the message says how to find them.
        """
        n = len(self.labels)
        if target is None:
            if logits is None:
                raise ValueError("No target class was given and no logits to take the top class from: pass a label or index.")
            return int(logits.argmax())
        if isinstance(target, torch.Tensor) and target.numel() == 1:
            target = target.item()
        if isinstance(target, str):
            if target in self._label_index:
                return self._label_index[target]
            folded = [i for i, label in enumerate(self.labels) if label.casefold() == target.strip().casefold()]
            if folded:
                return folded[0]
            if target.strip().isdecimal():  # "²" is a digit that int() refuses
                target = int(target)
            else:
                raise ValueError(
                    f"'{target}' is not one of this model's {n} classes: give a label as the model spells it "
                    f"(predict lists the top ones, clf.labels all of them) or a class index from 0 to {n - 1}."
                )
        if isinstance(target, bool) or not (isinstance(target, int) or hasattr(target, "__index__")):
            raise ValueError(f"The target class must be a label or a class index, not {target!r}.")
        target = int(target)
        if not 0 <= target < n:
            raise ValueError(f"Class index {target} is out of range: this model has {n} classes, numbered 0 to {n - 1}.")
        return target

    def grid(self, crop: torch.Tensor) -> tuple[int, int]:
        """The model's patch grid (gh, gw) for a crop (C, H, W)."""
        return explain_lib.grid_shape(crop.shape[-2], crop.shape[-1], self.config.patch_size)

    def readout_rows(self, num_tokens: int) -> list[int]:
        """The tokens the classifier reads, whose rows the class-specific maps read (see explain.readout_rows)."""
        return explain_lib.readout_rows(num_tokens, self.config.num_prefix_tokens, self.config.global_pool)

    def _gradients(self, crop: torch.Tensor, target, key) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, int]:
        """(attns, grads, logits, target index) for one crop. Per `key`, the attention is kept once (as `attention`
        keeps it) and the gradients for the last two classes asked about (a ViT-B/16's take 22 MB per class)."""
        memo = self._recall(key)
        seen, kept = memo.get("attention"), memo.get("gradients", {})
        logits = self._served_logits(crop, key)
        t = self.target_index(target, logits)
        if seen is not None and t in kept:
            return seen[1], kept[t], logits, t
        _, attns, grads, _ = self.attention_gradients(self.preprocessor.normalize(crop), [t])
        attns, grads = [a[0] for a in attns], [g[0] for g in grads]
        if key is not None:
            kept = {**kept, t: grads}
            while len(kept) > 2:
                kept.pop(next(iter(kept)))
            self._remember(key, gradients=kept, **({} if seen is not None else {"attention": (crop, attns, logits)}))
        return attns, grads, logits, t

    def _check_options(self, method: str, options: dict) -> None:
        if method not in explain_lib.METHODS:
            raise ValueError(f"'{method}' is not a method: use one of {', '.join(explain_lib.METHODS)}.")
        known = {name for names in explain_lib.OPTIONS.values() for name in names}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"Unknown option {sorted(unknown)[0]!r}: the methods take {', '.join(sorted(known))}.")
        depth, heads = self.config.depth, self.config.num_heads
        layer, head = options.get("layer", -1), options.get("head")
        if not -depth <= int(layer) < depth:
            raise ValueError(f"Layer {layer} is out of range: this model has {depth} layers, numbered 0 to {depth - 1} (or -1 for the last).")
        if head is not None and not 0 <= int(head) < heads:
            raise ValueError(f"Head {head} is out of range: this model has {heads} heads per layer, numbered 0 to {heads - 1}.")

    def maps(self, image: Image.Image | str | Path, method: str = "relevance", target: int | str | None = None,
             key: str | None = None, **options) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """`heatmap` with what it was made from: (crop uint8 (C, H, W), map, target index, logits (num_classes,))."""
        self._check_options(method, options)
        crop = self.crop(image, key)
        grads = None
        if method in explain_lib.CLASS_SPECIFIC:
            attns, grads, logits, t = self._gradients(crop, target, key)
        else:
            _, attns, logits = self._attend(crop, key)
            t = self.target_index(target, logits)  # not used by the map, but a wrong target is still an error
        m = explain_lib.patch_map(method, attns, grads, self.config.num_prefix_tokens, self.grid(crop),
                                  self.readout_rows(attns[0].shape[-1]), **options)
        return crop, m, t, logits

    def heatmap(self, image: Image.Image | str | Path, method: str = "relevance", target: int | str | None = None,
                key: str | None = None, **options) -> torch.Tensor:
        """One method's raw map over the patch grid, before colouring.

        Args:
            image: a PIL image or its path.
            method: one of `explain.METHODS`: "relevance" and "gradient_rollout" explain the target class (one
                forward and one backward pass); "rollout", "attention" and "heads" are the same for every class.
            target: the class to explain: an index, a label (as in `labels`), or None for the top class.
            key: names this image's content, so that the crop, attention and gradients are reused.
            options: layer and head (for "attention", "heads"; counted from 0), head_fusion (for "rollout"),
                discard_ratio (for "rollout", "gradient_rollout"); the method ignores the others.
        Returns:
            (gh, gw) float32 on the CPU, the model's patch grid; (heads, gh, gw) for "heads".
        Raises:
            ValueError: an unknown method or class, or a layer or head out of range.
        """
        return self.maps(image, method, target, key, **options)[1]

    def explain(self, image: Image.Image | str | Path, method: str = "rollout", target: int | str | None = None,
                key: str | None = None, alpha: float = 0.6, **options) -> Image.Image:
        """Where the model looked (or, for the class-specific methods, why it chose `target`), drawn over the
        crop it saw.

        Args:
            image: any PIL image, or its path.
            method, target, key, options: as for `heatmap`.
            alpha: opacity of the heatmap, 0 (crop only) to 1 (heatmap only).
        Returns:
            an RGB PIL image the size of the crop (a grid of crops for "heads").
        """
        crop, m, _, _ = self.maps(image, method, target, key, **options)
        return explain_lib.draw(crop, m, alpha)

    def faithfulness(self, image: Image.Image | str | Path, method: str, target: int | str | None = None,
                     steps: int | None = None, progress=None, key: str | None = None, batch_size: int = 32,
                     **options) -> dict:
        """How faithful one map is: deletion and insertion AUCs (see `vit_demo.faithfulness`), with a random-order
        baseline that is computed once per photo, class and number of steps, and kept.

        Args:
            image, method, target, key, options: as for `heatmap` ("heads" gives several maps: score one head
                with method="attention" and head=...).
            steps: points per curve minus one; by default one patch per step up to 49 patches, else 10 steps.
            progress: called as progress(done, total) in forward passes, after each batch.
            batch_size: inputs per forward pass.
        Returns:
            {"method", "target" (label), "target_index", "probability" (the target's, on the full crop),
             "deletion_auc" (lower is better), "insertion_auc" (higher is better), both in [0, 1],
             "curves": {"x" (fraction of patches changed), "deletion", "insertion"},
             "random": {"deletion_auc", "insertion_auc", "curves"}, "steps", "forward_passes" (images through the
             model in this call; the baseline's are not repeated on a later call)}.
        """
        if method == "heads":
            raise ValueError("Faithfulness scores one map, and 'heads' draws one per head: use method='attention' with head=... instead.")
        crop, m, t, _ = self.maps(image, method, target, key, **options)
        grid = self.grid(crop)
        n = grid[0] * grid[1]
        steps = faith.default_steps(n) if steps is None else int(steps)
        faith.patch_counts(n, steps)  # checks steps
        digest = hashlib.sha1(crop.numpy().tobytes()).hexdigest()
        baseline_key = (digest, tuple(crop.shape), t, steps)
        with self._memo_lock:
            kept = self._baselines.get(baseline_key)
        orders = {"map": faith.ranking(m)}
        if kept is None:
            orders["random"] = faith.random_order(n)
        x = self.preprocessor.normalize(crop)

        @torch.inference_mode()
        def predict(batch):
            return self.model(batch.to(self.device, self.dtype))

        scored, ends, passes = faith.deletion_insertion(
            predict, x, orders, t, grid, self.config.patch_size, steps, None if kept is None else kept[0], batch_size, progress
        )
        if kept is None:
            kept = ends, scored["random"]
            with self._memo_lock:
                self._baselines[baseline_key] = kept
                while len(self._baselines) > self.baselines_size:
                    self._baselines.popitem(last=False)
        return {
            "method": method,
            "target": self.labels[t],
            "target_index": t,
            "probability": kept[0]["full"],
            **scored["map"],
            "random": kept[1],
            "steps": steps,
            "forward_passes": passes,
        }


def load_classifier(source: str | os.PathLike, revision: str | None = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> Classifier:
    """Loads a ViT classifier from a Hub repo id, a local folder laid out like one, or a weights file.

    Args:
        source: e.g. "google/vit-base-patch16-224", "timm/deit_tiny_patch16_224.fb_in1k", "./folder", "vit_b_16.pth".
        revision: branch, tag or commit for a Hub repo.
        device: "cuda", "mps", "cpu"...; by default the best available.
        dtype: e.g. torch.float32 to keep full precision; by default bfloat16 where the device is fast at it (CUDA GPUs
            that support it, CPUs with AMX), else float32, or VIT_DEMO_PRECISION when set.
    Raises:
        ModelLoadError: the checkpoint cannot be found, read or understood; the message says what to do.
    """
    return Classifier(load_checkpoint(source, revision), device, dtype)


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
