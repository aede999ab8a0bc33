"""Untrusted image files read with bounded work: which formats are read, what their headers say, and decoding in
worker processes that can be stopped.

A file is read only if its first bytes name one of FORMATS (JPEG, PNG, WebP, BMP, GIF, TIFF), and then only by
that format's Pillow plugin: formats that run external programs (EPS) or decode in Python (QOI, plain PPM, BMP
RLE), and containers that hide a larger image than they declare (ICNS, ICO), are never opened. Before Pillow
parses anything, the file's structure is walked: a JPEG may have at most MAX_JPEG_SCANS scans (each one decodes
the whole image again) and a bounded number of segments, a PNG a bounded number of chunks (Pillow parses each
text chunk in Python).

`read_header` and `read_crop` run in worker processes (`Workers`), each job with a CPU-time limit and a memory
limit of its own: a file that takes longer than DECODE_SECONDS of CPU is stopped by the kernel, one whose decoder
allocates more than its estimate is refused, and either way the worker is replaced, so its memory goes back to the
system and no request is held. Only the crop the model sees (a few hundred kB) comes back.

This module does not import Gradio: the workers are forked from a server process that has imported only it.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import queue
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np
from PIL import Image

from . import preprocess

MAX_MEGAPIXELS = 40  # larger images are refused from their header, before decoding
MAX_PIXELS = MAX_MEGAPIXELS * 1_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# The first bytes of each format read, and the Pillow plugin that alone may open it.
MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Modes `preprocess.load_image` turns into the model's mode; anything else (LAB, HSV, I;16S, ...) is refused.
MODES = {"1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LA", "PA", *preprocess.HIGH_DEPTH}
MAX_JPEG_SCANS = 64  # libjpeg writes 10 for a progressive colour photo; each scan costs a pass over the image
MAX_JPEG_SEGMENTS = 1000  # markers before the first scan (Pillow reads each in Python)
MAX_PNG_CHUNKS = 20_000  # 20 MB in libpng's 8 kB IDAT chunks is 2,560
MAX_PNG_ANCILLARY = 500  # chunks other than image data: text, ICC profile, EXIF, ...
MAX_TILES = 100_000  # strips or tiles of a TIFF, each a Python object
DECODE_SECONDS = 5  # CPU seconds one decode may take (VIT_DEMO_DECODE_SECONDS)
HEADER_SECONDS = 2  # CPU seconds reading one header may take
HEADER_BYTES = 256 * 1024**2  # memory reading one header may take
SLACK_BYTES = 128 * 1024**2  # a decode may take this much more than its estimate before it is refused


class Refused(Exception):
    """A file that will not be decoded; `reason` is one of "unreadable", "damaged", "too_large", "scans",
    "too_slow", "too_costly" (guard.py gives each its sentence)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def sniff(head: bytes) -> str | None:
    """The format a file's first 16 bytes name, if it is one that is read; None otherwise."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in MAGIC:
        if head.startswith(magic):
            return fmt
    return None


# --- structure, walked before any plugin parses the file -------------------------------------------------------

_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the first marker after a scan's entropy-coded data
_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass
class JpegLayout:
    scans: int = 0
    progressive: bool = False
    coefficient_bytes: int = 0  # whole-image DCT coefficients libjpeg keeps for multi-scan files


def jpeg_layout(data: bytes) -> JpegLayout:
    """Walks a JPEG's markers (C-speed search through entropy-coded data) and counts its scans.

    Raises:
        Refused: "scans" past MAX_JPEG_SCANS, "unreadable" for too many segments or no frame header.
    """
    out, pos, segments, frame = JpegLayout(), 2, 0, None
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            m = _ENTROPY_END.search(data, pos)
            if m is None:
                break
            pos = m.start()
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # standalone markers
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2: pos + 4])
        segment = data[pos + 4: pos + 2 + length]
        if marker in _SOF and frame is None:
            frame = segment
            out.progressive = marker in _PROGRESSIVE_SOF
        if marker == 0xDA:
            out.scans += 1
            if out.scans > MAX_JPEG_SCANS:
                raise Refused("scans", f"more than {MAX_JPEG_SCANS} scans")
            m = _ENTROPY_END.search(data, pos + 2 + length)
            if m is None:
                break
            pos = m.start()
            continue
        segments += 1
        if out.scans == 0 and segments > MAX_JPEG_SEGMENTS:
            raise Refused("unreadable", f"more than {MAX_JPEG_SEGMENTS} segments")
        pos += 2 + length
    if frame is not None and len(frame) >= 6:
        out.coefficient_bytes = _coefficient_bytes(frame) if (out.progressive or out.scans > 1) else 0
    return out


def _coefficient_bytes(frame: bytes) -> int:
    """Bytes of the DCT coefficients of every block of every component (64 int16 each), from a frame header."""
    height, width, ncomp = struct.unpack(">HHB", frame[1:6])
    comps = [(frame[7 + 3 * i] >> 4, frame[7 + 3 * i] & 15) for i in range(ncomp) if 9 + 3 * i <= len(frame)]
    if not comps:
        return 0
    hmax, vmax = max(max(h for h, _ in comps), 1), max(max(v for _, v in comps), 1)
    blocks = sum(math.ceil(math.ceil(width * h / hmax) / 8) * math.ceil(math.ceil(height * v / vmax) / 8)
                 for h, v in comps)
    return blocks * 128


def png_chunks(data: bytes) -> None:
    """Walks a PNG's chunks. Raises Refused("unreadable") past MAX_PNG_CHUNKS, or MAX_PNG_ANCILLARY non-image ones."""
    pos, total, ancillary = 8, 0, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        total += 1
        if kind not in (b"IDAT", b"fdAT"):
            ancillary += 1
        if total > MAX_PNG_CHUNKS or ancillary > MAX_PNG_ANCILLARY:
            raise Refused("unreadable", "too many chunks")
        if kind == b"IEND":
            return
        pos += 12 + length


