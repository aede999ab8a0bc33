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

# PIL's resample codes (transformers' `resample`) -> torchvision's names. BOX and HAMMING resize PIL images only.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL_ONLY = ("box", "hamming")


class PreprocessError(ValueError):
    """A preprocessing setting vit_demo cannot follow; the message names it and what is supported."""


@dataclass
class PreprocessConfig:
    resize: int | tuple[int, int] | None = 256  # int: shorter side; (h, w): both sides, aspect not kept...
    keep_ratio: bool = False  # ...unless this is set: (h, w) then is covered, aspect kept (timm's ResizeKeepRatio)
    crop: tuple[int, int] | None = (224, 224)  # centre crop (h, w) after resizing; None: no crop
    interpolation: str = "bilinear"  # "bilinear", "bicubic", "nearest", "lanczos", "box" or "hamming"
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
    """transformers' preprocessor_config.json (ViTImageProcessor, DeiTImageProcessor) -> PreprocessConfig.

    Raises:
        PreprocessError: a size, resample code or mean/std that vit_demo cannot follow.
    """
    resize = _size(pp.get("size", {"height": 224, "width": 224}), "size", shortest_edge=True)
    crop = _size(pp.get("crop_size", {"height": 224, "width": 224}), "crop_size") if pp.get("do_center_crop") else None
    code = pp.get("resample", 2)
    if code not in _RESAMPLE:
        raise PreprocessError(f"resample {code!r} is not supported (PIL's codes 0 to 5 are)")
    interpolation = _RESAMPLE[code]
    normalize = pp.get("do_normalize", True)
    return PreprocessConfig(
        resize=resize if pp.get("do_resize", True) else None,
        crop=crop,
        interpolation=interpolation,
        mean=_floats(pp.get("image_mean", INCEPTION_MEAN)) if normalize else (0.0,) * 3,
        std=_floats(pp.get("image_std", INCEPTION_STD)) if normalize else (1.0,) * 3,
        dark_background=bool(pp.get("do_dark_background", False)),
        # transformers' image processors resize uint8 tensors, which torchvision cannot do with BOX or HAMMING:
        # those resize PIL images, as transformers' PIL image processors (and the older slow ones) do.
        backend="pil" if interpolation in _PIL_ONLY else "tensor",
    )


def from_timm(pretrained_cfg: dict) -> PreprocessConfig:
    """timm's pretrained_cfg (input_size, crop_pct, crop_mode, interpolation, mean, std) -> PreprocessConfig.

    timm evaluates with Resize(floor(size / crop_pct)) on the shorter side, then a centre crop; for a non-square
    input_size, the image is scaled, aspect kept, until it covers floor(h / crop_pct) x floor(w / crop_pct), then
    centre-cropped ("squash" scales each side on its own).

    Raises:
        PreprocessError: a crop mode or interpolation that vit_demo cannot follow.
    """
    _, h, w = pretrained_cfg.get("test_input_size") or pretrained_cfg.get("input_size", (3, 224, 224))
    crop_pct = pretrained_cfg.get("test_crop_pct") or pretrained_cfg.get("crop_pct", 0.875)
    mode = pretrained_cfg.get("crop_mode", "center")
    if mode in ("squash", "center"):
        resize = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        if mode == "center" and h == w:
            resize = resize[0]
    else:
        raise PreprocessError(f"timm crop_mode {mode!r} is not supported (center and squash are)")
    interpolation = pretrained_cfg.get("interpolation", "bicubic")
    if interpolation not in _RESAMPLE.values():
        raise PreprocessError(
            f"interpolation {interpolation!r} is not supported (nearest, bilinear, bicubic, lanczos, box and hamming are)"
        )
    return PreprocessConfig(
        resize=resize,
        keep_ratio=mode == "center" and h != w,
        crop=(h, w),
        interpolation=interpolation,
        mean=_floats(pretrained_cfg.get("mean", IMAGENET_MEAN)),
        std=_floats(pretrained_cfg.get("std", IMAGENET_STD)),
    )


