"""The one door every image passes, and the files results leave by.

Every event that takes the photo (public endpoints, private follow-ups, the upload check) receives it through
`PhotoInput`, whatever form it was sent in: a file in Gradio's upload cache (what visitors uploaded, pasted, shot
with the webcam, or picked from the examples), an inline data: URL (written to the cache, within
MAX_DATA_URL_BYTES, without being decoded), or a web address (refused before any connection, unless the operator
sets VIT_DEMO_FETCH_IMAGES=1: then fetched from public addresses only, within a size and a time limit). Gradio's
own image preprocessing, which would download and decode these itself, never runs. Anything else is refused
before it is opened.

Then the file's header is read in a worker process (`vit_demo.decode`): only JPEG, PNG, WebP, BMP, GIF and TIFF,
their structure walked first (JPEG scans, PNG chunks), and the memory their decoding will take estimated. The
decode itself (`photo_crop`) runs in a worker too, under a CPU-time limit, holding that estimate of a budget
shared by every event while it runs (and only then: not during forward passes, and not when the crop is kept
from an earlier request), so that a burst of large images waits instead of exhausting memory. Whatever goes
wrong while reading an image, the visitor gets one sentence and the log one rate-limited line.

Live webcam frames arrive as data: URLs; `LiveFrame` reads their header the same way (type, structure, size,
mode) before anything decodes them, and the stream decodes them under the same budget. Results are written under
names of their own (`ResultImage`), never over a file someone may be downloading.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import io
import ipaddress
import os
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import httpx
import torch
from gradio.processing_utils import hash_bytes
from PIL import Image

from .. import decode
from ..decode import MAX_MEGAPIXELS
from . import server
from .checks import log_refusal, refusal, short
from .common import DAMAGED

EXAMPLES_DIR = str(Path(__file__).resolve().parents[2] / "examples")
DECODE_BUDGET_BYTES = 2 * 1024**3  # decode memory of all requests together (see README, "Limits")
TRIM_AFTER_BYTES = 64 * 1024**2  # after a decode this large, idle memory goes back to the system
MAX_DATA_URL_BYTES = 8 * 1024**2  # an image sent inline, decoded from base64 (the request limit is tighter still)
FETCH_BYTES = 20 * 1024**2  # an image fetched from a web address (VIT_DEMO_FETCH_IMAGES=1), like an upload
FETCH_SECONDS = 10  # the whole download, connection included

NOT_UPLOADED = "Only images uploaded to this app can be used: upload the file first (gradio_client: handle_file)."
UNREADABLE = "This file could not be read as an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo."
TOO_LARGE = f"This image has more than {MAX_MEGAPIXELS} megapixels: scale it down and try again."
TOO_SLOW = ("This image takes too long to decode (more than a few seconds of work): save it as an ordinary JPEG "
            "or PNG and try again.")
SCANS = (f"This JPEG is stored in more than {decode.MAX_JPEG_SCANS} passes (scans), which makes it slow to decode: "
         "save it as an ordinary JPEG and try again.")
TOO_COSTLY = ("This image needs more memory to decode than its size accounts for: save it as an ordinary JPEG or "
              "PNG and try again.")
REMOTE = ("Images are not fetched from web addresses here: download the image and upload the file "
          "(gradio_client: handle_file on a local path).")
REMOTE_PRIVATE = "This web address does not lead to a public server: upload the image instead."
REMOTE_FAILED = "The image at this web address could not be downloaded ({}): upload the file instead."
REMOTE_TOO_LARGE = f"The image at this web address is larger than {FETCH_BYTES // 2**20} MB: upload a smaller file."
INLINE_TOO_LARGE = (f"This inline image is larger than {MAX_DATA_URL_BYTES // 2**20} MB: upload the file instead "
                    "(gradio_client: handle_file).")
SENTENCES = {"unreadable": UNREADABLE, "damaged": DAMAGED, "too_large": TOO_LARGE, "scans": SCANS,
             "too_slow": TOO_SLOW, "too_costly": TOO_COSTLY}


def refused(e: decode.Refused) -> gr.Error:
    """A worker's refusal as the visitor's sentence, logged in one line with what went wrong."""
    sentence = SENTENCES.get(e.reason, UNREADABLE)
    log_refusal(f"{sentence} ({short(e.detail, 120)})" if e.detail else sentence)
    return gr.Error(sentence, print_exception=False)


def check_uploaded(path, cache_dir: str) -> str:
    """`path` if it lies in Gradio's upload cache or the bundled examples; refused before anything opens it."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise refusal(NOT_UPLOADED)
    real = os.path.realpath(path)
    for root in (os.path.realpath(cache_dir), os.path.realpath(EXAMPLES_DIR)):
        if real.startswith(root + os.sep):
            return path
    raise refusal(NOT_UPLOADED)