def check_structure(data: bytes, fmt: str) -> int:
    """Walks the parts of `data` that Pillow would parse in Python or decode repeatedly; returns the decoder's
    working memory beyond the image itself (a multi-scan JPEG's coefficients). Raises Refused."""
    if fmt == "JPEG":
        return jpeg_layout(data).coefficient_bytes
    if fmt == "PNG":
        png_chunks(data)
    return 0


# --- headers and crops, read in a worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What a file's header says: enough for `preprocess.decoded_bytes` to estimate its decode."""

    format: str
    size: tuple[int, int]  # (width, height)
    mode: str
    info: dict = field(default_factory=dict)  # "transparency" only, when the image has it
    decoder_bytes: int = 0  # the decoder's own working memory, beyond the decoded image

    def estimate(self, mode: str = "RGB", backend: str = "pil") -> int:
        """Bytes decoding this image and preparing it for a model reading `mode` with `backend` takes."""
        return preprocess.decoded_bytes(self, mode, backend) + self.decoder_bytes


def _open(path: str) -> tuple[Image.Image, Header]:
    with open(path, "rb") as f:
        data = f.read()
    fmt = sniff(data[:16])
    if fmt is None:
        raise Refused("unreadable", "not a format that is read")
    extra = check_structure(data, fmt)
    try:
        im = Image.open(path, formats=[fmt])
    except Image.DecompressionBombError as e:
        raise Refused("too_large") from e
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise Refused("too_large")
    if im.mode not in MODES or w < 1 or h < 1:
        im.close()
        raise Refused("unreadable", f"mode {im.mode}")
    if any(t.codec_name in Image.DECODERS or t.codec_name == "bmp_rle" for t in im.tile) or len(im.tile) > MAX_TILES:
        im.close()
        raise Refused("unreadable", "a decoder written in Python")
    extra += _decoder_bytes(im)
    info = {"transparency": True} if "transparency" in im.info else {}
    return im, Header(im.format, (w, h), im.mode, info, extra)


def _decoder_bytes(im: Image.Image) -> int:
    """Memory a format's decoder allocates beside the image Pillow keeps (measured, see BENCHMARKS/README)."""
    pixels = im.size[0] * im.size[1]
    if im.format == "WEBP":
        return pixels * 4  # libwebp decodes into its own RGBA buffer, then Pillow copies it
    if im.format == "TIFF" and any(t.codec_name == "libtiff" for t in im.tile):
        return pixels * 4  # libtiff's RGBA path (YCbCr, old-style JPEG) reads the whole image at once
    return 0


