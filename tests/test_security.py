"""The launched app as an attacker on a public Space meets it: raw HTTP and gradio_client, public and private events.

- No event reads a server file: an image must come from the upload cache.
- A burst of large 16-bit and float images stays within the decode budget, measured as the server's RSS.
- Identical results are never rewritten while someone downloads them.
- The upload cache shrinks after its lifetime; a request's uploads are bounded in total.
- Oversized bodies, session hashes and names are refused at once; echoed text is cut.
- Layers and heads are checked against the model a request names; every wrong type or value gets a sentence.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, launched, make_fruit_checkpoint, make_transformers, rss_mb
from conftest import raw_call as call
from conftest import raw_upload as upload
from vit_demo.registry import Registry
from vit_demo.ui import checks, guard

CHELSEA = str(EXAMPLES / "chelsea.jpg")
NOT_UPLOADED = "Only images uploaded to this app can be used"
TIMEOUT = 60


def join(url: str, fn_index: int, data: list) -> tuple[bool, object]:
    """Any event, public or private, through the queue as the page sends it: (success, output or error)."""
    session = uuid.uuid4().hex[:12]
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    r = httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, (r.status_code, r.text[:200])
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=TIMEOUT) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_completed":
                out = msg.get("output") or {}
                return bool(msg.get("success")), out.get("error") if not msg.get("success") else out.get("data")
    raise AssertionError(f"no answer from fn {fn_index}")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    small = make_fruit_checkpoint(tmp / "small")  # 2 layers, 4 heads
    deep = make_transformers(tmp / "deep", "small", num_hidden_layers=5, num_attention_heads=8, image_size=64, patch_size=16).path
    secret = tmp / "secret.png"  # a readable image outside the upload cache: reading it would succeed
    Image.new("RGB", (64, 64), (10, 200, 30)).save(secret)
    with launched(Registry([str(small), str(deep)], str(small), device="cpu"), tmp) as (demo, url):
        yield demo, url, secret, str(deep)


def photo_events(demo) -> list[tuple[int, list]]:
    """Every event that takes the photo, with the default value of each input and the photo's position."""
    photo = next(b for b in demo.blocks.values() if isinstance(b, guard.PhotoInput))
    events = []
    for i, fn in enumerate(demo.fns.values()):
        ids = [b._id for b in fn.inputs]
        if photo._id in ids:
            events.append((i, ids.index(photo._id), [getattr(b, "value", None) for b in fn.inputs], fn.name))
    return events


def test_every_event_that_takes_the_photo_refuses_server_files(app):
    demo, url, secret, _ = app
    events = photo_events(demo)
    assert len(events) >= 3, "the public endpoints and the private follow-ups should all take the photo"
    for fn_index, at, defaults, name in events:
        for given in ({"path": str(secret)}, {"path": str(secret), "meta": {"_type": "gradio.FileData"}},
                      {"path": f"{demo.GRADIO_CACHE}/../../{secret.name}"}):
            data = list(defaults)
            data[at] = given
            ok, out = join(url, fn_index, data)
            assert not ok and NOT_UPLOADED in str(out), f"{name} answered {str(out)[:200]} for {given}"
    public = {"classify": [5, None], "explain": ["rollout", None, 1, "mean", "mean", 0.9, 0.6, None]}
    for api, rest in public.items():  # the public `call` route too
        event, out = call(url, api, [{"path": str(secret)}, *rest])
        assert event == "error" and NOT_UPLOADED in out, (api, out)


def test_an_uploaded_photo_is_still_answered(app):
    _, url, _, _ = app
    event, out = call(url, "classify", [upload(url, CHELSEA), 3, None])
    assert event == "complete" and len(out[0]["confidences"]) == 3


def test_explain_reaches_the_last_layer_and_head_of_a_deeper_model(app):
    _, url, _, deep = app
    photo = upload(url, CHELSEA)
    event, out = call(url, "explain", [photo, "attention", deep, 5, "8", "mean", 0.9, 0.6, None])
    assert event == "complete", out
    event, out = call(url, "explain", [photo, "attention", deep, 6, "mean", "mean", 0.9, 0.6, None])
    assert event == "error" and "from 1 to 5" in out, out
    event, out = call(url, "explain", [photo, "attention", None, 5, "mean", "mean", 0.9, 0.6, None])  # the default has 2
    assert event == "error" and "from 1 to 2" in out, out


