"""The inference precision (`vit_demo.runtime.inference_dtype`) and what bfloat16 costs in accuracy.

The automatic choice is tested with the CPU probes mocked, so each case runs on any machine. The accuracy
tests run the bundled model in float32 and in bfloat16 on Fashion-MNIST's 10,000 test images (Debian's
dataset-fashion-mnist) and compare predictions and attention maps.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vit_demo import explain, load_classifier
from vit_demo import runtime
from vit_demo.registry import BUNDLED

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
T10K = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
fashion = pytest.mark.usefixtures("fashion_mnist")  # fails, not skips, without the data


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """The automatic choice, with the CPU probes replaced: set `cpu.support` and `cpu.ratio`; `cpu.measured`
    records the sizes the measurement was asked for. Measured ratios are kept in an empty store of its own."""
    monkeypatch.delenv("VIT_DEMO_PRECISION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    class Cpu:
        support, ratio, measured = "none", None, []

    def ratio(*sizes):
        Cpu.measured.append(sizes)
        assert Cpu.ratio is not None, "the CPU was measured where its capability decides"
        return Cpu.ratio

    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: Cpu.support)
    monkeypatch.setattr(runtime, "cpu_bf16_time_ratio", ratio)
    return Cpu


# --- the automatic choice ---------------------------------------------------------------------------------------


def test_auto_picks_float32_on_a_cpu_without_fast_bfloat16(auto):
    auto.support = "none"  # bfloat16 emulated
    assert runtime.inference_dtype(CPU) == torch.float32
    auto.support, auto.ratio = "avx512_bf16", 1.4  # has the instructions, but measured slower (as on some AMD EPYCs)
    assert runtime.inference_dtype(CPU) == torch.float32


def test_a_ratio_short_of_the_margin_keeps_float32(auto):
    auto.support, auto.ratio = "avx512_bf16", 0.8  # faster, but not by enough to give up float32's accuracy
    assert runtime.inference_dtype(CPU) == torch.float32


def test_auto_picks_bfloat16_on_a_cpu_with_amx_without_measuring(auto):
    auto.support = "amx"
    assert runtime.inference_dtype(CPU) == torch.bfloat16
    assert auto.measured == []


def test_auto_picks_bfloat16_where_avx512_bf16_is_measured_faster(auto):
    auto.support, auto.ratio = "avx512_bf16", 0.45  # as measured on this project's AMD EPYC for ViT-B/16
    assert runtime.inference_dtype(CPU) == torch.bfloat16
    assert auto.measured == [(197, 768, 3072)]  # ViT-B/16's MLP: 196 patches + class token, 768 -> 3072


@pytest.mark.parametrize("sizes", [(7 * 7 + 1, 128, 256), (197, 192, 768), (197, 384, 1536)],
                         ids=["bundled", "DeiT-tiny", "ViT-S/16"])
def test_small_models_get_float32_by_size_without_a_measurement(auto, sizes):
    """Their products take microseconds to a millisecond, and timing them swings around the threshold."""
    auto.support, auto.ratio = "avx512_bf16", 0.1  # were they measured, bfloat16 would win
    assert runtime.cpu_bf16_decision(*sizes) == torch.float32
    assert auto.measured == []


def test_the_bundled_model_loads_in_float32_unmeasured(auto):
    auto.support, auto.ratio = "avx512_bf16", 0.1
    clf = load_classifier(BUNDLED, device="cpu")
    assert clf.dtype == torch.float32 and next(clf.model.parameters()).dtype == torch.float32
    assert auto.measured == []  # 28x28 in 4x4 patches + class token, width 128, MLP 256: small


def test_a_large_model_is_measured_at_its_own_sizes_once_then_read_back(auto):
    from vit_demo.model import ViTConfig

    auto.support, auto.ratio = "avx512_bf16", 0.5
    at_384 = ViTConfig(img_size=384)
    assert runtime.inference_dtype(CPU, at_384) == torch.bfloat16
    assert auto.measured == [(24 * 24 + 1, 768, 3072)]
    auto.ratio = 0.9  # a second start would measure otherwise; it reads the kept ratio instead
    assert runtime.inference_dtype(CPU, at_384) == torch.bfloat16
    assert auto.measured == [(577, 768, 3072)]
    kept = json.loads(runtime.precision_store().read_text())
    assert list(kept.values()) == [0.5] and "577x768x3072" in next(iter(kept)), kept


def test_an_unwritable_store_measures_on_each_start(auto, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # a file where the folder should be
    auto.support, auto.ratio = "avx512_bf16", 0.5
    assert runtime.inference_dtype(CPU) == torch.bfloat16
    assert runtime.inference_dtype(CPU) == torch.bfloat16
    assert len(auto.measured) == 2


def test_auto_on_gpus_and_other_devices(auto, monkeypatch):
    auto.support = "amx"  # the CPU's capability does not matter elsewhere
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.inference_dtype(CUDA) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.inference_dtype(CUDA) == torch.float32
    assert runtime.inference_dtype(torch.device("mps")) == torch.float32


def test_a_gpu_that_only_emulates_bfloat16_gets_float32(auto, monkeypatch):
    """Pre-Ampere GPUs (a T4, a V100) emulate bfloat16: torch's check says yes unless emulation is left out."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.inference_dtype(CUDA) == torch.float32