def read_header(path: str) -> Header:
    """The header of an image file, after its format and structure are checked (see the module doc).

    Raises:
        Refused: anything that is not read, or would not decode within the limits.
    """
    im, header = _open(path)
    im.close()
    return header


def read_crop(path: str, cfg: preprocess.PreprocessConfig) -> np.ndarray:
    """The crop a model with preprocessing `cfg` sees of the image at `path`: uint8 (C, H, W)."""
    im, _ = _open(path)
    try:
        with im:
            im.load()
            return preprocess.Preprocessor(cfg).crop(im).numpy()
    except (OSError, SyntaxError, EOFError) as e:  # Pillow's words for truncated and damaged data
        raise Refused("damaged", f"{type(e).__name__}: {e}") from e


# --- the worker processes -------------------------------------------------------------------------------------

JOBS = {"header": read_header, "crop": read_crop}


def _serve(conn) -> None:
    """A worker's loop: run one job at a time under its CPU and memory limits; exit when the server goes."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a worker stopped for CPU time writes no core file
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    while True:
        try:
            name, args, cpu_seconds, memory_bytes = conn.recv()
        except (EOFError, OSError):
            return
        _limit(cpu_seconds, memory_bytes)
        retire = False
        try:
            reply = ("ok", JOBS[name](*args), "")
        except Refused as e:
            reply, retire = ("refused", e.reason, e.detail), e.reason in ("damaged", "too_costly")
        except MemoryError:
            reply, retire = ("refused", "too_costly", "MemoryError"), True
        except Image.DecompressionBombError:
            reply = ("refused", "too_large", "")
        except Exception as e:  # noqa: BLE001 - whatever a decoder raises, the visitor gets one sentence
            reply, retire = ("refused", "unreadable", f"{type(e).__name__}: {e}"[:200]), True
        _limit(None, None)
        conn.send((*reply, retire))
        if retire:  # memory a failed decode left behind goes back to the system with the process
            return
        _trim()


def _limit(cpu_seconds: float | None, memory_bytes: int | None) -> None:
    """Sets this process's CPU-time limit `cpu_seconds` from now, and its data limit `memory_bytes` above what it
    holds now (None: no limit)."""
    if cpu_seconds is None:
        soft = resource.RLIM_INFINITY
    else:
        used = sum(os.times()[:2])
        soft = int(math.ceil(used + cpu_seconds))
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = resource.RLIM_INFINITY if memory_bytes is None else _data_bytes() + int(memory_bytes)
    resource.setrlimit(resource.RLIMIT_DATA, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _data_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def decode_seconds() -> float:
    """VIT_DEMO_DECODE_SECONDS (default 5): CPU seconds one image's decode may take."""
    try:
        return max(0.5, float(os.environ.get("VIT_DEMO_DECODE_SECONDS", DECODE_SECONDS)))
    except ValueError:
        return DECODE_SECONDS


class _Zygote:
    """A process that has imported this module and nothing that starts threads, and forks workers on request.

    Forking it is cheap (its memory is shared with every worker until written) and safe (it has one thread),
    which forking the server itself is not; multiprocessing's forkserver would import the server's main module
    again in every worker.
    """

    def __init__(self):
        ours, theirs = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"import sys; sys.path.insert(0, {root!r}); from vit_demo.decode import _zygote; _zygote({theirs.fileno()})"
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),), close_fds=True)
        theirs.close()
        self.sock = ours

    def fork(self) -> tuple[int, Connection]:
        """A new worker: (pid, connection)."""
        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(self.sock, [b"w"], [theirs.fileno()])
            pid = self.sock.recv(4)
        finally:
            theirs.close()
        if len(pid) != 4:
            raise OSError("the decode zygote is gone")
        return struct.unpack("<i", pid)[0], Connection(ours.detach())

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.process.kill()
            self.process.wait(timeout=5)


def _zygote(fd: int) -> None:
    """The zygote's loop: for each descriptor received, fork a worker serving it, and send back its pid."""
    control = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped as they end
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not fds:  # the server has gone
            return
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                _serve(Connection(fds[0]))
            finally:
                os._exit(0)
        os.close(fds[0])
        try:
            control.sendall(struct.pack("<i", pid))
        except OSError:  # the server went while the worker was forked
            return