BAD_CLASSIFY = {
    "model as a number": [None, 5, 12],
    "model as a list": [None, 5, ["a"]],
    "model as a dict": [None, 5, {"a": 1}],
    "top_k as text": [None, "abc", None],
    "top_k missing": [None, None, None],
    "top_k out of range": [None, 0, None],
    "image as a plain string": ["/etc/passwd", 5, None],
    "image as a number": [7, 5, None],
    "too few inputs": [None],
}
BAD_EXPLAIN = {
    "method None": [None, None, None, 2, "mean", "mean", 0.9, 0.6, None],
    "unknown method": [None, "nope", None, 2, "mean", "mean", 0.9, 0.6, None],
    "head_fusion None": [None, "rollout", None, 2, "mean", None, 0.9, 0.6, None],
    "layer as text": [None, "attention", None, "x", "mean", "mean", 0.9, 0.6, None],
    "head as a list": [None, "attention", None, 2, [1], "mean", 0.9, 0.6, None],
    "discard ratio infinite": [None, "rollout", None, 2, "mean", "mean", "Infinity", 0.6, None],
    "alpha not a number": [None, "rollout", None, 2, "mean", "mean", 0.9, "NaN", None],
    "layer fractional": [None, "attention", None, 1.5, "mean", "mean", 0.9, 0.6, None],
    "target as a list": [None, "relevance", None, 2, "mean", "mean", 0.9, 0.6, ["apple"]],
    "target unknown": [None, "relevance", None, 2, "mean", "mean", 0.9, 0.6, "tabby cat"],
}


@pytest.mark.parametrize("api,case", [("classify", k) for k in BAD_CLASSIFY] + [("explain", k) for k in BAD_EXPLAIN])
def test_every_wrong_type_or_value_gets_a_sentence(app, api, case):
    _, url, _, _ = app
    data = list((BAD_CLASSIFY if api == "classify" else BAD_EXPLAIN)[case])
    if data[0] is None:
        data[0] = upload(url, CHELSEA)
    event, out = call(url, api, data)
    assert event == "error", out
    assert isinstance(out, str) and len(out) > 20 and out.rstrip().endswith((".", ")")), f"{case}: {out!r}"
    assert len(out) < 400


def test_echoed_names_are_cut_and_log_lines_stay_short(app, caplog, monkeypatch):
    _, url, _, _ = app
    caplog.set_level(logging.INFO, logger="vit_demo")
    name = "x" * 200_000  # under the body limit, far over a name
    event, out = call(url, "classify", [upload(url, CHELSEA), 5, name])
    assert event == "error" and len(out) < 300, out[:300]
    assert caplog.records, "the refusal should be logged"
    assert max(len(r.getMessage()) for r in caplog.records) < 400


def test_a_flood_of_refusals_logs_a_bounded_number_of_lines():
    """Refusals go through the server's one log limit: a few lines a minute of one kind, the rest counted."""
    from vit_demo.ui import fair

    limit = fair.LogLimit(per_kind=5, per_minute=60)
    logger = logging.getLogger("vit_demo.ui")
    handler = logging.Handler(logging.INFO)
    seen = []
    handler.emit = seen.append
    handler.addFilter(limit)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for i in range(1000):
            checks.log_refusal(f"bad request {i}")
        limit._window -= 60  # the next minute
        checks.log_refusal("one more")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in seen[:5]] == [f"refused: bad request {i}" for i in range(5)]
    assert len(seen) == 6
    assert seen[-1].getMessage() == "refused: one more (995 more like this were not logged)"


