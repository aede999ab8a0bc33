"""A visitor's /classify while others attack the app: p50 and p95 idle and under each attack, from one run.
Writes its own section of BENCHMARKS.md, between `<!-- crowd:start -->` and `<!-- crowd:end -->`.

    python bench/crowd.py                       # the bundled model, 30 s per attack
    python bench/crowd.py --vit-b --seconds 60  # also ViT-B/16 (random weights, the size of google/vit-base)
    python bench/crowd.py --out /tmp/B.md

The app runs as `python app.py` in its own process, trusting one proxy hop (VIT_DEMO_TRUSTED_HOPS=1) as on a
Space, so that each simulated client is its own by the X-Forwarded-For it sends. The visitor classifies photos no
cache has seen (a text chunk of its own each), one after the other, and its latency is that of the call alone (the
upload is done before). Every attack runs against 127.0.0.1 for the same time, from a process of its own at a
lower CPU priority (nice 10), as an attacker's own work is done on its machines, not the server's:

- heavy flood: one client posts 5 /faithfulness requests a second and never reads an answer;
- 8 explain clients: each loops /explain (relevance) on photos of its own;
- 5,000 half-open connections: each sends part of a request head and then nothing;
- disk flood: one client uploads distinct 19 MB blobs as fast as it can;
- 4 clients classifying: 4 clients each loop /classify with the default model (what cycling is compared with);
- model cycling: 4 clients each switch between the listed models on every /classify.

`--only "model cycling"` runs one attack (and idle) for a quick look, writing nothing.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import multiprocessing
import os
import platform
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from sections import write_section  # noqa: E402

PHOTO = ROOT / "examples" / "chelsea.jpg"
BUNDLED = "vit_demo/weights/vit-fashion-mnist"
TIMEOUT = 300
ATTACKS = ("idle", "heavy flood", "8 explain clients", "5,000 half-open connections", "disk flood",
           "4 clients classifying", "model cycling")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(n: int) -> dict:
    return {"X-Forwarded-For": f"10.{n // 62500}.{n // 250 % 250}.{n % 250 + 1}"}


VISITOR = client(0)
NICE = 10  # the attacking clients' CPU priority, below the server's and the visitor's (see Attack)


@functools.cache
def _photo_png() -> bytes:
    buf = io.BytesIO()
    Image.open(PHOTO).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def fresh_photo(seed: int) -> bytes:
    """chelsea.jpg as a PNG with a text chunk of its own: a file no cache has seen (uploads are named by their
    content), whose decode costs the server what any photo of its size does. Made without decoding or encoding
    anything, so that the visitor's own work, on the same cores as the server here, costs it as little as it can."""
    png = _photo_png()
    body = b"tEXt" + b"seed\0" + str(seed).encode()
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:33] + chunk + png[33:]  # after the signature (8 bytes) and IHDR (25)


def vit_b16(out: Path) -> Path:
    """ViT-B/16 with random weights, saved by transformers as google/vit-base-patch16-224 is on the Hub."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    ViTForImageClassification(ViTConfig(num_labels=1000)).save_pretrained(out)
    ViTImageProcessor().save_pretrained(out)
    return out


def deit_tiny(out: Path) -> Path:
    """DeiT-tiny with random weights, saved by transformers: the second model of the cycling attack."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    ViTForImageClassification(ViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768,
                                        num_labels=1000)).save_pretrained(out)
    ViTImageProcessor().save_pretrained(out)
    return out


