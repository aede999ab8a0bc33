"""Train vit_demo's own ViT from scratch on Fashion-MNIST: the bundled offline model.

The data come from Debian's `dataset-fashion-mnist` package (MIT licence), read straight from its gzipped
IDX files. `--val-size` training images (5,000 by default) are held out for validation; the last epoch's
weights are saved; the test set is scored once, at the end.
The result is written in the Hub layout of transformers' ViT (config.json with id2label,
model.safetensors, preprocessor_config.json, README.md), so vit_demo and transformers both load it.

    python -m vit_demo train --out vit_demo/weights/vit-fashion-mnist
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .convert import to_transformers
from .model import ViTConfig, VisionTransformer

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images, pixels scaled to [0, 1]


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.1
    random_erasing: float = 0.25
    drop_path: float = 0.1
    teacher_epochs: int = 60  # 0: no teacher, no distillation
    minutes: float = 0.0  # 0: no limit
    val_size: int = 5000  # held out from the training set for choosing settings
    subset: int = 0  # train on only this many images (0: all); for quick checks
    seed: int = 0
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_dim: int = 256
    patch_size: int = 4


# What each TrainConfig field means, for `--help`.
HELP = {
    "epochs": "passes over the training images",
    "batch_size": "images per optimiser step",
    "lr": "peak learning rate of AdamW (after warm-up, then cosine decay)",
    "weight_decay": "AdamW's decoupled weight decay",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "label_smoothing": "share of each target spread over the other classes",
    "random_erasing": "chance that a rectangle of each training image is replaced by noise (Zhong et al. 2020)",
    "drop_path": "stochastic depth: chance that the last block's branches are skipped for an image (less below)",
    "teacher_epochs": "epochs of the CNN teacher whose predictions the ViT also learns (DeiT's hard distillation); 0: none",
    "minutes": "each model (teacher, ViT) stops within about this many minutes: its epochs are cut to fit after its first (0: no limit)",
    "val_size": "training images held out to validate on (not trained on)",
    "subset": "train on only this many images (0: all); for quick checks",
    "seed": "random seed for the split, the initialisation and the augmentation",
    "embed_dim": "width of every token",
    "depth": "number of transformer blocks",
    "num_heads": "attention heads per block",
    "mlp_dim": "hidden width of each block's MLP",
    "patch_size": "side of each square patch, in pixels of the 28x28 image",
}
EXAMPLES = """examples:
  python -m vit_demo train                                  # the bundled model's recipe, into ./vit-fashion-mnist
  python -m vit_demo train --out vit_demo/weights/vit-fashion-mnist   # ... replacing the bundled model
  python -m vit_demo train --epochs 2 --teacher-epochs 0 --subset 2000 --out /tmp/quick   # a quick check
"""


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (images: 16-byte header, labels: 8-byte header) -> uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """split "train" or "t10k" -> images (N, 1, 28, 28) uint8, labels (N,) int64."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - MEAN) / STD


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (crop from a zero-padded image) and horizontal flips, per image.

    On the device of `x`; `generator` must be on that device too."""
    B, dev = x.shape[0], x.device
    padded = F.pad(x[:, 0], (2, 2, 2, 2))  # (B, 32, 32)
    dx, dy = torch.randint(0, 5, (2, B), generator=generator, device=dev)
    rows = (dy[:, None] + torch.arange(28, device=dev))[:, :, None]  # (B, 28, 1)
    cols = (dx[:, None] + torch.arange(28, device=dev))[:, None, :]  # (B, 1, 28)
    x = padded[torch.arange(B, device=dev)[:, None, None], rows, cols].unsqueeze(1)  # (B, 1, 28, 28)
    flip = torch.rand(B, generator=generator, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_erase(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020), as timm does it: with chance p, a rectangle of 2-33% of the image, of
    aspect ratio 0.3-3.3, is replaced by standard normal noise. x: normalised images (B, C, H, W)."""
    if p <= 0:
        return x
    B, _, H, W = x.shape
    dev = x.device
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=dev)  # noqa: E731
    area = (0.02 + 0.31 * rand(B)) * H * W
    ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * rand(B))
    h = (area * ratio).sqrt().round().clamp(1, H)
    w = (area / ratio).sqrt().round().clamp(1, W)
    top, left = ((H - h + 1) * rand(B)).floor(), ((W - w + 1) * rand(B)).floor()
    ys, xs = torch.arange(H, device=dev), torch.arange(W, device=dev)
    inside_y = (ys >= top[:, None]) & (ys < (top + h)[:, None])  # (B, H)
    inside_x = (xs >= left[:, None]) & (xs < (left + w)[:, None])  # (B, W)
    mask = inside_y[:, :, None] & inside_x[:, None, :] & (rand(B) < p)[:, None, None]  # (B, H, W)
    noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    return torch.where(mask[:, None], noise, x)


