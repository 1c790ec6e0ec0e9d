"""Placement from demand: after the priority models, the models the proxy is asked for most are kept fully on
GPU (`desired`). Pure: the demand read from the proxy, the cluster state and `now` are passed in.

- Score: requests per minute × GiB the model takes (the smallest figure over the GPU nodes): what a GPU copy
  saves grows with both (MuxServe's popularity × size).
- Chosen in score order, each only when a plan with it and every model chosen before it puts it on GPU and
  leaves no model ahead of it off GPU; a model already on GPU counts its score (1 + `min_gain`) times, so a
  newcomer displaces it only when it is clearly hotter (no thrash).
- Below `min_requests_per_minute` a model is not placed for its demand, and one that was is released (its
  idle copies are unloaded).
- More copies: a model whose mean requests in flight exceed one runner's slots gets as many GPU copies as the
  load asks for, and one whose requests keep waiting in the proxy (mean ≥ `prewarm_queue`) one more (a
  pre-warm); one copy more a pass, on another node, after every model has its first.
- Never evicted: priority and busy models, and a model with proxy requests in flight on that node; among idle
  victims, partial and CPU copies go first, then the least demanded.
- Kept warm: a copy placed for demand is loaded with `demand.keep_alive` and asked again (a pin: no reload)
  once less than half of it is left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpurouter.cluster.config import DemandSettings, PriorityModel, model_key
from gpurouter.cluster.demandfeed import ModelDemand
from gpurouter.cluster.goduration import parse_keep_alive
from gpurouter.cluster.state import ClusterState, NodeState
from gpurouter.decide import placement
from gpurouter.decide.placement import Plan, PlanDemand, Step
from gpurouter.decide.route.candidates import slots_of
from gpurouter.units import GIB

MAX_CANDIDATES = 32  # models tried in score order in one pass (each costs a plan)


@dataclass(frozen=True)
class DemandChoice:
    """Why one model is (not) placed for its demand: `copies` GPU copies wanted (0: not placed)."""

    model: str
    per_minute: float
    score: float
    copies: int
    why: str


@dataclass(frozen=True)
class Desired:
    """The plan (priority models, then models placed for demand, renewals and releases), the models it places
    (priority first), each demanded model's choice, and the (node, model) pairs it wants on GPU."""

    plan: Plan
    models: tuple[PriorityModel, ...]
    choices: tuple[DemandChoice, ...] = ()
    targets: frozenset[tuple[str, str]] = frozenset()

    def entry(self, model: str) -> PriorityModel | None:
        key = model_key(model)
        return next((m for m in self.models if model_key(m.name) == key), None)

    @property
    def placed(self) -> frozenset[str]:
        """The models placed for their demand (not the priority ones)."""
        return frozenset(c.model for c in self.choices if c.copies)


