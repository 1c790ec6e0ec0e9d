"""Decisions over one `ClusterState`: which nodes can hold a model (`check`), where it should run (`route`)
and the steps that put the priority models on GPU (`plan`). Pure functions: no I/O, `now` passed in.

Busy models: Ollama stops a model's expiry timer while requests run and only sets `expires_at` when the last
one finishes (reference/ollama-api.md §4.2), so a listed model whose `expires_at` is already past is serving
a request (or stopping after an unload): it is busy and is never evicted. `now` is this host's clock, so a
node whose clock runs far behind makes its models look busy (never evicted): the safe side.

What a model takes, and what fits, is judged per node by the rules of the Ollama it runs (`gpurouter.sizing.room`):
the need comes from the node's own ladder answer (its era, the context the model gets there), and on a
llama-server node a model must also leave llama.cpp's fit margin free and, beside other loaded models, pass
Ollama's 80 % admission test — or Ollama would evict something the plan did not choose. Room is counted
per node.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from gpurouter.cluster.config import PriorityModel, model_key
from gpurouter.cluster.goduration import FOREVER, parse_keep_alive
from gpurouter.cluster.ollama import LoadedModel
from gpurouter.cluster.state import ClusterState, ModelNeed, NodeState
from gpurouter.sizing import catalog, eras
from gpurouter.sizing.need import Facts, Sizing, model_need
from gpurouter.sizing.room import Room, per_gpu_extra
from gpurouter.units import size_text

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


def need_of(state: ClusterState, model: str, node: NodeState) -> ModelNeed | None:
    """What the model takes on `node`: the state's ladder, else the configured size or the catalog."""
    found = state.need(model, node.name)
    if found is not None:
        return found
    key = model_key(model)
    priority = state.config.priority(key)
    facts = Facts(
        observed={},
        configured=state.config.model_sizes.get(key),
        num_ctx=priority.num_ctx if priority else None,
    )
    return model_need(key, facts, Sizing.of(node))


def model_needs(state: ClusterState, model: str) -> dict[str, ModelNeed]:
    """What the model takes on every node that has (or may have) a GPU, installed there or not: the `needs`
    of every answer (route, check, models, report)."""
    needs = {}
    for node in state.nodes:
        if node.capacity.known and not node.vram_total:
            continue  # a CPU node
        need = need_of(state, model, node)
        if need is not None:
            needs[node.name] = need
    return needs


def installed_models(state: ClusterState) -> list[str]:
    """Every model installed or loaded on a node that answered, sorted."""
    names = {model_key(m.name) for n in state.nodes for m in (*n.installed, *n.loaded)}
    return sorted(names)


def _likeness(wanted: str, name: str) -> float:
    """How alike two model names are: whole names, or the names without their tags (`llama9` ~ `llama3.2:1b`)."""
    whole = difflib.SequenceMatcher(None, wanted, name).ratio()
    base = difflib.SequenceMatcher(None, wanted.split(":")[0], name.split(":")[0]).ratio()
    return max(whole, base)


def close_models(state: ClusterState, model: str, limit: int = 3, cutoff: float = 0.6) -> list[str]:
    """Names close to `model`: the installed (or loaded) ones first, catalog names only when no installed one
    is close and `model` is not a catalog name itself (a known name is not a misspelling). Names that begin with
    it come first, shortest first (`mxbai` → mxbai-embed-large, `llama3.2` → llama3.2:1b and :3b); else the
    closest by spelling and those nearly as close, the tag compared only where `model` gives one."""
    key = model_key(model)
    wanted = key if ":" in model.strip().rsplit("/", 1)[-1] else key.rsplit(":", 1)[0]  # not `mxbai:latest`
    pools = [installed_models(state)]
    if catalog.find(key) is None:
        pools.append(sorted({n for spec in catalog.CATALOG for n in (spec.name, *spec.aliases)}))
    for names in pools:
        prefixed = _beginning_with(names, key, limit)
        if prefixed:
            return prefixed
        scored = sorted(((_likeness(wanted, n), n) for n in names if n != key), key=lambda x: (-x[0], x[1]))
        if scored and scored[0][0] >= cutoff:  # the best, and those nearly as close (not every distant cousin)
            floor = max(cutoff, scored[0][0] - 0.15)
            return [n for score, n in scored if score >= floor][:limit]
    return []


def _beginning_with(names: Iterable[str], key: str, limit: int = 3) -> list[str]:
    """The names other than `key` that begin with its name without the tag, shortest first."""
    base = key.rsplit(":", 1)[0]
    return sorted((n for n in names if n != key and n.startswith(base)), key=lambda n: (len(n), n))[:limit]


