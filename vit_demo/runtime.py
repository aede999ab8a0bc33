"""How forward passes run: the precision for a device, CUDA graphs for batch 1, and batching of concurrent callers.

`Classifier` owns one `Runtime`; the model itself (model.py) knows nothing of this.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

MAX_BATCH = 16  # concurrent requests answered by one forward pass, at most
MAX_GRAPHS = 4  # CUDA graphs kept per model, one per input shape (each holds its own activations)
_CAPTURE_LOCK = threading.Lock()  # CUDA captures one graph at a time per process


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # VIT_DEMO_PRECISION's values besides "auto"
# CPUs with avx512_bf16 but no AMX: bfloat16 where the model's MLP product is big enough to gain from it and is
# measured at most BF16_FAST_ENOUGH of float32's time. Smaller products are decided by size alone: their timings
# swing from run to run (0.2x to 1.7x for DeiT-tiny's on one busy machine), and what they could save is little.
BF16_MIN_MACS = 150_000_000  # multiply-adds of the MLP's first product below which float32 is kept unmeasured
BF16_FAST_ENOUGH = 0.7
MEASURE_REPEATS = 15  # interleaved rounds of the measurement; the median round's ratio decides


def inference_dtype(device: torch.device, config=None) -> torch.dtype:
    """The precision inference runs in on `device`, the same on every start on one machine.

    `VIT_DEMO_PRECISION=float32|bfloat16` decides; unset, empty or `auto`, the device's fast precision:
    bfloat16 on CUDA GPUs that support it (on ZeroGPU without querying the GPU, which is lent only inside
    calls); on CPUs bfloat16 where they have AMX, float32 where bfloat16 is emulated; on CPUs with avx512_bf16
    but no AMX (faster on some, slower on others, and slower for small models), float32 for models smaller than
    BF16_MIN_MACS, and for larger ones whichever a measurement of a matrix product of the model's size finds
    faster (see `cpu_bf16_decision`); float32 on MPS and other devices. Any other value is named in a warning
    and treated as `auto`.

    Args:
        device: where the model will run.
        config: the model's ViTConfig, whose sizes the CPU measurement uses (ViT-B/16's when None).
    Returns:
        torch.float32 or torch.bfloat16.
    """
    choice = os.environ.get("VIT_DEMO_PRECISION", "").strip().lower() or "auto"
    if choice in PRECISIONS:
        return PRECISIONS[choice]
    if choice != "auto":
        log.warning("VIT_DEMO_PRECISION=%r is not one of auto, float32, bfloat16: using auto.", choice)
    if device.type == "cuda":
        if os.environ.get("SPACES_ZERO_GPU"):  # ZeroGPU lends its (bfloat16-capable) GPUs only inside calls: no query here
            return torch.bfloat16
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if device.type != "cpu":
        return torch.float32  # MPS and others: bfloat16 missing, partial or slower
    support = cpu_bf16_support()
    if support == "amx":
        return torch.bfloat16
    if support == "avx512_bf16":
        return cpu_bf16_decision(*_mlp_sizes(config))
    return torch.float32


def cpu_bf16_support() -> str:
    """What this CPU has for bfloat16 matrix products: "amx" (tile units, several times float32's speed),
    "avx512_bf16" (dot-product instructions: faster than float32 on some CPUs, slower on others), or "none"
    (emulated: slower than float32)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return "none"


def _mlp_sizes(config) -> tuple[int, int, int]:
    """(tokens, embed_dim, mlp_dim) of a ViTConfig's MLP; ViT-B/16's for None."""
    if config is None:
        return 197, 768, 3072
    return config.grid_size**2 + config.num_prefix_tokens, config.embed_dim, config.mlp_dim


def cpu_bf16_decision(tokens: int, dim: int, hidden: int) -> torch.dtype:
    """bfloat16 or float32 for a model whose MLP product is (tokens, dim) x (dim, hidden), on a CPU with
    avx512_bf16 and no AMX.

    Products under BF16_MIN_MACS get float32 without a measurement. Larger ones are measured once per CPU, torch
    version, thread count and sizes (`cpu_bf16_time_ratio`), and the ratio is kept in
    $XDG_CACHE_HOME/vit_demo/precision.json (~/.cache/vit_demo/ by default), so that every later start reads the
    same ratio and serves the same precision; where that file cannot be written, each start measures again.
    """
    sizes = (tokens, dim, hidden)
    if tokens * dim * hidden < BF16_MIN_MACS:
        log.info("The model is small (MLP product %s): float32, without measuring.", sizes)
        return torch.float32
    key = _measurement_key(sizes)
    ratio = _read_ratios().get(key)
    if ratio is None:
        ratio = cpu_bf16_time_ratio(*sizes)
        _write_ratio(key, ratio)
    dtype = torch.bfloat16 if ratio <= BF16_FAST_ENOUGH else torch.float32
    log.info("bfloat16 matrix products %s take %.2fx float32's time on this CPU: %s.", sizes, ratio,
             str(dtype).removeprefix("torch."))
    return dtype


def precision_store() -> Path:
    """Where measured bfloat16/float32 ratios are kept: $XDG_CACHE_HOME/vit_demo/precision.json."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vit_demo" / "precision.json"


def _measurement_key(sizes: tuple[int, int, int]) -> str:
    """What a measured ratio holds for: this CPU's model, torch's version, its thread count, and the sizes."""
    return f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {'x'.join(map(str, sizes))}"


@functools.cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _read_ratios() -> dict[str, float]:
    try:
        data = json.loads(precision_store().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and 0 < v < float("inf")}


def _write_ratio(key: str, ratio: float) -> None:
    """Adds one ratio to the store (written whole, then moved into place); a store that cannot be written is
    left as it is."""
    path = precision_store()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({**_read_ratios(), key: ratio}, f, indent=1)
        os.replace(f.name, path)
    except OSError as e:
        log.info("The measured precision could not be kept in %s (%s): the next start measures again.", path, e)


@functools.cache
def cpu_bf16_time_ratio(tokens: int = 197, dim: int = 768, hidden: int = 3072, repeats: int = MEASURE_REPEATS) -> float:
    """bfloat16 time / float32 time of a ViT's MLP matrix product, (tokens, dim) x (dim, hidden), on this CPU.

    Both run in each of `repeats` rounds after a warm-up round, in alternating order; the median of the rounds'
    ratios is returned, so that a burst of other work during a few rounds does not move it. About 0.3 s for
    ViT-B/16's sizes (the defaults); measured once per process and sizes.
    """
    return time_ratio(torch.float32, torch.bfloat16, tokens, dim, hidden, repeats)


def time_ratio(base: torch.dtype, other: torch.dtype, tokens: int, dim: int, hidden: int, repeats: int) -> float:
    """`other`'s time / `base`'s time for a (tokens, dim) x (dim, hidden) matrix product: the median over
    `repeats` rounds, each timing both (in alternating order), after a warm-up round."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, dim, generator=g), torch.randn(hidden, dim, generator=g)
    pairs = [(x.to(base), w.to(base)), (x.to(other), w.to(other))]
    ratios = []
    with torch.inference_mode():
        for r in range(repeats + 1):
            took = [0.0, 0.0]
            for i in ((0, 1) if r % 2 else (1, 0)):
                a, b = pairs[i]
                start = time.perf_counter()
                torch.nn.functional.linear(a, b)
                took[i] = time.perf_counter() - start
            if r:  # the first round warms up
                ratios.append(took[1] / took[0])
    return statistics.median(ratios)


def warm_up(clf) -> None:
    """Warms a loaded Classifier's served paths at the size of its crops (`Runtime.warm_up`); the app does this
    for the model it serves before it says that it is serving."""
    cfg = clf.preprocessor.cfg
    try:
        h, w = cfg.input_size
    except TypeError:  # no fixed input size: the size the position embeddings were learned for
        h = w = clf.config.img_size
    try:
        took = clf.runtime.warm_up((1, clf.config.in_chans, h, w))
    except RuntimeError as e:  # e.g. out of memory: the visitors' requests will say so; the page still starts
        log.warning("%s could not be warmed up (%s): its first answer will be slower.", clf.name, e)
        return
    log.info("Warmed up %s in %s in %.2f s.", clf.name, str(clf.dtype).removeprefix("torch."), took)


class GraphedForward:
    """`model(x)` for one fixed input shape, replayed from a CUDA graph: one launch instead of one per kernel.

    Call it under `torch.inference_mode()`, as it was captured, and from one thread at a time (its input and
    output buffers are shared); `Runtime` does both.
    """

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, warmup: int = 3):
        self.shape = tuple(example.shape)
        self.static_x = example.clone()
        stream = torch.cuda.current_stream(example.device)
        side = torch.cuda.Stream(example.device)
        side.wait_stream(stream)
        # One capture at a time, on a stream of its own. Leaving this `torch.cuda.stream` block puts the caller
        # back on its stream even when the capture fails (torch.cuda.graph skips its own restore when ending the
        # capture raises).
        with _CAPTURE_LOCK, torch.cuda.stream(side):
            for _ in range(warmup):  # warm-up runs pick kernels and allocate workspaces outside the capture
                model(self.static_x)
            side.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (/explain, another model) may use the GPU during the capture.
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self.static_y = model(self.static_x)
        stream.wait_stream(side)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_y.clone()


