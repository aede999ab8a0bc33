"""What a raw HTTP request may cost the server, and how long its files stay.

`RequestLimits` (ASGI middleware) refuses, before the body is read: uploads over UPLOAD_BYTES in total per
request (Gradio's `max_file_size` counts each file alone), other bodies over BODY_BYTES, query strings over
QUERY_BYTES, and session hashes longer than SESSION_HASH_CHARS (Gradio keeps state per session hash).
`cache_lifespan` deletes every file in the upload cache once it is older than `VIT_DEMO_CACHE_SECONDS`
(uploads, results, and the bodies of refused uploads that Gradio leaves behind), except the examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("vit_demo.ui")

MB = 1024 * 1024
UPLOAD_BYTES = 21 * MB  # one 20 MB photo and its multipart framing
BODY_BYTES = 1 * MB  # JSON of an API call: file handles and a few numbers
QUERY_BYTES = 4096
SESSION_HASH_CHARS = 64
DEFAULT_CACHE_SECONDS = 3600


def cache_seconds() -> int:
    """VIT_DEMO_CACHE_SECONDS (default 3600): how long uploads and results stay in the cache."""
    try:
        return max(1, int(os.environ.get("VIT_DEMO_CACHE_SECONDS", DEFAULT_CACHE_SECONDS)))
    except ValueError:
        log.warning("VIT_DEMO_CACHE_SECONDS is not a whole number of seconds; using %d.", DEFAULT_CACHE_SECONDS)
        return DEFAULT_CACHE_SECONDS


class RequestLimits:
    """ASGI middleware bounding request bodies, query strings and session hashes (see module doc)."""

    def __init__(self, app, upload_bytes: int = UPLOAD_BYTES, body_bytes: int = BODY_BYTES):
        self.app, self.upload_bytes, self.body_bytes = app, upload_bytes, body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if len(scope.get("query_string", b"")) > QUERY_BYTES:
            return await _reply(send, 414, "The request's address is too long.")
        path = scope.get("path", "")
        limit = self.upload_bytes if path.rstrip("/").endswith("/upload") else self.body_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_large = (f"The request is larger than {limit // MB} MB: send a smaller file." if limit == self.upload_bytes else
                     f"The request is larger than {limit // MB} MB: upload images first (/gradio_api/upload) and send "
                     "only their handles.")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _reply(send, 413, too_large)
        if scope.get("method") == "POST" and limit == self.body_bytes:
            body = await _read_body(receive, limit)
            if body is None:
                return await _reply(send, 413, too_large)
            if not _session_hash_ok(body):
                return await _reply(send, 400, f"The session_hash must be at most {SESSION_HASH_CHARS} characters.")
            return await self.app(scope, _replay(body, receive), send)
        return await self.app(scope, _counting(receive, limit), send)


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
    if b"session_hash" not in body:
        return True
    try:
        value = json.loads(body).get("session_hash")
    except (ValueError, AttributeError):
        return True  # not JSON, or not an object: Gradio refuses it itself
    return not isinstance(value, str) or len(value) <= SESSION_HASH_CHARS


async def _reply(send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
