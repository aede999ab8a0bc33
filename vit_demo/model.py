"""The Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), from scratch.

Read it next to the paper: an image is cut into patches, each patch becomes a token, a class token
(and, for distilled DeiT, a distillation token) is prepended, learned position embeddings are added,
and a stack of pre-norm transformer blocks mixes the tokens. The class token's final state is the
image's representation.

Parameter names are timm's (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.attn.qkv`, ...):
they are a compatibility contract, so timm checkpoints load strictly with no renaming, and every
other format is converted into them by `vit_demo.convert`. This file does no I/O.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The standard sizes (Dosovitskiy et al. table 1; Touvron et al. for tiny/small), by name.
VARIANTS = {
    "Ti": dict(embed_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "M": dict(embed_dim=512, depth=12, num_heads=8, mlp_dim=2048),
    "B": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120),
}


@dataclass
class ViTConfig:
    img_size: int = 224  # side of the square input the position embeddings were learned for
    patch_size: int = 16  # side of each square patch; the grid is img_size // patch_size per side
    in_chans: int = 3  # 3 for RGB, 1 for grayscale
    num_classes: int = 1000  # rows of the classification head
    embed_dim: int = 768  # width of every token
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads per block; embed_dim must divide evenly
    mlp_dim: int = 3072  # hidden width of each block's MLP
    qkv_bias: bool = True  # whether the q/k/v projection has a bias
    layer_norm_eps: float = 1e-6  # timm/torchvision use 1e-6, transformers' configs 1e-12
    gelu_approximate: str = "none"  # "none" (exact erf GELU) or "tanh"
    distilled: bool = False  # DeiT: a second prefix token and head, averaged at inference
    global_pool: str = "token"  # "token": class token's state; "avg": mean of the patch tokens
    # How position embeddings are resized for other input sizes: timm resamples with antialiasing,
    # transformers without (for upsampling the two use different bicubic kernels).
    pos_embed_antialias: bool = True

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


# --- balanced gradients (Mehri et al. 2025, "LibraGrad") --------------------------------------------------------
# A forward mode for explanations. The values are the usual ones, to the bit; only the backward pass changes:
# LayerNorm divides by its standard deviation as a constant, the softmax weights are constants (relevance flows
# through the values only), and GELU's gate u -> GELU(u)/u is a constant. The network is then linear in its input
# and its biases together, so input x gradient plus bias x gradient adds up to the logit. Off unless explanation
# code turns it on with `balanced_gradients()`; per thread (a context variable), so a concurrent plain pass is
# untouched.
_BALANCED: contextvars.ContextVar = contextvars.ContextVar("balanced_gradients", default=None)


@contextlib.contextmanager
def balanced_gradients(taps: list | None = None):
    """Runs the forward passes inside it in balanced-gradient mode.

    Args:
        taps: if a list, each block's input and each per-token bias are recorded in it as (probe, value): `probe`
            is a zero tensor added to the activation (so the value is unchanged) whose gradient is the gradient
            there, `value` the block input or the bias (broadcast over tokens). Needs autograd on.
    """
    token = _BALANCED.set(() if taps is None else taps)
    try:
        yield taps
    finally:
        _BALANCED.reset(token)


def _swap_backward(value: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass (exactly: value + 0), `backward`'s gradient in the backward pass."""
    return value.detach() + (backward - backward.detach())


