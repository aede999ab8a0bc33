"""Fair under a crowd: no client can lock others out of the queue, starve the CPU, exhaust connections, fill the
disk, or flood the log (vit_demo/ui/fair.py and server.py), checked over the launched app.

One app serves the bundled model in this process. It trusts one proxy hop (VIT_DEMO_TRUSTED_HOPS=1), so that each
simulated visitor is its own client by the X-Forwarded-For it sends. Every attack targets 127.0.0.1 and is bounded
in count and time; latencies are compared with an idle measurement taken in the same test, never with absolute
times. The longer runs and the full-size figures are in bench/crowd.py and BENCHMARKS.md ("Under a crowd").
"""

from __future__ import annotations

import gc
import io
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, launched, logged_to, make_fruit_checkpoint, rss_mb, wait_until
from conftest import raw_call as call
from vit_demo.registry import BUNDLED_NAME, Registry
from vit_demo.ui import fair, server

CHELSEA = str(EXAMPLES / "chelsea.jpg")
TIMEOUT = 60
HEAD_SECONDS = 2
BODY_IDLE_SECONDS = 2
CACHE_CAP_MB, SHARE_MB = 100, 60
BUSY = "busy:"


def explain_data(photo: dict, method: str) -> list:
    return [photo, method, None, None, None, "mean", 0.9, 0.5, ""]


def faith_data(photo: dict, method: str = "relevance") -> list:
    return [photo, method, "", None, None, None, "mean", 0.9]


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The bundled model (the default) and a second listed model, for the model-cycling test."""
    fruit = str(make_fruit_checkpoint(tmp_path_factory.mktemp("fruit")))
    return Registry([BUNDLED_NAME, fruit], default=BUNDLED_NAME, device="cpu")


@pytest.fixture(scope="module")
def app(tmp_path_factory, registry):
    """(demo, url, upload cache folder, a log file that every log line of the app reaches)."""
    tmp = tmp_path_factory.mktemp("crowd")
    env = {"VIT_DEMO_TRUSTED_HOPS": "1", "VIT_DEMO_HEAD_SECONDS": str(HEAD_SECONDS),
           "VIT_DEMO_BODY_IDLE_SECONDS": str(BODY_IDLE_SECONDS), "VIT_DEMO_UPLOAD_CACHE_MB": str(CACHE_CAP_MB),
           "VIT_DEMO_CLIENT_UPLOAD_MB": str(SHARE_MB)}
    with logged_to(tmp / "app.log") as log_file, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with launched(registry, tmp) as (demo, url):
            yield demo, url, Path(demo.GRADIO_CACHE), log_file


def visitor(n: int) -> dict:
    return {"X-Forwarded-For": f"10.0.{n // 250}.{n % 250 + 1}"}


def upload(url: str, path_or_bytes, headers: dict | None = None, name: str = "photo.jpg") -> httpx.Response:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return httpx.post(f"{url}gradio_api/upload", files=[("files", (name, data))], headers=headers, timeout=TIMEOUT)


def handle(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}


def classify_times(url: str, photo: dict, n: int, headers: dict, stop: threading.Event | None = None) -> tuple[list, int]:
    """`n` /classify calls (fewer if `stop` is set): (latencies of the answered ones, failures)."""
    times, failed = [], 0
    for _ in range(n):
        if stop is not None and stop.is_set():
            break
        t = time.perf_counter()
        event, out = call(url, "classify", [photo, 5, None], headers)
        if event == "complete":
            times.append(time.perf_counter() - t)
        else:
            failed += 1
            print("classify failed:", event, str(out)[:200])
    return times, failed


def photo_of(url: str, n: int) -> dict:
    r = upload(url, CHELSEA, visitor(n))
    assert r.status_code == 200, r.text
    return handle(r.json()[0])


def fresh_png(seed: int, size: int = 64) -> bytes:
    """A small photo no cache has seen: noise of a seed, as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def hold_maps(demo, monkeypatch) -> tuple[threading.Event, list]:
    """Makes the bundled model's maps wait until the returned event is set; the list counts the maps started."""
    clf = demo.registry.get(BUNDLED_NAME)
    release, started = threading.Event(), []
    maps = clf.maps

    def held(*args, **kwargs):
        started.append(1)
        release.wait(TIMEOUT)
        return maps(*args, **kwargs)

    monkeypatch.setattr(clf, "maps", held)
    return release, started


# --- requests -----------------------------------------------------------------------------------------------------

