"""The launched app under load: 16 gradio_client clients in 16 threads, for 30 s, mixing /classify and /explain.

Each client is its own visitor (the app trusts one proxy hop, and each client sends its own X-Forwarded-For). A
request told "busy: ... try again in about T s" (the heavy lane's waiting room is full) is sent again after T s,
as the sentence asks, for up to 60 s. Every request must succeed, every /classify answer must equal the single-request answer for the same image (same
labels in the same order, probabilities within 1e-4), every /explain overlay that is fetched must download whole
and equal the single-request overlay, and the process's resident memory (the app runs in this process) must not grow by more
than 300 MB. All traffic stays on 127.0.0.1; every loop stops by itself (a deadline and an iteration cap).
Run with -s to see the figures: requests done, failures, latencies per endpoint, memory.
"""

from __future__ import annotations

import gc
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, confidences, launched, make_fruit_checkpoint, rss_mb
from vit_demo.registry import Registry

IMAGES = [str(EXAMPLES / name) for name in ("chelsea.jpg", "astronaut.jpg", "coffee.jpg", "rocket.jpg")]
CLIENTS = 16
DURATION_S = 30.0
MAX_ITERATIONS = 2000  # per thread, whatever the deadline
MAX_RSS_GROWTH_MB = 300
CHECK_OVERLAY_EVERY = 4  # fetch and compare one /explain overlay in this many
# Every overlay fetched must come back whole: a file rewritten in place while others download it gives them
# 0 bytes or a truncated PNG.



@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app's URL, serving one small checkpoint (224 px, 32 px patches, 7 classes); closed at the end."""
    tmp = tmp_path_factory.mktemp("load")
    path = make_fruit_checkpoint(tmp / "ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIT_DEMO_TRUSTED_HOPS", "1")
        with launched(Registry([str(path)], default=str(path), device="cpu"), tmp) as (_, url):
            assert url.startswith("http://127.0.0.1:"), url
            yield url


