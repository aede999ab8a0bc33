"""Live mode: frames answered per second through the streaming event, in a real browser fed by a fake camera, the
server's memory over a 2-minute stream, and several visitors at once. Writes its section of BENCHMARKS.md.

    python bench/live.py                      # ViT-B/16 (2 minutes) and DeiT-tiny size, then BENCHMARKS.md
    python bench/live.py --seconds 20 --out /tmp/b.md

Each model has random weights, saved as its library publishes it in a local folder laid out like a Hub repo
(ViT-B/16 by transformers, DeiT-tiny by timm) and served by the app in a process of its own. Headless Chromium's
fake camera plays examples/chelsea.jpg at 640x480 (the page asks the camera for 320x240) into the Live tab. The
server counts the frames it answers; the page counts the frames it sends. The stream runs for a warm-up, then the
measured window; then again with the attention map on. Needs Chromium at /usr/bin/chromium.

Several visitors: 1, 2 and 4 pages stream at once (DeiT-tiny size) while a client uploads a photo and calls
/classify over raw HTTP, one request after another. Each page's frames per second come from the count of answers
its Live tab shows; the upload's latency is compared with the same requests on the idle server and with one pass
per streaming visitor ahead of it (the pass time the page measured and shows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sections import write_section  # noqa: E402  (bench/, beside this script)

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WARMUP_S = 8.0
FLAT_MB = 30  # the server's memory counts as flat when it grows less than this over the measured stream

# The app in a process of its own: it counts the frames it answers and reports them, with its memory, every second.
SERVER = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[3])
from vit_demo.registry import Registry
from vit_demo.ui import LAUNCH_KWARGS, build_demo

model, port = sys.argv[1], int(sys.argv[2])
demo = build_demo(Registry([model], default=model, device="cpu"))
clf = demo.registry.get(model)
answered = []
for name in ("predict", "attention"):  # a frame is answered by one of them (attention: with the map on)
    def counted(*args, _fn=getattr(clf, name), **kwargs):
        out = _fn(*args, **kwargs)
        answered.append(1)
        return out
    setattr(clf, name, counted)

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def report():
    while True:
        print(json.dumps({"t": time.monotonic(), "answered": len(answered), "rss_mb": rss_mb()}), flush=True)
        time.sleep(1)

demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **LAUNCH_KWARGS)
print(json.dumps({"ready": True, "dtype": str(clf.dtype).removeprefix("torch."),
                  "params": sum(p.numel() for p in clf.model.parameters())}), flush=True)
threading.Thread(target=report, daemon=True).start()
threading.Event().wait()
"""

# Counts the frames the page sends (each a POST to /gradio_api/stream/<event id>; the first starts the stream).
COUNT_SENT = """
(() => {
  const original = window.fetch;
  window.__frames_sent = 0;
  window.fetch = function (input, init) {
    const url = String(input && input.url || input);
    if (url.includes('/gradio_api/stream/') || url.includes('/queue/join')) window.__frames_sent += 1;
    return original.apply(this, arguments);
  };
})();
"""


def vit_b16(out: Path) -> Path:
    """ViT-B/16 with random weights, saved by transformers as google/vit-base-patch16-224 is on the Hub."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    ViTForImageClassification(ViTConfig(num_labels=1000)).save_pretrained(out)
    ViTImageProcessor().save_pretrained(out)
    return out


def deit_tiny(out: Path) -> Path:
    """DeiT-tiny (192 wide, 12 layers, 3 heads) with random weights, saved by timm as timm's Hub repos are."""
    import timm
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("deit_tiny_patch16_224", pretrained=False), str(out), safe_serialization=True)
    return out


def camera_file(photo: Image.Image, path: Path, frames: int = 5) -> Path:
    """`photo` (RGB, even width and height) as a Y4M file for Chromium's fake camera: 4:2:0, limited-range BT.601."""
    rgb = np.asarray(photo, dtype=np.float64)
    h, w, _ = rgb.shape
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    planes = [y] + [c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (cb, cr)]  # chroma: 2x2 averages
    frame = b"FRAME\n" + b"".join(np.clip(np.round(p), 0, 255).astype(np.uint8).tobytes() for p in planes)
    path.write_bytes(f"YUV4MPEG2 W{w} H{h} F30:1 Ip A1:1 C420jpeg\n".encode() + frame * frames)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app serving one model in its own process; `samples` fills with its reports."""

    def __init__(self, model: Path, tmp: Path):
        env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
               "HF_HUB_OFFLINE": "1", "VIT_DEMO_TRUSTED_HOPS": "1"}  # as on a Space: one proxy hop
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(model), str(self.port), str(ROOT)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.samples: list[dict] = []
        self.info: dict = {}
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(300):
            self.proc.kill()
            raise RuntimeError(f"the app did not start for {model}")

    def _read(self):
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("ready"):
                self.info = message
                self._ready.set()
            else:
                self.samples.append(message)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def _latest(server: Server, page, after: float) -> dict:
    """The server's first report after monotonic time `after` (letting the page run meanwhile)."""
    while not server.samples or server.samples[-1]["t"] <= after:
        page.wait_for_timeout(100)
    return server.samples[-1]


