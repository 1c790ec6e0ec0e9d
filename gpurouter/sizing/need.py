"""How much VRAM a model takes fully on GPU on each node: a ladder of sources, best first.

Per node, because the context a model gets and the way memory is counted depend on the node's Ollama
(reference/ollama-current.md §1, §4): the context is the priority model's `num_ctx`, else its Modelfile's,
else the node's default (`NodeState.default_context`), clamped to the trained context; the figure follows the
node's era — classic: Ollama's own estimate (reserve included); layout: the estimate without the reserve;
llama-server: the footprint llama-server allocates (what `/api/ps` then measures), with Ollama's admission
prediction beside it.

The ladder: observed (what `/api/ps` reported for the model fully on GPU in that era, at that context and
parallelism) > estimated (the era's figure from /api/show metadata) > configured (`model_sizes`) > disk
(/api/tags size + KV cache + the era's extras) > catalog (the built-in models' architecture).

A digest never changes, so what is derived from a model's /api/show is memoised per digest (bounded, the
oldest entry leaves first): its architecture per disk size, and the era's figure and admission per era,
context and parallel. A new digest (the model was pulled again) is sized afresh; facts without a digest are
never memoised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gpurouter.cluster.config import Config, model_key
from gpurouter.cluster.ollama import ShowInfo
from gpurouter.cluster.state import ModelNeed, NodeState
from gpurouter.sizing import catalog, eras, estimate, llamaserver
from gpurouter.units import MIB

RESERVE = estimate.RESERVE  # Ollama's per-GPU reserve (CUDA/ROCm), counted in a classic-era `size`
COMPUTE_ALLOWANCE = 256 * MIB  # llama-server's compute buffer where no metadata tells it (disk rung)

MEMO_SIZE = 8192  # memoised figures: room for a fleet's digests × eras × contexts × parallel settings
ObservedKey = tuple[str, int | None, int]  # (era, context per sequence, parallel)
T = TypeVar("T")


class Memo:
    """A bounded memo of pure computations: the oldest entry leaves when it is full."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self.size = size
        self._values: dict[Hashable, object] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        try:
            return self._values[key]  # type: ignore[return-value]
        except KeyError:
            pass
        value = compute()
        with self._lock:
            if len(self._values) >= self.size:
                del self._values[next(iter(self._values))]
            self._values[key] = value
        return value


SIZED = Memo()  # per digest: see the module's docstring


@dataclass(frozen=True)
class Facts:
    """What is known about one model, gathered across the cluster."""

    observed: Mapping[ObservedKey, int]  # size seen fully on GPU
    show: ShowInfo | None = None
    disk_size: int | None = None
    digest: str = ""  # the /api/show's model digest: what is derived from it is memoised under it
    configured: int | None = None
    num_ctx: int | None = None  # the priority model's configured context


@dataclass(frozen=True)
class Sizing:
    """How a node sizes models: its era, the default context and where that came from, its parallelism."""

    node: str | None
    era: str
    default_ctx: int
    default_source: str
    parallel: int = 1

    @classmethod
    def of(cls, node: NodeState) -> Sizing:
        ctx, source = node.default_context
        return cls(node.name, node.era, ctx, source, node.config.num_parallel)


def context_for(facts: Facts, model: str, default_ctx: int, default_source: str = "") -> tuple[int, str]:
    """(the context a model is loaded with, why): configured > Modelfile > the node's default."""
    if facts.num_ctx:
        return facts.num_ctx, "priority model num_ctx"
    if facts.show is not None and facts.show.num_ctx:
        return facts.show.num_ctx, "Modelfile num_ctx"
    spec = catalog.find(model)
    if facts.show is None and spec is not None and spec.default_num_ctx:
        return spec.default_num_ctx, "Modelfile num_ctx"
    return default_ctx, default_source or "node default"


def _era_bytes(arch: estimate.Arch, era: str, ctx: int, parallel: int) -> int:
    """The era's figure for a model fully on one GPU."""
    return SIZED.get(("bytes", arch, era, ctx, parallel), lambda: _era_bytes_of(arch, era, ctx, parallel))


