"""Precision on the CPU: what each precision costs in time and accuracy. Writes its section of BENCHMARKS.md.

    python bench/precision.py               # the section between its markers in BENCHMARKS.md
    python bench/precision.py --no-compile  # without the torch.compile rows (they take a minute to compile)
    python bench/precision.py --threads 2   # wall-clock times with 2 torch threads, on a machine of one's own

ViT-B/16 with random weights (made by timm, loaded into vit_demo's model): timm's float32 forward, vit_demo's
forward as served (Runtime, at the precision `inference_dtype` picks on this CPU), and vit_demo's model in
float32, in bfloat16 and under bfloat16 autocast, optionally compiled with inductor freezing, all at batch 1,
interleaved (A B C ... A B C ...); medians and ratios from one run. Accuracy: the bundled model's
top-1 agreement with float32 on Fashion-MNIST's 10,000 test images, and ViT-B/16's relative logit error
on the example photos.

With one torch thread (the default) each forward runs in the calling thread, and the time taken is that
thread's CPU time: on a machine whose cores other work shares, wall-clock times swing with the other work,
and CPU times and their ratios do not. With more threads, wall-clock time is taken.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vit_demo import load_classifier  # noqa: E402
from vit_demo.model import ViTConfig, VisionTransformer  # noqa: E402
from vit_demo.preprocess import Preprocessor, from_timm  # noqa: E402
from vit_demo.registry import BUNDLED  # noqa: E402
from vit_demo.runtime import Runtime, cpu_bf16_support, cpu_bf16_time_ratio, inference_dtype  # noqa: E402

from sections import write_section  # noqa: E402  (bench/, beside this script)

T10K = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
PHOTOS = sorted((ROOT / "examples").glob("*.jpg"))


def interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Each fn `repeats` times, round-robin, after `warmup` rounds: median milliseconds per call (the calling
    thread's CPU time with one torch thread, else wall-clock time)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            if r >= warmup:
                times[name].append(clock() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def versions() -> dict:
    import timm

    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__}


def cpu() -> dict:
    """The CPU model and what it has for bfloat16."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = flags.group(1).split() if flags else []
    return {
        "model": model.group(1).strip() if model else "unknown",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "amx_flags": sorted(f for f in flags if f.startswith("amx")),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "probe": cpu_bf16_support(),
    }


def speed(repeats: int, compile_: bool) -> dict:
    """ViT-B/16 batch-1 forwards, interleaved; ms medians and ratios to timm's float32 forward."""
    import timm

    auto = inference_dtype(torch.device("cpu"), ViTConfig())
    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    f32 = VisionTransformer(ViTConfig()).eval()
    f32.load_state_dict(ref.state_dict())
    bf16 = copy.deepcopy(f32).to(torch.bfloat16)
    served = Runtime(bf16 if auto == torch.bfloat16 else f32, torch.device("cpu"), auto)
    x = torch.randn(1, 3, 224, 224)
    xb = x.to(torch.bfloat16)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return f32(x)

    fns = {
        "timm, float32": lambda: ref(x),
        f"vit_demo as served (Runtime, auto: {str(auto).removeprefix('torch.')})": lambda: served(x),
        "vit_demo, float32": lambda: f32(x),
        "vit_demo, bfloat16 weights": lambda: bf16(xb),
        "vit_demo, bfloat16 autocast": autocast,
    }
    compile_s = {}
    with torch.inference_mode():
        if compile_:
            import torch._inductor.config as inductor

            inductor.freezing = True  # weights folded into the compiled graph as constants (inference only)
            for name, model, inp in (("float32", f32, x), ("bfloat16 weights", bf16, xb)):
                compiled = torch.compile(copy.deepcopy(model))
                start = time.perf_counter()
                compiled(inp)
                compile_s[name] = time.perf_counter() - start
                fns[f"vit_demo, {name}, torch.compile + freezing"] = lambda c=compiled, i=inp: c(i)
        ms = interleaved(fns, repeats)
    base = ms["timm, float32"]
    return {"auto": str(auto), "repeats": repeats, "median_ms": ms, "ratio_to_timm_float32": {k: v / base for k, v in ms.items()},
            "compile_s": compile_s, "probe_ratio_vit_b16": cpu_bf16_time_ratio(197, 768, 3072)}


@torch.inference_mode()
def logit_error() -> dict:
    """bfloat16 vs float32 logits of ViT-B/16 (timm's random initialisation) on the example photos."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    f32 = VisionTransformer(ViTConfig()).eval()
    f32.load_state_dict(ref.state_dict())
    bf16 = copy.deepcopy(f32).to(torch.bfloat16)
    pre = Preprocessor(from_timm(ref.pretrained_cfg))
    x = torch.cat([pre(Image.open(p)) for p in PHOTOS])  # (photos, 3, 224, 224)
    a, b = f32(x), bf16(x.to(torch.bfloat16)).float()
    rel = ((b - a).norm(dim=-1) / a.norm(dim=-1)).tolist()
    return {"photos": [p.name for p in PHOTOS], "relative_l2": rel, "max_relative_l2": max(rel),
            "max_abs": (b - a).abs().max().item(), "logit_std": a.std().item()}


@torch.inference_mode()
def agreement() -> dict:
    """The bundled model in bfloat16 against float32 on Fashion-MNIST's 10,000 test images; and its batch-1 speed."""
    with gzip.open(T10K, "rb") as f:
        images = torch.from_numpy(np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28).copy())
    full = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)
    half = load_classifier(BUNDLED, device="cpu", dtype=torch.bfloat16)
    p32, p16 = [], []
    for batch in images.split(2000):
        x = full.preprocessor.normalize(batch)
        p32.append(full.model(x).softmax(-1))
        p16.append(half.model(x.to(torch.bfloat16)).float().softmax(-1))
    p32, p16 = torch.cat(p32), torch.cat(p16)
    top = p32.argmax(-1)
    x1 = full.preprocessor.normalize(images[:1])
    ms = interleaved({"float32": lambda: full.model(x1), "bfloat16": lambda: half.model(x1.to(torch.bfloat16))}, 100)
    return {
        "images": len(images),
        "top1_agreement": (p16.argmax(-1) == top).double().mean().item(),
        "disagreements": int((p16.argmax(-1) != top).sum()),
        "max_top1_prob_diff": (p32.gather(1, top[:, None]) - p16.gather(1, top[:, None])).abs().max().item(),
        "batch1_ms": ms,
        "auto": str(inference_dtype(torch.device("cpu"), full.config)),
    }