def test_oversized_bodies_and_session_hashes_are_refused_before_reading(app):
    _, url, _, _ = app
    big = b"{" + b" " * (30 * 1024 * 1024) + b"}"
    r = httpx.post(f"{url}gradio_api/call/classify", content=big, headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 413
    r = httpx.post(f"{url}gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "s" * 10_000_000},
                   timeout=TIMEOUT)
    assert r.status_code == 413  # 10 MB of JSON
    r = httpx.post(f"{url}gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "s" * 5000}, timeout=TIMEOUT)
    assert r.status_code == 400 and "session_hash" in r.text
    r = httpx.get(f"{url}gradio_api/queue/data", params={"session_hash": "s" * 10_000}, timeout=TIMEOUT)
    assert r.status_code == 414


def test_the_uploads_of_one_request_are_bounded_in_total(app):
    demo, url, _, _ = app
    before = sum(f.stat().st_size for f in Path(demo.GRADIO_CACHE).rglob("*") if f.is_file())
    files = [("files", (f"part{i}.png", os.urandom(3 * 1024 * 1024))) for i in range(10)]  # 30 MB, each file under 20 MB
    r = httpx.post(f"{url}gradio_api/upload", files=files, timeout=TIMEOUT)
    assert r.status_code == 413
    after = sum(f.stat().st_size for f in Path(demo.GRADIO_CACHE).rglob("*") if f.is_file())
    assert after - before < 1024 * 1024, f"{after - before} bytes of a refused upload were stored"


def test_identical_explanations_downloaded_concurrently_all_decode(app):
    """Visitors explaining the same photo at once get the same content-addressed file: every download is whole.
    Four at a time, as many heavy requests as one address may have waiting or running."""
    from vit_demo.ui import fair

    _, url, _, _ = app
    photo = upload(url, CHELSEA)
    at_once = dict(fair.Policy.from_env().address_jobs)["heavy"]
    failures = []

    def visitor(_):
        for _ in range(12):
            event, out = call(url, "explain", [photo, "rollout", None, 2, "mean", "mean", 0.9, 0.6, None])
            if event != "complete":
                failures.append(out)
                continue
            data = httpx.get(out[0]["url"], timeout=TIMEOUT).content
            try:
                Image.open(io.BytesIO(data)).load()
            except Exception as e:  # noqa: BLE001 (any decode failure is the failure looked for)
                failures.append(f"{len(data)} bytes: {e}")

    with ThreadPoolExecutor(at_once) as pool:
        list(pool.map(visitor, range(at_once)))
    assert not failures, f"{len(failures)} of {12 * at_once} downloads failed, e.g. {failures[:3]}"


def test_a_result_file_is_never_rewritten_in_place(tmp_path):
    image = Image.new("RGB", (32, 32), (1, 2, 3))
    first = guard.save_once(image, str(tmp_path))
    before = os.stat(first)
    time.sleep(0.05)
    second = guard.save_once(image, str(tmp_path))
    after = os.stat(second)
    assert first == second and before.st_ino == after.st_ino and before.st_size == after.st_size
    assert Image.open(first).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("swept", ["folder", "file"])
def test_a_result_swept_away_while_it_is_saved_is_written_again(tmp_path, monkeypatch, swept):
    """The cache sweep may remove the result's folder after it is made, or the file after it is found."""
    import shutil
    import tempfile

    image = Image.new("RGB", (32, 32), (1, 2, 3))
    if swept == "file":
        guard.save_once(image, str(tmp_path))
    real_mkstemp, real_utime, sweeps = tempfile.mkstemp, os.utime, []

    def mkstemp(dir, prefix):  # the folder goes just before the file is staged in it
        if not sweeps:
            sweeps.append(dir)
            shutil.rmtree(dir)
        return real_mkstemp(dir=dir, prefix=prefix)

    def utime(path):  # the file (and its folder) goes just after it was found
        if not sweeps:
            sweeps.append(path)
            shutil.rmtree(Path(path).parent)
        return real_utime(path)

    if swept == "folder":
        monkeypatch.setattr(guard.tempfile, "mkstemp", mkstemp)
    else:
        monkeypatch.setattr(guard.os, "utime", utime)
    path = guard.save_once(image, str(tmp_path))
    assert sweeps and Image.open(path).getpixel((0, 0)) == (1, 2, 3)


def test_the_cache_shrinks_after_its_lifetime(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_DEMO_CACHE_SECONDS", "2")
    small = make_fruit_checkpoint(tmp_path / "small")
    with launched(Registry([str(small)], str(small), device="cpu"), tmp_path) as (demo, url):
        cache = Path(demo.GRADIO_CACHE)
        kept = {f for f in cache.rglob("*") if f.is_file()}  # the examples, copied at start, stay
        fresh = tmp_path / "fresh.png"  # not an example: its upload is a file of its own
        Image.new("RGB", (40, 30), (90, 20, 200)).save(fresh)
        photo = upload(url, str(fresh))
        assert call(url, "explain", [photo, "rollout", None, 2, "mean", "mean", 0.9, 0.6, None])[0] == "complete"
        orphan = cache / "tmpabandoned"  # what a refused upload leaves behind
        orphan.write_bytes(b"x" * 1000)
        made = {f for f in cache.rglob("*") if f.is_file()} - kept
        assert len(made) >= 3  # the upload, the overlay, the orphan
        deadline = time.monotonic() + 30
        while {f for f in cache.rglob("*") if f.is_file()} - kept and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {f for f in cache.rglob("*") if f.is_file()} - kept
        assert not left, f"still in the cache after its lifetime: {sorted(map(str, left))[:5]}"
        assert all(f.exists() for f in kept), "the examples must stay"


def sixteen_bit_png(path: Path, side: int) -> None:
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // side).astype(np.uint16)
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy(), "I;16").save(path)


def float_tiff(path: Path, side: int) -> None:
    ramp = (np.arange(side) * 16 // side / 15).astype(np.float32)  # 16 bands: long runs, a small file
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy(), "F").save(path, compression="tiff_adobe_deflate")


def test_a_burst_of_large_images_stays_within_the_budget_and_memory_returns(app, tmp_path):
    """16 concurrent 40-megapixel 16-bit PNGs and float TIFFs (small files, large decodes): the server's RSS
    grows by less than the decode budget, and falls back once the burst is over."""
    _, url, _, _ = app
    side = 6300
    sixteen_bit_png(tmp_path / "big16.png", side)
    float_tiff(tmp_path / "bigf.tif", side)
    photos = [upload(url, str(tmp_path / "big16.png")), upload(url, str(tmp_path / "bigf.tif"))]
    call(url, "classify", [photos[0], 5, None])  # warm: first-use allocations are not the burst's
    base, peak, stop = rss_mb(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: call(url, "classify", [photos[i % 2], 5, None]), range(16)))
    finally:
        stop.set()
        sampler.join()
    assert all(event == "complete" for event, _ in results), [o for e, o in results if e != "complete"][:2]
    time.sleep(1)
    after = rss_mb()
    budget_mb = guard.DECODE_BUDGET_BYTES / 2**20
    print(f"\nRSS {base:.0f} MB before, peak {peak[0]:.0f} MB (+{peak[0] - base:.0f}), {after:.0f} MB after; "
          f"budget {budget_mb:.0f} MB, budget peak {guard.BUDGET.peak / 2**20:.0f} MB")
    assert guard.BUDGET.peak <= guard.BUDGET.total
    assert peak[0] - base < budget_mb + 512, "the burst used more memory than the decode budget allows"
    assert after - base < 300, "memory was not returned after the burst"


def _any_event(url: str, demo, fn_index: int, data: list) -> tuple[bool, object]:
    """Calls any event as the page would: queued ones through the queue, the others through run/predict."""
    fn = list(demo.fns.values())[fn_index]
    if fn.queue:
        return join(url, fn_index, data)
    body = {"data": data, "fn_index": fn_index, "session_hash": uuid.uuid4().hex[:12], "event_data": None}
    r = httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=TIMEOUT)
    out = r.json()
    return r.status_code == 200 and "error" not in out, out.get("error", out.get("data"))


