"""The page in a real browser: headless Chromium (Playwright) against the app launched in this process.

One app (a small random-weight transformers ViT, 224 px, 32 px patches) serves every test in this module.
Screenshots of each step go to test-artifacts/ (git-ignored). Chromium must be at /usr/bin/chromium
(`apt-get install chromium`; CI installs it): without it these tests fail, they do not skip.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, ROOT, free_port, make_transformers

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
CHELSEA = EXAMPLES / "chelsea.jpg"
WAIT_MS = 60_000  # the machine may be busy with other work: wait generously, never sleep
NUM_CLASSES = 10


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


# ---------------------------------------------------------------- the app and the browser


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real page, launched in this process on a free port; records every image `predict` receives."""
    tmp = tmp_path_factory.mktemp("browser")
    mp = pytest.MonkeyPatch()
    (tmp / "gradio").mkdir()
    (tmp / "tmp").mkdir()
    # Gradio (and Chromium) write uploads and profiles into the temp directory: keep them in this test's folder.
    mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
    mp.setenv("TMPDIR", str(tmp / "tmp"))
    mp.setattr(tempfile, "tempdir", str(tmp / "tmp"))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")

    ref = make_transformers(tmp / "model", "small", image_size=224, patch_size=32,
                            id2label={i: f"class {i}" for i in range(NUM_CLASSES)})
    path = str(ref.path)

    from vit_demo.registry import Registry
    from vit_demo.ui import LAUNCH_KWARGS, build_demo

    demo = build_demo(Registry([path], default=path, device="cpu"))
    clf = demo.registry.get(path)
    received: list[Image.Image] = []
    predict = clf.predict

    def recording_predict(image, k=5, **kwargs):  # the app passes the upload's path
        with Image.open(image) as im:
            received.append(im.copy())
        return predict(image, k=k, **kwargs)

    mp.setattr(clf, "predict", recording_predict)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **LAUNCH_KWARGS)
    try:
        yield dict(url=f"http://127.0.0.1:{port}/", path=path, received=received, tmp=tmp, clf=clf)
    finally:
        demo.close()
        mp.undo()


@pytest.fixture(scope="module")
def expected_top(app):
    """What the library itself says about chelsea.jpg: the page must show the same."""
    from vit_demo import load_classifier

    return load_classifier(app["path"], device="cpu").predict(Image.open(CHELSEA), k=1)[0][0]


@pytest.fixture(scope="module")
def pw(app):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: the browser tests need it "
                    "(apt-get install -y chromium chromium-driver).", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(pw):
    b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
    yield b
    b.close()


def _open(browser, url, **context_kwargs):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, **context_kwargs)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#classify-btn").wait_for(state="visible")
    return context, page


@pytest.fixture
def page(browser, app):
    context, page = _open(browser, app["url"])
    yield page
    context.close()


# ---------------------------------------------------------------- page helpers


def _upload(page, path: Path) -> None:
    """Puts a file into #photo through its file input and waits until the page shows it."""
    photo = page.locator("#photo")
    photo.locator('input[data-testid="file-upload"]').set_input_files(str(path))
    # Once uploaded, the page shows it from the server: <img src=".../gradio_api/file=<upload dir>/<name>">.
    photo.locator(f'.image-frame img[src$="/{path.name}"]').wait_for(state="attached")


def _classify(page) -> None:
    page.locator("#classify-btn").click()


def _top_label(page):
    return page.locator('#label [data-testid="label-output-value"]')


def _expect_answered(page) -> str:
    from playwright.sync_api import expect

    answered = page.locator("#answered")
    expect(answered).to_contain_text(re.compile(r"answered in \d+ ms on \w+( in \w+)?\."), timeout=WAIT_MS)
    return answered.inner_text()


def _fetch_image(page, img) -> Image.Image:
    src = img.get_attribute("src")
    assert src, "the <img> has no src"
    if src.startswith("data:"):
        import base64

        data = base64.b64decode(src.split(",", 1)[1])
    else:
        response = page.request.get(urljoin(page.url, src))
        assert response.ok, f"GET {src}: {response.status}"
        data = response.body()
    return Image.open(io.BytesIO(data))


# ---------------------------------------------------------------- tests


def test_upload_and_classify(page, app, expected_top):
    from playwright.sync_api import expect

    app["received"].clear()
    _upload(page, CHELSEA)
    _classify(page)
    expect(_top_label(page)).to_have_text(expected_top, timeout=WAIT_MS)
    assert app["path"] in _expect_answered(page)
    _shot(page, "classify.png")

    assert len(app["received"]) == 1
    got = np.asarray(app["received"][0].convert("RGB"))
    want = np.asarray(Image.open(CHELSEA).convert("RGB"))
    assert got.shape == want.shape and np.array_equal(got, want), "the server did not get the uploaded photo as it is"