_PASS = threading.local()
# One classification pass at a time on the CPU, whichever model it is for: two passes at once would each run
# with every core's threads, and wait for each other at every parallel step.
CPU_TURN = threading.Lock()


def in_shared_pass() -> bool:
    """Whether this thread is running a Batcher's pass now: other callers wait on it, so nothing should hold it."""
    return getattr(_PASS, "running", False)


class Batcher:
    """Lets concurrent callers share forward passes: dynamic batching without a timer.

    A caller whose input arrives while a forward pass is running waits; when it ends, one waiting caller runs
    the inputs that queued up meanwhile with the shape of the oldest one (at most `max_batch`) as one batch and
    hands each caller its rows; inputs of other shapes (checkpoints without a fixed crop) wait for a pass of
    their own shape. A lone caller runs at once, so batching adds no latency when the server is idle. Inputs
    are validated by each caller before they get here, so one bad image cannot fail somebody else's request;
    a pass that fails anyway gives each of its callers an exception of its own, chained to the original.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], max_batch: int = MAX_BATCH,
                 turn: contextlib.AbstractContextManager | None = None):
        self.forward = forward
        self.max_batch = max_batch
        self.turn = turn or contextlib.nullcontext()  # held while a pass runs: shared with other models' Batchers
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []
        self._busy = False
        self.batch_sizes: list[int] = []  # of the last passes run (bounded), for tests and benchmarks

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (1, ...) -> forward(x) (1, ...); thread-safe."""
        request = _Request(x)
        with self._cond:
            self._waiting.append(request)
        while True:
            with self._cond:
                while self._busy and not request.done:
                    self._cond.wait()
                if request.done:
                    return request.result()
                self._busy = True
            try:
                with self.turn:  # inputs that arrive while this waits for its turn join its batch
                    with self._cond:
                        batch = self._take_batch()
                    _PASS.running = True
                    self._run(batch)
            finally:
                _PASS.running = False
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _take_batch(self) -> list[_Request]:
        """The oldest waiting input and those of its shape, at most max_batch; the others keep their places."""
        shape = self._waiting[0].x.shape
        batch, rest = [], []
        for r in self._waiting:
            (batch if r.x.shape == shape and len(batch) < self.max_batch else rest).append(r)
        self._waiting = rest
        return batch

    def _run(self, batch: list[_Request]) -> None:
        self.batch_sizes = self.batch_sizes[-999:] + [len(batch)]
        try:
            out = self.forward(torch.cat([r.x for r in batch]))
            for i, r in enumerate(batch):
                r.out = out[i : i + 1]
        except BaseException as e:  # e.g. CUDA out of memory: every caller of this pass hears of it
            e = e.with_traceback(None)  # without the frames (and activations) of the failed pass
            for r in batch:
                r.error = e
        for r in batch:
            r.done = True


