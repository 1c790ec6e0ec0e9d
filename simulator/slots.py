"""A runner's parallel slots and their prompt cache, after llama-server: `num_parallel` slots, each holding the
tokens of its last request (prompt and answer); a request takes the free slot whose cache shares the longest
prefix with its prompt (the least recently used one when none shares more than a tenth), reuses that prefix and computes
the rest; requests beyond the slots wait in arrival order. The cache lives as long as the runner."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from simulator.prompt import Tokens, common_prefix

SIMILARITY = 0.1  # llama-server's --slot-prompt-similarity default
_TICK = 0.05  # seconds between checks that a waiting request is still wanted


@dataclass
class Slot:
    index: int
    cached: Tokens = ()
    busy: bool = False
    used: int = 0  # when it was last given back (a counter): the least recently used slot has the smallest


@dataclass(frozen=True)
class Lease:
    """A slot taken for one request: `reused` prompt tokens came from its cache, `computed` are new."""

    slot: Slot
    reused: int
    computed: int


class PromptCounters:
    """Prompt tokens taken from a cache and computed, since start; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cached = 0
        self.computed = 0

    def add(self, cached: int, computed: int) -> None:
        with self._lock:
            self.cached += cached
            self.computed += computed

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"cached": self.cached, "computed": self.computed}


def reusable(cached: Sequence[str], prompt: Sequence[str]) -> int:
    """Prompt tokens a slot can reuse: the common prefix, less the last prompt token (always computed, as
    llama-server does, so that there is something to sample from)."""
    return min(common_prefix(cached, prompt), max(0, len(prompt) - 1))


def choose_slot(slots: Sequence[Slot], prompt: Sequence[str]) -> Slot | None:
    """llama-server's get_available_slot: the free slot sharing the longest prefix with `prompt` when that
    prefix is more than `SIMILARITY` of the prompt, else the least recently used free slot."""
    free = [s for s in slots if not s.busy]
    if not free:
        return None
    best = max(free, key=lambda s: (common_prefix(s.cached, prompt), -s.used, -s.index))
    if prompt and common_prefix(best.cached, prompt) > SIMILARITY * len(prompt):
        return best
    return min(free, key=lambda s: (s.used, s.index))


class Slots:
    """The slots of one runner and the requests waiting for them; thread-safe."""

    def __init__(self, count: int, node_counters: PromptCounters | None = None) -> None:
        self._cond = threading.Condition()
        self._slots = [Slot(i) for i in range(max(1, count))]
        self._waiting: deque[object] = deque()
        self._uses = 0
        self.counters = PromptCounters()
        self._node_counters = node_counters

    def take(self, prompt: Tokens, wanted: Callable[[], bool]) -> Lease | None:
        """Wait in order for a free slot and take the best one; None if `wanted()` turns False first."""
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or all(s.busy for s in self._slots):
                    if not wanted():
                        return None
                    self._cond.wait(_TICK)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()
            slot = choose_slot(self._slots, prompt)
            assert slot is not None
            slot.busy = True
            reused = reusable(slot.cached, prompt)
            slot.cached = prompt[:reused]  # the rest of the old cache is overwritten
        lease = Lease(slot, reused, len(prompt) - reused)
        for counters in (self.counters, self._node_counters):
            if counters is not None:
                counters.add(lease.reused, lease.computed)
        return lease

    def give_back(self, lease: Lease, cached: Tokens) -> None:
        """The request ended: its slot is free again and caches `cached` (the prompt and what was generated)."""
        with self._cond:
            self._uses += 1
            lease.slot.busy = False
            lease.slot.used = self._uses
            lease.slot.cached = cached
            self._cond.notify_all()

    def state(self) -> dict:
        """Each slot's cached token count and whether it is busy, the queue length and the counters."""
        with self._cond:
            slots = [{"id": s.index, "busy": s.busy, "cached_tokens": len(s.cached)} for s in self._slots]
            waiting = len(self._waiting)
        return {"slots": slots, "queue": waiting, "prompt_tokens": self.counters.as_dict()}
