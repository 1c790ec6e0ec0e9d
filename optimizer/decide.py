"""Decisions over one `ClusterState`: which nodes can hold a model (`check`), where it should run (`route`)
and the steps that put the priority models on GPU (`plan`). Pure functions: no I/O, `now` passed in.

Busy models: Ollama stops a model's expiry timer while requests run and only sets `expires_at` when the last
one finishes (reference/ollama-api.md §4.2), so a listed model whose `expires_at` is already past is serving
a request (or stopping after an unload): it is busy and is never evicted. `now` is this host's clock, so a
node whose clock runs far behind makes its models look busy (never evicted): the safe side.

Multi-GPU nodes: a model fits a node when it fits on its largest GPU, or split over all its GPUs, which
costs Ollama's per-GPU reserve once more for every extra GPU. Free VRAM = usable − used
(`NodeState.vram_free`); room is counted per node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from exporter.config import PriorityModel, model_key
from exporter.need import RESERVE, Facts, default_context, model_need
from exporter.ollama import LoadedModel
from exporter.state import ClusterState, ModelNeed, NodeState
from exporter.units import mb

ALL_LAYERS = 999  # num_gpu asking for every layer when a model's layer count is not known

SEARCH_BUDGET = 50_000  # placement-search steps per plan; past it the plan places greedily (huge, full clusters)

FITS = ("loaded_on_gpu", "fits_free", "fits_after_eviction")
_RANK = {kind: rank for rank, kind in enumerate(FITS)}


def is_busy(loaded: LoadedModel, now: float) -> bool:
    """True when requests are in flight (or it is stopping): `expires_at` lies in the past.

    Ollama freezes `expires_at` while requests run and sets it to now + keep_alive when the last one ends;
    an unload sets it to now. A model with no `expires_at` is taken as idle.
    """
    return loaded.expires_at is not None and loaded.expires_at.timestamp() < now


def eviction_order(loaded: LoadedModel) -> tuple[float, str]:
    """Soonest-expiring first; keep_alive forever (expiry centuries away) and unknown expiry last."""
    expires = loaded.expires_at.timestamp() if loaded.expires_at is not None else math.inf
    return (expires, model_key(loaded.name))


def need_of(state: ClusterState, model: str) -> ModelNeed | None:
    """The model's VRAM need: the state's ladder, else the configured size or the catalog."""
    found = state.need(model)
    if found is not None:
        return found
    key = model_key(model)
    priority = state.config.priority(key)
    facts = Facts(
        observed={},
        configured=state.config.model_sizes.get(key),
        num_ctx=priority.num_ctx if priority else None,
    )
    return model_need(key, facts, default_context(state.config))


def _priority_keys(state: ClusterState) -> frozenset[str]:
    return frozenset(model_key(p.name) for p in state.config.priority_models)


# ------------------------------------------------------------------------------------------------ check


@dataclass(frozen=True)
class Verdict:
    """Whether one node can hold a model fully on GPU, with the numbers (bytes) and a sentence.

    kind: loaded_on_gpu | fits_free | fits_after_eviction (these fit) | cpu (running here on a node with no
    GPU) | no_gpu | capacity_unknown | size_unknown | too_large | not_enough_free | down | maintenance |
    not_installed. `need` is what the model takes on this node (split surcharge included); `in_place` is
    set when it only fits by reloading its own CPU/partial copy here.
    """

    node: str
    fits: bool
    kind: str
    reason: str
    need: int | None
    usable: int | None
    free: int | None
    evict: tuple[str, ...] = ()
    in_place: bool = False


@dataclass(frozen=True)
class CheckResult:
    """Every node's verdict for one model, and the one-line result."""

    model: str
    need: ModelNeed | None
    verdicts: tuple[Verdict, ...]
    result: str

    @property
    def fitting(self) -> tuple[Verdict, ...]:
        """The verdicts that fit, best first (route's order)."""
        return tuple(sorted((v for v in self.verdicts if v.fits), key=_preference))


def _preference(v: Verdict) -> tuple[int, bool, int, str]:
    return (_RANK[v.kind], v.in_place, -(v.free or 0), v.node)


