"""Registry: one load per model at a time, also when callers arrive as a load ends or after a load failed.

`load_classifier` is replaced by a fake whose calls the tests hold and release, and the registry's own lock
reports each release, so that every interleaving below happens in the same order on every run.
"""

from __future__ import annotations

import threading
import time

from conftest import wait_until
from vit_demo import ModelLoadError
from vit_demo import registry as registry_module
from vit_demo.registry import Registry

NAME = "org/vit"


class ReportingLock:
    """A threading.Lock that records which thread released it, and calls `hook()` after each release (not
    while a hook runs)."""

    def __init__(self, hook=None):
        self._lock = threading.Lock()
        self.hook = hook
        self.releases: list[str] = []
        self._hooking = threading.local()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()
        self.releases.append(threading.current_thread().name)
        if self.hook is not None and not getattr(self._hooking, "on", False):
            self._hooking.on = True
            try:
                self.hook()
            finally:
                self._hooking.on = False


def happens_within(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def test_a_caller_arriving_as_a_load_ends_gets_that_model(monkeypatch):
    """Between the end of a load and the model's entry in the cache, no caller may find neither and load again."""
    loads = []
    monkeypatch.setattr(registry_module, "load_classifier", lambda name, device=None: loads.append(name) or object())
    reg = Registry([NAME], default=NAME)
    arrivals = []
    reg._lock = ReportingLock(hook=lambda: loads and arrivals.append(reg.get(NAME)))  # after every release, once loading
    first = reg.get(NAME)
    assert len(loads) == 1, f"{len(loads)} loads of one model"
    assert arrivals and all(a is first for a in arrivals)
    assert reg.loaded() == [NAME]


def test_after_a_failed_load_the_retry_is_shared_and_no_caller_loads_in_parallel(monkeypatch):
    """A fails (the Hub was out of reach); B, who waited for A, retries; C, arriving during B's retry, waits for it instead of starting a
    parallel load (and nobody removes the lock another caller is using)."""
    loads, release = [], [threading.Event(), threading.Event(), threading.Event()]
    made = []

    def fake_load(name, device=None):
        n = len(loads)
        loads.append(name)
        release[n].wait(timeout=30)
        if n == 0:
            raise ModelLoadError("the Hub could not be reached", transient=True)  # not remembered: retried
        made.append(object())
        return made[-1]

    monkeypatch.setattr(registry_module, "load_classifier", fake_load)
    reg = Registry([NAME], default=NAME)
    reg._lock = ReportingLock()
    results = {}

    def call(who):
        try:
            results[who] = reg.get(NAME)
        except ModelLoadError as e:
            results[who] = e

    threads = {who: threading.Thread(target=call, args=(who,), name=who) for who in "ABC"}
    threads["A"].start()
    wait_until(lambda: len(loads) == 1)
    threads["B"].start()
    wait_until(lambda: "B" in reg._lock.releases)  # B has asked, and waits for A's load
    release[0].set()  # A's load fails
    wait_until(lambda: len(loads) == 2)  # B retries
    threads["C"].start()
    wait_until(lambda: "C" in reg._lock.releases)  # C has asked
    # C must wait for B's retry. A parallel load would start at once: a second without one tells them apart.
    parallel = happens_within(lambda: len(loads) >= 3, seconds=1.0)
    release[1].set()
    release[2].set()
    for t in threads.values():
        t.join(timeout=30)
    assert not parallel, "a caller loaded the model in parallel with the retry"
    assert isinstance(results["A"], ModelLoadError)
    assert results["B"] is made[0] and results["C"] is made[0], results
    assert len(loads) == 2 and reg._loading == {}, (loads, reg._loading)


def test_make_default_puts_the_model_first_and_serves_it_when_none_is_named(monkeypatch):
    monkeypatch.setattr(registry_module, "load_classifier", lambda name, device=None: name)
    reg = Registry(["org/a", "org/b"], default="org/a")
    reg.make_default("org/b")
    assert reg.choices == ["org/b", "org/a"] and reg.get() == "org/b" and reg.get("") == "org/b"
