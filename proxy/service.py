"""`gpu-router proxy`: one Ollama endpoint for the cluster (asyncio: aiohttp server and client, one event loop).

Why asyncio: the proxy mostly waits — on nodes that generate a few dozen tokens a second, for minutes — and
holds one client and one node connection per stream. A thread per stream (Flask on waitress) needs a thread
and its stack for each of them and hands the interpreter lock around on every chunk; one event loop holds a
thousand streams in one thread on two cores. The routing decision stays the synchronous pure code of
`gpurouter.decide.placement` (called on the loop: it takes microseconds), and the cluster poll stays the exporter's
`Observer`, run in a worker thread every `proxy.refresh_interval`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import signal
import sys
import threading
from dataclasses import dataclass, replace

from aiohttp import web

from gpurouter import logfmt
from gpurouter.cluster.config import Config, find_config, load_config
from gpurouter.cluster.observe import Observer
from gpurouter.serve.auth import Authenticator
from gpurouter.serve.listen import cannot_listen, open_listen_refusal, parse_listen
from gpurouter.urls import authority
from proxy import limits
from proxy.app import Proxy
from proxy.heal import Healer
from proxy.metrics import ProxyMetrics
from proxy.view import ClusterView

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:11435"
BACKLOG = 4096  # connections waiting to be accepted: a burst of a thousand clients is routine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN, help=f"address to serve on (default {DEFAULT_LISTEN})"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen without a bearer token (proxy.auth)",
    )


@dataclass
class Running:
    """What one running proxy holds."""

    proxy: Proxy
    runner: web.AppRunner
    observer: Observer
    healer: Healer
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()
        self.healer.close()
        self.observer.close()


async def open_proxy(config: Config, host: str, port: int, *, heal: bool = True) -> Running:
    """Poll the cluster once, then listen (port 0 = any free port)."""
    raise_open_files_limit()
    observer = Observer(config)
    healer = Healer(config, observer) if heal else Healer(_no_heal(config), observer)
    proxy = Proxy(
        config,
        ClusterView(config, observer),
        healer,
        ProxyMetrics([n.name for n in config.nodes]),
        Authenticator(config.proxy.auth),
    )
    asyncio.get_running_loop().set_exception_handler(limits.accept_errors())
    runner = web.AppRunner(
        proxy.application(),
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=limits.HEADER_TIMEOUT,
        lingering_time=limits.LINGERING_TIME,
        logger=limits.server_logger(),
    )
    try:
        await runner.setup()
        site = limits.LimitedSite(runner, host, port, limit=limits.connection_limit(), backlog=BACKLOG)
        await site.start()
    except BaseException:
        await runner.cleanup()
        healer.close()
        observer.close()
        raise
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Running(proxy, runner, observer, healer, bound)


def _no_heal(config: Config) -> Config:
    return replace(config, auto_optimize=False, proxy=replace(config.proxy, optimizer_url=None))


def raise_open_files_limit() -> None:
    """Two sockets per stream: lift the soft limit on open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class ProxyHandle:
    """A proxy served by its own event loop in a background thread (tests, the demo, the benchmark)."""

    url: str
    running: Running
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.running.close(), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)


def start_proxy(config: Config, host: str = "127.0.0.1", port: int = 0, *, heal: bool = True) -> ProxyHandle:
    """Serve the proxy from a background thread and return once it listens."""
    loop = asyncio.new_event_loop()
    started: dict[str, object] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["running"] = loop.run_until_complete(open_proxy(config, host, port, heal=heal))
        except BaseException as exc:
            started["error"] = exc
            ready.set()
            loop.close()
            return
        ready.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name="gpu-router-proxy", daemon=True)
    thread.start()
    ready.wait()
    if "error" in started:
        raise started["error"]  # type: ignore[misc]
    running: Running = started["running"]  # type: ignore[assignment]
    return ProxyHandle(f"http://{authority(host, running.port)}", running, loop, thread)


def main(args: argparse.Namespace) -> int:
    try:
        host, port = parse_listen(args.listen, DEFAULT_LISTEN)
    except ValueError as exc:
        print(f"gpu-router proxy: {exc}", file=sys.stderr)
        return 2
    config = load_config(find_config(args.config))
    refusal = open_listen_refusal(
        "proxy",
        host,
        Authenticator(config.proxy.auth).enabled,
        args.insecure,
        missing="bearer token is configured (proxy.auth)",
        risk="use every node",
        fix="configure one",
    )
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    listener = logfmt.setup_queued(config.log_level)
    try:
        return asyncio.run(_serve(config, host, port))
    finally:
        listener.stop()


async def _serve(config: Config, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        running = await open_proxy(config, host, port)
    except OSError as exc:
        print(f"gpu-router proxy: {cannot_listen(host, port, exc)}", file=sys.stderr)
        return 1
    logfmt.log_event(
        log,
        logging.INFO,
        "listening",
        url=f"http://{authority(host, running.port)}",
        nodes=len(config.nodes),
        heal=running.healer.mode,
        auth="Bearer" if running.proxy.auth.enabled else "none",
    )
    await stop.wait()
    logfmt.log_event(log, logging.INFO, "stopping", outcome="signal received")
    await running.close()
    logfmt.log_event(log, logging.INFO, "stopped", outcome="ok")
    return 0
