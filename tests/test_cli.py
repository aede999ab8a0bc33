"""The command line, as a user runs it: `python -m vit_demo predict|explain`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXAMPLES, ROOT, lay_out_hub_cache, make_transformers
from vit_demo import load_classifier


def run(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vit_demo", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_predict_json_from_hub_cache(tmp_path):
    ref = make_transformers(tmp_path / "ckpt", "small", id2label={i: f"thing {i}" for i in range(10)})
    hf_home = tmp_path / "hf_home"
    lay_out_hub_cache(hf_home, "someone/tiny-vit", ref.path)
    photos = [str(EXAMPLES / "chelsea.jpg"), str(EXAMPLES / "coffee.jpg")]
    out = run("predict", *photos, "--model", "someone/tiny-vit", "--top-k", "4", "--json", env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    clf = load_classifier(ref.path, device="cpu")
    for line, photo in zip(lines, photos):
        top = json.loads(line)
        assert [set(t) for t in top] == [{"label", "score"}] * 4
        expected = clf.predict(Image.open(photo), k=4)
        assert [t["label"] for t in top] == [label for label, _ in expected]
        assert all(abs(t["score"] - s) < 1e-5 for t, (_, s) in zip(top, expected))


def test_explain_writes_a_png(tmp_path):
    ref = make_transformers(tmp_path / "ckpt", "small")
    out_png = tmp_path / "map.png"
    out = run("explain", str(EXAMPLES / "astronaut.jpg"), "--model", str(ref.path), "--method", "rollout", "--out", str(out_png))
    assert out.returncode == 0, out.stderr
    assert Image.open(out_png).size == (32, 32)


def test_errors_are_one_line_without_traceback(tmp_path):
    out = run("predict", str(EXAMPLES / "chelsea.jpg"), "--model", str(tmp_path / "missing-dir" / "x"))
    assert out.returncode != 0
    assert out.stderr.strip().startswith("error: No file or folder") and "Traceback" not in out.stderr
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    ref = make_transformers(tmp_path / "ckpt", "small")
    out = run("predict", str(bad), "--model", str(ref.path))
    assert out.returncode != 0 and "could not be read as an image" in out.stderr and "Traceback" not in out.stderr


# --- explain: 1-based layers and heads, class-specific maps, faithfulness, one-sentence errors ----------------------
# One run of each kind as a user runs it (a subprocess); the other cases in this process, through main().

BUNDLED = ROOT / "vit_demo" / "weights" / "vit-fashion-mnist"
SNEAKER = EXAMPLES / "fashion-mnist-sneaker-9.png"
ON_BUNDLED = ("--model", str(BUNDLED), "--device", "cpu")


def cli(*args) -> str | int | None:
    """`python -m vit_demo ARGS` in this process: None when it succeeds, else what it exits with."""
    from vit_demo.__main__ import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return None


def is_error(code, *fragments) -> bool:
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    for f in fragments:
        assert f in code, (f, code)
    return True


@pytest.fixture
def float32(monkeypatch):
    monkeypatch.setenv("VIT_DEMO_PRECISION", "float32")


def test_explain_layers_and_heads_count_from_1(tmp_path, float32):
    from vit_demo import explain as ex

    clf = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)
    crop = clf.crop(Image.open(SNEAKER))
    with torch.no_grad():
        _, attns = clf.model(clf.preprocessor.normalize(crop), return_attn=True)  # (1, heads, 50, 50) per layer
    for layer, head in ((1, 2), (6, 4)):
        out_png = tmp_path / f"l{layer}h{head}.png"
        assert cli("explain", SNEAKER, *ON_BUNDLED, "--method", "attention", "--layer", layer, "--head", head, "--alpha", 1, "--out", out_png) is None
        expected = ex.overlay(crop, attns[layer - 1][0, head - 1, 0, 1:].reshape(7, 7), alpha=1.0)  # layer L, head H: index L-1, H-1
        assert np.array_equal(np.asarray(Image.open(out_png)), np.asarray(expected)), (layer, head)
    # The last layer is the default.
    assert cli("explain", SNEAKER, *ON_BUNDLED, "--method", "attention", "--alpha", 1, "--out", tmp_path / "default.png") is None
    assert np.array_equal(np.asarray(Image.open(tmp_path / "default.png")),
                          np.asarray(ex.overlay(crop, attns[-1][0, :, 0, 1:].mean(0).reshape(7, 7), alpha=1.0)))
    out = run("explain", SNEAKER, *ON_BUNDLED, "--method", "attention", "--layer", "7", "--out", tmp_path / "x.png")
    assert out.returncode == 1 and out.stderr == "error: --layer 7 is out of range: this model has 6 layers, counted from 1.\n"
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--method", "attention", "--head", 5, "--out", tmp_path / "x.png"), "--head 5", "4 heads", "from 1")
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--layer", 0, "--out", tmp_path / "x.png"), "--layer", "from 1")
    assert not (tmp_path / "x.png").exists()


def test_the_head_grid_shares_one_colour_scale_like_the_page(tmp_path, float32):
    """Each panel of `explain --method heads` is coloured as the page colours it (ui.figures: one scale from the
    lowest to the highest value of all heads), not stretched over its own range."""
    from vit_demo.ui.figures import shade

    clf = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)
    image = Image.open(SNEAKER)
    crop, heads, _, _ = clf.maps(image, "heads", layer=1)  # (4, 7, 7): layer 2's heads
    assert cli("explain", SNEAKER, *ON_BUNDLED, "--method", "heads", "--layer", 2, "--alpha", 1, "--out", tmp_path / "h.png") is None
    sheet = np.asarray(Image.open(tmp_path / "h.png"), dtype=int)
    low, high = float(heads.min()), float(heads.max())
    spreads = [float(m.max() - m.min()) / (high - low) for m in heads]
    assert min(spreads) < 0.9, f"every head spans the whole scale ({spreads}): the test could not tell the scales apart"
    side, gap = crop.shape[-1], 4  # explain.tile: panels side by side, 2 per row for 4 heads, 4-pixel white gaps
    for i, m in enumerate(heads):
        r, c = divmod(i, 2)
        panel = sheet[r * (side + gap): r * (side + gap) + side, c * (side + gap): c * (side + gap) + side]
        page = np.asarray(shade(crop, m, low, high, 1.0), dtype=int)
        assert np.abs(panel - page).max() <= 1, f"head {i + 1}: not the page's colours"


def test_explain_a_class_with_faithfulness(tmp_path, float32):
    out = run("explain", SNEAKER, *ON_BUNDLED, "--method", "relevance", "--target", "Sandal", "--faithfulness",
              "--out", tmp_path / "why.png", env={"VIT_DEMO_PRECISION": "float32"})
    assert out.returncode == 0, out.stderr
    clf = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)
    r = clf.faithfulness(Image.open(SNEAKER), "relevance", target="Sandal")
    assert "relevance map of the class 'Sandal'" in out.stdout
    assert f"deletion AUC  {r['deletion_auc']:.3f}  (random order {r['random']['deletion_auc']:.3f}; lower is better)" in out.stdout
    assert f"insertion AUC {r['insertion_auc']:.3f}  (random order {r['random']['insertion_auc']:.3f}; higher is better)" in out.stdout
    # The full, all-deleted and blurred crops, 48 inner points on each curve for the map and 3 random orders,
    # and one pass for each of SaCo's 10 groups.
    assert "49 steps over 49 patches, 397 forward passes" in out.stdout
    assert 3 + 2 * 48 * (1 + 3) + 10 == r["forward_passes"] == 397
    assert Image.open(tmp_path / "why.png").size == (28, 28)
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--method", "relevance", "--target", "tabby cat", "--faithfulness"),
                    "'tabby cat'", "10 classes", "labels")
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--method", "relevance", "--target", "²", "--out", tmp_path / "x.png"),
                    "'²'", "10 classes")  # a digit that is not a decimal number
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--method", "heads", "--faithfulness"), "one map")
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--faithfulness", "--steps", 50), "--steps 50", "49 patches")


def test_explain_and_predict_refuse_bad_options_in_one_sentence(tmp_path, float32):
    out = run("explain", SNEAKER, *ON_BUNDLED, "--out", tmp_path / "missing" / "map.png")
    assert out.returncode == 1 and out.stderr.startswith("error: the folder") and out.stderr.count("\n") == 1, out.stderr
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--out", tmp_path / "missing" / "map.png"), "does not exist", "missing")
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--out", tmp_path / "map"), "no image extension", ".png")
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--out", tmp_path / "map.txt"), "image extension", ".png")
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED), "nothing to do", "--out", "--faithfulness")
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--alpha", 2, "--out", tmp_path / "m.png"), "--alpha")
    assert is_error(cli("explain", SNEAKER, *ON_BUNDLED, "--discard-ratio", 1, "--out", tmp_path / "m.png"), "--discard-ratio")
    assert is_error(cli("predict", SNEAKER, *ON_BUNDLED, "--top-k", 0), "--top-k", "at least 1")
    assert is_error(cli("predict", SNEAKER, *ON_BUNDLED, "--device", "cuda:x"), "--device")
    assert not list(tmp_path.iterdir()), "nothing is written when the command is refused"


def test_help_has_examples_and_describes_every_option(capsys):
    import argparse

    from vit_demo.__main__ import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("predict", "explain"):
        for action in subparsers.choices[name]._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no description"
    for args in (["--help"], ["explain", "--help"], ["predict", "--help"]):
        capsys.readouterr()
        assert cli(*args) == 0
        text = capsys.readouterr().out
        assert "examples:" in text and "python -m vit_demo" in text, args
    cli("explain", "--help")
    assert "gradient_rollout" in capsys.readouterr().out