def test_zerogpu_gets_bfloat16_without_querying_the_gpu(auto, monkeypatch):
    def no_gpu(*a, **k):
        raise AssertionError("the GPU was queried outside a ZeroGPU call")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_gpu)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert runtime.inference_dtype(CUDA) == torch.bfloat16


# --- VIT_DEMO_PRECISION and dtype= ------------------------------------------------------------------------------


@pytest.mark.parametrize("value, support, expected", [
    ("float32", "amx", torch.float32),
    ("bfloat16", "none", torch.bfloat16),
    (" BFloat16 ", "none", torch.bfloat16),
    ("auto", "amx", torch.bfloat16),
    ("", "none", torch.float32),
])
def test_the_environment_variable_overrides_the_choice(auto, monkeypatch, value, support, expected):
    auto.support = support
    monkeypatch.setenv("VIT_DEMO_PRECISION", value)
    assert runtime.inference_dtype(CPU) == expected


def test_the_environment_variable_overrides_on_gpus_too(auto, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv("VIT_DEMO_PRECISION", "float32")
    assert runtime.inference_dtype(CUDA) == torch.float32


def test_an_unknown_value_is_named_in_a_warning_and_auto_is_used(auto, monkeypatch, caplog):
    auto.support = "amx"
    monkeypatch.setenv("VIT_DEMO_PRECISION", "fp16")
    with caplog.at_level(logging.WARNING, logger="vit_demo.runtime"):
        assert runtime.inference_dtype(CPU) == torch.bfloat16
    assert "VIT_DEMO_PRECISION='fp16' is not one of auto, float32, bfloat16: using auto." in caplog.text


def test_load_classifier_follows_the_variable_and_its_dtype_argument_wins(auto, monkeypatch):
    monkeypatch.setenv("VIT_DEMO_PRECISION", "bfloat16")
    half = load_classifier(BUNDLED, device="cpu")
    assert half.dtype == torch.bfloat16 and next(half.model.parameters()).dtype == torch.bfloat16
    full = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)
    assert full.dtype == torch.float32 and next(full.model.parameters()).dtype == torch.float32


# --- the real probes ---------------------------------------------------------------------------------------------


def test_the_capability_probe_agrees_with_the_kernel_s_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(next((l for l in cpuinfo.read_text().splitlines() if l.startswith("flags")), "").split())
    if "amx_tile" in flags and "amx_bf16" in flags:
        expected = "amx"
    elif "avx512_bf16" in flags:
        expected = "avx512_bf16"
    else:
        expected = "none"
    assert runtime.cpu_bf16_support() == expected, sorted(f for f in flags if "bf16" in f or "amx" in f)


def test_the_measurement_times_what_it_says():
    """The same product in the same precision on both sides takes the same time (a biased order or warm-up would
    show here), and bfloat16's ratio goes the way the CPU's capability says: well under 1 with AMX, over 1 where
    it is emulated."""
    same = runtime.time_ratio(torch.float32, torch.float32, 197, 384, 1536, runtime.MEASURE_REPEATS)
    assert 0.7 < same < 1.4, f"float32 against itself: {same:.2f}"
    bf16 = runtime.cpu_bf16_time_ratio()  # ViT-B/16's MLP product
    support = runtime.cpu_bf16_support()
    print(f"{support}: bfloat16 takes {bf16:.2f}x float32's time")
    if support == "amx":
        assert bf16 < 0.8, bf16
    elif support == "none":
        assert bf16 > 1.0, bf16
    calls = runtime.cpu_bf16_time_ratio.cache_info().hits
    assert runtime.cpu_bf16_time_ratio() == bf16
    assert runtime.cpu_bf16_time_ratio.cache_info().hits == calls + 1, "measured twice in one process"


