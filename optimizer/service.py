"""`gpu-router optimizer`: the webhook, the JSON API, the job workers and the reconcile loop in one process.

Served by waitress (threads). SIGTERM or SIGINT stops it within a few seconds: no new request, job or step
is taken and no further call goes to a node; a load already sent finishes on its node, and the CPU copy it
was to replace stays (a copy is only ever removed after its replacement is verified on GPU).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import queue
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from logging.handlers import QueueHandler, QueueListener

from flask import Flask

from exporter import logfmt
from exporter.config import Config, find_config, load_config
from exporter.observe import Observer
from exporter.server import parse_listen
from exporter.wsgiserve import Served, serve
from optimizer import webhook
from optimizer.app import create_app
from optimizer.auth import Authenticator
from optimizer.jobs import JobQueue, Metrics, Remediator, RunJob, log_event
from optimizer.reconcile import Reconciler

DEFAULT_LISTEN = "127.0.0.1:9878"
THREADS = 16  # waitress request threads; handlers never block on Ollama except the cached reads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
        help=f"address to serve on (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen without webhook credentials (optimizer.webhook_auth)",
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class OptimizerHandle:
    """A running optimizer: `url` to reach it, `stop()` to end every thread it started."""

    url: str
    app: Flask
    queue: JobQueue
    reconciler: Reconciler | None
    _served: Served
    _close: list[Callable[[], None]] = field(default_factory=list)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests, jobs and steps; wait up to `timeout` for the work in flight. Idempotent."""
        if not self._served.serving:
            return
        self.queue.stopping.set()  # from now on no call goes to a node
        if self.reconciler is not None:
            self.reconciler.stop(timeout)
        self._served.stop(timeout)
        if not self.queue.stop(timeout):
            log_event(logging.WARNING, "stop", outcome="a job was still running; abandoned")
        for close in self._close:
            close()
        self._close.clear()


def start_optimizer(
    config: Config,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    auth: Authenticator | None = None,
    observer: Observer | None = None,
    run_job: RunJob | None = None,
    reconcile: bool = True,
    threads: int = THREADS,
    state_max_age: float = 1.0,
) -> OptimizerHandle:
    """Serve the optimizer in background threads (port 0 = any free port) and return its handle."""
    stop = threading.Event()
    owned = observer is None
    observer = observer or Observer(config)
    metrics = Metrics()
    job = run_job or Remediator(config, observer, dry_run=not config.auto_optimize, stop=stop)
    queue = JobQueue(config, job, metrics=metrics, stop=stop).start()
    reconciler = None
    if reconcile:
        leftovers = job.leftovers if isinstance(job, Remediator) else list
        reconciler = Reconciler(config, observer, queue, metrics=metrics, leftovers=leftovers)
    app = create_app(
        config,
        observer=observer,
        queue=queue,
        metrics=metrics,
        auth=auth,
        state_max_age=state_max_age,
        reconciler=reconciler,
    )
    # waitress buffers a body before the app sees it: cap that well above the app's own JSON-answered limit
    served = serve(
        app,
        host,
        port,
        name="gpu-router-optimizer",
        threads=threads,
        json_errors=True,
        max_request_body_size=4 * webhook.MAX_BODY,
    )
    if reconciler is not None:
        reconciler.start()
    handle = OptimizerHandle(url=served.url, app=app, queue=queue, reconciler=reconciler, _served=served)
    if owned:
        handle._close.append(observer.close)
    return handle


def setup_logging(level: str) -> QueueListener:
    """One line per event on stderr in the format of every service (exporter.logfmt).

    Lines are written by a thread of their own: a request thread that waited on the log's file would hand
    the interpreter lock to waitress's busy I/O loop and wait for it back, which under a burst of
    notifications multiplies the answer time. The caller stops the returned listener to flush the log.
    """
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [QueueHandler(records)]
    root.setLevel(level)
    # waitress warns once per request queued behind busy threads; a burst of notifications is routine here.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    listener = QueueListener(records, logfmt.handler())
    listener.start()
    return listener


def main(args: argparse.Namespace) -> int:
    try:
        host, port = parse_listen(args.listen, DEFAULT_LISTEN)
    except ValueError as exc:
        print(f"gpu-router optimizer: {exc}", file=sys.stderr)
        return 2
    config = load_config(find_config(args.config))
    auth = Authenticator(config.optimizer.webhook_auth)
    if not auth.enabled and not is_loopback(host) and not args.insecure:
        print(
            f"gpu-router optimizer: refusing to listen on {host}: no webhook credentials are configured "
            "(optimizer.webhook_auth), so anyone who reaches it could make it load and unload models; "
            "configure a bearer token or basic auth, listen on 127.0.0.1, or pass --insecure",
            file=sys.stderr,
        )
        return 2
    listener = setup_logging(config.log_level)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            handle = start_optimizer(config, host, port, auth=auth)
        except OSError as exc:
            print(f"gpu-router optimizer: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        log_event(
            logging.INFO,
            "listening",
            url=handle.url,
            auto_optimize=config.auto_optimize,
            auth=auth.scheme or "none",
            check_interval=config.check_interval,
        )
        while not stop.wait(0.5):
            pass
        log_event(logging.INFO, "stopping", outcome="signal received")
        handle.stop()
        log_event(logging.INFO, "stopped", outcome="ok")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.stop()
