"""How forward passes run: the precision for a device, CUDA graphs for batch 1, and batching of concurrent callers.

`Classifier` owns one `Runtime`; the model itself (model.py) knows nothing of this.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Callable

import torch

log = logging.getLogger(__name__)

MAX_BATCH = 16  # concurrent requests answered by one forward pass, at most
_CAPTURE_LOCK = threading.Lock()  # CUDA captures one graph at a time per process


def inference_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA GPUs that support it; float32 elsewhere (older GPUs, CPUs and MPS, where bfloat16
    is missing, partial or slower than float32)."""
    if device.type != "cuda":
        return torch.float32
    if os.environ.get("SPACES_ZERO_GPU"):  # ZeroGPU lends its (bfloat16-capable) GPUs only inside calls: no query here
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


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
        with _CAPTURE_LOCK, torch.cuda.stream(side):  # one capture at a time, on a stream of its own
            for _ in range(warmup):  # warm-up runs pick kernels and allocate workspaces outside the capture
                model(self.static_x)
            side.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: other threads (/explain, another model) may use the GPU during the capture.
                with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                    self.static_y = model(self.static_x)
            finally:
                torch.cuda.set_stream(side)  # a failed capture would leave this thread on the capture stream
        stream.wait_stream(side)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_y.clone()


class Batcher:
    """Lets concurrent callers share forward passes: dynamic batching without a timer.

    A caller whose input arrives while a forward pass is running waits; when it ends, one waiting caller runs
    everything that queued up meanwhile (at most `max_batch` inputs) as one batch and hands each caller its
    rows. A lone caller runs at once, so batching adds no latency when the server is idle. Inputs are
    validated by each caller before they get here, so one bad image cannot fail somebody else's request.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], max_batch: int = MAX_BATCH):
        self.forward = forward
        self.max_batch = max_batch
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
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

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
            raise self.error
        return self.out


class Runtime:
    """Runs a model's classification forward pass on its device: inputs cast to the model's dtype, batch 1
    replayed from a CUDA graph on GPUs, concurrent callers batched; logits come back as float32 on the CPU.

    Args:
        model: the VisionTransformer, already on `device` in `dtype`, in eval mode.
        cuda_graphs: capture batch 1 into a CUDA graph (on CUDA devices only); if capture fails, run eagerly.
        max_batch: the most concurrent callers one forward pass answers.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, cuda_graphs: bool = True,
                 max_batch: int = MAX_BATCH):
        self.model, self.device, self.dtype = model, device, dtype
        # Not on ZeroGPU Spaces, which lend the GPU per call: a graph captured in one call would not outlive it.
        self.cuda_graphs = cuda_graphs and device.type == "cuda" and not os.environ.get("SPACES_ZERO_GPU")
        self._graph: GraphedForward | None = None
        forward = weakref.WeakMethod(self._forward)  # no cycle: an evicted model's memory is freed at once
        self.batcher = Batcher(lambda x: forward()(x), max_batch)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised input (1, C, H, W) -> logits (1, num_classes), float32, on the CPU."""
        return self.batcher(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype, non_blocking=True)
        if self.cuda_graphs and x.shape[0] == 1:
            graph = self._graph_for(x)
            if graph is not None:
                return graph(x).float().cpu()
        return self.model(x).float().cpu()

    def _graph_for(self, x: torch.Tensor) -> GraphedForward | None:
        if self._graph is None or self._graph.shape != tuple(x.shape):
            try:
                self._graph = GraphedForward(self.model, x)
            except RuntimeError as e:  # an unsupported GPU or driver: eager is slower but correct
                log.warning("CUDA graph capture failed (%s); running eagerly.", e)
                self.cuda_graphs, self._graph = False, None
        return self._graph
