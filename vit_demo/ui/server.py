"""What a raw HTTP request and a connection may cost the server, and how long files stay in the upload cache.

`RequestLimits` (ASGI middleware) refuses, before the body is read: uploads over UPLOAD_BYTES in total per
request (Gradio's `max_file_size` counts each file alone), other bodies over BODY_BYTES, query strings over
QUERY_BYTES, and session hashes longer than SESSION_HASH_CHARS (read from the parsed JSON, as Gradio reads it).
An upload is read whole into a spool of its own before Gradio sees it: a body cut off leaves nothing behind, a
part that is not a JPEG, PNG, WebP, BMP, GIF or TIFF is refused at the door (415) and not kept, and the upload
cache has a total cap and a share per client (`UploadLedger`: the client's oldest files go first; 429 or 507
past them). Upload ids must be short, and Gradio's progress state for each is freed soon after its upload.
Heartbeat connections (one per open page) are bounded per client and in all. Gradio's deep-link route, which
writes a copy of a session's page to the disk on every call, is closed: the page offers no deep links. It also
tells `fair.LISTENERS` which sessions are listening for their answers.

`guarded_server` makes uvicorn's connections bounded: a time limit for a request head and for an upload body
that makes no progress, and a cap on open connections (at the cap, the oldest connection still sending its head
is closed; when there is none, the new one gets a 503 and is closed).
`cache_lifespan` deletes every file in the upload cache once it is older than `VIT_DEMO_CACHE_SECONDS`
(uploads, results, and the bodies of refused uploads that Gradio leaves behind), except the examples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs

import h11
import uvicorn
from python_multipart.multipart import MultipartParser, parse_options_header
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import checks, fair
from .fair import env_int

log = logging.getLogger("vit_demo.ui")

MB = 1024 * 1024
UPLOAD_BYTES = 21 * MB  # one 20 MB photo and its multipart framing
BODY_BYTES = 1 * MB  # JSON of an API call: file handles and a few numbers
QUERY_BYTES = 4096
SESSION_HASH_CHARS = 64
DEFAULT_CACHE_SECONDS = 3600
UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
UPLOAD_KEEP_SECONDS = 60.0  # an upload is kept at least this long before a client's later uploads push it out
UPLOAD_ID_SECONDS = 30.0  # Gradio's progress state for an upload id is freed this long after its last request
SPOOL_MEMORY = 256 * 1024  # an upload body is kept in memory up to this size, then in an unnamed temporary file
NOT_AN_IMAGE = "This file is not an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo."
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def cache_seconds() -> int:
    """VIT_DEMO_CACHE_SECONDS (default 3600): how long uploads and results stay in the cache."""
    return env_int("VIT_DEMO_CACHE_SECONDS", DEFAULT_CACHE_SECONDS, 1)


def is_image(head: bytes) -> bool:
    """Whether the first bytes of a file are those of a JPEG, PNG, WebP, BMP, GIF or TIFF."""
    return head.startswith(IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


class RequestLimits:
    """ASGI middleware bounding requests, uploads, the upload cache and heartbeats (see module doc)."""

    def __init__(self, app, upload_bytes: int = UPLOAD_BYTES, body_bytes: int = BODY_BYTES):
        self.app, self.upload_bytes, self.body_bytes = app, upload_bytes, body_bytes
        self.ledger = UploadLedger.from_env()
        global RUNNING_LEDGER
        RUNNING_LEDGER = self.ledger
        self.upload_ids = UploadIds()
        self.heartbeats = Heartbeats.from_env()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        query = scope.get("query_string", b"")
        if len(query) > QUERY_BYTES:
            return await _reply(send, 414, "The request's address is too long.")
        path = scope.get("path", "").rstrip("/")
        if path.endswith("/deep_link"):  # the page offers no deep links; Gradio's route writes a file per call
            return await _reply(send, 404, "This app has no deep links: share the page's address instead.")
        params = {k: v[0] for k, v in parse_qs(query.decode("latin-1")).items()}
        if len(params.get("session_hash", "")) > SESSION_HASH_CHARS:
            return await _reply(send, 400, f"The session_hash must be at most {SESSION_HASH_CHARS} characters.")
        if path.endswith("/upload") or path.endswith("/upload_progress"):
            upload_id = params.get("upload_id")
            if upload_id is not None and not UPLOAD_ID.fullmatch(upload_id):
                return await _reply(send, 400, "The upload_id must be 1 to 64 letters, digits, - or _.")
            with self.upload_ids.using(upload_id):
                if path.endswith("/upload") and scope.get("method") == "POST":
                    return await self._upload(scope, receive, send)
                return await self.app(scope, receive, send)
        if "/heartbeat/" in path:
            session = path.rsplit("/", 1)[-1]
            if len(session) > SESSION_HASH_CHARS:
                return await _reply(send, 400, f"The session_hash must be at most {SESSION_HASH_CHARS} characters.")
            why = self.heartbeats.open(session, fair.address(scope))
            if why:
                return await _reply(send, 429, why)
            try:
                return await self.app(scope, receive, send)
            finally:
                self.heartbeats.close(session, fair.address(scope))
        listener = _listener(path, params)
        if listener:
            fair.LISTENERS.opened(listener)
            try:
                return await self.app(scope, receive, send)
            finally:
                fair.LISTENERS.closed(listener)
        limit = self.body_bytes
        too_large = (f"The request is larger than {limit // MB} MB: upload images first (/gradio_api/upload) and send "
                     "only their handles.")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _reply(send, 413, too_large)
        if scope.get("method") == "POST":
            body = await _read_body(receive, limit)
            if body is None:
                return await _reply(send, 413, too_large)
            if not _session_hash_ok(body):
                return await _reply(send, 400, f"The session_hash must be at most {SESSION_HASH_CHARS} characters.")
            return await self.app(scope, _replay(body, receive), send)
        return await self.app(scope, _counting(receive, limit), send)

    async def _upload(self, scope, receive, send):
        """Reads the whole body into a spool of its own, checks it, and only then hands it to Gradio."""
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_large = f"The request is larger than {self.upload_bytes // MB} MB: send a smaller file."
        if declared is not None and (not declared.isdigit() or int(declared) > self.upload_bytes):
            return await _reply(send, 413, too_large)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as spool:  # unnamed: nothing left on disk
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away: the partial body goes with the spool
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.upload_bytes:
                    return await _reply(send, 413, too_large)
                spool.write(chunk)
                if not message.get("more_body"):
                    break
            spool.seek(0)
            content_type = dict(scope.get("headers", [])).get(b"content-type", b"")
            parts = await asyncio.to_thread(_sniff_parts, spool, content_type)
            if parts is None:
                return await _reply(send, 400, "The upload could not be read: send files as multipart/form-data.")
            if not parts or not all(is_image(head) for head, _ in parts):
                checks.log_refusal(NOT_AN_IMAGE)
                return await _reply(send, 415, NOT_AN_IMAGE)
            client = fair.address(scope)
            refused = self.ledger.make_room(client, sum(n for _, n in parts))
            if refused:
                return await _reply(send, *refused)
            spool.seek(0)
            paths: list[str] = []
            await self.app(scope, _from_spool(spool, receive), _recording_paths(send, paths))
            self.ledger.add(client, paths)


def _listener(path: str, params: dict) -> str | None:
    """The key a stream of answers listens for: a session (/queue/data) or one event (/call/<api>/<event id>)."""
    if path.endswith("/queue/data"):
        return params.get("session_hash")
    parts = path.split("/")
    if len(parts) >= 3 and "call" in parts[:-2]:
        return parts[-1]
    return None


def _sniff_parts(spool, content_type: bytes) -> list[tuple[bytes, int]] | None:
    """[(first 16 bytes, size)] of each part of a multipart body; None when it is not multipart."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        return None
    parts: list[list] = []

    def begin():
        parts.append([b"", 0])

    def data(buf, start, end):
        part = parts[-1]
        if len(part[0]) < 16:
            part[0] += bytes(buf[start:min(end, start + 16 - len(part[0]))])
        part[1] += end - start

    try:
        parser = MultipartParser(params[b"boundary"], {"on_part_begin": begin, "on_part_data": data})
        while chunk := spool.read(256 * 1024):
            parser.write(chunk)
        parser.finalize()
    except Exception:
        return None
    return [(head, size) for head, size in parts]


