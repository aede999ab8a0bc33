"""The command line, as a user runs it: `python -m vit_demo predict|explain`."""

import json
import os
import subprocess
import sys

from PIL import Image

from conftest import EXAMPLES, ROOT, lay_out_hub_cache, make_transformers
from vit_demo import load_classifier


def run(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vit_demo", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


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
