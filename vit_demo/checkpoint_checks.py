"""A checkpoint is input: every value it carries is checked here, before anything is allocated from it.

Three steps, each on what is known at that point of a load, so that a bad checkpoint is refused before its
weights are downloaded or any module is built:

1. `check_metadata`: the type and range of every config.json and preprocessor_config.json value vit_demo reads.
2. `check_architecture`: the weights' names and shapes (read from the file's header, or as meta tensors) against
   the ViT their shapes describe: block numbers contiguous and bounded, every shape the one the model expects.
3. `check_input`: the input size the preprocessing asks for, its token count, and the memory the explicit
   attention path takes for one map (`attention_bytes`), within `ATTENTION_BUDGET_BYTES`.

A bad value is a `ModelLoadError` whose sentence names the file, the key and what is allowed.
"""

from __future__ import annotations

import math
import os
import re

import torch

from .model import ViTConfig, VisionTransformer


class ModelLoadError(RuntimeError):
    """A checkpoint could not be found, read or understood. The message says what to do.

    `transient` is true where trying again later may succeed (the Hub was out of reach); a registry does not
    remember such a failure.
    """

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def _env_mb(name: str, default_mb: int) -> int:
    try:
        return max(1, int(float(os.environ.get(name, "") or default_mb))) * 1024**2
    except ValueError:
        return default_mb * 1024**2


# Bounds on what a checkpoint may ask for. The largest published ViTs (ViT-G/14: 48 blocks, 1664 wide, 16 heads,
# 8192 MLP; ImageNet-22k: 21,843 classes; 518-px inputs) fit within them.
MAX_DEPTH = 64
MAX_WIDTH = 4096
MAX_HEADS = 64
MAX_MLP = 16384
MAX_CLASSES = 100_000
MAX_PATCH = 64
MAX_INPUT_SIDE = 1024  # pixels a side of the input the model reads (the crop)
MAX_RESIZE_SIDE = 2048  # pixels a side the photo is resized to before the crop
MAX_TOKENS = 4100  # prefix tokens + patches (a 1024-px input in 16-px patches: 4,097)
MAX_TENSORS = 5000  # names in one weights file (a 64-block ViT has about 1,000)
MAX_LABEL_CHARS = 200
# Memory the explicit attention path of heavy requests may hold at once; one map of a model must fit in it.
ATTENTION_BUDGET_BYTES = _env_mb("VIT_DEMO_ATTENTION_MB", 2048)
ATTENTION_COPIES = 3  # probabilities, their gradients, and autograd's saved copy (the gradient methods' peak)



def _shown(value) -> str:
    text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:59] + "…"