def _window(server: Server, page, seconds: float) -> dict:
    """Frames answered and sent per second over the next `seconds`, and the server's memory meanwhile."""
    first = _latest(server, page, time.monotonic())
    sent0 = page.evaluate("window.__frames_sent")
    page.wait_for_timeout(seconds * 1000)
    last = _latest(server, page, time.monotonic())
    sent1 = page.evaluate("window.__frames_sent")
    span = last["t"] - first["t"]
    inside = [s for s in server.samples if first["t"] <= s["t"] <= last["t"]]
    t = np.array([s["t"] - first["t"] for s in inside])
    rss = np.array([s["rss_mb"] for s in inside])
    return {
        "seconds": span,
        "answered_per_s": (last["answered"] - first["answered"]) / span,
        "sent_per_s": (sent1 - sent0) / span,
        "rss_first_mb": float(rss[0]),
        "rss_last_mb": float(rss[-1]),
        "rss_peak_mb": float(rss.max()),
        "rss_slope_mb_per_min": float(np.polyfit(t, rss, 1)[0] * 60) if len(t) > 2 else 0.0,
    }


def stream(pw, model: Path, y4m: Path, tmp: Path, seconds: float, map_seconds: float) -> dict:
    """Streams the fake camera into the Live tab of the app serving `model`: the plain window, then with the map."""
    server = Server(model, tmp)
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS + [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={y4m}",
    ])
    try:
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, permissions=["camera"])
        context.set_default_timeout(120_000)
        context.add_init_script(COUNT_SENT)
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/", wait_until="domcontentloaded")
        page.get_by_role("tab", name="Live").filter(visible=True).first.click()
        camera = page.locator("#live-camera")
        access = camera.get_by_role("button", name="Click to Access Webcam")
        access.or_(camera.locator("video")).filter(visible=True).first.wait_for(state="visible")
        if access.is_visible():
            access.click()
        page.wait_for_function("() => { const v = document.querySelector('#live-camera video'); return v && v.readyState >= 2; }")
        camera.get_by_label("capture photo").click()  # Record
        page.locator('#live-label [data-testid="label-output-value"]').wait_for(state="visible")
        page.wait_for_timeout(WARMUP_S * 1000)
        plain = _window(server, page, seconds)
        print(json.dumps({"model": model.name, "map": False, **plain}), flush=True)
        result = {"model": model.name, "dtype": server.info["dtype"], "params": server.info["params"], "plain": plain}
        if map_seconds:
            page.locator("#live-map-on input").check()
            page.locator("#live-map img").wait_for(state="visible")
            page.wait_for_timeout(WARMUP_S / 2 * 1000)
            result["map"] = _window(server, page, map_seconds)
            print(json.dumps({"model": model.name, "map": True, **result["map"]}), flush=True)
        camera.get_by_label("capture photo").click()  # Stop
        context.close()
        return result
    finally:
        browser.close()
        server.stop()


def _answered(page) -> int:
    """Frames this page's stream has had answered, as its Live tab says ("... (37 answered)")."""
    match = re.search(r"\((\d+) answered\)", page.locator("#live-info").inner_text())
    return int(match.group(1)) if match else 0


def _pass_ms(page) -> float | None:
    match = re.search(r"answered in (\d+) ms", page.locator("#live-info").inner_text())
    return float(match.group(1)) if match else None


def _classify_latencies(port: int, photo: Path, stop: threading.Event, out: list, limit: int = 1000) -> None:
    """Upload `photo` and call /classify over raw HTTP (as the page does, without gradio_client's polling), one
    request after another until `stop`; appends each latency in seconds."""
    import httpx

    base = f"http://127.0.0.1:{port}/gradio_api"
    with httpx.Client(timeout=120) as http:
        while not stop.is_set() and len(out) < limit:
            start = time.perf_counter()
            with open(photo, "rb") as f:
                path = http.post(f"{base}/upload", files=[("files", (photo.name, f))]).json()[0]
            image = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": photo.name}
            event = http.post(f"{base}/call/classify", json={"data": [image, 5, None]}).json()["event_id"]
            with http.stream("GET", f"{base}/call/classify/{event}") as answer:
                for line in answer.iter_lines():
                    if line.startswith("event:") and line.split(":", 1)[1].strip() in ("complete", "error"):
                        break
            out.append(time.perf_counter() - start)


