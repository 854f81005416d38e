"""Limits of the HTTP server against slow, lying and oversized clients (``[http]`` keys, times in seconds).

- **connections**: at most ``max_connections`` open at once; one beyond is answered ``503`` and closed before it is
  read (:func:`guarded_h11`): idle connections cannot take the file descriptors the DICOM side needs.
- **headers**: a connection must deliver a complete request head within ``header_timeout_s`` of connecting (or of
  its previous response); else it gets ``408`` and is closed (:func:`guarded_h11`, a uvicorn h11 protocol).
  uvicorn alone waits forever on a connection that trickles its headers, or sends nothing.
- **body**: ``Content-Length`` above ``max_body_mb`` is answered ``413`` before a byte of the body is read, and a
  body (chunked, or lying about its length) that grows past it is cut off with ``413``; a body that stalls for
  ``body_idle_timeout_s`` or takes longer than ``body_timeout_s`` in all gets ``408`` (:class:`BodyLimits`, an
  ASGI middleware around every route). Both answers close the connection.
- **responses**: a client must take what the node sends: when a connection's send buffer stays full (the client
  took less than the transport's window, 48 KiB, of a response) for ``write_timeout_s``, or bytes of a finished
  response are still unsent that long after it, the connection is aborted with one WARNING line
  (:func:`guarded_h11`). Without it a client asking for a whole series by WADO-RS (or a preview) and reading a
  byte a second held its connection, a ``max_connections`` slot and the open instance file for ever.

Reading stops at the limit, so memory and disk stay bounded by what the route itself keeps (STOW-RS streams to
the spool).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MB = 1024 * 1024
CLOSE = {"Connection": "close"}


class BodyLimitError(HTTPException):
    """A request body broke a limit: ``status_code`` 408 (too slow) or 413 (too large); ``detail`` says which
    limit, with the numbers."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=dict(CLOSE))


