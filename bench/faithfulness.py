"""How far each explanation method can be trusted, and what the class-specific ones cost. Writes its own section
of BENCHMARKS.md, between `<!-- faithfulness:start -->` and `<!-- faithfulness:end -->`, leaving the rest as it is.

    python bench/faithfulness.py                          # 1000 Fashion-MNIST test images, then BENCHMARKS.md
    python bench/faithfulness.py --only costs             # re-measure one part, keep the others' figures
    python bench/faithfulness.py --images 50 --out /tmp/B.md

Every figure is kept in BENCHMARKS-faithfulness.json beside the Markdown file, so that one part can be measured
again (the cost figures, say, on a quiet machine) without the others.

- Deletion and insertion AUCs and SaCo (vit_demo.faithfulness, default settings) of every method on the bundled
  model, for its top class, beside the random baseline (the mean of the seeded random orders) and a random map's.
- Model randomisation (Adebayo et al. 2018): each method's maps from the trained model and from a freshly
  initialised one, compared by Spearman rank correlation.
- Cost on the CPU: each class-specific map against a prediction (ViT-B/16 with random weights, and the bundled
  model), and a ViT-B/16 faithfulness score at default settings in forward passes, steps and time.

    python bench/faithfulness.py --render                 # rewrite the section from the JSON figures only
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vit_demo import ViTConfig, VisionTransformer, load_classifier  # noqa: E402
from vit_demo import attribution  # noqa: E402
from vit_demo import explain as ex  # noqa: E402
from vit_demo import faithfulness as faith  # noqa: E402
from vit_demo.classifier import Classifier  # noqa: E402
from vit_demo.hub import Checkpoint  # noqa: E402
from vit_demo.preprocess import PreprocessConfig  # noqa: E402
from sections import write_section  # noqa: E402  (bench/, beside this script)

BUNDLED = ROOT / "vit_demo" / "weights" / "vit-fashion-mnist"
IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
PARTS = ("costs", "sanity", "table")
RANDOM = "random order"

# The maps compared (every method of the table that draws one map), at the options the page uses by default.
METHODS = [name for name, m in ex.METHOD_TABLE.items() if not m.panels]
DETAILS = {"attention": "last layer, mean of heads", "rollout": f"mean of heads, discard ratio {ex.DEFAULT_DISCARD_RATIO}",
           "gradient_rollout": f"discard ratio {ex.DEFAULT_DISCARD_RATIO}"}


def title(name: str) -> str:
    """A method's row name: its label on the page, its API name, and its options."""
    if name not in ex.METHOD_TABLE:
        return name
    detail = f", {DETAILS[name]}" if name in DETAILS else ""
    return f"{ex.METHOD_TABLE[name].label} (`{name}`{detail})"


def read_images(count: int) -> torch.Tensor:
    """The first `count` Fashion-MNIST test images, uint8 (count, 1, 28, 28), from the gzipped IDX file."""
    with gzip.open(IMAGES, "rb") as f:
        magic, n, rows, cols = (int(v) for v in np.frombuffer(f.read(16), dtype=">u4"))
        if magic != 2051:
            raise SystemExit(f"{IMAGES} is not an IDX image file: install dataset-fashion-mnist.")
        n = min(n, count)
        return torch.from_numpy(np.frombuffer(f.read(n * rows * cols), dtype=np.uint8).reshape(n, 1, rows, cols).copy())