def is_known(state: ClusterState, model: str) -> bool:
    """Installed or loaded on a node that answered, in the catalog, or given a size in the configuration; a
    priority model counts too while a node is down (it may be installed there)."""
    key = model_key(model)
    if key in installed_models(state) or key in state.config.model_sizes or catalog.find(key) is not None:
        return True
    return any(not n.up for n in state.nodes) and state.config.priority(key) is not None


def uninstalled_priority(state: ClusterState) -> list[str]:
    """Priority models that no node that answered has installed or loaded (a misspelt name, or not pulled)."""
    there = set(installed_models(state))
    return [model_key(p.name) for p in state.config.priority_models if model_key(p.name) not in there]


def _priority_keys(state: ClusterState) -> frozenset[str]:
    return frozenset(model_key(p.name) for p in state.config.priority_models)


# ------------------------------------------------------------------------------------------------ check


NOT_INSTALLED = "Model not installed here (the router never pulls)"  # the reason of every not_installed verdict
KIND_WORDS = {  # a verdict's kind (a code, for JSON) in words, for people
    "loaded_on_gpu": "on GPU now",
    "fits_free": "fits now",
    "fits_after_eviction": "fits after evicting idle models",
    "cpu": "runs on CPU here",
    "no_gpu": "no GPU",
    "capacity_unknown": "GPU capacity unknown",
    "size_unknown": "VRAM need unknown",
    "too_large": "too large",
    "not_enough_free": "no room now",
    "down": "node down",
    "maintenance": "in maintenance",
    "not_installed": "not installed",
}


@dataclass(frozen=True)
class Verdict:
    """Whether one node can hold a model fully on GPU, with the numbers (bytes) and a sentence.

    kind: loaded_on_gpu | fits_free | fits_after_eviction (these fit) | cpu (running here on a node with no
    GPU) | no_gpu | capacity_unknown | size_unknown | too_large | not_enough_free | down | maintenance |
    not_installed. `need` is what the model takes on this node (split surcharge included); `sizing` the
    ladder's answer behind it (source, context, era); `in_place` is set when it only fits by reloading its own
    CPU/partial copy here.
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
    sizing: ModelNeed | None = None


@dataclass(frozen=True)
class CheckResult:
    """Every node's verdict for one model, and the one-line result."""

    model: str
    verdicts: tuple[Verdict, ...]
    result: str  # the overall answer in words
    needs: Mapping[str, ModelNeed]  # node → what the model takes there (`model_needs`)
    code: str  # the overall answer: a key of RESULT_CODES

    @property
    def fitting(self) -> tuple[Verdict, ...]:
        """The verdicts that fit, best first (route's order)."""
        return tuple(sorted((v for v in self.verdicts if v.fits), key=_preference))


def _preference(v: Verdict) -> tuple[int, bool, int, str]:
    return (_RANK[v.kind], v.in_place, -(v.free or 0), v.node)


def victims_of(node: NodeState, priority: frozenset[str], now: float) -> list[LoadedModel]:
    """The models Ollama may be asked to unload here: idle and not a priority model, in eviction order."""
    return sorted(
        (m for m in node.loaded if model_key(m.name) not in priority and not is_busy(m, now)), key=eviction_order
    )


def has_gpu(node: NodeState) -> bool | None:
    """False for a CPU node, None when unknown."""
    if not node.capacity.known:
        return None
    return node.capacity.source != "none" and bool(node.vram_total)


def sizing_text(need: ModelNeed) -> str:
    """`5024 MB at 4096 tokens (llama-server, estimated)`: a need with the context and era behind it."""
    return f"{size_text(need.bytes)} at {need.num_ctx} tokens ({eras.LABELS[need.era]}, {need.source})"


def _rules_text(room: Room, need: ModelNeed) -> str:
    """What must stay free beside the model on this node's Ollama, for a sentence."""
    extra = room.headroom(need.bytes)
    if not extra:
        return ""
    what = "llama.cpp's fit margin" if room.era == eras.LLAMA_SERVER else "Ollama's reserve"
    return f" + {size_text(extra)} {what}"


