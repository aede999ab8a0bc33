"""The README's pictures, made from a real browser run of the app on the bundled model and examples.

    python docs/screenshots.py            # writes docs/*.webp
    python docs/screenshots.py --out DIR  # somewhere else

Launches the page in this process (the bundled Fashion-MNIST model, offline, float32), opens it in headless
Chromium (Playwright, /usr/bin/chromium) and takes one picture per part the README shows: the page, each tab,
the comparison of methods, the Live tab with a fake camera playing an example, and the phone layout. Each is
saved as WebP (a few tens of kB); `shots.json` beside them says what each picture shows, as the page said it
when the picture was taken (the open tab, the top class, the text of the part it shows).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
CAMERA_FLAGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
EXAMPLE = ROOT / "examples" / "fashion-mnist-sneaker-9.png"
LIVE_EXAMPLE = ROOT / "examples" / "fashion-mnist-ankle-boot-0.png"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 120_000
MAX_HEIGHT = 1800  # a tall part is cut here: the README shows its top
QUALITY = 80


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _y4m(rgb: np.ndarray, path: Path, frames: int = 5) -> None:
    """An RGB (H, W, 3) uint8 image as 4:2:0 Y4M, limited-range BT.601: what Chromium's fake camera plays."""
    h, w, _ = rgb.shape
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    planes = [y] + [c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (cb, cr)]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F30:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            f.write(b"FRAME\n")
            for plane in planes:
                f.write(np.clip(np.round(plane), 0, 255).astype(np.uint8).tobytes())


class Shots:
    """Saves screenshots as WebP and records what each shows."""

    def __init__(self, out: Path):
        self.out = out
        self.record: dict[str, dict] = {}

    def take(self, page, name: str, part: str | None = None, **facts) -> None:
        """`part`: a CSS selector to picture alone (else the viewport); cut at MAX_HEIGHT."""
        png = page.locator(part).first.screenshot() if part else page.screenshot()
        from io import BytesIO

        image = Image.open(BytesIO(png)).convert("RGB")
        if image.height > MAX_HEIGHT:
            image = image.crop((0, 0, image.width, MAX_HEIGHT))
        path = self.out / f"{name}.webp"
        image.save(path, "WEBP", quality=QUALITY, method=6)
        tab = page.locator('#tabs button[role="tab"][aria-selected="true"]').filter(visible=True)
        self.record[name] = dict(file=path.name, size=list(image.size), bytes=path.stat().st_size,
                                 tab=tab.first.inner_text().strip() if tab.count() else None,
                                 text=page.locator(part).first.inner_text() if part else None, **facts)
        print(f"{path.relative_to(self.out.parent) if self.out.parent in path.parents else path}: "
              f"{image.width}x{image.height}, {path.stat().st_size / 1024:.0f} kB")


def _open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).filter(visible=True).first.click()


def _first_answer(page, example: Path) -> str:
    page.locator(f'#examples img[src*="{example.name}"]').first.click()
    top = page.locator("#label .top-class")
    top.wait_for(state="visible")
    return top.inner_text().strip()


def _wait_image(page, selector: str) -> None:
    page.wait_for_function(f"() => {{ const i = document.querySelector('{selector} img'); "
                           "return i && i.complete && i.naturalWidth > 0; }", timeout=WAIT_MS)


def desktop(browser, url: str, shots: Shots) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport=DESKTOP, device_scale_factor=1)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        page.goto(url, wait_until="domcontentloaded")
        top = _first_answer(page, EXAMPLE)
        shots.take(page, "page", top_class=top)
        shots.take(page, "classify", "#tabs-col", top_class=top)

        _open_tab(page, "Attention")
        _wait_image(page, "#overlay")
        page.locator("#method label", has_text="Libra FullGrad+").click()
        expect(page.locator("#map-class")).to_contain_text(f"This map explains the class {top}", timeout=WAIT_MS)
        _wait_image(page, "#overlay")
        page.locator("#faith-btn").click()
        expect(page.locator("#faith-scores")).to_contain_text("Deletion AUC", timeout=WAIT_MS)
        page.locator("#faith-plot svg").first.wait_for(state="visible")
        shots.take(page, "attention", "#tabs-col", top_class=top, method="libra_fullgrad",
                   scores=page.locator("#faith-scores").inner_text())

        page.locator("#compare").get_by_text("Compare methods").click()
        page.locator("#compare-btn").click()
        expect(page.locator("#compare-table")).to_contain_text("random order", timeout=WAIT_MS)
        page.locator("#compare-maps img").last.wait_for(state="visible")
        shots.take(page, "compare", "#compare", top_class=top)

        _open_tab(page, "Inside")
        expect(page.locator("#inside-layers")).to_contain_text(top, timeout=WAIT_MS)
        _wait_image(page, "#inside-patches")
        shots.take(page, "inside", "#tabs-col", top_class=top)
    finally:
        context.close()