class BodyLimits:
    """ASGI middleware: the body limits of the module docstring for every HTTP request.

    ``max_body_bytes`` (0: none); ``idle_timeout_s``: longest wait for the next body bytes; ``total_timeout_s``:
    longest time to read the whole body (0: none). A broken limit is raised from ``receive`` as
    :class:`BodyLimitError` (routes may catch it to report what they did; Starlette answers it otherwise).
    Once the body is complete, ``receive`` passes through untouched (waiting for a disconnect is not limited).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, idle_timeout_s: float, total_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if self.max_body_bytes and declared is not None and declared > self.max_body_bytes:
            await _answer(send, 413, f"request body of {declared} bytes (Content-Length) is over "
                                     f"[http] max_body_mb = {self.max_body_bytes // MB}")
            _log_refusal(scope, 413, "Content-Length over max_body_mb")
            return
        start = time.monotonic()
        received = 0
        done = False

        async def limited() -> Message:
            nonlocal received, done
            if done:
                return await receive()
            wait = self.idle_timeout_s
            if self.total_timeout_s:
                left = start + self.total_timeout_s - time.monotonic()
                if left <= 0:
                    raise self._slow(scope, received, f"[http] body_timeout_s = {self.total_timeout_s:g}")
                wait = min(wait, left)
            try:
                message = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                total = self.total_timeout_s and time.monotonic() - start >= self.total_timeout_s
                limit = (f"[http] body_timeout_s = {self.total_timeout_s:g}" if total
                         else f"[http] body_idle_timeout_s = {self.idle_timeout_s:g}")
                raise self._slow(scope, received, limit, declared) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if self.max_body_bytes and received > self.max_body_bytes:
                    _log_refusal(scope, 413, "body over max_body_mb")
                    raise BodyLimitError(413, f"request body over [http] max_body_mb = "
                                              f"{self.max_body_bytes // MB} (read {received} bytes)")
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, limited, send)

    @staticmethod
    def _slow(scope: Scope, received: int, limit: str, declared: int | None = None) -> BodyLimitError:
        of = f" of {declared}" if declared is not None else ""
        _log_refusal(scope, 408, f"{limit}, {received}{of} bytes received")
        return BodyLimitError(408, f"request body too slow: {received}{of} bytes received, {limit}")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses such a request before it gets here
    return None


def _log_refusal(scope: Scope, status: int, why: str) -> None:
    client = scope.get("client") or ("?", 0)
    log.warning("HTTP %s %s from %s: %d (%s)", scope.get("method", ""), scope.get("path", ""), client[0], status, why)


async def _answer(send: Send, status: int, detail: str) -> None:
    body = ('{"error": "' + detail.replace('"', "'") + '"}').encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _Refusals:
    """Connections refused for ``[http] max_connections``: logged once, then at most once a minute with a count
    (one line per refused connection would let the flood write the node's log)."""

    def __init__(self) -> None:
        self.unlogged = 0
        self.logged_at: float | None = None

    def note(self, client: str, limit: int) -> None:
        self.unlogged += 1
        now = time.monotonic()
        if self.logged_at is not None and now - self.logged_at < 60:
            return
        log.warning("HTTP connection(s) refused with 503: %d open, [http] max_connections = %d (%d refused since "
                    "the last such line; the latest from %s)", limit, limit, self.unlogged, client)
        self.logged_at, self.unlogged = now, 0


def guarded_h11(header_timeout_s: float, max_connections: int = 0,
                write_timeout_s: float = 0.0) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on request heads: a connection that has not delivered a complete
    request head ``header_timeout_s`` seconds after it opened (or after its previous response) gets
    ``408 Request Timeout`` and is closed. With ``max_connections`` (> 0) a connection opened while that many are
    open gets ``503 Service Unavailable`` and is closed at once, before it is read (uvicorn's own
    ``limit_concurrency`` answers 503 only once a request head came, so idle connections kept their file
    descriptors: 1,100 of them took all 1,024 of a node under systemd's limit, and DICOM callers timed out).
    With ``write_timeout_s`` (> 0), a connection whose send buffer stays above the transport's high-water mark
    (asyncio's ``pause_writing`` without ``resume_writing``) that long, or that still holds unsent bytes that long
    after its response completed, is aborted (the route's ``send`` then returns, Starlette cancels the stream and
    its open file is closed). Pass as ``uvicorn.Config(http=...)``."""
    refusals = _Refusals()

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: Any = None
        _write_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if max_connections and len(self.connections) > max_connections:
                self._refuse(transport)
                return
            self._arm_head_deadline()

        def _refuse(self, transport: asyncio.Transport) -> None:
            refusals.note(self.client[0] if self.client else "?", max_connections)
            body = (f"too many connections: [http] max_connections = {max_connections} are open; try again "
                    "later\n").encode()
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                            b"retry-after: 1\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            transport.close()

        def on_response_complete(self) -> None:
            self._arm_head_deadline()  # before the next (maybe pipelined) request is parsed
            if write_timeout_s and self._write_timer is None and self.transport.get_write_buffer_size():
                self._write_timer = self.loop.call_later(write_timeout_s, self._write_deadline)
            super().on_response_complete()

        def pause_writing(self) -> None:
            super().pause_writing()
            if write_timeout_s:
                if self._write_timer is not None:
                    self._write_timer.cancel()
                self._write_timer = self.loop.call_later(write_timeout_s, self._write_deadline)

        def resume_writing(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().resume_writing()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._head_timer, self._write_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def _write_deadline(self) -> None:
            self._write_timer = None
            unsent = self.transport.get_write_buffer_size()
            if not unsent:
                return
            client = self.client[0] if self.client else "?"
            request = f"{self.cycle.scope.get('method', '')} {self.cycle.scope.get('path', '')}" if self.cycle else ""
            log.warning("HTTP connection from %s aborted: the client took too little of the response to %s for "
                        "[http] write_timeout_s = %g (%d bytes unsent)", client, request or "its request",
                        write_timeout_s, unsent)
            self.transport.abort()

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_deadline)

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self.cycle is not self._head_cycle or self.transport.is_closing():
                return  # a request head arrived since
            client = self.client[0] if self.client else "?"
            log.warning("HTTP connection from %s closed: no complete request head within [http] header_timeout_s "
                        "= %g", client, header_timeout_s)
            body = b"no complete request head within the header timeout\n"
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.transport.close()

    return GuardedH11Protocol
