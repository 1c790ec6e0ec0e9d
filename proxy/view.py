"""The proxy's picture of the cluster: the last background poll, and the proxy's own traffic since
(`proxy.ledger`), handed to the request pipeline together (asyncio, one loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gpurouter.cluster.config import Config
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.state import ClusterState
from gpurouter.decide.route.pipeline import Memo
from proxy.ledger import Ledger

log = logging.getLogger(__name__)


class ClusterView:
    """Polls the cluster every `proxy.refresh_interval` in a worker thread (the exporter's Observer); each poll
    is shown to the ledger before requests see it."""

    def __init__(self, config: Config, observer: Observer) -> None:
        self.config = config
        self.observer = observer
        self.state: ClusterState | None = None
        self.ledger = Ledger(config, observer.hidden)
        self.memo = Memo()  # the corrected view and checks of this poll, for every request until the next
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
        self.ledger.polled(state)
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