def _verdict(state: ClusterState, node: NodeState, key: str, priority: frozenset[str], now: float) -> Verdict:
    name = node.name
    if not node.up:
        return Verdict(name, False, "down", f"Node down ({node.error or node.error_kind})", None, None, None)
    if node.config.maintenance:
        return Verdict(name, False, "maintenance", "Node in maintenance: never a target", None, None, None)
    copy = node.loaded_model(key)
    if copy is None and node.installed_model(key) is None:
        return Verdict(name, False, "not_installed", NOT_INSTALLED, None, None, None)
    usable, free = node.vram_usable, node.vram_free
    need = need_of(state, key, node)
    if copy is not None and copy.fully_on_gpu:
        why = f"Already loaded fully on GPU ({size_text(copy.size)})"
        return Verdict(name, True, "loaded_on_gpu", why, copy.size, usable, free, sizing=need)
    gpu = has_gpu(node)
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
        return Verdict(name, False, "capacity_unknown", why, None, None, None, sizing=need)
    if need is None:
        why = "VRAM need unknown: set model_sizes for it"
        return Verdict(name, False, "size_unknown", why, None, usable, free)
    room = Room.of(node)
    assert room is not None  # capacity known
    size = room.takes(need.bytes)
    reload = copy is not None and not is_busy(copy, now)
    own = copy.size_vram if reload and copy is not None else 0  # memory inferred held elsewhere counts here
    here = ""
    if copy is not None:
        here = f" (loaded here {copy.gpu_ratio:.0%} on GPU, "
        here += "reload in place)" if reload else "busy: cannot reload now)"
    needed = f"{size_text(size)}{_rules_text(room, need)}"

    def verdict(fits: bool, kind: str, why: str, evict: tuple[str, ...] = ()) -> Verdict:
        return Verdict(name, fits, kind, why, size, usable, free, evict, reload and fits, need)

    if not room.fits(need):
        if size > room.usable:
            why = f"Model too large ({size_text(size)} > {size_text(room.usable)} usable VRAM){here}"
        else:
            why = f"Model too large ({needed} > {size_text(room.total)} of GPU memory){here}"
        return verdict(False, "too_large", why)
    if copy is not None and not reload:
        return verdict(False, "not_enough_free", f"Not enough free VRAM now{here}")
    others = [m for m in node.loaded if model_key(m.name) != key]
    kept = _risked(node, key, others, priority, now) if reload else []
    if kept:
        why = (
            f"Waiting: {size_text(node.hidden)} is inferred to be held outside Ollama ({node.hidden_why}); a forced "
            f"reload that runs out of memory would make Ollama evict {', '.join(kept)}{here}"
        )
        return verdict(False, "not_enough_free", why)
    room_now = room.usable - room.used + own
    excess = len(others) + 1 - node.max_loaded  # models past Ollama's loaded-model limit once this one is in
    if room.fits_free(need, freed=own, others=bool(others)) and excess <= 0:
        why = f"Fits in {size_text(room.usable)} VRAM ({size_text(max(0, room_now))} free){here}"
        return verdict(True, "fits_free", why)
    evict, freed = _evictions(room, need, own, others, victims_of(node, priority, now), excess)
    if evict is not None:
        why = (
            f"Fits in {size_text(room.usable)} VRAM after evicting idle {', '.join(evict)} "
            f"({size_text(room_now + freed)} free"
        )
        why += f"; {node.max_loaded} models loaded at most){here}" if excess > 0 else f"){here}"
        return verdict(True, "fits_after_eviction", why, evict)
    idle = [v for v in victims_of(node, priority, now) if model_key(v.name) != key]
    held = sorted(model_key(m.name) for m in others if m not in idle)
    if room.fits_free(need, freed=own, others=bool(others)):
        why = f"Ollama's loaded-model limit ({node.max_loaded}) is reached and not enough idle models can go"
        why += f" (held by priority or busy models: {', '.join(held)}){here}" if held else f"{here}"
        return verdict(False, "not_enough_free", why)
    why = _shortfall(room, need, own, bool(others), room_now)
    if node.hidden:
        why += f", ~{size_text(node.hidden)} of it inferred held outside Ollama because {node.hidden_why}"
        if node.exempt(key) and reload:
            why += "; the optimizer retests that with a reload in place, spaced by its cooldown"
    if idle:
        why += f", {size_text(max(0, room_now + sum(v.size_vram for v in idle)))} after evicting every idle model"
    if held:
        why += f"; held by priority or busy models: {', '.join(held)}"
    why += f"){here}"
    return verdict(False, "not_enough_free", why)


def _shortfall(room: Room, need: ModelNeed, own: int, others: bool, usable_free: int) -> str:
    """Why a model does not fit what is free now, by the rule it breaks (the sentence is left open)."""
    size = room.takes(need.bytes)
    rule = room.short_of(need, freed=own, others=others)
    free = room.real_free(own)
    if rule == "memory":
        return f"Not enough free GPU memory ({size_text(size)}{_rules_text(room, need)} needed, {size_text(free)} free"
    if rule == "admission" and need.admission is not None:
        predicted = size_text(need.admission.predicted(free))
        return f"Ollama would evict a model first (it predicts {predicted}, more than 80% of the {size_text(free)} free"
    return f"Not enough free VRAM ({size_text(size)} needed, {size_text(max(0, usable_free))} free"


