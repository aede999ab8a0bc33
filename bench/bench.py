"""Benchmarks: vit_demo's ViT against timm, torchvision and transformers, and the web path. Writes BENCHMARKS.md.

    python bench/bench.py                 # everything this machine can run, then BENCHMARKS.md
    python bench/bench.py --model-only    # the model alone (no gradio needed: runs on a bare GPU machine)
    python bench/bench.py --gpu           # the GPU alone, into a section of its own (the CPU section stays)

All contenders get identical weights (a ViT-B/16 made by timm, converted to each library's names) and the
same input; they run interleaved (A B C ... A B C ...), and medians and ratios are reported, since one
run's ratios are what survives a noisy machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vit_demo.convert import to_torchvision, to_transformers  # noqa: E402
from vit_demo.model import ViTConfig, VisionTransformer  # noqa: E402
from vit_demo.runtime import GraphedForward, Runtime  # noqa: E402
from sections import write_section  # noqa: E402  (bench/, beside this script)


def contenders(device: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """ViT-B/16 in each library, all with the same random weights."""
    import timm
    import torchvision
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    sd = ref.state_dict()
    ours = VisionTransformer(ViTConfig())
    ours.load_state_dict(sd)
    tv = torchvision.models.vit_b_16(weights=None)
    tv.load_state_dict(to_torchvision(sd, ours.cfg))
    models = {"vit_demo": ours, "timm": ref, "torchvision": tv}
    # transformers reads the Hub's key names from a file (its modules are named differently in memory).
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in to_transformers(sd, ours.cfg).items()}, f"{tmp}/model.safetensors")
        HFConfig(layer_norm_eps=1e-6, num_labels=1000).save_pretrained(tmp)
        for impl in ("sdpa", "eager"):
            models[f"transformers-{impl}"] = _LogitsOnly(ViTForImageClassification.from_pretrained(tmp, attn_implementation=impl))
    return {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}


class _LogitsOnly(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(pixel_values=x).logits


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device: str, warmup: int = 3) -> dict[str, list[float]]:
    """Times each fn `repeats` times, round-robin, after `warmup` rounds. Seconds per call."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def bench_models(device: str, dtype: torch.dtype, batch: int, repeats: int) -> dict:
    models = contenders(device, dtype)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    with torch.inference_mode():
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        if device.startswith("cuda") and batch == 1:  # the served batch-1 path, and timm given the same help
            fns["vit_demo+cuda-graph"] = GraphedForward(models["vit_demo"], x)
            fns["timm+cuda-graph"] = GraphedForward(models["timm"], x)
            fns = {k: (lambda f=f: f(x)) if isinstance(f, GraphedForward) else f for k, f in fns.items()}
        ref = models["timm"](x).float()
        diffs = {k: (fn().float() - ref).abs().max().item() for k, fn in fns.items()}
        times = interleaved(fns, repeats, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "repeats": repeats,
        "median_ms": {k: 1000 * v for k, v in med.items()},
        "images_per_s": {k: batch / v for k, v in med.items()},
        "ratio_to": {k: med["vit_demo"] / v for k, v in med.items()},
        "max_abs_diff_to_timm": diffs,
    }


def together(works: list) -> float:
    """Runs each callable in its own thread, all released at once; seconds until the last one ends."""
    barrier = threading.Barrier(len(works) + 1)

    def run(work):
        barrier.wait()
        work()

    threads = [threading.Thread(target=run, args=(w,)) for w in works]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def bench_runtime(device: str, clients: int, per_client: int) -> dict:
    """The serving runtime alone (no web server): /classify's forward path, ViT-B/16, input and logits on the CPU,
    called by one thread, then by `clients` threads at once (their passes are batched). Images per second."""
    from vit_demo.runtime import inference_dtype

    dev = torch.device(device)
    dtype = inference_dtype(dev)
    runtime = Runtime(VisionTransformer(ViTConfig()).to(dev, dtype).eval(), dev, dtype)
    x = torch.randn(1, 3, 224, 224)
    for _ in range(3):
        runtime(x)

    def run(n_threads: int) -> float:
        def work():
            for _ in range(per_client):
                runtime(x)

        return n_threads * per_client / together([work] * n_threads)

    one = run(1)
    runtime.batcher.batch_sizes.clear()
    many = run(clients)
    sizes = runtime.batcher.batch_sizes
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "clients": clients, "per_client": per_client,
            "one_client_images_per_s": one, "many_clients_images_per_s": many, "ratio": many / one,
            "largest_batch": max(sizes), "mean_batch": statistics.mean(sizes)}