def test_an_escaped_session_hash_key_is_still_bounded(app):
    """The JSON key written as "session\\u005fhash" is the same key to Gradio: its length is checked too."""
    _, url, _, _ = app
    for key in ("session_hash", "session\\u005fhash", "\\u0073ession_hash"):
        body = '{"data": [], "fn_index": 0, "%s": "%s"}' % (key, "x" * 100_000)
        r = httpx.post(f"{url}gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "session_hash" in r.text, (key, r.status_code, r.text[:200])


def test_an_event_that_does_not_exist_is_refused_in_a_sentence(app):
    _, url, _, _ = app
    for fn_index in (999, -1, 10**6):
        r = httpx.post(f"{url}gradio_api/queue/join", json={"data": [], "fn_index": fn_index, "session_hash": "abc"},
                       headers=visitor(3))
        assert r.status_code == 400 and fair.NO_SUCH_EVENT in r.text, (fn_index, r.status_code, r.text[:200])


# --- the queue ----------------------------------------------------------------------------------------------------

def test_a_heavy_flood_neither_locks_out_nor_slows_classify(app):
    """One client fires 5 heavy requests a second for 15 s and never reads an answer; another client's /classify
    succeeds on at least 95% of tries with p95 within 3x its idle p95 (measured first, in this test). The flood's
    jobs are refused once its share is taken."""
    demo, url, _, _ = app
    queue = demo._queue
    me, attacker = visitor(1), visitor(2)
    photo = photo_of(url, 1)
    target = photo_of(url, 2)
    classify_times(url, photo, 3, me)  # warm
    idle, failed = classify_times(url, photo, 20, me)
    assert failed == 0
    stop, sent, heavy_seen = threading.Event(), [], []

    def flood():
        t0 = time.monotonic()
        while not stop.is_set() and time.monotonic() - t0 < 15:
            sent.append(call(url, "faithfulness", faith_data(target), attacker, listen=False)[0])
            heavy_seen.append(len(queue.event_queue_per_concurrency_id.get("heavy").queue)
                              if "heavy" in queue.event_queue_per_concurrency_id else 0)
            stop.wait(0.2)

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        wait_until(lambda: len(sent) >= 10, TIMEOUT)
        loaded, failed = classify_times(url, photo, 40, me)
    finally:
        stop.set()
        thread.join(TIMEOUT)
    tries = len(loaded) + failed
    print(f"\nidle p95 {p95(idle) * 1000:.0f} ms; under the flood p95 {p95(loaded) * 1000:.0f} ms, "
          f"{len(loaded)}/{tries} answered; {len(sent)} heavy requests sent, most waiting {max(heavy_seen)}")
    assert len(loaded) >= 0.95 * tries
    assert p95(loaded) <= 3 * p95(idle) + 0.3, (p95(loaded), p95(idle))  # + 0.3 s: the machine is shared
    assert max(heavy_seen) <= queue.policy.heavy_wait


def test_a_job_whose_caller_never_listened_is_dropped_not_run(app, monkeypatch):
    """Jobs sent without listening for their answers (a client that fires and leaves) wait while the lane is
    busy; once they have waited `gone_after_s` with nobody listening they are dropped, and never run."""
    demo, url, _, _ = app
    queue = demo._queue
    release, started = hold_maps(demo, monkeypatch)
    monkeypatch.setattr(queue, "policy", fair.Policy(heavy_limit=1, heavy_wait=4, gone_after_s=1.0))
    photo = photo_of(url, 4)
    dropped_before = queue.dropped
    with ThreadPoolExecutor(1) as pool:
        listened = pool.submit(call, url, "explain", explain_data(photo, "attention"), visitor(30))
        try:
            wait_until(lambda: started, TIMEOUT)
            fired = [call(url, "explain", explain_data(photo, "attention"), visitor(31), listen=False) for _ in range(2)]
            assert [e for e, _ in fired] == ["sent", "sent"], fired
            wait_until(lambda: queue.dropped - dropped_before >= 2, 10 * queue.policy.gone_after_s + 10)
        finally:
            release.set()
        assert listened.result(TIMEOUT)[0] == "complete"
    assert len(started) == 1, f"{len(started) - 1} jobs nobody listened for were run"
    assert not queue.event_queue_per_concurrency_id["heavy"].queue


def test_heavy_requests_past_the_lane_are_refused_with_a_sentence(app, monkeypatch):
    """While the heavy lane is full, a further heavy request is answered at once with "busy: N requests ahead,
    try again in about T s", and a client past its share is told so; /classify still answers meanwhile."""
    demo, url, _, _ = app
    queue = demo._queue
    release, started = hold_maps(demo, monkeypatch)
    monkeypatch.setattr(queue, "policy", fair.Policy(heavy_limit=1, heavy_wait=2))
    photo = photo_of(url, 3)
    pool = ThreadPoolExecutor(8)
    try:
        jobs = [pool.submit(call, url, "explain", explain_data(photo, "attention"), visitor(10 + i)) for i in range(3)]
        wait_until(lambda: started and len(queue.event_queue_per_concurrency_id["heavy"].queue) >= 2, TIMEOUT)
        t = time.perf_counter()
        event, message = call(url, "explain", explain_data(photo, "attention"), visitor(20))
        refused_in = time.perf_counter() - t
        print(f"\nrefused in {refused_in * 1000:.0f} ms: {message}")
        assert event == "error" and message.startswith(BUSY) and "requests ahead, try again in about" in message
        own = call(url, "classify", [photo, 5, None], visitor(21))
        assert own[0] == "complete", own
        # The refused client retries at once: held until the time it was told, then looked at again.
        held = queue.retry_hold.held
        again = call(url, "explain", explain_data(photo, "attention"), visitor(20))
        assert again[0] == "error" and again[1].startswith(BUSY), again
        assert queue.retry_hold.held == held + 1
        # Its cheap requests are never held.
        assert call(url, "classify", [photo, 5, None], visitor(20))[0] == "complete"
        assert queue.retry_hold.held == held + 1
    finally:
        release.set()
        results = [j.result(TIMEOUT) for j in jobs]
        pool.shutdown()
    assert [e for e, _ in results] == ["complete"] * 3, results


def test_a_flood_of_new_sessions_never_takes_the_queue_of_a_waiting_job(app, monkeypatch):
    """Gradio keeps the messages of a bounded number of sessions, and every call without a session makes one.
    A flood of such calls once pushed out the store of a session whose job was waiting, and the queue's loop
    then stopped for everyone ("Queue is stopped."). Here with a store of 30 sessions and 120 calls: the
    waiting job is answered, the flood is answered, and the queue still serves."""
    demo, url, _, _ = app
    queue = demo._queue
    release, started = hold_maps(demo, monkeypatch)
    monkeypatch.setattr(queue.pending_messages_per_session, "max_size", 30)
    photo = photo_of(url, 5)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(call, url, "explain", explain_data(photo, "attention"), visitor(50))
        wait_until(lambda: started, TIMEOUT)
        waiting = pool.submit(call, url, "explain", explain_data(photo, "rollout"), visitor(51))
        wait_until(lambda: len(queue.event_queue_per_concurrency_id["heavy"].queue) >= 1, TIMEOUT)
        flood = list(pool.map(lambda n: call(url, "classify", [photo, 5, None], visitor(60 + n % 20))[0], range(120)))
        release.set()
        results = [first.result(TIMEOUT)[0], waiting.result(TIMEOUT)[0]]
    assert results == ["complete", "complete"], results
    assert flood.count("complete") == 120, flood
    assert len(queue.pending_messages_per_session) <= 30
    assert call(url, "classify", [photo, 5, None], visitor(52))[0] == "complete"


def test_the_state_of_at_most_the_policys_sessions_is_kept(app):
    """Each session's gr.State values take memory (~0.25 MB here): Gradio keeps 10,000 sessions by default; the
    page keeps the policy's number, the oldest going first."""
    demo, _, _, _ = app
    assert demo.state_session_capacity == fair.Policy.from_env().sessions == 2000
    assert demo.state_holder.capacity == 2000


def test_a_new_session_copies_no_component_configs_and_deep_links_still_have_all(app, monkeypatch):
    """Every call without a session makes a new one. Gradio copied the config of each of the page's components
    into it, on the event loop (6.5 ms here, while no other request moved); the page's session state makes each
    copy when it is first used. A /classify call copies only what it updates; all of them together (what the
    deep-link route would read) are the same configs as Gradio's own session state would give."""
    import base64
    import functools
    import json

    from gradio.blocks import BlocksConfig
    from gradio.state_holder import SessionState

    demo, url, _, _ = app
    assert isinstance(demo.state_holder, fair.SessionStates)
    made = []
    original = BlocksConfig.config_for_block
    monkeypatch.setattr(BlocksConfig, "config_for_block", staticmethod(lambda *a, **k: made.append(a[0]) or original(*a, **k)))
    for n in range(50):
        demo.state_holder[f"fresh-{n}"]
    assert made == []
    photo = photo_of(url, 7)
    before = set(demo.state_holder.session_data)
    assert call(url, "classify", [photo, 3, None], visitor(7))[0] == "complete"
    (session,) = set(demo.state_holder.session_data) - before
    assert len(made) <= 8, made  # at most the call's inputs and outputs
    state = demo.state_holder[session]
    inline = {"url": "data:image/jpeg;base64," + base64.b64encode(Path(CHELSEA).read_bytes()).decode(),
              "meta": {"_type": "gradio.FileData"}}
    before = set(demo.state_holder.session_data)
    assert call(url, "classify", [inline, 3, None], visitor(7))[0] == "complete"
    (inline_session,) = set(demo.state_holder.session_data) - before
    kept = json.dumps(dict(demo.state_holder[inline_session].config_values), default=repr)
    assert "data:image" not in kept, "the session kept a copy of the inline image"
    ours = list(state.components)
    made.clear()
    reference = SessionState(demo)
    for key, value in state.config_values.items():  # what the call changed, as Gradio records it
        if key in reference.config_values:
            reference.config_values[key] = value
    dump = functools.partial(json.dumps, sort_keys=True, default=repr)
    assert len(ours) == len(demo.blocks) and sorted(map(dump, ours)) == sorted(map(dump, reference.components))


def test_gradios_monitoring_statistics_are_rebuilt_at_most_every_ten_seconds(app, monkeypatch):
    """Gradio rebuilt its per-function statistics (a pandas table of up to 10,000 events) after every event: a
    quarter of the server's time under a crowd. The queue rebuilds them at most every ANALYTICS_EVERY_S."""
    demo, url, _, _ = app
    queue = demo._queue
    built = []
    original = queue._get_df
    monkeypatch.setattr(queue, "_get_df", lambda records: built.append(len(records)) or original(records))
    monkeypatch.setattr(queue, "_analytics_at", float("-inf"))
    photo = photo_of(url, 9)
    for _ in range(5):
        assert call(url, "classify", [photo, 3, None], visitor(9))[0] == "complete"
    wait_until(lambda: built, TIMEOUT)
    assert len(built) == 1, built
    assert queue.cached_event_analytics_summary["functions"], "the statistics are still there"


def test_the_deep_link_route_is_closed(app):
    """Gradio's deep-link route writes a copy of a session's page to the upload folder on every call, for any
    session: the page offers no deep links, so the route answers 404 in a sentence and writes nothing."""
    demo, url, cache, _ = app
    photo = photo_of(url, 8)
    before = set(demo.state_holder.session_data)
    assert call(url, "classify", [photo, 3, None], visitor(8))[0] == "complete"
    (session,) = set(demo.state_holder.session_data) - before
    for params in ({"session_hash": session}, {}):
        r = httpx.get(f"{url}gradio_api/deep_link", params=params, headers=visitor(8))
        assert r.status_code == 404 and "no deep links" in r.text, (r.status_code, r.text)
    assert not (cache / "deep_links").exists()


def test_a_session_store_forgets_idle_sessions_first():
    pending = {"tab": {"event-1"}}
    store = fair.SessionQueues(3, pending)
    store["tab"] = "its messages"
    for n in range(10):
        store[f"throwaway-{n}"] = n
    assert "tab" in store and len(store) == 3
    pending["tab"] = set()  # its job is done: now it may go
    store["one-more"] = 0
    assert "tab" not in store and len(store) == 3


def test_one_client_is_bounded_across_its_sessions(app):
    """A client (an address) holds at most its share of a lane, however many sessions it opens; the next gets a
    sentence. Checked on the policy itself with a queue full of one address's jobs."""
    demo, _, _, _ = app
    queue = demo._queue
    fn = next(f for f in demo.fns.values() if f.api_name == "explain")

    class Fake:
        def __init__(self, session, address):
            self.session_hash, self.fn, self.streaming = session, fn, False
            self.request = type("R", (), {"scope": {"client": (address, 1), "headers": []}})()

    heavy = queue.event_queue_per_concurrency_id.setdefault("heavy", type(queue.event_queue_per_concurrency_id.get(
        "cheap"))("heavy", 1))
    saved = list(heavy.queue)
    try:
        heavy.queue[:] = [Fake(f"s{i}", "10.9.9.9") for i in range(8)]
        why = queue.refusal(fn, fair.Client("new-session", "10.9.9.9"))
        assert why and "requests of this kind waiting or running" in why, why
        assert queue.refusal(fn, fair.Client("other", "10.9.9.8")) is None
        heavy.queue[:] = [Fake("same", f"10.9.9.{i}") for i in range(3)]
        assert "waiting or running" in (queue.refusal(fn, fair.Client("same", "10.9.9.100")) or "")
    finally:
        heavy.queue[:] = saved


def test_eight_explain_clients_do_not_starve_classify(app):
    """8 clients loop /explain relevance on fresh uploads for 15 s; /classify p95 stays within 3x idle."""
    _, url, _, _ = app
    me = visitor(30)
    photo = photo_of(url, 30)
    classify_times(url, photo, 3, me)
    idle, _ = classify_times(url, photo, 20, me)
    stop, answered, busy = threading.Event(), [0], [0]

    def explainer(n: int):
        for i in range(200):
            if stop.is_set():
                return
            r = upload(url, fresh_png(1000 * n + i), visitor(40 + n), name="fresh.png")
            if r.status_code != 200:
                continue
            event, out = call(url, "explain", explain_data(handle(r.json()[0]), "relevance"), visitor(40 + n))
            answered[0] += event == "complete"
            busy[0] += event == "error" and str(out).startswith(BUSY)

    threads = [threading.Thread(target=explainer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)  # let the explainers fill the heavy lane
        loaded, failed = classify_times(url, photo, 40, me)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    print(f"\nidle p95 {p95(idle) * 1000:.0f} ms, with 8 explainers {p95(loaded) * 1000:.0f} ms; "
          f"{answered[0]} maps drawn, {busy[0]} busy")
    assert failed == 0 and answered[0] > 0
    assert p95(loaded) <= 3 * p95(idle) + 0.3, (p95(loaded), p95(idle))


def test_model_switches_count_against_a_clients_share():
    """Loads of a model not in memory count per client: past the share a switch is refused with a sentence,
    while another client and loaded models are not affected."""
    switches, me, other = fair.Switches(), fair.Client("s1", "10.1.1.1"), fair.Client("s2", "10.1.1.2")
    for _ in range(4):
        switches.check(False, 4, me)
    switches.check(True, 4, me)  # already loaded: not a switch
    with pytest.raises(Exception) as info:
        switches.check(False, 4, fair.Client("s3", "10.1.1.1"))  # a new session from the same address
    assert "switched models 4 times in the last minute" in str(info.value)
    switches.check(False, 4, other)


def large_frame(width: int = 2300, height: int = 1700) -> str:
    """A webcam-style frame as a data: URL, just under the 4-megapixel frame limit: the photo, enlarged, as JPEG."""
    import base64

    buf = io.BytesIO()
    Image.open(CHELSEA).convert("RGB").resize((width, height), Image.BICUBIC).save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def raw_stream(url: str, frame: str, n: int, stop: threading.Event, counts: dict, lock: threading.Lock) -> None:
    """One live stream driven without the page, as an attacker would: joins the private `live` event, then posts
    the next frame as soon as each answer comes, until `stop` (or the stream ends); counts what it gets."""
    import json

    headers, session = visitor(300 + n), f"raw-stream-{n}"
    config = httpx.get(f"{url}config", headers=headers).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "live")
    body = {"data": [{"url": frame}, None, False, None], "fn_index": fn_index, "session_hash": session}
    with httpx.Client(timeout=TIMEOUT, headers=headers) as http:
        joined = http.post(f"{url}gradio_api/queue/join", json=body)
        if joined.status_code != 200:
            with lock:
                counts["refused at join"] += 1
            return
        event_id = joined.json()["event_id"]
        with http.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                kind = message.get("msg")
                if kind == "process_streaming":
                    with lock:
                        counts["frames answered"] += 1
                    if stop.is_set():
                        break
                    http.post(f"{url}gradio_api/stream/{event_id}", json=body)
                elif kind == "process_completed":
                    with lock:
                        counts["ended" if message.get("success") else "refused"] += 1
                    return
        http.post(f"{url}gradio_api/stream/{event_id}/close")


def count_streams(demo, stop: threading.Event, running: list) -> None:
    """Every 0.1 s until `stop`: how many live streams the server is running."""
    while not stop.is_set():
        running.append(sum(event.streaming for job in demo._queue.active_jobs for event in (job or ())))
        time.sleep(0.1)


def test_sixteen_raw_live_streams_of_large_frames_leave_classify_served(app):
    """16 clients drive the live stream without the page, each posting a 3.9-megapixel frame as soon as the last
    is answered, for 15 s: at most the policy's streams run at once (the rest wait or are refused), and a
    visitor's /classify is answered every time, with p95 within 3x idle."""
    demo, url, _, _ = app
    me = visitor(31)
    photo = photo_of(url, 31)
    classify_times(url, photo, 3, me)
    idle, _ = classify_times(url, photo, 20, me)
    frame = large_frame()
    stop, lock = threading.Event(), threading.Lock()
    counts = {"frames answered": 0, "refused at join": 0, "refused": 0, "ended": 0}
    running, threads = [], [threading.Thread(target=raw_stream, args=(url, frame, n, stop, counts, lock))
                            for n in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)  # the streams have joined and the first frames are being answered
        watch = threading.Thread(target=count_streams, args=(demo, stop, running))
        watch.start()
        loaded, failed = classify_times(url, photo, 40, me)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
        watch.join(TIMEOUT)
    print(f"\nframe {len(frame) // 1024} kB as a data URL; idle p95 {p95(idle) * 1000:.0f} ms, with 16 raw streams "
          f"{p95(loaded) * 1000:.0f} ms; {counts}; streams running at once: at most {max(running)}")
    assert counts["frames answered"] > 0, counts
    assert max(running) <= demo._queue.policy.streams, running
    assert failed == 0
    assert p95(loaded) <= 3 * p95(idle) + 0.3, (p95(loaded), p95(idle))


LOOPERS = """
import json, os, sys, threading
sys.path.insert(0, sys.argv[1])
from conftest import raw_call
url, photo, models = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
os.nice(10)
stop, lock, outcomes = threading.Event(), threading.Lock(), []

def loop(k):
    i = k
    while not stop.is_set():
        event, out = raw_call(url, "classify", [photo, 5, models[i % len(models)]], {"X-Forwarded-For": f"10.0.1.{k + 1}"})
        with lock:
            outcomes.append((event, str(out)[:200]))
        i += 1

threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
for t in threads:
    t.start()
print("running", flush=True)
sys.stdin.readline()
stop.set()
for t in threads:
    t.join()
print(json.dumps(outcomes), flush=True)
"""


def four_clients(url: str, photo: dict, models: list[str], me: dict) -> tuple[list, int, list]:
    """4 clients loop /classify, each going through `models` in turn, while `me` classifies 40 times:
    (my latencies, my failures, the 4 clients' outcomes). The 4 run in a process of their own at a lower CPU
    priority (nice 10), as their own work would be done on their machines (bench/crowd.py does the same)."""
    import json
    import subprocess
    import sys

    loopers = subprocess.Popen([sys.executable, "-c", LOOPERS, str(Path(__file__).parent), url, json.dumps(photo),
                                json.dumps(models)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert loopers.stdout.readline().strip() == "running"
        time.sleep(1)
        mine, failed = classify_times(url, photo, 40, me)
        loopers.stdin.write("stop\n")
        loopers.stdin.flush()
        outcomes = json.loads(loopers.stdout.readline())
    finally:
        loopers.kill()
        loopers.wait()
    return mine, failed, [tuple(o) for o in outcomes]


def test_four_clients_cycling_models_neither_evict_nor_starve_a_visitor(app, registry):
    """4 clients switch between the two listed models on every /classify, while a visitor classifies with the
    default: no model is loaded or evicted meanwhile (both fit; switching between loaded models is not a load),
    every request is answered or refused in a sentence, and the visitor's p95 stays within 3x idle, and within
    2x of what the same 4 clients cost it when they all use one model: a switch adds little to their load."""
    _, url, _, _ = app
    names = list(registry.choices)
    for name in names:
        registry.get(name)
    loaded = sorted(registry.loaded())
    me = visitor(32)
    photo = photo_of(url, 32)
    classify_times(url, photo, 3, me)
    idle, _ = classify_times(url, photo, 20, me)
    one_model, failed_one, _ = four_clients(url, photo, names[:1], me)
    cycling, failed, outcomes = four_clients(url, photo, names, me)
    answered = sum(e == "complete" for e, _ in outcomes)
    print(f"\nidle p95 {p95(idle) * 1000:.0f} ms, with 4 clients on one model {p95(one_model) * 1000:.0f} ms, "
          f"cycling {p95(cycling) * 1000:.0f} ms; {answered} of {len(outcomes)} cycling requests answered")
    assert sorted(registry.loaded()) == loaded
    assert failed == failed_one == 0 and answered > 0
    assert all(e == "complete" or (e == "error" and "switched models" in m) for e, m in outcomes), outcomes[:5]
    assert p95(cycling) <= 2 * p95(one_model) + 0.1, (p95(cycling), p95(one_model))
    assert p95(cycling) <= 3 * p95(idle), (p95(cycling), p95(idle))


# --- connections --------------------------------------------------------------------------------------------------

def open_half(port: int, n: int, head: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(head)
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def log_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def test_half_open_connections_do_not_lock_out_a_visitor(app):
    """5,000 connections that never finish their request head (or as many as this process's open-file limit
    leaves room for, said below) are held open; a visitor's /classify is still answered, the server closes the
    slow ones itself, and the log grows by at most 100 lines."""
    demo, url, _, log_file = app
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    soft, hard = fair.raise_open_files()
    n = min(5000, (soft - 512) // 2)  # both ends of each connection are in this process
    print(f"\nopen-file limit {soft} (hard {hard}): {n} half-open connections")
    lines_before = log_lines(log_file)
    photo = photo_of(url, 50)
    socks = open_half(port, n, b"GET /gradio_api/info HTTP/1.1\r\nHost: x\r\n")
    try:
        t = time.perf_counter()
        event, out = call(url, "classify", [photo, 5, None], visitor(50))
        print(f"classify answered in {time.perf_counter() - t:.2f} s with {len(socks)} half-open connections; "
              f"server: {len(demo.connections.open)} open, {demo.connections.closed_slow} closed as slow")
        assert event == "complete", (event, out)
        # Within the head time limit (and a tick), the server has closed every one of them.
        deadline = time.monotonic() + HEAD_SECONDS + 10
        for s in socks:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                assert s.recv(1024) in (b"",) or True
            except (socket.timeout, OSError):
                pass
        wait_until(lambda: len(demo.connections.open) < 50, HEAD_SECONDS + 10)
    finally:
        for s in socks:
            s.close()
    grown = log_lines(log_file) - lines_before
    print(f"log grew by {grown} lines")
    assert grown <= 100


def test_stalled_and_cut_uploads_leave_no_partial_body(app):
    """200 uploads that send half their body, then stall (closed by the server after its time limit) or hang up:
    nothing of them is left in the upload cache."""
    demo, url, cache, _ = app
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    before = {p for p in cache.rglob("*") if p.is_file()}
    body = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n\r\n" + fresh_png(7) * 50
    head = (b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(body) + 200))
    socks = open_half(port, 200, head + body[: len(body) // 2])
    for s in socks[:100]:
        s.close()  # hang up mid-body
    stalled = socks[100:]
    closed = 0
    for s in stalled:  # the server closes a body that makes no progress
        s.settimeout(BODY_IDLE_SECONDS + 10)
        try:
            closed += s.recv(1024) == b""
        except (socket.timeout, OSError):
            pass
        s.close()
    gc.collect()
    after = {p for p in cache.rglob("*") if p.is_file()}
    print(f"\n{closed}/{len(stalled)} stalled uploads closed by the server; {len(after - before)} new files")
    assert closed == len(stalled)
    assert after - before == set()


def test_heartbeat_connections_are_bounded(app):
    """One page's heartbeat at a time per session, and at most 64 per address: the excess gets 429 at once."""
    _, url, _, _ = app
    port = int(url.rstrip("/").rsplit(":", 1)[1])

    def heartbeat(session: str, address: str) -> tuple[socket.socket, bytes]:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(f"GET /gradio_api/heartbeat/{session} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {address}\r\n\r\n"
                  .encode())
        return s, s.recv(200)

    held = [heartbeat(f"hb{i}", "10.7.7.7") for i in range(64)]
    try:
        assert all(status.startswith(b"HTTP/1.1 200") for _, status in held)
        s, status = heartbeat("hb-extra", "10.7.7.7")
        s.close()
        assert status.startswith(b"HTTP/1.1 429"), status
        s, status = heartbeat("hb0", "10.7.7.8")
        s.close()
        assert status.startswith(b"HTTP/1.1 429"), status  # the same session twice
        s, status = heartbeat("hb-other", "10.7.7.8")
        s.close()
        assert status.startswith(b"HTTP/1.1 200"), status
    finally:
        for s, _ in held:
            s.close()


# --- disk ---------------------------------------------------------------------------------------------------------

def big_png(seed: int, megabytes: float = 19) -> bytes:
    """A PNG of about `megabytes` MB that no other upload shares (noise, then a few distinct bytes)."""
    side = int((megabytes * 1024 * 1024 / 3) ** 0.5)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
        buf, "PNG", compress_level=0)
    return buf.getvalue() + seed.to_bytes(8, "little")


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def test_the_upload_cache_stays_under_its_cap_and_others_can_upload(app, monkeypatch):
    """One client uploads distinct 19 MB photos for 30 s (at most 40): the cache stays under its cap, the
    client's oldest files go first, uploads past its share get 429 with a sentence, and another client can still
    upload a photo. A 19 MB blob that is not an image is refused at the door (415) and not kept."""
    _, url, cache, _ = app
    start = cache_bytes(cache)
    blob = os.urandom(19 * 1024 * 1024)
    r = upload(url, blob, visitor(60), name="blob.jpg")
    assert r.status_code == 415 and "not an image" in r.text, (r.status_code, r.text)
    assert cache_bytes(cache) - start < 1024 * 1024

    monkeypatch.setattr(server, "UPLOAD_KEEP_SECONDS", 0.0)  # let the client's own files go at once
    template = big_png(0)
    statuses, first_path, t0 = [], None, time.monotonic()
    for i in range(40):
        if time.monotonic() - t0 > 30:
            break
        r = upload(url, template[:-8] + i.to_bytes(8, "little"), visitor(61), name="big.png")
        statuses.append(r.status_code)
        if r.status_code == 200 and first_path is None:
            first_path = r.json()[0]
        assert cache_bytes(cache) - start <= CACHE_CAP_MB * 1024 * 1024
    print(f"\n{len(statuses)} uploads: {statuses.count(200)} kept; cache +{(cache_bytes(cache) - start) / 2**20:.0f} MB")
    assert statuses.count(200) >= 3
    assert first_path is not None and not os.path.exists(first_path), "the client's oldest file goes first"
    assert cache_bytes(cache) - start <= SHARE_MB * 1024 * 1024

    monkeypatch.setattr(server, "UPLOAD_KEEP_SECONDS", 3600.0)  # now every file is too new to go
    r = upload(url, template[:-8] + b"x" * 8, visitor(61), name="big.png")
    assert r.status_code == 429 and "share per visitor" in r.text, (r.status_code, r.text)
    r = upload(url, CHELSEA, visitor(62))
    assert r.status_code == 200, r.text


def test_inline_images_count_against_the_clients_share_of_the_cache(app, monkeypatch):
    """An image sent inline as a data: URL is saved into the upload cache as well: it counts against the client's
    share and the cache's total as an upload does (it was not counted: 3,000 calls wrote 2 GB past the caps).
    With every file too new to go, a client sending distinct 0.7 MB inline PNGs (a request body may hold 1 MB) is
    refused in a sentence once past its share (60 MB here), and the cache grows by at most that share."""
    import base64

    _, url, cache, _ = app
    monkeypatch.setattr(server, "UPLOAD_KEEP_SECONDS", 3600.0)
    start = cache_bytes(cache)
    template = big_png(0, 0.7)
    outcomes = []
    for i in range(130):
        body = base64.b64encode(template[:-8] + i.to_bytes(8, "little")).decode()
        image = {"url": f"data:image/png;base64,{body}", "meta": {"_type": "gradio.FileData"}}
        event, out = call(url, "classify", [image, 3, None], visitor(70))
        outcomes.append((event, str(out)[:160]))
        if sum(e != "complete" for e, _ in outcomes) >= 3:
            break
    grown = cache_bytes(cache) - start
    print(f"\n{len(outcomes)} inline 0.7 MB images: {sum(e == 'complete' for e, _ in outcomes)} answered, "
          f"cache +{grown / 2**20:.0f} MB")
    refused = [m for e, m in outcomes if e != "complete"]
    assert refused, outcomes
    assert all("share per visitor" in m or "space for uploads is full" in m for m in refused), refused
    assert grown <= SHARE_MB * 1024 * 1024, grown


def test_upload_ids_are_bounded_and_freed(app, monkeypatch):
    """Long upload ids are refused; 3,000 uploads with unique ids leave no progress state behind once their
    time is up, and the server's memory flat."""
    _, url, _, _ = app
    from gradio.routes import file_upload_statuses as statuses

    r = httpx.post(f"{url}gradio_api/upload?upload_id={'a' * 4000}", files=[("files", ("p.png", fresh_png(1)))])
    assert r.status_code in (400, 414), r.status_code
    monkeypatch.setattr(server, "UPLOAD_ID_SECONDS", 0.5)
    data = fresh_png(2)
    before_ids = len(statuses._statuses) + len(statuses._signals)
    gc.collect()
    rss = rss_mb()

    def send(i):
        with httpx.Client(timeout=TIMEOUT) as http:
            for j in range(i, 3000, 8):
                http.post(f"{url}gradio_api/upload?upload_id=id{j:05d}{'x' * 50}", files=[("files", ("p.png", data))])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(8)))
    wait_until(lambda: len(statuses._statuses) + len(statuses._signals) <= before_ids, 10)
    gc.collect()
    grown = rss_mb() - rss
    print(f"\nRSS after 3,000 unique upload ids: {grown:+.1f} MB")
    assert grown < 15


# --- the log ------------------------------------------------------------------------------------------------------

def test_escaping_exceptions_log_a_bounded_number_of_lines(app, monkeypatch, capfd):
    """A model whose forward raises, 300 times: each caller gets one sentence, the log (and stderr) grows by at
    most 100 lines, and the traceback is written once."""
    demo, url, _, log_file = app
    clf = demo.registry.get(BUNDLED_NAME)

    def broken(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(clf, "predict", broken)
    photo = photo_of(url, 70)
    before = log_lines(log_file)
    capfd.readouterr()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: call(url, "classify", [photo, 5, None], visitor(71 + i % 4)), range(300)))
    assert all(e == "error" and "Something went wrong on the server (RuntimeError)" in str(m) for e, m in results), \
        results[:3]
    text = log_file.read_text().splitlines()[before:]
    err = capfd.readouterr().err
    print(f"\nlog grew by {len(text)} lines, stderr by {err.count(chr(10))} lines")
    assert len(text) <= 100
    assert sum("Traceback (most recent call last)" in line for line in text) <= 1
    assert err.count("\n") <= 100


def test_the_log_limit_counts_what_it_drops(caplog):
    limit = fair.LogLimit(per_kind=5, per_minute=60)
    logger = logging.getLogger("crowd-test")
    handler = logging.Handler()
    seen = []
    handler.emit = seen.append
    handler.addFilter(limit)
    logger.addHandler(handler)
    try:
        for i in range(1000):
            logger.error("the same kind %d", i)
        for i in range(3):
            try:
                raise ValueError(i)
            except ValueError:
                logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 5 + 3
    assert sum(r.exc_info is not None for r in seen) == 1


# --- a crowd ------------------------------------------------------------------------------------------------------

def test_a_crowd_of_32_visitors(app):
    """32 visitors at once, as a share link shown at a talk gets: each uploads a photo, classifies it, draws a map
    and scores it. Every /classify is answered; a heavy request is answered or gets the "busy" sentence."""
    _, url, _, _ = app
    outcomes: dict[str, list] = {"classify": [], "explain": [], "faithfulness": []}
    lock = threading.Lock()

    def visit(n: int):
        headers = visitor(100 + n)
        r = upload(url, fresh_png(5000 + n, 96), headers, name="photo.png")
        assert r.status_code == 200, r.text
        photo = handle(r.json()[0])
        steps = (("classify", [photo, 5, None]), ("explain", explain_data(photo, "relevance")),
                 ("faithfulness", faith_data(photo)))
        for api, data in steps:
            event, out = call(url, api, data, headers)
            with lock:
                outcomes[api].append((event, str(out)[:200]))

    t = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(visit, range(32)))
    took = time.perf_counter() - t
    summary = {api: sum(e == "complete" for e, _ in v) for api, v in outcomes.items()}
    busy = {api: sum(e == "error" and m.startswith(BUSY) for e, m in v) for api, v in outcomes.items()}
    print(f"\n32 visitors in {took:.1f} s: answered {summary}, busy {busy}")
    assert summary["classify"] == 32, outcomes["classify"]
    for api in ("explain", "faithfulness"):
        others = [(e, m) for e, m in outcomes[api] if not (e == "complete" or (e == "error" and m.startswith(BUSY)))]
        assert not others, others


def test_a_heavy_job_runs_with_its_share_of_the_cpu_threads_and_others_keep_theirs(monkeypatch):
    """Inside `heavy_cpu` the calling thread has the heavy lane's share of torch threads (half the cores over the
    heavy jobs allowed at once); another thread keeps its own count meanwhile, and the count comes back after."""
    import torch

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("VIT_DEMO_HEAVY_LIMIT", "2")
    assert fair.heavy_threads() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("VIT_DEMO_HEAVY_LIMIT", "1")
    assert fair.heavy_threads() == 1
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def heavy():
        torch.set_num_threads(2)
        with fair.heavy_cpu(torch.device("cpu")):
            seen["inside"] = torch.get_num_threads()
            inside.set()
            release.wait(10)
        seen["after"] = torch.get_num_threads()

    before = torch.get_num_threads()
    thread = threading.Thread(target=heavy)
    thread.start()
    inside.wait(10)
    seen["other thread meanwhile"] = torch.get_num_threads()
    release.set()
    thread.join(10)
    assert seen == {"inside": 1, "other thread meanwhile": before, "after": 2}


def test_a_client_told_busy_that_retries_at_once_waits_out_the_time_it_was_told():
    """RetryHold: after "busy ... try again in about T s", that client's next heavy request waits until T has
    passed (at most RETRY_HOLD_S), whichever of its session or address it comes from; another client does not
    wait; what it keeps is bounded."""
    import asyncio

    hold = fair.RetryHold(limit=100)
    me, other = fair.Client("s1", "10.9.0.1"), fair.Client("s2", "10.9.0.2")
    hold.told(me, 0.6)

    async def timed(client):
        t = time.monotonic()
        await hold.wait(client)
        return time.monotonic() - t

    assert asyncio.run(timed(other)) < 0.3 and hold.held == 0
    assert asyncio.run(timed(fair.Client("s3", "10.9.0.1"))) >= 0.5 and hold.held == 1  # a new session, same address
    assert asyncio.run(timed(me)) < 0.3  # the time has passed

    async def two_at_once(client):  # the second request while the first is held is not held
        return await asyncio.gather(timed(client), timed(client))

    hold.told(me, 0.6)
    assert sorted(asyncio.run(two_at_once(me)))[0] < 0.3 and hold.held == 2
    hold.told(me, 3600)
    assert max(hold._until.values()) - time.monotonic() <= fair.RETRY_HOLD_S
    for n in range(300):  # holds still running, from more clients than it keeps
        hold.told(fair.Client("", f"10.8.{n // 250}.{n % 250}"), 1)
    assert len(hold._until) <= 100


def test_a_heavy_job_pauses_at_its_blocks_while_cheap_work_runs():
    """While cheap work runs, a heavy job pauses on entering `heavy_cpu`, at the end of each block of its forward
    pass and where its backward pass reaches each block: 1 + 2 x depth pauses, each at most PAUSE_S. Without
    cheap work it never pauses; a shared pass (the Batcher's, other callers wait on it) never pauses; a thread
    that is not a heavy job's never pauses."""
    import torch

    from vit_demo.classifier import load_classifier
    from vit_demo.registry import BUNDLED

    clf = load_classifier(BUNDLED, device="cpu")
    depth = clf.config.depth
    x = clf.preprocessor.normalize(clf.crop(Image.open(EXAMPLES / "chelsea.jpg")))
    cpu = torch.device("cpu")

    def heavy(shared: bool = False) -> int:
        before = fair.PRIORITY.pauses
        with fair.heavy_cpu(cpu):
            if shared:
                clf.runtime(x)
            else:
                clf.model(x.requires_grad_(True))[0].sum().backward()
        return fair.PRIORITY.pauses - before

    assert heavy() == 0
    with fair.PRIORITY.cheap_work():
        assert heavy() == 1 + 2 * depth
        assert heavy(shared=True) == 1  # on entering only
        before = fair.PRIORITY.pauses
        clf.model(x)  # not a heavy job's thread
        assert fair.PRIORITY.pauses == before