def _era_bytes_of(arch: estimate.Arch, era: str, ctx: int, parallel: int) -> int:
    if era == eras.LLAMA_SERVER:
        return llamaserver.footprint(arch, ctx, parallel)
    full = estimate.full_gpu_bytes(arch, ctx, parallel)
    return full - RESERVE if era == eras.LAYOUT else full


def model_need(model: str, facts: Facts, sizing: Sizing) -> ModelNeed | None:
    """The best figure the ladder has for `model` on the node `sizing` describes, or None when no rung knows."""
    ctx, why = context_for(facts, model, sizing.default_ctx, sizing.default_source)
    arch = _arch(facts)
    spec = catalog.find(model)
    cap = arch if arch is not None else (spec.arch if spec is not None else None)
    parallel = 1 if cap is not None and cap.embedding else sizing.parallel
    if cap is not None:
        ctx = estimate.effective_ctx(cap, ctx)
    admission = None
    if cap is not None and sizing.era == eras.LLAMA_SERVER:
        file_bytes = facts.disk_size or (spec.tags_size if spec is not None else None)
        if file_bytes:
            key = ("admission", cap, file_bytes, ctx, parallel)
            admission = SIZED.get(key, lambda: llamaserver.admission(cap, file_bytes, ctx, parallel))

    def need(size: int, source: str) -> ModelNeed:
        return ModelNeed(model, size, source, ctx, sizing.node, sizing.era, parallel, why, admission)

    observed = facts.observed.get((sizing.era, ctx, parallel))
    if observed is not None:
        return need(observed, "observed")
    if arch is not None:
        return need(_era_bytes(arch, sizing.era, ctx, parallel), "estimated")
    if facts.configured is not None:
        return need(facts.configured, "configured")
    if facts.disk_size is not None:
        return need(facts.disk_size + _disk_extra(cap, sizing.era, ctx, parallel), "disk")
    if spec is not None:
        return need(_era_bytes(spec.arch, sizing.era, ctx, parallel), "catalog")
    return None


def _disk_extra(cap: estimate.Arch | None, era: str, ctx: int, parallel: int) -> int:
    """What a loaded model takes beyond its file: KV cache (where the architecture is known) and the era's
    reserve or compute buffer."""
    if era == eras.LLAMA_SERVER:
        kv = cap.block_count * llamaserver.kv_layer_bytes(cap, ctx * parallel) if cap is not None else 0
        return kv + COMPUTE_ALLOWANCE
    kv = estimate.kv_bytes(cap, ctx * parallel) if cap is not None else 0
    return kv + (RESERVE if era == eras.CLASSIC else 0)


def _arch(facts: Facts) -> estimate.Arch | None:
    """The architecture in the facts' /api/show, derived once per digest and disk size."""
    show = facts.show
    if show is None:
        return None
    if not facts.digest:
        return _arch_of(show, facts.disk_size)
    return SIZED.get(("arch", facts.digest, facts.disk_size), lambda: _arch_of(show, facts.disk_size))


def _arch_of(show: ShowInfo, disk_size: int | None) -> estimate.Arch | None:
    try:
        return estimate.arch_from_show(show.raw, disk_size)
    except (ValueError, KeyError, TypeError):
        return None