def section(r: dict) -> str:
    c, s, a, e = r["cpu"], r["speed"], r["agreement"], r["logits"]
    clock = ("CPU time of the one thread that runs the forward (1 torch thread), which other work on the machine changes"
             " little (`--threads N` takes wall-clock time instead)" if r["threads"] == 1
             else f"wall-clock, {r['threads']} torch threads")
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [
        "## Precision on the CPU",
        "",
        f"Written by `python bench/precision.py` on {r['date']}, in one run. Nothing here is typed by hand.",
        "",
        f"- CPU: {c['model']}, {c['cores']} cores ({c['torch_threads']} torch thread{'s' if c['torch_threads'] != 1 else ''}); AMX: {yes(c['amx'])}"
        f" ({', '.join(c['amx_flags']) or 'no amx flags'}); avx512_bf16: {yes(c['avx512_bf16'])}; torch's CPU capability: {c['capability']}.",
        f"- torch {r['versions']['torch']}, timm {r['versions']['timm']}. Load average (1 min) at the start and end of the run:"
        f" {r['load'][0]:.1f} and {r['load'][1]:.1f}.",
        f"- Times: {clock}.",
        f"- The automatic choice (`inference_dtype`): {s['auto'].removeprefix('torch.')} for ViT-B/16 on this CPU"
        + (f" (no AMX; its bfloat16 matrix product of ViT-B/16's MLP size took {s['probe_ratio_vit_b16']:.2f}x float32's time)."
           if c["probe"] == "avx512_bf16" else "."),
        "",
        f"### ViT-B/16, batch 1, random weights ({s['repeats']} interleaved runs, medians)",
        "",
        "| forward | median ms | time / timm float32 |",
        "|---|---:|---:|",
    ]
    for k, ms in s["median_ms"].items():
        lines.append(f"| {k} | {ms:.1f} | {s['ratio_to_timm_float32'][k]:.2f}x |")
    lines.append("")
    if s["compile_s"]:
        lines += ["Compiling took " + ", ".join(f"{v:.0f} s ({k})" for k, v in s["compile_s"].items())
                  + " on this machine; the served path does not compile.", ""]
    served = next(k for k in s["median_ms"] if k.startswith("vit_demo as served"))
    f32 = s["median_ms"]["vit_demo, float32"]
    lines += [
        f"The served forward takes {s['median_ms'][served] / f32:.2f}x vit_demo's own float32 forward "
        f"({'not slower than float32: met' if s['median_ms'][served] <= f32 else 'slower than float32: missed'}).",
        "",
        "### Accuracy against float32",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| bundled model, Fashion-MNIST test images: top-1 agreement of bfloat16 with float32 | {a['top1_agreement']:.2%} ({a['disagreements']} of {a['images']:,} differ) |",
        f"| bundled model: largest difference in the top-1 class's probability | {a['max_top1_prob_diff']:.4f} |",
        f"| ViT-B/16 (timm's random initialisation), {len(e['photos'])} example photos: relative logit error, largest (L2 norm of the difference / L2 norm of the float32 logits) | {e['max_relative_l2']:.4f} |",
        f"| ViT-B/16: largest absolute logit difference (float32 logits have std {e['logit_std']:.2f}) | {e['max_abs']:.4f} |",
        "",
        f"The bundled model (805k parameters) at batch 1: float32 {a['batch1_ms']['float32']:.2f} ms, bfloat16 "
        f"{a['batch1_ms']['bfloat16']:.2f} ms; the automatic choice for it: {a['auto'].removeprefix('torch.')}"
        " (small matrix products gain nothing from bfloat16 here).",
        "",
        "int8: not measured. `torch.ao.quantization.quantize_dynamic` is deprecated and announced for removal;"
        " torch's maintained int8 path is the separate torchao package, which vit_demo does not depend on.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is measured, else wall-clock)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop("VIT_DEMO_PRECISION", None)  # the automatic choice is what is measured
    r = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "versions": versions(), "cpu": cpu(),
         "load": [os.getloadavg()[0]], "threads": args.threads}
    print(json.dumps(r["cpu"]), flush=True)
    r["logits"] = logit_error()
    print(json.dumps(r["logits"]), flush=True)
    r["agreement"] = agreement()
    print(json.dumps(r["agreement"]), flush=True)
    r["speed"] = speed(args.repeats, not args.no_compile)
    print(json.dumps(r["speed"], indent=1), flush=True)
    r["load"].append(os.getloadavg()[0])
    write_section(args.out, "precision", section(r))
    print(f"wrote the precision section of {args.out}")


if __name__ == "__main__":
    main()
