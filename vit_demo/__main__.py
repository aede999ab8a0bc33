"""Command line: `python -m vit_demo predict|explain|train ...`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .registry import default_model

DEFAULT_MODEL = default_model()

EXAMPLES = """\
examples:
  python -m vit_demo predict examples/chelsea.jpg --top-k 3
  python -m vit_demo predict examples/*.jpg --model timm/deit_tiny_patch16_224.fb_in1k --json
  python -m vit_demo explain examples/chelsea.jpg --method rollout --out rollout.png
  python -m vit_demo explain examples/chelsea.jpg --method relevance --target "tiger cat" --faithfulness
  python -m vit_demo explain examples/chelsea.jpg --method attention --layer 12 --head 3 --out head3.png
  python -m vit_demo train --help
"""

EXPLAIN_EXAMPLES = """\
methods:
{methods}

Layers and heads count from 1, as on the page. Options that a method does not read are ignored.
--faithfulness scores the map by deletion and insertion (Petsiuk et al. 2018): patches are removed (or
put back into a blurred copy) most relevant first, and the area under the target's probability curve is
printed beside that of a random patch order. Lower deletion and higher insertion AUCs are better.

examples:
  python -m vit_demo explain examples/chelsea.jpg --method rollout --out rollout.png
  python -m vit_demo explain examples/chelsea.jpg --method relevance --target "tiger cat" --faithfulness
  python -m vit_demo explain examples/chelsea.jpg --method attention --layer 12 --head 3 --out head3.png
  python -m vit_demo explain examples/fashion-mnist-sneaker-9.png --model vit_demo/weights/vit-fashion-mnist \
      --method gradient_rollout --target Sandal --out why-not-sandal.png
"""


def fail(message: str):
    """Ends the command with one sentence on stderr, no traceback."""
    raise SystemExit(f"error: {message}")


def _open(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        fail(f"no image at {path}: check the path.")
    except (UnidentifiedImageError, OSError) as e:
        fail(f"{path} could not be read as an image ({e}): use a JPEG, PNG, WebP, BMP, GIF or TIFF file.")


def _check_out(out: str) -> None:
    """The folder must exist and the name must end in an extension PIL can write."""
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        fail(f"the folder {os.path.dirname(out) or folder} does not exist: create it or give --out a path in an existing folder.")
    ext = os.path.splitext(out)[1].lower()
    Image.init()
    if not ext:
        fail(f"--out {out} has no image extension: end it in .png, .jpg or .webp.")
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        fail(f"--out {out} does not end in an image extension that can be written: end it in .png, .jpg or .webp.")


def _load(args):
    from . import load_classifier
    from .hub import ModelLoadError

    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            fail(f"--device {args.device} is not a device: use cpu, cuda or mps.")
        if device.type == "cuda" and not torch.cuda.is_available():
            fail("--device cuda was asked for, but no CUDA GPU is available: leave --device out or use cpu.")
    try:
        return load_classifier(args.model, revision=args.revision, device=args.device)
    except ModelLoadError as e:
        fail(str(e) + _offline_hint(str(e)))


def _offline_hint(message: str) -> str:
    """Where the Hub is out of reach, the bundled model that works without it."""
    from .registry import BUNDLED, bundled_available

    if not bundled_available() or not ("could not be reached" in message or "HF_HUB_OFFLINE" in message):
        return ""
    where = os.path.relpath(BUNDLED) if BUNDLED.startswith(os.getcwd() + os.sep) else BUNDLED
    return f" Without the Hub, the bundled Fashion-MNIST model works: --model {where}"


def predict(args) -> None:
    if args.top_k < 1:
        fail(f"--top-k must be at least 1, not {args.top_k}.")
    images = [_open(path) for path in args.images]
    clf = _load(args)
    for path, image in zip(args.images, images):
        top = clf.predict(image, k=args.top_k)
        if args.json:
            print(json.dumps([{"label": label, "score": score} for label, score in top]))
        else:
            print(path)
            for label, score in top:
                print(f"  {score:7.2%}  {label}")


def explain(args) -> None:
    from .explain import CLASS_SPECIFIC, draw

    if args.out is None and not args.faithfulness:
        fail("nothing to do: give --out FILE.png to save the map, --faithfulness to score it, or both.")
    if args.faithfulness and args.method == "heads":
        fail("--faithfulness scores one map, and heads draws one per head: use --method attention with --head N.")
    if args.out is not None:
        _check_out(args.out)
    for name in ("layer", "head", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name} counts from 1, so {value} is out of range: give 1 or more.")
    if not 0 <= args.alpha <= 1:
        fail(f"--alpha must be between 0 and 1, not {args.alpha}.")
    if not 0 <= args.discard_ratio < 1:
        fail(f"--discard-ratio must be at least 0 and below 1, not {args.discard_ratio}.")
    image = _open(args.image)
    clf = _load(args)
    depth, heads = clf.config.depth, clf.config.num_heads
    if args.layer is not None and args.layer > depth:
        fail(f"--layer {args.layer} is out of range: this model has {depth} layers, counted from 1.")
    if args.head is not None and args.head > heads:
        fail(f"--head {args.head} is out of range: this model has {heads} heads per layer, counted from 1.")
    options = dict(
        layer=-1 if args.layer is None else args.layer - 1,  # the page and the command line count from 1, Python from 0
        head=None if args.head is None else args.head - 1,
        head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio,
    )
    try:
        crop, grid_map, target, logits = clf.maps(image, args.method, args.target, **options)
        if args.steps is not None and args.steps > grid_map.numel():
            fail(f"--steps {args.steps} is more than the {grid_map.numel()} patches of this model's grid: give at most that.")
        probability = float(logits.float().softmax(-1)[target])
        about = f"{clf.labels[target]!r} ({probability:.2%})"
        print(f"{args.method} map of the class {about}" if args.method in CLASS_SPECIFIC
              else f"{args.method} map (the same for every class); top class {about}")
        if args.out is not None:
            try:
                draw(crop, grid_map, args.alpha).save(args.out)
            except OSError as e:
                fail(f"{args.out} could not be written ({e}): choose another path.")
            print(f"saved to {args.out}")
        if args.faithfulness:
            r = clf.faithfulness(image, args.method, target, steps=args.steps, progress=_progress(), **options)
            rnd = r["random"]
            print(f"deletion AUC  {r['deletion_auc']:.3f}  (random order {rnd['deletion_auc']:.3f}; lower is better)")
            print(f"insertion AUC {r['insertion_auc']:.3f}  (random order {rnd['insertion_auc']:.3f}; higher is better)")
            print(f"{r['steps']} steps over {grid_map.numel()} patches, {r['forward_passes']} forward passes")
    except ValueError as e:
        fail(str(e))


def _progress():
    """A progress line on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        print(f"\rscoring: {done}/{total} forward passes", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


def _prog() -> str:
    """How the command was typed: `vit-demo` (the installed script) or `python -m vit_demo`."""
    return "vit-demo" if os.path.basename(sys.argv[0]) in ("vit-demo", "vit-demo.exe") else "python -m vit_demo"


def build_parser() -> argparse.ArgumentParser:
    """The parser of `predict` and `explain` (`train` has its own, in vit_demo.train)."""
    from .explain import DEFAULT_DISCARD_RATIO, DESCRIPTIONS, HEAD_FUSIONS, METHODS

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=_prog(), formatter_class=raw, epilog=EXAMPLES,
        description="Classify images with a Vision Transformer, see where it looked and why it chose a class.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{predict,explain,train}")

    def common(p):
        p.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local folder or weights file (default: %(default)s)")
        p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo (default: main)")
        p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")

    p = sub.add_parser("predict", help="top-k classes of each image", formatter_class=raw, epilog=EXAMPLES,
                       description="Print the top-k classes of each image, best first.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="how many classes to print per image, 1 or more (default: %(default)s)")
    p.add_argument("--json", action="store_true", help='print one JSON list per image of {"label", "score"} instead of a table')
    common(p)

    methods = "\n".join(f"  {m:<17} {DESCRIPTIONS[m]}" for m in METHODS)
    p = sub.add_parser("explain", help="draw where the model looked, or why it chose a class, and score the map",
                       formatter_class=raw, epilog=EXPLAIN_EXAMPLES.format(methods=methods),
                       description="Draw a map over the crop the model saw, and optionally score how faithful it is.")
    p.add_argument("image", metavar="IMAGE", help="the image file to explain")
    p.add_argument("--method", choices=METHODS, default="rollout", help="how the map is made (see below; default: %(default)s)")
    p.add_argument("--target", default=None, metavar="LABEL",
                   help="the class to explain, as the model spells it (predict shows them) or its index; default: the top class")
    p.add_argument("--layer", type=int, default=None, metavar="L", help="attention, heads: the layer, from 1 (default: the last)")
    p.add_argument("--head", type=int, default=None, metavar="H", help="attention: one head, from 1 (default: the mean of all heads)")
    p.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean", help="rollout: how heads are fused (default: %(default)s)")
    p.add_argument("--discard-ratio", type=float, default=DEFAULT_DISCARD_RATIO, metavar="R",
                   help="rollout, gradient_rollout: share of the weakest attention dropped per layer, in [0, 1) (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.6, metavar="A", help="opacity of the map over the crop, 0 to 1 (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="FILE.png", help="where to save the drawn map (.png, .jpg, .webp ...)")
    p.add_argument("--faithfulness", action="store_true", help="print the map's deletion and insertion AUCs and a random order's")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="faithfulness: steps per curve, each changing about 1/N of the patches (default: one patch per step up to 49 patches, else 10 steps)")
    common(p)

    sub.add_parser("train", help="train the bundled Fashion-MNIST ViT (see train --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    {"predict": predict, "explain": explain}[args.command](args)


if __name__ == "__main__":
    main()
