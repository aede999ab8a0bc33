"""What an image costs, and the images that come by a side door: checked over the launched app.

One app serves the bundled model in this process, trusting one proxy hop (VIT_DEMO_TRUSTED_HOPS=1) so that each
attacker and the visitor are clients of their own by the X-Forwarded-For they send. Each attack is bounded in
count; while it runs, a visitor's /classify must still be answered. Memory is that of this process and its
decode workers together, sampled while the attack runs.

- Inline images (data: URLs) go through the same door as uploads: the header first, then a decode within the
  shared budget, in a worker.
- JPEGs stored in thousands of scans, PNGs of endless chunks, JPEGs of endless segments are refused from their
  structure, before any decode.
- Formats that decode in Python, run programs or hide a larger image (QOI, EPS, plain PPM, BMP RLE, ICNS, ICO,
  JPEG 2000, TGA, FITS, PCX) are refused from their first bytes, whichever way they are sent.
- A mode the model cannot read (CIELab TIFF) gets the sentence, and a flood of them a few log lines.
- An image named by a web address is refused before any connection is made.
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import EXAMPLES, launched, logged_to
from conftest import raw_call as call
from vit_demo import decode
from vit_demo.registry import BUNDLED_NAME, Registry
from vit_demo.ui import guard, server

SNEAKER = EXAMPLES / "fashion-mnist-sneaker-9.png"
TIMEOUT = 120
VISITOR = {"X-Forwarded-For": "198.51.100.1"}
REFUSED_SENTENCES = (guard.UNREADABLE, server.NOT_AN_IMAGE, guard.SCANS, guard.TOO_SLOW, guard.TOO_LARGE,
                     guard.TOO_COSTLY)


def attacker(n: int) -> dict:
    return {"X-Forwarded-For": f"203.0.113.{n % 250 + 1}"}


def tree_rss_mb() -> float:
    """Resident memory of this process and of its children (the decode workers), in MB."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class PeakMemory:
    """Samples tree_rss_mb every 50 ms while in the block; `.growth` is the peak over the value on entry."""

    def __enter__(self):
        self.start = self.peak = tree_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, tree_rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth = self.peak - self.start


def data_url(data: bytes, mime: str = "image/png") -> dict:
    return {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}", "meta": {"_type": "gradio.FileData"}}


def handle(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}


