"""Benchmarks: vit_demo's ViT against timm, torchvision and transformers, and the web path. Writes BENCHMARKS.md.

    python bench/bench.py                 # everything this machine can run, then BENCHMARKS.md
    python bench/bench.py --model-only    # the model alone (no gradio needed: runs on a bare GPU machine)

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
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vit_demo.convert import TORCHVISION_RENAMES, _mapping, to_transformers  # noqa: E402
from vit_demo.model import ViTConfig, VisionTransformer  # noqa: E402


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
    inverse = {new: old for old, new in _mapping(TORCHVISION_RENAMES, 12).items()}
    tv.load_state_dict({inverse[k]: v for k, v in sd.items()})
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
        ref = models["timm"](x).float()
        diffs = {k: (m(x).float() - ref).abs().max().item() for k, m in models.items()}
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        times = interleaved(fns, repeats, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "repeats": repeats,
        "median_ms": {k: 1000 * v for k, v in med.items()},
        "images_per_s": {k: batch / v for k, v in med.items()},
        "ratio_to": {k: med["vit_demo"] / v for k, v in med.items()},
        "max_abs_diff_to_timm": diffs,
    }


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


def bench_web(requests: int, workdir: Path) -> dict:
    """Launches app.py on a ViT-B/16 checkpoint laid out in a Hugging Face cache and calls it like a user."""
    from gradio_client import Client, handle_file

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import lay_out_hub_cache, make_timm

    ckpt = make_timm(workdir / "ckpt", "vit_base_patch16_224")
    hf_home = workdir / "hf_home"
    lay_out_hub_cache(hf_home, "timm/vit_base_patch16_224.bench", ckpt.path)
    port = _free_port()
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "VIT_DEMO_MODEL": "timm/vit_base_patch16_224.bench",
           "GRADIO_TEMP_DIR": str(workdir / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    # Distinct photos (one pixel changed each), so every /classify starts from a new upload and the /explain that
    # follows is "an image just classified": it reuses the crop, and runs the attention path once.
    from PIL import Image

    base = Image.open(ROOT / "examples" / "chelsea.jpg").convert("RGB")
    photos = []
    for i in range(requests + 4):
        im = base.copy()
        im.putpixel((i % im.width, 0), (i % 256, 0, 0))
        im.save(workdir / f"photo{i}.png")
        photos.append(handle_file(str(workdir / f"photo{i}.png")))
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = None
        while client is None:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
            except Exception:
                if server.poll() is not None or time.perf_counter() - start > 120:
                    raise RuntimeError("the app did not start")
                time.sleep(0.1)
        client.predict(image=photos[0], api_name="/classify")
        cold = time.perf_counter() - start
        lat = {"classify": [], "explain": [], "explain_again": []}
        for i, photo in enumerate(photos[1:]):
            for name, kwargs in (("classify", {}), ("explain", {"method": "rollout"}), ("explain_again", {"method": "attention"})):
                t = time.perf_counter()
                client.predict(image=photo, api_name=f"/{name.split('_')[0]}", **kwargs)
                if i >= 3:  # the first rounds warm up
                    lat[name].append(time.perf_counter() - t)
        peak = _peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    pct = lambda v, q: 1000 * statistics.quantiles(v, n=100)[q - 1]  # noqa: E731
    return {
        "requests": len(lat["classify"]), "cold_start_s": cold, "peak_rss_mb": peak,
        "classify_p50_ms": pct(lat["classify"], 50), "classify_p95_ms": pct(lat["classify"], 95),
        "explain_p50_ms": pct(lat["explain"], 50), "explain_p95_ms": pct(lat["explain"], 95),
        "explain_again_p50_ms": pct(lat["explain_again"], 50),
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


def write_markdown(results: dict, path: Path) -> None:
    m, v = results["machine"], results["versions"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python bench/bench.py` on {results['date']}. Nothing here is typed by hand.",
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
            f"| bare forward, batch 1 (same machine, same run) | {bare:.1f} ms |",
            f"| /classify p50 / bare forward | {w['classify_p50_ms'] / bare:.2f}x |",
            f"| /explain p50 / /classify p50 | {w['explain_p50_ms'] / w['classify_p50_ms']:.2f}x |",
            f"| peak resident memory of the server | {w['peak_rss_mb']:.0f} MB |",
            "",
        ]
    lines += ["## Targets", ""] + [f"- {t}" for t in results.get("targets", [])] + [""]
    path.write_text("\n".join(lines))


def targets(results: dict) -> list[str]:
    out = []
    cpu = [r for r in results["model"] if r["device"] == "cpu" and r["batch"] == 1]
    if cpu:
        ratio = cpu[0]["ratio_to"]["timm"]
        out.append(f"CPU batch-1 forward at most 1.0x timm's: {ratio:.3f}x, {'met' if ratio <= 1.0 else f'missed by {100 * (ratio - 1):.1f}%'}.")
    w = results.get("web")
    if w:
        r1 = w["classify_p50_ms"] / results["bare_forward_ms"]
        r2 = w["explain_p50_ms"] / w["classify_p50_ms"]
        out.append(f"/classify p50 at most 1.2x the bare forward: {r1:.2f}x, {'met' if r1 <= 1.2 else 'missed'}.")
        out.append(f"/explain p50 at most 1.6x /classify: {r2:.2f}x, {'met' if r2 <= 1.6 else 'missed'}.")
        out.append(f"Cold start at most 10 s: {w['cold_start_s']:.2f} s, {'met' if w['cold_start_s'] <= 10 else 'missed'}.")
    gpu = [r for r in results["model"] if r["device"].startswith("cuda")]
    if not gpu:
        out.append("GPU targets: not measured, this machine has no GPU.")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-only", action="store_true", help="skip the web path (no gradio needed)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cpu-batch", type=int, default=32)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "versions": versions(), "model": []}
    for batch in (1, args.cpu_batch):
        results["model"].append(bench_models("cpu", torch.float32, batch, args.repeats if batch == 1 else max(5, args.repeats // 4)))
        print(json.dumps(results["model"][-1], indent=1), flush=True)
    if torch.cuda.is_available():
        for dtype in (torch.float32, torch.bfloat16):
            for batch in (1, 256):
                results["model"].append(bench_models("cuda", dtype, batch, args.repeats))
                print(json.dumps(results["model"][-1], indent=1), flush=True)
    if not args.model_only:
        with tempfile.TemporaryDirectory() as tmp:
            results["web"] = bench_web(args.requests, Path(tmp))
        results["bare_forward_ms"] = bare_forward_ms(args.repeats)
        print(json.dumps(results["web"], indent=1), flush=True)
    results["targets"] = targets(results)
    write_markdown(results, args.out)
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
