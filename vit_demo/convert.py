"""Foreign ViT checkpoints -> vit_demo's (timm's) parameter names, as pure functions of state dicts.

Each format has a table of `(their_name, our_name)` pairs; `{i}` stands for a block index. The one
structural difference between the formats, separate q/k/v projections in transformers versus one fused
`qkv` in timm and torchvision, is handled in `_fuse_qkv` / `_split_qkv` and nowhere else. The
architecture (`ViTConfig`) is read from the tensor shapes and, where the shapes cannot tell (number
of heads, LayerNorm eps, GELU form), from the checkpoint's config.
"""

from __future__ import annotations

import re

import torch

from .model import VARIANTS, ViTConfig

StateDict = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A checkpoint that cannot be turned into a vit_demo ViT."""


# transformers ViTForImageClassification / DeiTForImageClassification(WithTeacher), as on the Hub.
# `{p}` is the backbone prefix: "vit" or "deit".
TRANSFORMERS_RENAMES = [
    ("{p}.embeddings.cls_token", "cls_token"),
    ("{p}.embeddings.distillation_token", "dist_token"),
    ("{p}.embeddings.position_embeddings", "pos_embed"),
    ("{p}.embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
    ("{p}.embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    ("{p}.encoder.layer.{i}.layernorm_before.weight", "blocks.{i}.norm1.weight"),
    ("{p}.encoder.layer.{i}.layernorm_before.bias", "blocks.{i}.norm1.bias"),
    ("{p}.encoder.layer.{i}.attention.output.dense.weight", "blocks.{i}.attn.proj.weight"),
    ("{p}.encoder.layer.{i}.attention.output.dense.bias", "blocks.{i}.attn.proj.bias"),
    ("{p}.encoder.layer.{i}.layernorm_after.weight", "blocks.{i}.norm2.weight"),
    ("{p}.encoder.layer.{i}.layernorm_after.bias", "blocks.{i}.norm2.bias"),
    ("{p}.encoder.layer.{i}.intermediate.dense.weight", "blocks.{i}.mlp.fc1.weight"),
    ("{p}.encoder.layer.{i}.intermediate.dense.bias", "blocks.{i}.mlp.fc1.bias"),
    ("{p}.encoder.layer.{i}.output.dense.weight", "blocks.{i}.mlp.fc2.weight"),
    ("{p}.encoder.layer.{i}.output.dense.bias", "blocks.{i}.mlp.fc2.bias"),
    ("{p}.layernorm.weight", "norm.weight"),
    ("{p}.layernorm.bias", "norm.bias"),
    ("classifier.weight", "head.weight"),
    ("classifier.bias", "head.bias"),
    ("cls_classifier.weight", "head.weight"),
    ("cls_classifier.bias", "head.bias"),
    ("distillation_classifier.weight", "head_dist.weight"),
    ("distillation_classifier.bias", "head_dist.bias"),
]
TRANSFORMERS_QKV = "{p}.encoder.layer.{i}.attention.attention.{name}.{kind}"  # name: query/key/value
# Present in some transformers checkpoints and unused for classification.
TRANSFORMERS_IGNORED = re.compile(r"^(vit|deit)\.(pooler\.|embeddings\.mask_token)")

# torchvision.models.VisionTransformer (vit_b_16, vit_l_16, ...). Its MLP is Sequential(Linear, GELU,
# Dropout, Linear, Dropout), hence `mlp.0` and `mlp.3`; in_proj is already [q; k; v].
TORCHVISION_RENAMES = [
    ("class_token", "cls_token"),
    ("encoder.pos_embedding", "pos_embed"),
    ("conv_proj.weight", "patch_embed.proj.weight"),
    ("conv_proj.bias", "patch_embed.proj.bias"),
    ("encoder.layers.encoder_layer_{i}.ln_1.weight", "blocks.{i}.norm1.weight"),
    ("encoder.layers.encoder_layer_{i}.ln_1.bias", "blocks.{i}.norm1.bias"),
    ("encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight", "blocks.{i}.attn.qkv.weight"),
    ("encoder.layers.encoder_layer_{i}.self_attention.in_proj_bias", "blocks.{i}.attn.qkv.bias"),
    ("encoder.layers.encoder_layer_{i}.self_attention.out_proj.weight", "blocks.{i}.attn.proj.weight"),
    ("encoder.layers.encoder_layer_{i}.self_attention.out_proj.bias", "blocks.{i}.attn.proj.bias"),
    ("encoder.layers.encoder_layer_{i}.ln_2.weight", "blocks.{i}.norm2.weight"),
    ("encoder.layers.encoder_layer_{i}.ln_2.bias", "blocks.{i}.norm2.bias"),
    ("encoder.layers.encoder_layer_{i}.mlp.0.weight", "blocks.{i}.mlp.fc1.weight"),
    ("encoder.layers.encoder_layer_{i}.mlp.0.bias", "blocks.{i}.mlp.fc1.bias"),
    ("encoder.layers.encoder_layer_{i}.mlp.3.weight", "blocks.{i}.mlp.fc2.weight"),
    ("encoder.layers.encoder_layer_{i}.mlp.3.bias", "blocks.{i}.mlp.fc2.bias"),
    ("encoder.ln.weight", "norm.weight"),
    ("encoder.ln.bias", "norm.bias"),
    ("heads.head.weight", "head.weight"),
    ("heads.head.bias", "head.bias"),
]
# torchvision's published sizes have heads that dim // 64 does not give (ViT-H/14: 1280 wide, 16 heads).
TORCHVISION_HEADS = {768: 12, 1024: 16, 1280: 16}


def _depth(sd: StateDict, pattern: str) -> int:
    """Number of blocks: one more than the largest index matching `pattern` (with one `(\\d+)`)."""
    idx = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def _mapping(table, depth: int, **fmt) -> dict[str, str]:
    """A rename table expanded over the blocks: {their_key: our_key}."""
    mapping = {}
    for old, new in table:
        for i in range(depth) if "{i}" in old else [None]:
            mapping[old.format(i=i, **fmt)] = new.format(i=i)
    return mapping


def _rename(sd: StateDict, mapping: dict[str, str]) -> StateDict:
    """Renames keys; keys the mapping does not name are kept, so strict loading reports them."""
    return {mapping.get(k, k): v for k, v in sd.items()}


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([q, k, v], dim=0)  # (3 * C, C) or (3 * C,)


def _split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(qkv.chunk(3, dim=0))  # 3 x (C, C) or (C,)


def _arch_from_shapes(sd: StateDict, **known) -> ViTConfig:
    """The parts of a ViTConfig that the (already renamed) tensors determine."""
    try:
        D, in_chans, p, _ = sd["patch_embed.proj.weight"].shape
        num_prefix = 2 if "dist_token" in sd else 1
        grid = int(round((sd["pos_embed"].shape[1] - num_prefix) ** 0.5))
        head = sd.get("head.weight")
        cfg = dict(
            img_size=grid * p,
            patch_size=p,
            in_chans=in_chans,
            num_classes=head.shape[0] if head is not None else 0,
            embed_dim=D,
            depth=_depth(sd, r"blocks\.(\d+)\."),
            mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            distilled="dist_token" in sd,
            global_pool="avg" if "fc_norm.weight" in sd else "token",
        )
    except (KeyError, AttributeError, ValueError, IndexError) as e:
        raise ConversionError(f"The weights do not have the shape of a ViT (no {e}).") from e
    cfg.update(known)
    return ViTConfig(**cfg)


def from_transformers(sd: StateDict, hf_config: dict) -> tuple[StateDict, ViTConfig]:
    """A transformers ViT/DeiT checkpoint (keys as saved on the Hub) -> (our state dict, config).

    Args:
        sd: the checkpoint's tensors, e.g. `vit.encoder.layer.0.attention.attention.query.weight`.
        hf_config: its config.json as a dict (num_attention_heads, layer_norm_eps, hidden_act, ...).
    """
    p = "deit" if any(k.startswith("deit.") for k in sd) else "vit"
    depth = _depth(sd, rf"{p}\.encoder\.layer\.(\d+)\.")
    sd = {k: v for k, v in sd.items() if not TRANSFORMERS_IGNORED.match(k)}
    for i in range(depth):
        for kind in ("weight", "bias"):
            names = [TRANSFORMERS_QKV.format(p=p, i=i, name=n, kind=kind) for n in ("query", "key", "value")]
            if all(n in sd for n in names):
                sd[f"blocks.{i}.attn.qkv.{kind}"] = _fuse_qkv(*(sd.pop(n) for n in names))
    sd = _rename(sd, _mapping(TRANSFORMERS_RENAMES, depth, p=p))
    act = hf_config.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ConversionError(f"Activation '{act}' is not supported; vit_demo's ViT uses GELU.")
    cfg = _arch_from_shapes(
        sd,
        num_heads=hf_config.get("num_attention_heads", 12),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        gelu_approximate="none" if act == "gelu" else "tanh",
        pos_embed_antialias=False,
    )
    return sd, cfg


def to_transformers(sd: StateDict, cfg: ViTConfig) -> StateDict:
    """Our state dict -> transformers' ViTForImageClassification keys (the inverse of from_transformers)."""
    if cfg.distilled or cfg.global_pool != "token":
        raise ConversionError("Only token-pooled, non-distilled models have a ViTForImageClassification form.")
    sd = dict(sd)
    for i in range(cfg.depth):
        for kind in ("weight", "bias"):
            fused = sd.pop(f"blocks.{i}.attn.qkv.{kind}", None)
            if fused is None:
                continue
            for name, t in zip(("query", "key", "value"), _split_qkv(fused)):
                sd[TRANSFORMERS_QKV.format(p="vit", i=i, name=name, kind=kind)] = t.contiguous()
    table = [(old, new) for old, new in TRANSFORMERS_RENAMES if not old.startswith(("cls_", "distillation"))]
    inverse = {ours: theirs for theirs, ours in _mapping(table, cfg.depth, p="vit").items()}
    return _rename(sd, inverse)


