"""Image -> tensor, exactly as each checkpoint was trained.

A `PreprocessConfig` is read from the checkpoint (transformers' preprocessor_config.json, timm's
pretrained_cfg, torchvision's published recipe) and turned into torchvision transforms. The geometric
part (resize, crop) stays separate from the pixel part (to tensor, normalise), so the app can show the
exact crop the model saw and draw attention maps onto it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# PIL / transformers resample codes and timm's names -> torchvision's.
_INTERPOLATION = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}


@dataclass
class PreprocessConfig:
    resize: int | tuple[int, int] | None = 256  # int: shorter side; (h, w): both sides, aspect not kept
    crop: tuple[int, int] | None = (224, 224)  # centre crop (h, w) after resizing; None: no crop
    interpolation: str = "bilinear"  # "bilinear", "bicubic", "nearest" or "lanczos"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    mode: str = "RGB"  # PIL mode the model reads: "RGB", or "L" for grayscale models
    # Grayscale models trained on light objects on a dark ground (Fashion-MNIST): photos are padded to a
    # square, and inverted when their border is light.
    dark_background: bool = False
    backend: str = "pil"  # resize PIL images ("pil": timm, torchvision) or uint8 tensors ("tensor": transformers)

    @property
    def input_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return tuple(self.crop)
        if isinstance(self.resize, int):
            return (self.resize, self.resize)
        return tuple(self.resize)


def from_transformers(pp: dict) -> PreprocessConfig:
    """transformers' preprocessor_config.json (ViTImageProcessor, DeiTImageProcessor) -> PreprocessConfig."""
    size = pp.get("size", {"height": 224, "width": 224})
    if isinstance(size, int):
        resize = (size, size)
    elif "shortest_edge" in size:
        resize = size["shortest_edge"]
    else:
        resize = (size["height"], size["width"])
    crop = None
    if pp.get("do_center_crop"):
        cs = pp.get("crop_size", {"height": 224, "width": 224})
        crop = (cs, cs) if isinstance(cs, int) else (cs["height"], cs["width"])
    return PreprocessConfig(
        resize=resize if pp.get("do_resize", True) else None,
        crop=crop,
        interpolation=_name(pp.get("resample", 2)),
        mean=tuple(pp.get("image_mean", INCEPTION_MEAN)) if pp.get("do_normalize", True) else (0.0,) * 3,
        std=tuple(pp.get("image_std", INCEPTION_STD)) if pp.get("do_normalize", True) else (1.0,) * 3,
        dark_background=pp.get("do_dark_background", False),
        backend="tensor",
    )


def from_timm(pretrained_cfg: dict) -> PreprocessConfig:
    """timm's pretrained_cfg (input_size, crop_pct, crop_mode, interpolation, mean, std) -> PreprocessConfig.

    timm evaluates with Resize(floor(size / crop_pct)) on the shorter side, then a centre crop.
    """
    _, h, w = pretrained_cfg.get("test_input_size") or pretrained_cfg.get("input_size", (3, 224, 224))
    crop_pct = pretrained_cfg.get("test_crop_pct") or pretrained_cfg.get("crop_pct", 0.875)
    mode = pretrained_cfg.get("crop_mode", "center")
    if mode == "squash":
        resize = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    elif mode == "center":
        resize = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    else:
        raise ValueError(f"timm crop_mode '{mode}' is not supported.")
    return PreprocessConfig(
        resize=resize,
        crop=(h, w),
        interpolation=pretrained_cfg.get("interpolation", "bicubic"),
        mean=tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(pretrained_cfg.get("std", IMAGENET_STD)),
    )


