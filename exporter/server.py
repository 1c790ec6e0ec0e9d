"""`gpu-router exporter`: serves the cluster's metrics on a threaded HTTP server.

`GET /metrics` (Prometheus text format; OpenMetrics when asked), `GET /` (a small page linking to /metrics),
`GET /healthz`. Each scrape polls the cluster (see exporter.collector). Served by waitress like the optimizer
(gpurouter.serve.wsgiserve): up to `THREADS` scrapes at once, more wait in a 1024-deep listen backlog. SIGTERM and
SIGINT stop the server cleanly.
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import html
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from exporter.collector import cluster_registry, exporter_version
from gpurouter import logfmt
from gpurouter.cluster.config import Config, find_config, load_config
from gpurouter.cluster.observe import Observer
from gpurouter.serve.listen import cannot_listen, parse_listen
from gpurouter.serve.wsgiserve import Served, serve
from gpurouter.urls import redact

DEFAULT_LISTEN = "127.0.0.1:9877"
THREADS = 8  # scrapes answered at once; more wait in the listen backlog (each scrape polls every node)
MAX_BODY = 64 * 1024  # the exporter answers GET only
M_ARENA_MAX = -8  # glibc mallopt parameter
log = logging.getLogger("gpu_router.exporter")

StartResponse = Callable[..., Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
        help=f"address to serve /metrics on (default {DEFAULT_LISTEN})",
    )


def landing_page(config: Config, version: str) -> bytes:
    nodes = "".join(f"<li>{html.escape(n.name)} — <code>{html.escape(redact(n.url))}</code></li>" for n in config.nodes)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>GPU Router exporter</title></head>"
        f"<body><h1>GPU Router exporter</h1><p>Version {html.escape(version)}.</p>"
        "<p><a href='/metrics'>Metrics</a> · <a href='/healthz'>Health</a></p>"
        f"<p>Nodes polled on each scrape:</p><ul>{nodes}</ul></body></html>"
    ).encode()


def exporter_app(config: Config, observer: Observer) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The WSGI application: /metrics from a private registry, the landing page and /healthz."""
    version = exporter_version()
    registry = cluster_registry(observer, version)
    page = landing_page(config, version)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"only GET\n", [("Allow", "GET, HEAD")])
        if path == "/metrics":
            return _metrics(registry, environ, start_response)
        if path == "/":
            return _reply(start_response, "200 OK", page, content_type="text/html; charset=utf-8")
        if path == "/healthz":
            return _reply(start_response, "200 OK", b"ok\n")
        return _reply(start_response, "404 Not Found", b"not found: try /metrics\n")

    return app


def _metrics(registry: CollectorRegistry, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    """A scrape: text format (OpenMetrics when asked), gzip at the fastest level when accepted (level 9, the
    client library's, costs more CPU than building the families)."""
    encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
    body = encoder(registry)
    headers = []
    if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
        body = gzip.compress(body, compresslevel=1)
        headers.append(("Content-Encoding", "gzip"))
    return _reply(start_response, "200 OK", body, headers, content_type)


def _reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
    content_type: str = "text/plain; charset=utf-8",
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])])
    return [body]


class ExporterServer:
    """The exporter being served (see gpurouter.serve.wsgiserve: a real backlog, bounded threads, idle timeouts); it
    owns the cluster observer."""

    def __init__(self, served: Served, observer: Observer) -> None:
        self.served = served
        self.observer = observer

    @property
    def url(self) -> str:
        return self.served.url

    def stop(self) -> None:
        """Stop serving, close the sockets and the observer's connections."""
        self.served.stop()
        self.observer.close()


def start_exporter(
    config: Config, host: str = "127.0.0.1", port: int = 0, observer: Observer | None = None, threads: int = THREADS
) -> tuple[ExporterServer, threading.Thread]:
    """Serve the exporter on (host, port) in background threads; port 0 picks a free one (`server.url`).

    Stop it with `server.stop()` and join the thread.
    """
    observer = observer or Observer(config)
    try:
        served = serve(
            exporter_app(config, observer), host, port, name="gpu-router-exporter", threads=threads,
            max_request_body_size=MAX_BODY,
        )  # fmt: skip
    except BaseException:
        observer.close()
        raise
    return ExporterServer(served, observer), served.thread


def limit_malloc_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas (8 × cores by default) before the poll's threads start: the hundreds of request
    threads would otherwise spread freed memory over that many arenas (about 10 MB more RSS on 2 cores, more on
    bigger machines). Allocation is serialized by the GIL anyway. False where the C library has no such setting."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, count))
    except (OSError, AttributeError):
        return False


def main(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    try:
        host, port = parse_listen(args.listen, DEFAULT_LISTEN)
    except ValueError as exc:
        print(f"gpu-router exporter: {exc}", file=sys.stderr)
        return 2
    config = load_config(find_config(args.config))
    limit_malloc_arenas()
    logfmt.setup(config.log_level)
    try:
        server, thread = start_exporter(config, host, port)
    except OSError as exc:
        print(f"gpu-router exporter: {cannot_listen(host, port, exc)}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logfmt.log_event(
        log, logging.INFO, "listening", url=f"{server.url}/metrics", nodes=len(config.nodes), config=config.source
    )
    stop.wait()
    logfmt.log_event(log, logging.INFO, "stopping", outcome="signal received")
    server.stop()
    thread.join(timeout=5)
    failed = server.served.failure is not None
    logfmt.log_event(log, logging.INFO, "stopped", outcome="the HTTP server failed" if failed else "ok")
    return 1 if failed else 0
