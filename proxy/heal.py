"""Asking the optimizer to put a priority model back on GPU when the proxy is about to serve it off GPU.

Through a running optimizer's API (`proxy.optimizer_url`: POST /api/v1/optimize with the credentials of
`optimizer.webhook_auth`), or, without one, in-process with the optimizer's own job queue and `Remediator`
(only when `auto_optimize` is on). Either way one model is asked at most once per ASK_INTERVAL seconds; the
optimizer itself joins a request for a model whose job is already queued or running.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from gpurouter import logfmt
from gpurouter.act.jobs import JobQueue, Remediator
from gpurouter.cluster.config import Config, model_key
from gpurouter.cluster.observe import Observer

log = logging.getLogger(__name__)

ASK_INTERVAL = 10.0


class Healer:
    """`ask(model)` never blocks and never raises; `close()` stops what it started."""

    def __init__(self, config: Config, observer: Observer) -> None:
        self.config = config
        self.mode = "api" if config.proxy.optimizer_url else ("in_process" if config.auto_optimize else "off")
        self._asked: dict[str, float] = {}
        self._lock = threading.Lock()
        self._queue: JobQueue | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._headers: dict[str, str] = {}
        if self.mode == "in_process":
            self._queue = JobQueue(config, Remediator(config, observer), by="proxy").start()
        elif self.mode == "api":
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heal")
            self._headers = _credentials(config)

    def ask(self, model: str) -> bool:
        """Ask for `model` unless it was asked within ASK_INTERVAL; True when asked now."""
        key = model_key(model)
        now = time.monotonic()
        with self._lock:
            if self.mode == "off" or now - self._asked.get(key, -ASK_INTERVAL) < ASK_INTERVAL:
                return False
            self._asked[key] = now
        if self._queue is not None:
            self._queue.submit(key, source="proxy")
        elif self._pool is not None:
            self._pool.submit(self._post, key)
        return True

    def _post(self, model: str) -> None:
        url = f"{self.config.proxy.optimizer_url}/api/v1/optimize"
        try:
            reply = requests.post(
                url, json={"models": [model]}, headers=self._headers, timeout=10, allow_redirects=False
            )
            outcome = "queued" if reply.status_code == 202 else f"HTTP {reply.status_code}: {reply.text[:200]}"
        except requests.RequestException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        logfmt.log_event(log, logging.INFO, "proxy.heal", model=model, optimizer=url, outcome=outcome)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.stop(5.0)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _credentials(config: Config) -> dict[str, str]:
    """The Authorization header the optimizer's write endpoints demand (its webhook_auth), if any."""
    auth = config.optimizer.webhook_auth
    if auth.bearer_token is not None:
        return {"Authorization": f"Bearer {auth.bearer_token.resolve()}"}
    if auth.username is not None and auth.password is not None:
        pair = f"{auth.username}:{auth.password.resolve()}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
    return {}
