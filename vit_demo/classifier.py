"""Classifier: a ViT with its preprocessing and labels; what the CLI, the app and Python callers use."""

from __future__ import annotations

import os

import torch
from PIL import Image

from . import explain as explain_lib
from .hub import Checkpoint, ModelLoadError, load_checkpoint
from .model import VisionTransformer
from .preprocess import Preprocessor


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
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else default_device()
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
        self.model.to(self.device).eval()
        self.labels = checkpoint.labels
        self.preprocessor = Preprocessor(checkpoint.preprocess)
        self.name = checkpoint.name
        self.format = checkpoint.format

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised input (1, C, H, W) on the CPU, exactly as the checkpoint was trained."""
        return self.preprocessor(image)

    @torch.inference_mode()
    def predict(self, image: Image.Image, k: int = 5) -> list[tuple[str, float]]:
        """Top-k classes of one image.

        Args:
            image: any PIL image; it is put upright (EXIF) and converted to the model's mode.
            k: how many classes to return (at most the number of classes).
        Returns:
            [(label, probability), ...], best first.
        """
        logits = self.model(self.preprocess(image).to(self.device))
        return self.top_k(logits[0], k)

    def top_k(self, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
        probs = logits.float().softmax(-1)
        values, indices = probs.topk(min(k, len(self.labels)))
        return [(self.labels[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]

    @torch.inference_mode()
    def attention(self, image: Image.Image) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Runs the explicit attention path once.

        Returns:
            (crop the model saw, uint8 (C, H, W); every layer's attention (heads, N, N) on the CPU; logits (num_classes,)).
        """
        crop = self.preprocessor.crop(image)
        logits, attns = self.model(self.preprocessor.normalize(crop).to(self.device), return_attn=True)
        return crop, [a[0].float().cpu() for a in attns], logits[0].float().cpu()

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


def load_classifier(source: str | os.PathLike, revision: str | None = None, device: str | torch.device | None = None) -> Classifier:
    """Loads a ViT classifier from a Hub repo id, a local folder laid out like one, or a weights file.

    Args:
        source: e.g. "google/vit-base-patch16-224", "timm/deit_tiny_patch16_224.fb_in1k", "./folder", "vit_b_16.pth".
        revision: branch, tag or commit for a Hub repo.
        device: "cuda", "mps", "cpu"...; by default the best available.
    Raises:
        ModelLoadError: the checkpoint cannot be found, read or understood; the message says what to do.
    """
    return Classifier(load_checkpoint(source, revision), device)


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
