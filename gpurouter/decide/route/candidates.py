"""Every node that could serve a request, with what serving it there means: a runner that is there, or a load
(no runner, or runner options that differ from the resident runner's), and whether that load is safe.

A request that sets no runner option is served by the resident runner as it is (the proxy supplies the
runner's num_ctx). A load is safe when it evicts no priority or busy model: it fits on GPU by `check`
(evicting idle non-priority models at most), or it lands on a node without GPU, or nothing protected is
loaded beside it; reloading a busy runner, or a priority model's with other options (its pin), never is.
An unsafe load beside a resident runner becomes a request for that runner: its options are set instead
(`adjusted`), and the caller says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from types import MappingProxyType

from gpurouter.cluster.config import model_key
from gpurouter.cluster.ollama import LoadedModel
from gpurouter.cluster.state import ClusterState, NodeState
from gpurouter.decide import placement
from gpurouter.decide.route.ask import RUNNER_OPTIONS, Ask
from gpurouter.decide.route.traffic import Traffic
from gpurouter.sizing import catalog
from gpurouter.sizing.need import Facts, Sizing, model_need

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # an expires_at in the past: busy (placement.is_busy)
SINGLE_SLOT_FAMILIES = frozenset(("mllama", "qwen3vl", "qwen3next", "lfm2", "nemotron_h"))  # Ollama forces 1


@dataclass(frozen=True)
class Candidate:
    node: NodeState
    copy: LoadedModel | None  # the resident runner of the model
    load: bool  # serving it here makes Ollama load the model
    placement: str  # gpu | cold | loading | partial | cpu: where it runs here
    tier: float  # residency in [0, 1]
    slots: int  # the runner's effective parallelism
    safe: bool = True
    why: str = ""  # why the load is not safe
    sets: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))  # options the proxy sets
    adjusted: bool = False  # the request's runner options were replaced by the resident runner's
    free: int = 0  # the node's free VRAM (the picker's tie-break)
    lasting: bool = False  # not safe for as long as a priority runner stays as it is: waiting does not help

    @property
    def name(self) -> str:
        return self.node.name


def corrected(state: ClusterState, traffic: Traffic) -> ClusterState:
    """The polled state as the proxy's own traffic shows it: a model it is serving is busy (never evicted, never
    reloaded), and a model it sent to a node cold counts as loaded there on GPU (its VRAM is taken)."""
    busy = traffic.busy
    touched = {name for name, _ in busy} | {name for name, _ in traffic.loading}
    if not touched:
        return state
    nodes = []
    for node in state.nodes:
        if node.name not in touched:
            nodes.append(node)
            continue
        loaded = [replace(m, expires_at=_EPOCH) if (node.name, model_key(m.name)) in busy else m for m in node.loaded]
        for name, key in traffic.loading:
            if name == node.name and node.loaded_model(key) is None:
                need = placement.need_of(state, key, node)
                if need is not None:
                    loaded.append(LoadedModel(name=key, size=need.bytes, size_vram=need.bytes, expires_at=_EPOCH))
        nodes.append(replace(node, loaded=tuple(loaded)))
    return replace(state, nodes=tuple(nodes))


def slots_of(state: ClusterState, node: NodeState, model: str) -> int:
    """The runner's effective parallelism: the node's num_parallel; 1 for embedding models and the families
    Ollama forces to one slot."""
    copy = node.loaded_model(model)
    family = str(copy.details.get("family", "")) if copy is not None else ""
    spec = catalog.find(model)
    if state.is_embedding(model) or family in SINGLE_SLOT_FAMILIES or (spec is not None and spec.arch.embedding):
        return 1
    return max(1, node.config.num_parallel)


def matches(copy: LoadedModel, runner: Mapping[str, object]) -> bool:
    """False when the request's runner options would make Ollama reload this runner. An unset num_ctx is
    matched by the proxy supplying the runner's; other runner options cannot be read back from /api/ps, so
    any that is set counts as different."""
    ctx = runner.get("num_ctx")
    if ctx is not None and copy.context_length is not None and ctx != copy.context_length:
        return False
    gpu = runner.get("num_gpu")
    if (
        isinstance(gpu, int)
        and gpu >= 0
        and not ((gpu == 0) == (copy.size_vram == 0) and (gpu == 0 or copy.fully_on_gpu))
    ):
        return False
    return not any(k in runner for k in RUNNER_OPTIONS if k not in ("num_ctx", "num_gpu"))


def _copy_tier(copy: LoadedModel) -> tuple[str, float]:
    if copy.fully_on_gpu:
        return "gpu", 1.0
    if copy.size_vram > 0:
        return "partial", 0.1 + 0.4 * copy.gpu_ratio
    return "cpu", 0.05


def without(state: ClusterState, name: str, key: str) -> ClusterState:
    """The state with `key`'s runner on node `name` gone (installed there still)."""
    nodes = tuple(
        replace(n, loaded=tuple(m for m in n.loaded if model_key(m.name) != key)) if n.name == name else n
        for n in state.nodes
    )
    return replace(state, nodes=nodes)


