"""One policy for what every visitor shares: the queue and CPU time, model switches, and the log.

- **Lanes.** Every queued event runs in one of three lanes, each with one concurrency limit shared by all of its
  events (Gradio's `concurrency_id`): `cheap` (/classify and the live stream), `heavy` (everything that runs the
  explicit attention path, gradients or many forward passes: maps, scores, Compare, Inside, loading a model) and
  `page` (small follow-ups of the page). Each lane has its own bounded wait; a heavy request past it is refused at
  once with "busy: N requests ahead, try again in about T s", so heavy work never takes the room of cheap work.
  A client that sends another heavy request before T has passed is held until then (`RetryHold`), so that
  retrying in a loop costs the server one look every few seconds.
- **Clients.** A client is a session, and also an address (behind a trusted proxy, the address its forwarded
  header names, `VIT_DEMO_TRUSTED_HOPS`). Each has a bound on the jobs it has waiting or running in each lane, on
  live streams, and on model switches a minute.
- **CPU.** A heavy job on the CPU runs with its share of torch threads (`heavy_cpu`): the heavy lane's jobs
  together use at most half the cores. While a cheap pass runs (`cheap_cpu`), heavy jobs pause at their next
  transformer block, forward or backward, for at most PAUSE_S at a time: cheap work goes first.
- **Callers that left.** A job whose caller never listened for its answer is dropped before it runs.
- **The log.** Every log line (the app's, Gradio's, uvicorn's, asyncio's, and exceptions that escape the app's
  checks) goes through one rate limit: a few lines a minute for each kind, the rest counted; a traceback is
  written once per kind.

Figures are in the README ("Limits on a public Space"); `tests/test_crowd.py` checks them over the launched app.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import time
import traceback
from collections import defaultdict, deque
from dataclasses import dataclass
from types import SimpleNamespace

import gradio as gr
import torch
from gradio import route_utils
from gradio.queueing import Event, Queue
from gradio.server_messages import ProcessCompletedMessage
from gradio.state_holder import SessionState, StateHolder
from gradio.utils import LRUCache, error_payload

from ..model import Block
from ..runtime import MAX_BATCH, in_shared_pass

log = logging.getLogger("vit_demo.ui")


def env_int(name: str, default: int, low: int = 0) -> int:
    """A whole-number setting from the environment (a bad value is named in a warning and the default used)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return max(low, int(raw))
    except ValueError:
        log.warning("%s is not a whole number; using %d.", name, default)
        return default