def _risked(
    node: NodeState, key: str, others: Sequence[LoadedModel], priority: frozenset[str], now: float
) -> list[str]:
    """The priority or busy models a forced reload of `key` here would put at risk: on llama-server Ollama an
    out-of-memory start evicts every other model, and hidden usage inferred from this very copy says it may
    run out. Empty when there is no such risk."""
    if not node.exempt(key) or node.era != eras.LLAMA_SERVER:
        return []
    return sorted(model_key(m.name) for m in others if model_key(m.name) in priority or is_busy(m, now))


def _evictions(
    room: Room,
    need: ModelNeed,
    own: int,
    others: Sequence[LoadedModel],
    victims: Sequence[LoadedModel],
    excess: int = 0,
) -> tuple[tuple[str, ...] | None, int]:
    """The shortest-lived idle models whose unloading lets the model in by the node's rules (room, at least
    `excess` models gone for Ollama's loaded-model limit and, on llama-server, Ollama's admission test beside
    whatever stays loaded): (names, bytes freed), or None."""
    candidates = [v for v in victims if v in others]
    names: list[str] = []
    freed = 0
    for victim in candidates:
        names.append(model_key(victim.name))
        freed += victim.size_vram
        if len(names) >= excess and room.fits_free(need, freed=own + freed, others=len(others) > len(names)):
            return tuple(names), freed
    return None, freed


def check(state: ClusterState, model: str, now: float) -> CheckResult:
    """Per node: can it hold `model` fully on GPU, and why (not)."""
    key = model_key(model)
    priority = _priority_keys(state)
    verdicts = tuple(_verdict(state, node, key, priority, now) for node in state.nodes)
    code, result = _result(verdicts)
    installed = installed_models(state)
    if code == "nowhere" and key not in installed:
        # `llama3.2` where llama3.2:1b and :3b are installed; no search by spelling (the proxy checks every request)
        close = _beginning_with(installed, key)
        result += f" (did you mean {', '.join(close)}?)" if close else ""
    return CheckResult(model=key, verdicts=verdicts, result=result, needs=model_needs(state, key), code=code)


def _by_kind(verdicts: Sequence[Verdict]) -> dict[str, list[str]]:
    by_kind: dict[str, list[str]] = {}
    for v in verdicts:
        by_kind.setdefault(v.kind, []).append(v.node)
    return by_kind


# check's overall answer: the code (JSON) → what it means
RESULT_CODES = {
    "on_gpu": "already loaded fully on GPU on a node",
    "fits_gpu": "fits on GPU on a node now, or after evicting idle models",
    "gpu_unknown": "unknown whether a GPU can hold it (a node did not answer, or a GPU capacity is unknown)",
    "no_room_now": "no GPU has room now: it runs on CPU meanwhile",
    "cpu": "no GPU can hold it: it must run on CPU",
    "nowhere": "no node can run it",
}


def _result(verdicts: Sequence[Verdict]) -> tuple[str, str]:
    """(a key of RESULT_CODES, the sentence for people)."""
    by_kind = _by_kind(verdicts)
    if "loaded_on_gpu" in by_kind:
        return "on_gpu", f"Already on GPU: {', '.join(by_kind['loaded_on_gpu'])}"
    fits = [v for v in verdicts if v.fits]
    if fits:
        parts = [v.node + (f" (after evicting {', '.join(v.evict)})" if v.evict else "") for v in fits]
        return "fits_gpu", f"Fits on GPU: {', '.join(parts)}"
    runnable = [v for v in verdicts if v.kind in ("cpu", "no_gpu", "too_large", "not_enough_free", "capacity_unknown")]
    if not runnable:
        result = "No node can run it: not installed on any node that is up and not in maintenance"
        return "nowhere", result + (f" ({', '.join(by_kind['down'])} did not answer)" if "down" in by_kind else "")
    unknown, no_room = _off_gpu_causes(by_kind)
    if unknown:
        return "gpu_unknown", f"Unknown whether a GPU can hold it ({'; '.join(unknown + no_room)})"
    if no_room:
        return "no_room_now", f"Not on GPU for now ({'; '.join(no_room)}): it runs on CPU meanwhile"
    return "cpu", "Model must run on CPU"


