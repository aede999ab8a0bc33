"""Live mode: webcam frames checked at the door, and the Live tab in a real browser fed by a fake camera.

The browser tests stream a Y4M file through Chromium's fake camera into the Live tab of the app launched in this
process, serving the bundled Fashion-MNIST model: it is trained, so its top class for a photo has a wide margin
(chelsea.jpg: "Bag" at about 82%, the next class under 10%) that the camera's round trip (limited-range 4:2:0
YUV, scaling to the 320x240 the page asks for, JPEG) cannot overturn. The label the page shows is compared with
`/classify` on the photo the camera was fed, and with the model's answer on the frame as the server decoded it.
Chromium must be at /usr/bin/chromium, as for tests/test_browser.py.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, launched, require_chromium, wait_until
from test_browser import CHROMIUM, FLAGS, WAIT_MS, _shot

STREAM_S = 6.0  # how long each browser test streams


# ---------------------------------------------------------------- frames at the door (no browser)


def _data_url(image: Image.Image, fmt: str = "JPEG", **save) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _refused(url) -> str:
    import gradio as gr

    from vit_demo.ui.guard import read_frame

    with pytest.raises(gr.Error) as e:
        read_frame(url)
    return e.value.message


def test_a_webcam_frame_is_read_from_its_header():
    from vit_demo.ui.guard import read_frame

    frame = read_frame(_data_url(Image.new("RGB", (640, 480), "red"), quality=92))
    assert (frame.format, frame.size, frame.mode) == ("JPEG", (640, 480), "RGB")
    assert frame.nbytes == 640 * 480 * 3
    pixel = frame.decode().getpixel((10, 10))
    assert max(abs(a - b) for a, b in zip(pixel, (255, 0, 0))) <= 2, pixel
    assert read_frame(_data_url(Image.new("RGBA", (8, 6)), "PNG")).size == (8, 6)
    assert read_frame(_data_url(Image.new("L", (8, 6)), "WEBP")).format == "WEBP"


@pytest.mark.parametrize("size, decoded", [((640, 480), (640, 480)), ((1280, 960), (640, 480)),
                                            ((2300, 1700), (1150, 850)), ((1700, 2300), (850, 1150)),
                                            ((1000, 700), (1000, 700))])
def test_a_large_jpeg_frame_is_decoded_at_a_reduced_scale_that_keeps_640x480(size, decoded):
    """JPEG's own 1/2, 1/4, 1/8 scales: the largest reduction that keeps at least 640x480 (either way up); a frame
    of that size or one that a reduction would take below it is decoded whole. The picture is the same, smaller."""
    from vit_demo.ui.guard import read_frame

    photo = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize(size, Image.BICUBIC)
    frame = read_frame(_data_url(photo, quality=92))
    image = frame.decode()
    assert frame.size == size and image.size == decoded and image.mode == "RGB"
    full = np.asarray(photo.resize(decoded, Image.BOX), dtype=np.float32)
    assert np.abs(np.asarray(image, dtype=np.float32) - full).mean() < 6  # the same picture, at the smaller scale


def test_frames_that_are_not_webcam_frames_are_refused_in_one_sentence():
    from vit_demo.ui.guard import FRAME_TOO_LARGE as TOO_LARGE, FRAME_UNREADABLE as UNREADABLE, NOT_A_FRAME

    png = _data_url(Image.new("RGB", (8, 8)), "PNG")
    assert _refused(None) == NOT_A_FRAME
    assert _refused("/etc/passwd") == NOT_A_FRAME  # a server path, not a frame
    assert _refused({"path": "/etc/passwd"}) == NOT_A_FRAME
    assert _refused(png.replace("image/png", "image/svg+xml")) == NOT_A_FRAME
    assert _refused(png.replace(";base64", "")) == NOT_A_FRAME
    assert _refused("data:image/png;base64,@@@@") == UNREADABLE
    assert _refused("data:image/jpeg;base64," + base64.b64encode(b"not a jpeg" * 10).decode()) == UNREADABLE
    assert _refused(png.replace("image/png", "image/jpeg")) == UNREADABLE  # a PNG is not read as what it claims
    assert _refused(_data_url(Image.new("I;16", (8, 8)), "PNG")) == UNREADABLE  # 16-bit: not a camera frame
    # Over 4 megapixels, from the header alone: a flat 2500x2000 PNG is a few kB, 20 MB once decoded.
    assert _refused(_data_url(Image.new("RGB", (2500, 2000)), "PNG")) == TOO_LARGE
    # A header claiming 100000x100000 pixels (PIL itself refuses it as a decompression bomb).
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    assert _refused("data:image/png;base64," + base64.b64encode(bomb).decode()) == TOO_LARGE
    assert TOO_LARGE.count(".") == 1 and UNREADABLE.count(":") == 1  # one sentence each


def test_a_damaged_frame_is_refused_when_decoded():
    import gradio as gr

    from vit_demo.ui.guard import FRAME_UNREADABLE as UNREADABLE, read_frame

    url = _data_url(Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)))
    data = base64.b64decode(url.split(",", 1)[1])
    frame = read_frame("data:image/jpeg;base64," + base64.b64encode(data[: len(data) // 2]).decode())
    with pytest.raises(gr.Error) as e:
        frame.decode()
    assert e.value.message == UNREADABLE


# ---------------------------------------------------------------- the app and the browser


def _y4m(frames: list[np.ndarray], path: Path, fps: int = 30) -> None:
    """Writes RGB (H, W, 3) uint8 frames as 4:2:0 Y4M, limited-range BT.601 (what Chromium's fake camera reads)."""
    h, w, _ = frames[0].shape
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
            y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
            cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
            cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
            half = [c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (cb, cr)]  # 2x2 averages
            f.write(b"FRAME\n")
            for plane in (y, *half):
                f.write(np.clip(np.round(plane), 0, 255).astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real page serving the bundled model, launched in this process; records every live frame as the server
    decoded it (time, image), and can be slowed down (app["slow_s"], added to every forward pass)."""
    from vit_demo.registry import BUNDLED_NAME, Registry

    tmp = tmp_path_factory.mktemp("live")
    with launched(Registry([BUNDLED_NAME], default=BUNDLED_NAME, device="cpu"), tmp) as (demo, url):
        clf = demo.registry.get(BUNDLED_NAME)
        state = dict(url=url, demo=demo, clf=clf, tmp=tmp, frames=[], slow_s=0.0)
        crop, forward = clf.crop, clf.runtime.batcher.forward

        def recording_crop(image, *args, **kwargs):
            if isinstance(image, Image.Image):  # a live frame (uploads are decoded and cropped in a worker process)
                state["frames"].append((time.monotonic(), image.copy()))
            return crop(image, *args, **kwargs)

        def slowed_forward(x):
            time.sleep(state["slow_s"])
            return forward(x)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(clf, "crop", recording_crop)
            mp.setattr(clf.runtime.batcher, "forward", slowed_forward)
            yield state


@pytest.fixture(scope="module")
def pw(app):
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


def _live_streams(demo) -> int:
    """Live streams the server is running now."""
    return sum(event.streaming for job in demo._queue.active_jobs for event in (job or ()))


class Stream:
    """A Chromium whose fake camera plays a Y4M file, on the Live tab; counts the frames the page sends."""

    def __init__(self, pw, app, y4m: Path):
        self.app = app
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS + [
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={y4m}",
        ])
        self.context = self.browser.new_context(viewport={"width": 1280, "height": 1000}, permissions=["camera"])
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.sent: list[float] = []  # when the page sent each frame (the first one starts the stream), as seen
        # while a Playwright call runs: wait with page.wait_for_timeout, not time.sleep
        self.page.on("request", self._count)

    def _count(self, request):
        if request.method == "POST" and ("/gradio_api/stream/" in request.url or "/queue/join" in request.url):
            self.sent.append(time.monotonic())

    def start(self) -> float:
        """Opens the page, the Live tab and the camera, presses Record; returns when it was pressed."""
        page = self.page
        page.goto(self.app["url"], wait_until="domcontentloaded")
        page.get_by_role("tab", name="Live").filter(visible=True).first.click()
        camera = page.locator("#live-camera")
        access = camera.get_by_role("button", name="Click to Access Webcam")
        video = camera.locator("video[data-testid=webcam-video]")
        access.or_(video).filter(visible=True).first.wait_for(state="visible")
        if access.is_visible():
            access.click()
        page.wait_for_function(
            "() => { const v = document.querySelector('#live-camera video'); return v && v.readyState >= 2 && v.videoWidth > 0; }"
        )
        self.app["frames"].clear()
        camera.get_by_label("capture photo").click()  # the button reads "Record"
        return time.monotonic()

    def wait_for(self, condition) -> None:
        """Waits until condition() holds, letting the page run (Playwright delivers its events only while called)."""
        deadline = time.monotonic() + WAIT_MS / 1000
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            self.page.wait_for_timeout(20)

    def label(self) -> str:
        return self.page.locator('#live-label [data-testid="label-output-value"]').inner_text().strip()

    def stop(self) -> None:
        self.page.locator("#live-camera").get_by_label("capture photo").click()  # now reads "Stop"

    def close(self) -> None:
        self.context.close()
        self.browser.close()


@pytest.fixture(scope="module")
def chelsea_stream(pw, app):
    """chelsea.jpg resized to 640x480, streamed for STREAM_S seconds: what was sent, answered and shown."""
    from gradio_client import Client, handle_file

    source = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((640, 480), Image.BICUBIC)
    photo = app["tmp"] / "chelsea-640x480.png"
    source.save(photo)
    y4m = app["tmp"] / "chelsea.y4m"
    _y4m([np.asarray(source)] * 5, y4m)
    client = Client(app["url"], verbose=False, download_files=False)
    classified = client.predict(image=handle_file(str(photo)), api_name="/classify")

    stream = Stream(pw, app, y4m)
    try:
        pressed = stream.start()
        stream.wait_for(lambda: len(app["frames"]) >= 1)
        stream.page.wait_for_timeout(STREAM_S * 1000)
        shown = stream.label()
        _shot(stream.page, "live.png")
        frames = list(app["frames"])
        sent = [t for t in stream.sent if t >= pressed]
        # The map, once asked for: drawn inline (a data: URL), nothing written to the cache.
        cached = {p for p in Path(app["tmp"] / "gradio").rglob("*") if p.is_file()}
        stream.page.locator("#live-map-on input").check()
        stream.page.wait_for_function("() => { const i = document.querySelector('#live-map img'); "
                                      "return i && i.complete && i.naturalWidth > 0; }")
        map_src = stream.page.locator("#live-map img").first.get_attribute("src")
        map_size = stream.page.evaluate("() => { const i = document.querySelector('#live-map img'); "
                                        "return [i.naturalWidth, i.naturalHeight]; }")
        _shot(stream.page, "live-map.png")
        written = {p for p in Path(app["tmp"] / "gradio").rglob("*") if p.is_file()} - cached
        stream.stop()
    finally:
        stream.close()
    return dict(source=source, classified=classified, shown=shown, frames=frames, sent=sent, map_src=map_src,
                map_size=map_size, written=written)


# ---------------------------------------------------------------- tests in the browser


def test_live_label_matches_classify_on_the_photo(chelsea_stream, app):
    run = chelsea_stream
    expected = run["classified"]["label"]
    confidences = {c["label"]: c["confidence"] for c in run["classified"]["confidences"]}
    last = run["frames"][-1][1]
    live_top = app["clf"].top_k(app["clf"].runtime(app["clf"].preprocess(last)).squeeze(0), 2)
    print(f"/classify on the photo: {expected} ({confidences[expected]:.1%}); the page showed {run['shown']}; "
          f"the last frame ({last.size[0]}x{last.size[1]}) gives {live_top[0][0]} ({live_top[0][1]:.1%}), "
          f"next {live_top[1][0]} ({live_top[1][1]:.1%})")
    assert run["shown"] == expected
    assert live_top[0][0] == expected  # what the page showed is the model's answer on the frame it got

    # The frames are the photo as the camera saw it: not mirrored, only scaled and compressed.
    got = np.asarray(last.convert("RGB").resize((640, 480), Image.BICUBIC), dtype=float)
    source = np.asarray(run["source"], dtype=float)
    to_source, to_mirror = np.abs(got - source).mean(), np.abs(got - source[:, ::-1]).mean()
    assert to_source < 12 and to_source * 2 + 10 < to_mirror, (to_source, to_mirror)


def test_live_frames_per_second(chelsea_stream):
    """Frames answered per second through the streaming event (printed; no timing is asserted)."""
    run = chelsea_stream
    times = [t for t, _ in run["frames"]]
    assert len(times) >= 2, "the stream answered one frame and stopped"
    span = times[-1] - times[0]
    answered = (len(times) - 1) / span
    sent = len(run["sent"]) / (run["sent"][-1] - run["sent"][0])
    print(f"live, bundled model on this CPU: {answered:.1f} frames/s answered, {sent:.1f} frames/s sent by the page "
          f"({len(times)} answered of {len(run['sent'])} sent in {span:.1f} s)")


def test_live_map_is_drawn_inline(chelsea_stream):
    run = chelsea_stream
    assert run["map_src"].startswith("data:image/jpeg;base64,")
    assert run["map_size"] == [224, 224]  # the bundled model's 28x28 crop, enlarged 8 times
    assert not run["written"], f"the stream wrote files to the cache: {sorted(run['written'])[:3]}"


def test_frames_are_dropped_not_queued_when_the_model_is_slow(pw, app):
    """With every forward pass made 0.4 s slower, the page sends a frame only when the last one is answered, and the
    camera's other frames (25 a second) are not sent at all; the frame answered is the camera's latest. The camera
    plays a film whose frames differ in grey level (one every 0.5 s), so each answered frame tells when the camera
    showed it: queued frames would fall further and further behind."""
    step, levels, per_s = 4, 50, 2
    y4m = app["tmp"] / "grey-film.y4m"
    _y4m([np.full((240, 320, 3), 20 + step * i, np.uint8) for i in range(levels)], y4m, fps=per_s)
    app["slow_s"] = 0.4
    stream = Stream(pw, app, y4m)
    try:
        pressed = stream.start()
        stream.page.wait_for_timeout(STREAM_S * 1000)
        stream.stop()
        stopped = time.monotonic()
        answered_before_stop = len(app["frames"])
        held = stream.page.evaluate("window.__vitDemoPace.held")  # frames the page did not send
        stream.page.wait_for_timeout(1500)
        frames = list(app["frames"])
        sent = [t for t in stream.sent if pressed <= t <= stopped]
    finally:
        app["slow_s"] = 0.0
        stream.close()

    # Camera time of each answered frame, from its grey level; lag = time answered - time shown by the camera.
    shown = [(t, round((float(np.asarray(im.convert("L")).mean()) - 20) / step) / per_s) for t, im in frames]
    t0, c0 = shown[0]
    lags = [(t - t0) - (c - c0) for t, c in shown]
    print("camera time of the answered frames:", [round(c - c0, 1) for _, c in shown])
    print(f"slow model: {len(sent)} frames sent, {held} held back, {len(frames)} answered in {STREAM_S:.0f} s; "
          f"lag behind the camera from {min(lags):+.2f} to {max(lags):+.2f} s")
    assert len(frames) >= 5
    assert len(sent) <= len(frames) + 2, "frames were sent faster than they were answered, only to be dropped"
    assert held >= 3 * len(frames), "the page did not pace itself by the answers: it sent every frame"
    # Queued, the frames answered would be the ones sent one after another, 0.04 s apart: 13 answers in, the camera
    # time would be 0.5 s, the lag over 5 s. Dropped, the lag stays within a frame of the film and one answer.
    assert max(abs(lag) for lag in lags) < 2, "answered frames fell behind the camera: frames were queued"
    assert len(frames) - answered_before_stop <= 1, "frames were still answered after Stop: a backlog was worked off"


def test_leaving_the_page_ends_the_stream(pw, app):
    y4m = app["tmp"] / "grey.y4m"
    _y4m([np.full((240, 320, 3), 128, np.uint8)] * 2, y4m)
    stream = Stream(pw, app, y4m)
    try:
        stream.start()
        stream.wait_for(lambda: len(app["frames"]) >= 3)
        assert _live_streams(app["demo"]) >= 1
    finally:
        stream.close()  # the visitor closes the tab: no Stop is pressed
    wait_until(lambda: _live_streams(app["demo"]) == 0, 30)
    answered = len(app["frames"])
    time.sleep(1)
    assert len(app["frames"]) == answered


def test_a_stream_past_its_time_limit_is_rejoined_at_once(pw, tmp_path, monkeypatch):
    """Every LIVE_SECONDS a stream goes back to the queue (so that waiting visitors get a turn) and the page rejoins
    it by itself: the visitor sees no gap."""
    from vit_demo.registry import BUNDLED_NAME, Registry
    from vit_demo.ui import live

    monkeypatch.setattr(live, "LIVE_SECONDS", 3)
    y4m = tmp_path / "grey.y4m"
    _y4m([np.full((240, 320, 3), 100, np.uint8)] * 2, y4m)
    with launched(Registry([BUNDLED_NAME], default=BUNDLED_NAME, device="cpu"), tmp_path) as (demo, url):
        clf = demo.registry.get(BUNDLED_NAME)
        answered: list[float] = []
        predict = clf.predict
        monkeypatch.setattr(clf, "predict", lambda image, k=5, **kw: answered.append(time.monotonic()) or predict(image, k, **kw))
        stream = Stream(pw, {"url": url, "frames": []}, y4m)
        try:
            pressed = stream.start()
            stream.page.wait_for_timeout(8000)
            joins = stream.page.evaluate("() => performance.getEntriesByType('resource')"
                                         ".filter(e => e.name.includes('/queue/join')).length")
        finally:
            stream.close()
    times = [t for t in answered if t >= pressed]
    gaps = np.diff(times)
    print(f"{joins} joins in 8 s, {len(times)} frames answered, longest gap {gaps.max():.2f} s")
    assert joins >= 2, "the stream was not handed back to the queue at its time limit"
    assert times[-1] - pressed > 6, "the stream ended at its time limit"
    assert gaps.max() < 2, "the stream stopped for a while at its time limit"


def test_live_frames_fit_the_request_limit(app):
    """A 640x480 webcam frame, as the page posts it (twice: value and event data), passes the 1 MB request limit of
    server.py on the stream route; a larger body is refused there before Gradio reads it."""
    import json

    import httpx

    from vit_demo.ui.server import BODY_BYTES

    photo = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((640, 480), Image.BICUBIC)
    value = {"url": _data_url(photo, quality=92)}  # the browser's toDataURL("image/jpeg") quality
    body = json.dumps({"fn_index": 0, "data": [value, "model", False], "event_data": {"value": value, "is_value_data": True},
                       "session_hash": "abc"})
    print(f"a 640x480 frame posts {len(body) / 1024:.0f} kB")
    assert len(body) < BODY_BYTES / 2
    url = app["url"].rstrip("/") + "/gradio_api/stream/no-such-event"
    assert httpx.post(url, content=body, headers={"content-type": "application/json"}).status_code == 404  # Gradio's
    big = body.replace(value["url"], value["url"] + "A" * BODY_BYTES)
    assert httpx.post(url, content=big, headers={"content-type": "application/json"}).status_code == 413


def _join(app, frame_url: str, session: str) -> dict:
    """Starts the live event as a raw client would (no page), with one frame; returns its first answer or error."""
    import json

    import httpx

    base = app["url"].rstrip("/")
    config = httpx.get(f"{base}/config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "live")
    prefix = base + config.get("api_prefix", "/gradio_api")
    with httpx.Client(timeout=60) as http:
        joined = http.post(f"{prefix}/queue/join", json={"data": [{"url": frame_url}, None, False, None],
                                                         "fn_index": fn_index, "session_hash": session})
        event_id = joined.raise_for_status().json()["event_id"]
        with http.stream("GET", f"{prefix}/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message["msg"] in ("process_streaming", "process_completed"):
                        http.post(f"{prefix}/stream/{event_id}/close")  # as the page's Stop does
                        return message
    raise AssertionError("the event stream ended without an answer")


def test_the_live_event_answers_a_frame_and_refuses_a_hostile_one(app):
    """The event itself, called without the page: a frame is answered with the model's top classes for it; a frame
    over 4 megapixels ends the stream with the sentence that says so (it is refused from its header)."""
    from vit_demo.ui.guard import FRAME_TOO_LARGE as TOO_LARGE

    photo = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((320, 240), Image.BICUBIC)
    url = _data_url(photo, quality=92)
    answer = _join(app, url, "live-test-good")
    assert answer["msg"] == "process_streaming" and answer["success"], answer
    label = answer["output"]["data"][0]
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    expected = app["clf"].top_k(app["clf"].runtime(app["clf"].preprocess(decoded))[0], 5)
    assert label["label"] == expected[0][0]
    got = [(c["label"], c["confidence"]) for c in label["confidences"]]
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert max(abs(g[1] - e[1]) for g, e in zip(got, expected)) < 1e-5, (got, expected)

    refused = _join(app, _data_url(Image.new("RGB", (2500, 2000)), "PNG"), "live-test-large")
    assert refused["msg"] == "process_completed" and not refused["success"]
    assert refused["output"]["error"] == TOO_LARGE


def test_the_live_events_are_private(app):
    from gradio_client import Client

    named = Client(app["url"], verbose=False, download_files=False).view_api(return_format="dict", print_info=False)
    assert "/classify" in named["named_endpoints"]
    public = set(named["named_endpoints"]) | set(named["unnamed_endpoints"])
    assert not {"/live", "/live_map_on"} & public, public


# ---------------------------------------------------------------- the pace, the figures on the tab, several visitors


def test_each_streams_figures_are_its_own():
    from vit_demo.ui.live import RATE_WINDOW_S, rates

    s = rates(None, 100.0, 30.0)
    assert (s["answered"], s["per_s"], s["ms"]) == (1, None, 30.0)
    s = rates(rates(s, 100.5, 20.0), 101.0, 25.0)
    assert s["answered"] == 3 and s["per_s"] == pytest.approx(2.0)  # 2 intervals in 1 s
    late = rates(s, 101.0 + RATE_WINDOW_S + 0.5, 25.0)  # the old answers left the window
    assert late["answered"] == 4 and late["per_s"] is None and len(late["times"]) == 1


def _answered(stream) -> int:
    import re

    match = re.search(r"\((\d+) answered\)", stream.page.locator("#live-info").inner_text())
    return int(match.group(1)) if match else 0


def test_two_visitors_stream_at_once_and_a_third_is_told_the_view_is_full(pw, app, monkeypatch):
    """Two pages stream at once: each is answered, and each shows its own frames per second and count. With two
    streams allowed at a time, a third visitor is told in one sentence that the live view is full; once a stream
    stops, that visitor's Record is answered."""
    import dataclasses

    from playwright.sync_api import expect

    queue = app["demo"]._queue
    y4m = app["tmp"] / "chelsea-320.y4m"
    source = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((320, 240), Image.BICUBIC)
    _y4m([np.asarray(source)] * 2, y4m)
    monkeypatch.setattr(queue, "policy", dataclasses.replace(queue.policy, streams=2, address_streams=3))
    first, second, third = Stream(pw, app, y4m), Stream(pw, app, y4m), Stream(pw, app, y4m)
    try:
        first.start()
        second.start()
        for stream in (first, second):
            stream.wait_for(lambda stream=stream: _answered(stream) >= 5)
        lines = [s.page.locator("#live-info").inner_text() for s in (first, second)]
        print("two visitors:", lines)
        assert all("frames/s" in line for line in lines), lines
        assert first.label() == second.label() == "Bag"

        third.start()
        full = third.page.locator('[data-testid="toast-body"]').filter(has_text="The live view is full")
        full.wait_for(state="visible")
        _shot(third.page, "live-full.png")
        assert "try again in about a minute" in full.inner_text()
        assert _answered(third) == 0

        first.stop()
        third.wait_for(lambda: _live_streams(app["demo"]) <= 1)
        button = third.page.locator("#live-camera").get_by_label("capture photo")
        expect(button).to_have_text("Record")  # not left at "Waiting" by the refusal
        button.click()  # Record again
        third.wait_for(lambda: _answered(third) >= 3)
        assert third.label() == "Bag"
    finally:
        for stream in (first, second, third):
            stream.close()
