"""One poll of every configured node, concurrently and within a deadline, into a `ClusterState`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import requests

from gpurouter.cluster.capacity import CapacityReader
from gpurouter.cluster.config import Config, NodeConfig
from gpurouter.cluster.ollama import OllamaClient, OllamaError
from gpurouter.cluster.state import UNKNOWN, Capacity, ClusterState, NodeState
from gpurouter.sizing.hidden import HiddenUsage
from gpurouter.sizing.need import NeedLedger
from gpurouter.urls import redact

_READS = ("ps", "tags", "version")
_MAX_WORKERS = 1024
VERSION_MAX_AGE = 60.0  # seconds a node's /api/version is reused while the node stays up
_Read = tuple[Any, BaseException | None, float]  # (result, error, seconds) of one timed read


def node_session(url: str) -> requests.Session:
    """The node's one HTTP session. Proxy settings from the environment are looked up once here rather than
    on every request (requests' per-request environment merge is a third of a 100-node poll's CPU)."""
    session = requests.Session()
    if not requests.utils.get_environ_proxies(url):
        session.trust_env = False
    return session


class Observer:
    """Polls the cluster. Keeps one client (one HTTP connection pool) per node and the need ledger across polls.

    A node's latency never adds to another's: all requests run at once (one worker thread each) and the poll
    waits at most `config.request_timeout` for them; a node that has not answered by then is reported as timed
    out. `/api/ps` and `/api/tags` are read on every poll; `/api/version` (which changes only with a restart)
    when not read in the last `VERSION_MAX_AGE` seconds or when the node was down at the previous poll.
    `/api/show` is asked once per digest; an answer that comes after the deadline is kept for the next poll.
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
        # an inference of memory held outside Ollama lasts one cooldown: the retry after it retests it
        self.hidden = HiddenUsage(ttl=config.optimizer.cooldown_seconds, clock=clock)
        self.clock = clock
        deadline = config.request_timeout
        self.clients = {
            n.name: OllamaClient(
                n.url,
                connect_timeout=deadline,
                read_timeout=deadline,
                session=node_session(n.url),
            )
            for n in config.nodes
        }
        # threads start on demand: room for two overlapping polls and their /api/show requests
        workers = min(_MAX_WORKERS, 2 * (len(_READS) + 1) * len(config.nodes) + 8)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="poll")
        self._asking: set[str] = set()  # digests whose /api/show is in flight
        self._versions: dict[str, tuple[str, float]] = {}  # node → (version, monotonic time it was read)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients.values():
            client.close()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, deadline: float | None = None) -> ClusterState:
        """Read every node (and the capacity sources) at once, within the deadline; never raises for a bad node."""
        limit = self.config.request_timeout if deadline is None else deadline
        started = time.monotonic()
        taken_at = self.clock()
        nodes = self.config.nodes
        capacity = self._pool.submit(self.capacity.read, nodes, limit)
        reads: dict[str, dict[str, Future[_Read]]] = {}
        for node in nodes:
            client = self.clients[node.name]
            known = self._versions.get(node.name)
            fresh = known is not None and started - known[1] < VERSION_MAX_AGE
            wanted = [what for what in _READS if what != "version" or not fresh]
            reads[node.name] = {what: self._pool.submit(_timed, getattr(client, what), limit) for what in wanted}
        wait([capacity, *(f for node_reads in reads.values() for f in node_reads.values())], timeout=limit)
        capacities = capacity.result() if capacity.done() and not capacity.exception() else {}
        states = [self._node_state(node, reads[node.name], capacities.get(node.name), limit) for node in nodes]
        self.ledger.record(states)
        unread = self._fetch_shows(states, limit - (time.monotonic() - started))
        needs, embedding = self.ledger.needs(states)
        state = ClusterState(
            config=self.config,
            taken_at=taken_at,
            nodes=tuple(states),
            needs=MappingProxyType(needs),
            embedding=embedding,
            layers=MappingProxyType(self.ledger.layers(states)),
            duration=time.monotonic() - started,
            unread=unread,
        )
        self.hidden.observe(state)
        return replace(state, nodes=tuple(self._with_hidden(n) for n in state.nodes))

    def _with_hidden(self, node: NodeState) -> NodeState:
        hidden = self.hidden.get(node.name)
        if hidden is None:
            return node
        return replace(node, hidden=hidden.bytes, hidden_why=hidden.why, hidden_model=hidden.model)

    def _node_state(
        self, node: NodeConfig, reads: dict[str, Future[_Read]], capacity: Capacity | None, limit: float
    ) -> NodeState:
        values: dict[str, Any] = {}
        seconds = 0.0
        failure: tuple[str, str] | None = None
        for what, future in reads.items():
            if not future.done():
                future.cancel()
                failure = failure or ("timeout", f"{redact(node.url)}: no answer within {limit:g}s")
                seconds = limit
                continue
            value, error, took = future.result()
            seconds = max(seconds, took)
            if isinstance(error, OllamaError):
                failure = failure or (error.kind, str(error))
            elif error is not None:
                failure = failure or ("error", redact(f"{node.url}: {type(error).__name__}: {error}"))
            else:
                values[what] = value
        if failure is not None:
            self._versions.pop(node.name, None)
            return self._down(node, capacity, *failure, seconds)
        if "version" in values:
            self._versions[node.name] = (values["version"], time.monotonic())
        return NodeState(
            config=node,
            up=True,
            margin=self.config.margin,
            capacity=capacity or UNKNOWN,
            version=self._versions.get(node.name, ("", 0.0))[0],
            loaded=values["ps"],
            installed=values["tags"],
            poll_seconds=seconds,
        )

    def _down(self, node: NodeConfig, capacity: Capacity | None, kind: str, message: str, seconds: float) -> NodeState:
        return NodeState(
            config=node,
            up=False,
            margin=self.config.margin,
            capacity=capacity or UNKNOWN,
            error_kind=kind,
            error=message,
            poll_seconds=seconds,
        )

    def _fetch_shows(self, states: list[NodeState], remaining: float) -> tuple[str, ...]:
        """Ask /api/show once per digest not seen before, waiting at most `remaining` seconds; a late answer
        still reaches the ledger (for the next poll), and a failed one is asked again next poll. Returns what
        did not come in time, in words (those models' needs fall back to a coarser source this poll)."""
        with self._lock:
            missing = {d: v for d, v in self.ledger.missing_shows(states).items() if d not in self._asking}
            self._asking.update(missing)
        futures = {
            self._pool.submit(self._show, digest, node.name, model): (node.name, model)
            for digest, (node, model) in missing.items()
        }
        if futures and remaining > 0:
            wait(futures, timeout=remaining)
        unread = []
        for future, (node, model) in futures.items():
            if not future.done():
                unread.append(f"/api/show {model} on {node}: no answer within {self.config.request_timeout:g}s")
            elif (error := future.exception() or future.result()) is not None:
                unread.append(f"/api/show {model} on {node}: {error}")
        return tuple(sorted(unread))

    def _show(self, digest: str, node: str, model: str) -> str | None:
        """Read one /api/show into the ledger; the error in words when it failed (asked again next poll)."""
        try:
            self.ledger.add_show(digest, self.clients[node].show(model, self.config.request_timeout))
            return None
        except OllamaError as exc:
            return str(exc)
        finally:
            with self._lock:
                self._asking.discard(digest)


def _timed(call: Callable[..., Any], limit: float) -> _Read:
    """(result, None, seconds) or (None, the exception, seconds): a failed read has a duration too."""
    started = time.monotonic()
    try:
        return call(timeout=limit), None, time.monotonic() - started
    except Exception as exc:
        return None, exc, time.monotonic() - started