def visitors(pw, model: Path, y4m: Path, photo: Path, tmp: Path, counts: tuple[int, ...], seconds: float) -> dict:
    """1, 2, 4 ... pages streaming at once while one client uploads: frames/s per page, the upload's latency."""
    server = Server(model, tmp)
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS + [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={y4m}",
    ])
    try:
        idle: list[float] = []
        stop = threading.Event()
        _classify_latencies(server.port, photo, stop, idle, limit=3)  # warm-up
        idle.clear()
        _classify_latencies(server.port, photo, stop, idle, limit=15)
        result = {"idle_upload_s": float(np.median(idle)), "runs": []}
        print(json.dumps({"idle_upload_ms": 1000 * result["idle_upload_s"]}), flush=True)
        for n in counts:
            contexts, pages = [], []
            for i in range(n):  # each page a visitor of its own, by the address the proxy hop forwards
                context = browser.new_context(viewport={"width": 1280, "height": 1000}, permissions=["camera"],
                                              extra_http_headers={"X-Forwarded-For": f"10.0.{n}.{i + 1}"})
                context.set_default_timeout(120_000)
                page = context.new_page()
                page.goto(f"http://127.0.0.1:{server.port}/", wait_until="domcontentloaded")
                page.get_by_role("tab", name="Live").filter(visible=True).first.click()
                camera = page.locator("#live-camera")
                access = camera.get_by_role("button", name="Click to Access Webcam")
                access.or_(camera.locator("video")).filter(visible=True).first.wait_for(state="visible")
                if access.is_visible():
                    access.click()
                page.wait_for_function("() => { const v = document.querySelector('#live-camera video'); "
                                       "return v && v.readyState >= 2; }")
                camera.get_by_label("capture photo").click()  # Record
                contexts.append(context)
                pages.append(page)
            for page in pages:
                page.locator('#live-label [data-testid="label-output-value"]').wait_for(state="visible")
            pages[0].wait_for_timeout(WARMUP_S / 2 * 1000)
            latencies: list[float] = []
            stop = threading.Event()
            uploader = threading.Thread(target=_classify_latencies, args=(server.port, photo, stop, latencies))
            start, before = time.monotonic(), [_answered(p) for p in pages]
            uploader.start()
            pages[0].wait_for_timeout(seconds * 1000)
            after, span = [_answered(p) for p in pages], time.monotonic() - start
            passes = [ms for ms in (_pass_ms(p) for p in pages) if ms is not None]
            stop.set()
            uploader.join()
            run = {
                "visitors": n, "seconds": span,
                "per_visitor_fps": [(b - a) / span for a, b in zip(before, after)],
                "upload_p50_s": float(np.median(latencies)), "upload_max_s": float(np.max(latencies)),
                "uploads": len(latencies), "pass_ms": float(np.median(passes)) if passes else float("nan"),
            }
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            for page in pages:
                page.locator("#live-camera").get_by_label("capture photo").click()  # Stop
            for context in contexts:
                context.close()
        return result
    finally:
        browser.close()
        server.stop()


