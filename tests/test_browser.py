"""The page in a real browser: headless Chromium (Playwright) against the app launched in this process.

One app serves every test in this module, offline (HF_HUB_OFFLINE): a small random-weight transformers ViT
(224 px, 32 px patches, 4 heads, 1000 classes, so that every probability is below 1%) in a local folder, a
listed local folder whose weights are damaged (a model choice that fails), the bundled model, and a Hub id that
is not cached (not offered offline). Models run in float32. Each test runs at a desktop size (1280x900) and a phone size (390x844). Screenshots of
each step go to test-artifacts/ (git-ignored). Chromium must be at /usr/bin/chromium (`apt-get install
chromium`; CI installs it): without it these tests fail, they do not skip.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image

from conftest import CHROMIUM, EXAMPLES, ROOT, free_port, make_transformers, require_chromium
from conftest import CHROMIUM_FLAGS as FLAGS
from conftest import screenshot as _shot
from vit_demo.registry import BUNDLED, BUNDLED_NAME

CHELSEA = EXAMPLES / "chelsea.jpg"
COFFEE = EXAMPLES / "coffee.jpg"
WAIT_MS = 60_000  # the machine may be busy with other work: wait generously, never sleep
NUM_CLASSES = 1000
SIZES = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
MODEL_NAME = "tiny-vit"  # the served model's folder: what visitors see instead of its server path
BROKEN_NAME = "damaged-vit"


# ---------------------------------------------------------------- the app and the browser


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real page, launched in this process on a free port; records every image `predict` receives."""
    from huggingface_hub import constants

    tmp = tmp_path_factory.mktemp("browser")
    mp = pytest.MonkeyPatch()
    (tmp / "gradio").mkdir()
    (tmp / "tmp").mkdir()
    # Gradio (and Chromium) write uploads and profiles into the temp directory: keep them in this test's folder.
    mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
    mp.setenv("TMPDIR", str(tmp / "tmp"))
    mp.setattr(tempfile, "tempdir", str(tmp / "tmp"))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("HF_HUB_OFFLINE", "1")
    # float32 everywhere: the page's answers are compared digit for digit with the library's, and bfloat16 logits
    # of a random 1000-class model tie often enough to reorder rows.
    mp.setenv("VIT_DEMO_PRECISION", "float32")
    mp.setenv("HF_HOME", str(tmp / "hf_home"))
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    mp.setattr(constants, "HF_HUB_CACHE", str(tmp / "hf_home" / "hub"))

    ref = make_transformers(tmp / "models" / MODEL_NAME, "small", image_size=224, patch_size=32, num_labels=NUM_CLASSES,
                            id2label={i: f"class {i}" for i in range(NUM_CLASSES)})
    path = str(ref.path)
    broken = tmp / "models" / BROKEN_NAME
    shutil.copytree(path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")

    from vit_demo.registry import Registry
    from vit_demo.ui import LAUNCH_KWARGS, build_demo

    demo = build_demo(Registry([path, str(broken), BUNDLED_NAME, "nobody/not-cached"], default=path, device="cpu"))
    clf = demo.registry.get(path)
    received: list[Image.Image] = []
    predict = clf.predict

    def recording_predict(image, k=5, key=None, **kwargs):  # the app passes the decoded crop, keyed by the upload's path
        with Image.open(key) as im:
            received.append(im.copy())
        return predict(image, k=k, key=key, **kwargs)

    mp.setattr(clf, "predict", recording_predict)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **LAUNCH_KWARGS)
    try:
        yield dict(url=f"http://127.0.0.1:{port}/", path=path, received=received, tmp=tmp, clf=clf, demo=demo)
    finally:
        demo.close()
        mp.undo()


@pytest.fixture(scope="module")
def library(app):
    """The served checkpoint loaded by the Python API on its own: what the page must show."""
    from vit_demo import load_classifier

    return load_classifier(app["path"], device="cpu")


@pytest.fixture(scope="module")
def pw(app):
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(pw):
    b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
    yield b
    b.close()


def _open(browser, url, size: str = "desktop", **context_kwargs):
    phone = size == "phone"
    context = browser.new_context(viewport=SIZES[size], is_mobile=phone, has_touch=phone, **context_kwargs)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#photo").wait_for(state="visible")
    page.wait_for_function("() => window.gradio_config !== undefined")
    return context, page


@pytest.fixture(params=list(SIZES))
def page(request, browser, app):
    context, page = _open(browser, app["url"], request.param)
    page.size = request.param
    yield page
    context.close()