def batch_maps(clf: Classifier, x: torch.Tensor, targets=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every method's map for a batch, from one forward pass and a plain and a balanced backward pass:
    (targets (B,), {name: (B, gh * gw)})."""
    plain = attribution.trace(clf.model, x, targets, "plain")
    balanced = attribution.trace(clf.model, x, plain.targets, "balanced")
    grid = (x.shape[-2] // clf.config.patch_size, x.shape[-1] // clf.config.patch_size)
    rows = tuple(clf.readout_rows(plain.attns[0].shape[-1]))
    maps = {}
    for name in METHODS:
        t = balanced if ex.METHOD_TABLE[name].gradients == "balanced" else plain
        out = []
        for i in range(len(x)):
            one = t.image(i)
            out.append(ex.patch_map(name, ex.Evidence(one.attns, clf.config.num_prefix_tokens, rows, one.grads, one.tokens, one.pixels), grid).flatten())
        maps[name] = torch.stack(out)
    return plain.targets, maps


def score_images(clf: Classifier, crops: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Deletion and insertion AUCs of every method and of a random order, per image, at default settings."""
    p = clf.config.patch_size
    grid = (crops.shape[-2] // p, crops.shape[-1] // p)

    @torch.inference_mode()
    def predict(b):
        return clf.model(b)

    scores = {name: {"deletion": [], "insertion": [], "saco": []} for name in [*METHODS, RANDOM]}
    x = clf.preprocessor.normalize(crops)  # (B, 1, 28, 28)
    targets, maps = batch_maps(clf, x)
    n = grid[0] * grid[1]
    for i in range(len(x)):
        # Each image its own random orders and its own shuffle of ties: the same order for every image would be a
        # fixed spatial pattern, and Fashion-MNIST's clothes sit in the same place in every image.
        orders = {name: faith.ranking(maps[name][i], seed=faith.TIE_SEED + i) for name in METHODS}
        randoms = faith.random_orders(n, seed=faith.RANDOM_SEED + faith.RANDOM_ORDERS * i)
        out, ends, _ = faith.deletion_insertion(predict, x[i : i + 1], {**orders, **randoms}, int(targets[i]), grid, p, batch_size=1024)
        out[RANDOM] = faith.mean_scores([out[k] for k in randoms])
        # A random map for SaCo: values in a random order (one of the seeded orders, n for its first patch).
        rank = torch.empty(n)
        rank[randoms["random 0"]] = torch.arange(n, 0, -1, dtype=torch.float32)
        saliency = {**{name: maps[name][i] for name in METHODS}, RANDOM: rank}
        for name in scores:
            scores[name]["deletion"].append(out[name]["deletion_auc"])
            scores[name]["insertion"].append(out[name]["insertion_auc"])
            value, _ = faith.saco_score(predict, x[i : i + 1], saliency[name], int(targets[i]), grid, p, ends["full"], batch_size=1024)
            scores[name]["saco"].append(float("nan") if value is None else value)
    return scores


_worker_clf = None


def _start_worker(threads: int) -> None:
    global _worker_clf
    torch.set_num_threads(threads)
    _worker_clf = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)


def _score_chunk(bounds: tuple[int, int]) -> dict:
    start, stop = bounds
    return score_images(_worker_clf, read_images(stop)[start:stop])


def faithfulness_table(count: int, workers: int, chunk: int = 50) -> dict:
    """score_images over the first `count` test images, in `workers` processes of one thread each (on 2 cores, two
    one-thread processes get through more small forward passes than one two-thread process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = [(b, min(b + chunk, count)) for b in range(0, count, chunk)]
    scores = {name: {"deletion": [], "insertion": [], "saco": []} for name in [*METHODS, RANDOM]}
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # no fork after torch has started its thread pools
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=(1,)) as pool:
        for (_, stop), part in zip(bounds, pool.map(_score_chunk, bounds)):
            for name in scores:
                for curve in ("deletion", "insertion", "saco"):
                    scores[name][curve] += part[name][curve]
            print(f"faithfulness: {stop}/{count} images, {time.perf_counter() - start:.0f} s", flush=True)
    n = 7 * 7
    return {"images": count, "steps": faith.default_steps(n), "patches": n, "seconds": time.perf_counter() - start, "scores": scores}


def sanity(clf: Classifier, crops: torch.Tensor, seed: int = 0, batch: int = 250) -> dict:
    """Spearman's rho between each image's maps from the trained model and from a freshly initialised one."""
    randomised = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)
    torch.manual_seed(seed)
    randomised.model.load_state_dict(VisionTransformer(randomised.config).state_dict())
    rhos = {name: [] for name in METHODS}
    for b0 in range(0, len(crops), batch):
        x = clf.preprocessor.normalize(crops[b0 : b0 + batch])
        targets, trained = batch_maps(clf, x)
        _, random = batch_maps(randomised, x, targets)  # the trained model's class, asked of both
        for name in METHODS:
            for a, b in zip(trained[name], random[name]):
                rhos[name].append(float(spearmanr(a.numpy(), b.numpy()).statistic))
    return rhos


def vit_b16() -> Classifier:
    """ViT-B/16 with random weights, ImageNet preprocessing (resize 256, crop 224): for timing only."""
    torch.manual_seed(0)
    cfg = ViTConfig()
    ckpt = Checkpoint(VisionTransformer(cfg).state_dict(), cfg, PreprocessConfig(), [f"class {i}" for i in range(1000)], "timm", "random ViT-B/16")
    return Classifier(ckpt, device="cpu", dtype=torch.float32)


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each fn, run round-robin: one list per fn, one entry per round."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a / b: calls of one round ran back to back, so a busy machine slows both alike."""
    return statistics.median(x / y for x, y in zip(a, b))


def costs(repeats: int) -> dict:
    photo = Image.open(ROOT / "examples" / "chelsea.jpg").convert("RGB")
    shoe = Image.open(ROOT / "examples" / "fashion-mnist-ankle-boot-0.png")
    out = {"repeats": repeats}
    for name, clf, image in (("vit_b16", vit_b16(), photo), ("bundled", load_classifier(BUNDLED, device="cpu", dtype=torch.float32), shoe)):
        x = clf.preprocess(image)

        @torch.inference_mode()
        def forward():
            clf.model(x)

        fns = {"predict": lambda: clf.predict(image, k=5), "forward": forward,
               "relevance_passes": lambda: clf.attention_gradients(x),
               "balanced_passes": lambda: clf.attention_gradients(x, gradients="balanced")}
        for method in ex.CLASS_SPECIFIC:
            fns[method] = lambda method=method: clf.heatmap(image, method)
        t = interleaved(fns, repeats)
        out[name] = {k: 1000 * statistics.median(v) for k, v in t.items()}
        for method in ex.CLASS_SPECIFIC:
            out[name][f"{method}_over_predict"] = paired_ratio(t[method], t["predict"])
        out[name]["passes_over_forward"] = paired_ratio(t["relevance_passes"], t["forward"])
        out[name]["balanced_passes_over_forward"] = paired_ratio(t["balanced_passes"], t["forward"])
    clf = vit_b16()
    start = time.perf_counter()
    first = clf.faithfulness(photo, "relevance")
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    later = clf.faithfulness(photo, "rollout")
    later_s = time.perf_counter() - start
    counts = faith.patch_counts(196, first["steps"])
    out["faithfulness_vit_b16"] = {
        "steps": first["steps"], "patches_per_step": sorted(set(np.diff(counts).tolist())),
        "first_passes": first["forward_passes"], "later_passes": later["forward_passes"], "first_s": first_s, "later_s": later_s,
    }
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers: what the run costs, however busy the machine was."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), torch {torch.__version__}, python {platform.python_version()}"


def summarise_table(table: dict) -> dict:
    """Per-image AUCs -> mean, standard error of the mean, and how often each method beats the random order."""
    scores = table.pop("scores")
    rnd = {curve: np.asarray(v) for curve, v in scores[RANDOM].items()}
    table["methods"] = {}
    for name, s in scores.items():
        d, i, c = np.asarray(s["deletion"]), np.asarray(s["insertion"]), np.asarray(s["saco"])
        c = c[np.isfinite(c)]
        m = {"deletion_mean": d.mean(), "deletion_se": d.std(ddof=1) / np.sqrt(len(d)),
             "insertion_mean": i.mean(), "insertion_se": i.std(ddof=1) / np.sqrt(len(i)),
             "saco_mean": c.mean(), "saco_se": c.std(ddof=1) / np.sqrt(len(c)), "saco_undefined": len(d) - len(c)}
        if name != RANDOM:
            m.update(deletion_beats_random=np.mean(d < rnd["deletion"]), insertion_beats_random=np.mean(i > rnd["insertion"]))
        table["methods"][name] = {k: float(v) for k, v in m.items()}
    table["random_orders"] = faith.RANDOM_ORDERS
    return table


def summarise_sanity(rhos: dict[str, list[float]]) -> dict:
    """Per-image Spearman's rho -> mean, median and share below 0.5 (constant maps, whose rho is undefined, left out)."""
    out = {"images": len(next(iter(rhos.values()))), "methods": {}}
    for name, values in rhos.items():
        a = np.asarray(values)
        ok = a[np.isfinite(a)]
        out["methods"][name] = {"mean": float(ok.mean()), "median": float(np.median(ok)), "below_0.5": float(np.mean(ok < 0.5)),
                                "constant": int(len(a) - len(ok))}
    return out


def markdown(r: dict) -> str:
    t, c = r["table"], r["costs"]

    def measured(part: str) -> str:
        run = r["runs"][part]
        return (f"Measured on {run['date']} ({run['machine']}) in {run['seconds']:.0f} s, {run['cpu_seconds']:.0f} CPU-seconds "
                f"(load average {run['load_average']:.1f} at the end: the machine may have been shared).")

    lines = [
        "## Explanations: faithfulness, sanity and cost",
        "",
        "Written by `python bench/faithfulness.py` (figures in BENCHMARKS-faithfulness.json). Nothing here is typed by hand.",
        "",
        f"### Deletion and insertion, bundled model, {t['images']:,} Fashion-MNIST test images",
        "",
        measured("table"),
        "",
        f"The score is the softmax probability of the model's top class. Patches go most relevant first, one per step "
        f"({t['steps']} steps over {t['patches']} patches); deletion sets them to 0 in normalised space (the mean grey), "
        "insertion puts them back into a Gaussian blur of the crop (sigma one patch). AUC by the trapezoid rule over "
        "[0, 1]. Lower deletion and higher insertion are better. The random order is the mean, per image, of "
        f"{t.get('random_orders', 1)} random orders seeded for that image (other orders for each image); a map's ties "
        "are broken by a shuffle seeded for the image too. "
        f"SaCo (Wu et al. 2024): the patches cut into {faith.SACO_GROUPS} groups in the map's order, each deleted "
        "alone; 1 when every group with more map weight has the larger effect on the probability, about 0 for a "
        "random map (the random order's row scores a map whose values follow the image's first random order). ± is "
        "the standard error of the mean.",
        "",
        "| patch order | deletion AUC ↓ | insertion AUC ↑ | SaCo ↑ | images where deletion beats random | images where insertion beats random |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in t["methods"].items():
        beats = f" {m['deletion_beats_random']:.0%} | {m['insertion_beats_random']:.0%} |" if "deletion_beats_random" in m else " | |"
        saco = f"{m['saco_mean']:.3f} ± {m['saco_se']:.3f}" if "saco_mean" in m else "–"
        lines.append(f"| {title(name)} | {m['deletion_mean']:.3f} ± {m['deletion_se']:.3f} | {m['insertion_mean']:.3f} ± {m['insertion_se']:.3f} | {saco} |{beats}")
    lines += [
        "",
        "### Sanity: maps of a randomised model (Adebayo et al. 2018)",
        "",
        measured("sanity"),
        "",
        f"The bundled model's weights replaced by a fresh initialisation (seed 0); for each of {r['sanity']['images']:,} images, Spearman's rank "
        "correlation between its map from the trained model and from the randomised one (for the trained model's top "
        "class). A map that explains the model, not just the image, changes: the correlation should be low.",
        "",
        "| method | mean Spearman ρ | median | images with ρ < 0.5 |",
        "|---|---:|---:|---:|",
    ]
    for name, m in r["sanity"]["methods"].items():
        note = f" ({m['constant']} constant maps left out)" if m["constant"] else ""
        lines.append(f"| {title(name)} | {m['mean']:.3f}{note} | {m['median']:.3f} | {m['below_0.5']:.0%} |")
    b, s, f = c["vit_b16"], c["bundled"], c["faithfulness_vit_b16"]
    per_step = "-".join(str(v) for v in f["patches_per_step"])
    ratio = b["relevance_over_predict"]
    lines += [
        "",
        f"### Cost on the CPU (float32, batch 1, {c['repeats']} interleaved runs: medians, and medians of each run's ratio)",
        "",
        measured("costs"),
        "",
        "| measure | ViT-B/16 (random weights) | bundled model |",
        "|---|---:|---:|",
        f"| prediction (`predict`, preprocessing included) | {b['predict']:.1f} ms | {s['predict']:.2f} ms |",
    ]
    for method in ex.CLASS_SPECIFIC:
        if f"{method}_over_predict" in b:
            lines.append(f"| `{method}` map (`heatmap`, preprocessing included) / prediction | {b[method]:.1f} ms, "
                         f"{b[method + '_over_predict']:.2f}x | {s[method]:.2f} ms, {s[method + '_over_predict']:.2f}x |")
    lines += [
        f"| a forward and a plain backward pass / a bare forward pass | {b['passes_over_forward']:.2f}x | {s['passes_over_forward']:.2f}x |",
    ]
    if "balanced_passes_over_forward" in b:
        lines.append(f"| a forward and a balanced backward pass / a bare forward pass | {b['balanced_passes_over_forward']:.2f}x | "
                     f"{s['balanced_passes_over_forward']:.2f}x |")
    lines += [
        "",
        f"Faithfulness of a ViT-B/16 map at default settings: {f['steps']} steps of {per_step} patches over 196; "
        f"{f['first_passes']} forward passes for the first score of a photo and class (random baseline included, "
        f"{f['first_s']:.1f} s here), {f['later_passes']} for each further method on them ({f['later_s']:.1f} s), the "
        "baseline being kept.",
        "",
        f"- Target: a relevance map costs at most 3x a prediction on the CPU: {ratio:.2f}x, "
        + ("met." if ratio <= 3 else f"missed by {ratio - 3:.2f}x."),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000, help="Fashion-MNIST test images to score (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="interleaved runs for the cost measures (default: %(default)s)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes for the table (default: %(default)s)")
    p.add_argument("--only", choices=PARTS, action="append", default=None,
                   help="measure only this part (repeatable), keeping the others' last results from the JSON file")
    p.add_argument("--render", action="store_true", help="only rewrite the section from the JSON figures")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="the file whose section is written (default: %(default)s)")
    args = p.parse_args()
    results = args.out.with_name(args.out.stem + "-faithfulness.json")  # every figure of the section, as measured
    r = json.loads(results.read_text()) if (args.only or args.render) and results.exists() else {}
    clf = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)
    crops = read_images(args.images)
    for part in [] if args.render else args.only or PARTS:
        start, cpu = time.perf_counter(), _cpu_seconds()
        if part == "costs":
            r[part] = costs(args.repeats)
        elif part == "sanity":
            r[part] = summarise_sanity(sanity(clf, crops))
        else:
            r[part] = summarise_table(faithfulness_table(len(crops), args.workers))
        r.setdefault("runs", {})[part] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu, "load_average": os.getloadavg()[0],
        }
        results.write_text(json.dumps(r, indent=1))
        print(f"{part}: {json.dumps(r['runs'][part])}", flush=True)
    if all(part in r for part in PARTS):
        section = markdown(r)
        write_section(args.out, "faithfulness", section)
        print(section)


if __name__ == "__main__":
    main()
