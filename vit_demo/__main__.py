"""Command line: `python -m vit_demo predict|explain|train ...`."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_MODEL = os.environ.get("VIT_DEMO_MODEL", "google/vit-base-patch16-224")


def _open(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise SystemExit(f"error: no image at {path}: check the path.")
    except (UnidentifiedImageError, OSError) as e:
        raise SystemExit(f"error: {path} could not be read as an image ({e}): use a JPEG, PNG, WebP, BMP, GIF or TIFF file.")


def predict(args) -> None:
    from . import load_classifier

    clf = load_classifier(args.model, revision=args.revision, device=args.device)
    for path in args.images:
        top = clf.predict(_open(path), k=args.top_k)
        if args.json:
            print(json.dumps([{"label": label, "score": score} for label, score in top]))
        else:
            print(path)
            for label, score in top:
                print(f"  {score:7.2%}  {label}")


def explain(args) -> None:
    from . import load_classifier

    clf = load_classifier(args.model, revision=args.revision, device=args.device)
    kwargs = dict(layer=args.layer, head=args.head, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio, alpha=args.alpha)
    clf.explain(_open(args.image), method=args.method, **kwargs).save(args.out)
    print(f"saved {args.method} map to {args.out}")


def main(argv: list[str] | None = None) -> None:
    from .explain import DEFAULT_DISCARD_RATIO, HEAD_FUSIONS, METHODS

    parser = argparse.ArgumentParser(prog="python -m vit_demo", description="Classify images with a Vision Transformer and see where it looked.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local folder or weights file (default: %(default)s)")
        p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo")
        p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")

    p = sub.add_parser("predict", help="top-k classes of each image")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help='one JSON list per image of {"label", "score"}')
    common(p)

    p = sub.add_parser("explain", help="draw where the model looked")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--method", choices=METHODS, default="rollout")
    p.add_argument("--layer", type=int, default=-1)
    p.add_argument("--head", type=int, default=None)
    p.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean")
    p.add_argument("--discard-ratio", type=float, default=DEFAULT_DISCARD_RATIO)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--out", required=True, metavar="FILE.png")
    common(p)

    sub.add_parser("train", help="train the bundled Fashion-MNIST ViT (see --help)", add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    args = parser.parse_args(argv)
    from .hub import ModelLoadError

    try:
        {"predict": predict, "explain": explain}[args.command](args)
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