def desired(
    state: ClusterState,
    demand: Mapping[str, ModelDemand] | None,
    settings: DemandSettings,
    now: float,
    placed_before: Iterable[str] = (),
) -> Desired:
    """The desired placement. `demand` None (not read, or placement from demand off): the priority list only.
    `placed_before`: the models an earlier pass placed for their demand (released when theirs fell). `demand` is
    keyed by `model_key`."""
    priority = tuple(placement.unique_models(state.config.priority_models))
    if demand is None:
        only = placement.plan(state, priority, now)
        return Desired(only, priority, targets=_targets(state, only, priority, {}))
    in_flight = frozenset((node, m) for m, d in demand.items() for node, n in d.in_flight.items() if n > 0)
    scores = {m: _score(state, d) for m, d in demand.items()}
    keys = {model_key(p.name) for p in priority}
    models = list(priority)
    context = PlanDemand(in_flight=in_flight, score=scores)
    lost = {m for m, _ in placement.plan(state, models, now, context).unplaced}
    choices: dict[str, DemandChoice] = {}
    keep_alive = settings.keep_alive
    ranked = sorted(
        (m for m in demand if m not in keys),
        key=lambda m: (-scores[m] * (1 + settings.min_gain if state.on_gpu(m) else 1), m),
    )
    tried = 0
    for key in ranked:
        d = demand[key]
        rate, score = d.per_minute, scores[key]
        if rate < settings.min_requests_per_minute:
            choices[key] = DemandChoice(key, rate, score, 0, _below(rate, settings))
            continue
        if not placement.model_needs(state, key) or not _gpu_nodes_with(state, key):
            why = f"{rate:.1f} requests/min, but no GPU node that is up and not in maintenance has it installed"
            choices[key] = DemandChoice(key, rate, score, 0, why)
            continue
        if tried >= MAX_CANDIDATES:
            choices[key] = DemandChoice(key, rate, score, 0, f"{rate:.1f} requests/min: not tried (more hotter models)")
            continue
        tried += 1
        pm = PriorityModel(key, keep_alive=keep_alive)
        trial = placement.plan(state, [*models, pm], now, context)
        unplaced = dict(trial.unplaced)
        if key in unplaced:
            choices[key] = DemandChoice(
                key, rate, score, 0, f"{rate:.1f} requests/min, no room on GPU: {unplaced[key]}"
            )
        elif set(unplaced) - lost:
            ahead = ", ".join(sorted(set(unplaced) - lost))
            choices[key] = DemandChoice(
                key, rate, score, 0, f"{rate:.1f} requests/min; placing it would leave {ahead} off GPU"
            )
        else:
            models.append(pm)
            choices[key] = DemandChoice(key, rate, score, 1, f"{rate:.1f} requests/min")
    copies, why_more = _copies(state, demand, models, settings)
    context = PlanDemand(copies=copies, in_flight=in_flight, score=scores, keep_alive=keep_alive)
    final = placement.plan(state, models, now, context)
    for key, choice in list(choices.items()):
        if choice.copies:
            text = f"{choice.why}: {_where(state, final, key)}{_more(state, final, key, copies, why_more)}"
            choices[key] = DemandChoice(key, choice.per_minute, choice.score, copies.get(key, 1), text)
    for p in priority:
        key = model_key(p.name)
        if key in demand:
            d = demand[key]
            text = f"priority model ({d.per_minute:.1f} requests/min): {_where(state, final, key)}"
            text += _more(state, final, key, copies, why_more)
            choices[key] = DemandChoice(key, d.per_minute, scores[key], copies.get(key, 1), text)
    placed = {key for key, c in choices.items() if c.copies and key not in keys}
    extra = _renewals(state, placed, keys, copies, settings, now) + _releases(
        state, set(placed_before) - placed - keys, demand, settings, in_flight, now
    )
    plan = Plan(final.steps + tuple(extra), final.unplaced, final.already)
    ordered = tuple(sorted(choices.values(), key=lambda c: (-c.score, c.model)))
    return Desired(plan, tuple(models), ordered, _targets(state, final, models, copies))


def _score(state: ClusterState, d: ModelDemand) -> float:
    """Requests per minute × GiB the model takes (its smallest need over the GPU nodes; 1 GiB when unknown)."""
    needs = placement.model_needs(state, d.model)
    gib = min((n.bytes for n in needs.values()), default=GIB) / GIB
    return d.per_minute * gib


def _gpu_nodes_with(state: ClusterState, key: str) -> list[NodeState]:
    """The GPU nodes that are up, not in maintenance, and have the model installed or loaded."""
    return [
        n
        for n in state.nodes
        if n.up
        and not n.config.maintenance
        and placement.has_gpu(n)
        and (n.installed_model(key) or n.loaded_model(key))
    ]


def _copies(
    state: ClusterState, demand: Mapping[str, ModelDemand], models: list[PriorityModel], settings: DemandSettings
) -> tuple[dict[str, int], dict[str, str]]:
    """GPU copies wanted per model where more than one, and the words that say why."""
    copies: dict[str, int] = {}
    why: dict[str, str] = {}
    for pm in models:
        key = model_key(pm.name)
        d = demand.get(key)
        if d is None:
            continue
        eligible = _gpu_nodes_with(state, key)
        if len(eligible) < 2:
            continue
        slots = max(slots_of(state, n, key) for n in eligible)
        on_gpu = sum(1 for n, _ in state.gpu_copies(key) if n in eligible)
        asked = math.ceil(d.in_flight_mean / slots) if d.in_flight_mean > slots else 1
        want = min(asked, len(eligible))
        text = f"; {want} copies: {d.in_flight_mean:.1f} requests in flight on average, {slots} at once a runner" + (
            f" (the load asks for {asked}; {len(eligible)} GPU nodes have it)" if asked > want else ""
        )
        if d.waiting_mean >= settings.prewarm_queue and want <= on_gpu < len(eligible):
            want = on_gpu + 1
            text = (
                f"; another copy (pre-warm): {d.waiting_mean:.1f} requests waiting in the proxy on average, "
                f"demand.prewarm_queue {settings.prewarm_queue:g}"
            )
        if want > 1:
            copies[key] = want
            why[key] = text
    return copies, why


