"""How far each head of the bundled model looks: mean attention distance per head and layer, over
Fashion-MNIST test images, drawn as a scatter plot (Dosovitskiy et al. 2021, figure 7, right), with the share of
attention each head gives the class token beside it (the distance is measured over the patches only).

    python bench/attention_distance.py                       # 1000 images -> docs/attention-distance.png
    python bench/attention_distance.py --images 200 --out /tmp/d.png

Reads the test images from Debian's dataset-fashion-mnist package; draws with PIL only.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vit_demo import load_classifier  # noqa: E402
from vit_demo.inside import mean_attention_distance, patch_distances, prefix_share  # noqa: E402

IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
# One colour per head (Okabe-Ito, readable by colour-blind readers), repeated for models with more heads.
HEAD_COLORS = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0), (240, 228, 66), (0, 0, 0)]


def read_idx_images(path: Path, count: int) -> np.ndarray:
    """The first `count` images of a gzipped IDX file: uint8 (count, rows, cols)."""
    with gzip.open(path, "rb") as f:
        header = np.frombuffer(f.read(16), dtype=">u4")  # magic, count, rows, cols
        if header[0] != 2051:
            raise SystemExit(f"{path} is not an IDX image file (magic {header[0]}): install dataset-fashion-mnist.")
        n, rows, cols = (int(v) for v in header[1:])
        n = min(n, count)
        return np.frombuffer(f.read(n * rows * cols), dtype=np.uint8).reshape(n, rows, cols)


@torch.no_grad()
def distances(model_dir: str, images: np.ndarray, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mean attention distance and prefix share of every head (images, layers, heads) each, and what they were
    measured on."""
    clf = load_classifier(model_dir, device="cpu", dtype=torch.float32)
    cfg = clf.config
    crops = torch.stack([clf.preprocessor.crop(Image.fromarray(im)) for im in images])  # (B, C, H, W) uint8
    H, W = crops.shape[-2:]
    grid = (H // cfg.patch_size, W // cfg.patch_size)
    out, shares = [], []
    for i in range(0, len(crops), batch):
        _, attns = clf.model(clf.preprocessor.normalize(crops[i : i + batch]), return_attn=True)  # depth x (B, heads, N, N)
        out.append(mean_attention_distance(attns, cfg.num_prefix_tokens, grid, cfg.patch_size))  # (B, layers, heads)
        shares.append(prefix_share(attns, cfg.num_prefix_tokens, grid))  # (B, layers, heads)
    uniform = patch_distances(grid, cfg.patch_size).mean().item()  # uniform attention over the patches
    return torch.cat(out), torch.cat(shares), dict(crop=(H, W), grid=grid, patch_size=cfg.patch_size, uniform=uniform)


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw(table: torch.Tensor, y_max: float, y_step: float, y_label: str, title: str, uniform: float | None = None,
         s: int = 2) -> Image.Image:
    """Scatter plot: layer (x) against a per-head value (y), one dot per head; a dashed line at `uniform`.

    Drawn at s times the size and scaled down, for smooth dots and lines.
    """
    layers, heads = table.shape
    W, H = 720 * s, 400 * s
    left, right, top, bottom = 80 * s, 150 * s, 50 * s, 60 * s
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)

    def px(layer: float, value: float) -> tuple[float, float]:
        x = left + (layer - 0.5) / layers * (W - left - right)
        y = H - bottom - value / y_max * (H - top - bottom)
        return x, y

    # Axes, ticks and grid lines.
    d.rectangle([left, top, W - right, H - bottom], outline="black", width=s)
    for v in np.arange(0, y_max + 1e-9, y_step):
        _, y = px(0.5, v)
        d.line([left, y, W - right, y], fill=(225, 225, 225), width=s)
        d.line([left - 6 * s, y, left, y], fill="black", width=s)
        d.text((left - 10 * s, y), f"{v:g}", fill="black", font=font(13 * s), anchor="rm")
    for layer in range(1, layers + 1):
        x, _ = px(layer, 0)
        d.line([x, H - bottom, x, H - bottom + 6 * s], fill="black", width=s)
        d.text((x, H - bottom + 10 * s), str(layer), fill="black", font=font(13 * s), anchor="ma")
    d.text(((left + W - right) / 2, H - 22 * s), "layer", fill="black", font=font(14 * s), anchor="mm")
    label = Image.new("RGB", ((H - top - bottom), 24 * s), "white")
    ImageDraw.Draw(label).text((label.width / 2, label.height / 2), y_label, fill="black", font=font(13 * s), anchor="mm")
    img.paste(label.rotate(90, expand=True), (16 * s, top))
    d.text((W / 2, 22 * s), title, fill="black", font=font(15 * s), anchor="mm")

    if uniform is not None:  # uniform attention over the patches, for reference: dashed
        _, y = px(0, uniform)
        for x in range(left, W - right, 12 * s):
            d.line([x, y, min(x + 6 * s, W - right), y], fill=(120, 120, 120), width=2 * s)

    # One dot per head, each head a little to the side so equal values stay visible.
    r = 6 * s
    for layer in range(layers):
        for h in range(heads):
            dx = (h - (heads - 1) / 2) * 0.06
            x, y = px(layer + 1 + dx, table[layer, h].item())
            d.ellipse([x - r, y - r, x + r, y + r], fill=HEAD_COLORS[h % len(HEAD_COLORS)], outline="black", width=s)

    # Legend.
    lx, ly = W - right + 18 * s, top + 4 * s
    for h in range(heads):
        y = ly + h * 24 * s
        d.ellipse([lx, y, lx + 2 * r, y + 2 * r], fill=HEAD_COLORS[h % len(HEAD_COLORS)], outline="black", width=s)
        d.text((lx + 2 * r + 8 * s, y + r), f"head {h + 1}", fill="black", font=font(13 * s), anchor="lm")
    if uniform is not None:
        y = ly + heads * 24 * s + r
        d.line([lx, y, lx + 2 * r, y], fill=(120, 120, 120), width=2 * s)
        d.text((lx + 2 * r + 8 * s, y), "uniform over", fill="black", font=font(13 * s), anchor="lm")
        d.text((lx + 2 * r + 8 * s, y + 18 * s), "all patches", fill="black", font=font(13 * s), anchor="lm")
    return img.resize((W // s, H // s), Image.LANCZOS)


def figure(distance: torch.Tensor, share: torch.Tensor, info: dict, n: int) -> Image.Image:
    """The distance plot above the prefix-share plot."""
    y_max = float(np.ceil(max(distance.max().item(), info["uniform"]) / 5 + 0.2) * 5)
    top = draw(distance, y_max, 5, "mean attention distance (pixels)",
               f"Mean attention distance over the patches, bundled model, {n} Fashion-MNIST test images",
               uniform=info["uniform"])
    share_max = float(np.ceil(100 * share.max().item() / 10 + 0.2) * 10)
    step = 2 if share_max <= 10 else 10 if share_max <= 50 else 20
    bottom = draw(100 * share, min(100.0, share_max), step, "attention to the class token (%)",
                  "Share of each head's attention on the class token (left out of the distance)")
    out = Image.new("RGB", (top.width, top.height + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "vit_demo/weights/vit-fashion-mnist"))
    ap.add_argument("--images", type=int, default=1000, help="how many test images (from the first)")
    ap.add_argument("--out", default=str(ROOT / "docs/attention-distance.png"))
    args = ap.parse_args()

    per_image, shares, info = distances(args.model, read_idx_images(IMAGES, args.images))
    table, share = per_image.mean(0), shares.mean(0)  # (layers, heads) each
    n = len(per_image)
    print(f"mean attention distance over the patches, {n} Fashion-MNIST test images, in pixels of the "
          f"{info['crop'][0]}x{info['crop'][1]} crop ({info['grid'][0]}x{info['grid'][1]} patches of {info['patch_size']} px); "
          f"uniform over patches: {info['uniform']:.2f}")
    print("layer  mean   min    max    heads                        | class-token share per head (%)")
    for layer, (row, sh) in enumerate(zip(table, share), 1):
        heads = " ".join(f"{v:5.2f}" for v in row.tolist())
        pct = " ".join(f"{100 * v:5.1f}" for v in sh.tolist())
        print(f"{layer:5d}  {row.mean():5.2f}  {row.min():5.2f}  {row.max():5.2f}  {heads} | {pct}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(table, share, info, n).save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