class _Request:
    __slots__ = ("x", "out", "error", "done")

    def __init__(self, x: torch.Tensor):
        self.x, self.out, self.error, self.done = x, None, None, False

    def result(self) -> torch.Tensor:
        if self.error is not None:
            raise _own_copy(self.error) from self.error
        return self.out


def _own_copy(error: BaseException) -> BaseException:
    """A new exception of the same type and message, for one caller of a failed pass: every caller raises its
    own, so tracebacks and `__context__` are not written by several threads into one object."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied
        return RuntimeError(f"{type(error).__name__}: {error}")


class Runtime:
    """Runs a model's classification forward pass on its device: inputs cast to the model's dtype, batch 1
    replayed from a CUDA graph on GPUs, concurrent callers batched; logits come back as float32 on the CPU.

    Args:
        model: the VisionTransformer, already on `device` in `dtype`, in eval mode.
        cuda_graphs: replay batch 1 from CUDA graphs (on CUDA devices only), one per input shape for the first
            MAX_GRAPHS shapes (checkpoints without a fixed crop see many; later ones run eagerly rather than
            capture again); if a capture fails, run eagerly from then on.
        max_batch: the most concurrent callers one forward pass answers.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, cuda_graphs: bool = True,
                 max_batch: int = MAX_BATCH):
        self.model, self.device, self.dtype = model, device, dtype
        # Not on ZeroGPU Spaces, which lend the GPU per call: a graph captured in one call would not outlive it.
        self.cuda_graphs = cuda_graphs and device.type == "cuda" and not os.environ.get("SPACES_ZERO_GPU")
        self._graphs: dict[tuple[int, ...], GraphedForward] = {}
        forward = weakref.WeakMethod(self._forward)  # no cycle: an evicted model's memory is freed at once
        self.batcher = Batcher(lambda x: forward()(x), max_batch, turn=CPU_TURN if device.type == "cpu" else None)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised input (1, C, H, W) -> logits (1, num_classes), float32, on the CPU."""
        return self.batcher(x)

    @torch.inference_mode()
    def warm_up(self, shape: tuple[int, ...]) -> float:
        """Runs each path the app serves once, on zeros of input `shape` (1, C, H, W), so that their kernels are
        picked, compiled (oneDNN's bfloat16 kernels on CPUs) and cached before the first visitor rather than while
        one waits: the classification forward pass as `__call__` runs it (batch 1, replayed from a CUDA graph on
        GPUs), and the explicit attention path the maps use. Returns the seconds it took."""
        start = time.perf_counter()
        x = torch.zeros(shape)
        self(x)
        self.model(x.to(self.device, self.dtype), return_attn=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype, non_blocking=True)
        if self.cuda_graphs and x.shape[0] == 1:
            graph = self._graph_for(x)
            if graph is not None:
                return graph(x).float().cpu()
        return self.model(x).float().cpu()

    def _graph_for(self, x: torch.Tensor) -> GraphedForward | None:
        shape = tuple(x.shape)
        if shape not in self._graphs and len(self._graphs) < MAX_GRAPHS:
            try:
                self._graphs[shape] = GraphedForward(self.model, x)
            except RuntimeError as e:  # an unsupported GPU or driver: eager is slower but correct
                log.warning("CUDA graph capture failed (%s); running eagerly.", e)
                self.cuda_graphs = False
        return self._graphs.get(shape)