def visitors_lines(v: dict) -> list[str]:
    """The table of several visitors at once."""
    lines = [
        "",
        "### Several visitors at once (DeiT-tiny size)",
        "",
        "Pages streaming at once in one headless Chromium (each with its own fake camera and session) while one "
        "client uploads chelsea.jpg and calls /classify over raw HTTP, one request after another. Frames/s per "
        "visitor: the answers each page's Live tab counted over the window. \"Bound\": the idle upload latency plus "
        "one pass per streaming visitor (the pass time the pages showed).",
        "",
        f"Upload + /classify on the idle server: {1000 * v['idle_upload_s']:.0f} ms (median of 15).",
        "",
        "| streaming visitors | seconds | frames/s of each visitor | pass (ms) | uploads | upload latency p50 (ms) | max (ms) | bound (ms) | p50 within bound |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in v["runs"]:
        bound = 1000 * v["idle_upload_s"] + r["visitors"] * r["pass_ms"]
        fps = ", ".join(f"{f:.1f}" for f in r["per_visitor_fps"])
        lines.append(f"| {r['visitors']} | {r['seconds']:.0f} | {fps} | {r['pass_ms']:.0f} | {r['uploads']} | "
                     f"{1000 * r['upload_p50_s']:.0f} | {1000 * r['upload_max_s']:.0f} | {bound:.0f} | "
                     f"{'yes' if 1000 * r['upload_p50_s'] <= bound else 'no'} |")
    return lines


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    return {
        "model": model.group(1).strip() if model else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "torch_threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0],
    }


def section(r: dict) -> str:
    c = r["cpu"]
    has = lambda flag: "has" if flag else "lacks"  # noqa: E731
    lines = [
        "## Live mode: frames answered per second through the streaming event",
        "",
        f"Written by `python bench/live.py` on {r['date']}. Nothing here is typed by hand.",
        "",
        f"- Machine: {c['model']}, {c['cores']} cores shared by the server ({c['torch_threads']} torch threads) and "
        f"headless Chromium; this CPU {has(c['amx'])} AMX and {has(c['avx512_bf16'])} avx512_bf16. Load average "
        f"(1 minute) when the run began: {c['load_1min']:.1f}, when it ended: {r['load_end']:.1f}"
        + (" (other work shared the machine: the figures are lower than on an idle one)." if max(c['load_1min'], r['load_end']) > c['cores'] else "."),
        "- A real browser: Chromium's fake camera plays chelsea.jpg at 640x480; the page asks for 320x240 and sends "
        f"the next frame when the last one is answered, at most one every {r['frame_every_s']:.2f} s (the camera's "
        "other frames are not sent); the server answers the latest frame it has each time.",
        "- Random weights, from local folders laid out like Hub repos; each model served by the app in its own process.",
        "",
        "| model | precision | attention map | seconds measured | frames/s answered | frames/s sent by the page |",
        "|---|---|---|---:|---:|---:|",
    ]
    for m in r["models"]:
        for key, shown in (("plain", "off"), ("map", "on")):
            if key in m:
                w = m[key]
                lines.append(f"| {m['label']} | {m['dtype']} | {shown} | {w['seconds']:.0f} | {w['answered_per_s']:.1f} | "
                             f"{w['sent_per_s']:.1f} |")
    long = r["models"][0]["plain"]
    growth = long["rss_last_mb"] - long["rss_first_mb"]
    lines += [
        "",
        f"Memory of the server over the {long['seconds'] / 60:.1f}-minute {r['models'][0]['label']} stream: "
        f"{long['rss_first_mb']:.0f} MB after the warm-up, {long['rss_last_mb']:.0f} MB at the end (peak "
        f"{long['rss_peak_mb']:.0f} MB; fitted slope {long['rss_slope_mb_per_min']:+.1f} MB/min): "
        + (f"flat (it grew less than {FLAT_MB} MB)." if growth < FLAT_MB else f"not flat: it grew {growth:.0f} MB."),
        "",
    ]
    goals = {"ViT-B/16": 10, "DeiT-tiny size": 25}
    notes = []
    for m in r["models"]:
        goal = goals.get(m["label"])
        if goal:
            notes.append(f"{m['label']}: {m['plain']['answered_per_s']:.1f} frames/s (goal on a CPU with AMX: {goal})")
    where = "this CPU has AMX" if c["amx"] else "this CPU lacks AMX, so the goals, set for CPUs with AMX, do not apply here"
    lines += [f"Goals: {'; '.join(notes)}. {where[0].upper() + where[1:]}."]
    if r.get("visitors"):
        lines += visitors_lines(r["visitors"])
    return "\n".join(lines)


def main() -> None:
    from playwright.sync_api import sync_playwright

    from vit_demo.ui.live import FRAME_EVERY_S

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120, help="the ViT-B/16 stream, also the memory measure")
    p.add_argument("--small-seconds", type=float, default=30, help="the DeiT-tiny-sized stream")
    p.add_argument("--map-seconds", type=float, default=15, help="each model again with the attention map on")
    p.add_argument("--visitors-seconds", type=float, default=20, help="each count of visitors streaming at once")
    p.add_argument("--visitors", type=int, nargs="+", default=[1, 2, 4], help="how many visitors stream at once")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    r = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu(),
         "frame_every_s": FRAME_EVERY_S, "models": []}
    print(json.dumps(r["cpu"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir, sync_playwright() as pw:
        tmp = Path(tmp_dir)
        (tmp / "gradio").mkdir()
        source = Image.open(ROOT / "examples" / "chelsea.jpg").convert("RGB").resize((640, 480), Image.BICUBIC)
        y4m = camera_file(source, tmp / "chelsea.y4m")
        base, tiny = vit_b16(tmp / "vit-base-patch16-224"), deit_tiny(tmp / "deit_tiny_patch16_224")
        for label, model, seconds in (("ViT-B/16", base, args.seconds), ("DeiT-tiny size", tiny, args.small_seconds)):
            result = stream(pw, model, y4m, tmp, seconds, args.map_seconds)
            r["models"].append({"label": label, **result})
        photo = tmp / "chelsea.jpg"
        photo.write_bytes((ROOT / "examples" / "chelsea.jpg").read_bytes())
        r["visitors"] = visitors(pw, tiny, y4m, photo, tmp, tuple(args.visitors), args.visitors_seconds)
    r["load_end"] = os.getloadavg()[0]
    write_section(args.out, "live", section(r))
    print(f"wrote the live section of {args.out}")


if __name__ == "__main__":
    main()