@dataclass(frozen=True)
class _Room:
    """A GPU node's VRAM as the decisions see it."""

    usable: int
    free: int  # usable − used, negative when Ollama already uses more than the margin allows
    victims: tuple[LoadedModel, ...]  # idle, non-priority: evictable, in eviction order
    largest: int  # usable VRAM of the largest GPU
    gpus: int

    def need(self, need: int) -> int:
        """Bytes the model takes here: as is on one GPU, plus the reserve per extra GPU when split."""
        return need if need <= self.largest or self.gpus <= 1 else need + RESERVE * (self.gpus - 1)


def _has_gpu(node: NodeState) -> bool | None:
    """False for a CPU node, None when unknown."""
    if not node.capacity.known:
        return None
    return node.capacity.source != "none" and bool(node.vram_total)


def _room(node: NodeState, priority: frozenset[str], now: float) -> _Room:
    victims = sorted(
        (m for m in node.loaded if model_key(m.name) not in priority and not is_busy(m, now)),
        key=eviction_order,
    )
    gpus = node.capacity.gpus
    return _Room(
        usable=node.vram_usable or 0,
        free=(node.vram_usable or 0) - node.vram_used,
        victims=tuple(victims),
        largest=max((int(g.total * node.margin) for g in gpus), default=0),
        gpus=len(gpus),
    )


def _verdict(node: NodeState, key: str, need: ModelNeed | None, priority: frozenset[str], now: float) -> Verdict:
    name = node.name
    if not node.up:
        return Verdict(name, False, "down", f"Node down ({node.error or node.error_kind})", None, None, None)
    if node.config.maintenance:
        return Verdict(name, False, "maintenance", "Node in maintenance: never a target", None, None, None)
    copy = node.loaded_model(key)
    if copy is None and node.installed_model(key) is None:
        why = "Model not installed here (the router never pulls)"
        return Verdict(name, False, "not_installed", why, None, None, None)
    usable, free = node.vram_usable, node.vram_free
    if copy is not None and copy.fully_on_gpu:
        why = f"Already loaded fully on GPU ({mb(copy.size)}MB)"
        return Verdict(name, True, "loaded_on_gpu", why, copy.size, usable, free)
    gpu = _has_gpu(node)
    if gpu is False:
        kind, why = ("cpu", "Node has no GPU (running here on CPU)") if copy else ("no_gpu", "Node has no GPU")
        return Verdict(name, False, kind, why, None, None, None)
    if gpu is None:
        reason = node.capacity.reason
        why = f"GPU capacity unknown: set vram or gpus for node {name}, or gpu_source"
        if "set vram" in reason:  # the capacity source already names the fix
            why = f"GPU capacity unknown: {reason}"
        elif reason:
            why += f" ({reason})"
        return Verdict(name, False, "capacity_unknown", why, None, None, None)
    if need is None:
        why = "VRAM need unknown: set model_sizes for it"
        return Verdict(name, False, "size_unknown", why, None, usable, free)
    room = _room(node, priority, now)
    bytes_ = room.need(need.bytes)
    reload = copy is not None and not is_busy(copy, now)
    here = ""
    if copy is not None:
        here = f" (loaded here {copy.gpu_ratio:.0%} on GPU, "
        here += "reload in place)" if reload else "busy: cannot reload now)"
    if bytes_ > room.usable:
        why = f"Model too large ({mb(bytes_)}MB > {mb(room.usable)}MB usable VRAM){here}"
        return Verdict(name, False, "too_large", why, bytes_, usable, free)
    if copy is not None and not reload:
        why = f"Not enough free VRAM now{here}"
        return Verdict(name, False, "not_enough_free", why, bytes_, usable, free)
    room_now = room.free + (copy.size_vram if copy is not None else 0)
    if bytes_ <= room_now:
        why = f"Fits in {mb(room.usable)}MB VRAM ({mb(max(0, room_now))}MB free){here}"
        return Verdict(name, True, "fits_free", why, bytes_, usable, free, in_place=reload)
    evict, freed = _victims((v for v in room.victims if model_key(v.name) != key), bytes_ - room_now)
    if freed >= bytes_ - room_now:
        why = (
            f"Fits in {mb(room.usable)}MB VRAM after evicting idle {', '.join(evict)} "
            f"({mb(room_now + freed)}MB free){here}"
        )
        return Verdict(name, True, "fits_after_eviction", why, bytes_, usable, free, evict, reload)
    held = sorted(model_key(m.name) for m in node.loaded if m not in room.victims and model_key(m.name) != key)
    why = f"Not enough free VRAM ({mb(bytes_)}MB needed, {mb(max(0, room_now))}MB free"
    if evict:
        why += f", {mb(max(0, room_now + freed))}MB after evicting every idle model"
    if held:
        why += f"; held by priority or busy models: {', '.join(held)}"
    why += f"){here}"
    return Verdict(name, False, "not_enough_free", why, bytes_, usable, free)