def _tap(x: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
    """In balanced mode with taps, records x's gradient point; `value` defaults to x itself (a block input)."""
    taps = _BALANCED.get()
    if not isinstance(taps, list) or not torch.is_grad_enabled():
        return x
    probe = torch.zeros_like(x, requires_grad=True)
    taps.append((probe, x.detach() if value is None else value.detach()))
    return x + probe


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm; with balanced gradients, the standard deviation is a constant to the gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if _BALANCED.get() is None or not torch.is_grad_enabled():
            return y
        mean = x.mean(-1, keepdim=True)
        sd = ((x - mean).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        z = (x - mean) / sd.detach() * self.weight + self.bias
        return _tap(_swap_backward(y, z), self.bias)


class GELU(nn.GELU):
    """nn.GELU; with balanced gradients, u * gate(u) with the gate gate(u) = GELU(u)/u a constant."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        y = super().forward(u)
        if _BALANCED.get() is None or not torch.is_grad_enabled():
            return y
        if self.approximate == "tanh":
            gate = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u.pow(3))))
        else:
            gate = 0.5 * (1 + torch.erf(u / math.sqrt(2)))  # GELU(u)/u is the normal CDF
        return _swap_backward(y, u * gate.detach())


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x), its bias recorded as a per-token tap in balanced mode."""
    y = layer(x)
    return y if layer.bias is None else _tap(y, layer.bias)


class PatchEmbed(nn.Module):
    """Cuts the image into non-overlapping patches and projects each to a token (a strided conv)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        assert cfg.embed_dim % cfg.num_heads == 0, "embed_dim must be divisible by num_heads"
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        B, N, C = x.shape
        qkv = _linear(self.qkv, x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        balanced = _BALANCED.get() is not None and torch.is_grad_enabled()
        if return_attn:
            # The explicit path: the same math, with the probabilities kept for explanations.
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            attn = attn.float().softmax(dim=-1)  # float32 even in a bfloat16 model, so the maps stay exact
            if balanced:  # the weights are constants: a leaf of their own, so their gradient can still be read
                attn = attn.detach().requires_grad_(True)
            x = attn.to(v.dtype) @ v  # (B, heads, N, head_dim)
        else:
            attn = None
            if balanced:
                q, k = q.detach(), k.detach()
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return _linear(self.proj, x), attn


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.act = GELU(approximate=cfg.gelu_approximate)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.fc2, self.act(_linear(self.fc1, x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        x = _tap(x)  # the block's input, for input x gradient in balanced mode
        y, attn = self.attn(self.norm1(x), return_attn)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix: int, antialias: bool = True) -> torch.Tensor:
    """Resizes the patch part of learned position embeddings to another grid, bicubically.

    Args:
        pos_embed: (1, num_prefix + gh * gw, C), the grid square.
        new_grid: (new_gh, new_gw).
        num_prefix: leading class/distillation positions, kept as they are.
        antialias: F.interpolate's antialias (timm: True; transformers: False).
    Returns:
        (1, num_prefix + new_gh * new_gw, C).
    """
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(math.sqrt(grid.shape[1]))
    if (old, old) == tuple(new_grid):
        return pos_embed
    C = grid.shape[-1]
    grid = grid.reshape(1, old, old, C).permute(0, 3, 1, 2)  # (1, C, gh, gw)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", antialias=antialias, align_corners=False)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, C)  # (1, new_gh * new_gw, C)
    return torch.cat([prefix, grid], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + cfg.grid_size**2, D))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        # timm's naming: the final LayerNorm is `norm` for token pooling and `fc_norm` after avg pooling.
        avg = cfg.global_pool == "avg"
        self.norm = nn.Identity() if avg else LayerNorm(D, eps=cfg.layer_norm_eps)
        self.fc_norm = LayerNorm(D, eps=cfg.layer_norm_eps) if avg else nn.Identity()
        self.head = nn.Linear(D, cfg.num_classes)
        self.head_dist = nn.Linear(D, cfg.num_classes) if cfg.distilled else None
        self.init_weights()

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm and the head, applied to the tokens the head reads (`readout_tokens`).

        Args:
            x: (B, prefix + N, C), the tokens after the last block (or after any block, to read out early).
        Returns:
            logits (B, num_classes).
        """
        x = self.norm(x)
        if self.cfg.global_pool == "avg":
            logits = self.head(self.fc_norm(x[:, self.cfg.num_prefix_tokens :].mean(dim=1)))
        elif self.head_dist is not None:
            # DeiT distilled: the class head and the distillation head, averaged.
            logits = (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        else:
            logits = self.head(x[:, 0])
        return logits

    def readout_tokens(self, num_tokens: int) -> list[int]:
        """The tokens whose final states the head reads, for an input of `num_tokens` tokens (prefix included).

        - A class-token model reads token 0.
        - A distilled DeiT averages a head on the class token and a head on the distillation token: 0 and 1.
        - An average-pooled model reads the mean of the patch tokens.
        Maps of the class-agnostic and class-specific methods alike average these tokens' rows.
        """
        if self.cfg.global_pool == "avg":
            return list(range(self.cfg.num_prefix_tokens, num_tokens))
        return [0, 1] if self.cfg.distilled else [0]

    def init_weights(self) -> None:
        """ViT's initialisation: truncated normal (std 0.02) for tokens, embeddings and linears."""
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> tokens (B, prefix + N, C) with position embeddings added."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        x = self.patch_embed(x)  # (B, N, C)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat(prefix + [x], dim=1)  # (B, prefix + N, C)
        pos = resample_pos_embed(self.pos_embed, (H // p, W // p), self.cfg.num_prefix_tokens, self.cfg.pos_embed_antialias)
        return x + pos

    def forward(self, x: torch.Tensor, return_attn: bool = False, return_tokens: bool = False):
        """Classifies a batch of images.

        Args:
            x: (B, in_chans, H, W), normalised as the checkpoint expects. H and W need not be
               img_size: the position embeddings are resampled to the new grid.
            return_attn: also return every layer's attention probabilities.
            return_tokens: also return the tokens after the embedding and after every block.
        Returns:
            logits (B, num_classes), or (logits, attns) where attns is a list of depth tensors
            (B, heads, prefix + N, prefix + N) whose rows sum to 1; with return_tokens, the tuple ends
            with tokens, a list of depth + 1 tensors (B, prefix + N, C): tokens[0] is the embedding's
            output, tokens[i] block i's, before the final LayerNorm.
        """
        x = self.embed(x)
        attns, tokens = [], [x] if return_tokens else None
        for blk in self.blocks:
            x, attn = blk(x, return_attn)
            attns.append(attn)
            if return_tokens:
                tokens.append(x)
        logits = self.forward_head(x)
        if return_tokens:
            return (logits, attns, tokens) if return_attn else (logits, tokens)
        return (logits, attns) if return_attn else logits