class _Checker:
    """Checks the values of one file of `source`; each failure is one ModelLoadError naming file and key."""

    def __init__(self, source, file: str):
        self.source, self.file = source, file

    def refuse(self, key: str, value, allowed: str):
        raise ModelLoadError(
            f"{self.source}: {self.file} sets {key} to {_shown(value)}, which vit_demo cannot use (allowed: {allowed}): "
            "fix the file, or use another checkpoint."
        )

    def whole(self, data: dict, key: str, low: int, high: int, name: str | None = None) -> None:
        if key in data:
            value = data[key]
            if not _is_int(value) or not low <= value <= high:
                self.refuse(name or key, value, f"a whole number from {low:,} to {high:,}")

    def number(self, data: dict, key: str, low: float, high: float, name: str | None = None, open_low: bool = False) -> None:
        if key in data:
            value = data[key]
            ok = _is_number(value) and math.isfinite(value) and (low < value if open_low else low <= value) and value <= high
            if not ok:
                bracket = "above" if open_low else "from"
                self.refuse(name or key, value, f"a number {bracket} {low:g} up to {high:g}")

    def flag(self, data: dict, key: str) -> None:
        if key in data and not isinstance(data[key], bool):
            self.refuse(key, data[key], "true or false")

    def text(self, data: dict, key: str, options: tuple[str, ...] | None = None) -> None:
        if key in data:
            value = data[key]
            if not isinstance(value, str) or len(value) > MAX_LABEL_CHARS or (options is not None and value not in options):
                self.refuse(key, value, ", ".join(options) if options else f"text of at most {MAX_LABEL_CHARS} characters")

    def channels(self, data: dict, key: str, low: float, high: float, positive: bool = False) -> None:
        """A mean or std: finite numbers in range (how many: preprocess.check_channels)."""
        if key in data:
            value = data[key]
            ok = (isinstance(value, (list, tuple)) and 1 <= len(value) <= 4
                  and all(_is_number(v) and math.isfinite(v) and low <= v <= high and (v > 0 or not positive) for v in value))
            if not ok:
                what = "above 0" if positive else f"from {low:g}"
                self.refuse(key, value, f"one number per channel, each {what} up to {high:g}")

    def side_dict(self, data: dict, key: str, high: int) -> None:
        """transformers' size: an int or a dict of sides; each whole side from 1 to `high` (which forms vit_demo
        follows: preprocess's own sentence)."""
        if key not in data:
            return
        value = data[key]
        sides = [value] if _is_int(value) else list(value.values()) if isinstance(value, dict) else []
        if any(_is_int(s) and not 1 <= s <= high for s in sides) or any(isinstance(s, float) for s in sides):
            self.refuse(key, value, f"whole numbers of pixels from 1 to {high:,}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metadata(source, config: dict, preprocessor: dict | None) -> None:
    """Type and range of every value vit_demo reads from config.json and preprocessor_config.json.

    Args:
        source: the checkpoint's name, for the message.
        config: config.json (transformers or timm), {} when absent.
        preprocessor: preprocessor_config.json, None when absent.
    Raises:
        ModelLoadError: naming the file, the key and what is allowed.
    """
    c = _Checker(source, "config.json")
    c.text(config, "model_type")
    c.text(config, "architecture")
    if "model_type" in config and config["model_type"] not in ("vit", "deit"):
        raise ModelLoadError(f"{source} is a '{_text(config['model_type'])}' model, not a ViT: vit_demo reads {SUPPORTED}.")
    if "architecture" in config and not config["architecture"].startswith(("vit_", "deit_")):
        raise ModelLoadError(f"{source} is a timm '{_text(config['architecture'])}', not a ViT: vit_demo reads {SUPPORTED}.")
    c.whole(config, "num_attention_heads", 1, MAX_HEADS)
    c.whole(config, "hidden_size", 1, MAX_WIDTH)
    c.whole(config, "num_hidden_layers", 1, MAX_DEPTH)
    c.whole(config, "intermediate_size", 1, MAX_MLP)
    c.whole(config, "patch_size", 1, MAX_PATCH)
    c.whole(config, "image_size", 1, MAX_INPUT_SIDE)
    c.whole(config, "num_channels", 1, 3)
    c.whole(config, "num_labels", 1, MAX_CLASSES)
    c.whole(config, "num_classes", 0, MAX_CLASSES)
    c.number(config, "layer_norm_eps", 0, 0.1, open_low=True)
    c.text(config, "hidden_act")  # which activations: convert's own sentence
    c.flag(config, "qkv_bias")
    _check_id2label(c, config)
    _check_label_names(c, config, "label_names")
    for key in ("model_args", "pretrained_cfg"):
        if key in config and not isinstance(config[key], dict):
            c.refuse(key, config[key], "an object (a JSON dict)")
    c.whole(config.get("model_args") or {}, "num_heads", 1, MAX_HEADS, "model_args.num_heads")
    pretrained = config.get("pretrained_cfg") or {}
    if pretrained:
        p = _Checker(source, "config.json's pretrained_cfg")
        for key in ("input_size", "test_input_size"):
            value = pretrained.get(key)
            if value is None:
                continue
            if not (isinstance(value, (list, tuple)) and len(value) == 3):
                continue  # another form: preprocess's own sentence
            ok = all(_is_int(v) for v in value) and value[0] in (1, 3) and all(1 <= v <= MAX_INPUT_SIDE for v in value[1:])
            if not ok:
                p.refuse(key, value, f"[channels (1 or 3), height, width], the sides from 1 to {MAX_INPUT_SIDE:,} pixels")
        for key in ("crop_pct", "test_crop_pct"):
            if pretrained.get(key) is not None:
                p.number(pretrained, key, 0, 1, open_low=True)
        p.text(pretrained, "crop_mode")  # which modes and interpolations: preprocess's own sentences
        p.text(pretrained, "interpolation")
        p.channels(pretrained, "mean", -10, 10)
        p.channels(pretrained, "std", 0, 10, positive=True)
        _check_label_names(p, pretrained, "label_names")
    if preprocessor is not None:
        p = _Checker(source, "preprocessor_config.json")
        for key in ("do_resize", "do_center_crop", "do_normalize", "do_rescale", "do_dark_background"):
            p.flag(preprocessor, key)
        p.side_dict(preprocessor, "size", MAX_RESIZE_SIDE)
        p.side_dict(preprocessor, "crop_size", MAX_INPUT_SIDE)
        p.channels(preprocessor, "image_mean", -10, 10)
        p.channels(preprocessor, "image_std", 0, 10, positive=True)
        if preprocessor.get("do_rescale", True) and "rescale_factor" in preprocessor:
            factor = preprocessor["rescale_factor"]
            if not (_is_number(factor) and abs(factor - 1 / 255) < 1e-6):
                p.refuse("rescale_factor", factor, "1/255, pixels scaled to [0, 1]")


def _text(value) -> str:
    return _shown(value).strip("'\"")


def _check_id2label(c: _Checker, config: dict) -> None:
    if "id2label" not in config:
        return
    value = config["id2label"]
    if not isinstance(value, dict) or len(value) > MAX_CLASSES:
        c.refuse("id2label", value, f"an object of at most {MAX_CLASSES:,} class numbers and their names")
    for key, name in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < MAX_CLASSES):
            c.refuse("a key of id2label", key, "class numbers from 0, as text")
        if not isinstance(name, str) or len(name) > MAX_LABEL_CHARS:
            c.refuse(f"id2label[{key}]", name, f"a class name in text of at most {MAX_LABEL_CHARS} characters")


