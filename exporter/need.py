"""How much VRAM a model needs fully on GPU: a ladder of sources, best first.

observed (what /api/ps reported for it at that context, fully on GPU) > estimated (Ollama's classic memory
estimate from /api/show metadata) > configured (`model_sizes`) > disk (/api/tags size + KV cache + reserve)
> catalog (the built-in models' architecture).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exporter import catalog, estimate
from exporter.config import Config, model_key
from exporter.ollama import ShowInfo
from exporter.state import ModelNeed, NodeState
from exporter.units import MIB

RESERVE = 457 * MIB  # Ollama's per-GPU reserve (CUDA/ROCm), counted in a classic-era `size`


@dataclass(frozen=True)
class Facts:
    """What is known about one model, gathered across the cluster."""

    observed: Mapping[int | None, int]  # context_length → size seen fully on GPU
    show: ShowInfo | None = None
    disk_size: int | None = None
    configured: int | None = None
    num_ctx: int | None = None  # the priority model's configured context


def context_for(facts: Facts, model: str, default_ctx: int) -> int:
    """The context a model is loaded with: configured > Modelfile > the nodes' default."""
    if facts.num_ctx:
        return facts.num_ctx
    if facts.show is not None and facts.show.num_ctx:
        return facts.show.num_ctx
    spec = catalog.find(model)
    if facts.show is None and spec is not None and spec.default_num_ctx:
        return spec.default_num_ctx
    return default_ctx


def model_need(model: str, facts: Facts, default_ctx: int) -> ModelNeed | None:
    """The best figure the ladder has for `model`, or None when no rung knows it."""
    ctx = context_for(facts, model, default_ctx)
    arch = _arch(facts)
    spec = catalog.find(model)
    cap = arch if arch is not None else (spec.arch if spec is not None else None)
    if cap is not None:
        ctx = estimate.effective_ctx(cap, ctx)
    if ctx in facts.observed:
        return ModelNeed(model, facts.observed[ctx], "observed", ctx)
    if arch is not None:
        return ModelNeed(model, estimate.full_gpu_bytes(arch, ctx), "estimated", ctx)
    if facts.configured is not None:
        return ModelNeed(model, facts.configured, "configured", ctx)
    if facts.disk_size is not None:
        kv = estimate.kv_bytes(cap, ctx) if cap is not None else 0
        return ModelNeed(model, facts.disk_size + kv + RESERVE, "disk", ctx)
    if spec is not None:
        return ModelNeed(model, estimate.full_gpu_bytes(spec.arch, ctx), "catalog", ctx)
    return None


def _arch(facts: Facts) -> estimate.Arch | None:
    if facts.show is None:
        return None
    try:
        return estimate.arch_from_show(facts.show.raw, facts.disk_size)
    except (ValueError, KeyError, TypeError):
        return None


def default_context(config: Config) -> int:
    """The context assumed where nothing else says: the largest node default (the cautious choice)."""
    return max(n.context_length for n in config.nodes)


class NeedLedger:
    """Remembers, across polls, the sizes seen on GPU and /api/show per digest (a digest never changes)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._observed: dict[str, dict[int | None, int]] = {}
        self._shows: dict[str, ShowInfo] = {}
        self._lock = threading.Lock()

    def record(self, nodes: Iterable[NodeState]) -> None:
        """Remember the size of every copy that is fully on GPU."""
        with self._lock:
            for node in nodes:
                for m in node.loaded:
                    if m.fully_on_gpu:
                        self._observed.setdefault(model_key(m.name), {})[m.context_length] = m.size

    def add_show(self, digest: str, show: ShowInfo) -> None:
        with self._lock:
            self._shows[digest] = show

    def missing_shows(self, nodes: Iterable[NodeState]) -> dict[str, tuple[NodeState, str]]:
        """Digests installed on an up node whose /api/show is not cached yet → (node, model) to ask."""
        missing: dict[str, tuple[NodeState, str]] = {}
        with self._lock:
            for node in nodes:
                if not node.up:
                    continue
                for m in node.installed:
                    if m.digest and m.digest not in self._shows and m.digest not in missing:
                        missing[m.digest] = (node, m.name)
        return missing

    def needs(self, nodes: Iterable[NodeState]) -> tuple[dict[str, ModelNeed], frozenset[str]]:
        """The need of every known model, and the set of embedding models."""
        nodes = list(nodes)
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
        default_ctx = default_context(self.config)
        needs: dict[str, ModelNeed] = {}
        embedding: set[str] = set()
        with self._lock:
            for name in sorted(names):
                show = self._shows.get(digests.get(name, ""))
                priority = self.config.priority(name)
                facts = Facts(
                    observed=dict(self._observed.get(name, {})),
                    show=show,
                    disk_size=disk.get(name),
                    configured=self.config.model_sizes.get(name),
                    num_ctx=priority.num_ctx if priority else None,
                )
                need = model_need(name, facts, default_ctx)
                if need is not None:
                    needs[name] = need
                if _is_embedding(name, show):
                    embedding.add(name)
        return needs, frozenset(embedding)

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
                    arch = _arch(Facts(observed={}, show=show, disk_size=m.size)) if show else None
                    if arch is None and (spec := catalog.find(key)) is not None:
                        arch = spec.arch
                    if arch is not None:
                        found[key] = arch.block_count + 1
        return found


def _is_embedding(model: str, show: ShowInfo | None) -> bool:
    if show is not None:
        return show.embedding
    spec = catalog.find(model)
    return spec is not None and "embedding" in spec.capabilities
