"""VRAM held by something the router cannot see, inferred from copies that landed short of what it expected.

A capacity source without a device-level "used" figure (static, ollama_log, or prometheus without one) shows
only the memory Ollama's own models take. When a copy lands partly on CPU although the router counted room
for all of it, something else holds the difference: another process, a driver, a model the router did not
see. The inference is what was missing: the room the model needed (its footprint and the era's headroom)
less what it got on GPU, at most what the router thought was free. It is used as memory in use on that node
until evidence clears it — the GPUs then hold more than the inference allows, a device-level figure appears,
or `TTL` passes (so a later attempt tests whether the memory came back).

Two ways in: `observe` (a partial copy seen in a poll, once per copy, judged by its own size: the copy's
context and parallel, not the node's default) and `record` (the optimizer's own load
that landed short or ran out of memory, whose copy may be gone again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpurouter.cluster.config import model_key
from gpurouter.cluster.state import ClusterState, NodeState
from gpurouter.sizing.room import Room, per_gpu_extra

TTL = 900.0  # seconds an inference holds without new evidence (the optimizer's longest cooldown)


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


class HiddenUsage:
    """Inferences per node; thread-safe; `clock` gives Unix seconds."""

    def __init__(self, ttl: float = TTL, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.clock = clock
        self._by_node: dict[str, Hidden] = {}
        self._seen: dict[tuple[str, str, int, int | None], float] = {}  # partial copies already counted
        self._lock = threading.Lock()

    def record(self, node: str, num_bytes: int, why: str, model: str | None = None) -> None:
        """Count `num_bytes` as held on `node` (the larger of this and a current inference wins)."""
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

    def observe(self, state: ClusterState) -> None:
        """Infer from the poll's partial copies (each counted once) and clear what the poll contradicts."""
        now = self.clock()
        for node in state.nodes:
            room = Room.of(node)
            if not node.up or room is None or not room.has_gpu or node.capacity.device_used is not None:
                with self._lock:
                    self._by_node.pop(node.name, None)  # down, or a source that sees every process itself
                continue
            self._contradicted(node, room.total, now)
            for copy in node.loaded:
                if not 0 < copy.size_vram < copy.size:
                    continue
                key = (node.name, model_key(copy.name), copy.size_vram, copy.context_length)
                with self._lock:
                    if key in self._seen and now - self._seen[key] < self.ttl:
                        continue
                    self._seen[key] = now
                others = sum(m.size_vram for m in node.loaded if m is not copy)
                missing = inferred_hidden(room.era, copy.size, copy.size_vram, room.total - others)
                why = f"{model_key(copy.name)} landed {copy.gpu_ratio:.0%} on GPU"
                self.record(node.name, missing, why, copy.name)

    def _contradicted(self, node: NodeState, total: int, now: float) -> None:
        """Forget an inference the poll disproves: Ollama holds more than it leaves room for, or the copy that
        gave the evidence is fully on GPU now."""
        with self._lock:
            hidden = self._current(node.name, now)
            if hidden is None:
                return
            evidence = node.loaded_model(hidden.model) if hidden.model else None
            if sum(m.size_vram for m in node.loaded) + hidden.bytes > total or (evidence and evidence.fully_on_gpu):
                del self._by_node[node.name]

    def _current(self, node: str, now: float) -> Hidden | None:
        hidden = self._by_node.get(node)
        if hidden is not None and hidden.until <= now:
            del self._by_node[node]
            return None
        return hidden