def torchvision_default(crop: int = 224) -> PreprocessConfig:
    """torchvision's ViT recipe (`ViT_B_16_Weights.IMAGENET1K_V1.transforms()`): resize 256, crop 224."""
    return PreprocessConfig(resize=256 * crop // 224, crop=(crop, crop), interpolation="bilinear")


def _name(code) -> str:
    return _INTERPOLATION[code].value


def load_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """Puts a photo upright (EXIF orientation) and into the mode the model reads: the first frame of an
    animation, transparency flattened onto white, 16-bit and float images scaled to 8 bits."""
    if image.getexif().get(0x0112, 1) != 1:  # exif_transpose copies even upright images: only call it when needed
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    return image if image.mode == mode else image.convert(mode)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit integer images (0..65535) -> 8 bits by dropping the low byte; float images by their range."""
    a = np.asarray(image)
    if image.mode == "F":
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = (a - lo) / (hi - lo or 1.0) * 255 if (lo < 0 or hi > 1) else a * 255
    else:
        sixteen = image.mode.startswith("I;16") or a.max(initial=0) > 255  # mode "I" may hold 8-bit values
        a = a.astype(np.int64) >> 8 if sixteen else a
    return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8), "L")


class Preprocessor:
    """PIL image -> the exact pixels the model sees -> normalised tensor.

    `crop(image)` gives the resized and cropped uint8 pixels (C, H, W), the picture attention maps are
    drawn on; `normalize(crop)` the model's input (1, C, H, W); calling the preprocessor does both.
    Geometry runs on PIL images for timm and torchvision checkpoints, whose own pipelines resize with
    PIL, and on uint8 tensors for transformers ones, whose image processors resize tensors; the two
    differ by up to a grey level, and each checkpoint gets the one it was made with.
    """

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        geometry = []
        if cfg.resize is not None:
            geometry.append(T.Resize(cfg.resize, interpolation=InterpolationMode(cfg.interpolation), antialias=True))
        if cfg.crop is not None:
            geometry.append(T.CenterCrop(cfg.crop))
        geometry = T.Compose(geometry)
        to_tensor = T.PILToTensor()
        self._crop = T.Compose([geometry, to_tensor] if cfg.backend == "pil" else [to_tensor, geometry])
        self._normalize = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(cfg.mean, cfg.std)])

    def crop(self, image: Image.Image) -> torch.Tensor:
        """The pixels the model sees: uint8 (C, H, W), upright and in the model's mode."""
        image = load_image(image, self.cfg.mode)
        if self.cfg.dark_background:
            image = _square_dark_background(image)
        crop = _crop_of_extreme_image(image, self.cfg)
        return crop if crop is not None else self._crop(image)

    def normalize(self, crop: torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) or (B, C, H, W) -> float32 model input, batched: (B, C, H, W)."""
        x = self._normalize(crop)
        return x.unsqueeze(0) if x.ndim == 3 else x

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.crop(image))


_PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def _crop_of_extreme_image(image: Image.Image, cfg: PreprocessConfig, slack: int = 4) -> torch.Tensor | None:
    """Resize(shorter side) then CenterCrop, for an image so elongated that the resized copy would exceed `slack`
    crops (3x4000 -> 248x330666): one PIL resize of just the source region the crop keeps, so memory stays at the
    crop's size. None for ordinary images, which keep the exact Resize + CenterCrop path."""
    if cfg.backend != "pil" or not isinstance(cfg.resize, int) or cfg.crop is None:
        return None
    w, h = image.size
    ch, cw = cfg.crop
    nw, nh = (cfg.resize, int(cfg.resize * h / w)) if w <= h else (int(cfg.resize * w / h), cfg.resize)  # torchvision's rule
    if max(nw, nh) <= slack * max(ch, cw) or cw > nw or ch > nh:
        return None
    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))  # CenterCrop's offsets
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    return T.PILToTensor()(image.resize((cw, ch), _PIL_FILTERS[cfg.interpolation], box=box))


def _square_dark_background(image: Image.Image, max_side: int = 2048) -> Image.Image:
    """A grayscale photo -> a square with the object light on a dark ground, as in Fashion-MNIST."""
    w, h = image.size
    if max(w, h) > max_side:  # the square would be max(w, h)**2 pixels: a 1x100000 strip would need 10 Gpx
        f = max_side / max(w, h)
        image = image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BOX)
        w, h = image.size
    border = [image.getpixel((x, y)) for x in range(0, w, max(1, w // 16)) for y in (0, h - 1)]
    border += [image.getpixel((x, y)) for y in range(0, h, max(1, h // 16)) for x in (0, w - 1)]
    background = sorted(border)[len(border) // 2]
    if background > 127:
        image, background = ImageOps.invert(image), 255 - background
    side = max(w, h)
    square = Image.new("L", (side, side), background)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square
