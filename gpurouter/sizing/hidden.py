"""VRAM held by something the router cannot see, inferred from the router's own loads that came up short.

A capacity source without a device-level "used" figure (static, ollama_log, or prometheus without one) shows
only the memory Ollama's own models take. When a load of the router's lands partly on CPU, runs out of memory
or makes Ollama evict a model to admit it, although the router counted room for all of it, something else
holds the difference: another process, a driver, a model the router did not see.

Evidence comes only from the router's own loads, whose options it knows (`record`, from the executor): a copy
listed in `/api/ps` does not say whether a client asked for its placement (`num_gpu: 1` leaves a model 18 % on
GPU on an empty GPU), so a copy seen in a poll is never evidence. An inference is used as memory in use on that
node until later evidence can contradict it (`observe`, on every poll): the node went down or restarted (a poll
lists no copy at all where copies were listed when the evidence came), the copy that gave the evidence is gone
or reloaded, Ollama holds more than the inference leaves room for, a device-level figure appears, or `ttl` (one
cooldown) passes — then a fresh load retests it. A wrong inference costs at most one cooldown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpurouter.cluster.config import model_key
from gpurouter.cluster.state import ClusterState, NodeState
from gpurouter.sizing.room import Room, per_gpu_extra

TTL = 30.0  # seconds an inference holds without new evidence: the optimizer's default cooldown_seconds


def inferred_hidden(era: str, need: int, landed: int, expected_free: int) -> int:
    """Bytes held outside Ollama that explain a copy of `need` bytes getting only `landed` on GPU where the
    router counted `expected_free` (0 when it never counted room for all of it). llama.cpp's fit fills the GPU
    up to its margin, so the free memory really was about `landed` + the margin; a start that ran out of
    memory (`landed` 0) had less than `need`."""
    headroom = per_gpu_extra(era)
    if need + headroom > expected_free:
        return 0
    return max(0, expected_free - (landed + headroom if landed else need))


@dataclass(frozen=True)
class Hidden:
    """Bytes held on a node by something the router cannot see, and the evidence."""

    bytes: int
    since: float  # Unix seconds
    until: float
    why: str
    model: str | None = None  # the copy whose landing gave the evidence: its own reload tests it again
    copy: tuple[int, int] | None = None  # that copy's (size, size_vram) when first seen: a change is a reload
    listed: int | None = None  # copies listed at the first poll after it (None: not polled yet); then none = a restart


class HiddenUsage:
    """Inferences per node; thread-safe; `clock` gives Unix seconds, `ttl` bounds an inference's life."""

    def __init__(self, ttl: float = TTL, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.clock = clock
        self._by_node: dict[str, Hidden] = {}
        self._lock = threading.Lock()

    def record(self, node: str, num_bytes: int, why: str, model: str | None = None) -> None:
        """Count `num_bytes` as held on `node` (the larger of this and a current inference wins); `model` is
        the copy of the router's own load that showed it, when that copy stays loaded."""
        if num_bytes <= 0:
            return
        now = self.clock()
        with self._lock:
            current = self._current(node, now)
            if current is None or num_bytes >= current.bytes:
                self._by_node[node] = Hidden(num_bytes, now, now + self.ttl, why, model and model_key(model))

    def get(self, node: str) -> Hidden | None:
        with self._lock:
            return self._current(node, self.clock())

    def forget(self, node: str) -> None:
        with self._lock:
            self._by_node.pop(node, None)

    def observe(self, state: ClusterState) -> None:
        """Drop every inference the poll contradicts or can no longer back (see the module's words)."""
        now = self.clock()
        for node in state.nodes:
            room = Room.of(node)
            with self._lock:
                hidden = self._current(node.name, now)
                if hidden is None:
                    continue
                if not node.up or room is None or not room.has_gpu or node.capacity.device_used is not None:
                    del self._by_node[node.name]  # down, or a source that sees every process itself
                elif _contradicted(hidden, node, room.total):
                    del self._by_node[node.name]
                else:
                    self._by_node[node.name] = _anchored(hidden, node)

    def _current(self, node: str, now: float) -> Hidden | None:
        hidden = self._by_node.get(node)
        if hidden is not None and hidden.until <= now:
            del self._by_node[node]
            return None
        return hidden


def _anchored(hidden: Hidden, node: NodeState) -> Hidden:
    """The inference with what the first poll after it saw: its copy's placement and how many copies."""
    if hidden.listed is not None:
        return hidden
    evidence = node.loaded_model(hidden.model) if hidden.model else None
    signature = evidence.placement if evidence is not None else None
    return Hidden(hidden.bytes, hidden.since, hidden.until, hidden.why, hidden.model, signature, len(node.loaded))


def _contradicted(hidden: Hidden, node: NodeState, total: int) -> bool:
    """True when the poll disproves the inference or removes what backs it: Ollama holds more than it leaves
    room for; the copy that gave the evidence is gone, reloaded or fully on GPU; no copy is listed any more
    where copies were (a restart)."""
    if sum(m.size_vram for m in node.loaded) + hidden.bytes > total:
        return True
    if hidden.model is not None and hidden.listed is not None:
        evidence = node.loaded_model(hidden.model)
        if evidence is None or evidence.fully_on_gpu or evidence.placement != hidden.copy:
            return True
    return bool(hidden.listed) and not node.loaded  # every copy gone at once: a restart (or all expired)