def _victims(candidates: Iterable[LoadedModel], shortfall: int) -> tuple[tuple[str, ...], int]:
    """The shortest-lived idle models whose VRAM covers `shortfall` (all of them when it is not enough)."""
    names: list[str] = []
    freed = 0
    for victim in candidates:
        if freed >= shortfall:
            break
        names.append(model_key(victim.name))
        freed += victim.size_vram
    return tuple(names), freed


def check(state: ClusterState, model: str, now: float) -> CheckResult:
    """Per node: can it hold `model` fully on GPU, and why (not)."""
    key = model_key(model)
    need = need_of(state, key)
    priority = _priority_keys(state)
    verdicts = tuple(_verdict(node, key, need, priority, now) for node in state.nodes)
    return CheckResult(model=key, need=need, verdicts=verdicts, result=_result(verdicts))


def _result(verdicts: Sequence[Verdict]) -> str:
    by_kind: dict[str, list[str]] = {}
    for v in verdicts:
        by_kind.setdefault(v.kind, []).append(v.node)
    if "loaded_on_gpu" in by_kind:
        return f"Already on GPU: {', '.join(by_kind['loaded_on_gpu'])}"
    fits = [v for v in verdicts if v.fits]
    if fits:
        parts = [v.node + (f" (after evicting {', '.join(v.evict)})" if v.evict else "") for v in fits]
        return f"Fits on GPU: {', '.join(parts)}"
    unknown = by_kind.get("capacity_unknown", [])
    runnable = [v for v in verdicts if v.kind in ("cpu", "no_gpu", "too_large", "not_enough_free")]
    if not runnable and not unknown:
        return "No node can run it: not installed on any node that is up and not in maintenance"
    result = "Model must run on CPU"
    if "not_enough_free" in by_kind:
        result += f" for now (no room on {', '.join(by_kind['not_enough_free'])})"
    if unknown:
        result += f"; GPU capacity unknown on {', '.join(unknown)}"
    return result


# ------------------------------------------------------------------------------------------------ route


@dataclass(frozen=True)
class Route:
    """Where a model should run (processor "GPU" or "CPU"; None when nowhere), and why."""

    model: str
    node: str | None
    processor: str | None
    reason: str
    verdicts: tuple[Verdict, ...]


def route(state: ClusterState, model: str, now: float) -> Route:
    """The best node: on GPU already > fits free VRAM > fits after evictions > CPU; then most free VRAM."""
    result = check(state, model, now)
    if result.fitting:
        best = result.fitting[0]
        return Route(result.model, best.node, "GPU", best.reason, result.verdicts)
    return _cpu_route(state, result)


def _ram_held(node: NodeState) -> int:
    return sum(m.size - m.size_vram for m in node.loaded)