# Ten starts, each a process of its own with nothing measured or read yet: one parent imports runtime.py (and
# torch) once and forks them one after the other; each makes the automatic choice on a CPU with avx512_bf16 and no
# AMX (where it used to be a coin toss) for the bundled model, DeiT-tiny and ViT-B/16, and reports the three
# choices and the sizes it measured.
STARTS = r"""
import importlib.util, json, os, sys, types
spec = importlib.util.spec_from_file_location("runtime", sys.argv[1])
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
import torch
runtime.cpu_bf16_support = lambda: "avx512_bf16"
models = [types.SimpleNamespace(grid_size=g, num_prefix_tokens=1, embed_dim=d, mlp_dim=h)
          for g, d, h in ((7, 128, 256), (14, 192, 768), (14, 768, 3072))]
for _ in range(10):
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        measured, measure = [], runtime.cpu_bf16_time_ratio
        runtime.cpu_bf16_time_ratio = lambda *sizes: measured.append(sizes) or measure(*sizes)
        choices = [str(runtime.inference_dtype(torch.device("cpu"), m)) for m in models]
        os.write(write, json.dumps([choices, measured]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        print(answer.read())
    assert os.wait()[1] == 0
"""


def test_the_same_precision_on_ten_fresh_starts(tmp_path):
    """Small models are decided by size; ViT-B/16 by one measurement that later starts read back."""
    env = {k: v for k, v in os.environ.items() if k != "VIT_DEMO_PRECISION"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", STARTS, runtime.__file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    starts = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(starts) == 10, done.stdout
    choices = [choice for choice, _ in starts]
    print("choices:", choices[0])
    assert all(c == choices[0] for c in choices), choices
    assert choices[0][:2] == ["torch.float32", "torch.float32"], "small models are float32 on these CPUs"
    assert starts[0][1] == [[197, 768, 3072]], starts[0][1]  # only ViT-B/16 is timed...
    assert all(measured == [] for _, measured in starts[1:]), starts  # ...once


# --- what bfloat16 costs ----------------------------------------------------------------------------------------


def fashion_test_images() -> torch.Tensor:
    """Fashion-MNIST's test images, uint8 (10000, 1, 28, 28), read from the gzipped IDX file (16-byte header)."""
    with gzip.open(T10K, "rb") as f:
        data = f.read()
    assert int.from_bytes(data[:4], "big") == 0x0803, "not an IDX file of uint8 images"
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=16).reshape(-1, 1, 28, 28).copy())


@pytest.fixture(scope="module")
def both():
    return load_classifier(BUNDLED, device="cpu", dtype=torch.float32), load_classifier(BUNDLED, device="cpu", dtype=torch.bfloat16)


@fashion
@torch.inference_mode()
def test_bfloat16_agrees_with_float32_on_the_10000_test_images(both):
    full, half = both
    images = fashion_test_images()
    assert len(images) == 10_000
    p32, p16 = [], []
    for batch in images.split(2000):  # the model is small: big batches keep this quick
        x = full.preprocessor.normalize(batch)  # (B, 1, 28, 28) float32, as predict makes it
        p32.append(full.model(x).float().softmax(-1))
        p16.append(half.model(x.to(half.dtype)).float().softmax(-1))
    p32, p16 = torch.cat(p32), torch.cat(p16)
    top = p32.argmax(-1)
    agreement = (p16.argmax(-1) == top).double().mean().item()
    top1_diff = (p32.gather(1, top[:, None]) - p16.gather(1, top[:, None])).abs().max().item()
    print(f"bfloat16 vs float32 on 10,000 images: top-1 agreement {agreement:.2%}, largest top-1 probability difference {top1_diff:.4f}")
    assert agreement >= 0.998, f"top-1 agreement {agreement:.2%} < 99.8%"
    assert top1_diff < 0.05, f"largest top-1 probability difference {top1_diff:.4f} (measured 0.024)"


