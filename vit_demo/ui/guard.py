"""The one door every image passes, and the files results leave by.

Every event that takes the photo (public endpoints, private follow-ups, the upload check) receives it through
`PhotoInput`, which accepts only files in Gradio's upload cache (what visitors uploaded, pasted, shot with the
webcam, or picked from the examples) and refuses anything else before opening it. Its header is read to refuse
decompression bombs, and the memory its decoding will take is estimated from the header: `decoding` holds that
much of a budget shared by every event, so that a burst of large images waits instead of exhausting memory.
Results are written under names of their own (`ResultImage`), never over a file someone may be downloading.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import threading
import warnings
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
    folder = Path(cache_dir) / hash_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
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