def _from_spool(spool, receive):
    async def replayed():
        chunk = spool.read(256 * 1024)
        if chunk:
            return {"type": "http.request", "body": chunk, "more_body": True}
        if not getattr(replayed, "ended", False):
            replayed.ended = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    return replayed


def _recording_paths(send, paths: list[str]):
    """`send`, noting the files a successful upload response names."""
    state = {"status": 0, "body": b""}

    async def recorded(message):
        if message["type"] == "http.response.start":
            state["status"] = message["status"]
        elif message["type"] == "http.response.body" and state["status"] == 200 and len(state["body"]) < 1 * MB:
            state["body"] += message.get("body", b"")
            if not message.get("more_body"):
                with contextlib.suppress(ValueError):
                    names = json.loads(state["body"])
                    paths.extend(p for p in names if isinstance(p, str)) if isinstance(names, list) else None
        await send(message)

    return recorded


class UploadLedger:
    """Who uploaded which file of the upload cache, and the caps: `total` bytes of uploads in all and `share`
    bytes per client. Past a client's share, its own oldest files go (those older than `keep_s`, by default
    UPLOAD_KEEP_SECONDS; a client whose files are all newer is refused, 429); past the total, the client's oldest
    files go first, then the oldest of anyone's (507 when every file is newer than `keep_s`)."""

    def __init__(self, total: int, share: int, keep_s: float | None = None):
        self.total, self.share, self.keep_s = total, share, keep_s
        self._files: dict[str, collections.OrderedDict] = collections.defaultdict(collections.OrderedDict)
        self._owner: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> UploadLedger:
        total = env_int("VIT_DEMO_UPLOAD_CACHE_MB", 2048, 1) * MB
        return cls(total, min(total, max(UPLOAD_BYTES, env_int("VIT_DEMO_CLIENT_UPLOAD_MB", 200, 1) * MB)))

    def used(self, client: str | None = None) -> int:
        with self._lock:
            clients = [client] if client is not None else list(self._files)
            return sum(size for c in clients for _, size in self._files.get(c, {}).values())

    def add(self, client: str, paths: list[str]) -> None:
        now = time.time()
        with self._lock:
            for path in paths:
                if path in self._owner:
                    continue  # the same content, uploaded before: counted once
                with contextlib.suppress(OSError):
                    self._files[client][path] = (now, os.path.getsize(path))
                    self._owner[path] = client

    def make_room(self, client: str, size: int) -> tuple[int, str] | None:
        """Frees room for `size` more bytes from `client`; returns (status, sentence) when it cannot."""
        with self._lock:
            self._forget_gone()
            now = time.time()
            mine = self._files[client]
            while self._sum(mine) + size > self.share:
                if not self._evict_oldest(mine, now):
                    mb = self._sum(mine) // MB
                    return 429, (f"You have uploaded {mb} MB in the last minute, this app's share per visitor: wait a "
                                 "minute, then try again.")
            while self._sum_all() + size > self.total:
                if not (self._evict_oldest(mine, now) or self._evict_oldest(self._oldest_elsewhere(), now)):
                    return 507, "The server's space for uploads is full: try again in a minute."
            return None

    @staticmethod
    def _sum(files) -> int:
        return sum(size for _, size in files.values())

    def _sum_all(self) -> int:
        return sum(self._sum(files) for files in self._files.values())

    def _oldest_elsewhere(self) -> collections.OrderedDict:
        owners = [files for files in self._files.values() if files]
        return min(owners, key=lambda files: next(iter(files.values()))[0]) if owners else collections.OrderedDict()

    def _evict_oldest(self, files: collections.OrderedDict, now: float) -> bool:
        if not files:
            return False
        path, (added, _) = next(iter(files.items()))
        if now - added < (UPLOAD_KEEP_SECONDS if self.keep_s is None else self.keep_s):
            return False
        files.pop(path)
        self._owner.pop(path, None)
        with contextlib.suppress(OSError):
            os.remove(path)
            os.rmdir(os.path.dirname(path))  # Gradio keeps each upload in a folder named by its hash
        return True

    def _forget_gone(self) -> None:
        """Drops the entries of files the cache sweep already deleted."""
        for client in list(self._files):
            files = self._files[client]
            for path in [p for p in files if not os.path.exists(p)]:
                files.pop(path)
                self._owner.pop(path, None)
            if not files:
                del self._files[client]