class App:
    """`python app.py` in its own process, serving `models` (the first by default)."""

    def __init__(self, models: list[str], tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
               "HF_HUB_OFFLINE": "1", "VIT_DEMO_MODEL": models[0], "VIT_DEMO_MODELS": ",".join(models),
               "VIT_DEMO_TRUSTED_HOPS": "1", "VIT_DEMO_PRECISION": "float32"}
        self.log = open(tmp / "app.log", "w")
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start: see {tmp / 'app.log'}")
            time.sleep(1)
        self.names = self.model_names()

    def model_names(self) -> list[str]:
        """The model dropdown's choices, as a visitor names them."""
        config = httpx.get(f"{self.url}config", timeout=30).json()
        for c in config["components"]:
            if c.get("props", {}).get("elem_id") == "model":
                return [choice[0] for choice in c["props"]["choices"]]
        raise RuntimeError("no model dropdown on the page")

    def rss_mb(self) -> float:
        """The memory of the server and its decode workers (proportional set size: shared pages counted once)."""
        total = 0
        try:
            proc = psutil.Process(self.proc.pid)
            for p in [proc, *proc.children(recursive=True)]:
                total += p.memory_full_info().pss
        except psutil.Error:
            pass
        return total / 2**20

    def log_lines(self) -> int:
        self.log.flush()
        return sum(1 for _ in open(self.log.name, errors="replace"))

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def upload(url: str, data: bytes, headers: dict, name: str = "photo.png") -> dict | None:
    r = httpx.post(f"{url}gradio_api/upload", files=[("files", (name, data))], headers=headers, timeout=TIMEOUT)
    if r.status_code != 200:
        return None
    return {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": name}


def call(url: str, api: str, data: list, headers: dict, listen: bool = True) -> tuple[str, object]:
    """A raw call: ("complete", output), ("error", message), ("refused", text), ("sent", id) or ("lost", None)."""
    try:
        r = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, headers=headers, timeout=TIMEOUT)
        if r.status_code != 200:
            return "refused", r.text
        event_id = r.json()["event_id"]
        if not listen:
            return "sent", event_id
        with httpx.stream("GET", f"{url}gradio_api/call/{api}/{event_id}", headers=headers, timeout=TIMEOUT) as s:
            event = None
            for line in s.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = json.loads(line.split(":", 1)[1])
                    return event, payload
    except httpx.HTTPError as e:
        return "lost", str(e)
    return "lost", None


# --- the attacks: each runs until `stop` is set, and returns what it did -----------------------------------------


def heavy_flood(app: App, stop: threading.Event, photos: list[dict]) -> dict:
    sent = refused = 0
    n = 0
    while not stop.is_set():
        t = time.monotonic()
        for _ in range(5):
            data = [photos[n % len(photos)], "relevance", "", None, None, None, "mean", 0.9]
            event, _ = call(app.url, "faithfulness", data, client(1), listen=False)
            sent += event == "sent"
            refused += event == "refused"
            n += 1
        stop.wait(max(0.0, 1 - (time.monotonic() - t)))
    return {"posted": n, "admitted": sent, "refused at once": refused}


def explain_clients(app: App, stop: threading.Event, photos: list[dict]) -> dict:
    counts = {"answered": 0, "busy": 0, "other": 0}
    lock = threading.Lock()

    def loop(k: int):
        i = 0
        while not stop.is_set():
            photo = upload(app.url, fresh_photo(10_000 * (k + 1) + i), client(100 + k))
            i += 1
            if photo is None:
                continue
            event, out = call(app.url, "explain", [photo, "relevance", None, None, None, "mean", 0.9, 0.5, ""],
                              client(100 + k))
            kind = "answered" if event == "complete" else "busy" if "busy" in str(out) else "other"
            with lock:
                counts[kind] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(loop, range(8)))
    return counts