def test_every_event_called_on_its_own_with_nothing_answers_in_a_sentence_or_not_at_all(app, caplog):
    """A raw request can call any event, private follow-ups included, with none of the state the page would have
    built first: each either changes nothing or refuses in a sentence, and nothing logs a traceback."""
    demo, url, _, _ = app
    caplog.set_level(logging.INFO)
    silent = []
    for i, fn in enumerate(demo.fns.values()):
        if fn.name == "live" or fn.api_name == "live":
            continue  # a stream: exercised in test_live.py
        for data in ([None] * len(fn.inputs), [99999] * len(fn.inputs)):
            ok, out = _any_event(url, demo, i, data)
            if not ok and not (isinstance(out, str) and len(out) > 20):
                silent.append((fn.api_name or fn.name, data[:1], out))
    assert not silent, f"{len(silent)} events answered with no sentence, e.g. {silent[:3]}"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, f"a traceback was logged: {tracebacks[0].getMessage()}"


def test_an_example_that_does_not_exist_is_refused_in_a_sentence(app):
    demo, url, _, _ = app
    index = next(i for i, fn in enumerate(demo.fns.values()) if any(type(b).__name__ == "Dataset" for b in fn.inputs))
    ok, out = _any_event(url, demo, index, [99999])
    assert not ok and out == "There is no such example: pick one of the examples on the page."


def test_a_huge_number_is_not_echoed_digit_by_digit(app):
    _, url, _, _ = app
    event, out = call(url, "classify", [upload(url, CHELSEA), 1e308, None])
    assert event == "error" and "1e+308" in out and len(out) < 120, out


def test_a_tab_event_with_forged_event_data_is_refused_in_a_sentence(app):
    demo, url, _, _ = app
    index = next(i for i, fn in enumerate(demo.fns.values()) if fn.api_name == "open_tab")
    for event_data in ({"x": 1}, [1, 2], "tab"):
        body = {"data": [], "fn_index": index, "session_hash": uuid.uuid4().hex[:12], "event_data": event_data}
        r = httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=TIMEOUT)
        error = r.json().get("error")
        assert isinstance(error, str) and "use the page" in error, (event_data, r.text[:200])