# ---------------------------------------------------------------- page helpers


def _upload(page, path: Path) -> None:
    """Puts a file into #photo through its file input."""
    page.locator('#photo input[data-testid="file-upload"]').set_input_files(str(path))


def _top_class(page):
    return page.locator("#label .top-class")


def _rows(page) -> list[tuple[str, str]]:
    """The answer table: (class, percentage) per row."""
    cells = page.locator("#label table.probs tr").evaluate_all(
        "rows => rows.map(r => [r.querySelector('.name').innerText, r.querySelector('.pct').innerText])")
    return [tuple(c) for c in cells]


def _expected_rows(library, path: Path, k: int = 5) -> list[tuple[str, str]]:
    from vit_demo.ui.classify import percent

    return [(label, percent(p)) for label, p in library.predict(Image.open(path), k=k)]


def _expect_answer(page, library, path: Path) -> None:
    """Waits until the page shows the library's top-5 for `path`, row by row."""
    from playwright.sync_api import expect

    rows = _expected_rows(library, path)
    expect(_top_class(page)).to_have_text(rows[0][0], timeout=WAIT_MS)
    expect(page.locator("#label td.pct")).to_have_text([pct for _, pct in rows], timeout=WAIT_MS)
    # The old photo's table may still be up with the same top class and percentages (a random 1000-class model gives
    # near-equal ones): wait until every row is this photo's.
    deadline = time.monotonic() + WAIT_MS / 1000
    while _rows(page) != rows and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert _rows(page) == rows
    expect(page.locator("#answered")).to_have_text(
        re.compile(rf"^\s*{MODEL_NAME} answered in \d+ ms on \w+( in \w+)?\.\s*$"), timeout=WAIT_MS)


def _open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).filter(visible=True).first.click()


def _wait_for_images(page, *selectors: str) -> None:
    page.wait_for_function(
        "sels => sels.every(s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; })",
        arg=list(selectors), timeout=WAIT_MS,
    )


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


def _box(page, selector: str) -> dict:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not on the page"
    return box


# ---------------------------------------------------------------- tests


def test_an_upload_is_answered_without_a_click_and_a_second_replaces_it(page, app, library):
    app["received"].clear()
    _upload(page, CHELSEA)
    _expect_answer(page, library, CHELSEA)
    _shot(page, f"{page.size}-1-answer.png")
    # Every probability of a 1000-class model is below 1%: each row still shows a non-zero value.
    assert all(re.fullmatch(r"0\.\d*[1-9]\d*%", pct) for _, pct in _rows(page)), _rows(page)

    _upload(page, COFFEE)
    _expect_answer(page, library, COFFEE)
    assert _rows(page) != _expected_rows(library, CHELSEA)
    _shot(page, f"{page.size}-2-second-answer.png")

    assert len(app["received"]) == 2, f"the server classified {len(app['received'])} photos"
    for got, path in zip(app["received"], (CHELSEA, COFFEE)):
        want = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(np.asarray(got.convert("RGB")), want), f"the server did not get {path.name} as it is"


def test_an_example_is_answered_without_a_click_on_a_button(browser, app, library):
    context, page = _open(browser, app["url"])
    try:
        page.locator("#examples img[src*='coffee.jpg']").first.click()
        _expect_answer(page, library, COFFEE)
    finally:
        context.close()


def test_on_a_phone_the_answer_is_on_the_first_screen_under_the_photo(browser, app, library):
    context, page = _open(browser, app["url"], "phone")
    try:
        _upload(page, CHELSEA)
        _expect_answer(page, library, CHELSEA)
        page.evaluate("() => window.scrollTo(0, 0)")
        _shot(page, "phone-first-screen.png", full_page=False)
        photo, top = _box(page, "#photo"), _box(page, "#label .top-class")
        assert top["y"] >= photo["y"] + photo["height"], (photo, top)
        assert top["y"] + top["height"] <= SIZES["phone"]["height"], f"the top class is below the fold: {top}"
        # Nothing but the tab bar between the photo and the answer: the model choice and the examples come later.
        for below in ("#model", "#examples"):
            assert _box(page, below)["y"] > top["y"], below
        # The model dropdown's text does not run under its arrow.
        overlap = page.evaluate("""() => {
            const input = document.querySelector('#model input');
            const arrow = document.querySelector('#model .icon-wrap, #model svg');
            const style = getComputedStyle(input);
            const textEnd = input.getBoundingClientRect().right - parseFloat(style.paddingRight);
            return [textEnd, arrow ? arrow.getBoundingClientRect().left : null, input.scrollWidth > input.clientWidth ? style.textOverflow : 'fits'];
        }""")
        assert overlap[1] is None or overlap[0] <= overlap[1] + 1, overlap
    finally:
        context.close()