@fashion
@torch.inference_mode()
def test_attention_maps_of_a_bfloat16_model_agree_with_float32(both):
    """The explicit path takes its softmax in float32 in a bfloat16 model too (model.py), so each row sums to 1
    as in float32; what differs is the bfloat16 q and k before it. Tolerances, measured on 500 images: every probability within 0.05 of float32's
    (measured 0.038), mean difference under 5e-4 (2e-4); rollout maps within 2% of their peak (0.8%); the
    last layer's class-token map within 6% of its peak (3.8%)."""
    full, half = both
    x = full.preprocessor.normalize(fashion_test_images()[:200])  # (200, 1, 28, 28)
    _, a32 = full.model(x, return_attn=True)
    _, a16 = half.model(x.to(half.dtype), return_attn=True)
    for layer, (p, q) in enumerate(zip(a32, a16)):  # each (200, heads, 50, 50)
        assert q.dtype == torch.float32, q.dtype
        rows = (q.double().sum(-1) - 1).abs().max().item()
        assert rows < 1e-5, f"layer {layer}: rows sum to 1 within {rows:.1e}, not float32's 1e-5 (a bfloat16 softmax gives ~1e-3)"
        diff = (p - q).abs()
        assert diff.max() < 0.05 and diff.mean() < 5e-4, (layer, diff.max().item(), diff.mean().item())
    prefix = full.config.num_prefix_tokens
    for i in range(len(x)):
        for method in (explain.rollout, explain.cls_attention):
            m32 = method([a[i] for a in a32], prefix)
            m16 = method([a[i] for a in a16], prefix)
            share = ((m32 - m16).abs().max() / m32.max()).item()
            assert share < (0.02 if method is explain.rollout else 0.06), (method.__name__, i, share)


# Fashion-MNIST test images whose top class the bundled model in bfloat16 gives differently on its two attention
# paths (F.scaled_dot_product_attention and the explicit softmax), found on this project's Intel Xeon with AMX in
# batches of 2000: they round differently in bfloat16.
SPLIT = (2629, 4019, 5284, 8005, 8621, 9154, 9185)


@fashion
def test_classify_and_the_maps_name_one_answer_in_bfloat16(both):
    """What Classify answers is the class the Attention tab names, and the class its maps explain by default."""
    from PIL import Image

    _, half = both
    images = fashion_test_images()[list(SPLIT)]  # (7, 1, 28, 28)
    x = half.preprocessor.normalize(images).to(half.dtype)
    with torch.inference_mode():
        differ = (half.model(x).argmax(-1) != half.model(x, return_attn=True)[0].argmax(-1)).sum().item()
    print(f"the two paths differ on {differ} of {len(SPLIT)} images here")
    for i, pixels in zip(SPLIT, images):
        photo = Image.fromarray(pixels[0].numpy(), "L")
        key = f"photo-{i}"  # as the page keys each photo
        answer = half.predict(photo, k=1, key=key)[0][0]
        _, _, _, logits = half.maps(photo, "rollout", key=key)
        _, _, target, _ = half.maps(photo, "relevance", key=key)
        named = {half.labels[int(logits.argmax())], half.labels[target]}
        assert named == {answer}, (i, answer, named)


def test_the_maps_name_predict_s_answer_whatever_the_explicit_path_says(monkeypatch):
    """The explicit path's logits are never the answer: here they are made to rank the classes backwards."""
    from PIL import Image

    clf = load_classifier(BUNDLED, device="cpu", dtype=torch.bfloat16)
    forward = clf.model.forward

    def backwards(x, return_attn=False):
        out = forward(x, return_attn)
        return (-out[0], out[1]) if return_attn else out

    monkeypatch.setattr(clf.model, "forward", backwards)
    photo = Image.open(Path(__file__).parent.parent / "examples" / "fashion-mnist-sneaker-9.png")
    answer = clf.predict(photo, k=1)[0][0]
    assert answer == "Sneaker"
    assert clf.labels[int(clf.maps(photo, "attention")[3].argmax())] == answer
    assert clf.labels[clf.maps(photo, "gradient_rollout")[2]] == answer
