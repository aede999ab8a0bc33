"""Classifier: a ViT with its preprocessing and labels; what the CLI, the app and Python callers use.

Preprocessing and prediction live here; the gradient and map work (the passes a map is made from, the maps, their
faithfulness scores) lives in `vit_demo.attribution`, which the public methods call.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

from . import attribution
from . import explain as explain_lib
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


class LRU:
    """A least-recently-used cache of a fixed number of entries, safe across threads. Keys of None are not kept."""

    def __init__(self, entries: int):
        self.entries = entries
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        if key is None or (isinstance(key, tuple) and key[0] is None):
            return None
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key, value) -> None:
        if key is None or (isinstance(key, tuple) and key[0] is None):
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class NotANumber(ValueError):
    """The model's logits for one photo are NaN or infinite (a checkpoint that loads, and fails on some inputs)."""


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
        cache: the work kept per key (an LRU of CACHE_ENTRIES entries: a ViT-B/16's gradients take 22 MB per class).
    """

    CACHE_ENTRIES = 16

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
        # predict, the attention maps, the gradients of the classes asked about, and faithfulness's random-order
        # baselines (per photo content, class and steps), so /explain after /classify and every slider move reuse them.
        self.cache = LRU(self.CACHE_ENTRIES)
        self._label_index: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            self._label_index.setdefault(label, i)

    def crop(self, image: Image.Image | str | Path | torch.Tensor, key: str | None = None) -> torch.Tensor:
        """The pixels the model sees, uint8 (C, H, W); `image` may be a path, opened only if `key` is new, or
        this crop already made (the app decodes uploads in worker processes)."""
        crop = self.cache.get((key, "crop"))
        if crop is None:
            if isinstance(image, torch.Tensor):
                crop = image
            elif isinstance(image, (str, Path)):
                with Image.open(image) as im:
                    crop = self.preprocessor.crop(im)
            else:
                crop = self.preprocessor.crop(image)
            self.cache.put((key, "crop"), crop)
        return crop

    def kept_crop(self, key: str | None) -> torch.Tensor | None:
        """The crop kept under `key` by an earlier call, if it is still kept."""
        return self.cache.get((key, "crop"))

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
        return self.top_k(self.served_logits(self.crop(image, key), key), k)

    def served_logits(self, crop: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """The classification path's logits (num_classes,), kept per `key`: the answer that predict gives and that
        the maps name and explain by default, so that the fast and the explicit attention paths, which round
        differently in bfloat16, never name two answers for one photo."""
        logits = self.cache.get((key, "logits"))
        if logits is None:
            logits = self.runtime(self.preprocessor.normalize(crop))[0]
            if not bool(torch.isfinite(logits).all()):
                raise NotANumber("The model gave answers that are not numbers (NaN or infinite logits) for this photo: "
                                 "try another photo or another model.")
            self.cache.put((key, "logits"), logits)
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
        return attribution.attention(self, self.crop(image, key), key)

    @torch.inference_mode()
    def walk(self, image: Image.Image | str | Path | torch.Tensor, key: str | None = None) -> dict:
        """One forward pass with everything the Inside tab's walk shows, kept per `key` (as `attention` is).

        Returns:
            {"crop": uint8 (C, H, W), "attns": every layer's attention (heads, N, N), "tokens": the tokens after
             the embedding and after every block (depth + 1 tensors (N, D)), "layer_logits": the answer read out
             after every block (depth, num_classes), "logits": (num_classes,)}, on the CPU in float32.
        """
        done = self.cache.get((key, "walk"))
        if done is not None:
            return done
        crop = self.crop(image, key)
        x = self.preprocessor.normalize(crop).to(self.device, self.dtype)
        logits, attns, tokens = self.model(x, return_attn=True, return_tokens=True)
        layer_logits = inside_lib.readout_logits(self.model, torch.cat(tokens[1:]))  # (depth, num_classes)
        done = {"crop": crop, "attns": [a[0].float().cpu() for a in attns], "tokens": [t[0].float().cpu() for t in tokens],
                "layer_logits": layer_logits, "logits": logits[0].float().cpu()}
        self.cache.put((key, "walk"), done)
        if self.cache.get((key, "attention")) is None:
            self.cache.put((key, "attention"), (crop, done["attns"], self.served_logits(crop, key)))
        return done

    def attention_gradients(self, x: torch.Tensor, targets: torch.Tensor | list[int] | None = None, gradients: str = "plain"):
        """One forward pass on the explicit attention path and one backward pass from the target logits.

        Args:
            x: normalised inputs (B, C, H, W), e.g. from `preprocess`.
            targets: a class index per image, or None for each image's top class.
            gradients: "plain", or "balanced" (LibraGrad's backward rules, `model.balanced_gradients`).
        Returns:
            (logits (B, num_classes), attns, grads, targets (B,)), on the CPU in float32: attns[i] is layer i's
            attention after softmax (B, heads, N, N), as the block used it, and grads[i] the gradient of each
            image's target logit (before softmax) with respect to it. `attribution.trace` gives the rest.
        """
        t = attribution.trace(self.model, x.to(self.device, self.dtype), targets, gradients)
        return t.logits, t.attns, t.grads, t.targets

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
        """The tokens the classifier reads, whose rows the maps read (see VisionTransformer.readout_tokens)."""
        return self.model.readout_tokens(num_tokens)

    def maps(self, image: Image.Image | str | Path, method: str = "relevance", target: int | str | None = None,
             key: str | None = None, **options) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """`heatmap` with what it was made from: (crop uint8 (C, H, W), map, target index, logits (num_classes,))."""
        return attribution.maps(self, image, method, target, key, **options)[:4]

    def heatmap(self, image: Image.Image | str | Path, method: str = "relevance", target: int | str | None = None,
                key: str | None = None, **options) -> torch.Tensor:
        """One method's raw map over the patch grid, before colouring.

        Args:
            image: a PIL image or its path.
            method: one of `explain.METHODS`: the class-specific ones (`explain.CLASS_SPECIFIC`: relevance and its
                balanced variant, libra_fullgrad, input_x_gradient, gradient_rollout) explain the target class (one
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
        """How faithful one map is: deletion and insertion AUCs and SaCo (see `vit_demo.faithfulness`), with a
        random-order baseline (the mean of several seeded orders) computed once per photo, class and number of
        steps, and kept.

        Args:
            image, method, target, key, options: as for `heatmap` ("heads" gives several maps: score one head
                with method="attention" and head=...).
            steps: points per curve minus one; by default one patch per step up to 49 patches, else 10 steps.
            progress: called as progress(done, total) in forward passes, after each batch.
            batch_size: inputs per forward pass.
        Returns:
            {"method", "target" (label), "target_index", "probability" (the target's, on the full crop),
             "deletion_auc" (lower is better), "insertion_auc" (higher is better), both in [0, 1],
             "curves": {"x" (fraction of patches changed), "deletion", "insertion"}, "saco" (in [-1, 1], higher is
             better; None for a map that ranks nothing),
             "random": {"deletion_auc", "insertion_auc", "curves", "orders", "deletion_auc_sd", "insertion_auc_sd"}
             (the mean of the seeded orders, and their spread), "steps", "forward_passes" (images through the
             model in this call; the baseline's are not repeated on a later call), and for a complete map
             (libra_fullgrad) "completeness": {"logit", "patches", "prefix", "bias", "share"} (see
             `explain.completeness`)}.
        """
        return attribution.faithfulness(self, image, method, target, steps, progress, key, batch_size, **options)


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