def at_context(state: ClusterState, key: str, node: NodeState, ctx: int) -> ClusterState:
    """The state with `key`'s need on `node` at context `ctx` (the catalog's ratio between the two contexts
    applied to the state's own figure; proportional to the context where the catalog does not know it); 0
    leaves it as it is."""
    base = placement.need_of(state, key, node)
    if base is None or not ctx or base.num_ctx == ctx:
        return state
    sizing = Sizing.of(node)
    there = model_need(key, Facts(observed={}, num_ctx=ctx), sizing)
    here = model_need(key, Facts(observed={}, num_ctx=base.num_ctx), sizing)
    ratio = there.bytes / here.bytes if there is not None and here is not None and here.bytes else ctx / base.num_ctx
    need = replace(base, bytes=int(base.bytes * max(ratio, 0.0)), num_ctx=ctx)
    return replace(state, needs=MappingProxyType({**state.needs, (node.name, key): need}))


def _load(
    state: ClusterState, node: NodeState, ask: Ask, verdict: placement.Verdict | None, now: float
) -> tuple[str, float, bool, str]:
    """(placement, tier, safe, why) of loading the model on `node`."""
    key = ask.model
    copy = node.loaded_model(key)
    priority = state.config.priority(key) is not None
    if copy is not None and placement.is_busy(copy, now):
        return "cold", 0.0, False, f"its runner there is busy: other runner options ({_options(ask)}) would reload it"
    if copy is not None and priority:
        return "cold", 0.0, False, f"a priority model's runner would reload with other options ({_options(ask)})"
    gpu = ask.runner.get("num_gpu")
    if placement.has_gpu(node) is False or gpu == 0:
        return "cpu", 0.0, True, ""
    if verdict is not None and verdict.fits:
        if copy is not None:  # a reload with other options: it costs a load and may thrash with the old ones
            return "cold", 0.6, True, ""
        return "cold", (0.8 if verdict.kind == "fits_free" else 0.65), True, ""
    protected = sorted(
        model_key(m.name)
        for m in node.loaded
        if model_key(m.name) != key and (state.config.priority(m.name) is not None or placement.is_busy(m, now))
    )
    if protected:
        return "partial", 0.0, False, f"it does not fit beside {', '.join(protected)}, which Ollama would evict"
    return "partial", 0.2, True, ""


def _options(ask: Ask) -> str:
    return ", ".join(f"{k}={v}" for k, v in ask.runner.items())


def candidates(
    state: ClusterState,
    view: ClusterState,
    names: list[str],
    ask: Ask,
    traffic: Traffic,
    now: float,
    check: Callable[[ClusterState, str, float], placement.CheckResult] = placement.check,
) -> list[Candidate]:
    """The nodes `names` as Candidates; `view` is `corrected(state, traffic)`, `check` placement.check on it
    (or a memo of it)."""
    key = ask.model
    result = None
    found = []
    for name in names:
        node = view.node(name)
        assert node is not None
        copy = node.loaded_model(key)
        polled = state.node(node.name)
        slots = slots_of(view, node, key)
        free = node.vram_free or 0
        if (node.name, key) in traffic.loading and polled is not None and polled.loaded_model(key) is None:
            # a load the proxy sent is under way
            found.append(Candidate(node, copy, False, "cold", 0.85, slots, free=free))
            continue
        runner = {"num_ctx": node.default_context[0]} if ask.openai else ask.runner
        if copy is not None and matches(copy, runner):
            where, tier = _copy_tier(copy)
            sets = {"num_ctx": copy.context_length} if ask.num_ctx is None and copy.context_length else {}
            found.append(Candidate(node, copy, False, where, tier, slots, sets=sets, free=free))
            continue
        ctx = ask.num_ctx
        if copy is not None:  # a reload: Ollama unloads the runner first, then loads it as asked
            checked = placement.check(at_context(without(view, node.name, key), key, node, ctx or 0), key, now)
        elif ctx is not None:
            checked = placement.check(at_context(view, key, node, ctx), key, now)
        else:
            checked = result = result or check(view, key, now)
        verdict = next((v for v in checked.verdicts if v.node == node.name), None)
        where, tier, safe, why = _load(view, node, ask, verdict, now)
        priority = state.config.priority(key)
        sets = {"num_ctx": priority.num_ctx} if priority and priority.num_ctx and ctx is None else {}
        if ask.openai and copy is not None and not safe:  # no option can be set: the runner would reload
            why = (
                f"an OpenAI API request cannot set num_ctx: Ollama would serve it at the node's default context "
                f"({runner['num_ctx']}) and reload the {'priority model' if priority else 'busy'} runner loaded at "
                f"{copy.context_length}; use Ollama's API, or make that context the node's OLLAMA_CONTEXT_LENGTH"
            )
            lasting = priority is not None and not placement.is_busy(copy, now)
            found.append(Candidate(node, copy, True, where, tier, slots, False, why, free=free, lasting=lasting))
            continue
        if safe or copy is None:
            found.append(Candidate(node, copy, True, where, tier, slots, safe, why, sets, free=free))
            continue
        where, tier = _copy_tier(copy)  # the resident runner serves it, with its own options
        kept = {"num_ctx": copy.context_length} if copy.context_length else {}
        found.append(Candidate(node, copy, False, where, tier, slots, True, why, kept, adjusted=True, free=free))
    return found
