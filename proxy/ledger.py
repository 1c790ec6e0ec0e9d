"""What the proxy itself does between two polls, and what it learns from it (asyncio, one loop).

Per (node, model): requests in flight or waiting in the proxy, cold loads it caused (until a poll shows them),
failures (until a poll that started after them sees the node up), the uncached prompt tokens it has queued
per node (until each request's first byte), observed tokens/s (from answers' timings) and the prompt-cache
index. A poll also tells what a cold load did: a priority model that vanished from the node it loaded on was
evicted by Ollama, so something the router cannot see holds memory there (`gpurouter.sizing.hidden`), and
the next cold request goes where no eviction is needed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from gpurouter import logfmt
from gpurouter.cluster.config import Config, model_key
from gpurouter.cluster.state import ClusterState
from gpurouter.decide import placement
from gpurouter.decide.route.prefix import PromptIndex
from gpurouter.decide.route.traffic import WHOLE_NODE, Rates, Traffic
from gpurouter.sizing.hidden import HiddenUsage, inferred_hidden
from gpurouter.sizing.room import Room

log = logging.getLogger(__name__)

SMOOTHING = 0.3  # weight of the newest answer in the observed tokens/s


@dataclass(frozen=True)
class _Before:
    """A node as a cold load found it: the priority models it held and the GPU memory the router saw free."""

    priority: frozenset[str]
    free: int
    need: int
    era: str


@dataclass(frozen=True)
class Timings:
    """An answer's own account (Ollama's native fields; counts only for the OpenAI API)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated: int = 0
    generate_seconds: float = 0.0
    load_seconds: float = 0.0


class Ledger:
    def __init__(self, config: Config, hidden: HiddenUsage | None = None) -> None:
        self.config = config
        self.hidden = hidden
        self.flights: Counter[tuple[str, str]] = Counter()
        self.prefill: Counter[str] = Counter()
        self.rates: dict[tuple[str, str], Rates] = {}
        self.loads: dict[str, float] = {}  # node → seconds its cold loads took (smoothed)
        self.prompts = PromptIndex()
        self._loading: dict[tuple[str, str], float] = {}  # (node, model) → when sent (monotonic)
        self._loaded: dict[tuple[str, str], float] = {}  # (node, model) → when its cold request ended (wall)
        self._before: dict[tuple[str, str], _Before] = {}
        self._failing: dict[tuple[str, str], float] = {}  # (node, model or WHOLE_NODE) → when (wall clock)
        self.installed: dict[str, frozenset[str]] = {}  # node → the models its last answered poll listed

    def traffic(self) -> Traffic:
        return Traffic(
            in_flight=self.flights,
            loading=frozenset(self._loading),
            failing=frozenset(self._failing),
            prefill_queued=self.prefill,
            rates=self.rates,
            load_seconds=self.loads,
            prompts=self.prompts,
        )

    # ------------------------------------------------------------------------------------------ requests

    def begin(self, node: str, model: str, cold: bool, state: ClusterState | None = None) -> None:
        """A request goes to `node`; `cold`: it loads the model there (counted as loaded until a poll says)."""
        key = (node, model_key(model))
        self.flights[key] += 1
        if cold and key not in self._loading:
            self._loading[key] = time.monotonic()
            there = state.node(node) if state is not None else None
            room = Room.of(there) if there is not None else None
            need = placement.need_of(state, key[1], there) if state is not None and there is not None else None
            if there is not None and room is not None and need is not None:
                held = frozenset(
                    model_key(m.name) for m in there.loaded if state is not None and state.config.priority(m.name)
                )
                self._before[key] = _Before(held, room.real_free(), need.bytes, room.era)

    def end(self, node: str, model: str) -> None:
        key = (node, model_key(model))
        if key in self._loading:
            self._loaded[key] = time.time()
        self.flights[key] -= 1
        if self.flights[key] <= 0:
            del self.flights[key]

    def failed(self, node: str, model: str, whole_node: bool = False) -> None:
        """A real failure: the (node, model) (the node, when it refused the connection) goes last until a later
        poll sees the node up; its cold load did not happen and its prompt cache is gone."""
        key = (node, model_key(model))
        self._failing[(node, WHOLE_NODE) if whole_node else key] = time.time()
        self._loading.pop(key, None)
        self._loaded.pop(key, None)
        self._before.pop(key, None)
        self.prompts.forget(*key)

    def absolved(self, node: str, model: str) -> None:
        """The failure was the request's own (every node answered it alike): the node is not failing."""
        self._failing.pop((node, model_key(model)), None)

    def answered(self, node: str, model: str, timings: Timings, predicted_cached: int, cold: bool = False) -> int:
        """Learn the node's speed (and, from an answer to a request that loaded the model, `cold`, how long its
        loads take) from an answer; the cached prompt tokens it realised (prompt tokens less those its prefill
        time accounts for at the node's rate), estimated."""
        key = (node, model_key(model))
        if cold:
            self.loads[node] = _smooth(self.loads.get(node), timings.load_seconds)
        old = self.rates.get(key, Rates())
        decode, prefill, service = old.decode, old.prefill, old.service
        if timings.prompt_seconds + timings.generate_seconds > 0:
            service = _smooth(service, timings.prompt_seconds + timings.generate_seconds)
        if timings.generated and timings.generate_seconds > 0:
            decode = _smooth(decode, timings.generated / timings.generate_seconds)
        realised = 0
        if timings.prompt_tokens and timings.prompt_seconds > 0:
            if predicted_cached == 0:  # every prompt token was processed: the prefill rate itself
                prefill = _smooth(prefill, timings.prompt_tokens / timings.prompt_seconds)
            if prefill:
                realised = max(0, round(timings.prompt_tokens - timings.prompt_seconds * prefill))
        elif timings.prompt_tokens and predicted_cached:  # no prefill time at all: all of it came from the cache
            realised = timings.prompt_tokens
        self.rates[key] = Rates(decode, prefill, service)
        return min(realised, timings.prompt_tokens)

    # ------------------------------------------------------------------------------------------ polls

    def polled(self, state: ClusterState) -> None:
        """A new poll: forget what it shows (or what is over), learn from cold loads, keep installed lists."""
        for node in state.nodes:
            if node.up:
                self.installed[node.name] = frozenset(model_key(m.name) for m in (*node.installed, *node.loaded))
        for key in list(self._loading):
            node = state.node(key[0])
            seen = node is not None and node.loaded_model(key[1]) is not None
            polled_after = state.taken_at > self._loaded.get(key, float("inf"))  # the load is over either way
            if seen or polled_after or time.monotonic() - self._loading[key] > self.config.proxy.read_timeout:
                if seen and node is not None:
                    self._learn(key, state)
                del self._loading[key]
                self._loaded.pop(key, None)
                self._before.pop(key, None)
        for key, failed_at in list(self._failing.items()):
            if state.taken_at > failed_at:
                del self._failing[key]
        for name, model in self.prompts.pairs():  # a runner that is gone took its prompt cache with it
            node = state.node(name)
            if node is not None and node.loaded_model(model) is None and (name, model) not in self._loading:
                self.prompts.forget(name, model)

    def _learn(self, key: tuple[str, str], state: ClusterState) -> None:
        before = self._before.get(key)
        node = state.node(key[0])
        if before is None or node is None or self.hidden is None:
            return
        gone = sorted(m for m in before.priority if node.loaded_model(m) is None)
        if not gone:
            return
        held = inferred_hidden(before.era, before.need, 0, before.free)
        why = f"loading {key[1]} evicted the priority model {', '.join(gone)}"
        self.hidden.record(node.name, held, why)
        logfmt.log_event(
            log, logging.WARNING, "proxy.evicted", node=node.name, model=key[1], evicted=",".join(gone), held=held
        )


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)
