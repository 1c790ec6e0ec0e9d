"""Prometheus metrics for the cluster: a custom collector that polls every node on each scrape.

Every scrape builds new metric families from a fresh `ClusterState` (no gauges kept between scrapes), so a
model that unloads or a node that disappears leaves no stale series. Names, labels and meanings are
DESIGN.md's "Metrics" table. Choices where the table leaves room:

- capacity `none` (a CPU node) is a known capacity of 0 bytes: total, usable and free are 0 and every
  `fits` is 0 there; capacity `unknown` gives no total/usable/used/free/fits series for the node;
- used and free VRAM, and `fits_free`, need a node that answered: a down node keeps its total, usable and
  `fits` (facts of its hardware) but has no used/free series and `fits_free` 0 (nothing loads there now);
- what a model needs is per node (`gpu_router_model_required_bytes{node}`): the context it gets there and
  the node's Ollama era decide it;
- fits are counted as `gpurouter.decide.placement` counts them (`gpurouter.sizing.room.Room`, the rules of each
  node's Ollama); a partly offloaded copy's own VRAM counts as free for that model (its reload reuses it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from importlib import metadata

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpurouter.cluster.config import model_key
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.state import ClusterState, ModelNeed, NodeState
from gpurouter.sizing.room import Room
from gpurouter.urls import redact

# name → (labels, HELP). The order is the order of the scrape.
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "gpu_router_node_up": (("node",), "1 if the node's Ollama API answered this poll"),
    "gpu_router_node_info": (("node", "url", "version", "era", "gpu_source"), "always 1"),
    "gpu_router_node_default_context_tokens": (
        ("node",),
        "the context a model gets on the node when nothing else sets one",
    ),
    "gpu_router_node_poll_duration_seconds": (("node",), "time this node's poll took"),
    "gpu_router_node_vram_total_bytes": (("node",), "GPU memory of the node (absent when unknown)"),
    "gpu_router_node_vram_usable_bytes": (("node",), "total × vram_safety_margin"),
    "gpu_router_node_vram_used_bytes": (("node",), "VRAM in use"),
    "gpu_router_node_vram_free_bytes": (("node",), "usable − used, not below 0"),
    "gpu_router_gpu_memory_total_bytes": (("node", "gpu", "name"), "per GPU, where known: total memory"),
    "gpu_router_gpu_memory_used_bytes": (("node", "gpu", "name"), "per GPU, where known: memory in use"),
    "gpu_router_model_loaded_bytes": (("node", "model"), "/api/ps size"),
    "gpu_router_model_vram_bytes": (("node", "model"), "/api/ps size_vram"),
    "gpu_router_model_gpu_ratio": (("node", "model"), "size_vram / size (1 = all on GPU, 0 = CPU)"),
    "gpu_router_model_context_tokens": (("node", "model"), "/api/ps context_length, where reported"),
    "gpu_router_model_expiry_timestamp_seconds": (("node", "model"), "/api/ps expires_at"),
    "gpu_router_model_installed": (("node", "model"), "1 for each model in /api/tags"),
    "gpu_router_model_required_bytes": (
        ("node", "model", "source"),
        "VRAM the model needs fully on GPU on that node, at the context it would get there",
    ),
    "gpu_router_model_fits": (
        ("node", "model"),
        "1 if required ≤ usable VRAM of the node (known capacity only)",
    ),
    "gpu_router_model_fits_free": (
        ("node", "model"),
        "1 if it fits in free VRAM now, or is already fully on GPU there",
    ),
    "gpu_router_model_priority": (("model",), "rank of a configured priority model (1 = first)"),
    "gpu_router_model_on_gpu": (
        ("model",),
        "1 if fully on GPU on at least one node (every priority and loaded model)",
    ),
    "gpu_router_exporter_build_info": (("version",), "always 1"),
    "gpu_router_collect_duration_seconds": ((), "time the whole poll took"),
}


def exporter_version() -> str:
    """The installed package's version."""
    try:
        return metadata.version("ollama-gpu-router")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


# ------------------------------------------------------------------------------------------------ fits


def fits_free(node: NodeState, room: Room, need: ModelNeed) -> bool:
    """The model fits the node's free VRAM now (its own partial copy's VRAM counting as free), or is fully on
    GPU there already; never on a node that is down."""
    if not node.up:
        return False
    copy = node.loaded_model(need.model)
    if copy is not None and copy.fully_on_gpu:
        return True
    others = any(model_key(m.name) != need.model for m in node.loaded)
    freed = copy.size_vram if copy is not None else 0  # memory inferred held elsewhere counts, this copy's too
    return room.fits_free(need, freed=freed, others=others)


# ---------------------------------------------------------------------------------------------- samples

Sample = tuple[str, tuple[str, ...], float]  # (metric name, label values in METRICS' order, value)