def _cpu_route(state: ClusterState, result: CheckResult) -> Route:
    """CPU fallback: a node with the model installed, preferring no GPU, a copy already running, least RAM held.

    We do not know a node's RAM, so "most free memory" is approximated by the least memory held in RAM by
    the models loaded there.
    """
    key = result.model
    candidates = [
        n for n in state.nodes if n.up and not n.config.maintenance and (n.installed_model(key) or n.loaded_model(key))
    ]
    if not candidates:
        return Route(key, None, None, result.result, result.verdicts)

    def order(n: NodeState) -> tuple[bool, bool, int, str]:
        return (_has_gpu(n) is not False, n.loaded_model(key) is None, _ram_held(n), n.name)

    best = min(candidates, key=order)
    facts = ["has no GPU" if _has_gpu(best) is False else "has the model installed"]
    if best.loaded_model(key) is not None:
        facts.append("already runs it")
    facts.append(f"{mb(_ram_held(best))}MB held in RAM by loaded models")
    why = f"No GPU can hold it fully; {best.name} {', '.join(facts)}"
    if len(candidates) > 1:
        why += f" (best of {len(candidates)} CPU candidates)"
    return Route(key, best.name, "CPU", why, result.verdicts)


# ------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Step:
    """One action. `unload` removes a CPU/partial copy elsewhere, only once the GPU copy is verified.

    `for_model` is the priority model the step serves (an eviction's victim is `model`); None = `model`.
    """

    action: str  # "evict" | "load" | "unload"
    model: str
    node: str
    reason: str
    num_ctx: int | None = None
    keep_alive: int | float | str = -1
    for_model: str | None = None
    num_gpu: int | None = None  # set on a reload in place: every layer on GPU (Ollama reloads on a changed num_gpu)

    @property
    def serves(self) -> str:
        return self.for_model or self.model


@dataclass(frozen=True)
class Plan:
    """Steps in order; models that cannot be placed, with why; models already fully on GPU (no step)."""

    steps: tuple[Step, ...]
    unplaced: tuple[tuple[str, str], ...]
    already: tuple[tuple[str, str], ...]

    @property
    def loads(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.action == "load")


@dataclass
class _Bin:
    """A target node during planning."""

    name: str
    node: NodeState
    room: _Room
    cap: int  # free + every idle non-priority model's VRAM: the most a plan can use here (may be < 0)
    installed: frozenset[str]
    loaded: dict[str, LoadedModel]


@dataclass
class _Item:
    """A priority model to place: bytes it takes on each eligible bin (its own reclaimed copy subtracted)."""

    key: str
    model: PriorityModel
    need: int
    sizes: dict[int, int]
    own: frozenset[int]  # bins where it reloads its own CPU/partial copy


