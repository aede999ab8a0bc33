"""How forward passes run (vit_demo/runtime.py): batching of concurrent callers, precision, CUDA graphs.

The batching tests hold the first pass until the other callers have queued behind it, so that they overlap
whatever the machine's speed. The bfloat16 tests run on the CPU too; the CUDA graph tests need a GPU and say so when skipped.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import EXAMPLES, assert_close, hold_first_pass, make_fruit_checkpoint, wait_until
from vit_demo import load_classifier
from vit_demo.registry import BUNDLED
from vit_demo.runtime import Batcher, Runtime, inference_dtype

FASHION = sorted(EXAMPLES.glob("fashion-mnist-*.png"))
PHOTOS = [EXAMPLES / n for n in ("chelsea.jpg", "astronaut.jpg", "coffee.jpg", "rocket.jpg")]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)")


def first_then_rest(fn, inputs, seen: list[int]) -> list:
    """fn(inputs[0]) in a thread; once its pass has started, fn(x) for the rest, each in its own thread.
    Results, or the exceptions raised, in input order."""
    def one(x):
        try:
            return fn(x)
        except Exception as e:  # noqa: BLE001 - the test looks at which calls failed
            return e

    with ThreadPoolExecutor(len(inputs)) as pool:
        first = pool.submit(one, inputs[0])
        wait_until(lambda: seen)
        rest = [pool.submit(one, x) for x in inputs[1:]]
        return [first.result()] + [f.result() for f in rest]


def doubled(n: int, max_batch: int) -> list[int]:
    """n callers of a doubling Batcher, the first alone and the others queued behind it; checks each got its
    own row back and returns the batch sizes of the passes that ran."""
    batcher = Batcher(lambda x: 2 * x, max_batch)
    seen = hold_first_pass(batcher, n - 1)
    inputs = [torch.full((1, 3), float(i)) for i in range(n)]
    for x, y in zip(inputs, first_then_rest(batcher, inputs, seen)):
        assert torch.equal(y, 2 * x), (x, y)
    return seen


def test_a_lone_call_runs_at_once_as_batch_of_one():
    batcher = Batcher(lambda x: 2 * x)
    x = torch.arange(4.0).reshape(1, 4)
    assert torch.equal(batcher(x), 2 * x)
    assert batcher.batch_sizes == [1]


def test_callers_that_arrive_during_a_pass_share_the_next_one_and_get_their_own_rows():
    assert doubled(8, max_batch=16) == [1, 7]


def test_batches_never_exceed_max_batch():
    assert doubled(10, max_batch=3) == [1, 3, 3, 3]


def test_a_failing_pass_reaches_its_callers_and_the_next_pass_works():
    def forward(x):
        if len(seen) == 2:
            raise RuntimeError("CUDA out of memory")
        return x + 1

    batcher = Batcher(forward)
    seen = hold_first_pass(batcher, 3)
    results = first_then_rest(batcher, [torch.zeros(1, 1) for _ in range(4)], seen)
    assert seen == [1, 3]
    assert torch.equal(results[0], torch.ones(1, 1))  # the first pass, alone, succeeded
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results[1:]), results
    assert torch.equal(batcher(torch.zeros(1, 1)), torch.ones(1, 1))


@pytest.fixture(scope="module")
def fruit(tmp_path_factory):
    return load_classifier(make_fruit_checkpoint(tmp_path_factory.mktemp("fruit")), device="cpu")


def test_concurrent_predict_equals_one_at_a_time_and_a_bad_image_fails_alone(fruit, tmp_path):
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(PHOTOS[0].read_bytes()[:2000])
    expected = {p: fruit.predict(p, k=7) for p in PHOTOS}
    batcher = fruit.runtime.batcher
    forward = batcher.forward
    inputs = PHOTOS * 3 + [bad]
    seen = hold_first_pass(batcher, len(inputs) - 2)  # all but the first and the bad one queue behind it
    try:
        results = first_then_rest(lambda p: fruit.predict(p, k=7), inputs, seen)
    finally:
        batcher.forward = forward
    assert isinstance(results[-1], OSError), results[-1]
    for p, got in zip(inputs[:-1], results[:-1]):
        assert [l for l, _ in got] == [l for l, _ in expected[p]], p
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, expected[p])) < 1e-5, p
    assert seen == [1, len(inputs) - 2], seen


def test_warm_up_runs_the_served_paths_at_the_crop_size(fruit):
    """Before the app serves: one classification pass through the Runtime (batch 1, as visitors get it) and one
    on the explicit attention path, at the crop's size, so that the first visitor's kernels are ready."""
    from vit_demo.runtime import warm_up

    calls, forward = [], fruit.model.forward

    def recorded(x, return_attn=False):
        calls.append((tuple(x.shape), x.dtype, return_attn))
        return forward(x, return_attn)

    fruit.model.forward = recorded
    fruit.runtime.batcher.batch_sizes = []
    try:
        warm_up(fruit)
    finally:
        del fruit.model.forward
    assert calls == [((1, 3, 224, 224), fruit.dtype, False), ((1, 3, 224, 224), fruit.dtype, True)], calls
    assert fruit.runtime.batcher.batch_sizes == [1]


def test_the_app_warms_its_model_up_before_it_says_it_is_serving(caplog):
    from vit_demo.registry import BUNDLED_NAME, Registry
    from vit_demo.ui.page import start_registry

    with caplog.at_level("INFO", logger="vit_demo"):
        start_registry(Registry([BUNDLED_NAME], default=BUNDLED_NAME, device="cpu"))
    lines = [r.getMessage() for r in caplog.records]
    warmed = next(i for i, line in enumerate(lines) if line.startswith("Warmed up"))
    serving = next(i for i, line in enumerate(lines) if line.startswith("Serving"))
    assert warmed < serving, lines


@pytest.mark.parametrize("gpu, capability, expected", [
    ("T4", (7, 5), torch.float32), ("V100", (7, 0), torch.float32), ("A100", (8, 0), torch.bfloat16),
    ("H100", (9, 0), torch.bfloat16), ("real", None, None),
])
def test_bfloat16_where_cuda_has_it(monkeypatch, gpu, capability, expected):
    """bfloat16 on NVIDIA GPUs from Ampere (compute capability 8.0) on, whose tensor cores run it, and on AMD ones;
    float32 on older GPUs, where bfloat16 is only emulated. Read from the capability, not from
    `torch.cuda.is_bf16_supported()`, which the code asks (and which counts emulation as support): torch's own
    function runs, on a GPU of each generation that it is shown (emulation works on all of them), and on the real
    GPU where there is one."""
    monkeypatch.delenv("VIT_DEMO_PRECISION", raising=False)  # the automatic choice (CPUs: tests/test_precision.py)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    if capability is None:
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (this machine has none); the generations above are shown to torch instead")
        native = bool(torch.version.hip) or torch.cuda.get_device_capability() >= (8, 0)
        expected = torch.bfloat16 if native else torch.float32
    else:
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=capability[0], minor=capability[1]))
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulated everywhere
        assert torch.cuda.is_bf16_supported() is True, "torch counts emulation as support"
    assert inference_dtype(torch.device("cuda")) == expected, gpu


def test_bfloat16_agrees_with_float32_on_the_bundled_model():
    full = load_classifier(BUNDLED, device="cpu")
    half = load_classifier(BUNDLED, device="cpu", dtype=torch.bfloat16)
    assert full.dtype == torch.float32 and next(half.model.parameters()).dtype == torch.bfloat16
    worst = 0.0
    for path in FASHION:
        a, b = full.predict(path, k=10), half.predict(path, k=10)
        assert a[0][0] == b[0][0], (path.name, a[:2], b[:2])
        worst = max(worst, max(abs(p - dict(b)[label]) for label, p in a))
        crop, attns, logits = half.attention(path)
        assert attns[0].dtype == torch.float32 and logits.dtype == torch.float32
        assert_close(attns[-1].sum(-1), torch.ones(attns[-1].shape[:-1]), 1e-5, "attention rows (float32) sum to 1")
    assert worst < 1e-2, worst  # measured 8e-4


@cuda
def test_cuda_graph_replays_the_eager_forward():
    clf = load_classifier(BUNDLED, device="cuda")
    x = clf.preprocessor(Image.open(FASHION[0]))
    with torch.inference_mode():
        eager = clf.model(x.to("cuda", clf.dtype)).float().cpu()
        graphed = clf.runtime(x)
        assert tuple(x.shape) in clf.runtime._graphs, "no CUDA graph was captured"
        again = clf.runtime(x)
    assert_close(graphed, eager, 1e-3, "graph vs eager")
    assert torch.equal(graphed, again)


@cuda
def test_cuda_bfloat16_top1_matches_cpu_float32():
    gpu = load_classifier(BUNDLED, device="cuda")
    cpu = load_classifier(BUNDLED, device="cpu")
    for path in FASHION:
        assert gpu.predict(path, k=1)[0][0] == cpu.predict(path, k=1)[0][0], path.name


@cuda
def test_cuda_runtime_batches_concurrent_callers():
    clf = load_classifier(BUNDLED, device="cuda")
    runtime = Runtime(clf.model, clf.device, clf.dtype)
    inputs = [clf.preprocessor(Image.open(p)) for p in FASHION] * 4
    expected = [runtime(x).softmax(-1) for x in inputs]
    seen = hold_first_pass(runtime.batcher, len(inputs) - 1)
    results = first_then_rest(runtime, inputs, seen)
    assert seen == [1, len(inputs) - 1], seen
    for got, want in zip(results, expected):
        assert got.argmax() == want.argmax()
        assert_close(got.softmax(-1), want, 1e-2, "batched vs alone (bfloat16 probabilities)")


@cuda
def test_cuda_graphs_per_shape_on_the_gpu():
    """Two input shapes (the grid resampled for the second): one graph each, each replay equal to eager."""
    clf = load_classifier(BUNDLED, device="cuda")
    runtime = Runtime(clf.model, clf.device, clf.dtype)
    square = clf.preprocessor(Image.open(FASHION[0]))
    wide = torch.nn.functional.interpolate(square, size=(28, 36), mode="bilinear")
    with torch.inference_mode():
        for x in (square, wide, square, wide):
            eager = clf.model(x.to("cuda", clf.dtype)).float().cpu()
            assert_close(runtime(x), eager, 1e-3, f"graph vs eager, {tuple(x.shape)}")
    assert sorted(runtime._graphs) == [(1, 1, 28, 28), (1, 1, 28, 36)], list(runtime._graphs)


@cuda
def test_a_real_failed_capture_falls_back_to_eager_and_the_gpu_still_works(caplog):
    """A forward pass that reads a value back to the CPU cannot be captured: the runtime warns, answers eagerly,
    and the GPU stream is usable afterwards."""
    layer = torch.nn.Linear(4, 3).cuda().eval()

    def forward(x):
        y = layer(x.flatten(1)[:, :4])
        return y * (1.0 if y.sum().item() < 1e9 else 0.0)  # .item() synchronises: not allowed while capturing

    runtime = Runtime(forward, torch.device("cuda"), torch.float32)
    x = torch.randn(1, 1, 2, 2)
    with caplog.at_level("WARNING", logger="vit_demo.runtime"), torch.inference_mode():
        got = runtime(x)
        again = runtime(x)
        expected = layer(x.cuda().flatten(1)).cpu()
    assert any("CUDA graph capture failed" in r.getMessage() for r in caplog.records), caplog.text
    assert runtime._graphs == {} and not runtime.cuda_graphs
    assert_close(got, expected, 1e-5, "eager after the failed capture")
    assert torch.equal(got, again)


# --- inputs of different shapes, errors, CUDA graphs ----------------------------------------------------------


def test_inputs_of_different_shapes_are_never_concatenated():
    """Checkpoints without a fixed crop give each photo its own shape: those wait for a pass of their own shape
    instead of failing everybody's pass with "Sizes of tensors must match"."""
    def forward(x):
        shapes.append(tuple(x.shape))
        return 2 * x

    shapes = []
    batcher = Batcher(forward)
    inputs = [torch.full((1, 3, 4, 4), 1.0), torch.full((1, 3, 4, 6), 2.0), torch.full((1, 3, 4, 4), 3.0),
              torch.full((1, 3, 4, 6), 4.0), torch.full((1, 3, 4, 4), 5.0)]
    seen = hold_first_pass(batcher, len(inputs) - 1)
    results = first_then_rest(batcher, inputs, seen)
    for x, y in zip(inputs, results):
        assert isinstance(y, torch.Tensor) and torch.equal(y, 2 * x), (x.shape, y)
    assert shapes == [(1, 3, 4, 4), (2, 3, 4, 6), (2, 3, 4, 4)], shapes  # the oldest waiting input's shape goes first


