"""Where one request goes: pure functions over the cluster view and what the proxy itself sees (no I/O).

The order, per request: a node where the model is fully on GPU (a runner whose options match the request's
first, then the fewest requests in flight); else the node where `route` would load it fully on GPU without
evicting a priority or busy model (the same decision as `gpu-router route`); else a partial copy (the most on
GPU first), a CPU copy, or the node `route` picks for CPU. GPU nodes where it would load come before partial
and CPU copies even behind a GPU copy (a retry after that node fails). Nodes the proxy saw fail recently come
last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from gpurouter.cluster.config import model_key
from gpurouter.cluster.ollama import LoadedModel
from gpurouter.cluster.state import ClusterState, NodeState
from gpurouter.decide import placement

PLACEMENTS = ("gpu", "cold", "partial", "cpu", "none")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # an expires_at in the past: busy (placement.is_busy)


@dataclass(frozen=True)
class Traffic:
    """What the proxy knows that the last poll does not: requests it has in flight, loads it caused, failures."""

    in_flight: Mapping[str, int] = field(default_factory=dict)  # node → requests in flight
    busy: frozenset[tuple[str, str]] = frozenset()  # (node, model) serving a request through the proxy
    loading: frozenset[tuple[str, str]] = frozenset()  # (node, model) sent there cold, not yet seen loaded
    failing: frozenset[str] = frozenset()  # nodes that failed since the last poll


@dataclass(frozen=True)
class Choice:
    """The nodes to try, best first, each with the placement the model has there; `heal` is set when a priority
    model is about to be served partial or on CPU."""

    model: str
    targets: tuple[tuple[str, str], ...]  # (node, placement)
    reason: str
    heal: bool = False

    @property
    def placement(self) -> str:
        return self.targets[0][1] if self.targets else "none"


def corrected(state: ClusterState, traffic: Traffic) -> ClusterState:
    """The polled state as the proxy's own traffic shows it: a model it is serving is busy (never evicted, never
    reloaded), and a model it sent to a node cold counts as loaded there on GPU (its VRAM is taken)."""
    nodes = []
    for node in state.nodes:
        loaded = [
            replace(m, expires_at=_EPOCH) if (node.name, model_key(m.name)) in traffic.busy else m for m in node.loaded
        ]
        for name, key in traffic.loading:
            if name == node.name and node.loaded_model(key) is None:
                need = placement.need_of(state, key, node)
                if need is not None:
                    loaded.append(LoadedModel(name=key, size=need.bytes, size_vram=need.bytes, expires_at=_EPOCH))
        nodes.append(replace(node, loaded=tuple(loaded)))
    return replace(state, nodes=tuple(nodes))


def matches(copy: LoadedModel, options: Mapping[str, object]) -> bool:
    """False when the request's options would make Ollama reload this runner (another num_ctx or num_gpu)."""
    ctx = options.get("num_ctx")
    if isinstance(ctx, int) and copy.context_length is not None and ctx != copy.context_length:
        return False
    gpu = options.get("num_gpu")
    if isinstance(gpu, int) and gpu >= 0:
        return (gpu == 0) == (copy.size_vram == 0) and (gpu == 0 or copy.fully_on_gpu)
    return True


def placement_of(node: NodeState, key: str, cold: frozenset[str] = frozenset()) -> str:
    """gpu | partial | cpu for a loaded copy; for a model only installed there: cold where it loads fully on
    GPU (`cold` names those nodes), cpu on a node without GPU, else partial (Ollama spills what does not fit)."""
    copy = node.loaded_model(key)
    if copy is None:
        if node.name in cold:
            return "cold"
        return "cpu" if node.capacity.source == "none" or node.vram_total == 0 else "partial"
    if copy.fully_on_gpu:
        return "gpu"
    return "partial" if copy.size_vram > 0 else "cpu"


def choose(state: ClusterState, model: str, options: Mapping[str, object], traffic: Traffic, now: float) -> Choice:
    """The nodes to send `model`'s request to, best first."""
    key = model_key(model)
    view = corrected(state, traffic)
    candidates = [
        n for n in view.nodes if n.up and not n.config.maintenance and (n.installed_model(key) or n.loaded_model(key))
    ]
    if not candidates:
        return Choice(key, (), "not installed on any node that is up and not in maintenance")

    def load(n: NodeState) -> tuple[bool, int]:
        return (n.name in traffic.failing, traffic.in_flight.get(n.name, 0))

    def copy_order(n: NodeState) -> tuple[bool, bool, int, float, str]:
        copy = n.loaded_model(key)
        assert copy is not None
        failing, busy = load(n)
        return (failing, not matches(copy, options), busy, -copy.gpu_ratio, n.name)

    on_gpu = sorted((n for n in candidates if placement_of(n, key) == "gpu"), key=copy_order)
    placed = {n.name for n in on_gpu}
    # where it would load fully on GPU, also behind GPU copies (a retry after one fails); a verdict that fits
    # only by reloading the node's own CPU copy is not a cold load: a request without num_gpu is served by the
    # runner that is there
    result = placement.check(view, key, now)
    cold = [v.node for v in result.fitting if not v.in_place and v.node not in placed]
    ordered = [*on_gpu, *sorted((n for n in candidates if n.name in cold), key=lambda n: cold.index(n.name))]
    if on_gpu:
        reason = f"fully on GPU on {on_gpu[0].name}"
    elif ordered:
        reason = f"loads fully on GPU on {ordered[0].name}"
    else:
        best = placement.route_of(view, result)
        reason = f"nothing better: {best.reason}"
    ordered += sorted((n for n in candidates if n.loaded_model(key) and n.name not in {*placed, *cold}), key=copy_order)
    if not on_gpu and not cold and best.processor == "CPU" and best.node not in {n.name for n in ordered}:
        ordered += [n for n in candidates if n.name == best.node]
    chosen = {n.name for n in ordered}
    rest = sorted((n for n in candidates if n.name not in chosen), key=lambda n: (*load(n), n.name))
    tried = sorted([*ordered, *rest], key=lambda n: n.name in traffic.failing)  # stable: recent failures last
    targets = tuple((n.name, placement_of(n, key, frozenset(cold))) for n in tried)
    heal = targets[0][1] in ("partial", "cpu") and state.config.priority(key) is not None
    return Choice(key, targets, reason, heal)