def _check_label_names(c: _Checker, data: dict, key: str) -> None:
    if key not in data:
        return
    value = data[key]
    if not isinstance(value, list) or len(value) > MAX_CLASSES:
        c.refuse(key, value, f"a list of at most {MAX_CLASSES:,} class names")
    for i, name in enumerate(value):
        if not isinstance(name, str) or len(name) > MAX_LABEL_CHARS:
            c.refuse(f"{key}[{i}]", name, f"a class name in text of at most {MAX_LABEL_CHARS} characters")


# --- the weights ----------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def meta_tensors(shapes: dict[str, tuple[list[int], torch.dtype]], source) -> dict[str, torch.Tensor]:
    """Tensors with the given shapes and dtypes that take no memory ("meta"), so that a checkpoint can be converted
    and checked from its file's header alone. Refuses more than MAX_TENSORS names, or an absurd shape."""
    if len(shapes) > MAX_TENSORS:
        raise ModelLoadError(
            f"{source} holds {len(shapes):,} tensors, more than any ViT vit_demo reads (at most {MAX_TENSORS:,}): "
            "the file may be damaged or edited."
        )
    out = {}
    for name, (shape, dtype) in shapes.items():
        if len(shape) > 4 or any(not _is_int(s) or s < 0 or s > 10**6 for s in shape):
            raise ModelLoadError(f"{source}: the tensor {_shown(name)} has the shape {_shown(shape)}, which no ViT has: "
                                 "the file may be damaged or edited.")
        out[name] = torch.empty(tuple(shape), dtype=dtype, device="meta")
    return out


def check_architecture(source, sd: dict[str, torch.Tensor], cfg: ViTConfig) -> None:
    """The converted weights' names and shapes against the ViT `cfg` describes, before any module is built.

    Args:
        source: the checkpoint's name, for the message.
        sd: the state dict in vit_demo's names (meta tensors suffice: only names, shapes and dtypes are read).
        cfg: the architecture read from those shapes.
    Raises:
        ModelLoadError: a size out of bounds, block numbers that skip, a missing, stray or misshapen tensor.
    """
    blocks = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    if len(blocks) > MAX_DEPTH or (blocks and blocks[-1] >= MAX_DEPTH):
        raise ModelLoadError(
            f"{source}: the weights name block {blocks[-1] + 1:,}, deeper than any ViT vit_demo reads "
            f"(at most {MAX_DEPTH} blocks): the file may be damaged or edited."
        )
    if blocks != list(range(len(blocks))):
        gap = next(i for i, b in enumerate(blocks) if b != i)
        raise ModelLoadError(
            f"{source}: the weights' blocks are not numbered 0 to {len(blocks) - 1} in a row (block {gap} is missing, "
            f"block {blocks[-1]} is there): the file may be damaged or edited."
        )
    bounds = (("depth", cfg.depth, 1, MAX_DEPTH), ("width", cfg.embed_dim, 1, MAX_WIDTH),
              ("MLP width", cfg.mlp_dim, 1, MAX_MLP), ("number of classes", cfg.num_classes, 1, MAX_CLASSES),
              ("patch size", cfg.patch_size, 1, MAX_PATCH), ("number of channels", cfg.in_chans, 1, 3),
              ("number of heads", cfg.num_heads, 1, MAX_HEADS))
    for what, value, low, high in bounds:
        if not (_is_int(value) and low <= value <= high):
            raise ModelLoadError(f"{source}: its {what} is {_shown(value)}; vit_demo reads ViTs with {low:,} to {high:,}: "
                                 "the file may be damaged or edited.")
    if cfg.embed_dim % cfg.num_heads:
        raise ModelLoadError(
            f"{source}: {cfg.embed_dim} channels cannot be split into {cfg.num_heads} attention heads: "
            "check num_attention_heads in its config.json."
        )
    with torch.device("meta"):  # the module's parameter shapes, without allocating them
        expected = {k: tuple(v.shape) for k, v in VisionTransformer(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{source} does not fit a ViT: missing {_few(missing)}, unexpected {_few(unexpected)}; "
            "it may be a variant vit_demo does not implement."
        )
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise ModelLoadError(
                f"The weights of {source} do not fit together as a ViT ({name} has the shape {list(sd[name].shape)}, "
                f"the model needs {list(shape)}): the file may be damaged or edited."
            )
        if not sd[name].dtype.is_floating_point:
            raise ModelLoadError(f"{source}: {name} holds {str(sd[name].dtype).removeprefix('torch.')} values, not "
                                 "floating-point weights: the file may be damaged or edited.")


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(k if len(k) <= 80 else k[:79] + "…" for k in keys[:n]) + more


def check_finite(source, sd: dict[str, torch.Tensor]) -> None:
    """Refuses weights holding NaN or infinity (the model's answers would be NaN)."""
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{source}: {name} holds NaN or infinite values, so every answer would be NaN: "
                                 "the file may be damaged; download it again.")


