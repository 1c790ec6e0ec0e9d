"""What the proxy grants a client before its request is whole: time for the headers and the body, a share of
the open connections, a share of the memory that bodies take, and one log line when it misbehaves.

- Headers: a connection that has not sent a whole request line and headers within `HEADER_TIMEOUT` seconds of
  opening (or of its previous answer: an idle keep-alive connection) is closed (aiohttp's keep-alive timer).
- Body: a routed request's body must arrive within `BODY_TIMEOUT` seconds (408 otherwise), and all the bodies
  being read or held at once stay under `BODY_BUDGET` bytes (503 with Retry-After otherwise); after such an
  answer the connection closes (at most `LINGERING_TIME` seconds later).
- Connections: at most `connection_limit()` client connections are open at once (two descriptors each, with
  the node connection); one over it is answered 503 and closed before anything is read, so the process never
  runs out of descriptors.
- Logs: a malformed request is one WARNING line (no traceback); asyncio's "socket.accept() out of system
  resource" is logged at most once per `ACCEPT_LOG_INTERVAL` seconds, with how many were left out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import http_exceptions, web

from gpurouter import logfmt
from gpurouter.units import MIB, body_too_large

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 15.0
BODY_TIMEOUT = 60.0
BODY_BUDGET = 128 * MIB  # at least one body of proxy.max_body
LINGERING_TIME = 2.0  # seconds the rest of a refused body is read and dropped, so its client sees the answer
ACCEPT_LOG_INTERVAL = 10.0
_RESERVE = 64  # descriptors kept for the listening socket, logs, the poll's own connections
_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def connection_limit() -> int:
    """Client connections at once: half the descriptors this process may open (each stream also holds a node
    connection), less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - _RESERVE) // 2) if soft != resource.RLIM_INFINITY else 1 << 20


class Refused(Exception):
    """A request body not taken: the HTTP status and the message to answer."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass
class _Taken:
    """The bytes of the budget one request holds."""

    size: int = 0


class BodyBudget:
    """The request bytes held at once, across every request; each request's share is given back when its
    handler ends (aiohttp runs each request in a task of its own)."""

    def __init__(self, max_body: int) -> None:
        self.limit = max(BODY_BUDGET, max_body)
        self.held = 0

    async def read(self, request: web.Request, max_body: int) -> bytes:
        """The whole body; Refused when over `max_body` (413), over the budget (503) or late (408)."""
        if request.content_length is not None and request.content_length > max_body:
            raise Refused(413, body_too_large(request.content_length, max_body, "proxy.max_body"))
        taken = _Taken()
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(lambda _: self._give(taken.size))
        self._take(taken, request.content_length or 0)
        chunks: list[bytes] = []

        async def whole() -> bytes:
            size = 0
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > max_body:
                    raise Refused(413, body_too_large(None, max_body, "proxy.max_body"))
                if size > taken.size:
                    self._take(taken, size - taken.size)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(whole(), BODY_TIMEOUT)
        except asyncio.TimeoutError:
            raise Refused(408, f"request body not received within {BODY_TIMEOUT:g}s") from None

    def _take(self, taken: _Taken, size: int) -> None:
        if self.held + size > self.limit:
            message = f"the proxy holds {self.held // MIB} MiB of request bodies, its limit; try again shortly"
            raise Refused(503, message, {"Retry-After": "1"})
        self.held += size
        taken.size += size

    def _give(self, size: int) -> None:
        self.held -= size


class LimitedSite(web.TCPSite):
    """A TCP site that answers a connection beyond `limit` open ones with 503 and closes it unread."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, limit: int, backlog: int) -> None:
        super().__init__(runner, host, port, backlog=backlog, reuse_address=True)
        self.limit = limit
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            if len(server.connections) < self.limit:
                return server()
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                logfmt.log_event(log, logging.WARNING, "proxy.connections", limit=self.limit, refused=self.refused)
            return _Full()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol, self._host, self._port, backlog=self._backlog, reuse_address=True
        )


class _Full(asyncio.Protocol):
    """The answer to a connection over the limit: 503, then the connection ends as soon as the client closes its
    side, at most LINGERING_TIME seconds later (what it sent is dropped; closing at once would reset it before
    the client read the answer)."""

    _BODY = b'{"error":"too many connections to the gpu-router proxy"}'
    _ANSWER = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._ANSWER)
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(LINGERING_TIME, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger: a request it cannot parse is one WARNING line; anything else as aiohttp logs it."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, http_exceptions.HttpProcessingError):
            remote = args[0] if args else ""
            reason = " ".join(str(exc_info.message or exc_info).split())[:200]
            logfmt.log_event(log, logging.WARNING, "proxy.bad_request", remote=remote, reason=reason)
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kwargs)


def server_logger() -> ServerLog:
    return ServerLog(logging.getLogger("aiohttp.server"), {})


def accept_errors(clock: Callable[[], float] = time.monotonic) -> Callable[[asyncio.AbstractEventLoop, dict], None]:
    """A loop exception handler: out-of-descriptor accept errors logged at most once per ACCEPT_LOG_INTERVAL s
    (one WARNING line, with how many were left out); anything else as asyncio logs it."""
    last = float("-inf")
    left_out = 0

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal last, left_out
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRORS and "accept" in context.get("message", "")):
            loop.default_exception_handler(context)
            return
        now = clock()
        if now - last < ACCEPT_LOG_INTERVAL:
            left_out += 1
            return
        logfmt.log_event(log, logging.WARNING, "proxy.accept", error=exc.strerror, same_errors_left_out=left_out)
        last, left_out = now, 0

    return handle