def test_an_unreadable_upload_removes_the_old_answer_and_says_why(page, app, library):
    from playwright.sync_api import expect

    _upload(page, CHELSEA)
    _expect_answer(page, library, CHELSEA)
    bad = app["tmp"] / "not-a-photo.jpg"
    bad.write_text("This is a text file with a .jpg name, not a JPEG.\n" * 20)
    _upload(page, bad)
    toast = page.locator('[data-testid="toast-body"]').filter(has_text="This file is not an image")  # refused at the upload
    expect(toast).to_be_visible(timeout=WAIT_MS)
    expect(toast).to_contain_text("upload a JPEG, PNG")
    expect(toast).to_have_css("opacity", "1")  # it fades in: wait before the screenshot
    expect(_top_class(page)).to_have_count(0)
    expect(page.locator("#answered")).to_have_text("")
    expect(page.locator("#photo .image-frame img")).to_have_count(0)  # no broken image where the photo was
    _shot(page, f"{page.size}-3-unreadable.png")

    _upload(page, COFFEE)
    _expect_answer(page, library, COFFEE)


def test_a_failed_model_choice_goes_back_to_the_serving_model(page, app, library):
    from playwright.sync_api import expect

    _upload(page, CHELSEA)
    _expect_answer(page, library, CHELSEA)
    page.locator("#model input").click()
    options = page.get_by_role("option")
    expect(options).to_have_count(3)
    assert sorted(t.strip().lstrip("✓").strip() for t in options.all_inner_texts()) == sorted([MODEL_NAME, BROKEN_NAME, BUNDLED_NAME])
    expect(page.locator("#model")).to_contain_text("1 model not downloaded here is not offered")  # nobody/not-cached
    page.get_by_role("option", name=BROKEN_NAME).click()

    note = page.locator("#model-note")
    expect(note).to_contain_text(f"{BROKEN_NAME} could not be loaded", timeout=WAIT_MS)
    expect(note).to_contain_text("not a readable safetensors file")
    expect(note).to_contain_text(f"Still serving {MODEL_NAME}")
    expect(page.locator("#model input")).to_have_value(MODEL_NAME)
    _shot(page, f"{page.size}-4-failed-model.png")
    # The page goes on answering, with the model that was serving.
    _upload(page, COFFEE)
    _expect_answer(page, library, COFFEE)
    expect(page.locator("#model-info")).to_contain_text(f"{MODEL_NAME}: 2 layers, 4 heads, 224×224 px input")


def test_a_model_choice_answers_the_photo_again(page, app):
    """Choosing the bundled model: its facts, its limits and its answer to the same photo, with no new upload."""
    from playwright.sync_api import expect

    from vit_demo import load_classifier
    from vit_demo.ui.classify import percent

    bundled = load_classifier(BUNDLED, device="cpu")
    _upload(page, CHELSEA)
    expect(_top_class(page)).to_be_visible()
    expect(page.locator("#fallback-note")).to_be_hidden()
    _open_tab(page, "Attention")
    _wait_for_images(page, "#overlay img")
    page.locator("#model input").click()
    page.get_by_role("option", name=BUNDLED_NAME).click()
    expect(page.locator("#model-info")).to_contain_text(f"{BUNDLED_NAME}: 6 layers, 4 heads, 28×28 px input", timeout=WAIT_MS)
    expect(page.locator("#model-note")).to_have_text("")
    # The map is drawn again by the bundled model, its layer control set to its 6 layers.
    top = bundled.predict(Image.open(CHELSEA), k=5)
    expect(page.locator("#map-class")).to_contain_text(f"The model's answer: {top[0][0]}", timeout=WAIT_MS)
    _open_tab(page, "Classify")
    expect(page.locator("#label td.pct")).to_have_text([percent(p) for _, p in top], timeout=WAIT_MS)
    assert [name for name, _ in _rows(page)] == [label for label, _ in top]
    expect(page.locator("#fallback-note")).to_contain_text("This model knows only 10 kinds of clothing")
    expect(page.locator("#answered")).to_contain_text(f"{BUNDLED_NAME} answered in")
    _shot(page, f"{page.size}-7-bundled-model.png")


