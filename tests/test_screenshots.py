"""The README's pictures: `docs/screenshots.py` makes them from a real browser run of the app, and the README
shows the ones it makes.

The script runs here into a temporary folder (the bundled model, headless Chromium); each picture must decode
as WebP, be small enough for a git repo, and show what it is named for, as the page said when it was taken.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from PIL import Image

from conftest import ROOT, require_chromium

EXPECTED_TAB = {"page": "Classify", "classify": "Classify", "attention": "Attention", "compare": "Attention",
                "inside": "Inside", "live": "Live", "phone": "Classify", "phone-start": "Classify"}
MAX_BYTES = 300_000


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    require_chromium()
    spec = importlib.util.spec_from_file_location("screenshots", ROOT / "docs" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("shots")
    return out, module.main(["--out", str(out)])


def test_every_picture_decodes_is_small_and_shows_its_tab(shots):
    out, record = shots
    assert set(record) == set(EXPECTED_TAB)
    for name, facts in record.items():
        path = out / facts["file"]
        with Image.open(path) as im:
            assert im.format == "WEBP"
            im.load()
            assert im.size == tuple(facts["size"])
            assert min(im.size) >= 300, name
            extrema = im.convert("L").getextrema()
            assert extrema[1] - extrema[0] > 100, f"{name} is blank"
        assert path.stat().st_size <= MAX_BYTES, name
        assert facts["tab"] == EXPECTED_TAB[name], name


def test_the_pictures_show_the_answers(shots):
    _, record = shots
    assert record["page"]["top_class"] == "Sneaker"
    assert "Sneaker" in record["classify"]["text"]
    attention = record["attention"]["text"]
    assert "This map explains the class Sneaker" in attention
    for part in ("Deletion AUC", "Insertion AUC", "SaCo", "of the score"):
        assert part in record["attention"]["scores"], part
    assert "random order" in record["compare"]["text"]
    assert "Sneaker" in record["inside"]["text"]
    assert record["live"]["top_class"] == "Ankle boot"
    assert re.search(r"\d+(\.\d)? frames/s", record["live"]["text"])
    # A phone: tapping an example brings the answer into view.
    assert record["phone"]["answer_in_view"]


def test_the_readme_shows_the_pictures_the_script_makes():
    readme = (ROOT / "README.md").read_text()
    shown = set(re.findall(r"\]\((docs/[\w-]+\.webp)\)", readme))
    for name in ("page", "attention", "compare", "inside", "live", "phone"):
        assert f"docs/{name}.webp" in shown, name
    for path in shown:
        with Image.open(ROOT / path) as im:
            assert im.format == "WEBP"
        assert (ROOT / path).stat().st_size <= MAX_BYTES