def to_torchvision(sd: StateDict, cfg: ViTConfig) -> StateDict:
    """Our state dict -> torchvision VisionTransformer keys (the inverse of from_torchvision)."""
    if cfg.distilled or cfg.global_pool != "token":
        raise ConversionError("Only token-pooled, non-distilled models have a torchvision VisionTransformer form.")
    return _rename(sd, {ours: theirs for theirs, ours in _mapping(TORCHVISION_RENAMES, cfg.depth).items()})


def from_timm(sd: StateDict, timm_config: dict | None = None) -> tuple[StateDict, ViTConfig]:
    """A timm vision_transformer / deit checkpoint -> (state dict, config). Names already match.

    The number of heads is not in the tensors: it comes from config.json's `model_args`, else from the
    size word in the architecture name (vit_base_... -> 12), else from the width (64 per head).
    """
    timm_config = timm_config or {}
    sd = dict(sd)
    if "reg_token" in sd:
        raise ConversionError(f"It has {sd['reg_token'].shape[1]} register tokens (timm's reg_token), which vit_demo's "
                              "ViT does not implement: pick a ViT without registers.")
    if "cls_token" not in sd and "patch_embed.proj.weight" in sd:
        raise ConversionError("It has no class token (timm's class_token=False), which vit_demo's ViT needs: pick a "
                              "ViT with a class token.")
    D = sd["cls_token"].shape[-1] if "cls_token" in sd else None
    heads = (timm_config.get("model_args") or {}).get("num_heads") or _heads_from_name(timm_config.get("architecture", ""), D)
    cfg = _arch_from_shapes(sd, num_heads=heads)
    return sd, cfg