class _Worker:
    def __init__(self, pid: int, conn: Connection):
        self.pid, self.conn = pid, conn

    def alive(self) -> bool:
        return not self.conn.closed and os.path.exists(f"/proc/{self.pid}") if os.path.isdir("/proc") else True

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.conn.close()


class Workers:
    """A bounded set of worker processes; `run` gives a job to an idle one (waiting for one when all are busy),
    and stops and replaces a worker that runs past its time or fails.

    Workers are forked from a zygote process (`_Zygote`), started once, that has imported this module: starting
    a worker costs milliseconds, and its memory is shared until written.
    """

    def __init__(self, size: int):
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None
        self.started = 0  # workers started so far, for tests

    def warm(self) -> None:
        """Starts the zygote and one worker ahead of the first request (the zygote imports torch: a few seconds)."""
        with self._slots:
            self._idle.put(self._take())

    def _take(self) -> _Worker:
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            if worker.alive():
                return worker
            worker.stop()
        with self._lock:
            for attempt in range(2):
                if self._zygote is None or self._zygote.process.poll() is not None:
                    if self._zygote is not None:
                        self._zygote.stop()
                    self._zygote = _Zygote()
                try:
                    pid, conn = self._zygote.fork()
                    break
                except OSError:
                    self._zygote.stop()
                    self._zygote = None
                    if attempt:
                        raise
            self.started += 1
        return _Worker(pid, conn)

    def pids(self) -> list[int]:
        """The zygote's and the idle workers' process ids, for tests that measure memory."""
        with self._lock:
            zygote = [self._zygote.process.pid] if self._zygote is not None else []
        return zygote + [w.pid for w in list(self._idle.queue)]

    def run(self, name: str, args: tuple, cpu_seconds: float, memory_bytes: int | None):
        """Runs JOBS[name](*args) in a worker within `cpu_seconds` of CPU and `memory_bytes` of new memory.

        Returns:
            what the job returns.
        Raises:
            Refused: what the job raised, or "too_slow" when it ran out of time, "too_costly" when it died
            otherwise (out of memory).
        """
        wall = 3 * cpu_seconds + 5  # CPU time is the limit; the wall clock only catches a worker that waits
        with self._slots:
            worker, keep = self._take(), False
            start = time.monotonic()
            try:
                worker.conn.send((name, args, cpu_seconds, memory_bytes))
                if not worker.conn.poll(wall):
                    raise Refused("too_slow", f"no answer in {wall:.0f} s")
                status, value, detail, retire = worker.conn.recv()
                keep = not retire
            except (EOFError, OSError):  # the kernel stopped it: CPU time (SIGXCPU), or memory
                if time.monotonic() - start >= cpu_seconds:
                    raise Refused("too_slow", f"stopped after {cpu_seconds:g} s of CPU") from None
                raise Refused("too_costly", "the worker ended") from None
            finally:
                if keep:
                    self._idle.put(worker)
                else:
                    worker.stop()
        if status == "ok":
            return value
        raise Refused(value, detail)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().stop()
            except queue.Empty:
                break
        with self._lock:
            if self._zygote is not None:
                self._zygote.stop()
                self._zygote = None


def worker_count() -> int:
    """VIT_DEMO_DECODE_WORKERS (default 4): images decoded at once, each in its own process."""
    try:
        return max(1, int(os.environ.get("VIT_DEMO_DECODE_WORKERS", 4)))
    except ValueError:
        return 4


WORKERS = Workers(worker_count())


def header(path: str) -> Header:
    """`read_header(path)` in a worker (see Workers.run)."""
    return WORKERS.run("header", (path,), HEADER_SECONDS, HEADER_BYTES)


def crop(path: str, cfg: preprocess.PreprocessConfig, estimate: int) -> np.ndarray:
    """`read_crop(path, cfg)` in a worker, allowed `estimate` bytes (and some slack) of new memory."""
    return WORKERS.run("crop", (path, cfg), decode_seconds(), estimate + SLACK_BYTES)