# The running app's ledger (made by its RequestLimits): the files the app writes itself on a client's behalf,
# inline `data:` images and fetched ones, count against the same caps as that client's uploads.
RUNNING_LEDGER: UploadLedger | None = None


def save_for_client(size: int, write) -> str:
    """Runs `write()` (which saves a file of `size` bytes and returns its path) within the current client's share
    of the upload cache and the cache's total, as an upload would be; past them, a refusal in one sentence."""
    ledger = RUNNING_LEDGER
    if ledger is None:  # the Python API, or an app launched without the page's limits
        return write()
    client = fair.current_client.get()
    address = client.address if client is not None else "?"
    refused = ledger.make_room(address, size)
    if refused:
        raise checks.refusal(refused[1])
    path = write()
    ledger.add(address, [path])
    return path


class UploadIds:
    """Gradio keeps progress state for every upload id it sees and frees it only when a progress stream reads it
    to the end; this frees it UPLOAD_ID_SECONDS after the last request that used the id."""

    def __init__(self):
        self._in_use: dict[str, int] = collections.defaultdict(int)

    @contextlib.contextmanager
    def using(self, upload_id: str | None):
        if upload_id is None:
            yield
            return
        self._in_use[upload_id] += 1
        try:
            yield
        finally:
            self._in_use[upload_id] -= 1
            if self._in_use[upload_id] <= 0:
                del self._in_use[upload_id]
                asyncio.get_running_loop().call_later(UPLOAD_ID_SECONDS, self._forget, upload_id)

    def _forget(self, upload_id: str) -> None:
        if upload_id in self._in_use:
            return
        from gradio.routes import file_upload_statuses

        file_upload_statuses._statuses.pop(upload_id, None)
        file_upload_statuses._signals.pop(upload_id, None)


