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
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .convert import to_transformers
from .model import ViTConfig, VisionTransformer

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images, pixels scaled to [0, 1]


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
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
  python -m vit_demo train --epochs 2 --subset 2000 --out /tmp/quick   # a quick check
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
    """Random shifts of up to 2 pixels (crop from a zero-padded image) and horizontal flips, per image."""
    B = x.shape[0]
    padded = F.pad(x[:, 0], (2, 2, 2, 2))  # (B, 32, 32)
    dx, dy = torch.randint(0, 5, (2, B), generator=generator)
    rows = (dy[:, None] + torch.arange(28))[:, :, None]  # (B, 28, 1)
    cols = (dx[:, None] + torch.arange(28))[:, None, :]  # (B, 1, 28)
    x = padded[torch.arange(B)[:, None, None], rows, cols].unsqueeze(1)  # (B, 1, 28, 28)
    flip = torch.rand(B, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


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


@torch.inference_mode()
def evaluate(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, device, batch_size=1000) -> float:
    """Top-1 accuracy of `model` on uint8 images."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size]).to(device)
        correct += (model(x).argmax(-1).cpu() == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def train(tc: TrainConfig, data_dir: Path = DATA_DIR, device: str | None = None, progress: bool = True) -> dict:
    """Trains a ViT on Fashion-MNIST.

    Returns:
        {"model", "config", "losses" (mean loss per epoch), "val_acc" (per epoch), "seconds", "device"}.
    """
    torch.manual_seed(tc.seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = load_split(data_dir, "train")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(tc.seed))
    val_idx, train_idx = perm[: tc.val_size], perm[tc.val_size :]
    if tc.subset:
        train_idx = train_idx[: tc.subset]
    x_val, y_val = images[val_idx], labels[val_idx]
    x_train, y_train = images[train_idx].to(device), labels[train_idx].to(device)

    cfg = model_config(tc)
    model = VisionTransformer(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "token" not in n and "pos_embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr
    )
    steps_per_epoch = math.ceil(len(x_train) / tc.batch_size)
    total, warmup = tc.epochs * steps_per_epoch, int(tc.warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    gen = torch.Generator(device="cpu").manual_seed(tc.seed)
    history = {"losses": [], "val_acc": []}
    start = time.time()
    for epoch in range(tc.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen).to(device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress)
        loss_sum = correct = seen = 0
        for step in bar:
            idx = order[step * tc.batch_size : (step + 1) * tc.batch_size]
            x = normalize(augment(x_train[idx].cpu(), gen).to(device))
            y = y_train[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=tc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        history["losses"].append(loss_sum / seen)
        history["val_acc"].append(evaluate(model, x_val, y_val, device))
        if progress:
            tqdm.write(f"epoch {epoch + 1}: train loss {history['losses'][-1]:.4f}, val acc {history['val_acc'][-1]:.4f}")
    return dict(model=model.cpu().eval(), config=cfg, seconds=time.time() - start, device=str(device), **history)


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


def model_card(tc: TrainConfig, result: dict, test_acc: float, command: str) -> str:
    cfg = result["config"]
    params = sum(p.numel() for p in result["model"].parameters())
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
- Training: {tc.epochs} epochs, batch {tc.batch_size}, AdamW (lr {tc.lr}, weight decay {tc.weight_decay}),
  {tc.warmup_epochs} warm-up epoch then cosine decay, label smoothing {tc.label_smoothing}, random shifts of
  up to 2 pixels and horizontal flips; seed {tc.seed}.
- Hardware and time: {hardware(result['device'])}, {result['seconds'] / 60:.1f} minutes.
- Command: `{command}`

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
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the folder to this Hub repo")
    args = p.parse_args(argv)
    tc = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    if not (args.data_dir / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"Fashion-MNIST was not found in {args.data_dir}: install Debian's dataset-fashion-mnist or pass --data-dir.")
    result = train(tc, args.data_dir, args.device)
    test_x, test_y = load_split(args.data_dir, "t10k")
    test_acc = evaluate(result["model"], test_x, test_y, "cpu")
    print(f"test accuracy: {test_acc:.4f} ({result['seconds'] / 60:.1f} min on {hardware(result['device'])})")
    command = "python -m vit_demo train " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    save_hub_folder(args.out, result["model"], model_card(tc, result, test_acc, command.strip()))
    print(f"saved to {args.out}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=str(args.out), repo_id=args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")


if __name__ == "__main__":
    main()