def half_open(app: App, stop: threading.Event, photos: list[dict], count: int = 5000) -> dict:
    socks, failed = [], 0
    for i in range(count):
        if stop.is_set():
            break
        try:
            s = socket.create_connection(("127.0.0.1", app.port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: 10.9.9.9\r\n")  # and nothing more
            socks.append(s)
        except OSError:
            failed += 1
    stop.wait()
    closed = 0  # by the server, which answers or drops a head that does not come in time
    for s in socks:
        try:
            s.setblocking(False)
            s.recv(1, socket.MSG_PEEK)
            closed += 1  # an answer (408) or the end of the stream
        except BlockingIOError:
            pass  # still open, nothing said
        except OSError:
            closed += 1
        s.close()
    return {"opened": len(socks), "failed to open": failed, "closed by the server by the end": closed}


def disk_flood(app: App, stop: threading.Event, photos: list[dict]) -> dict:
    accepted = refused = 0
    rng = np.random.default_rng(0)
    while not stop.is_set():
        blob = b"\x89PNG\r\n\x1a\n" + rng.bytes(19 * 2**20)  # an image's first bytes, then noise
        r = httpx.post(f"{app.url}gradio_api/upload", files=[("files", ("big.png", blob))], headers=client(2),
                       timeout=TIMEOUT)
        accepted += r.status_code == 200
        refused += r.status_code != 200
    cache = sum(f.stat().st_size for f in Path(app.tmp_gradio).rglob("*") if f.is_file())
    return {"accepted": accepted, "refused": refused, "upload cache at the end (MB)": round(cache / 2**20)}


def four_classifying(app: App, stop: threading.Event, photos: list[dict]) -> dict:
    return model_cycling(app, stop, photos, cycle=False)


def model_cycling(app: App, stop: threading.Event, photos: list[dict], cycle: bool = True) -> dict:
    counts = {"answered": 0, "refused": 0}
    lock = threading.Lock()

    def loop(k: int):
        i = k
        while not stop.is_set():
            name = app.names[i % len(app.names) if cycle else 0]
            event, out = call(app.url, "classify", [photos[i % len(photos)], 5, name], client(200 + k))
            i += 1
            with lock:
                counts["answered" if event == "complete" else "refused"] += 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(loop, range(4)))
    return counts


ATTACK_FNS = {"heavy flood": heavy_flood, "8 explain clients": explain_clients,
              "5,000 half-open connections": half_open, "disk flood": disk_flood,
              "4 clients classifying": four_classifying, "model cycling": model_cycling}


class Attack:
    """An attack run in a process of its own at a lower CPU priority (nice 10). On the internet an attacker's
    own work (making requests, reading answers) is done on its machines, not on the server's or the visitor's:
    here it shares this machine's cores, but waits when the server or the visitor has work to do; in the
    visitor's process, its threads would also take the visitor's turns at Python's lock. How many of its
    requests the server answered is the table's last column."""

    def __init__(self, name: str, app: App, photos: list[dict]):
        ctx = multiprocessing.get_context("fork")
        self.stop, self.results = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=self._run, args=(name, app, photos), daemon=True)
        self.proc.start()

    def _run(self, name: str, app: App, photos: list[dict]) -> None:
        os.nice(NICE)
        self.results.put(ATTACK_FNS[name](app, self.stop, photos))

    def result(self) -> dict:
        self.stop.set()
        done = self.results.get(timeout=600)
        self.proc.join(60)
        return done


def visitor(app: App, seconds: float, seed: int) -> dict:
    """The visitor classifies fresh photos one after the other for `seconds`."""
    times, failed, n = [], [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        photo = upload(app.url, fresh_photo(seed + n), VISITOR)
        n += 1
        if photo is None:
            failed.append("upload refused")
            continue
        t = time.perf_counter()
        event, out = call(app.url, "classify", [photo, 5, app.names[0]], VISITOR)
        if event == "complete":
            times.append(time.perf_counter() - t)
        else:
            failed.append(f"{event}: {str(out)[:120]}")
    return {"tries": n, "answered": len(times), "failed": failed,
            "p50_ms": 1000 * float(np.percentile(times, 50)) if times else None,
            "p95_ms": 1000 * float(np.percentile(times, 95)) if times else None}


def run(models: list[str], label: str, seconds: float, tmp: Path, only: set[str] = frozenset()) -> dict:
    (tmp / "gradio").mkdir(parents=True, exist_ok=True)
    app = App(models, tmp)
    app.tmp_gradio = tmp / "gradio"
    results = {}
    try:
        photos = [upload(app.url, fresh_photo(900_000 + i), client(3)) for i in range(20)]
        call(app.url, "classify", [photos[0], 5, app.names[0]], VISITOR)  # the first answer
        for k, name in enumerate(ATTACKS):
            if (name == "model cycling" and len(app.names) < 2) or (only and name != "idle" and name not in only):
                continue
            rss0, lines0 = app.rss_mb(), app.log_lines()
            stop = threading.Event()
            peak = [rss0]

            def sample():
                while not stop.wait(0.5):
                    peak[0] = max(peak[0], app.rss_mb())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            attack = Attack(name, app, photos) if name != "idle" else None
            time.sleep(0 if attack is None else min(5, seconds / 6))  # the attack under way
            seen = visitor(app, seconds, seed=1000 * (k + 1))
            stop.set()
            done = attack.result() if attack is not None else {}
            sampler.join()
            results[name] = {**seen, "attack": done, "rss_mb": round(app.rss_mb()), "peak_rss_mb": round(peak[0]),
                             "rss_start_mb": round(rss0), "log_lines": app.log_lines() - lines0}
            print(f"{label} / {name}: {json.dumps(results[name])[:400]}", flush=True)
            time.sleep(3)  # the attack's leftovers drain
    finally:
        app.stop()
    return results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}; "
            f"load average {os.getloadavg()[0]:.1f} at the end")