class Heartbeats:
    """Open heartbeat connections (one per open page): one per session, `per_address` per client, `total` in all."""

    def __init__(self, total: int, per_address: int):
        self.total, self.per_address = total, per_address
        self._sessions: set[str] = set()
        self._addresses: dict[str, int] = collections.defaultdict(int)

    @classmethod
    def from_env(cls) -> Heartbeats:
        return cls(env_int("VIT_DEMO_MAX_PAGES", 512, 1), 64)

    def open(self, session: str, address: str) -> str | None:
        if session in self._sessions:
            return "This page is already open in another connection: reload it."
        if len(self._sessions) >= self.total:
            return f"The app has {len(self._sessions)} pages open, its limit: try again in a few minutes."
        if self._addresses[address] >= self.per_address:
            return f"{self._addresses[address]} pages of this app are open from your address: close some of them."
        self._sessions.add(session)
        self._addresses[address] += 1
        return None

    def close(self, session: str, address: str) -> None:
        self._sessions.discard(session)
        self._addresses[address] -= 1
        if self._addresses[address] <= 0:
            del self._addresses[address]


async def _read_body(receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _counting(receive, limit: int):
    """A body without a declared length is cut off (as a disconnect) once it passes `limit`."""
    seen = 0

    async def counted():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                return {"type": "http.disconnect"}
        return message

    return counted


def _session_hash_ok(body: bytes) -> bool:
    """Whether a JSON body's session_hash (however its key is escaped: the JSON is parsed, as Gradio parses it)
    is short enough."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return True  # not JSON (or nested past Python's limit): Gradio refuses it itself
    value = value.get("session_hash") if isinstance(value, dict) else None
    return not isinstance(value, str) or len(value) <= SESSION_HASH_CHARS


async def _reply(send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- connections --------------------------------------------------------------------------------------------------

class Connections:
    """The open connections of one server, oldest first, and their bounds (see `guarded_server`)."""

    def __init__(self, limit: int, head_s: float, body_idle_s: float):
        self.limit, self.head_s, self.body_idle_s = limit, head_s, body_idle_s
        self.open: collections.OrderedDict = collections.OrderedDict()
        self.closed_slow = self.refused = 0
        self._ticking = False

    @classmethod
    def from_env(cls) -> Connections:
        return cls(env_int("VIT_DEMO_MAX_CONNECTIONS", 1024, 16), env_int("VIT_DEMO_HEAD_SECONDS", 10, 1),
                   env_int("VIT_DEMO_BODY_IDLE_SECONDS", 30, 1))

    def admit(self, conn) -> bool:
        """Adds `conn`; at the cap, closes the oldest connection still sending its head, or refuses `conn`."""
        if len(self.open) >= self.limit:
            victim = next((c for c in self.open if c.conn.their_state is h11.IDLE), None)
            if victim is None:
                self.refused += 1
                return False
            self._close(victim)
        self.open[conn] = None
        if not self._ticking:
            self._ticking = True
            conn.loop.call_later(1.0, self._tick, conn.loop)
        return True

    def _tick(self, loop) -> None:
        """Closes the connections whose head took longer than `head_s`, or whose body stalled for `body_idle_s`."""
        now = time.monotonic()
        for c in list(self.open):
            state = c.conn.their_state
            if (state is h11.IDLE and now - c.cycle_start > self.head_s) or (
                    state is h11.SEND_BODY and not c.flow.read_paused and now - c.last_data > self.body_idle_s):
                self._close(c)
                self.closed_slow += 1
        if self.open:
            loop.call_later(1.0, self._tick, loop)
        else:
            self._ticking = False

    def _close(self, conn) -> None:
        self.open.pop(conn, None)
        conn.transport.abort()  # connection_lost follows: a request in progress sees http.disconnect


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the bounds of `Connections` (the class attribute `table`)."""

    table: Connections
    BUSY = b"The server has too many connections open: try again in a moment."

    def connection_made(self, transport) -> None:
        self.cycle_start = self.last_data = time.monotonic()
        super().connection_made(transport)
        if not self.table.admit(self):
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
                            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(self.BUSY), self.BUSY))
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self.cycle_start = time.monotonic()  # a kept-alive connection's next head has its own time limit
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self.table.open.pop(self, None)
        super().connection_lost(exc)


