"""The one door every image passes, and the files results leave by.

Every event that takes the photo (public endpoints, private follow-ups, the upload check) receives it through
`PhotoInput`, which accepts only files in Gradio's upload cache (what visitors uploaded, pasted, shot with the
webcam, or picked from the examples) and refuses anything else before opening it. Its header is read to refuse
decompression bombs, and the memory its decoding will take is estimated from the header: `decoding` holds that
much of a budget shared by every event, so that a burst of large images waits instead of exhausting memory.
Live webcam frames arrive as data: URLs rather than uploads; `LiveFrame` reads their header the same way (type,
size, mode) before anything decodes them, and the stream decodes them under the same budget. Results are written
under names of their own (`ResultImage`), never over a file someone may be downloading.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import io
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.processing_utils import hash_bytes
from PIL import Image, UnidentifiedImageError

from .. import preprocess
from .checks import refusal

EXAMPLES_DIR = str(Path(__file__).resolve().parents[2] / "examples")
MAX_MEGAPIXELS = 40  # larger images are refused from their header, before decoding
DECODE_BUDGET_BYTES = 2 * 1024**3  # decode memory of all requests together (see README, "Limits")
TRIM_AFTER_BYTES = 64 * 1024**2  # after a decode this large, idle memory goes back to the system

NOT_UPLOADED = "Only images uploaded to this app can be used: upload the file first (gradio_client: handle_file)."
UNREADABLE = "This file could not be read as an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo."
TOO_LARGE = f"This image has more than {MAX_MEGAPIXELS} megapixels: scale it down and try again."

Image.MAX_IMAGE_PIXELS = MAX_MEGAPIXELS * 1_000_000


def check_uploaded(path, cache_dir: str) -> str:
    """`path` if it lies in Gradio's upload cache or the bundled examples; refused before anything opens it."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise refusal(NOT_UPLOADED)
    real = os.path.realpath(path)
    for root in (os.path.realpath(cache_dir), os.path.realpath(EXAMPLES_DIR)):
        if real.startswith(root + os.sep):
            return path
    raise refusal(NOT_UPLOADED)


class PhotoInput(gr.Image):
    """gr.Image that admits only uploaded files and readable, not too large images, each with one sentence."""

    def get_block_name(self) -> str:
        return "image"

    def preprocess(self, payload):
        if payload is None:
            return None
        if not (getattr(payload, "url", None) or "").startswith("data:"):  # data: URLs are written into the cache
            check_uploaded(getattr(payload, "path", None), self.GRADIO_CACHE)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                path = super().preprocess(payload)  # opens the file (its header) unless it is an SVG
            if path is not None:
                check_uploaded(path, self.GRADIO_CACHE)
                header_estimate(path)  # gradio passes some uploads (SVG) through unopened: open every one here
            return path
        except gr.Error:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise refusal(TOO_LARGE) from e
        except (UnidentifiedImageError, ValueError, OSError, SyntaxError) as e:
            raise refusal(UNREADABLE) from e


def header_estimate(path: str, clf=None) -> int:
    """Bytes that decoding `path` for `clf` will take (for the costliest preprocessing when None), read from its
    header alone; refuses bombs and non-images."""
    cfg = clf.preprocessor.cfg if clf is not None else preprocess.PreprocessConfig(backend="tensor")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return preprocess.decoded_bytes(im, cfg.mode, cfg.backend)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise refusal(TOO_LARGE) from e
    except (UnidentifiedImageError, ValueError, OSError, SyntaxError) as e:
        raise refusal(UNREADABLE) from e


class DecodeBudget:
    """Bytes of decode memory that requests may hold at once; a request past the budget waits for its turn."""

    def __init__(self, total: int = DECODE_BUDGET_BYTES):
        self.total = total
        self.used = 0
        self.peak = 0  # the most ever held at once, for tests
        self._cond = threading.Condition()
        self._since_trim = 0

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        nbytes = min(max(int(nbytes), 0), self.total)
        with self._cond:
            while self.used + nbytes > self.total:
                self._cond.wait()
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._since_trim += nbytes
                trim = self.used == 0 and self._since_trim >= TRIM_AFTER_BYTES
                if trim:
                    self._since_trim = 0
                self._cond.notify_all()
            if trim:
                _return_free_memory()


BUDGET = DecodeBudget()


@contextlib.contextmanager
def decoding(path: str, clf=None):
    """Holds the budget for decoding `path` (an image PhotoInput admitted) for `clf` while the block runs."""
    with BUDGET.hold(header_estimate(path, clf)):
        yield