def _off_gpu_causes(by_kind: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """What keeps a model off GPU for now, not for good: (what is unknown — a node that did not answer, a GPU
    capacity —, the nodes with no room now)."""
    unknown = [
        f"{', '.join(by_kind['down'])} did not answer" if "down" in by_kind else "",
        f"GPU capacity unknown on {', '.join(by_kind['capacity_unknown'])}" if "capacity_unknown" in by_kind else "",
    ]
    no_room = [f"no room now on {', '.join(by_kind['not_enough_free'])}"] if "not_enough_free" in by_kind else []
    return [u for u in unknown if u], no_room


# ------------------------------------------------------------------------------------------------ route


@dataclass(frozen=True)
class Route:
    """Where a model should run (processor "GPU" or "CPU"; None when nowhere), and why."""

    model: str
    node: str | None
    processor: str | None
    reason: str
    verdicts: tuple[Verdict, ...]
    needs: Mapping[str, ModelNeed]  # node → what the model takes there (`model_needs`)


def route(state: ClusterState, model: str, now: float) -> Route:
    """The best node: on GPU already > fits free VRAM > fits after evictions > CPU; then most free VRAM."""
    return route_of(state, check(state, model, now))


def route_of(state: ClusterState, result: CheckResult) -> Route:
    """`route` from a `check` already made."""
    if result.fitting:
        best = result.fitting[0]
        return Route(result.model, best.node, "GPU", best.reason, result.verdicts, result.needs)
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
        return Route(key, None, None, result.result, result.verdicts, result.needs)

    def order(n: NodeState) -> tuple[bool, bool, int, str]:
        return (has_gpu(n) is not False, n.loaded_model(key) is None, _ram_held(n), n.name)

    best = min(candidates, key=order)
    facts = ["has no GPU" if has_gpu(best) is False else "has the model installed"]
    if best.loaded_model(key) is not None:
        facts.append("already runs it")
    facts.append(f"{size_text(_ram_held(best))} held in RAM by loaded models")
    by_kind = _by_kind(result.verdicts)
    cause = "; ".join(c for group in _off_gpu_causes(by_kind) for c in group) or "no GPU can hold it fully"
    if "down" not in by_kind:  # then the sentence starts "gpu-large did not answer": a name keeps its case
        cause = cause[0].upper() + cause[1:]
    why = f"{cause}; {best.name} {', '.join(facts)}"
    if len(candidates) > 1:
        why += f" (best of {len(candidates)} CPU candidates)"
    return Route(key, best.name, "CPU", why, result.verdicts, result.needs)


# ------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Step:
    """One action. `unload` removes a CPU/partial copy elsewhere, only once the GPU copy is verified.

    `for_model` is the priority model the step serves (an eviction's victim is `model`); None = `model`.
    """

    action: str  # evict | load | unload | pin (same options again, with the configured keep_alive) | release (an idle
    # model placed for its demand, unloaded once that demand fell below the threshold)
    model: str
    node: str
    reason: str
    num_ctx: int | None = None
    keep_alive: int | float | str = -1
    for_model: str | None = None
    num_gpu: int | None = None  # set on a reload in place: every layer on GPU (Ollama reloads on a changed num_gpu)
    need: int | None = None  # a load's bytes fully on GPU on its node (what landing short is measured against)

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
    room: Room
    victims: tuple[LoadedModel, ...]  # idle, non-priority: evictable, in eviction order
    free: int  # what a plan may use without evicting (the operator's and Ollama's limits; may be < 0)
    cap: int  # free + every victim's VRAM: the most a plan can use here
    installed: frozenset[str]
    loaded: dict[str, LoadedModel]
    index: int  # its position in the plan's list of bins
    limit: int  # Ollama's loaded-model limit here

    def admits(self, members: Sequence[_Item]) -> bool:
        """With every victim evicted, the planned loads stay within Ollama's loaded-model limit and, on a
        llama-server node, every one of them, in priority order, passes Ollama's admission test against what is
        free at that moment (so Ollama evicts nothing on its own)."""
        new = sum(1 for item in members if item.key not in self.loaded)
        if len(self.loaded) - len(self.victims) + new > self.limit:
            return False
        if self.room.era != eras.LLAMA_SERVER:
            return True
        b = self.index
        gone = sum(v.size_vram for v in self.victims)
        free = self.room.total - self.room.used + gone
        staying = len(self.loaded) - len(self.victims)
        for item in members:
            own = self.loaded.get(item.key)
            if own is not None:  # a reload in place: Ollama unloads the old runner first
                free += own.size_vram
                staying -= 1
            admission = item.needs[b].admission
            if staying > 0 and admission is not None and not admission.admits(free):
                return False
            free -= item.needs[b].bytes
            staying += 1
        return True


@dataclass
class _Item:
    """A priority model to place: bytes it takes on each eligible bin (its own reclaimed copy subtracted)."""

    key: str
    model: PriorityModel
    sizes: dict[int, int]
    own: frozenset[int]  # bins where it reloads its own CPU/partial copy
    needs: dict[int, ModelNeed]  # bin → what the model takes there
    replica: bool = False  # another GPU copy of a model that has one (its demand needs more than one runner)


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
        return (after > bin_.free, b in item.own, -(bin_.free - load[b]), bin_.name)

    def _members(self, b: int, assign: Mapping[int, int], extra: int | None = None) -> list[_Item]:
        """The items assigned to bin `b` (plus `extra`), in priority order."""
        indexes = sorted({i for i, bb in assign.items() if bb == b} | ({extra} if extra is not None else set()))
        return [self.items[i] for i in indexes]

    def _admits(self, b: int, assign: Mapping[int, int], extra: int | None = None) -> bool:
        return self.bins[b].admits(self._members(b, assign, extra))

    def _best(self, index: int, load: Sequence[int], assign: Mapping[int, int]) -> int | None:
        item = self.items[index]
        fitting = [
            b for b, size in item.sizes.items() if load[b] + size <= self.bins[b].cap and self._admits(b, assign, index)
        ]
        return min(fitting, key=lambda b: self._key(item, b, load)) if fitting else None

    def add(self, item: _Item) -> bool:
        index = len(self.items)
        self.items.append(item)
        best = self._best(index, self.load, self.assign)
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
                whole = {**{i: b for i, b in self.assign.items() if i not in chosen}, **chosen}
                return all(self._admits(b, whole) for b in set(chosen.values()))
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
            del self.assign[i]
            best = self._best(i, self.load, self.assign)
            if best is None or self._key(item, best, self.load) >= self._key(item, b, self.load):
                best = b
            self.assign[i] = best
            self.load[best] += item.sizes[best]


@dataclass(frozen=True)
class PlanDemand:
    """What placement from demand (`gpurouter.decide.demand`) adds to a plan: more GPU copies of a model whose
    load exceeds one runner, the (node, model) pairs the proxy has requests in flight on (never evicted, like
    busy models), and each model's demand score (among idle victims, partial and CPU copies go first, then the
    least demanded, then the soonest to expire)."""

    copies: Mapping[str, int] = field(default_factory=dict)  # model → GPU copies wanted (1 when absent)
    in_flight: frozenset[tuple[str, str]] = frozenset()
    score: Mapping[str, float] = field(default_factory=dict)
    keep_alive: int | float | str = "30m"  # a further copy's (a priority model's too: only its first is pinned)


def _plan_victims(node: NodeState, priority: frozenset[str], now: float, demand: PlanDemand) -> tuple[LoadedModel, ...]:
    idle = (m for m in victims_of(node, priority, now) if (node.name, model_key(m.name)) not in demand.in_flight)
    return tuple(
        sorted(idle, key=lambda m: (m.fully_on_gpu, demand.score.get(model_key(m.name), 0.0), *eviction_order(m)))
    )


def plan(
    state: ClusterState,
    models: Sequence[PriorityModel] | None = None,
    now: float | None = None,
    demand: PlanDemand | None = None,
) -> Plan:
    """The steps that put each model (default: the configured priority models) fully on GPU somewhere, and,
    with `demand`, another copy of a model already on GPU where it wants more.

    In priority order, a model is placed when it fits together with every model placed before it (which
    may move to leave room); further copies come after every model's first. Never evicts a priority model
    (any configured one, and every model of `models`), a busy model, one with proxy requests in flight, or
    anything on a node that is down, in maintenance or of unknown capacity; keeps within Ollama's loaded-model
    limit. Copies on a node in maintenance do not count as placed (drain) and are never touched.
    """
    now = state.taken_at if now is None else now
    demand = demand or PlanDemand()
    wanted = unique_models(state.config.priority_models if models is None else models)
    priority = _priority_keys(state) | {model_key(p.name) for p in wanted}
    live = [n for n in state.nodes if n.up and not n.config.maintenance]
    targets = [n for n in live if has_gpu(n)]
    bins: list[_Bin] = []
    for node in targets:
        room = Room.of(node)
        assert room is not None  # a node with a GPU has a known capacity
        victims = _plan_victims(node, priority, now, demand)
        free = min(room.usable - room.used, room.total - room.used - per_gpu_extra(room.era))
        cap = free + sum(v.size_vram for v in victims)
        installed = frozenset(model_key(m.name) for m in node.installed)
        loaded = {model_key(m.name): m for m in node.loaded}
        bins.append(_Bin(node.name, node, room, victims, free, cap, installed, loaded, len(bins), node.max_loaded))
    copies: dict[str, list[tuple[NodeState, LoadedModel]]] = {}
    for node in live:
        for m in node.loaded:
            copies.setdefault(model_key(m.name), []).append((node, m))
    packer = _Packer(bins)
    already: list[tuple[str, str]] = []
    unplaced: list[tuple[str, str]] = []
    more: list[tuple[str, PriorityModel, frozenset[str]]] = []
    for pm in wanted:
        key = model_key(pm.name)
        homes = [n.name for n, m in copies.get(key, ()) if m.fully_on_gpu]
        if homes:
            already.append((key, homes[0]))
            if demand.copies.get(key, 1) > len(homes):
                more.append((key, pm, frozenset(homes)))
            continue
        item, why = _item(state, key, pm, bins, now)
        if item is None:
            unplaced.append((key, why))
        elif not packer.add(item):
            unplaced.append((key, f"no room left after higher-priority models ({why})"))
    for key, pm, homes in more:  # one more copy a pass, where the model has none yet
        item, _ = _item(state, key, replace(pm, keep_alive=demand.keep_alive), bins, now, exclude=homes)
        if item is not None:
            packer.add(replace(item, replica=True))
    packer.improve()
    steps = _steps(packer, copies, state.layers)
    loading = {s.model for s in steps if s.action == "load"}
    keys = {model_key(p.name) for p in wanted}
    pins = [s for s in unpinned(state, now) if s.model in keys and s.model not in loading]
    return Plan(tuple(steps + pins), tuple(unplaced), tuple(already))


PINNED_FOREVER = 10 * 365 * 86400.0  # seconds: an expiry further away than this is keep_alive forever
PIN_SLACK = 60.0  # seconds an expiry may lie past the configured keep_alive (clocks, request time)


def unpinned(state: ClusterState, now: float) -> list[Step]:
    """A `pin` step for the copy of a priority model that lost its pin: configured forever (the default) but
    expiring, or expiring later than its configured keep_alive allows (a client's longer keep_alive). The pinned
    copy is the model's first copy fully on GPU (further GPU copies keep their own keep_alive: pinned, they would
    stay loaded for good), or every copy while none is fully on GPU. A copy that expires sooner than a finite
    keep_alive is not told apart from one idle since (left alone); a busy copy shows no expiry to judge (a later
    pass looks again). Copies on nodes in maintenance are never touched."""
    steps = []
    for pm in state.config.priority_models:
        key = model_key(pm.name)
        wanted = parse_keep_alive(pm.keep_alive)
        homes = state.gpu_copies(key)
        for node, copy in homes[:1] or state.placements(key):
            if node.config.maintenance or copy.expires_at is None or is_busy(copy, now):
                continue
            left = copy.expires_at.timestamp() - now
            if left < PINNED_FOREVER if wanted >= FOREVER else left > wanted + PIN_SLACK:
                why = f"{key} expires in {_duration(left)}, not as configured (keep_alive {pm.keep_alive})"
                steps.append(Step("pin", key, node.name, why, copy.context_length or pm.num_ctx, pm.keep_alive))
    return steps


def _duration(seconds: float) -> str:
    return f"{seconds / 86400:.0f} days" if seconds >= 86400 else f"{max(0.0, seconds):.0f}s"


@dataclass(frozen=True)
class Divergence:
    """The plan for every priority model puts `model` elsewhere than routing it alone would, and why."""

    model: str
    route_node: str | None
    plan_node: str
    reason: str


def divergences(state: ClusterState, p: Plan, now: float) -> tuple[Divergence, ...]:
    """Each load of the plan whose node is not the one `route` picks for that model alone.

    `route` answers for one model now (the most free VRAM wins); the plan places every priority model together
    in priority order, so a model may go to a smaller node to leave the larger one to another priority model.
    """
    found = []
    for load in p.loads:
        alone = route(state, load.model, now)
        if alone.node == load.node and alone.processor == "GPU":
            continue
        where = f"{alone.node} ({alone.processor})" if alone.node else "no node"
        others = sorted({s.model for s in p.loads if s.node == alone.node and s.model != load.model})
        if others:
            why = f"the plan for all priority models keeps {alone.node} for {', '.join(others)}"
        else:
            why = "the plan places all priority models together, in priority order"
        reason = f"optimize places it on {load.node}, while routing it alone picks {where}: {why}"
        found.append(Divergence(load.model, alone.node, load.node, reason))
    return tuple(found)


def _load_reason(item: _Item, b: int, copy: LoadedModel | None) -> str:
    why = f"put {'another copy of ' if item.replica else ''}{item.key} on GPU: {sizing_text(item.needs[b])}"
    if copy is not None:
        why += f", reloading its {copy.gpu_ratio:.0%}-on-GPU copy in place with every layer on GPU"
    return why


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


def unique_models(models: Iterable[PriorityModel]) -> list[PriorityModel]:
    seen: set[str] = set()
    out = []
    for pm in models:
        if model_key(pm.name) not in seen:
            seen.add(model_key(pm.name))
            out.append(pm)
    return out


def _item(
    state: ClusterState,
    key: str,
    pm: PriorityModel,
    bins: Sequence[_Bin],
    now: float,
    exclude: frozenset[str] = frozenset(),
) -> tuple[_Item | None, str]:
    """What the model takes on every bin that could hold it (but the nodes of `exclude`), or None and why
    none can."""
    sizes: dict[int, int] = {}
    needs: dict[int, ModelNeed] = {}
    own: set[int] = set()
    for b, bin_ in enumerate(bins):
        if bin_.name in exclude:
            continue
        copy = bin_.loaded.get(key)
        if copy is None and key not in bin_.installed:
            continue
        need = need_of(state, key, bin_.node)
        if need is None or not bin_.room.fits(need):
            continue
        size = bin_.room.takes(need.bytes)
        if copy is not None:
            others = [m for m in bin_.node.loaded if model_key(m.name) != key]
            if is_busy(copy, now) or _risked(bin_.node, key, others, _priority_keys(state), now):
                continue
            size -= copy.size_vram + bin_.node.exempt(key)  # may be < 0: the reload frees more than it takes
            own.add(b)
        if size <= bin_.cap:
            sizes[b] = size
            needs[b] = need
    if sizes:
        return _Item(key, pm, sizes, frozenset(own), needs), ", ".join(bins[b].name for b in sorted(sizes))
    reasons = [f"{v.node}: {v.reason}" for v in check(state, key, now).verdicts]
    return None, "no node can hold it on GPU: " + "; ".join(reasons)


def _refused(bin_: _Bin, need: ModelNeed, others: int, free: int) -> bool:
    """True when, with `others` models staying loaded and `free` bytes free, Ollama would evict before loading."""
    admitted = others == 0 or need.admission is None or need.admission.admits(free)
    return bin_.room.era == eras.LLAMA_SERVER and not admitted


def _steps(
    packer: _Packer, copies: dict[str, list[tuple[NodeState, LoadedModel]]], layers: Mapping[str, int]
) -> list[Step]:
    """Evictions (per node, in priority order of the loads that need them: enough for the room and, on a
    llama-server node, for Ollama's admission test), the load, then copy removals."""
    spent = {b: 0 for b in range(len(packer.bins))}
    freed = {b: 0 for b in range(len(packer.bins))}
    free = {b: bin_.room.total - bin_.room.used for b, bin_ in enumerate(packer.bins)}  # Ollama's view
    staying = {b: len(bin_.loaded) for b, bin_ in enumerate(packer.bins)}
    victims = {b: list(bin_.victims) for b, bin_ in enumerate(packer.bins)}
    steps: list[Step] = []
    for i, b in sorted(packer.assign.items()):
        item, bin_ = packer.items[i], packer.bins[b]
        size, need = item.sizes[b], item.needs[b]
        copy = bin_.loaded.get(item.key) if b in item.own else None
        own = copy.size_vram + bin_.node.exempt(item.key) if copy is not None else 0
        others = staying[b] - (1 if copy is not None else 0)
        while victims[b] and (
            spent[b] + size > bin_.free + freed[b]
            or _refused(bin_, need, others, free[b] + own)
            or staying[b] + (0 if copy is not None else 1) > bin_.limit
        ):
            victim = victims[b].pop(0)
            freed[b] += victim.size_vram
            free[b] += victim.size_vram
            staying[b] -= 1
            others -= 1
            why = f"make room for {item.key} (idle, {size_text(victim.size_vram)})"
            steps.append(Step("evict", model_key(victim.name), bin_.name, why, for_model=item.key))
        spent[b] += size
        free[b] += own - need.bytes
        staying[b] += 0 if copy is not None else 1
        # a reload in place asks for every layer (Ollama swaps the runner itself: no unload of ours first)
        num_gpu = layers.get(item.key, ALL_LAYERS) if copy is not None else None
        load = Step("load", item.key, bin_.name, _load_reason(item, b, copy), item.model.num_ctx, item.model.keep_alive)
        steps.append(replace(load, num_gpu=num_gpu, need=need.bytes))
        if item.replica:
            continue
        for node, other in copies.get(item.key, ()):
            if node.name == bin_.name:
                continue
            why = f"remove the {other.gpu_ratio:.0%}-on-GPU copy once {item.key} is verified on {bin_.name}"
            steps.append(Step("unload", item.key, node.name, why))
    return steps