def test_each_caller_of_a_failed_pass_gets_its_own_exception_chained_to_the_original():
    """One exception object raised in several threads at once would share (and race on) its traceback."""
    def forward(x):
        if len(seen) == 2:
            raise RuntimeError("CUDA out of memory")
        return x

    batcher = Batcher(forward)
    seen = hold_first_pass(batcher, 3)
    errors = first_then_rest(batcher, [torch.zeros(1, 1) for _ in range(4)], seen)[1:]
    assert all(isinstance(e, RuntimeError) and str(e) == "CUDA out of memory" for e in errors), errors
    assert len({id(e) for e in errors}) == 3, "one exception object was raised in several threads"
    causes = {id(e.__cause__) for e in errors}
    assert len(causes) == 1 and isinstance(errors[0].__cause__, RuntimeError), [e.__cause__ for e in errors]


class CountedGraph:
    """Stands in for GraphedForward on the CPU: counts captures and runs the model eagerly."""

    captures: list[tuple] = []

    def __init__(self, model, example):
        self.shape, self.model = tuple(example.shape), model
        CountedGraph.captures.append(self.shape)

    def __call__(self, x):
        return self.model(x)


def _graphed_cpu_runtime(monkeypatch, graph_cls):
    from vit_demo import runtime as runtime_module

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 4, 4))  # sizes the lazy layer; other widths are reshaped below
    monkeypatch.setattr(runtime_module, "GraphedForward", graph_cls)
    rt = Runtime(lambda x: model(x[..., :4, :4]), torch.device("cpu"), torch.float32)
    rt.cuda_graphs = True  # as on a GPU
    return rt, model