def _return_free_memory() -> None:
    """Hands freed heap back to the system (glibc keeps it otherwise, and RSS stays at the burst's peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class ResultImage(gr.Image):
    """An output image written once under a name of its own, never rewritten while someone downloads it.

    Gradio would save a PIL result to `<hash of its bytes>/image.png` by rewriting the file in place on every
    request that produces the same picture; here the file is written to a temporary name and renamed into
    place only if it is not there yet, and Gradio's cache copy then finds it already in place.
    """

    def get_block_name(self) -> str:
        return "image"

    def postprocess(self, value):
        if isinstance(value, Image.Image):
            value = save_once(value, self.GRADIO_CACHE)
        return super().postprocess(value)


def save_once(image: Image.Image, cache_dir: str, name: str = "image.png") -> str:
    """Writes `image` as PNG to `cache_dir/<content hash>/name` atomically, unless it is there already."""
    from io import BytesIO

    buf = BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    for attempt in range(3):
        try:
            return _save_bytes_once(data, Path(cache_dir) / hash_bytes(data) / name)
        except FileNotFoundError:  # the cache sweep removed the folder or the file meanwhile: write it again
            if attempt == 2:
                raise


def _save_bytes_once(data: bytes, path: Path) -> str:
    folder, name = path.parent, path.name
    folder.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.utime(path)  # the cache sweep ages files by time: a result handed out again is young again
        return str(path)
    fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(staging)
        raise
    return str(path)


# Live webcam frames: the streaming input sends data: URLs, checked here like uploads.
MAX_FRAME_MEGAPIXELS = 4
MAX_FRAME_BYTES = 8 * 1024**2  # encoded; the request limit (server.BODY_BYTES) is tighter still
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
MODES = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "P": 1, "CMYK": 4, "YCbCr": 3}  # 8-bit modes, bytes per pixel
NOT_A_FRAME = ("Live mode takes webcam frames from the page as JPEG, PNG or WebP data URLs: start the webcam in "
               "the Live tab (to classify a file, use /classify).")
FRAME_UNREADABLE = "A webcam frame could not be read as a JPEG, PNG or WebP image: start the webcam again."
FRAME_TOO_LARGE = (f"This webcam frame has more than {MAX_FRAME_MEGAPIXELS} megapixels: set the camera to a lower "
             "resolution (640x480 is plenty) and start again.")


@dataclass
class Frame:
    """One webcam frame whose header has been read and checked; its pixels are not decoded yet."""

    data: bytes
    format: str  # "JPEG", "PNG" or "WEBP"
    size: tuple[int, int]  # (width, height)
    mode: str

    @property
    def nbytes(self) -> int:
        """Bytes its decoded pixels take."""
        return self.size[0] * self.size[1] * MODES[self.mode]

    def decode(self) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(self.data), formats=[self.format])
            image.load()
            return image
        except (UnidentifiedImageError, ValueError, OSError, SyntaxError) as e:
            raise refusal(FRAME_UNREADABLE) from e


def read_frame(url) -> Frame:
    """A webcam frame sent as a data: URL -> its checked header and bytes (see the module doc).

    Args:
        url: "data:image/jpeg;base64,..." (or image/png, image/webp), as the page's webcam sends it.
    Returns:
        the Frame, not yet decoded.
    Raises:
        gr.Error: anything else, an unreadable image, or one over MAX_FRAME_MEGAPIXELS; one sentence each.
    """
    if not isinstance(url, str) or not url.startswith("data:"):
        raise refusal(NOT_A_FRAME)
    head, _, body = url.partition(",")
    mime, _, encoding = head[len("data:"):].partition(";")
    if mime not in FORMATS or encoding != "base64" or len(body) > MAX_FRAME_BYTES * 4 // 3 + 4:
        raise refusal(NOT_A_FRAME)
    try:
        data = base64.b64decode(body, validate=True)
        with Image.open(io.BytesIO(data), formats=[FORMATS[mime]]) as im:  # the header only, of the type it claims
            fmt, size, mode = im.format, im.size, im.mode
    except Image.DecompressionBombError as e:
        raise refusal(FRAME_TOO_LARGE) from e
    except (binascii.Error, UnidentifiedImageError, ValueError, OSError, SyntaxError) as e:
        raise refusal(FRAME_UNREADABLE) from e
    if size[0] * size[1] > MAX_FRAME_MEGAPIXELS * 1_000_000:
        raise refusal(FRAME_TOO_LARGE)
    if mode not in MODES or min(size) < 1:
        raise refusal(FRAME_UNREADABLE)
    return Frame(data, fmt, size, mode)


class LiveFrame(gr.Image):
    """The streaming webcam input: each frame is checked by `read_frame` before anything decodes it."""

    def get_block_name(self) -> str:
        return "image"

    def preprocess(self, payload) -> Frame | None:
        if payload is None:
            return None
        return read_frame(getattr(payload, "url", None) if not isinstance(payload, dict) else payload.get("url"))
