"""`gpu-router optimizer`: the webhook, the JSON API, the job workers and the reconcile loop in one process.

Served by waitress (threads). SIGTERM or SIGINT stops it within a few seconds: no new request, job or step
is taken and no further call goes to a node; the work in flight gets `STOP_TIMEOUT` seconds in all, then the
process exits without it. A load already sent finishes on its node, and the CPU copy it was to replace stays
(a copy is only ever removed after its replacement is verified on GPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import Flask

from gpurouter import logfmt
from gpurouter.act.demandplan import Planner
from gpurouter.act.jobs import JobQueue, Metrics, Remediator, RunJob, log_event
from gpurouter.cluster.config import Config, find_config, load_config
from gpurouter.cluster.demandfeed import DemandFeed
from gpurouter.cluster.observe import Observer
from gpurouter.serve.auth import Authenticator
from gpurouter.serve.listen import cannot_listen, open_listen_refusal, parse_listen
from gpurouter.serve.wsgiserve import Served, serve
from gpurouter.urls import redact
from optimizer import webhook
from optimizer.app import create_app
from optimizer.reconcile import Reconciler

DEFAULT_LISTEN = "127.0.0.1:9878"
THREADS = 16  # waitress request threads; handlers never block on Ollama except the cached reads
STOP_TIMEOUT = 3.0  # seconds a stop waits in all for the work in flight (systemd's TimeoutStopSec is 15)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


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


@dataclass
class OptimizerHandle:
    """A running optimizer: `url` to reach it, `stop()` to end every thread it started."""

    url: str
    app: Flask
    queue: JobQueue
    reconciler: Reconciler | None
    _served: Served
    demand: str = "off"  # where placement from demand reads the proxy's demand, and how often; or off
    _close: list[Callable[[], None]] = field(default_factory=list)

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop taking requests, jobs and steps; wait `timeout` seconds in all for the work in flight.
        False when a job was still running then (a load on its way to a node: it is abandoned, and no step of
        its job follows, so the copy it was to replace stays). Idempotent."""
        if not self._served.serving:
            return True
        deadline = time.monotonic() + timeout
        self.queue.stopping.set()  # from now on no call goes to a node
        if self.reconciler is not None:
            self.reconciler.stop(_left(deadline))
        self._served.stop(_left(deadline))
        finished = self.queue.stop(_left(deadline))
        if not finished:
            log_event(logging.WARNING, "stop", outcome="a job was still running; abandoned")
        for close in self._close:
            close()
        self._close.clear()
        return finished


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
    feed = DemandFeed(config)
    metrics = Metrics(demand=feed.active)
    planner = Planner(config, feed)
    job = run_job or Remediator(config, observer, dry_run=not config.auto_optimize, stop=stop, planner=planner)
    queue = JobQueue(config, job, metrics=metrics, stop=stop).start()
    reconciler = None
    if reconcile:
        leftovers = job.leftovers if isinstance(job, Remediator) else list
        reconciler = Reconciler(config, observer, queue, metrics=metrics, leftovers=leftovers, planner=planner)
    app = create_app(
        config,
        observer=observer,
        queue=queue,
        metrics=metrics,
        auth=auth,
        state_max_age=state_max_age,
        reconciler=reconciler,
        planner=planner,
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
        body_limit=webhook.MAX_BODY,
    )
    if reconciler is not None:
        reconciler.start()
    handle = OptimizerHandle(url=served.url, app=app, queue=queue, reconciler=reconciler, _served=served)
    handle._close.append(feed.close)
    if feed.active:
        handle.demand = f"{redact(config.demand.proxy_url or '')} every {config.demand.interval:g}s"
    if owned:
        handle._close.append(observer.close)
    return handle


def main(args: argparse.Namespace) -> int:
    try:
        host, port = parse_listen(args.listen, DEFAULT_LISTEN)
    except ValueError as exc:
        print(f"gpu-router optimizer: {exc}", file=sys.stderr)
        return 2
    config = load_config(find_config(args.config))
    auth = Authenticator(config.optimizer.webhook_auth)
    refusal = open_listen_refusal(
        "optimizer",
        host,
        auth.enabled,
        args.insecure,
        missing="webhook credentials are configured (optimizer.webhook_auth)",
        risk="make it load and unload models",
        fix="configure a bearer token or basic auth",
    )
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    listener = logfmt.setup_queued(config.log_level)
    # waitress warns once per request queued behind busy threads; a burst of notifications is routine here.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    finished = True
    failed = False
    try:
        try:
            handle = start_optimizer(config, host, port, auth=auth)
        except OSError as exc:
            print(f"gpu-router optimizer: {cannot_listen(host, port, exc)}", file=sys.stderr)
            return 1
        log_event(
            logging.INFO,
            "listening",
            url=handle.url,
            auto_optimize=config.auto_optimize,
            auth=auth.scheme or "none",
            check_interval=config.check_interval,
            demand=handle.demand,
        )
        while not stop.wait(0.5):
            pass
        log_event(logging.INFO, "stopping", outcome="signal received")
        failed = handle._served.failure is not None
        finished = handle.stop()
        outcome = "the HTTP server failed" if failed else "ok" if finished else "work in flight abandoned"
        log_event(logging.INFO, "stopped", outcome=outcome)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.stop()
    if not finished:
        _exit_now(1 if failed else 0)
    return 1 if failed else 0


def _exit_now(status: int) -> None:
    """End the process without waiting for the work abandoned on stop. A load request can take minutes and runs
    in a pool thread, which Python would wait for at exit; everything that matters is stopped and the log flushed
    by now, and the copy the load was to replace is never removed (its job takes no further step)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
