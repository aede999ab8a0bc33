"""Classifier: a ViT with its preprocessing and labels; what the CLI, the app and Python callers use."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

from . import explain as explain_lib
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
        dtype: the precision inference runs in (bfloat16 on CUDA GPUs that have it, else float32).
        runtime: runs `predict`'s forward passes (CUDA graph for batch 1, concurrent callers batched).
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else inference_dtype(self.device)
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

    def crop(self, image: Image.Image | str | Path, key: str | None = None) -> torch.Tensor:
        """The pixels the model sees, uint8 (C, H, W); `image` may be a path, opened only if `key` is new."""
        crop = self._recall(key).get("crop")
        if crop is None:
            if isinstance(image, (str, Path)):
                with Image.open(image) as im:
                    crop = self.preprocessor.crop(im)
            else:
                crop = self.preprocessor.crop(image)
            self._remember(key, crop=crop)
        return crop

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
        logits = self.runtime(self.preprocessor.normalize(self.crop(image, key)))
        return self.top_k(logits[0], k)

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
        if done is not None:
            return done
        crop = self.crop(image, key)
        x = self.preprocessor.normalize(crop).to(self.device, self.dtype)
        logits, attns = self.model(x, return_attn=True)
        done = crop, [a[0].float().cpu() for a in attns], logits[0].float().cpu()
        self._remember(key, attention=done)
        return done

    def explain(self, image: Image.Image, method: str = "rollout", **kwargs) -> Image.Image:
        """Where the model looked, drawn over the crop it saw.

        Args:
            image: any PIL image.
            method: one of `explain.METHODS` ("rollout", "attention", "heads").
            kwargs: the method's options (layer, head, head_fusion, discard_ratio, alpha).
        Returns:
            an RGB PIL image the size of the crop (a grid of crops for "heads").
        """
        crop, attns, _ = self.attention(image)
        return explain_lib.render(crop, attns, self.config.num_prefix_tokens, method, **kwargs)


def load_classifier(source: str | os.PathLike, revision: str | None = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> Classifier:
    """Loads a ViT classifier from a Hub repo id, a local folder laid out like one, or a weights file.

    Args:
        source: e.g. "google/vit-base-patch16-224", "timm/deit_tiny_patch16_224.fb_in1k", "./folder", "vit_b_16.pth".
        revision: branch, tag or commit for a Hub repo.
        device: "cuda", "mps", "cpu"...; by default the best available.
        dtype: e.g. torch.float32 to keep full precision on a GPU; by default bfloat16 where supported.
    Raises:
        ModelLoadError: the checkpoint cannot be found, read or understood; the message says what to do.
    """
    return Classifier(load_checkpoint(source, revision), device, dtype)


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