# --- the input ------------------------------------------------------------------------------------------------


def tokens(cfg: ViTConfig, input_size: tuple[int, int]) -> int:
    """Tokens of one image: the prefix tokens and one per patch of an (h, w) input."""
    h, w = input_size
    return cfg.num_prefix_tokens + (h // cfg.patch_size) * (w // cfg.patch_size)


def attention_bytes(cfg: ViTConfig, input_size: tuple[int, int]) -> int:
    """Memory one map request's explicit attention takes: copies x layers x heads x tokens² x 4 bytes (float32)."""
    n = tokens(cfg, input_size)
    return ATTENTION_COPIES * cfg.depth * cfg.num_heads * n * n * 4


def check_input(source, cfg: ViTConfig, input_size: tuple[int, int], resize, where: str) -> None:
    """The input the preprocessing asks for, against the bounds and the attention budget.

    Args:
        source: the checkpoint's name.
        cfg: its architecture.
        input_size: (h, w) the model reads (the crop).
        resize: the resize before the crop (an int shorter side, an (h, w), or None).
        where: which file and key set the input, for the message ("preprocessor_config.json's size").
    """
    h, w = input_size
    refuse = f"{source}: {where} asks for"
    if not (_is_int(h) and _is_int(w) and cfg.patch_size <= h <= MAX_INPUT_SIDE and cfg.patch_size <= w <= MAX_INPUT_SIDE):
        raise ModelLoadError(
            f"{refuse} a {h}x{w} input, which vit_demo cannot use (allowed: {cfg.patch_size} to {MAX_INPUT_SIDE:,} "
            "pixels a side): fix the file, or use another checkpoint."
        )
    sides = [] if resize is None else [resize] if _is_int(resize) else list(resize)
    if any(not _is_int(s) or not 1 <= s <= MAX_RESIZE_SIDE for s in sides):
        raise ModelLoadError(
            f"{refuse} a resize to {_shown(resize)} pixels, which vit_demo cannot use (allowed: 1 to "
            f"{MAX_RESIZE_SIDE:,} a side): fix the file, or use another checkpoint."
        )
    n = tokens(cfg, input_size)
    if n > MAX_TOKENS:
        raise ModelLoadError(
            f"{refuse} a {h}x{w} input in {cfg.patch_size}-pixel patches, {n:,} tokens (allowed: at most "
            f"{MAX_TOKENS:,}): fix the file, or use another checkpoint."
        )
    need = attention_bytes(cfg, input_size)
    if need > ATTENTION_BUDGET_BYTES:
        raise ModelLoadError(
            f"{refuse} a {h}x{w} input, whose attention maps would take {need / 1024**2:,.0f} MiB ({cfg.depth} layers x "
            f"{cfg.num_heads} heads x {n:,}² tokens), more than the {ATTENTION_BUDGET_BYTES / 1024**2:,.0f} MiB "
            "allowed (VIT_DEMO_ATTENTION_MB): use a smaller input or another checkpoint."
        )


SUPPORTED = (
    "transformers ViT/DeiT (google/vit-*, facebook/deit-*), timm vision_transformer/deit (timm/vit_*, timm/deit_*) "
    "and torchvision vit_* state dicts"
)
