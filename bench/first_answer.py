"""The first answer after a start against the second, per precision, with and without the warm-up the app does
before it says that it is serving. Writes its section of BENCHMARKS.md.

    python bench/first_answer.py               # 3 fresh processes per row, 1 torch thread
    python bench/first_answer.py --runs 5 --threads 4

Each row is measured in fresh processes, one after the other: the process imports vit_demo, loads the model
(`load_classifier`) in the precision named, and, as the app does (`runtime.warm_up`, called by `ui.page` before it
logs "Serving"), warms it up, or not; then it classifies one photo twice and draws its rollout map twice. With one
torch thread (the default) each answer's time is the CPU time of the thread that computes it, which other work on a
shared machine changes little; with more threads, wall-clock time. "Start to ..." is wall-clock from the moment
the process was spawned. Medians over the runs.
The models: the bundled one (28x28 Fashion-MNIST) and ViT-B/16 with timm's random weights, saved as timm
publishes it. Nothing here needs gradio, so it also runs on machines without it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sections import write_section  # noqa: E402  (bench/, beside this script)

CHILD = r"""
import json, sys, time
spawned = float(sys.argv[1])
import torch
threads = int(sys.argv[6])
torch.set_num_threads(threads)
clock = time.thread_time if threads == 1 else time.perf_counter
from PIL import Image
from vit_demo import load_classifier
from vit_demo.runtime import warm_up
path, dtype, warm, photo = sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4] == "1", Image.open(sys.argv[5])
photo.load()
clf = load_classifier(path, device="cpu", dtype=dtype)
if warm:
    warm_up(clf)
ready = time.time()

def took(fn):
    start = clock()
    fn()
    return 1000 * (clock() - start)

answers = [took(lambda: clf.predict(photo))]
first_answer = time.time()
answers.append(took(lambda: clf.predict(photo)))
maps = [took(lambda: clf.maps(photo, "rollout")) for _ in range(2)]
print(json.dumps({"ready_s": ready - spawned, "first_answer_s": first_answer - spawned,
                  "answer_ms": answers, "map_ms": maps}))
"""


def models(tmp: Path) -> dict[str, tuple[str, Path]]:
    """name -> (checkpoint, photo)."""
    import timm
    from timm.models import save_for_hf

    from vit_demo.registry import BUNDLED

    vit = tmp / "vit_base_patch16_224"
    save_for_hf(timm.create_model("vit_base_patch16_224", pretrained=False).eval(), str(vit), safe_serialization=True)
    return {
        "bundled (28x28, 6 layers)": (BUNDLED, ROOT / "examples" / "fashion-mnist-sneaker-9.png"),
        "ViT-B/16 (224x224, 12 layers)": (str(vit), ROOT / "examples" / "chelsea.jpg"),
    }


def run(checkpoint: str, dtype: str, warm: bool, photo: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VIT_DEMO_PRECISION", None)
    done = subprocess.run([sys.executable, "-c", CHILD, repr(time.time()), checkpoint, dtype, "1" if warm else "0", str(photo),
                           str(threads)],
                          env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    return {
        "ready_s": statistics.median(r["ready_s"] for r in runs),
        "first_answer_s": statistics.median(r["first_answer_s"] for r in runs),
        "first_ms": statistics.median(r["answer_ms"][0] for r in runs),
        "second_ms": statistics.median(r["answer_ms"][1] for r in runs),
        "first_map_ms": statistics.median(r["map_ms"][0] for r in runs),
        "second_map_ms": statistics.median(r["map_ms"][1] for r in runs),
    }


def section(r: dict) -> str:
    clock = ("CPU time of the one thread that computes them (1 torch thread)" if r["threads"] == 1
             else f"wall-clock, {r['threads']} torch threads")
    lines = [
        "## The first answer after a start",
        "",
        f"Written by `python bench/first_answer.py` on {r['date']}; medians of {r['runs']} fresh processes per row. "
        "Nothing here is typed by hand.",
        "",
        f"- CPU: {r['cpu']}, {r['cores']} cores; bfloat16 support: {r['support']}; torch {r['torch']}. "
        f"Answers and maps: {clock}. "
        f"Load average (1 min) at the start and end of the run: {r['load'][0]:.1f} and {r['load'][1]:.1f}.",
        "- Warm-up: what the app does before it says that it is serving (`runtime.warm_up`: one classification "
        "pass at the crop's size, as served, and one pass on the explicit attention path). Ready: from the "
        "process's start to the model loaded (and warmed up).",
        "",
        "| model | precision | warm-up | start to ready (s) | start to first answer (s) | first answer (ms) "
        "| second answer (ms) | first / second | first map (ms) | second map (ms) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        m = row["medians"]
        lines.append(
            f"| {row['model']} | {row['dtype']} | {'yes' if row['warm'] else 'no'} | {m['ready_s']:.2f} | "
            f"{m['first_answer_s']:.2f} | {m['first_ms']:.1f} | {m['second_ms']:.1f} | "
            f"{m['first_ms'] / m['second_ms']:.1f}x | {m['first_map_ms']:.1f} | {m['second_map_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="fresh processes per row")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: answers in CPU time, else wall-clock)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    import torch

    from vit_demo.runtime import _cpu_model, cpu_bf16_support

    r = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "runs": args.runs,
         "cpu": _cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "support": cpu_bf16_support(),
         "torch": torch.__version__, "load": [os.getloadavg()[0]], "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (checkpoint, photo) in models(Path(tmp)).items():
            for dtype in ("float32", "bfloat16"):
                for warm in (False, True):
                    runs = [run(checkpoint, dtype, warm, photo, args.threads) for _ in range(args.runs)]
                    row = {"model": name, "dtype": dtype, "warm": warm, "runs": runs, "medians": medians(runs)}
                    print(json.dumps(row), flush=True)
                    r["rows"].append(row)
    r["load"].append(os.getloadavg()[0])
    write_section(args.out, "first_answer", section(r))
    print(f"wrote the first_answer section of {args.out}")


if __name__ == "__main__":
    main()
