"""What one poll of the cluster saw: an immutable `ClusterState` of per-node facts and per-model needs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType

from gpurouter.cluster.config import Config, NodeConfig, model_key
from gpurouter.cluster.ollama import InstalledModel, LoadedModel
from gpurouter.sizing import eras
from gpurouter.sizing.llamaserver import Admission


@dataclass(frozen=True)
class GpuInfo:
    """One GPU of a node: total bytes, and bytes in use where the source knows it."""

    index: int
    name: str
    total: int
    used: int | None = None


@dataclass(frozen=True)
class Capacity:
    """A node's GPU memory and where that figure came from.

    `source` is static, nvml, amd, prometheus, ollama_log, none (a CPU node) or unknown (no figure; `reason`
    says why and which setting fixes it). Nothing is ever guessed.
    """

    source: str
    gpus: tuple[GpuInfo, ...] = ()
    reason: str = ""
    default_context: int | None = None  # the server's default context as its own log states it (ollama_log)

    @property
    def known(self) -> bool:
        return self.source != "unknown"

    @property
    def total(self) -> int | None:
        return sum(g.total for g in self.gpus) if self.known else None

    @property
    def device_used(self) -> int | None:
        """The GPUs' own used figure (other processes included), where every GPU reports one."""
        if not self.gpus or any(g.used is None for g in self.gpus):
            return None
        return sum(g.used or 0 for g in self.gpus)


def read_each(nodes: Sequence[NodeConfig], read_node: Callable[[NodeConfig], Capacity]) -> dict[str, Capacity]:
    """Node name → `read_node(node)`, the nodes read side by side (at most 16 at once)."""
    if not nodes:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
        return dict(zip([n.name for n in nodes], pool.map(read_node, nodes), strict=True))


UNKNOWN = Capacity(source="unknown", reason="capacity not read")


@dataclass(frozen=True)
class NodeState:
    """One node as seen by one poll."""

    config: NodeConfig
    up: bool
    margin: float
    capacity: Capacity = UNKNOWN
    error_kind: str | None = None  # refused, timeout, server_error, garbage, ... when the node was not read
    error: str | None = None
    version: str | None = None
    loaded: tuple[LoadedModel, ...] = ()
    installed: tuple[InstalledModel, ...] = ()
    poll_seconds: float = 0.0
    hidden: int = 0  # VRAM inferred to be held by something the capacity source cannot see
    hidden_why: str = ""
    hidden_model: str | None = None  # the copy whose landing showed it: reloading that copy tests it again

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def era(self) -> str:
        """The Ollama era of the node's version (the newest when unknown)."""
        return eras.era_of(self.version)

    @property
    def default_context(self) -> tuple[int, str]:
        """(the context a model gets here when nothing else sets one, where that figure comes from)."""
        if not self.config.context_length and self.capacity.default_context:
            return self.capacity.default_context, "Ollama's log"
        return eras.default_context(self.version, self.config.context_length, self.vram_total)

    @property
    def vram_total(self) -> int | None:
        return self.capacity.total

    @property
    def vram_usable(self) -> int | None:
        total = self.vram_total
        return None if total is None else int(total * self.margin)

    @property
    def vram_used(self) -> int:
        """Σ size_vram of loaded models (plus what is inferred to be held by others), or the GPUs' own used
        figure where that is larger."""
        used = sum(m.size_vram for m in self.loaded) + self.hidden
        return max(used, self.capacity.device_used or 0)

    @property
    def vram_free(self) -> int | None:
        usable = self.vram_usable
        return None if usable is None else max(0, usable - self.vram_used)

    @property
    def max_loaded(self) -> int:
        """How many models Ollama keeps loaded here at once (OLLAMA_MAX_LOADED_MODELS, else 3 × GPUs, 3 on a node
        without GPU): a load past it makes Ollama unload one first, of its own choosing."""
        return self.config.max_loaded_models or 3 * max(1, len(self.capacity.gpus))

    def exempt(self, model: str) -> int:
        """Inferred hidden VRAM that does not count against reloading `model` here: its own partial copy gave
        the evidence, and its reload is the test of whether that memory came back."""
        return self.hidden if self.hidden_model == model_key(model) else 0

    def loaded_model(self, model: str) -> LoadedModel | None:
        key = model_key(model)
        return next((m for m in self.loaded if model_key(m.name) == key), None)

    def installed_model(self, model: str) -> InstalledModel | None:
        key = model_key(model)
        return next((m for m in self.installed if model_key(m.name) == key), None)


@dataclass(frozen=True)
class ModelNeed:
    """The VRAM a model takes fully on GPU on one node, at the context it gets there, by that node's era.

    `bytes` is what the copy occupies (classic: Ollama's estimate; llama-server: the footprint `/api/ps` will
    report); `source` the rung of the ladder that gave it (observed, estimated, configured, disk, catalog).
    On a llama-server node `admission` holds Ollama's own prediction, which decides whether Ollama evicts
    another model to start this one.
    """

    model: str
    bytes: int
    source: str
    num_ctx: int  # context per sequence on that node
    node: str | None = None
    era: str = eras.CLASSIC
    parallel: int = 1
    context_source: str = ""  # configured (the priority model), modelfile, or how the node's default was found
    admission: Admission | None = None


@dataclass(frozen=True)
class ClusterState:
    """Every configured node at `taken_at` (Unix seconds), plus what each known model needs."""

    config: Config
    taken_at: float
    nodes: tuple[NodeState, ...]
    needs: Mapping[tuple[str, str], ModelNeed] = field(default_factory=lambda: MappingProxyType({}))  # (node, model)
    embedding: frozenset[str] = frozenset()  # models whose /api/show lists the `embedding` capability
    layers: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # block_count + 1 (output)
    duration: float = 0.0
    unread: tuple[str, ...] = ()  # what this poll asked for and did not get, in words (the answer is incomplete)

    def node(self, name: str) -> NodeState | None:
        return next((n for n in self.nodes if n.name == name), None)

    def need(self, model: str, node: str) -> ModelNeed | None:
        """What `model` takes fully on GPU on `node`, where the ladder knows it."""
        return self.needs.get((node, model_key(model)))

    def needs_of(self, model: str) -> dict[str, ModelNeed]:
        """Node → what `model` takes there, for every node where it is known."""
        key = model_key(model)
        return {node: need for (node, m), need in self.needs.items() if m == key}

    def is_embedding(self, model: str) -> bool:
        return model_key(model) in self.embedding

    def placements(self, model: str) -> list[tuple[NodeState, LoadedModel]]:
        """Every (node, copy) where the model is loaded."""
        return [(n, m) for n in self.nodes if (m := n.loaded_model(model)) is not None]

    def gpu_copies(self, model: str) -> list[tuple[NodeState, LoadedModel]]:
        """The copies fully on GPU on nodes not in maintenance, in the configuration's order: the first is a
        priority model's pinned copy."""
        return [(n, m) for n, m in self.placements(model) if m.fully_on_gpu and not n.config.maintenance]

    def on_gpu(self, model: str) -> bool:
        """True when some node holds the model fully on GPU."""
        return any(m.fully_on_gpu for _, m in self.placements(model))

    def known_models(self) -> list[str]:
        """Every model that is installed, loaded, a priority model or has a configured size, sorted."""
        names = {model_key(p.name) for p in self.config.priority_models}
        names.update(self.config.model_sizes)
        for node in self.nodes:
            names.update(model_key(m.name) for m in node.installed)
            names.update(model_key(m.name) for m in node.loaded)
        return sorted(names)