class _Packer:
    """Priority-respecting placement: a model is added when some assignment of every model kept so far plus
    it fits (an exact search, bounded by SEARCH_BUDGET steps per plan); earlier models may move to make room.
    """

    def __init__(self, bins: list[_Bin]) -> None:
        self.bins = bins
        self.load = [0] * len(bins)
        self.assign: dict[int, int] = {}  # item index → bin index
        self.items: list[_Item] = []
        self.budget = SEARCH_BUDGET

    def _key(self, item: _Item, b: int, load: Sequence[int]) -> tuple[bool, bool, int, str]:
        bin_ = self.bins[b]
        after = load[b] + item.sizes[b]
        return (after > bin_.room.free, b in item.own, -(bin_.room.free - load[b]), bin_.name)

    def _best(self, item: _Item, load: Sequence[int]) -> int | None:
        fitting = [b for b, size in item.sizes.items() if load[b] + size <= self.bins[b].cap]
        return min(fitting, key=lambda b: self._key(item, b, load)) if fitting else None

    def add(self, item: _Item) -> bool:
        index = len(self.items)
        self.items.append(item)
        best = self._best(item, self.load)
        if best is None:
            best_assign = self._search(index)
            if best_assign is None:
                self.items.pop()
                return False
            self.assign = best_assign
        else:
            self.assign[index] = best
        self.load = [0] * len(self.bins)
        for i, b in self.assign.items():
            self.load[b] += self.items[i].sizes[b]
        return True

    def _search(self, new: int) -> dict[int, int] | None:
        """Re-place the models that share bins with `new` (its connected component), exactly."""
        items, bins = self._component(new)
        fixed = list(self.load)
        for i in items:
            if i in self.assign:
                fixed[self.assign[i]] -= self.items[i].sizes[self.assign[i]]
        room = {b: self.bins[b].cap - fixed[b] for b in bins}
        need = sum(min(self.items[i].sizes.values()) for i in items)
        if need > sum(max(r, 0) for r in room.values()) or self.budget <= 0:
            return None
        order = sorted(items, key=lambda i: (len(self.items[i].sizes), -max(self.items[i].sizes.values())))
        profile = {b: tuple(self.items[i].sizes.get(b) for i in order) for b in bins}
        rest = [0] * (len(order) + 1)
        for k in range(len(order) - 1, -1, -1):
            rest[k] = rest[k + 1] + min(self.items[order[k]].sizes.values())
        load = list(fixed)
        chosen: dict[int, int] = {}

        def dfs(k: int, spare: int) -> bool:
            if k == len(order):
                return True
            self.budget -= 1
            if self.budget <= 0 or rest[k] > spare:
                return False
            item = self.items[order[k]]
            seen = set()
            candidates = [b for b, size in item.sizes.items() if load[b] + size <= self.bins[b].cap]
            for b in sorted(candidates, key=lambda b: self._key(item, b, load)):
                signature = (self.bins[b].cap - load[b], profile[b])
                if signature in seen:
                    continue
                seen.add(signature)
                size = item.sizes[b]
                load[b] += size
                chosen[order[k]] = b
                if dfs(k + 1, spare - size):
                    return True
                load[b] -= size
            return False

        if not dfs(0, sum(max(r, 0) for r in room.values())):
            return None
        return {**{i: b for i, b in self.assign.items() if i not in chosen}, **chosen}

    def _component(self, new: int) -> tuple[list[int], set[int]]:
        """Items and bins linked to `new` through eligibility (only these can move to make room)."""
        by_bin: dict[int, list[int]] = {}
        for i, item in enumerate(self.items):
            for b in item.sizes:
                by_bin.setdefault(b, []).append(i)
        items, bins, todo = {new}, set(), [new]
        while todo:
            for b in self.items[todo.pop()].sizes:
                if b in bins:
                    continue
                bins.add(b)
                for j in by_bin[b]:
                    if j not in items:
                        items.add(j)
                        todo.append(j)
        return sorted(items), bins

    def improve(self) -> None:
        """One pass in priority order: move a model to a strictly better bin where it fits."""
        for i, b in sorted(self.assign.items()):
            item = self.items[i]
            self.load[b] -= item.sizes[b]
            best = self._best(item, self.load)
            if best is None or self._key(item, best, self.load) >= self._key(item, b, self.load):
                best = b
            self.assign[i] = best
            self.load[best] += item.sizes[best]


def plan(
    state: ClusterState,
    models: Sequence[PriorityModel] | None = None,
    now: float | None = None,
) -> Plan:
    """The steps that put each model (default: the configured priority models) fully on GPU somewhere.

    In priority order, a model is placed when it fits together with every model placed before it (which
    may move to leave room). Never evicts a priority model (any configured one), a busy model, or anything
    on a node that is down, in maintenance or of unknown capacity. Copies on a node in maintenance do not
    count as placed (drain) and are never touched.
    """
    now = state.taken_at if now is None else now
    wanted = _unique(state.config.priority_models if models is None else models)
    priority = _priority_keys(state) | {model_key(p.name) for p in wanted}
    live = [n for n in state.nodes if n.up and not n.config.maintenance]
    targets = [n for n in live if _has_gpu(n)]
    bins = []
    for node in targets:
        room = _room(node, priority, now)
        cap = room.free + sum(v.size_vram for v in room.victims)
        installed = frozenset(model_key(m.name) for m in node.installed)
        loaded = {model_key(m.name): m for m in node.loaded}
        bins.append(_Bin(node.name, node, room, cap, installed, loaded))
    copies: dict[str, list[tuple[NodeState, LoadedModel]]] = {}
    for node in live:
        for m in node.loaded:
            copies.setdefault(model_key(m.name), []).append((node, m))
    packer = _Packer(bins)
    already: list[tuple[str, str]] = []
    unplaced: list[tuple[str, str]] = []
    for pm in wanted:
        key = model_key(pm.name)
        home = next((n.name for n, m in copies.get(key, ()) if m.fully_on_gpu), None)
        if home is not None:
            already.append((key, home))
            continue
        item, why = _item(state, key, pm, bins, now)
        if item is None:
            unplaced.append((key, why))
        elif not packer.add(item):
            unplaced.append((key, f"no room left after higher-priority models ({why})"))
    packer.improve()
    return Plan(tuple(_steps(packer, copies, state.layers)), tuple(unplaced), tuple(already))


