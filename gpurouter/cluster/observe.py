"""One poll of every configured node, concurrently and within a deadline, into a `ClusterState`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from types import MappingProxyType

import requests

from gpurouter.cluster.capacity import CapacityReader
from gpurouter.cluster.config import Config, NodeConfig
from gpurouter.cluster.ollama import OllamaClient, ShowInfo
from gpurouter.cluster.poll import Answers, Poller, Target
from gpurouter.cluster.state import UNKNOWN, Capacity, ClusterState, NodeState
from gpurouter.sizing.hidden import HiddenUsage
from gpurouter.sizing.need import NeedLedger

_READS = ("ps", "tags", "version")
VERSION_MAX_AGE = 60.0  # seconds a node's /api/version is reused while the node stays up


def node_session(url: str) -> requests.Session:
    """The node's one HTTP session for actions. Proxy settings from the environment are looked up once here
    rather than on every request (requests' per-request environment merge is a third of a request's CPU)."""
    session = requests.Session()
    if not requests.utils.get_environ_proxies(url):
        session.trust_env = False
    return session


class _Clients(Mapping[str, OllamaClient]):
    """One action client (one `requests` session) per node, made when first asked for: a poll needs none."""

    def __init__(self, nodes: Sequence[NodeConfig], timeout: float) -> None:
        self._urls = {n.name: n.url for n in nodes}
        self._timeout = timeout
        self._made: dict[str, OllamaClient] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> OllamaClient:
        with self._lock:
            client = self._made.get(name)
            if client is None:
                url = self._urls[name]
                client = OllamaClient(
                    url, connect_timeout=self._timeout, read_timeout=self._timeout, session=node_session(url)
                )
                self._made[name] = client
            return client

    def __iter__(self) -> Iterator[str]:
        return iter(self._urls)

    def __len__(self) -> int:
        return len(self._urls)

    def close(self) -> None:
        with self._lock:
            for client in self._made.values():
                client.close()


class Observer:
    """Polls the cluster. Keeps one poller (one event loop, one connection pool) and the need ledger across
    polls; `clients` are the nodes' action clients (loads and unloads).

    All nodes are read at once on the poller's event loop (`gpurouter.cluster.poll`), each within
    `config.request_timeout` (a node that has not answered by then is timed out; the process's own delays do
    not count against it). `/api/ps` and `/api/tags` are read on every poll; `/api/version` (which changes
    only with a restart) when not read in the last `VERSION_MAX_AGE` seconds or when the node was down at the
    previous poll. `/api/show` is asked once per digest; an answer that comes after the deadline is kept for
    the next poll. Sizing runs after the reads, outside every node's deadline.

    One view per observer: callers that ask while a poll runs share the next poll (which starts after they
    asked), so the exporter's concurrent scrapes, the optimizer and the proxy holding one observer never
    poll the nodes twice at once.
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
        self.clients = _Clients(config.nodes, config.request_timeout)
        self.poller = Poller(n.url for n in config.nodes)
        self._capacity_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="capacity")
        self._asking: set[str] = set()  # digests whose /api/show is in flight
        self._versions: dict[str, tuple[str, float]] = {}  # node → (version, monotonic time it was read)
        self._lock = threading.Lock()
        self._polling = threading.Lock()
        self._last: tuple[float, float | None, ClusterState] | None = None  # (started, deadline, state)

    def close(self) -> None:
        self._capacity_pool.shutdown(wait=False, cancel_futures=True)
        self.poller.close()
        self.clients.close()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, deadline: float | None = None) -> ClusterState:
        """Read every node (and the capacity sources) at once, within the deadline; never raises for a bad node.

        A poll that started after this call (another caller's, while this one waited) is shared."""
        called = time.monotonic()
        with self._polling:
            if self._last is not None and self._last[0] >= called and self._last[1] == deadline:
                return self._last[2]
            started = time.monotonic()
            state = self._poll(deadline)
            self._last = (started, deadline, state)
            return state

    def _poll(self, deadline: float | None) -> ClusterState:
        limit = self.config.request_timeout if deadline is None else deadline
        started = time.monotonic()
        taken_at = self.clock()
        nodes = self.config.nodes
        capacity = self._capacity_pool.submit(self.capacity.read, nodes, limit)
        answers = self.poller.read([self._target(node, started) for node in nodes], limit)
        wait([capacity], timeout=max(0.0, limit - (time.monotonic() - started)))
        capacities = capacity.result() if capacity.done() and not capacity.exception() else {}
        states = [self._node_state(node, answers[node.name], capacities.get(node.name)) for node in nodes]
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

    def _target(self, node: NodeConfig, now: float) -> Target:
        known = self._versions.get(node.name)
        fresh = known is not None and now - known[1] < VERSION_MAX_AGE
        return Target(node.name, node.url, _READS[:2] if fresh else _READS)

    def _with_hidden(self, node: NodeState) -> NodeState:
        hidden = self.hidden.get(node.name)
        if hidden is None:
            return node
        return replace(node, hidden=hidden.bytes, hidden_why=hidden.why, hidden_model=hidden.model)

    def _node_state(self, node: NodeConfig, answers: Answers, capacity: Capacity | None) -> NodeState:
        if answers.error is not None:
            self._versions.pop(node.name, None)
            return self._down(node, capacity, answers.error.kind, str(answers.error), answers.seconds)
        values = answers.values
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
            poll_seconds=answers.seconds,
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
            self.poller.show(node.config.url, model, self.config.request_timeout): (digest, node.name, model)
            for digest, (node, model) in missing.items()
        }
        for future, (digest, _, _) in futures.items():
            future.add_done_callback(lambda done, digest=digest: self._shown(digest, done))
        if futures and remaining > 0:
            wait(futures, timeout=remaining)
        unread = []
        for future, (digest, node, model) in futures.items():
            if not future.done():
                unread.append(f"/api/show {model} on {node}: no answer within {self.config.request_timeout:g}s")
            elif (error := future.exception()) is not None:
                unread.append(f"/api/show {model} on {node}: {error}")
            else:  # in the ledger now, though its callback may not have run yet
                self.ledger.add_show(digest, future.result())
        return tuple(sorted(unread))

    def _shown(self, digest: str, done: Future[ShowInfo]) -> None:
        """Keep one /api/show in the ledger (on time or late); a failed one is asked again next poll."""
        if not done.cancelled() and done.exception() is None:
            self.ledger.add_show(digest, done.result())
        with self._lock:
            self._asking.discard(digest)