class NeedLedger:
    """Remembers, across polls, the sizes seen on GPU and /api/show per digest (a digest never changes); a
    figure whose facts and node sizing are those of the last poll is that poll's, not worked out again."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._observed: dict[str, dict[ObservedKey, int]] = {}
        self._shows: dict[str, ShowInfo] = {}
        self._last_needs: dict[Hashable, Any] = {}  # the last poll's figures by what decides them, per model and node
        self._lock = threading.Lock()

    def record(self, nodes: Iterable[NodeState]) -> None:
        """Remember the size of every copy that is fully on GPU, keyed by its node's era, context and parallel."""
        with self._lock:
            for node in nodes:
                for m in node.loaded:
                    if m.fully_on_gpu:
                        parallel = 1 if _is_embedding(m.name, self._show_of(m.digest)) else node.config.num_parallel
                        key = (node.era, m.context_length, parallel)
                        self._observed.setdefault(model_key(m.name), {})[key] = m.size

    def add_show(self, digest: str, show: ShowInfo) -> None:
        with self._lock:
            self._shows[digest] = show

    def _show_of(self, digest: str) -> ShowInfo | None:
        return self._shows.get(digest) if digest else None

    def missing_shows(self, nodes: Iterable[NodeState]) -> dict[str, tuple[NodeState, str]]:
        """Digests installed on an up node whose /api/show is not cached yet → (node, model) to ask: the node that
        answered this poll fastest among those holding it (a slow node delays no other node's figures)."""
        missing: dict[str, tuple[NodeState, str]] = {}
        with self._lock:
            for node in sorted((n for n in nodes if n.up), key=lambda n: n.poll_seconds):
                for m in node.installed:
                    if m.digest and m.digest not in self._shows and m.digest not in missing:
                        missing[m.digest] = (node, m.name)
        return missing

    def needs(self, nodes: Iterable[NodeState]) -> tuple[dict[tuple[str, str], ModelNeed], frozenset[str]]:
        """What every known model takes on every node, and the set of embedding models."""
        nodes = list(nodes)
        facts = self._facts(nodes)
        keys = {name: _facts_key(known) for name, known in facts.items()}
        every = tuple(keys.items())  # the facts of every model: unchanged, a node's figures are the last poll's
        needs: dict[tuple[str, str], ModelNeed] = {}
        last, fresh = self._last_needs, {}
        for node in nodes:
            sizing = Sizing.of(node)
            figures = last.get((sizing, every))
            if figures is None:
                figures = {}
                for name, known in facts.items():
                    key = (sizing, name, keys[name])
                    figures[key] = last[key] if key in last else model_need(name, known, sizing)
                fresh.update(figures)
                figures = {(node.name, name): need for (_, name, _), need in figures.items() if need is not None}
            fresh[(sizing, every)] = figures
            needs.update(figures)
        self._last_needs = fresh
        with self._lock:
            embedding = {name for name, known in facts.items() if _is_embedding(name, known.show)}
        return needs, frozenset(embedding)

    def _facts(self, nodes: list[NodeState]) -> dict[str, Facts]:
        disk: dict[str, int] = {}
        digests: dict[str, str] = {}
        for node in nodes:
            for m in node.installed:
                disk.setdefault(model_key(m.name), m.size)
                if m.digest:
                    digests.setdefault(model_key(m.name), m.digest)
            for m in node.loaded:
                if m.digest:
                    digests.setdefault(model_key(m.name), m.digest)
        names = set(disk) | set(self.config.model_sizes) | {model_key(p.name) for p in self.config.priority_models}
        names.update(model_key(m.name) for node in nodes for m in node.loaded)
        facts: dict[str, Facts] = {}
        with self._lock:
            for name in sorted(names):
                priority = self.config.priority(name)
                facts[name] = Facts(
                    observed=dict(self._observed.get(name, {})),
                    show=self._shows.get(digests.get(name, "")),
                    disk_size=disk.get(name),
                    digest=digests.get(name, ""),
                    configured=self.config.model_sizes.get(name),
                    num_ctx=priority.num_ctx if priority else None,
                )
        return facts

    def layers(self, nodes: Iterable[NodeState]) -> dict[str, int]:
        """Each installed model's layer count (blocks + output), from /api/show or the catalog."""
        found: dict[str, int] = {}
        with self._lock:
            for node in nodes:
                for m in node.installed:
                    key = model_key(m.name)
                    if key in found:
                        continue
                    show = self._shows.get(m.digest)
                    arch = _arch(Facts(observed={}, show=show, disk_size=m.size, digest=m.digest)) if show else None
                    if arch is None and (spec := catalog.find(key)) is not None:
                        arch = spec.arch
                    if arch is not None:
                        found[key] = arch.block_count + 1
        return found


def _facts_key(facts: Facts) -> Hashable:
    """What decides a model's figures besides the node's sizing (a digest stands for its /api/show)."""
    observed = frozenset(facts.observed.items())
    return facts.digest, facts.show is not None, facts.disk_size, facts.configured, facts.num_ctx, observed


def _is_embedding(model: str, show: ShowInfo | None) -> bool:
    if show is not None:
        return show.embedding
    spec = catalog.find(model)
    return spec is not None and "embedding" in spec.capabilities