def _more(state: ClusterState, p: Plan, key: str, copies: Mapping[str, int], why: Mapping[str, str]) -> str:
    """Why more GPU copies are wanted, and, when the plan cannot give them, that it cannot."""
    if key not in why:
        return ""
    placed = len(state.gpu_copies(key)) + sum(1 for s in p.loads if s.model == key)
    if placed >= copies[key]:
        return why[key]
    return f"{why[key]}; {placed} placed: no other GPU node has room without evicting a model placed before it"


def _where(state: ClusterState, p: Plan, key: str) -> str:
    homes = sorted(n.name for n, _ in state.gpu_copies(key))
    loads = sorted(s.node for s in p.loads if s.model == key)
    parts = [f"on GPU on {', '.join(homes)}"] if homes else []
    parts += [f"to load on {', '.join(loads)}"] if loads else []
    return "; ".join(parts) or "not on GPU"


def _targets(
    state: ClusterState, p: Plan, models: Iterable[PriorityModel], copies: Mapping[str, int]
) -> frozenset[tuple[str, str]]:
    """(node, model) of every GPU copy the placement wants: the copies on GPU now (as many as wanted) and the
    loads of the plan."""
    found = set()
    for pm in models:
        key = model_key(pm.name)
        found |= {(n.name, key) for n, _ in state.gpu_copies(key)[: copies.get(key, 1)]}
    found |= {(s.node, s.model) for s in p.loads}
    return frozenset(found)


def _renewals(
    state: ClusterState,
    placed: set[str],
    priority: set[str],
    copies: Mapping[str, int],
    settings: DemandSettings,
    now: float,
) -> list[Step]:
    """A pin for each GPU copy of a model placed for demand (as many as wanted), and each further copy of a
    priority model that wants more than one (its first keeps its own pin), with less than half of
    `demand.keep_alive` left: it stays loaded through quiet gaps, and Ollama's own default never unloads it."""
    seconds = parse_keep_alive(settings.keep_alive)
    steps = []
    for key in sorted(placed | {k for k in copies if k in priority}):
        first = 1 if key in priority else 0
        for node, copy in state.gpu_copies(key)[first : copies.get(key, 1)]:
            if copy.expires_at is None or placement.is_busy(copy, now):
                continue
            left = copy.expires_at.timestamp() - now
            if left < seconds / 2:
                why = f"keep {key} warm: {left:.0f}s of keep_alive left, demand.keep_alive {settings.keep_alive}"
                steps.append(Step("pin", key, node.name, why, copy.context_length, settings.keep_alive))
    return steps


def _releases(
    state: ClusterState,
    fallen: set[str],
    demand: Mapping[str, ModelDemand],
    settings: DemandSettings,
    in_flight: frozenset[tuple[str, str]],
    now: float,
) -> list[Step]:
    """Unload every idle copy (no proxy request in flight) of a model placed for demand whose demand fell below
    the threshold."""
    steps = []
    for key in sorted(fallen):
        rate = demand[key].per_minute if key in demand else 0.0
        if rate >= settings.min_requests_per_minute:
            continue  # outranked, not cold: it stays until a hotter model needs the room
        for node, copy in state.placements(key):
            if node.config.maintenance or placement.is_busy(copy, now) or (node.name, key) in in_flight:
                continue
            steps.append(Step("release", key, node.name, f"release: {_below(rate, settings)}"))
    return steps


def _below(rate: float, settings: DemandSettings) -> str:
    return f"{rate:.1f} requests/min, below demand.min_requests_per_minute ({settings.min_requests_per_minute:g})"