def test_attention_tab_explains(page, app):
    from playwright.sync_api import expect

    _upload(page, CHELSEA)
    page.get_by_role("tab", name="Attention").filter(visible=True).first.click()
    explain = page.locator("#explain-btn")
    expect(explain).to_be_visible()
    explain.click()
    overlay_img = page.locator("#overlay img").first
    crop_img = page.locator("#crop img").first
    overlay_img.wait_for(state="visible")
    crop_img.wait_for(state="visible")
    page.wait_for_function(
        "() => ['#overlay img', '#crop img'].every(s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; })",
        timeout=WAIT_MS,
    )
    _shot(page, "attention.png")

    sizes = page.evaluate("() => ['#overlay img', '#crop img'].map(s => { const i = document.querySelector(s); return [i.naturalWidth, i.naturalHeight]; })")
    assert sizes == [[224, 224], [224, 224]], sizes
    overlay = _fetch_image(page, overlay_img).convert("RGB")
    crop = _fetch_image(page, crop_img).convert("RGB")
    assert overlay.size == (224, 224) and crop.size == (224, 224), (overlay.size, crop.size)
    diff = np.abs(np.asarray(overlay, dtype=float) - np.asarray(crop, dtype=float)).mean()
    assert diff > 1, f"the overlay is the crop itself (mean abs difference {diff:.2f})"
    # The crop shown is exactly what the model's preprocessing makes of the photo (PNG: lossless).
    want = app["clf"].preprocessor.crop(Image.open(CHELSEA)).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(crop), want), "the crop on the page is not the crop the model saw"


def _rgb_to_y4m(rgb: np.ndarray, path: Path, frames: int = 5) -> None:
    """Writes an RGB (H, W, 3) uint8 frame `frames` times as 4:2:0 Y4M, limited-range BT.601 (what Chromium expects)."""
    h, w, _ = rgb.shape
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255

    def sub(c):  # 2x2 averages
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.round(p), 0, 255).astype(np.uint8).tobytes() for p in (y, sub(cb), sub(cr))]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F30:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            f.write(b"FRAME\n")
            for p in planes:
                f.write(p)


def test_webcam_photo_is_not_mirrored(pw, app):
    source = np.asarray(Image.open(EXAMPLES / "astronaut.jpg").convert("RGB").resize((640, 480), Image.BICUBIC))
    y4m = app["tmp"] / "astronaut.y4m"
    _rgb_to_y4m(source, y4m)
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS + [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={y4m}",
    ])
    try:
        context, page = _open(browser, app["url"], permissions=["camera"])
        app["received"].clear()
        photo = page.locator("#photo")
        photo.get_by_label("Capture from camera").click()
        access = photo.get_by_role("button", name="Click to Access Webcam")
        video = photo.locator("video[data-testid=webcam-video]")
        # The video element is in the DOM (hidden) before the button, so pick the first *visible* of the two.
        access.or_(video).filter(visible=True).first.wait_for(state="visible")
        if access.is_visible():
            access.click()
        page.wait_for_function(
            "() => { const v = document.querySelector('#photo video[data-testid=webcam-video]'); return v && v.readyState >= 2 && v.videoWidth > 0; }",
            timeout=WAIT_MS,
        )
        _shot(page, "webcam-live.png")
        photo.get_by_label("capture photo").click()
        photo.locator('.image-frame img[src*="gradio_api/file="]').wait_for(state="visible")
        _classify(page)
        _expect_answered(page)
        _shot(page, "webcam.png")
        context.close()
    finally:
        browser.close()

    assert len(app["received"]) == 1, f"the server got {len(app['received'])} images"
    got_img = app["received"][0].convert("RGB")
    got = np.asarray(got_img.resize((640, 480), Image.BICUBIC), dtype=float)
    to_source = np.abs(got - source).mean()
    to_flip = np.abs(got - source[:, ::-1]).mean()
    msg = f"received {got_img.size}: mean abs difference {to_source:.1f} to the source frame, {to_flip:.1f} to its mirror image"
    print(msg)
    assert to_source < 20, msg
    assert to_source * 2 + 10 < to_flip, msg


def test_unreadable_file_shows_message_then_recovers(page, app, expected_top):
    from playwright.sync_api import expect

    bad = app["tmp"] / "not-a-photo.jpg"
    bad.write_text("This is a text file with a .jpg name, not a JPEG.\n" * 20)
    _upload(page, bad)
    _classify(page)
    # gr.Error shows as a toast; it fades in, so wait for it to be opaque before the screenshot.
    toast = page.locator('[data-testid="toast-body"]').filter(has_text="could not be read as an image")
    expect(toast).to_be_visible(timeout=WAIT_MS)
    expect(toast).to_contain_text("upload a JPEG, PNG")
    expect(toast).to_have_css("opacity", "1")
    _shot(page, "bad-file.png")
    expect(_top_label(page)).to_have_count(0)

    # Back to a real photo: remove the bad one, upload chelsea.jpg, classify.
    page.locator("#photo").get_by_label("Remove Image").click()
    expect(page.locator("#photo .image-frame img")).to_have_count(0)
    _upload(page, CHELSEA)
    _classify(page)
    expect(_top_label(page)).to_have_text(expected_top, timeout=WAIT_MS)
    _expect_answered(page)
    _shot(page, "bad-file-then-good.png")
