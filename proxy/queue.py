"""The queue in front of Ollama: at most a runner's slots (its effective parallelism) of the proxy's requests
run on a (node, model) at once; the rest wait here, first come first served, at most `proxy.max_queue` per
(node, model) — past that the request gets Ollama's own 503 "server busy". Waiting here rather than in
Ollama's hidden per-runner semaphore keeps the wait visible (metrics) and lets the pipeline send the next
request to another copy."""

from __future__ import annotations

import asyncio
from collections import Counter, deque

BUSY = "server busy, please try again.  maximum pending requests exceeded"  # Ollama's words (two spaces, sic)


class QueueFull(Exception):
    pass


class Slots:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._running: Counter[tuple[str, str]] = Counter()
        self._waiting: dict[tuple[str, str], deque[asyncio.Future[None]]] = {}

    def depth(self, key: tuple[str, str]) -> int:
        """Requests waiting for a slot of this runner."""
        return len(self._waiting.get(key, ()))

    def waiting(self, model: str) -> int:
        """Requests waiting for a slot of any runner of `model`."""
        return sum(len(q) for (_, m), q in self._waiting.items() if m == model)

    async def acquire(self, key: tuple[str, str], slots: int) -> None:
        """Return once a slot is ours; QueueFull past `max_queue` waiting."""
        if self._running[key] < slots and not self._waiting.get(key):
            self._running[key] += 1
            return
        queue = self._waiting.setdefault(key, deque())
        if len(queue) >= self.max_queue:
            raise QueueFull(BUSY)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release(key)  # the slot was handed over as the waiter went away: pass it on
            elif turn in queue:
                queue.remove(turn)
            raise
        finally:
            if not queue:
                self._waiting.pop(key, None)

    def release(self, key: tuple[str, str]) -> None:
        """A request let go of its slot: the next waiter takes it over."""
        queue = self._waiting.get(key)
        while queue:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]