def _is_remote(value) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


def fetching_allowed() -> bool:
    """VIT_DEMO_FETCH_IMAGES=1: images given by a web address are fetched (off by default)."""
    return os.environ.get("VIT_DEMO_FETCH_IMAGES", "") == "1"


class PhotoInput(gr.Image):
    """gr.Image that admits only uploaded files and readable, not too large images, each with one sentence."""

    def get_block_name(self) -> str:
        return "image"

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        if _is_remote(str(url_or_file_path)):  # Gradio would download it here: `preprocess` decides instead
            return str(url_or_file_path)
        return await super().async_move_resource_to_block_cache(url_or_file_path)

    def move_resource_to_block_cache(self, url_or_file_path):
        if _is_remote(str(url_or_file_path)):
            return str(url_or_file_path)
        return super().move_resource_to_block_cache(url_or_file_path)

    def preprocess(self, payload):
        if payload is None:
            return None
        url, path = getattr(payload, "url", None), getattr(payload, "path", None)
        if isinstance(url, str) and url.startswith("data:"):
            path = save_data_url(url, self.GRADIO_CACHE)
        elif _is_remote(path) or (path is None and _is_remote(url)):
            if not fetching_allowed():
                raise refusal(REMOTE)
            path = fetch(path if _is_remote(path) else url, self.GRADIO_CACHE)
        check_uploaded(path, self.GRADIO_CACHE)
        photo_header(path)
        return path


def save_data_url(url: str, cache_dir: str) -> str:
    """An image sent inline as a data: URL -> its bytes in the upload cache, not decoded (the door reads them)."""
    head, sep, body = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise refusal(UNREADABLE)
    if len(body) > MAX_DATA_URL_BYTES * 4 // 3 + 4:
        raise refusal(INLINE_TOO_LARGE)
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise refusal(UNREADABLE) from e
    return _save(data, cache_dir)


def _save(data: bytes, cache_dir: str) -> str:
    """`data` written to `cache_dir/<content hash>/image`, once, within the client's share of the upload cache
    (`server.save_for_client`: an inline image costs the disk what an upload does)."""
    folder = Path(cache_dir) / hash_bytes(data)
    path = folder / "image"
    if path.exists():
        return str(path)

    def write() -> str:
        folder.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=".image.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
        return str(path)

    return server.save_for_client(len(data), write)


