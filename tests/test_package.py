"""`pip install .` gives the vit_demo package, its bundled weights and the `vit-demo` command.

A wheel is built from a copy of the sources and installed into a fresh virtual environment that sees this
machine's packages (torch, gradio, ... are not installed again, and pip may not download anything: the declared
dependencies must be met by the tested versions). Everything then runs from another folder, so nothing can come
from the repository by accident.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT

SHOE = EXAMPLES / "fashion-mnist-sneaker-9.png"


def _run(cmd, cwd: Path, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the wheel built from this checkout installed in it; returns its bin folder."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "vit_demo", src / "vit_demo", ignore=shutil.ignore_patterns("__pycache__", "*.pyi"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("vit_demo-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", tmp / "venv"], cwd=tmp)
    bin_dir = tmp / "venv" / "bin"
    # --no-index: the dependencies must already be satisfied by the packages the venv sees.
    _run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--no-index", wheel], cwd=tmp)
    return bin_dir


def test_installed_package_imports_and_predicts_on_its_bundled_model(venv, tmp_path):
    script = (
        "import json, sys, vit_demo\n"
        "from PIL import Image\n"
        "from vit_demo import load_classifier\n"
        "from vit_demo.registry import BUNDLED\n"
        "clf = load_classifier(BUNDLED, device='cpu')\n"
        "top = clf.predict(Image.open(sys.argv[1]), k=3)\n"
        "print(json.dumps({'file': vit_demo.__file__, 'bundled': BUNDLED, 'top': top}))\n"
    )
    out = json.loads(_run([venv / "python", "-c", script, SHOE], cwd=tmp_path).splitlines()[-1])
    site = venv.parent / "lib"
    assert Path(out["file"]).is_relative_to(site), out["file"]  # the installed copy, not the repository
    assert Path(out["bundled"]).is_relative_to(site) and (Path(out["bundled"]) / "model.safetensors").is_file()
    from vit_demo import load_classifier
    from PIL import Image

    expected = load_classifier(ROOT / "vit_demo" / "weights" / "vit-fashion-mnist", device="cpu").predict(Image.open(SHOE), k=3)
    assert [label for label, _ in out["top"]] == [label for label, _ in expected] and out["top"][0][0] == "Sneaker"
    assert max(abs(a[1] - b[1]) for a, b in zip(out["top"], expected)) < 1e-5


def test_vit_demo_command_has_the_subcommands_of_python_m(venv, tmp_path):
    help_text = _run([venv / "vit-demo", "--help"], cwd=tmp_path)
    assert "usage: vit-demo" in help_text and "{predict,explain,train}" in help_text
    assert "usage: vit-demo train" in _run([venv / "vit-demo", "train", "--help"], cwd=tmp_path)
    bundled = _run([venv / "python", "-c", "from vit_demo.registry import BUNDLED; print(BUNDLED)"], cwd=tmp_path).strip()
    line = _run([venv / "vit-demo", "predict", SHOE, "--model", bundled, "--top-k", "2", "--json"], cwd=tmp_path)
    top = json.loads(line.splitlines()[-1])
    assert [set(t) for t in top] == [{"label", "score"}] * 2 and top[0]["label"] == "Sneaker"
    _run([venv / "vit-demo", "explain", SHOE, "--model", bundled, "--out", tmp_path / "map.png"], cwd=tmp_path)
    assert (tmp_path / "map.png").stat().st_size > 0


def test_importing_the_page_writes_nothing_into_the_package(tmp_path):
    """Gradio writes typing stubs beside modules that subclass its components; the package stays as installed."""
    copy = tmp_path / "vit_demo"
    shutil.copytree(ROOT / "vit_demo", copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyi"))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-B", "-c", "import vit_demo.ui"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