def render(figures: dict) -> str:
    lines = ["## Under a crowd: a visitor's /classify while others attack", "",
             "Written by `python bench/crowd.py` (figures in BENCHMARKS-crowd.json). Nothing here is typed by hand.", "",
             f"Measured on {figures['date']} ({figures['machine']}), {figures['seconds']:.0f} s per attack, the app "
             "in its own process (`python app.py`, float32, one trusted proxy hop), everything on 127.0.0.1: the "
             "attacking clients run in a process of their own on the same cores as the server, at a lower CPU priority "
             f"(nice {NICE}), as their own work would be done on their machines. The visitor classifies photos no cache has "
             "seen, one after the other; its latency is the call's alone. Ratios are to the idle p95 of the same "
             "run.", ""]
    for label, results in figures["models"].items():
        idle = results["idle"]["p95_ms"]
        lines += [f"### {label}", "",
                  "| while | answered | /classify p50 | p95 | p95 / idle | server memory, start -> peak | log lines | the attack |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, r in results.items():
            ratio = f"{r['p95_ms'] / idle:.1f}x" if r["p95_ms"] and idle else "-"
            p50 = f"{r['p50_ms']:.0f} ms" if r["p50_ms"] else "-"
            p95 = f"{r['p95_ms']:.0f} ms" if r["p95_ms"] else "-"
            attack = ", ".join(f"{k} {v}" for k, v in r["attack"].items()) or "-"
            lines.append(f"| {name} | {r['answered']}/{r['tries']} | {p50} | {p95} | {ratio} | "
                         f"{r['rss_start_mb']} -> {r['peak_rss_mb']} MB | {r['log_lines']} | {attack} |")
        worst = max((r["p95_ms"] / idle for r in results.values() if r["p95_ms"] and idle), default=0)
        lines += ["", f"- Target: p95 at most 3x idle under every attack: worst {worst:.1f}x, "
                  f"{'met' if worst <= 3 else 'not met'}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30, help="how long each attack runs (default 30)")
    p.add_argument("--vit-b", action="store_true", help="also serve a ViT-B/16 with random weights")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="the file whose section is written")
    p.add_argument("--only", default="", help="comma-separated attacks to run, for a quick look (nothing is "
                   f"written then); idle is always run. Of: {', '.join(ATTACKS[1:])}")
    args = p.parse_args()
    only = {a.strip() for a in args.only.split(",") if a.strip()}
    if only - set(ATTACKS):
        p.error(f"no such attack: {', '.join(sorted(only - set(ATTACKS)))}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 5,000 connections from this side too
    tmp = Path(tempfile.mkdtemp(prefix="vit-demo-crowd-"))
    deit = str(deit_tiny(tmp / "models" / "deit-tiny-random"))
    runs = {"bundled model (Fashion-MNIST, 28x28 px, 6 layers)": [BUNDLED, deit]}
    if args.vit_b:
        runs["ViT-B/16, random weights (224x224 px, 12 layers)"] = [str(vit_b16(tmp / "models" / "vit-b16-random")), deit]
    started = time.monotonic()
    figures = {"seconds": args.seconds, "models": {}}
    for i, (label, models) in enumerate(runs.items()):
        figures["models"][label] = run(models, label, args.seconds, tmp / f"run{i}", only)
    figures["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures["machine"] = machine() + f", {time.monotonic() - started:.0f} s in all"
    if only:
        print(render(figures))
        return
    (args.out.parent / "BENCHMARKS-crowd.json").write_text(json.dumps(figures, indent=1) + "\n")
    write_section(args.out, "crowd", render(figures))
    print(render(figures))


if __name__ == "__main__":
    main()