def _public(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    return address.is_global and not address.is_multicast


class _PinnedTransport(httpx.HTTPTransport):
    """Connects to the address that was checked, whatever the name resolves to by then (TLS still checks the name)."""

    def __init__(self, ip: str):
        super().__init__()
        self.ip = ip

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        request.url = request.url.copy_with(host=self.ip)
        request.headers["Host"] = host
        request.extensions = {**request.extensions, "sni_hostname": host}
        return super().handle_request(request)


def fetch(url: str, cache_dir: str) -> str:
    """An image at a public web address -> its bytes in the upload cache (only with VIT_DEMO_FETCH_IMAGES=1).

    The name must resolve to public addresses only; redirects are not followed; the body is read as it arrives and
    dropped past FETCH_BYTES, and the whole download past FETCH_SECONDS.
    """
    try:
        target = httpx.URL(url)
        port = target.port or (443 if target.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(target.host, port, type=socket.SOCK_STREAM)}
    except (httpx.InvalidURL, socket.gaierror, UnicodeError, ValueError) as e:
        raise refusal(REMOTE_FAILED.format("the name does not resolve")) from e
    if not addresses or not all(_public(ip) for ip in addresses):
        raise refusal(REMOTE_PRIVATE)
    deadline = time.monotonic() + FETCH_SECONDS
    data = bytearray()
    try:
        with httpx.Client(transport=_PinnedTransport(sorted(addresses)[0]), timeout=FETCH_SECONDS,
                          headers={"Accept-Encoding": "identity"}) as client:
            with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise refusal(REMOTE_FAILED.format(f"HTTP {r.status_code}"))
                if r.headers.get("content-encoding", "identity").lower() != "identity":
                    raise refusal(REMOTE_FAILED.format("a compressed answer"))
                declared = r.headers.get("content-length", "0")
                if not declared.isdigit() or int(declared) > FETCH_BYTES:
                    raise refusal(REMOTE_TOO_LARGE)
                for chunk in r.iter_raw(64 * 1024):
                    data += chunk
                    if len(data) > FETCH_BYTES:
                        raise refusal(REMOTE_TOO_LARGE)
                    if time.monotonic() > deadline:
                        raise refusal(REMOTE_FAILED.format(f"slower than {FETCH_SECONDS} s"))
    except httpx.HTTPError as e:
        raise refusal(REMOTE_FAILED.format(type(e).__name__)) from e
    return _save(bytes(data), cache_dir)


# Headers read so far, by path: uploads are named by a hash of their content, so a path's header never changes.
_HEADERS: OrderedDict[str, decode.Header | decode.Refused] = OrderedDict()
_HEADERS_LOCK = threading.Lock()
_HEADERS_KEPT = 1024


def photo_header(path: str) -> decode.Header:
    """The header of an admitted file, read in a worker once per path; refusals in one sentence."""
    with _HEADERS_LOCK:
        known = _HEADERS.get(path)
    if known is None:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as e:
            raise refusal(UNREADABLE) from e
        if decode.sniff(head) is None:  # not a format that is read: no worker needed to say so
            known = decode.Refused("unreadable")
        else:
            try:
                known = decode.header(path)
            except decode.Refused as e:
                known = e
        with _HEADERS_LOCK:
            _HEADERS[path] = known
            while len(_HEADERS) > _HEADERS_KEPT:
                _HEADERS.popitem(last=False)
    if isinstance(known, decode.Refused):
        raise refused(known)
    return known


def header_estimate(path: str, clf=None) -> int:
    """Bytes that decoding `path` for `clf` will take (for the costliest preprocessing when None), read from its
    header alone; refuses bombs and non-images."""
    header = photo_header(path)
    return header.estimate("RGB", "tensor") if clf is None else header.estimate(clf.preprocessor.cfg.mode,
                                                                                clf.preprocessor.cfg.backend)


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


def photo_crop(path: str, clf) -> torch.Tensor:
    """The crop `clf` sees of a photo PhotoInput admitted, uint8 (C, H, W): kept from an earlier request, or
    decoded in a worker process while holding its estimate of the decode budget (and only while decoding).

    Raises:
        gr.Error: one sentence for anything that goes wrong while reading the image.
    """
    kept = clf.kept_crop(path)
    if kept is not None:
        return kept
    cfg = clf.preprocessor.cfg
    estimate = photo_header(path).estimate(cfg.mode, cfg.backend)
    with BUDGET.hold(estimate):
        try:
            return torch.from_numpy(decode.crop(path, cfg, estimate))
        except decode.Refused as e:
            raise refused(e) from e


def warm() -> None:
    """Starts the decode workers in the background, so that the first photo does not wait for them."""
    threading.Thread(target=decode.WORKERS.warm, name="vit-demo-decode-warm", daemon=True).start()


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
# A JPEG frame larger than this is decoded at the largest reduced scale (1/2, 1/4 or 1/8, JPEG's own) that still
# keeps this size: more than any model's crop needs, and a 4-megapixel frame costs a third of its full decode.
DRAFT_SIZE = (640, 480)
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
        """Bytes its decoded pixels take (at most: a large JPEG is decoded smaller)."""
        return self.size[0] * self.size[1] * MODES[self.mode]

    def decode(self) -> Image.Image:
        """The frame's pixels; a JPEG larger than DRAFT_SIZE at a reduced scale that keeps DRAFT_SIZE."""
        try:
            image = Image.open(io.BytesIO(self.data), formats=[self.format])
            if self.format == "JPEG":
                image.draft(image.mode, DRAFT_SIZE)
            image.load()
            return image
        except Exception as e:  # noqa: BLE001 - whatever the decoder raises, one sentence
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
        if decode.sniff(data[:16]) != FORMATS[mime]:
            raise refusal(FRAME_UNREADABLE)
        decode.check_structure(data, FORMATS[mime])  # JPEG scans, PNG chunks: before Pillow parses anything
        with Image.open(io.BytesIO(data), formats=[FORMATS[mime]]) as im:  # the header only, of the type it claims
            fmt, size, mode = im.format, im.size, im.mode
    except gr.Error:
        raise
    except Image.DecompressionBombError as e:
        raise refusal(FRAME_TOO_LARGE) from e
    except decode.Refused as e:
        raise refusal(SCANS if e.reason == "scans" else FRAME_UNREADABLE) from e
    except Exception as e:  # noqa: BLE001 - whatever the header parser raises, one sentence
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