def model_config(tc: TrainConfig) -> ViTConfig:
    return ViTConfig(
        img_size=28,
        patch_size=tc.patch_size,
        in_chans=1,
        num_classes=len(CLASSES),
        embed_dim=tc.embed_dim,
        depth=tc.depth,
        num_heads=tc.num_heads,
        mlp_dim=tc.mlp_dim,
    )


def _drop_path(y: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth: each image's branch output is zeroed with chance `rate`, else scaled by 1 / (1 - rate)."""
    if rate <= 0:
        return y
    keep = (torch.rand(y.shape[0], 1, 1, device=y.device) >= rate).to(y.dtype) / (1 - rate)
    return y * keep


def forward_train(model: VisionTransformer, x: torch.Tensor, drop_path: float) -> torch.Tensor:
    """The model's forward pass (model.py's Block.forward, unrolled) with stochastic depth on each residual
    branch, rising linearly from 0 at the first block to `drop_path` at the last (DeiT's schedule)."""
    x = model.embed(x)
    depth = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        rate = drop_path * i / max(1, depth - 1)
        x = x + _drop_path(blk.attn(blk.norm1(x))[0], rate)
        x = x + _drop_path(blk.mlp(blk.norm2(x)), rate)
    return model.forward_head(x)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class Teacher(nn.Module):
    """The CNN teacher: a small ResNet for 28x28 grey images (stages of 64, 128 and 256 channels at 28, 14 and
    7 pixels, two residual blocks each), trained here first; the ViT then also learns its predictions."""

    def __init__(self, num_classes: int = len(CLASSES), widths: tuple[int, ...] = (64, 128, 256)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers += [_ResBlock(cin, w, 1 if i == 0 else 2), _ResBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, batch_size=1000) -> float:
    """Top-1 accuracy of `model` on uint8 images."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size]).to(device)
        correct += (model(x).float().argmax(-1).cpu() == labels[i : i + batch_size].cpu()).sum().item()
    return correct / len(images)


def _fit(model: nn.Module, loss_fn, opt: torch.optim.Optimizer, tc: TrainConfig, epochs: int, x_train, y_train,
         x_val, y_val, device: torch.device, name: str, progress: bool) -> dict:
    """The loop both models share: shuffled batches, augmentation on the device, bfloat16 autocast on a GPU,
    linear warm-up then cosine decay, gradient clipping at 1, validation after each epoch.

    `loss_fn(model, x, y) -> (loss, logits)`. With `tc.minutes`, the epochs are cut after the first one to what
    fits in that time (the schedule is then laid over the epochs that remain). Returns the history."""
    steps_per_epoch = math.ceil(len(x_train) / tc.batch_size)
    plan = {"total": epochs * steps_per_epoch, "warmup": int(tc.warmup_epochs * steps_per_epoch)}

    def lr_factor(s: int) -> float:
        warmup = min(plan["warmup"], plan["total"] // 4)
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, plan["total"] - warmup))))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator(device=device).manual_seed(tc.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = {"losses": [], "val_acc": []}
    start = time.time()
    epoch = 0
    while epoch < epochs:
        model.train()
        order = torch.randperm(len(x_train), generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{epochs}", disable=not progress)
        for step in bar:
            idx = order[step * tc.batch_size : (step + 1) * tc.batch_size]
            x = random_erase(normalize(augment(x_train[idx], gen)), tc.random_erasing, gen)
            with autocast:
                loss, _ = loss_fn(model, x, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            loss_sum += loss.detach() * len(idx)
        history["losses"].append(loss_sum.item() / len(x_train))
        with autocast:
            history["val_acc"].append(evaluate(model, x_val, y_val, device))
        epoch += 1
        if epoch == 1 and tc.minutes > 0:
            fits = max(1, int(tc.minutes * 60 / (time.time() - start)))
            if fits < epochs:
                epochs, plan["total"] = fits, fits * steps_per_epoch
        if progress:
            tqdm.write(f"{name} epoch {epoch}: train loss {history['losses'][-1]:.4f}, val acc {history['val_acc'][-1]:.4f}")
    return dict(history, epochs=epochs, seconds=time.time() - start)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "token" not in n and "pos_embed" not in n else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_teacher(tc: TrainConfig, data: tuple, device: torch.device, progress: bool = True) -> dict:
    """Trains the CNN teacher on the training images: SGD with Nesterov momentum (lr 0.1, weight decay 5e-4),
    the same augmentation, label smoothing and schedule (one warm-up epoch), `tc.teacher_epochs` epochs or what
    fits in `tc.minutes`. Returns {"model", "losses", "val_acc", "epochs", "seconds"}."""
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(tc.seed + 1)
    teacher = Teacher().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(_param_groups(teacher, 5e-4), lr=0.1, momentum=0.9, nesterov=True)

    def loss_fn(model, x, y):
        logits = model(x.contiguous(memory_format=torch.channels_last))
        return F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing), logits

    cfg = TrainConfig(**{**asdict(tc), "warmup_epochs": 1.0})
    history = _fit(teacher, loss_fn, opt, cfg, tc.teacher_epochs, x_train, y_train, x_val, y_val, device, "teacher", progress)
    return dict(model=teacher.eval(), **history)


def split_data(tc: TrainConfig, data_dir: Path, device: torch.device) -> tuple:
    """(x_train, y_train) on `device`, (x_val, y_val) on the CPU: `tc.val_size` random training images held out."""
    images, labels = load_split(data_dir, "train")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(tc.seed))
    val_idx, train_idx = perm[: tc.val_size], perm[tc.val_size :]
    if tc.subset:
        train_idx = train_idx[: tc.subset]
    return images[train_idx].to(device), labels[train_idx].to(device), images[val_idx], labels[val_idx]


def train(tc: TrainConfig, data_dir: Path = DATA_DIR, device: str | None = None, progress: bool = True,
          teacher: dict | None = None) -> dict:
    """Trains a ViT on Fashion-MNIST, after training the CNN teacher if `tc.teacher_epochs` (unless `teacher`,
    a result of `train_teacher`, is given).

    Returns:
        {"model", "config", "losses" (mean loss per epoch), "val_acc" (per epoch), "epochs", "seconds", "device",
         "teacher" (None, or train_teacher's result)}.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = split_data(tc, data_dir, device)
    if teacher is None and tc.teacher_epochs > 0:
        teacher = train_teacher(tc, data, device, progress)
    if teacher:
        teacher["model"].to(device).eval()
        if progress:
            tqdm.write(f"teacher: val acc {teacher['val_acc'][-1]:.4f}")

    torch.manual_seed(tc.seed)
    cfg = model_config(tc)
    model = VisionTransformer(cfg).to(device)
    opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr, **({"fused": True} if device.type == "cuda" else {}))

    def loss_fn(model, x, y):
        logits = forward_train(model, x, tc.drop_path).float()
        loss = F.cross_entropy(logits, y, label_smoothing=tc.label_smoothing)
        if teacher:  # DeiT's hard distillation: half the loss is against the teacher's answer for this augmented image
            with torch.no_grad():
                y_teacher = teacher["model"](x.contiguous(memory_format=torch.channels_last)).argmax(-1)
            loss = (loss + F.cross_entropy(logits, y_teacher, label_smoothing=tc.label_smoothing)) / 2
        return loss, logits

    history = _fit(model, loss_fn, opt, tc, tc.epochs, *data, device, "vit", progress)
    return dict(model=model.cpu().eval(), config=cfg, device=str(device), teacher=teacher, **history)


def save_teacher(path: Path, teacher: dict) -> None:
    torch.save({"state": teacher["model"].state_dict(), "val_acc": teacher["val_acc"], "losses": teacher["losses"],
                "epochs": teacher["epochs"], "seconds": teacher["seconds"]}, path)


def load_teacher(path: Path) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = Teacher()
    model.load_state_dict(saved.pop("state"))
    return dict(model=model.to(memory_format=torch.channels_last).eval(), **saved)


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def save_hub_folder(out: Path, model: VisionTransformer, card: str) -> None:
    """Writes `model` in the Hub layout of transformers' ViTForImageClassification."""
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in to_transformers(model.state_dict(), cfg).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": cfg.layer_norm_eps,
        "qkv_bias": cfg.qkv_bias,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "id2label": {str(i): c for i, c in enumerate(CLASSES)},
        "label2id": {c: i for i, c in enumerate(CLASSES)},
    }
    preprocessor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": cfg.img_size, "width": cfg.img_size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [MEAN],
        "image_std": [STD],
        # vit_demo: photos are made grayscale, square, and light-on-dark like the training images.
        "do_dark_background": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out / "README.md").write_text(card)


def curve_svg(result: dict, width: int = 640, height: int = 300) -> str:
    """The training curve as a standalone SVG: training loss (left axis) and validation accuracy (right axis)
    per epoch, and the teacher's validation accuracy as a dashed line where there is one."""
    losses, accs = result["losses"], result["val_acc"]
    n = len(losses)
    left, right, top, bottom = 56, 64, 20, 44
    pw, ph = width - left - right, height - top - bottom
    lo_acc = math.floor(20 * min(accs[min(2, n - 1):] + [0.9])) / 20  # accuracy axis from a round value below
    hi_loss = max(losses)
    xs = lambda i: left + (pw * i / max(1, n - 1))  # noqa: E731
    ya = lambda a: top + ph * (1 - (a - lo_acc) / (1 - lo_acc))  # noqa: E731
    yl = lambda v: top + ph * (1 - v / hi_loss)  # noqa: E731
    points = lambda f, vals: " ".join(f"{xs(i):.1f},{f(max(v, lo_acc) if f is ya else v):.1f}" for i, v in enumerate(vals))  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for k in range(5):
        a = lo_acc + (1 - lo_acc) * k / 4
        out.append(f'<text x="{width - right + 6}" y="{ya(a) + 4:.1f}" fill="#1f77b4">{100 * a:.1f}%</text>')
        out.append(f'<text x="{left - 6}" y="{yl(hi_loss * k / 4) + 4:.1f}" text-anchor="end" fill="#d62728">{hi_loss * k / 4:.2f}</text>')
    for e in range(0, n + 1, max(1, round(n / 5, -1) or 1)):
        out.append(f'<text x="{xs(max(0, e - 1)):.1f}" y="{height - bottom + 16}" text-anchor="middle">{max(1, e)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">epoch</text>')
    teacher = result.get("teacher")
    if teacher:
        y = ya(max(teacher["val_acc"][-1], lo_acc))
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#2ca02c" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{left + 6}" y="{y - 5:.1f}" fill="#2ca02c">CNN teacher, validation {100 * teacher["val_acc"][-1]:.2f}%</text>')
    out.append(f'<polyline fill="none" stroke="#d62728" stroke-width="1.5" points="{points(yl, losses)}"/>')
    out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points(ya, accs)}"/>')
    out.append(f'<text x="{left + pw - 6}" y="{top + ph - 24}" text-anchor="end" fill="#1f77b4">validation accuracy (right)</text>')
    out.append(f'<text x="{left + pw - 6}" y="{top + ph - 8}" text-anchor="end" fill="#d62728">training loss (left)</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def model_card(tc: TrainConfig, result: dict, test_acc: float, command: str, teacher_test_acc: float | None = None) -> str:
    cfg = result["config"]
    params = sum(p.numel() for p in result["model"].parameters())
    teacher = result.get("teacher")
    if teacher:
        t_params = sum(p.numel() for p in teacher["model"].parameters())
        distill = (
            f"\n- Distillation (Touvron et al. 2021, hard labels): half of each image's loss is against the label, half\n"
            f"  against the answer of a CNN teacher trained first on the same training images ({t_params:,} parameters,\n"
            f"  {teacher['epochs']} epochs, validation {100 * teacher['val_acc'][-1]:.2f}%"
            + (f", test {100 * teacher_test_acc:.2f}%" if teacher_test_acc is not None else "")
            + "). The ViT learns it through its class token: DeiT's\n"
            f"  second, distillation token is left out, so the result stays a plain ViT that transformers loads."
        )
    else:
        distill = "\n- No teacher: the labels alone."
    return f"""---
license: mit
library_name: transformers
pipeline_tag: image-classification
tags: [vit, image-classification, fashion-mnist, vit-demo]
datasets: [fashion_mnist]
metrics: [accuracy]
model-index:
- name: vit-fashion-mnist
  results:
  - task: {{type: image-classification}}
    dataset: {{name: Fashion-MNIST, type: fashion_mnist, split: test}}
    metrics:
    - {{type: accuracy, value: {test_acc:.4f}}}
---

# vit-fashion-mnist

A Vision Transformer trained from scratch on Fashion-MNIST by vit-demo's `vit_demo/train.py`: the model
the vit-demo app serves when the Hugging Face Hub cannot be reached.

- **Test accuracy (10,000 test images): {100 * test_acc:.2f}%** top-1; validation accuracy
  {100 * result['val_acc'][-1]:.2f}% after the last epoch, whose weights these are (best epoch:
  {100 * max(result['val_acc']):.2f}%), on {tc.val_size:,} images held out from the training set.
- Architecture: ViT with {cfg.patch_size}x{cfg.patch_size} patches on 28x28 grayscale images, width
  {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, MLP {cfg.mlp_dim}; {params:,} parameters.
- Training: {result['epochs']} epochs, batch {tc.batch_size}, AdamW (lr {tc.lr}, weight decay {tc.weight_decay}),
  {tc.warmup_epochs} warm-up epochs then cosine decay, label smoothing {tc.label_smoothing}, random shifts of
  up to 2 pixels, horizontal flips, random erasing (p {tc.random_erasing}), stochastic depth up to {tc.drop_path};
  seed {tc.seed}.{distill}
- Hardware and time: {hardware(result['device'])}, {(result['seconds'] + (teacher or {}).get('seconds', 0)) / 60:.1f} minutes.
- Command: `{command}`

![Training loss and validation accuracy per epoch](training_curve.svg)

## Data

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017), Zalando's 70,000 28x28 grayscale images of 10 kinds of
clothing, MIT licence, as packaged by Debian (`dataset-fashion-mnist`).

## Use

```python
from vit_demo import load_classifier
clf = load_classifier("vit_demo/weights/vit-fashion-mnist")
clf.predict(image, k=3)
```

It also loads in transformers as `ViTForImageClassification.from_pretrained(folder)`. Photos are turned into
what it was trained on: grayscale, square, the object light on a dark background, 28x28.

Labels: {", ".join(f"{i} {c}" for i, c in enumerate(CLASSES))}.
"""


def check(tc: TrainConfig) -> str | None:
    """Why `tc` cannot be trained, in one sentence; None if it can."""
    whole = {"epochs": 0, "teacher_epochs": 0, "batch_size": 1, "val_size": 1, "subset": 0, "embed_dim": 1, "depth": 1,
             "num_heads": 1, "mlp_dim": 1, "patch_size": 1}
    for name, low in whole.items():
        if getattr(tc, name) < low:
            return f"--{name.replace('_', '-')} must be at least {low}, not {getattr(tc, name)}."
    shares = {"random_erasing": (0, 1), "label_smoothing": (0, 0.99), "drop_path": (0, 0.99)}
    for name, (low, high) in shares.items():
        if not low <= getattr(tc, name) <= high:
            return f"--{name.replace('_', '-')} must be from {low} to {high}, not {getattr(tc, name)}."
    for name in ("lr", "weight_decay", "warmup_epochs", "minutes"):
        value = getattr(tc, name)
        if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
            return f"--{name.replace('_', '-')} must be a {'positive' if name == 'lr' else 'non-negative'} number, not {value}."
    if tc.embed_dim % tc.num_heads:
        return f"--embed-dim ({tc.embed_dim}) must be a multiple of --num-heads ({tc.num_heads})."
    if 28 % tc.patch_size:
        return f"--patch-size must divide the 28-pixel side (1, 2, 4, 7, 14 or 28), not {tc.patch_size}."
    if tc.val_size >= 60_000:
        return f"--val-size must leave training images out of the 60,000, not {tc.val_size}."
    return None


def main(argv: list[str] | None = None) -> None:
    installed = Path(__import__("sys").argv[0]).stem == "vit-demo"  # the installed script, not python -m vit_demo
    p = argparse.ArgumentParser(prog="vit-demo train" if installed else "python -m vit_demo train", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=f"{HELP[name]} (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder of Fashion-MNIST's gzipped IDX files (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("vit-fashion-mnist"),
                   help="folder to write the model to, laid out like a Hub repo (default: %(default)s in the current "
                        "folder; the bundled model is replaced only with --out vit_demo/weights/vit-fashion-mnist)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--teacher", type=Path, default=None, metavar="FILE",
                   help="use the CNN teacher saved in FILE by --save-teacher instead of training one")
    p.add_argument("--save-teacher", type=Path, default=None, metavar="FILE",
                   help="save the CNN teacher to FILE (with --epochs 0: train the teacher alone)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the folder to this Hub repo")
    args = p.parse_args(argv)
    tc = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    why = check(tc)
    if why:
        p.error(why)
    if args.device is not None:
        try:
            torch.empty(1, device=args.device)
        except (RuntimeError, ValueError) as e:
            p.error(f"--device {args.device} cannot be used here ({str(e).splitlines()[0][:80]}): leave it out for the best available.")
    for path in (args.out if tc.epochs else None, args.save_teacher):
        if path is None:
            continue
        target = path if path == args.out else path.parent
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"{target} cannot be written to ({e.strerror}): give another path.")
    if not (args.data_dir / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"Fashion-MNIST was not found in {args.data_dir}: install Debian's dataset-fashion-mnist or pass --data-dir.")
    test_x, test_y = load_split(args.data_dir, "t10k")
    if tc.epochs == 0:  # the teacher alone
        if not (args.save_teacher and tc.teacher_epochs > 0):
            raise SystemExit("--epochs 0 trains the teacher alone: give --teacher-epochs and --save-teacher FILE.")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        teacher = train_teacher(tc, split_data(tc, args.data_dir, device), device)
        save_teacher(args.save_teacher, teacher)
        print(f"teacher test accuracy: {evaluate(teacher['model'], test_x, test_y, device):.4f}; saved to {args.save_teacher}")
        return
    teacher = None
    if args.teacher:
        try:
            teacher = load_teacher(args.teacher)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same sentence
            raise SystemExit(f"{args.teacher} is not a teacher saved by --save-teacher ({type(e).__name__}): "
                             "train one with --epochs 0 --save-teacher FILE, or leave --teacher out.") from None
    result = train(tc, args.data_dir, args.device, teacher=teacher)
    if args.save_teacher and result["teacher"]:
        save_teacher(args.save_teacher, result["teacher"])
    test_acc = evaluate(result["model"], test_x, test_y, "cpu")
    teacher_acc = evaluate(result["teacher"]["model"], test_x, test_y, result["device"]) if result["teacher"] else None
    print(f"test accuracy: {test_acc:.4f} ({result['seconds'] / 60:.1f} min on {hardware(result['device'])})"
          + (f"; the teacher's: {teacher_acc:.4f}" if teacher_acc is not None else ""))
    command = "python -m vit_demo train " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    save_hub_folder(args.out, result["model"], model_card(tc, result, test_acc, command.strip(), teacher_acc))
    (args.out / "training_curve.svg").write_text(curve_svg(result))
    (args.out / "training_history.json").write_text(json.dumps(
        {"epochs": result["epochs"], "train_loss": result["losses"], "val_acc": result["val_acc"], "test_acc": test_acc,
         "teacher": {k: v for k, v in result["teacher"].items() if k != "model"} if result["teacher"] else None,
         "teacher_test_acc": teacher_acc,
         "seconds": result["seconds"], "device": hardware(result["device"]), "config": asdict(tc)}, indent=1) + "\n")
    print(f"saved to {args.out}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=str(args.out), repo_id=args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")


if __name__ == "__main__":
    main()