# ----------------------------------------------------------------------------------------------- web path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


NOOP_APP = """
import sys, gradio as gr
with gr.Blocks() as demo:
    image = gr.Image(type="filepath")
    gr.Button().click(lambda path: {"a": 1.0}, image, gr.Label(), api_name="classify")
demo.queue().launch(server_port=int(sys.argv[1]), quiet=True)
"""


class RawClient:
    """Calls an endpoint the way the page's own JavaScript does (upload, join the queue, read the event stream),
    without gradio_client's polling thread: what a browser visitor waits for."""

    def __init__(self, url: str, api_name: str, *rest):
        import httpx

        self.url, self.http, self.rest = url.rstrip("/"), httpx.Client(timeout=None), list(rest)
        config = self.http.get(f"{self.url}/config").json()
        self.fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)
        self.prefix = self.url + config.get("api_prefix", "/gradio_api")

    def __call__(self, path: Path) -> dict:
        import uuid

        with open(path, "rb") as f:
            uploaded = self.http.post(f"{self.prefix}/upload", files={"files": (path.name, f, "image/png")}).json()[0]
        session = uuid.uuid4().hex
        image = {"path": uploaded, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
        self.http.post(f"{self.prefix}/queue/join", json={"data": [image, *self.rest], "fn_index": self.fn_index,
                                                          "session_hash": session}).raise_for_status()
        with self.http.stream("GET", f"{self.prefix}/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["msg"] == "process_completed":
                    message = json.loads(line[5:])
                    if not message.get("success"):
                        raise RuntimeError(f"the request failed: {message}")
                    return message["output"]
        raise RuntimeError("the event stream ended before the answer")


def _start(args: list[str], port: int, env: dict, timeout: float = 120):
    """Starts a Gradio server process; returns (process, gradio_client.Client) once it answers."""
    from gradio_client import Client

    server = subprocess.Popen([sys.executable, *args, str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    while True:
        try:
            return server, Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        except Exception:
            if server.poll() is not None or time.perf_counter() - start > timeout:
                server.kill()
                raise RuntimeError(f"{args} did not start")
            time.sleep(0.1)


def _photos(workdir: Path, n: int, tag: str) -> list[Path]:
    """n distinct photos (one pixel changed each), so every request is a new upload that must be decoded."""
    from PIL import Image

    base = Image.open(ROOT / "examples" / "chelsea.jpg").convert("RGB")
    out = []
    for i in range(n):
        im = base.copy()
        im.putpixel((i % im.width, i // im.width % im.height), (i % 256, len(tag), 7))
        out.append(workdir / f"{tag}{i}.png")
        im.save(out[-1])
    return out


def _concurrent(url: str, api_name: str, photos: list[list[Path]]) -> float:
    """Each list of photos sent by its own gradio_client client, all clients at once; requests per second."""
    from gradio_client import Client, handle_file

    clients = [Client(url, verbose=False, download_files=False) for _ in photos]
    errors = []

    def work(client, mine):
        for p in mine:
            try:
                client.predict(image=handle_file(str(p)), api_name=api_name)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(e)

    seconds = together([lambda c=c, m=m: work(c, m) for c, m in zip(clients, photos)])
    if errors:
        raise RuntimeError(f"{len(errors)} concurrent requests failed, e.g. {errors[0]}")
    return sum(map(len, photos)) / seconds


def bench_web(requests: int, workdir: Path, clients: int = 16, per_client: int = 2) -> dict:
    """Launches app.py on a ViT-B/16 checkpoint saved by timm in a local folder and calls it like a user."""
    import timm
    from gradio_client import handle_file
    from timm.models import save_for_hf

    ckpt = workdir / "vit_base_patch16_224"
    save_for_hf(timm.create_model("vit_base_patch16_224", pretrained=False), str(ckpt), safe_serialization=True)
    env = {**os.environ, "HF_HOME": str(workdir / "hf_home"), "HF_HUB_OFFLINE": "1", "VIT_DEMO_MODEL": str(ckpt),
           "GRADIO_TEMP_DIR": str(workdir / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    # Each /classify gets a new upload; the /explain that follows is "an image just classified": it reuses the
    # crop, and runs the attention path once; the second /explain reuses the attention maps.
    photos = _photos(workdir, requests + 4, "seq")
    raw_photos = _photos(workdir, requests + 4, "raw")
    conc_photos = _photos(workdir, clients * per_client + per_client * 2, "conc")
    port = _free_port()
    start = time.perf_counter()
    server, client = _start(["app.py", "--port"], port, env)
    url = f"http://127.0.0.1:{port}/"
    try:
        client.predict(image=handle_file(str(photos[0])), api_name="/classify")
        cold = time.perf_counter() - start
        lat = {"classify": [], "explain": [], "explain_again": [], "classify_raw": []}
        for i, photo in enumerate(photos[1:]):
            for name, kwargs in (("classify", {}), ("explain", {"method": "rollout"}), ("explain_again", {"method": "attention"})):
                t = time.perf_counter()
                client.predict(image=handle_file(str(photo)), api_name=f"/{name.split('_')[0]}", **kwargs)
                if i >= 3:  # the first rounds warm up
                    lat[name].append(time.perf_counter() - t)
        raw = RawClient(url, "classify", 5, env["VIT_DEMO_MODEL"])
        for i, photo in enumerate(raw_photos):
            t = time.perf_counter()
            raw(photo)
            if i >= 4:
                lat["classify_raw"].append(time.perf_counter() - t)
        one = _concurrent(url, "/classify", [conc_photos[: per_client * 2]])
        many = _concurrent(url, "/classify", [conc_photos[per_client * (2 + i): per_client * (3 + i)] for i in range(clients)])
        peak = _peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    # gradio_client's own cost: the same upload and call against an app whose function does nothing.
    port = _free_port()
    server, client = _start(["-c", NOOP_APP], port, env)
    try:
        noop = []
        for i, photo in enumerate(_photos(workdir, requests + 4, "noop")):
            t = time.perf_counter()
            client.predict(handle_file(str(photo)), api_name="/classify")
            if i >= 4:
                noop.append(time.perf_counter() - t)
        raw = RawClient(f"http://127.0.0.1:{port}/", "classify")
        noop_raw = []
        for i, photo in enumerate(_photos(workdir, requests + 4, "noopraw")):
            t = time.perf_counter()
            raw(photo)
            if i >= 4:
                noop_raw.append(time.perf_counter() - t)
    finally:
        server.terminate()
        server.wait(30)
    pct = lambda v, q: 1000 * statistics.quantiles(v, n=100)[q - 1]  # noqa: E731
    return {
        "requests": len(lat["classify"]), "cold_start_s": cold, "peak_rss_mb": peak,
        "classify_p50_ms": pct(lat["classify"], 50), "classify_p95_ms": pct(lat["classify"], 95),
        "classify_raw_p50_ms": pct(lat["classify_raw"], 50), "classify_raw_p95_ms": pct(lat["classify_raw"], 95),
        "explain_p50_ms": pct(lat["explain"], 50), "explain_p95_ms": pct(lat["explain"], 95),
        "explain_again_p50_ms": pct(lat["explain_again"], 50),
        "noop_p50_ms": pct(noop, 50), "noop_raw_p50_ms": pct(noop_raw, 50),
        "clients": clients, "one_client_per_s": one, "many_clients_per_s": many,
    }


def bare_forward_ms(repeats: int) -> float:
    """vit_demo's ViT-B/16 forward alone, batch 1, float32 on the CPU: the floor for /classify."""
    m = VisionTransformer(ViTConfig()).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        return 1000 * statistics.median(interleaved({"f": lambda: m(x)}, repeats, "cpu")["f"])


# ---------------------------------------------------------------------------------------------- report


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("timm", "torchvision", "transformers", "gradio", "gradio_client"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu}


def write_markdown(results: dict, path: Path, section: str = "bench") -> None:
    m, v = results["machine"], results["versions"]
    gpu = section != "bench"
    lines = [
        *(["## On a GPU", ""] if gpu else []),
        f"Written by `python bench/bench.py{' --gpu' if gpu else ''}` on {results['date']}. Nothing here is typed by hand.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); GPU: {m['gpu'] or 'none'}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "## The model alone: ViT-B/16, identical weights and input, interleaved runs",
        "",
    ]
    for r in results["model"]:
        lines += [
            f"### {r['device']}, {r['dtype']}, batch {r['batch']} ({r['repeats']} interleaved runs, medians)",
            "",
            "| library | median ms | images/s | vit_demo time / this | max abs logit diff to timm |",
            "|---|---:|---:|---:|---:|",
        ]
        for k in r["median_ms"]:
            lines.append(f"| {k} | {r['median_ms'][k]:.2f} | {r['images_per_s'][k]:.1f} | {r['ratio_to'][k]:.3f} | {r['max_abs_diff_to_timm'][k]:.2e} |")
        lines.append("")
    for r in results.get("runtime", []):
        lines += [
            f"## The serving runtime alone: /classify's forward path, {r['device']}, {r['dtype']}, ViT-B/16, no web server",
            "",
            f"- 1 caller: {r['one_client_images_per_s']:.2f} images/s; {r['clients']} concurrent callers ({r['per_client']} images each): "
            f"{r['many_clients_images_per_s']:.2f} images/s = {r['ratio']:.2f}x (their passes batched: mean batch {r['mean_batch']:.1f}, largest {r['largest_batch']}).",
            "",
        ]
    w = results.get("web")
    if w:
        bare = results["bare_forward_ms"]
        lines += [
            "## The web path: app.py launched, called through gradio_client (CPU, ViT-B/16 from a local Hub cache)",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| cold start: process start to first /classify answer (weights cached) | {w['cold_start_s']:.2f} s |",
            f"| /classify p50 / p95 ({w['requests']} requests) | {w['classify_p50_ms']:.1f} / {w['classify_p95_ms']:.1f} ms |",
            f"| /explain (rollout) p50 / p95, on the image just classified | {w['explain_p50_ms']:.1f} / {w['explain_p95_ms']:.1f} ms |",
            f"| /explain again on that image with other settings (attention kept) p50 | {w['explain_again_p50_ms']:.1f} ms |",
            f"| /classify p50 / p95 called as the page does (upload, queue, event stream; no gradio_client) | {w['classify_raw_p50_ms']:.1f} / {w['classify_raw_p95_ms']:.1f} ms |",
            f"| a no-op endpoint, same upload: through gradio_client / as the page calls it (p50) | {w['noop_p50_ms']:.1f} / {w['noop_raw_p50_ms']:.1f} ms |",
            f"| bare forward, batch 1 (same machine, same run) | {bare:.1f} ms |",
            f"| /classify p50 / bare forward: through gradio_client / as the page calls it | {w['classify_p50_ms'] / bare:.2f}x / {w['classify_raw_p50_ms'] / bare:.2f}x |",
            f"| /explain p50 / /classify p50 | {w['explain_p50_ms'] / w['classify_p50_ms']:.2f}x |",
            f"| /classify throughput: 1 client / {w['clients']} concurrent clients | {w['one_client_per_s']:.2f} / {w['many_clients_per_s']:.2f} requests/s ({w['many_clients_per_s'] / w['one_client_per_s']:.2f}x) |",
            f"| peak resident memory of the server | {w['peak_rss_mb']:.0f} MB |",
            "",
        ]
    lines += ["## Targets" + (" on the GPU" if gpu else ""), ""] + [f"- {t}" for t in results.get("targets", [])]
    if gpu:  # one level down, under "On a GPU"
        lines = [line.replace("## ", "### ", 1) if line.startswith("## ") and i else line for i, line in enumerate(lines)]
    write_section(path, section, "\n".join(lines))


def _verdict(ok: bool, how_far: str) -> str:
    return "met" if ok else f"missed by {how_far}"


def targets(results: dict) -> list[str]:
    out = []
    model = {(r["device"].split(":")[0], r["dtype"], r["batch"]): r for r in results["model"]}
    cpu = model.get(("cpu", "float32", 1))
    if cpu:
        ratio = cpu["ratio_to"]["timm"]
        out.append(f"CPU batch-1 forward at most 1.0x timm's: {ratio:.3f}x, {_verdict(ratio <= 1.0, f'{100 * (ratio - 1):.1f}%')}.")
    w = results.get("web")
    if w:
        bare = results["bare_forward_ms"]
        r1, r1_raw = w["classify_p50_ms"] / bare, w["classify_raw_p50_ms"] / bare
        r2 = w["explain_p50_ms"] / w["classify_p50_ms"]
        line = f"/classify p50 at most 1.2x the bare forward: {r1:.2f}x through gradio_client, {_verdict(r1 <= 1.2, f'{r1 - 1.2:.2f}x')}"
        if r1 > 1.2:
            line += (
                f". Called as the page calls it (upload, queue, event stream) it is {r1_raw:.2f}x. The rest is gradio_client's"
                f" own: on a no-op endpoint it takes {w['noop_p50_ms']:.0f} ms against {w['noop_raw_p50_ms']:.0f} ms for the same"
                " requests made directly (its result thread looks for new messages every 50 ms), and that lies outside the app"
            )
        out.append(line + ".")
        out.append(f"/explain p50 at most 1.6x /classify: {r2:.2f}x, {_verdict(r2 <= 1.6, f'{r2 - 1.6:.2f}x')}.")
        cold = w["cold_start_s"]
        out.append(f"Cold start at most 10 s: {cold:.2f} s, {_verdict(cold <= 10, f'{cold - 10:.2f} s')}.")
    b1, b256 = model.get(("cuda", "bfloat16", 1)), model.get(("cuda", "bfloat16", 256))
    if b1:
        ratio = b1["median_ms"]["vit_demo+cuda-graph"] / b1["median_ms"]["timm"]
        out.append(f"GPU batch-1 bfloat16 forward at most 0.3x eager timm's: {ratio:.3f}x (CUDA graph), {_verdict(ratio <= 0.3, f'{ratio - 0.3:.3f}x')}.")
    if b256:
        ratio = b256["images_per_s"]["vit_demo"] / b256["images_per_s"]["timm"]
        out.append(f"GPU batch-256 bfloat16 throughput at least 1.1x eager timm's: {ratio:.3f}x, {_verdict(ratio >= 1.1, f'{1.1 - ratio:.3f}x')}.")
    gpu_runtime = [r for r in results.get("runtime", []) if r["device"].startswith("cuda")]
    if gpu_runtime:
        r = gpu_runtime[0]
        ratio = r["ratio"]
        out.append(f"{r['clients']} concurrent clients on a GPU at least 4x one client's throughput: {ratio:.2f}x (serving runtime"
                   f" without the web server, which this GPU machine lacks), {_verdict(ratio >= 4, f'{4 - ratio:.2f}x')}.")
    if not b1 and not b256:
        out.append("GPU targets: not measured, this machine has no GPU" + (" (see \"On a GPU\" below)." if results.get("gpu_elsewhere") else "."))
    return out


def gpu_models(results: dict, repeats: int) -> None:
    """The model alone on the GPU: float32 and bfloat16, batch 1 and 256, into results["model"]."""
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 256):
            results["model"].append(bench_models("cuda", dtype, batch, repeats))
            print(json.dumps(results["model"][-1], indent=1), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-only", action="store_true", help="skip the web path (no gradio needed)")
    p.add_argument("--gpu", action="store_true", help="only the GPU measures, into their own section (needs CUDA)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cpu-batch", type=int, default=32)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients for the throughput measures")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "versions": versions(), "model": []}
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU, and torch sees none here.")
        gpu_models(results, args.repeats)
        results["runtime"] = [bench_runtime("cuda", args.clients, 50)]
        print(json.dumps(results["runtime"][-1], indent=1), flush=True)
        results["targets"] = targets(results)
        write_markdown(results, args.out, "bench-gpu")
        (args.out.parent / "BENCHMARKS-gpu.json").write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
        return
    results["gpu_elsewhere"] = "<!-- bench-gpu:start -->" in (args.out.read_text() if args.out.exists() else "")
    for batch in (1, args.cpu_batch):
        results["model"].append(bench_models("cpu", torch.float32, batch, args.repeats if batch == 1 else max(5, args.repeats // 4)))
        print(json.dumps(results["model"][-1], indent=1), flush=True)
    if torch.cuda.is_available():
        gpu_models(results, args.repeats)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        results.setdefault("runtime", []).append(bench_runtime(device, args.clients, 2 if device == "cpu" else 50))
        print(json.dumps(results["runtime"][-1], indent=1), flush=True)
    if not args.model_only:
        with tempfile.TemporaryDirectory() as tmp:
            results["web"] = bench_web(args.requests, Path(tmp), args.clients)
        results["bare_forward_ms"] = bare_forward_ms(args.repeats)
        print(json.dumps(results["web"], indent=1), flush=True)
    results["targets"] = targets(results)
    write_markdown(results, args.out)
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