@contextlib.contextmanager
def guarded_server(table: Connections | None = None):
    """While active, the uvicorn servers that Gradio starts use `GuardedH11` with `table` (default: from the
    environment), and a short keep-alive. Gradio does not pass its own options to uvicorn, so this wraps
    uvicorn.Config for the launch."""
    table = table or Connections.from_env()
    protocol = type("GuardedH11", (GuardedH11,), {"table": table})
    original = uvicorn.Config

    class Config(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("http", protocol)
            kwargs.setdefault("timeout_keep_alive", 5)
            kwargs.setdefault("backlog", 4096)
            super().__init__(*args, **kwargs)  # this configures uvicorn's loggers: limit them after
            fair.limit_log()

    uvicorn.Config = Config
    try:
        yield table
    finally:
        uvicorn.Config = original


def sweep(folder: str | Path, older_than: float, keep: set[str] = frozenset()) -> int:
    """Deletes files under `folder` not changed for `older_than` seconds (but those in `keep`), then empty
    folders; returns how many files went."""
    now, removed = time.time(), 0
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if now - max(st.st_mtime, st.st_ctime) > older_than and path not in keep:
                    os.remove(path)
                    removed += 1
        if root != str(folder):
            with contextlib.suppress(OSError):
                os.rmdir(root)  # only succeeds when empty
    return removed


def cache_lifespan(folder: str, keep) -> contextlib.AbstractAsyncContextManager:
    """A FastAPI lifespan that sweeps `folder` every so often while the app runs; `keep()` names files to keep."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        lifetime = cache_seconds()
        every = max(1.0, min(60.0, lifetime / 4))

        async def loop():
            while True:
                await asyncio.sleep(every)
                try:
                    await asyncio.to_thread(sweep, folder, lifetime, keep())
                except Exception:  # a sweep that fails is retried on the next round
                    log.exception("Cleaning the upload cache failed.")

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan
