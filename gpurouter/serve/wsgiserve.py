"""Serving a WSGI application on waitress, the same way for the exporter and the optimizer.

One I/O thread accepts and reads every connection; a bounded pool of `threads` runs the requests. The listen
backlog is `BACKLOG` (a burst of scrapes waits there instead of having its SYNs dropped), an idle keep-alive
connection holds no thread and is closed after `IDLE_TIMEOUT` seconds, and at most `CONNECTION_LIMIT`
connections are open at once (further ones wait in the backlog). With `json_errors`, the answers waitress
makes itself — 400 malformed request, 413 body too large, 431 headers too large, 501 transfer encoding not
supported — are `{"error": "..."}` with `Content-Type: application/json`, like the application's own.

The I/O loop waits with poll(), not waitress's default select(): select() cannot watch a descriptor numbered
1024 or above, and a process that polls a thousand nodes holds that many sockets (the loop would die with
"filedescriptor out of range in select()"). Should the loop die all the same, the process is told to stop
(SIGTERM, the error logged) and `Served.failure` holds the error: a server that no longer answers never keeps
running.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask

from gpurouter import logfmt
from gpurouter.units import body_too_large
from gpurouter.urls import authority

log = logging.getLogger(__name__)

BACKLOG = 1024
IDLE_TIMEOUT = 60  # seconds a connection may stay idle (Prometheus keeps one per target between scrapes)
CONNECTION_LIMIT = 512


class _JsonErrorTask(ErrorTask):
    """waitress's error answer, as JSON: `{"error": "Header Fields Too Large: …"}`; a body over its buffer
    limit is refused in the application's words, naming the application's limit (`body_too_large`)."""

    def execute(self) -> None:
        error = self.request.error
        if error.code == 413:
            message = body_too_large(self.request.content_length, self.channel.server.body_limit)
        else:
            message = f"{error.reason}: {error.body}"
        body = json.dumps({"error": message}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _JsonErrorChannel(HTTPChannel):
    error_task_class = _JsonErrorTask


class Served:
    """A WSGI application served in background threads: `url`, `port`, and `stop()`."""

    def __init__(self, server: Any, name: str) -> None:
        self._server = server
        self._serving = threading.Event()
        self._serving.set()
        self.failure: BaseException | None = None  # what ended the I/O loop while serving
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name=f"{name}-http", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    @property
    def url(self) -> str:
        return f"http://{authority(str(self._server.effective_host), self.port)}"

    @property
    def serving(self) -> bool:
        """True until `stop()` (also after the loop died: `failure` says why)."""
        return not self._closed

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, wait up to `timeout` for the requests being answered, close every socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._serving.clear()
        self._server.pull_trigger()  # wakes the loop, which sees the flag and returns
        self.thread.join(timeout)
        self._server.task_dispatcher.shutdown(timeout=timeout)
        wasyncore.close_all(self._server._map)  # the listening socket, open connections, the trigger

    def _loop(self) -> None:
        """waitress's I/O loop, one pass at a time while serving. Its sockets are closed by `stop` once this
        thread has ended (closing them from inside the loop would race with threads pulling its trigger)."""
        adj = self._server.adj
        try:
            while self._serving.is_set():
                wasyncore.loop(adj.asyncore_loop_timeout, adj.asyncore_use_poll, self._server._map, count=1)
        except Exception as exc:
            self.failure = exc
            logfmt.log_event(
                log, logging.ERROR, "http.failed", error=f"{type(exc).__name__}: {exc}", outcome="stopping"
            )
            os.kill(os.getpid(), signal.SIGTERM)


def serve(
    app: Callable[..., Any],
    host: str,
    port: int,
    *,
    name: str,
    threads: int,
    json_errors: bool = False,
    max_request_body_size: int = 1024 * 1024,
    body_limit: int | None = None,
) -> Served:
    """Serve `app` on (host, port) (port 0 = any free port); OSError when the address cannot be bound.

    `body_limit`: the limit a 413 names (the application's own, when waitress buffers more than it accepts)."""
    server = create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        ident=name,
        backlog=BACKLOG,
        channel_timeout=IDLE_TIMEOUT,
        cleanup_interval=min(10, IDLE_TIMEOUT),
        connection_limit=CONNECTION_LIMIT,
        asyncore_use_poll=True,
        max_request_body_size=max_request_body_size,
        clear_untrusted_proxy_headers=True,
    )
    server.body_limit = body_limit or max_request_body_size
    if json_errors:
        server.channel_class = _JsonErrorChannel
    return Served(server, name)
