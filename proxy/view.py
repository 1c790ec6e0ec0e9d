"""The proxy's picture of the cluster: the last background poll plus its own traffic (asyncio, one loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

from gpurouter.cluster.config import Config, model_key
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.state import ClusterState
from gpurouter.decide.choose import Traffic

log = logging.getLogger(__name__)


class ClusterView:
    """Polls the cluster every `proxy.refresh_interval` in a worker thread (the exporter's Observer) and counts
    what the proxy does in between: requests in flight per node and model, cold loads it caused (until a poll
    shows them), nodes that failed (until a poll that started after the failure sees them up)."""

    def __init__(self, config: Config, observer: Observer) -> None:
        self.config = config
        self.observer = observer
        self.state: ClusterState | None = None
        self._flights: Counter[tuple[str, str]] = Counter()
        self._loading: dict[tuple[str, str], float] = {}  # (node, model) → when sent (monotonic)
        self._loaded: dict[tuple[str, str], float] = {}  # (node, model) → when its cold request ended (wall)
        self._failing: dict[str, float] = {}  # node → when it failed (wall clock)
        self._fresh = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The first poll, then the background loop."""
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.proxy.refresh_interval)
            try:
                await self.refresh()
            except Exception:  # a poll never raises for a bad node; anything else is logged and retried
                log.exception("event=refresh outcome=failed")

    async def refresh(self) -> None:
        state = await asyncio.get_running_loop().run_in_executor(None, self.observer.poll)
        for key in list(self._loading):
            node = state.node(key[0])
            seen = node is not None and node.loaded_model(key[1]) is not None
            polled_after = state.taken_at > self._loaded.get(key, float("inf"))  # the load is over either way
            if seen or polled_after or time.monotonic() - self._loading[key] > self.config.proxy.read_timeout:
                del self._loading[key]
                self._loaded.pop(key, None)
        for name, failed_at in list(self._failing.items()):
            if state.taken_at > failed_at:
                del self._failing[name]
        self.state = state
        async with self._fresh:
            self._fresh.notify_all()

    async def next_refresh(self, timeout: float) -> bool:
        """Wait for the next poll, at most `timeout` seconds; False on timeout."""
        try:
            async with self._fresh:
                await asyncio.wait_for(self._fresh.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def traffic(self) -> Traffic:
        in_flight: Counter[str] = Counter()
        for (node, _), count in self._flights.items():
            in_flight[node] += count
        return Traffic(
            in_flight=dict(in_flight),
            busy=frozenset(k for k, v in self._flights.items() if v > 0),
            loading=frozenset(self._loading),
            failing=frozenset(self._failing),
        )

    def in_flight(self, node: str) -> int:
        return sum(v for (n, _), v in self._flights.items() if n == node)

    def begin(self, node: str, model: str, cold: bool) -> None:
        """A request goes to `node`; `cold`: it loads the model there (counted as loaded until a poll says)."""
        self._flights[(node, model_key(model))] += 1
        if cold:
            self._loading.setdefault((node, model_key(model)), time.monotonic())

    def end(self, node: str, model: str) -> None:
        key = (node, model_key(model))
        if key in self._loading:
            self._loaded[key] = time.time()
        self._flights[key] -= 1
        if self._flights[key] <= 0:
            del self._flights[key]

    def failed(self, node: str, model: str) -> None:
        """The node failed a request: last choice until a later poll sees it up; its cold load did not happen."""
        self._failing[node] = time.time()
        self._loading.pop((node, model_key(model)), None)
        self._loaded.pop((node, model_key(model)), None)