class _Samples:
    """Samples under construction; a label set already added is not added twice."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self._seen: set[tuple[str, tuple[str, ...]]] = set()

    def add(self, name: str, labels: tuple[str, ...], value: float) -> None:
        key = (name, labels)
        if key not in self._seen:
            self._seen.add(key)
            self.samples.append((name, labels, float(value)))


def cluster_models(state: ClusterState) -> frozenset[str]:
    """The models that get fit series on every node: installed anywhere, or a priority model."""
    installed = {model_key(m.name) for node in state.nodes for m in node.installed}
    return frozenset(installed | {model_key(p.name) for p in state.config.priority_models})


def node_samples(node: NodeState, state: ClusterState, models: frozenset[str]) -> list[Sample]:
    """Every series of one node: its own and its models' (what the node needs from the state: its needs)."""
    out = _Samples()
    _node_metrics(out, node)
    room = Room.of(node)
    for model in sorted(models | {model_key(m.name) for m in node.loaded}):
        need = state.need(model, node.name)
        if need is None:
            continue
        if room is not None and not room.has_gpu:  # a CPU node: nothing goes on a GPU there
            out.add("gpu_router_model_fits", (node.name, model), 0)
            out.add("gpu_router_model_fits_free", (node.name, model), 0)
            continue
        out.add("gpu_router_model_required_bytes", (node.name, model, need.source), need.bytes)
        if room is not None and model in models:
            out.add("gpu_router_model_fits", (node.name, model), room.fits(need))
            out.add("gpu_router_model_fits_free", (node.name, model), fits_free(node, room, need))
    return out.samples


def cluster_samples(state: ClusterState, version: str, collect_seconds: float) -> list[Sample]:
    """The series that belong to no node: priorities, on GPU anywhere, the build and the poll's duration."""
    out = _Samples()
    priorities = [model_key(p.name) for p in state.config.priority_models]
    loaded = sorted({model_key(m.name) for node in state.nodes for m in node.loaded})
    for rank, model in enumerate(priorities, start=1):
        out.add("gpu_router_model_priority", (model,), rank)
    for model in [*priorities, *loaded]:
        out.add("gpu_router_model_on_gpu", (model,), state.on_gpu(model))
    out.add("gpu_router_exporter_build_info", (version,), 1)
    out.add("gpu_router_collect_duration_seconds", (), collect_seconds)
    return out.samples


def cluster_families(state: ClusterState, version: str, collect_seconds: float) -> list[Metric]:
    """Every metric family for one poll (pure: the same state always gives the same families)."""
    families = {name: GaugeMetricFamily(name, text, labels=labels) for name, (labels, text) in METRICS.items()}
    models = cluster_models(state)
    for node in state.nodes:
        for name, labels, value in node_samples(node, state, models):
            families[name].add_metric(list(labels), value)
    for name, labels, value in cluster_samples(state, version, collect_seconds):
        families[name].add_metric(list(labels), value)
    return list(families.values())


def _node_metrics(out: _Samples, node: NodeState) -> None:
    name = node.name
    capacity = node.capacity
    out.add("gpu_router_node_up", (name,), node.up)
    source = capacity.source if capacity.known else "unknown"
    out.add("gpu_router_node_info", (name, redact(node.config.url), node.version or "", node.era, source), 1)
    out.add("gpu_router_node_default_context_tokens", (name,), node.default_context[0])
    out.add("gpu_router_node_poll_duration_seconds", (name,), node.poll_seconds)
    if node.vram_total is not None and node.vram_usable is not None:
        out.add("gpu_router_node_vram_total_bytes", (name,), node.vram_total)
        out.add("gpu_router_node_vram_usable_bytes", (name,), node.vram_usable)
        if node.up and node.vram_free is not None:
            out.add("gpu_router_node_vram_used_bytes", (name,), node.vram_used)
            out.add("gpu_router_node_vram_free_bytes", (name,), node.vram_free)
    for gpu in capacity.gpus:
        labels = (name, str(gpu.index), gpu.name)
        out.add("gpu_router_gpu_memory_total_bytes", labels, gpu.total)
        if gpu.used is not None:
            out.add("gpu_router_gpu_memory_used_bytes", labels, gpu.used)
    for m in node.loaded:
        labels = (name, model_key(m.name))
        out.add("gpu_router_model_loaded_bytes", labels, m.size)
        out.add("gpu_router_model_vram_bytes", labels, m.size_vram)
        out.add("gpu_router_model_gpu_ratio", labels, m.gpu_ratio)
        if m.context_length is not None:
            out.add("gpu_router_model_context_tokens", labels, m.context_length)
        if m.expires_at is not None:
            out.add("gpu_router_model_expiry_timestamp_seconds", labels, m.expires_at.timestamp())
    for m in node.installed:
        out.add("gpu_router_model_installed", (name, model_key(m.name)), 1)


# -------------------------------------------------------------------------------------------- collector


class ClusterCollector(Collector):
    """Polls the cluster through `observer` on every `collect()` and yields fresh families."""

    def __init__(self, observer: Observer, version: str | None = None) -> None:
        self.observer = observer
        self.version = version or exporter_version()

    def describe(self) -> list[Metric]:
        """Nothing: registering must not poll the cluster."""
        return []

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        state = self.observer.poll()
        yield from cluster_families(state, self.version, time.monotonic() - started)