def live(pw, url: str, shots: Shots, tmp: Path) -> None:
    source = Image.open(LIVE_EXAMPLE).convert("RGB").resize((480, 480), Image.NEAREST)
    y4m = tmp / "live.y4m"
    _y4m(np.asarray(source), y4m)
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                 args=FLAGS + CAMERA_FLAGS + [f"--use-file-for-fake-video-capture={y4m}"])
    context = browser.new_context(viewport=DESKTOP, permissions=["camera"])
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        page.goto(url, wait_until="domcontentloaded")
        _open_tab(page, "Live")
        camera = page.locator("#live-camera")
        access = camera.get_by_role("button", name="Click to Access Webcam")
        video = camera.locator("video[data-testid=webcam-video]")
        access.or_(video).filter(visible=True).first.wait_for(state="visible")
        if access.is_visible():
            access.click()
        page.wait_for_function("() => { const v = document.querySelector('#live-camera video'); "
                               "return v && v.readyState >= 2 && v.videoWidth > 0; }")
        camera.get_by_label("capture photo").click()  # "Record"
        value = page.locator('#live-label [data-testid="label-output-value"]')
        value.wait_for(state="visible")
        page.wait_for_function("() => /frames\\/s/.test(document.querySelector('#live-info')?.innerText || '')",
                               timeout=WAIT_MS)
        page.wait_for_timeout(3000)  # a few frames, so the rate shown is a measured one
        shots.take(page, "live", "#tabs-col", top_class=value.inner_text().strip())
        camera.get_by_label("capture photo").click()  # "Stop"
    finally:
        context.close()
        browser.close()


def phone(browser, url: str, shots: Shots) -> None:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=1)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#photo").wait_for(state="visible")
        shots.take(page, "phone-start")
        top = _first_answer(page, EXAMPLE)
        page.wait_for_timeout(500)  # the page scrolls to the answer
        in_view = page.evaluate("() => { const r = document.querySelector('#label .top-class').getBoundingClientRect(); "
                                "return r.top >= 0 && r.bottom <= window.innerHeight; }")
        shots.take(page, "phone", top_class=top, answer_in_view=in_view)
    finally:
        context.close()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the pictures (default: docs/)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="vit-demo-shots-"))
    (tmp / "gradio").mkdir()
    os.environ.update(GRADIO_TEMP_DIR=str(tmp / "gradio"), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
                      VIT_DEMO_PRECISION="float32")
    from playwright.sync_api import sync_playwright

    from vit_demo.registry import BUNDLED_NAME, Registry
    from vit_demo.ui import LAUNCH_KWARGS, build_demo

    if not os.path.exists(CHROMIUM):
        sys.exit(f"Chromium is not installed at {CHROMIUM}: install it (apt-get install chromium) and run again.")
    demo = build_demo(Registry([BUNDLED_NAME], default=BUNDLED_NAME, device="cpu"))
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True,
                            **LAUNCH_KWARGS)
    shots = Shots(args.out)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            try:
                desktop(browser, url, shots)
                phone(browser, url, shots)
            finally:
                browser.close()
            live(pw, url, shots, tmp)
    finally:
        demo.close(verbose=False)
    (args.out / "shots.json").write_text(json.dumps(shots.record, indent=1, ensure_ascii=False) + "\n")
    return shots.record


if __name__ == "__main__":
    main()