_TIMM_SIZES = {"tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L", "huge": "H"}


def _heads_from_name(arch: str, width: int | None) -> int:
    for word, variant in _TIMM_SIZES.items():
        if f"_{word}_" in f"_{arch}_" and VARIANTS[variant]["embed_dim"] == width:
            return VARIANTS[variant]["num_heads"]
    return max(1, (width or 64) // 64)


def from_torchvision(sd: StateDict) -> tuple[StateDict, ViTConfig]:
    """A torchvision VisionTransformer state dict (vit_b_16, vit_l_32, vit_h_14, ...) -> (state dict, config).

    Everything comes from the shapes; the number of heads from torchvision's published sizes.
    """
    depth = _depth(sd, r"encoder\.layers\.encoder_layer_(\d+)\.")
    sd = _rename(sd, _mapping(TORCHVISION_RENAMES, depth))
    D = sd["cls_token"].shape[-1] if "cls_token" in sd else 64
    return sd, _arch_from_shapes(sd, num_heads=TORCHVISION_HEADS.get(D, max(1, D // 64)))


def detect_format(sd: StateDict, config: dict | None) -> str:
    """Which format a checkpoint is in: "transformers", "timm" or "torchvision"."""
    config = config or {}
    if "architecture" in config or "pretrained_cfg" in config:
        return "timm"
    if any(k.startswith(("vit.", "deit.")) for k in sd):
        return "transformers"
    if "class_token" in sd and "conv_proj.weight" in sd:
        return "torchvision"
    if "cls_token" in sd and "patch_embed.proj.weight" in sd:
        return "timm"
    raise ConversionError(
        "The weights are not a ViT in any supported format (transformers ViT/DeiT, timm vision_transformer/deit, "
        "torchvision vit_*)."
    )


def convert(sd: StateDict, config: dict | None = None) -> tuple[StateDict, ViTConfig, str]:
    """Any supported checkpoint -> (our state dict, ViTConfig, format name)."""
    fmt = detect_format(sd, config)
    if fmt == "transformers":
        out, cfg = from_transformers(sd, config or {})
    elif fmt == "timm":
        out, cfg = from_timm(sd, config)
    else:
        out, cfg = from_torchvision(sd)
    return out, cfg, fmt