def test_the_attention_tab_draws_without_a_click(page, app, library):
    from playwright.sync_api import expect

    _upload(page, CHELSEA)
    _expect_answer(page, library, CHELSEA)
    _open_tab(page, "Attention")
    _wait_for_images(page, "#overlay img")
    page.locator("#crop").scroll_into_view_if_needed()  # below the controls on a phone, and loaded when in view
    _wait_for_images(page, "#crop img")
    from vit_demo.ui.classify import percent

    _, _, target, logits = library.maps(Image.open(CHELSEA), "rollout")
    expect(page.locator("#map-class")).to_contain_text(
        f"The model's answer: {library.labels[target]} ({percent(logits.float().softmax(-1)[target])})")
    expect(page.locator("#colour-bar .ramp")).to_be_visible()
    expect(page.locator("#method-note")).to_contain_text("Attention rollout:")
    # Rollout shows its own controls only.
    for shown, hidden in ((("#head-fusion", "#discard", "#alpha"), ("#layer", "#head")),):
        for s in shown:
            expect(page.locator(s)).to_be_visible()
        for s in hidden:
            expect(page.locator(s)).to_be_hidden()
    # On a phone too, the map comes before the controls.
    assert _box(page, "#overlay")["y"] < _box(page, "#method")["y"]
    _shot(page, f"{page.size}-5-attention.png")

    overlay_img, crop_img = page.locator("#overlay img").first, page.locator("#crop img").first
    overlay = _fetch_image(page, overlay_img).convert("RGB")
    crop = _fetch_image(page, crop_img).convert("RGB")
    assert overlay.size == (224, 224) and crop.size == (224, 224), (overlay.size, crop.size)
    diff = np.abs(np.asarray(overlay, dtype=float) - np.asarray(crop, dtype=float)).mean()
    assert diff > 1, f"the overlay is the crop itself (mean abs difference {diff:.2f})"
    # The crop shown is exactly what the model's preprocessing makes of the photo (PNG: lossless).
    want = app["clf"].preprocessor.crop(Image.open(CHELSEA)).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(crop), want), "the crop on the page is not the crop the model saw"

    # Every head of a layer: the layer control shows, the rollout ones do not; 4 heads give 2 x 2 numbered tiles.
    old_src = overlay_img.get_attribute("src")
    page.locator("#method label", has_text="All heads of one layer").click()
    expect(page.locator("#layer")).to_be_visible()
    expect(page.locator("#discard")).to_be_hidden()
    expect(page.locator("#method-note")).to_contain_text("one panel per head")
    expect(overlay_img).not_to_have_attribute("src", old_src, timeout=WAIT_MS)
    _wait_for_images(page, "#overlay img")
    assert _fetch_image(page, page.locator("#overlay img").first).size == (2 * 224 + 4, 2 * 224 + 4)
    _shot(page, f"{page.size}-6-heads.png")

    # A new photo while the tab is open: the old map goes, the new photo's comes without a click.
    old_crop = page.locator("#crop img").first.get_attribute("src")
    _upload(page, COFFEE)
    want = app["clf"].preprocessor.crop(Image.open(COFFEE)).permute(1, 2, 0).numpy()
    expect(page.locator("#crop img").first).not_to_have_attribute("src", old_crop, timeout=WAIT_MS)
    expect(page.locator("#map-class")).to_contain_text(library.predict(Image.open(COFFEE), k=1)[0][0], timeout=WAIT_MS)
    _wait_for_images(page, "#overlay img", "#crop img")
    assert np.array_equal(np.asarray(_fetch_image(page, page.locator("#crop img").first).convert("RGB")), want)


def test_no_server_path_reaches_the_page(page, app):
    _upload(page, CHELSEA)
    page.locator("#label .top-class").wait_for()
    text = page.locator("body").inner_text()
    assert str(app["tmp"]) not in text, "a server path is in the page text"
    # The page's source names files in Gradio's upload cache (that is how Gradio serves them), but no model folder.
    html = page.content()
    for folder in (str(app["tmp"] / "models"), BUNDLED):
        assert folder not in html, f"a model's server path ({folder}) is in the page source"
    assert MODEL_NAME in text


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


def test_webcam_photo_is_answered_at_once_and_not_mirrored(pw, app):
    from playwright.sync_api import expect

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
        expect(page.locator("#answered")).to_contain_text("answered in", timeout=WAIT_MS)  # no click on a button
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