def _size(value, name: str, shortest_edge: bool = False) -> int | tuple[int, int]:
    """transformers' size dicts: {"height", "width"} or an int -> (h, w); {"shortest_edge"} -> int."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and shortest_edge and isinstance(value.get("shortest_edge"), int):
        return value["shortest_edge"]
    if isinstance(value, dict) and isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
        return (value["height"], value["width"])
    supported = "height and width, or shortest_edge," if shortest_edge else "height and width"
    raise PreprocessError(f"{name} {value!r} is not supported ({supported} are)")


def _floats(values) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise PreprocessError(f"mean and std must be lists of numbers, not {values!r}") from None


def check_channels(cfg: PreprocessConfig, channels: int) -> None:
    """Raises PreprocessError unless the mean and std have one value per channel the model reads."""
    if not (len(cfg.mean) == len(cfg.std) == channels):
        raise PreprocessError(
            f"mean and std need {channels} values (one per channel), not {len(cfg.mean)} and {len(cfg.std)}"
        )


def torchvision_default(crop: int = 224) -> PreprocessConfig:
    """torchvision's ViT recipe (`ViT_B_16_Weights.IMAGENET1K_V1.transforms()`): resize 256, crop 224."""
    return PreprocessConfig(resize=256 * crop // 224, crop=(crop, crop), interpolation="bilinear")


HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # modes load_image scales to 8 bits
_STRIP_PIXELS = 1 << 20  # pixels scaled to 8 bits at a time: bounds the working copies to a few MB


def load_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """Puts a photo upright (EXIF orientation) and into the mode the model reads: the first frame of an
    animation, transparency flattened onto white, 16-bit, 32-bit and float images scaled to 8 bits.
    A photo whose EXIF block cannot be parsed keeps its pixels as stored (not rotated)."""
    if _orientation(image) != 1:  # exif_transpose copies even upright images: only call it when needed
        image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_DEPTH:
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    return image if image.mode == mode else image.convert(mode)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright), or 1 when the EXIF block is damaged (Pillow raises SyntaxError and
    others for what a camera, an editor or a stranger wrote there)."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - any parse failure means: no usable orientation
        return 1


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image -> 8 bits ("L"), keeping its contrast.

    Integers are scaled by the smallest bit depth from 8 up that holds their brightest pixel, so 12-bit data
    stored in 16 bits (0..4095) spans 0..255 like 16-bit data (0..65535) does; images with negative values by
    their range. Floats are read as 0..1 when they lie within it, else by their (finite) range. The image is
    converted a strip of rows at a time, so the working copies stay at a few megabytes whatever its size.
    """
    lo, hi = _finite_range(image)
    if image.mode == "F" and 0 <= lo and hi <= 1:
        offset, top = 0.0, 1.0
    elif image.mode != "F" and lo >= 0:
        offset, top = 0.0, float(2 ** max(8, int(hi).bit_length()) - 1)
    else:
        offset, top = lo, (hi - lo) or 1.0
    scale = 255.0 / top
    w, h = image.size
    out = np.empty((h, w), np.uint8)
    for y, strip in _strips(image):
        x = strip.astype(np.float64)  # (rows, w): exact for every 16- and 32-bit value
        x -= offset
        x *= scale
        np.nan_to_num(x, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(x, 0, 255, out=x)
        out[y : y + len(x)] = np.rint(x)
    return Image.fromarray(out, "L")


def _strips(image: Image.Image):
    """(first row, pixels as a numpy array (rows, w)) for strips of about _STRIP_PIXELS pixels."""
    w, h = image.size
    rows = max(1, _STRIP_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        yield y, np.asarray(image.crop((0, y, w, min(h, y + rows))))


def _finite_range(image: Image.Image) -> tuple[float, float]:
    """The smallest and largest finite pixel values (0, 0 for an image with none)."""
    lo, hi = math.inf, -math.inf
    for _, a in _strips(image):
        if a.dtype.kind == "f":
            a = a[np.isfinite(a)]
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def decoded_bytes(image: Image.Image, mode: str = "RGB", backend: str = "pil") -> int:
    """The memory that decoding `image` and preparing it for a model takes, estimated from the header alone
    (nothing is decoded; the EXIF orientation is not read either, since a PNG's may lie after its pixels).

    With P = width x height pixels, B(m) Pillow's bytes per pixel of mode m in memory (1 for "1", "L" and "P";
    2 for "I;16*"; 4 for the others, RGB included), C the channels of `mode` and S = _STRIP_PIXELS:

        P x B(image.mode)                                   the decoded image
      + P x B(image.mode)                                   the upright copy (EXIF orientation)
      + P x 1 + S x (B(image.mode) + 8)   if 16/32-bit/float: the 8-bit copy and one strip's working copies
      + 2 x P x 4                         if transparent:  the RGBA copy and the flattened RGB
      + P x B(mode)                       else if the mode differs: the converted copy
      + 2 x P x C                         if backend is "tensor": the uint8 tensor and the resize's copy

    It is an upper bound (some copies are freed before the next is made). A 6300x6300 16-bit PNG read as RGB
    and cropped peaked at 265 MiB (pil) and 455 MiB (tensor) of resident memory, for estimates of 351 and
    578 MiB (with int64 copies, before strips, it peaked at 985 MiB).

    Args:
        image: an opened PIL image; it need not be loaded.
        mode: the mode the model reads ("RGB" or "L").
        backend: the checkpoint's PreprocessConfig.backend ("pil" resizes PIL images, "tensor" uint8 tensors).
    Returns:
        bytes.
    """
    pixels = image.size[0] * image.size[1]
    b = _pixel_bytes(image.mode)
    total = 2 * pixels * b
    current = image.mode
    if current in HIGH_DEPTH:
        total += pixels + _STRIP_PIXELS * (b + 8)
        current = "L"
    if current in ("RGBA", "LA", "PA") or (current == "P" and "transparency" in image.info):
        total += 2 * pixels * 4
    elif current != mode:
        total += pixels * _pixel_bytes(mode)
    if backend == "tensor":
        total += 2 * pixels * len(mode)
    return total


def _pixel_bytes(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


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
            interpolation = InterpolationMode(cfg.interpolation)
            geometry.append(_ResizeKeepRatio(cfg.resize, interpolation) if cfg.keep_ratio
                            else T.Resize(cfg.resize, interpolation=interpolation, antialias=True))
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


_PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
                "box": Image.BOX, "hamming": Image.HAMMING}


class _ResizeKeepRatio:
    """Scales a PIL image, aspect kept, until it covers (h, w): timm's ResizeKeepRatio (longest=0) at evaluation."""

    def __init__(self, size: tuple[int, int], interpolation: InterpolationMode):
        self.size, self.interpolation = tuple(size), interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        nw, nh = _kept_ratio_size(*image.size, self.size)
        return T.functional.resize(image, [nh, nw], interpolation=self.interpolation, antialias=True)


def _kept_ratio_size(w: int, h: int, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a w x h image scaled, aspect kept, to cover size (h, w); timm's rounding."""
    ratio = min(h / size[0], w / size[1])
    return round(w / ratio), round(h / ratio)


def _crop_of_extreme_image(image: Image.Image, cfg: PreprocessConfig, slack: int = 4) -> torch.Tensor | None:
    """Resize(shorter side, or aspect kept) then CenterCrop, for an image so elongated that the resized copy would
    exceed `slack` crops (3x4000 -> 248x330666): one PIL resize of just the source region the crop keeps, so memory
    stays at the crop's size. None for ordinary images, which keep the exact Resize + CenterCrop path."""
    if cfg.backend != "pil" or not (isinstance(cfg.resize, int) or cfg.keep_ratio) or cfg.crop is None:
        return None
    w, h = image.size
    ch, cw = cfg.crop
    if cfg.keep_ratio:
        nw, nh = _kept_ratio_size(w, h, cfg.resize)
    else:
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