def restrict(full: Plan, models: Iterable[str]) -> Plan:
    """The part of a whole-cluster plan that serves `models`.

    Planning one model alone would place it greedily and could take the room a later priority model needs;
    a job for one model runs its share of the plan for all of them instead.
    """
    keys = {model_key(m) for m in models}
    return Plan(
        steps=tuple(s for s in full.steps if model_key(s.serves) in keys),
        unplaced=tuple((m, why) for m, why in full.unplaced if model_key(m) in keys),
        already=tuple((m, n) for m, n in full.already if model_key(m) in keys),
    )


def _unique(models: Iterable[PriorityModel]) -> list[PriorityModel]:
    seen: set[str] = set()
    out = []
    for pm in models:
        if model_key(pm.name) not in seen:
            seen.add(model_key(pm.name))
            out.append(pm)
    return out


def _item(
    state: ClusterState, key: str, pm: PriorityModel, bins: Sequence[_Bin], now: float
) -> tuple[_Item | None, str]:
    """The model's size on every bin that could hold it, or None and why none can."""
    need = need_of(state, key)
    if need is None:
        return None, "VRAM need unknown: not installed anywhere and not in the catalog; set model_sizes"
    sizes: dict[int, int] = {}
    own: set[int] = set()
    for b, bin_ in enumerate(bins):
        copy = bin_.loaded.get(key)
        if copy is None and key not in bin_.installed:
            continue
        size = bin_.room.need(need.bytes)
        if copy is not None:
            if is_busy(copy, now):
                continue
            size = max(0, size - copy.size_vram)
            own.add(b)
        if size <= bin_.cap:
            sizes[b] = size
    if sizes:
        return _Item(key, pm, need.bytes, sizes, frozenset(own)), ", ".join(bins[b].name for b in sorted(sizes))
    reasons = [f"{v.node}: {v.reason}" for v in check(state, key, now).verdicts]
    return None, "no node can hold it on GPU: " + "; ".join(reasons)


def _steps(
    packer: _Packer, copies: dict[str, list[tuple[NodeState, LoadedModel]]], layers: Mapping[str, int]
) -> list[Step]:
    """Evictions (per node, in priority order of the loads that need them), the load, then copy removals."""
    spent = {b: 0 for b in range(len(packer.bins))}
    freed = {b: 0 for b in range(len(packer.bins))}
    victims = {b: list(bin_.room.victims) for b, bin_ in enumerate(packer.bins)}
    steps: list[Step] = []
    for i, b in sorted(packer.assign.items()):
        item, bin_ = packer.items[i], packer.bins[b]
        size = item.sizes[b]
        num_gpu = None
        if b in item.own:  # Ollama itself swaps the runner when num_gpu changes: no unload of ours first
            num_gpu = layers.get(item.key, ALL_LAYERS)
        while spent[b] + size > bin_.room.free + freed[b] and victims[b]:
            victim = victims[b].pop(0)
            freed[b] += victim.size_vram
            why = f"make room for {item.key} (idle, {mb(victim.size_vram)}MB)"
            steps.append(Step("evict", model_key(victim.name), bin_.name, why, for_model=item.key))
        spent[b] += size
        why = f"put {item.key} on GPU ({mb(item.need)}MB)"
        if num_gpu is not None:
            why += f", reloading its {bin_.loaded[item.key].gpu_ratio:.0%}-on-GPU copy in place with every layer on GPU"
        steps.append(Step("load", item.key, bin_.name, why, item.model.num_ctx, item.model.keep_alive, num_gpu=num_gpu))
        for node, copy in copies.get(item.key, ()):
            if node.name == bin_.name:
                continue
            why = f"remove the {copy.gpu_ratio:.0%}-on-GPU copy once {item.key} is verified on {bin_.name}"
            steps.append(Step("unload", item.key, node.name, why))
    return steps
