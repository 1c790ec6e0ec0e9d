"""A small HTTP/1.1 server on 127.0.0.1 that runs an app (Request → Response) in daemon threads.

It can be closed (listening socket and open connections) and reopened on the same port, which is how a
node goes "down" and comes back. Streaming bodies use chunked transfer encoding, as Go's server does.
One thread accepts for every server of the process, blocked in a selector over their listening sockets, so
an idle fleet of any size costs no CPU; each connection then gets its own thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from gpurouter.logfmt import event_line
from gpurouter.serve.listen import cannot_listen

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
MAX_BODY = 64 * 1024 * 1024
JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes


class Stream:
    """A streamed body; `on_close` runs exactly once, whether or not the body was sent in full."""

    def __init__(self, chunks: Iterable[bytes], on_close: Callable[[], None] | None = None) -> None:
        self._chunks = chunks
        self._on_close = on_close
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            closer = getattr(self._chunks, "close", None)
            if closer is not None:
                closer()
        finally:
            if self._on_close is not None:
                self._on_close()


@dataclass
class Response:
    status: int
    body: bytes | Stream = b""
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, data: object, content_type: str = JSON) -> Response:
    """Compact JSON, like Go's encoding/json."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return Response(status, text.encode(), content_type)


def error_response(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


def text_response(status: int, text: str) -> Response:
    return Response(status, text.encode(), TEXT)


App = Callable[[Request], Response]


class _Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # like Go's net/http (Ollama): no 40 ms delayed-ACK stall between header and body
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self) -> None:
        if self.server.refusing:
            self.close_connection = True
            return
        try:
            body = self._read_body()
        except ValueError as exc:
            self.close_connection = True
            self._write(error_response(400, str(exc)))
            return
        url = urlsplit(self.path)
        request = Request(self.command, url.path, parse_qs(url.query), body)
        try:
            response = self.server.app(request)
        except Exception as exc:  # the server never dies on a request
            log.exception(event_line("simulator.request", method=self.command, path=self.path, outcome="failure"))
            response = error_response(500, f"simulator error: {exc}")
        self._write(response)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ValueError("invalid Content-Length") from None
        if length < 0 or length > MAX_BODY:
            raise ValueError("invalid Content-Length")
        return self.rfile.read(length) if length else b""

    def _write(self, response: Response) -> None:
        body = response.body
        try:
            self.send_response_only(response.status)
            self.send_header("Date", self.date_time_string())
            self.send_header("Content-Type", response.content_type)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if isinstance(body, Stream):
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in body:
                    if chunk:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        finally:
            if isinstance(body, Stream):
                body.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096  # the listen backlog (socketserver's default is 5; Go's follows somaxconn)

    def __init__(self, port: int, app: App, name: str) -> None:
        self.app = app
        self.name = name
        self.refusing = False
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        super().__init__((HOST, port), _Handler)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        request.setblocking(True)  # some systems hand the listener's non-blocking mode on
        thread = threading.Thread(target=self._serve, args=(request, client_address), name=self.name, daemon=True)
        with self._lock:
            self._connections[request] = thread
        thread.start()

    def _serve(self, request: socket.socket, client_address: object) -> None:
        try:
            self.finish_request(request, client_address)  # type: ignore[arg-type]
        except OSError:
            pass
        except Exception:
            log.exception(event_line("simulator.connection", remote=str(client_address), outcome="failure"))
        finally:
            with self._lock:
                self._connections.pop(request, None)
            self.shutdown_request(request)

    def drop_connections(self, timeout: float) -> None:
        """Shut every open connection and wait (bounded) for its thread."""
        with self._lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        current = threading.current_thread()
        for _, thread in connections:
            if thread is not current:
                thread.join(timeout)


class _Acceptor:
    """The one thread that accepts connections for every open server: it blocks in a selector over their
    listening sockets (and a wake-up socket for adding and removing servers) — no polling."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector.register(self._wake_in, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._changes: list[tuple[_Server, bool, threading.Event]] = []
        self._thread: threading.Thread | None = None

    def add(self, server: _Server) -> None:
        self._change(server, True)

    def remove(self, server: _Server) -> None:
        """Stop accepting for `server`; returns once no accept for it can be under way."""
        self._change(server, False)

    def _change(self, server: _Server, add: bool) -> None:
        done = threading.Event()
        with self._lock:
            self._changes.append((server, add, done))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="simulator-accept", daemon=True)
                self._thread.start()
        with contextlib.suppress(BlockingIOError):  # a wake-up already pending does as well
            self._wake_out.send(b"!")
        done.wait()

    def _apply(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_in.recv(4096):
                pass
        with self._lock:
            changes, self._changes = self._changes, []
        for server, add, done in changes:
            if add:
                server.socket.setblocking(False)
                self._selector.register(server.socket, selectors.EVENT_READ, server)
            else:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(server.socket)
            done.set()

    def _run(self) -> None:
        while True:
            try:
                events = self._selector.select()
                for key, _ in events:  # accept first: a server is removed only after its pending accept
                    if key.data is not None:
                        key.data._handle_request_noblock()
                if any(key.data is None for key, _ in events):
                    self._apply()
            except Exception:  # the acceptor never dies
                log.exception(event_line("simulator.accept", outcome="failure"))


_ACCEPTOR = _Acceptor()


class HttpServer:
    """An app served on 127.0.0.1:`port` (0 = ephemeral); `close()` then `open()` keeps the port."""

    def __init__(self, app: App, port: int = 0, name: str = "http") -> None:
        self._app = app
        self.port = port
        self._name = name
        self._server: _Server | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def is_open(self) -> bool:
        return self._server is not None

    def open(self) -> None:
        """Bind and serve (OSError if the port is taken); a no-op when already open."""
        with self._lock:
            if self._server is not None:
                return
            try:
                server = _Server(self.port, self._app, self._name)
            except OSError as exc:  # name the port: "Address already in use" alone does not say which
                raise OSError(exc.errno, cannot_listen(HOST, self.port, exc)) from None
            self.port = server.server_address[1]
            self._server = server
            _ACCEPTOR.add(server)

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting (connections are then refused), drop open connections, join the threads."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.refusing = True
        _ACCEPTOR.remove(server)
        server.server_close()
        server.drop_connections(timeout)