@dataclass(frozen=True)
class Policy:
    """The numbers of the policy (README, "Limits on a public Space"), read from the environment at build."""

    heavy_limit: int  # heavy jobs running at once, all events together
    heavy_wait: int  # heavy jobs waiting; past that, "busy"
    cheap_limit: int = MAX_BATCH  # /classify and live streams running at once (their forward passes are shared)
    cheap_wait: int = 64
    page_wait: int = 64
    session_jobs: tuple = (("cheap", 4), ("heavy", 2), ("page", 8))  # waiting or running, per session
    address_jobs: tuple = (("cheap", 32), ("heavy", 4), ("page", 64))  # the same per address
    streams: int = MAX_BATCH // 2  # live streams at once: the other half of the cheap lane stays for /classify
    address_streams: int = 2  # live streams at once from one address (one per session)
    stream_starts: int = 4  # live stream (re)starts per client per minute
    switches: int = 4  # loads of a model not already loaded, per client per minute
    gone_after_s: float = 5.0  # a job whose caller has not listened for this long is dropped before it runs
    sessions: int = 2000  # sessions whose state (gr.State, ~0.25 MB each here) is kept: the oldest go first

    @classmethod
    def from_env(cls) -> Policy:
        cores = os.cpu_count() or 1
        return cls(heavy_limit=env_int("VIT_DEMO_HEAVY_LIMIT", max(1, cores // 2), 1),
                   heavy_wait=env_int("VIT_DEMO_HEAVY_WAIT", 4, 0),
                   switches=env_int("VIT_DEMO_SWITCHES_PER_MINUTE", 4, 0))


CHEAP, HEAVY, PAGE = "cheap", "heavy", "page"


def heavy_threads(policy: Policy | None = None) -> int:
    """CPU threads one heavy job may use: together the heavy lane's jobs use at most half the cores, so that a
    map, a score or the Inside walk never takes the cores /classify and live frames need."""
    policy = policy or Policy.from_env()
    return max(1, (os.cpu_count() or 1) // 2 // policy.heavy_limit)


NO_SUCH_EVENT = "There is no such event: use the page, or the events its API page lists."
ANALYTICS_EVERY_S = 10.0  # Gradio's monitoring statistics are rebuilt at most this often
PAUSE_S = 0.25  # the longest a heavy job waits at one block boundary for cheap work to finish


class _Priority:
    """Cheap work first on the CPU: while a cheap pass (/classify, a live frame) runs, a heavy job pauses at the
    next transformer block it enters in its forward pass, and at the next block boundary of its backward pass,
    for at most PAUSE_S each time, so that it never holds the cores a visitor's answer waits for, yet always
    moves on. Heavy jobs mark their thread (`heavy_cpu`); the hook below checks the mark, so cheap passes run
    through it untouched."""

    def __init__(self):
        self.cheap = 0
        self.pauses = 0  # taken so far, for tests and benchmarks
        self._cond = threading.Condition()
        self._local = threading.local()

    @contextlib.contextmanager
    def cheap_work(self):
        with self._cond:
            self.cheap += 1
        try:
            yield
        finally:
            with self._cond:
                self.cheap -= 1
                if self.cheap == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def heavy_thread(self):
        self._local.heavy = True
        try:
            yield
        finally:
            self._local.heavy = False

    def pause(self) -> None:
        """In a heavy job's thread: waits while cheap work runs (at most PAUSE_S); anywhere else: nothing."""
        if not getattr(self._local, "heavy", False) or not self.cheap or in_shared_pass():
            return  # a shared pass (the served logits a map names) has other callers waiting on it
        with self._cond:
            self.pauses += 1
            self._cond.wait_for(lambda: self.cheap == 0, timeout=PAUSE_S)

    def block_hook(self, module, args, output) -> None:
        """A global forward hook: at the end of each transformer block of a heavy job, a pause, and one more
        where the backward pass reaches that block's output."""
        if not getattr(self._local, "heavy", False) or not isinstance(module, Block):
            return
        self.pause()
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._backward_pause)

    def _backward_pause(self, grad):
        self.pause()
        return None


PRIORITY = _Priority()
# Global, so that every model's blocks have it without touching a model another thread may be running.
torch.nn.modules.module.register_module_forward_hook(PRIORITY.block_hook)


@contextlib.contextmanager
def heavy_cpu(device: torch.device):
    """Runs the block with `heavy_threads()` torch threads on the CPU, pausing for cheap work (`_Priority`).
    Torch's thread count is per calling thread (OpenMP), so only this job's thread is changed, and it is put
    back after."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, heavy_threads()))
    try:
        with PRIORITY.heavy_thread():
            PRIORITY.pause()
            yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def cheap_cpu(device: torch.device):
    """Runs a cheap pass (/classify, a live frame): on the CPU, heavy jobs pause for it at their next block."""
    if device.type != "cpu":
        yield
        return
    with PRIORITY.cheap_work():
        yield


def lane(name: str) -> dict:
    """The keyword arguments that put a Gradio event in a lane: `button.click(fn, ..., **fair.lane("heavy"))`.
    The limit given here is a placeholder: `FairQueue` sets each lane's limit from the Policy."""
    assert name in (CHEAP, HEAVY), name
    return dict(concurrency_id=name, concurrency_limit=1)


def lane_of(fn) -> str:
    return fn.concurrency_id if fn.concurrency_id in (CHEAP, HEAVY) else PAGE


# --- who is asking ------------------------------------------------------------------------------------------------

def trusted_hops() -> int:
    """VIT_DEMO_TRUSTED_HOPS: how many proxies in front of the app append to X-Forwarded-For (default 1 on a
    Hugging Face Space, where SPACE_ID is set, else 0: the header is ignored and the peer address used)."""
    return env_int("VIT_DEMO_TRUSTED_HOPS", 1 if os.environ.get("SPACE_ID") else 0, 0)


def address(scope: dict, hops: int | None = None) -> str:
    """The client's address for an ASGI scope: the peer, or, behind `hops` trusted proxies, the address that the
    outermost trusted proxy saw (the `hops`-th entry of X-Forwarded-For from the right)."""
    hops = trusted_hops() if hops is None else hops
    peer = (scope.get("client") or ("?", 0))[0]
    if hops <= 0:
        return peer
    forwarded = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
    entries = [e.strip() for e in ",".join(forwarded).split(",") if e.strip()]
    if not entries:
        return peer
    return entries[-hops] if len(entries) >= hops else entries[0]


@dataclass(frozen=True)
class Client:
    session: str
    address: str


current_client: contextvars.ContextVar[Client | None] = contextvars.ContextVar("current_client", default=None)


def client_of(event: Event) -> Client:
    request = getattr(event, "request", None)
    scope = getattr(request, "scope", None) or {}
    return Client(event.session_hash or "", address(scope))


# --- who is listening ---------------------------------------------------------------------------------------------

class Listeners:
    """Which sessions and events have a stream open for their answers (kept by server.RequestLimits)."""

    def __init__(self):
        self._open: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def opened(self, key: str) -> None:
        with self._lock:
            self._open[key] += 1

    def closed(self, key: str) -> None:
        with self._lock:
            self._open[key] -= 1
            if self._open[key] <= 0:
                del self._open[key]

    def listening(self, *keys: str) -> bool:
        return any(k in self._open for k in keys if k)


LISTENERS = Listeners()


# --- the queue ----------------------------------------------------------------------------------------------------

RETRY_HOLD_S = 5.0  # the longest a heavy request of a client just told "busy" is held before it is looked at


class Busy(str):
    """The "busy" sentence, carrying the wait it names (for `RetryHold`)."""

    seconds: float


def busy(ahead: int, seconds: float) -> Busy:
    why = Busy(f"busy: {ahead} requests ahead, try again in about {max(1, round(seconds))} s.")
    why.seconds = seconds
    return why


class RetryHold:
    """A client told "busy" that sends another heavy request within RETRY_HOLD_S (at most) first waits out that
    time, holding nothing but its connection, and is then admitted or refused as anyone else: a client that
    retries at once, in a loop, costs the server one look every few seconds instead of hundreds a minute. Its
    first refusal is immediate, only one of its requests is held at a time, and its cheap requests (/classify,
    live frames) are never held."""

    def __init__(self, limit: int = 10_000):
        self._until: dict[str, float] = {}
        self._holding: set[str] = set()  # clients with a request held now
        self.limit = limit
        self.held = 0  # requests held so far, for tests and benchmarks

    def _keys(self, client: Client) -> set[str]:
        return {f"s:{client.session}" if client.session else "", f"a:{client.address}"} - {""}

    def told(self, client: Client, seconds: float) -> None:
        now = time.monotonic()
        if len(self._until) >= self.limit:  # forget the expired holds, and past the limit the soonest to expire
            live = sorted((t, k) for k, t in self._until.items() if t > now)[-(self.limit // 2):]
            self._until = {k: t for t, k in live}
        for key in self._keys(client):
            self._until[key] = now + min(max(seconds, 0.5), RETRY_HOLD_S)

    async def wait(self, client: Client) -> None:
        """Waits out the client's hold, if it has one. One request per client is held at a time: a second one
        while the first waits is looked at at once, so that holds never pin more than one connection each."""
        keys = self._keys(client)
        wait = max((self._until.get(k, 0.0) for k in keys), default=0.0) - time.monotonic()
        if wait <= 0 or keys & self._holding:
            return
        self.held += 1
        self._holding |= keys
        try:
            await asyncio.sleep(wait)
        finally:
            self._holding -= keys


class SessionQueues(LRUCache):
    """Gradio's store of each session's pending messages (at most `max_size` sessions), except that a full store
    forgets the least recently used session that has no job waiting or running, not simply the oldest: a flood
    of throwaway sessions (each call without a session makes one) must not take the queue from a visitor whose
    job is waiting, which would stop Gradio's queue for everyone. The sessions with jobs are bounded by the
    lanes' limits, far below `max_size`."""

    def __init__(self, max_size: int, pending: dict):
        super().__init__(max_size)
        self.pending = pending  # session -> its waiting or running event ids (Gradio's own bookkeeping)

    def __setitem__(self, key, value) -> None:
        if key not in self and len(self) >= self.max_size:
            idle = next((k for k in self if not self.pending.get(k)), None)
            self.pop(idle if idle is not None else next(iter(self)))
        super().__setitem__(key, value)


class _Configs(dict):
    """A session's copy of each component's config, made when a component's is first asked for."""

    def __init__(self, blocks_config, ids: list[int]):
        super().__init__()
        self.blocks_config, self.ids = blocks_config, ids

    def __missing__(self, key: int) -> dict:
        value = self[key] = self.blocks_config.config_for_block(key, [], self.blocks_config.blocks[key])
        return value

    def fill(self) -> None:
        for key in self.ids:
            self[key]  # noqa: B018 - made by __missing__


class LazySessionState(SessionState):
    """Gradio's state of one session, except that its copy of every component's config is made per component
    when first used (a request updates those of its inputs and outputs; only the deep-link route reads them
    all) instead of for all of the page's components whenever a session is new. Every call made without a
    session is a new one, and that copy ran on the server's event loop: 6.5 ms for this page's 129 components,
    during which no other request moved."""

    def __init__(self, blocks: gr.Blocks):
        super().__init__(SimpleNamespace(default_config=blocks.default_config, blocks={}))  # no copies yet
        self.config_values = _Configs(self.blocks_config, [k for k in self.blocks_config.blocks if k in blocks.blocks])

    @property
    def components(self):
        self.config_values.fill()
        return SessionState.components.fget(self)

    def _update_value_in_config(self, key: int, value) -> None:
        """Gradio copies each input's and output's value into the session's config copy, for deep links alone:
        the page has none (the route is closed), and an inline image's whole data URL would be kept per session."""


class SessionStates(StateHolder):
    """Gradio's store of session states, whose new sessions are LazySessionStates."""

    def __getitem__(self, session_id: str) -> SessionState:
        if session_id not in self.session_data:
            self.session_data[session_id] = LazySessionState(self.blocks)
        return super().__getitem__(session_id)

    @classmethod
    def adopt(cls, holder: StateHolder) -> StateHolder:
        """Makes Gradio's own store (made by its app, before any session) one of these."""
        if type(holder) is StateHolder and not holder.session_data:
            holder.__class__ = cls
        return holder


class FairQueue(Queue):
    """Gradio's queue with the lanes and per-client bounds of the module doc applied on admission, and callers
    that left dropped before their job starts. Refusals reach the caller as the job's error, in one sentence."""

    def __init__(self, *args, policy: Policy | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy or Policy.from_env()
        self.lane_seconds = {CHEAP: 0.2, HEAVY: 2.0, PAGE: 0.1}  # mean run time, for the "try again" estimate
        self.stream_starts: dict[Client, deque] = defaultdict(deque)
        self.pending_messages_per_session = SessionQueues(self.pending_messages_per_session.max_size,
                                                          self.pending_event_ids_session)
        self.retry_hold = RetryHold()
        self._analytics_at = float("-inf")
        self.dropped = 0
        self._last_drop = 0.0

    @classmethod
    def replace(cls, demo: gr.Blocks, policy: Policy | None = None) -> FairQueue:
        """Swaps the queue of `demo` (after `demo.queue()`) for a FairQueue with the same settings."""
        old = demo._queue
        queue = cls(live_updates=old.live_updates, concurrency_count=old.max_thread_count,
                    update_intervals=old.update_intervals, max_size=None, blocks=demo,
                    default_concurrency_limit=old.default_concurrency_limit, policy=policy)
        demo._queue = queue
        return queue

    def limit_of(self, name: str) -> int | None:
        return {CHEAP: self.policy.cheap_limit, HEAVY: self.policy.heavy_limit}.get(name)

    def create_event_queue_for_fn(self, block_fn) -> None:
        super().create_event_queue_for_fn(block_fn)
        limit = self.limit_of(block_fn.concurrency_id)
        if limit is not None:
            self.event_queue_per_concurrency_id[block_fn.concurrency_id].concurrency_limit = limit

    # what is waiting and running, by lane and client

    def _jobs(self):
        for q in self.event_queue_per_concurrency_id.values():
            for event in q.queue:
                yield event, False
        for job in self.active_jobs:
            for event in job or ():
                yield event, True

    def refusal(self, fn, client: Client) -> str | None:
        """Why a new job of `fn` for `client` is not admitted, in one sentence; None to admit it."""
        p, name = self.policy, lane_of(fn)
        waiting = running = by_session = by_address = streams = session_streams = address_streams = 0
        for event, is_running in self._jobs():
            other = client_of(event)
            same_lane = lane_of(event.fn) == name
            if same_lane:
                running += is_running
                waiting += not is_running
                by_session += bool(client.session) and other.session == client.session
                by_address += other.address == client.address
            if event.streaming:
                streams += 1
                session_streams += bool(client.session) and other.session == client.session
                address_streams += other.address == client.address
        if fn.connection == "stream":
            starts = self.stream_starts[client]
            while starts and time.monotonic() - starts[0] > 60:
                starts.popleft()
            if session_streams >= 1 or address_streams >= p.address_streams:
                return "You already have a live view running: stop it (or close its tab) before starting another."
            if len(starts) >= p.stream_starts:
                return (f"The live view was started {len(starts)} times in the last minute from here: wait a minute, "
                        "then press Record again.")
            if streams >= p.streams:
                return f"The live view is full ({streams} visitors are using it): try again in about a minute."
        session_cap, address_cap = dict(p.session_jobs)[name], dict(p.address_jobs)[name]
        if by_session >= session_cap or by_address >= address_cap:
            mine = by_session if by_session >= session_cap else by_address
            return (f"You have {mine} requests of this kind waiting or running: wait for their answers before "
                    "sending more.")
        room = {CHEAP: p.cheap_wait, HEAVY: p.heavy_wait, PAGE: p.page_wait}[name]
        limit = self.limit_of(name)
        if waiting >= room and (limit is None or running >= limit):
            ahead = waiting + running
            return busy(ahead, (ahead + 1) * self.lane_seconds[name] / max(1, limit or 1))
        return None

    async def push(self, body, request, username):
        try:
            fn = route_utils.get_fn(self.blocks, None, body)
        except (KeyError, IndexError, TypeError):  # Gradio's own push would fail the same way, as a bare 500
            return False, NO_SUCH_EVENT, "error"
        except Exception:  # Gradio says what is wrong with the request itself
            return await super().push(body, request, username)
        client = Client(body.session_hash or "", address(request.scope))
        if lane_of(fn) == HEAVY:
            await self.retry_hold.wait(client)
        why = self.refusal(fn, client)
        if isinstance(why, Busy):
            self.retry_hold.told(client, why.seconds)  # the "try again in about T s" it was just told
        if why is None:
            if fn.connection == "stream":
                self.stream_starts[client].append(time.monotonic())
            return await super().push(body, request, username)
        log.info("refused: %s", why)
        if body.session_hash and not LISTENERS.listening(body.session_hash) and \
                body.session_hash in self.pending_messages_per_session and \
                self.pending_messages_per_session[body.session_hash].qsize() > 8:
            return False, why, "queue_full"  # nobody reads this session's answers: do not keep more for it
        return self._refuse(fn, body, request, username, why)

    def _refuse(self, fn, body, request, username, why: str):
        """Answers a job with `why` as its error, without running it (a raw caller reads it from its stream)."""
        event = Event(body.session_hash, fn, request, username)
        if body.session_hash is None:
            body.session_hash = event.session_hash
        if body.session_hash not in self.pending_messages_per_session:
            from asyncio import Queue as AsyncQueue
            self.pending_messages_per_session[body.session_hash] = AsyncQueue()
        self.pending_event_ids_session.setdefault(body.session_hash, set()).add(event._id)
        content = error_payload(gr.Error(why, print_exception=False), True)
        self.send_message(event, ProcessCompletedMessage(output=content, title="Busy", success=False))
        return True, event._id, "success"

    def send_message(self, event, event_message) -> None:
        """Gradio's, for a session whose store was forgotten too (only a session with no job is): the message
        goes to a new store rather than raising in the queue's own loop, which would stop it for everyone."""
        if event.alive and event.session_hash not in self.pending_messages_per_session:
            self.pending_messages_per_session[event.session_hash] = asyncio.Queue()
        super().send_message(event, event_message)

    def get_events(self):
        self._drop_gone()
        return super().get_events()

    def compute_analytics_summary(self, records):
        """Gradio's per-function statistics for its monitoring page, rebuilt at most every ANALYTICS_EVERY_S instead
        of after every event: building them from up to 10,000 records took a quarter of the server's time under a
        crowd."""
        now = time.monotonic()
        if now - self._analytics_at < ANALYTICS_EVERY_S:
            return self.cached_event_analytics_summary
        self._analytics_at = now
        return super().compute_analytics_summary(records)

    def _drop_gone(self) -> None:
        """Drops waiting jobs whose caller has not listened for their answer for `gone_after_s` (called under the
        queue's lock, before a job is picked; at most every 0.2 s, as Gradio polls for work every millisecond)."""
        now = time.monotonic()
        if now - self._last_drop < 0.2:
            return
        self._last_drop = now
        for q in self.event_queue_per_concurrency_id.values():
            for event in [e for e in q.queue if now - e.enqueue_time > self.policy.gone_after_s]:
                if not LISTENERS.listening(event.session_hash, event._id):
                    q.queue.remove(event)
                    self.event_ids_to_events.pop(event._id, None)
                    ids = self.pending_event_ids_session.get(event.session_hash)
                    if ids is not None:
                        ids.discard(event._id)
                        if not ids:
                            self.pending_event_ids_session.pop(event.session_hash, None)
                    self.dropped += 1

    async def process_events(self, events, batch, begin_time, fn) -> None:
        token = current_client.set(client_of(events[0]))
        start = time.monotonic()
        cheap = lane_of(fn) == CHEAP and fn.connection != "stream"
        try:
            with PRIORITY.cheap_work() if cheap else contextlib.nullcontext():
                await super().process_events(events, batch, begin_time, fn)
        finally:
            current_client.reset(token)
            if fn.connection != "stream":
                name = lane_of(fn)
                self.lane_seconds[name] = 0.8 * self.lane_seconds[name] + 0.2 * (time.monotonic() - start)


# --- model switches -----------------------------------------------------------------------------------------------

class Switches:
    """Loads of a model that is not loaded yet, counted per client over the last minute."""

    def __init__(self):
        self._seen: dict[object, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, loaded: bool, per_minute: int, client: Client | None = None) -> None:
        """Counts a switch for the current job's client when the model is not loaded; past `per_minute`, raises
        a refusal in one sentence. Requests outside the queue (the Python API) are not counted."""
        client = client or current_client.get()
        if loaded or client is None:
            return
        now = time.monotonic()
        with self._lock:
            for key in {client.session, client.address} - {""}:
                seen = self._seen[key]
                while seen and now - seen[0] > 60:
                    seen.popleft()
                if len(seen) >= per_minute:
                    raise gr.Error(f"You have switched models {len(seen)} times in the last minute: keep the model "
                                   "that is loaded, or wait a minute.", print_exception=False)
            for key in {client.session, client.address} - {""}:
                self._seen[key].append(now)
            if len(self._seen) > 10_000:  # forget clients that stopped switching
                for key in [k for k, v in self._seen.items() if not v or now - v[-1] > 60]:
                    del self._seen[key]


SWITCHES = Switches()


def count_switch(registry, name: str) -> None:
    """Call before `registry.get(name)` on a visitor's behalf: a load of a model not in memory counts against the
    client's share of switches (VIT_DEMO_SWITCHES_PER_MINUTE, default 4)."""
    SWITCHES.check(name in registry.loaded(), Policy.from_env().switches)


# --- errors that escape the app's checks --------------------------------------------------------------------------

def escaped(error: BaseException) -> gr.Error:
    """An exception that escaped the app's own checks, logged through the rate limit (its traceback once per
    kind), and turned into one sentence for the caller."""
    log.error("Unexpected %s: %s", type(error).__name__, str(error)[:200], exc_info=error)
    return gr.Error(f"Something went wrong on the server ({type(error).__name__}): try again, or try another photo.",
                    print_exception=False)


# --- the log ------------------------------------------------------------------------------------------------------

LOG_LINES_PER_KIND = 5  # a minute
LOG_LINES_PER_MINUTE = 60  # all kinds together


class LogLimit(logging.Filter):
    """One rate limit for every log line: at most LOG_LINES_PER_KIND lines a minute of each kind (logger, level
    and message template, or the exception's type and where it was raised), and LOG_LINES_PER_MINUTE in all; the
    rest are counted, and the count is added to the next line of that kind. A traceback is written once per kind."""

    def __init__(self, per_kind: int = LOG_LINES_PER_KIND, per_minute: int = LOG_LINES_PER_MINUTE):
        super().__init__()
        self.per_kind, self.per_minute = per_kind, per_minute
        self._lock = threading.Lock()
        self._window = time.monotonic()
        self._lines = 0
        self._kinds: dict[tuple, int] = defaultdict(int)
        self._dropped: dict[tuple, int] = defaultdict(int)
        self._traced: set[tuple] = set()

    @staticmethod
    def kind(record: logging.LogRecord) -> tuple:
        if record.exc_info and record.exc_info[1] is not None:
            tb = traceback.extract_tb(record.exc_info[2])[-1:] if record.exc_info[2] else []
            where = (tb[0].filename, tb[0].lineno) if tb else ()
            return record.name, record.levelno, type(record.exc_info[1]).__name__, where
        return record.name, record.levelno, str(record.msg)[:200]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_vit_demo_seen", None) is not None:  # the same record at a second handler
            return record._vit_demo_seen
        kind = self.kind(record)
        with self._lock:
            now = time.monotonic()
            if now - self._window >= 60:
                self._window, self._lines = now, 0
                self._kinds.clear()
            ok = self._kinds[kind] < self.per_kind and self._lines < self.per_minute
            if ok:
                self._kinds[kind] += 1
                self._lines += 1
                dropped = self._dropped.pop(kind, 0)
                if dropped:
                    record.msg = f"{record.msg} ({dropped} more like this were not logged)"
                if record.exc_info:
                    if kind in self._traced:
                        record.exc_info, record.exc_text = None, None
                        record.msg = f"{record.msg} (traceback logged before)"
                    else:
                        self._traced.add(kind)
                        if len(self._traced) > 1000:
                            self._traced.clear()
            else:
                self._dropped[kind] += 1
                if len(self._dropped) > 1000:
                    self._dropped.clear()
        record._vit_demo_seen = ok
        return ok


LOG_LIMIT = LogLimit()


def limit_log(limit: LogLimit = LOG_LIMIT) -> None:
    """Puts `limit` on every handler of every logger there is now (the root's, uvicorn's, Gradio's)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if limit not in handler.filters:
                handler.addFilter(limit)
    if limit not in logging.lastResort.filters:
        logging.lastResort.addFilter(limit)


def raise_open_files() -> tuple[int, int]:
    """Raises the process's open-file soft limit to its hard limit; returns (soft, hard) after."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard
