"""One poll of every configured node, concurrently and within a deadline, into a `ClusterState`."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from types import MappingProxyType
from typing import Any

from exporter.capacity import CapacityReader
from exporter.config import Config, NodeConfig
from exporter.need import NeedLedger
from exporter.ollama import OllamaClient, OllamaError
from exporter.state import UNKNOWN, Capacity, ClusterState, NodeState

_READS = ("ps", "tags", "version")


class Observer:
    """Polls the cluster. Keeps one client (one HTTP session) per node and the need ledger across polls.

    A node's latency never adds to another's: all requests run at once and the poll waits at most
    `config.request_timeout` for them; a node that has not answered by then is reported as timed out.
    """

    def __init__(
        self,
        config: Config,
        *,
        capacity: CapacityReader | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.capacity = capacity or CapacityReader(config)
        self.ledger = NeedLedger(config)
        self.clock = clock
        deadline = config.request_timeout
        self.clients = {
            n.name: OllamaClient(n.url, connect_timeout=deadline, read_timeout=deadline) for n in config.nodes
        }
        workers = min(256, 3 * len(config.nodes) + 8)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="poll")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients.values():
            client.close()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, deadline: float | None = None) -> ClusterState:
        """Read every node (and the capacity sources) at once; never raises for a bad node."""
        limit = self.config.request_timeout if deadline is None else deadline
        started = time.monotonic()
        taken_at = self.clock()
        nodes = self.config.nodes
        capacity = self._pool.submit(self.capacity.read, nodes, limit)
        reads: dict[tuple[str, str], Future[Any]] = {}
        for node in nodes:
            client = self.clients[node.name]
            for what in _READS:
                reads[(node.name, what)] = self._pool.submit(self._timed, getattr(client, what), limit)
        wait([capacity, *reads.values()], timeout=limit)
        capacities = capacity.result() if capacity.done() and not capacity.exception() else {}
        states = [self._node_state(node, reads, capacities.get(node.name), limit) for node in nodes]
        self.ledger.record(states)
        self._fetch_shows(states, limit - (time.monotonic() - started))
        needs, embedding = self.ledger.needs(states)
        return ClusterState(
            config=self.config,
            taken_at=taken_at,
            nodes=tuple(states),
            needs=MappingProxyType(needs),
            embedding=embedding,
            layers=MappingProxyType(self.ledger.layers(states)),
            duration=time.monotonic() - started,
        )

    @staticmethod
    def _timed(call: Callable[..., Any], limit: float) -> tuple[Any, float]:
        started = time.monotonic()
        return call(timeout=limit), time.monotonic() - started

    def _node_state(
        self,
        node: NodeConfig,
        reads: dict[tuple[str, str], Future[Any]],
        capacity: Capacity | None,
        limit: float,
    ) -> NodeState:
        values: dict[str, Any] = {}
        seconds = 0.0
        for what in _READS:
            future = reads[(node.name, what)]
            if not future.done():
                future.cancel()
                return self._down(node, capacity, "timeout", f"{node.url}: no answer within {limit:g}s", limit)
            error = future.exception()
            if isinstance(error, OllamaError):
                return self._down(node, capacity, error.kind, str(error), seconds)
            if error is not None:
                return self._down(node, capacity, "error", f"{node.url}: {type(error).__name__}: {error}", seconds)
            values[what], took = future.result()
            seconds = max(seconds, took)
        return NodeState(
            config=node,
            up=True,
            margin=self.config.vram_safety_margin,
            capacity=capacity or UNKNOWN,
            version=values["version"],
            loaded=values["ps"],
            installed=values["tags"],
            poll_seconds=seconds,
        )

    def _down(self, node: NodeConfig, capacity: Capacity | None, kind: str, message: str, seconds: float) -> NodeState:
        return NodeState(
            config=node,
            up=False,
            margin=self.config.vram_safety_margin,
            capacity=capacity or UNKNOWN,
            error_kind=kind,
            error=message,
            poll_seconds=seconds,
        )

    def _fetch_shows(self, states: list[NodeState], remaining: float) -> None:
        """Ask /api/show once per digest not seen before; what does not answer in time is asked next poll."""
        missing = self.ledger.missing_shows(states)
        if not missing:
            return
        budget = max(remaining, min(1.0, self.config.request_timeout))
        futures = {
            digest: self._pool.submit(self.clients[node.name].show, model, budget)
            for digest, (node, model) in missing.items()
        }
        wait(futures.values(), timeout=budget)
        for digest, future in futures.items():
            if future.done() and future.exception() is None:
                self.ledger.add_show(digest, future.result())