def overlay_pixels(result, http: httpx.Client) -> np.ndarray:
    assert isinstance(result, dict) and str(result.get("url", "")).startswith("http://127.0.0.1:"), result
    response = http.get(result["url"])
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def differs(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> str | None:
    if [label for label, _ in got] != [label for label, _ in expected]:
        return f"labels {[l for l, _ in got]} != {[l for l, _ in expected]}"
    diff = max(abs(p - q) for (_, p), (_, q) in zip(got, expected))
    return f"probabilities differ by {diff:.3g}" if diff > 1e-4 else None


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def test_sixteen_clients_for_thirty_seconds(served):
    from gradio_client import Client, handle_file

    url = served
    http = httpx.Client(timeout=30)
    t_setup = time.monotonic()

    # The single-request answers, one client, one request at a time.
    single = Client(url, download_files=False, verbose=False)
    expected_labels, expected_overlay = {}, {}
    for image in IMAGES:
        expected_labels[image] = confidences(single.predict(image=handle_file(image), api_name="/classify"))
        assert len(expected_labels[image]) == 5
        expected_overlay[image] = overlay_pixels(single.predict(image=handle_file(image), method="rollout", api_name="/explain"), http)
    single.close()
    answers = list(expected_labels.values())
    assert any(differs(a, b) for a in answers for b in answers), "the images look alike to the model: a mix-up would go unseen"

    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = list(pool.map(lambda n: Client(url, download_files=False, verbose=False,
                                                 headers={"X-Forwarded-For": f"10.1.0.{n + 1}"}), range(CLIENTS)))
    lock = threading.Lock()
    latencies = {"/classify": [], "/explain": []}
    failures: list[str] = []
    mismatches: list[str] = []
    broken_fetches: list[str] = []  # overlay downloads that failed, or came back empty or truncated
    overlays_checked = [0]
    iterations = [0] * CLIENTS
    busy = [0]

    def until_admitted(call):
        """call(), sent again after the time a "busy" answer names (for up to 60 s)."""
        from gradio_client.exceptions import AppError

        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            try:
                return call()
            except AppError as e:
                found = re.fullmatch(r"busy: \d+ requests ahead, try again in about (\d+) s\.", str(e))
                if not found:
                    raise
                with lock:
                    busy[0] += 1
                time.sleep(min(5, int(found.group(1))))
        return call()

    print(f"\nsingle-request answers and {CLIENTS} clients ready in {time.monotonic() - t_setup:.1f} s")
    gc.collect()
    rss_before = rss_mb()
    start = time.monotonic()
    deadline = start + DURATION_S
    rss_samples: list[tuple[float, float]] = []

    def sample_memory() -> None:  # one sample a second while the clients run
        while time.monotonic() < deadline:
            rss_samples.append((time.monotonic() - start, rss_mb()))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()

    def worker(n: int) -> None:
        client = clients[n]
        with httpx.Client(timeout=30) as own_http:
            for i in range(MAX_ITERATIONS):
                if time.monotonic() >= deadline:
                    break
                iterations[n] = i + 1
                image = IMAGES[(n + i // 2) % len(IMAGES)]
                api_name = "/classify" if (n + i) % 2 == 0 else "/explain"
                t0 = time.perf_counter()
                try:
                    if api_name == "/classify":
                        result = until_admitted(lambda: client.predict(image=handle_file(image), api_name="/classify"))
                    else:
                        result = until_admitted(lambda: client.predict(image=handle_file(image), method="rollout",
                                                                       api_name="/explain"))
                    elapsed = time.perf_counter() - t0
                    if api_name == "/classify":
                        problem = differs(confidences(result), expected_labels[image])
                    else:
                        assert isinstance(result, dict) and result.get("url"), result
                        problem = None
                except Exception as e:  # noqa: BLE001: every failure is counted and shown
                    with lock:
                        failures.append(f"client {n}, {api_name} {image}: {type(e).__name__}: {e}")
                    continue
                if api_name == "/explain" and i % (2 * CHECK_OVERLAY_EVERY) < 2:  # fetch the file, as the page does
                    try:
                        got = overlay_pixels(result, own_http)
                    except (httpx.HTTPError, OSError) as e:
                        with lock:
                            broken_fetches.append(f"client {n}, {image}: {type(e).__name__}: {e}")
                    except Exception as e:  # noqa: BLE001
                        with lock:
                            failures.append(f"client {n}, fetching the overlay of {image}: {type(e).__name__}: {e}")
                    else:
                        with lock:
                            overlays_checked[0] += 1
                        if not np.array_equal(got, expected_overlay[image]):
                            problem = "the overlay differs"
                with lock:
                    latencies[api_name].append(elapsed)
                    if problem:
                        mismatches.append(f"client {n}, {api_name} {image}: {problem}")

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DURATION_S + 60)
    wall = time.monotonic() - start
    stuck = sum(t.is_alive() for t in threads)
    sampler.join(timeout=5)
    gc.collect()
    rss_after = rss_mb()
    t_close = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:  # each close waits up to 1 s for its heartbeat thread
        list(pool.map(lambda c: c.close(), clients))
    http.close()
    print(f"clients closed in {time.monotonic() - t_close:.1f} s")

    done = sum(len(v) for v in latencies.values())
    print(
        f"\n{CLIENTS} clients, {wall:.1f} s: {done} requests answered ({done / wall:.1f}/s), {len(failures)} failed, "
        f"{len(mismatches)} answers differed from the single-request answer; {overlays_checked[0]} overlays fetched "
        f"and compared, {len(broken_fetches)} overlay downloads failed {broken_fetches[:2]}; {busy[0]} busy answers "
        "were retried"
    )
    for name, values in latencies.items():
        print(f"  {name}: {len(values)} requests, p50 {1000 * p(values, 50):.0f} ms, p95 {1000 * p(values, 95):.0f} ms, "
              f"max {1000 * max(values, default=float('nan')):.0f} ms")
    print(f"  iterations per client: min {min(iterations)}, max {max(iterations)}")
    print(f"  resident memory: {rss_before:.0f} MB before, {rss_after:.0f} MB after, growth {rss_after - rss_before:+.0f} MB; "
          f"every 5 s: {', '.join(f'{m:.0f}' for _, m in rss_samples[::5])} MB")

    assert stuck == 0, f"{stuck} client threads did not stop"
    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:3]}"
    assert not mismatches, f"{len(mismatches)} answers differed, e.g. {mismatches[:3]}"
    assert wall >= DURATION_S - 1 or max(iterations) == MAX_ITERATIONS
    assert min(iterations) >= 2, "a client got no turn at both endpoints"
    assert len(latencies["/classify"]) >= CLIENTS and len(latencies["/explain"]) >= CLIENTS
    assert not broken_fetches, f"{len(broken_fetches)} overlay downloads failed, e.g. {broken_fetches[:3]}"
    assert overlays_checked[0] >= 1
    assert rss_after - rss_before < MAX_RSS_GROWTH_MB, f"resident memory grew by {rss_after - rss_before:.0f} MB"