def png(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def upload_bytes(url: str, data: bytes, name: str, headers: dict) -> tuple[int, str]:
    r = httpx.post(f"{url}gradio_api/upload", files=[("files", (name, data))], headers=headers, timeout=TIMEOUT)
    return r.status_code, (r.json()[0] if r.status_code == 200 else r.text)


def send(url: str, data: bytes, name: str, headers: dict, inline: bool = False) -> tuple[str, str]:
    """An image to /classify, uploaded (or inline): ("complete", label) or ("refused"/"error", the sentence)."""
    if inline:
        event, out = call(url, "classify", [data_url(data), 5, None], headers)
    else:
        status, out = upload_bytes(url, data, name, headers)
        if status != 200:
            return "refused", out
        event, out = call(url, "classify", [handle(out), 5, None], headers)
    if event == "complete":
        return event, out[0]["label"]
    return event, out


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(demo, url, a log file every log line of the app reaches)."""
    tmp = tmp_path_factory.mktemp("image-attacks")
    with logged_to(tmp / "app.log") as log_file, pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIT_DEMO_TRUSTED_HOPS", "1")
        mp.delenv("VIT_DEMO_FETCH_IMAGES", raising=False)
        with launched(Registry([BUNDLED_NAME], default=BUNDLED_NAME, device="cpu"), tmp) as (demo, url):
            yield demo, url, log_file


@pytest.fixture(scope="module")
def sneaker_label(app):
    _, url, _ = app
    event, label = send(url, SNEAKER.read_bytes(), "sneaker.png", VISITOR)
    assert event == "complete", label
    return label


def visitor_during(url: str, attack, n: int = 3) -> tuple[list, list[float]]:
    """Runs `attack()` while a visitor classifies the sneaker `n` times; (the attack's results, the visitor's
    latencies). Every one of the visitor's requests must be answered."""
    data = SNEAKER.read_bytes()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(attack)
        time.sleep(0.3)  # the attack is under way
        times = []
        for _ in range(n):
            t = time.perf_counter()
            event, out = send(url, data, "sneaker.png", VISITOR)
            assert event == "complete", f"the visitor was not served: {event} {out}"
            times.append(time.perf_counter() - t)
        return running.result(), times


# --- inline images --------------------------------------------------------------------------------------------------


def flat_png(seed: int, side: int = 6300) -> bytes:
    """A flat grey side x side PNG (39.7 MP for 6300, under the 40 MP cap) of a few tens of kB, one pixel
    telling it apart from the others."""
    image = Image.new("L", (side, side), 128)
    image.putpixel((seed % side, seed // side), seed % 251)
    return png(image, optimize=False, compress_level=9)


def test_inline_images_decode_within_the_shared_budget(app, sneaker_label):
    _, url, _ = app
    bombs = [flat_png(i) for i in range(16)]
    print(f"\n16 inline PNGs of 6300x6300, {sum(map(len, bombs)) / 1024:.0f} kB in all")

    def attack():
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda i: send(url, bombs[i], "", attacker(i), inline=True), range(16)))

    with PeakMemory() as mem:
        results, times = visitor_during(url, attack)
    print(f"memory +{mem.growth:.0f} MB at the peak; visitor {[f'{t:.2f}' for t in times]} s; "
          f"attack results {sorted({e for e, _ in results})}")
    for event, out in results:
        assert event == "complete" or out in REFUSED_SENTENCES, out
    # Each decode holds its estimate (a 39.7 MP greyscale image in RGB: 119 MB, and the crop's resize) of a 2 GiB
    # budget; without the door, each inline image cost about 600 MB.
    assert mem.growth < guard.DECODE_BUDGET_BYTES / 2**20 + 512


def test_an_inline_image_over_its_size_cap_is_refused_before_decoding(app):
    _, url, _ = app
    body = "A" * (guard.MAX_DATA_URL_BYTES * 4 // 3 + 8)
    event, out = call(url, "classify", [{"url": f"data:image/png;base64,{body}", "meta": {"_type": "gradio.FileData"}},
                                        5, None], attacker(1))
    assert (event, out) == ("error", guard.INLINE_TOO_LARGE) or event == "refused", (event, str(out)[:200])


# --- images that cost CPU -------------------------------------------------------------------------------------------


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each JPEG segment and its entropy-coded data, in order, SOI and EOI left out."""
    out, i = [], 2
    while i < len(data) - 2:
        assert data[i] == 0xFF, i
        marker = data[i + 1]
        if marker == 0xD9:
            break
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        end = i + 2 + length
        if marker == 0xDA:  # a scan: its entropy-coded data runs to the next marker that is not a restart
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append((i, end))
        i = end
    return out


def scan_bomb(side: int, repeats: int, seed: int) -> bytes:
    """A progressive JPEG of side x side whose smallest scan is repeated `repeats` times more (a few dozen bytes
    each, every one a pass over the whole image)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((side, side), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, "JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    scans = [(s, e) for s, e in _segments(data) if data[s + 1] == 0xDA]
    start, end = min(scans[1:], key=lambda se: se[1] - se[0])  # not the first (DC) scan
    return data[:-2] + data[start:end] * repeats + b"\xff\xd9"


def many_segments(count: int) -> bytes:
    """A small JPEG with `count` comment segments before its first scan."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[:2] + b"\xff\xfe\x00\x04hi" * count + data[2:]


def png_chunks(count: int, kind: bytes = b"tEXt") -> bytes:
    """A small PNG with `count` tiny ancillary chunks before its image data."""
    data = png(Image.new("RGB", (64, 64), (10, 200, 10)))
    body = b"a\x00b"
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    cut = data.index(b"IDAT") - 4
    return data[:cut] + chunk * count + data[cut:]


def test_jpegs_of_a_thousand_scans_are_refused_while_a_visitor_is_served(app, sneaker_label):
    _, url, _ = app
    bombs = [scan_bomb(6300, 1000, i) for i in range(16)]
    print(f"\n16 progressive JPEGs of 6300x6300, 1,000 scans more each: "
          f"{len(bombs[0]) / 1024:.0f} kB each")

    def attack():
        t = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: send(url, bombs[i], f"scan{i}.jpg", attacker(i)), range(16)))
        return results, time.perf_counter() - t

    (results, took), times = visitor_during(url, attack)
    print(f"refused in {took:.1f} s; visitor {[f'{t:.2f}' for t in times]} s")
    assert all(out == guard.SCANS for _, out in results), results[:3]


def test_a_jpeg_just_under_the_scan_limit_still_decodes_within_its_time(app):
    """The limit is on scans, not on JPEGs: a 6300x6300 photo of just under the limit decodes (or is stopped by
    the CPU limit with the sentence), and never holds the server."""
    _, url, _ = app
    event, out = send(url, scan_bomb(6300, decode.MAX_JPEG_SCANS - 12, 99), "under.jpg", attacker(2))
    assert event == "complete" or out == guard.TOO_SLOW, out


@pytest.mark.parametrize("name, data, sentence", [
    ("jpeg-segments", lambda: many_segments(decode.MAX_JPEG_SEGMENTS + 10), guard.UNREADABLE),
    ("png-text-chunks", lambda: png_chunks(decode.MAX_PNG_ANCILLARY + 10), guard.UNREADABLE),
    ("png-1.2-million-chunks", lambda: png_chunks(1_200_000), guard.UNREADABLE),
    ("png-zTXt-chunks", lambda: png_chunks(5000, b"zTXt"), guard.UNREADABLE),
])
def test_files_of_endless_parts_are_refused_from_their_structure(app, name, data, sentence):
    _, url, _ = app
    event, out = send(url, data(), f"{name}.bin", attacker(3))
    assert out in (sentence, server.NOT_AN_IMAGE), (name, event, out)


# --- formats --------------------------------------------------------------------------------------------------------


def _saved(fmt: str, mode: str = "RGB", size=(64, 64), **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90 if mode in ("L", "1") else (90, 40, 200)[: len(mode)]).save(buf, fmt, **kwargs)
    return buf.getvalue()


def icns_hiding(side: int) -> bytes:
    """An ICNS icon whose 128x128 entry ("ic07") holds a side x side PNG."""
    inner = png(Image.new("RGB", (side, side), (1, 2, 3)))
    entry = b"ic07" + struct.pack(">I", 8 + len(inner)) + inner
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def ico_hiding(side: int) -> bytes:
    """An ICO whose one 16x16 entry holds a side x side PNG."""
    inner = png(Image.new("RGB", (side, side), (1, 2, 3)))
    header = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22)
    return header + inner


def bmp_rle8() -> bytes:
    data = bytearray(_saved("BMP", "P"))
    struct.pack_into("<I", data, 30, 1)  # compression: BI_RLE8
    return bytes(data)


SLOW_OR_HIDING = {
    "qoi": lambda: b"qoif" + struct.pack(">IIBB", 4000, 4000, 3, 0) + b"\xfe\x01\x02\x03" * 100_000,
    "eps-named-png": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n%%EOF\n",
    "ppm-plain": lambda: b"P3\n2000 2000\n255\n" + b"255 0 0 " * 60_000,
    "pgm-binary": lambda: _saved("PPM", "L"),
    "bmp-rle8": bmp_rle8,
    "icns-8000-in-128": lambda: icns_hiding(8000),
    "ico-png-inside": lambda: ico_hiding(4000),
    "tga": lambda: _saved("TGA"),
    "pcx": lambda: _saved("PCX"),
    "jpeg2000": lambda: b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 64,
    "fits": lambda: b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8" + b" " * 2800,
    "svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
}


@pytest.mark.parametrize("inline", [False, True], ids=["uploaded", "inline"])
@pytest.mark.parametrize("name", list(SLOW_OR_HIDING))
def test_slow_or_hiding_formats_are_refused_from_their_first_bytes(app, name, inline):
    _, url, _ = app
    data = SLOW_OR_HIDING[name]()
    event, out = send(url, data, f"{name}.png", attacker(4), inline=inline)
    assert event in ("refused", "error") and out in (guard.UNREADABLE, server.NOT_AN_IMAGE), (name, event, out)


def test_the_format_check_reads_only_the_first_bytes():
    """The formats read, by their first bytes: everything else is refused before Pillow sees it."""
    assert decode.sniff(_saved("PNG")) == "PNG"
    assert decode.sniff(_saved("JPEG")) == "JPEG"
    assert decode.sniff(_saved("WEBP")) == "WEBP"
    assert decode.sniff(_saved("GIF", "P")) == "GIF"
    assert decode.sniff(_saved("TIFF")) == "TIFF"
    assert decode.sniff(_saved("BMP")) == "BMP"
    for name, make in SLOW_OR_HIDING.items():
        if name != "bmp-rle8":  # a BMP by its first bytes; its compression is refused from the header
            assert decode.sniff(make()[:64]) is None, name


def test_a_lab_tiff_gets_the_sentence_and_a_flood_of_them_a_few_log_lines(app):
    _, url, log_file = app
    lab = _saved("TIFF", "LAB", (256, 256))
    before = len(log_file.read_text().splitlines())
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: send(url, lab, "lab.tif", attacker(5 + i % 8)), range(200)))
    assert {out for _, out in results} == {guard.UNREADABLE}, {out for _, out in results}
    grown = log_file.read_text().splitlines()[before:]
    print(f"\n200 CIELab TIFFs: the log grew by {len(grown)} lines")
    assert len(grown) <= 10, grown[:12]
    assert not any("Traceback" in line for line in grown)


# --- images by web address ------------------------------------------------------------------------------------------


class Listener:
    """A TCP listener on loopback that counts the connections made to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.parametrize("form", ["url", "path", "both"])
def test_an_image_named_by_a_web_address_is_refused_without_a_connection(app, form):
    _, url, _ = app
    listener = Listener()
    try:
        address = f"http://127.0.0.1:{listener.port}/photo.png"
        image = {"meta": {"_type": "gradio.FileData"}}
        if form in ("url", "both"):
            image["url"] = address
        if form in ("path", "both"):
            image["path"] = address
        for api, data in (("classify", [image, 5, None]),
                          ("explain", [image, "rollout", None, None, "mean", "mean", 0.9, 0.5, ""])):
            event, out = call(url, api, data, attacker(20))
            assert (event, out) == ("error", guard.REMOTE), (api, event, out)
        time.sleep(0.5)
        assert listener.connections == 0
    finally:
        listener.close()
