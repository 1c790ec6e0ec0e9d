"""One request's decision: filters → weighted scorers → picker, with every node's scores for the explanation.

`choose` is the proxy's per-request call and `gpu-router route --explain`'s; `Memo` keeps the corrected view
and `check` per poll so that a request does not rebuild the cluster state (only the proxy's own traffic
changes between polls).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gpurouter.cluster.config import RouteWeights
from gpurouter.cluster.state import ClusterState
from gpurouter.decide import placement
from gpurouter.decide.route import candidates as cands
from gpurouter.decide.route import picker
from gpurouter.decide.route.ask import Ask
from gpurouter.decide.route.filters import healthy, installed, protected
from gpurouter.decide.route.scorers import affinity, latency, queue, residency, speed
from gpurouter.decide.route.traffic import Traffic

PLACEMENTS = ("gpu", "cold", "partial", "cpu", "none")


@dataclass(frozen=True)
class Target:
    """One node to try: where the model runs there, the options the proxy sets, the scores."""

    node: str
    placement: str
    sets: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    adjusted: bool = False  # the request's runner options are replaced by the resident runner's (`why`)
    why: str = ""
    score: float = 0.0
    parts: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    cached_tokens: int = 0  # prompt tokens the router expects cached there
    slots: int = 1
    failing: bool = False


@dataclass(frozen=True)
class Choice:
    """The nodes to try, best first; `dropped` the nodes a filter removed, with why; `heal` is set when a
    priority model is about to be served partial or on CPU; `waits` when, with no target, waiting may give one
    (a busy model going idle)."""

    model: str
    targets: tuple[Target, ...]
    reason: str
    heal: bool = False
    dropped: tuple[tuple[str, str], ...] = ()
    waits: bool = False

    @property
    def placement(self) -> str:
        return self.targets[0].placement if self.targets else "none"

    @property
    def nodes(self) -> list[str]:
        return [t.node for t in self.targets]


class Memo:
    """The corrected view, and `check` on it per model, per (poll, busy and loading sets): rebuilt only when
    one of them changes."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._view: ClusterState | None = None
        self._checks: dict[str, placement.CheckResult] = {}
        self._found: dict[tuple[str, frozenset[tuple[str, object]]], list[cands.Candidate]] = {}

    def view(self, state: ClusterState, traffic: Traffic) -> ClusterState:
        key = (id(state), traffic.busy, traffic.loading)
        if key != self._key or self._view is None:
            self._key, self._view = key, cands.corrected(state, traffic)
            self._checks, self._found = {}, {}
        return self._view

    def candidates(
        self, state: ClusterState, view: ClusterState, ask: Ask, traffic: Traffic, now: float
    ) -> list[cands.Candidate]:
        """`candidates` for the model and runner options of `ask`, once per view."""
        try:
            key = (ask.model, frozenset(ask.runner.items()))
            hash(key)
        except TypeError:  # an option value that is a list or a mapping: not kept
            return cands.candidates(state, view, installed.kept(state, ask.model), ask, traffic, now, self.check)
        if key not in self._found:
            names = installed.kept(state, ask.model)
            self._found[key] = cands.candidates(state, view, names, ask, traffic, now, self.check)
        return self._found[key]

    def check(self, view: ClusterState, model: str, now: float) -> placement.CheckResult:
        if view is not self._view:
            return placement.check(view, model, now)
        if model not in self._checks:
            self._checks[model] = placement.check(view, model, now)
        return self._checks[model]


def choose(
    state: ClusterState,
    ask: Ask,
    traffic: Traffic,
    now: float,
    weights: RouteWeights | None = None,
    max_queue_seconds: float = 4.0,
    memo: Memo | None = None,
) -> Choice:
    """The nodes to send `ask` to, best first."""
    weights = weights or state.config.proxy.weights
    key = ask.model
    if memo is not None:
        found = memo.candidates(state, memo.view(state, traffic), ask, traffic, now)
    else:
        names = installed.kept(state, key)
        found = cands.candidates(state, cands.corrected(state, traffic), names, ask, traffic, now)
    if not found:
        return Choice(key, (), "not installed on any node that is up and not in maintenance")
    kept, unsafe = protected.split(found)
    well, failing = healthy.split(kept, key, traffic)
    everyone = well + failing
    blocks = [affinity.cached_blocks(c, ask, traffic) for c in everyone]
    speeds = speed.scores(everyone, key, traffic)
    expected = latency.estimates(everyone, ask, blocks, traffic)
    quick = latency.scores(expected)
    scored = []
    for c, cached, fast, there, soon in zip(everyone, blocks, speeds, expected, quick, strict=True):
        queued = traffic.prefill_queued.get(c.name, 0)
        parts = {
            "residency": residency.score(c),
            "queue": queue.score(c, key, traffic),
            "latency": soon,
            "affinity": affinity.score(ask, cached, there, queued, max_queue_seconds),
            "speed": fast,
        }
        scored.append((c, parts, latency.cached_tokens(cached, ask), c in failing))
    ranked = picker.order([(c, picker.total(p, weights)) for c, p, *_ in scored[: len(well)]])
    ranked += picker.order([(c, picker.total(p, weights)) for c, p, *_ in scored[len(well) :]])
    rest = {id(c): more for c, *more in scored}
    targets = tuple(
        Target(c.name, c.placement, c.sets, c.adjusted, c.why, total, *rest[id(c)][:2], c.slots, rest[id(c)][2])
        for c, total in ranked
    )
    dropped = tuple((c.name, c.why) for c in unsafe)
    if not targets:
        return Choice(
            key,
            (),
            "only a load that evicts a priority or busy model: " + "; ".join(f"{n}: {w}" for n, w in dropped),
            dropped=dropped,
            waits=any(not c.lasting for c in unsafe),
        )
    first = targets[0]
    reason = {
        "gpu": f"fully on GPU on {first.node}",
        "cold": f"loads fully on GPU on {first.node}",
        "partial": f"partly on GPU on {first.node}",
        "cpu": f"on CPU on {first.node}",
    }[first.placement]
    if first.adjusted:
        reason += f" with its runner's options ({first.why})"
    heal = first.placement in ("partial", "cpu") and state.config.priority(key) is not None
    return Choice(key, targets, reason, heal, dropped)