def test_cuda_graphs_are_kept_per_shape_not_recaptured(monkeypatch):
    CountedGraph.captures = []
    rt, model = _graphed_cpu_runtime(monkeypatch, CountedGraph)
    a, b = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 6)
    for x in (a, b, a, b, a):
        assert_close(rt(x), model(x[..., :4, :4]).detach(), 1e-6, "graphed vs eager")
    assert CountedGraph.captures == [(1, 3, 4, 4), (1, 3, 4, 6)], CountedGraph.captures


def test_a_failed_cuda_graph_capture_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    attempts = []

    def failing_capture(model, example):
        attempts.append(tuple(example.shape))
        raise RuntimeError("operation not permitted when stream is capturing")

    rt, model = _graphed_cpu_runtime(monkeypatch, failing_capture)
    x = torch.randn(1, 3, 4, 4)
    with caplog.at_level("WARNING", logger="vit_demo.runtime"):
        first = rt(x)
    assert_close(first, model(x).detach(), 1e-6, "eager after a failed capture")
    assert any("CUDA graph capture failed" in r.getMessage() and "running eagerly" in r.getMessage() for r in caplog.records), caplog.text
    assert_close(rt(x), first, 0, "the next call")
    assert attempts == [(1, 3, 4, 4)], "the capture was tried again"
