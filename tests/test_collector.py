"""The collector over hand-built cluster states: every metric of DESIGN.md, fits, no stale series, promtool."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from types import MappingProxyType

import pytest
from conftest import require_tool
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from exporter.collector import (
    METRICS,
    ClusterCollector,
    cluster_families,
    fits_free,
)
from gpurouter.cluster.config import Config, parse_config
from gpurouter.cluster.ollama import InstalledModel, LoadedModel
from gpurouter.cluster.state import Capacity, ClusterState, GpuInfo, ModelNeed, NodeState
from gpurouter.sizing.room import Room
from gpurouter.units import GIB, MIB

EXPIRY = datetime(2318, 1, 1, tzinfo=timezone.utc)
LLAMA_NEED = 6_099_560_448  # llama3.1:8b at 4096 (reference §5.5)
MXBAI_NEED = 1_183_850_496

CONFIG = parse_config(
    {
        "nodes": [
            {"name": "gpu-small", "url": "http://127.0.0.1:11501", "gpus": [{"name": "GTX 1050 Ti", "vram": "4GiB"}]},
            {"name": "cpu-node", "url": "http://127.0.0.1:11502", "vram": 0},
            {"name": "gpu-large", "url": "http://127.0.0.1:11503", "gpus": [{"name": "RTX 3070", "vram": "8GiB"}]},
            {"name": "mystery", "url": "http://10.0.0.4:11434"},
            {"name": "gone", "url": "http://127.0.0.1:11505", "vram": "8GiB"},
        ],
        "priority_models": ["mxbai-embed-large", {"name": "llama3.1:latest", "num_ctx": 4096}],
        "vram_safety_margin": 0.8,  # the guide's figures
    }
)


def loaded(
    name: str, size: int, size_vram: int, ctx: int | None = 4096, expires: datetime | None = EXPIRY
) -> LoadedModel:
    return LoadedModel(
        name=name, size=size, size_vram=size_vram, digest=f"d-{name}", expires_at=expires, context_length=ctx
    )


def installed(*names: str) -> tuple[InstalledModel, ...]:
    return tuple(InstalledModel(name=n, size=GIB, digest=f"d-{n}") for n in names)


def static(node: str) -> Capacity:
    cap = next(n for n in CONFIG.nodes if n.name == node)
    gpus = cap.static_gpus or ()
    if not gpus:
        return Capacity("none", reason="vram: 0")
    return Capacity("static", tuple(GpuInfo(i, g.name, g.vram) for i, g in enumerate(gpus)))


def node_state(name: str, *, up: bool = True, capacity: Capacity | None = None, **kw: object) -> NodeState:
    cfg = CONFIG.node(name)
    assert cfg is not None
    return NodeState(
        config=cfg,
        up=up,
        margin=CONFIG.margin,
        capacity=capacity or static(name),
        version="0.12.10" if up else None,
        poll_seconds=0.25,
        **kw,  # type: ignore[arg-type]
    )


def demo_state(config: Config = CONFIG, *, with_mxbai: bool = True) -> ClusterState:
    """mxbai on CPU on cpu-node... and on gpu-small with num_gpu 0; llama partly offloaded on gpu-small."""
    mxbai = loaded("mxbai-embed-large:latest", MXBAI_NEED, 0, ctx=512)
    small_loaded = (loaded("llama3.1:latest", 6_499_565_568, 4_141_654_016), *((mxbai,) if with_mxbai else ()))
    nodes = (
        node_state(
            "gpu-small",
            loaded=small_loaded,
            installed=installed("llama3.1:latest", "mxbai-embed-large:latest"),
        ),
        node_state("cpu-node", installed=installed("all-minilm:latest")),
        node_state(
            "gpu-large",
            loaded=(loaded("qwen2.5-coder:1.5b", 1_925_233_152, 1_925_233_152, expires=None, ctx=None),),
            installed=installed("llama3.1:latest", "qwen2.5-coder:1.5b"),
        ),
        node_state("mystery", capacity=Capacity("unknown", reason="no vram"), installed=installed("llama3.1:latest")),
        node_state("gone", up=False, error_kind="timeout", error="no answer"),
    )
    needs = per_node(
        nodes,
        ModelNeed("llama3.1:latest", LLAMA_NEED, "estimated", 4096),
        ModelNeed("mxbai-embed-large:latest", MXBAI_NEED, "observed", 512),
        ModelNeed("qwen2.5-coder:1.5b", 1_925_233_152, "observed", 4096),
        ModelNeed("all-minilm:latest", 528_797_696, "catalog", 512),
    )
    return ClusterState(config=config, taken_at=1e9, nodes=nodes, needs=needs, duration=0.3)


def per_node(nodes: tuple[NodeState, ...], *needs: ModelNeed) -> MappingProxyType:
    """The same (classic-era) figure for each model on every node."""
    return MappingProxyType({(n.name, need.model): replace(need, node=n.name) for n in nodes for need in needs})


class FakeObserver:
    """Hands out the states it is given, one per poll."""

    def __init__(self, *states: ClusterState) -> None:
        self.states = list(states)
        self.polls = 0

    def poll(self) -> ClusterState:
        self.polls += 1
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def registry_for(*states: ClusterState) -> tuple[CollectorRegistry, FakeObserver]:
    observer = FakeObserver(*states)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ClusterCollector(observer, version="1.2.3"))  # type: ignore[arg-type]
    return registry, observer


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def labelled(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


# -------------------------------------------------------------------------------------------------- fits


def room(node: NodeState) -> Room:
    found = Room.of(node)
    assert found is not None
    return found


def need(size: int, model: str = "x:latest") -> ModelNeed:
    return ModelNeed(model, size, "configured", 4096)


def test_fits_use_usable_vram_and_unknown_capacity_has_no_room() -> None:
    state = demo_state()
    small, cpu, large, mystery, gone = state.nodes
    assert room(large).fits(need(LLAMA_NEED))  # 8 GiB × 0.8 = 6.4 GiB ≥ 5.68 GiB
    assert not room(small).fits(need(LLAMA_NEED))
    assert not room(cpu).fits(need(0)) and not room(cpu).fits_free(need(0)) and room(cpu).usable == 0
    assert Room.of(mystery) is None
    assert room(gone).fits(need(LLAMA_NEED))  # capacity is a fact of the hardware
    assert not fits_free(gone, room(gone), need(1, "llama3.1:latest"))  # but nothing loads there now


def test_fits_free_counts_used_vram_and_what_is_already_on_gpu() -> None:
    state = demo_state()
    small, _, large, _, _ = state.nodes
    assert large.vram_free == int(8 * GIB * 0.8) - 1_925_233_152
    assert room(large).usable - room(large).used == large.vram_free
    assert not fits_free(large, room(large), need(LLAMA_NEED, "llama3.1:latest"))  # 4.4 GiB free < 5.68 GiB
    assert fits_free(large, room(large), need(528_797_696, "all-minilm:latest"))
    assert fits_free(large, room(large), need(10**12, "qwen2.5-coder:1.5b"))  # already fully on GPU there
    assert not fits_free(small, room(small), need(LLAMA_NEED, "llama3.1:latest"))  # a partial copy is not on GPU


def test_a_partly_offloaded_copy_counts_its_own_vram_as_free_for_itself() -> None:
    partial = loaded("codellama:7b", 14 * GIB, 6 * GIB)
    node = node_state("gpu-large", loaded=(partial,))
    assert room(node).usable - room(node).used == int(8 * GIB * 0.8) - 6 * GIB
    assert fits_free(node, room(node), need(int(8 * GIB * 0.8), "codellama:7b"))  # its reload reuses its 6 GiB
    assert not fits_free(node, room(node), need(LLAMA_NEED, "llama3.1:latest"))  # another model does not get them


# ----------------------------------------------------------------------------------------- the families


def test_every_metric_of_the_design_table_with_its_labels_and_help() -> None:
    families = {f.name: f for f in cluster_families(demo_state(), "1.2.3", 0.5)}
    assert list(families) == list(METRICS)
    for name, (labels, text) in METRICS.items():
        family = families[name]
        assert family.type == "gauge" and family.documentation == text
        for sample in family.samples:
            assert tuple(sorted(sample.labels)) == tuple(sorted(labels)), name
    assert families["gpu_router_node_vram_usable_bytes"].documentation == "total × vram_safety_margin"


def test_node_metrics() -> None:
    registry, _ = registry_for(demo_state())
    up = samples(registry, "gpu_router_node_up")
    assert up == {
        labelled(node=n): (0.0 if n == "gone" else 1.0)
        for n in ("gpu-small", "cpu-node", "gpu-large", "mystery", "gone")
    }
    info = samples(registry, "gpu_router_node_info")
    assert (
        info[
            labelled(
                node="gpu-small", url="http://127.0.0.1:11501", version="0.12.10", era="classic", gpu_source="static"
            )
        ]
        == 1
    )
    assert (
        info[
            labelled(node="cpu-node", url="http://127.0.0.1:11502", version="0.12.10", era="classic", gpu_source="none")
        ]
        == 1
    )
    assert (
        info[
            labelled(
                node="mystery", url="http://10.0.0.4:11434", version="0.12.10", era="classic", gpu_source="unknown"
            )
        ]
        == 1
    )
    assert (
        info[labelled(node="gone", url="http://127.0.0.1:11505", version="", era="llama_server", gpu_source="static")]
        == 1
    )
    assert registry.get_sample_value("gpu_router_node_poll_duration_seconds", {"node": "gone"}) == 0.25

    total = samples(registry, "gpu_router_node_vram_total_bytes")
    assert total == {
        labelled(node="gpu-small"): 4 * GIB,
        labelled(node="cpu-node"): 0,
        labelled(node="gpu-large"): 8 * GIB,
        labelled(node="gone"): 8 * GIB,
    }
    usable = samples(registry, "gpu_router_node_vram_usable_bytes")
    assert usable[labelled(node="gpu-large")] == int(8 * GIB * 0.8) and usable[labelled(node="cpu-node")] == 0
    used = samples(registry, "gpu_router_node_vram_used_bytes")
    assert used == {
        labelled(node="gpu-small"): 4_141_654_016,
        labelled(node="cpu-node"): 0,
        labelled(node="gpu-large"): 1_925_233_152,
    }
    free = samples(registry, "gpu_router_node_vram_free_bytes")
    assert free[labelled(node="gpu-small")] == 0  # over usable: not below 0
    assert free[labelled(node="cpu-node")] == 0 and labelled(node="mystery") not in free


def test_gpu_metrics_per_gpu_where_known() -> None:
    nvml = Capacity("nvml", (GpuInfo(0, "RTX 3070", 8 * GIB, 2 * GIB), GpuInfo(1, "RTX 3060", 12 * GIB, 0)))
    state = demo_state()
    nodes = (state.nodes[0], node_state("gpu-large", capacity=nvml), *state.nodes[2:])
    registry, _ = registry_for(ClusterState(config=CONFIG, taken_at=0, nodes=nodes))
    total = samples(registry, "gpu_router_gpu_memory_total_bytes")
    assert total == {
        labelled(node="gpu-small", gpu="0", name="GTX 1050 Ti"): 4 * GIB,
        labelled(node="gpu-large", gpu="0", name="RTX 3070"): 8 * GIB,
        labelled(node="gpu-large", gpu="1", name="RTX 3060"): 12 * GIB,
        labelled(node="gone", gpu="0", name="GPU"): 8 * GIB,
    }
    used = samples(registry, "gpu_router_gpu_memory_used_bytes")  # only where the source gives it
    assert used == {
        labelled(node="gpu-large", gpu="0", name="RTX 3070"): 2 * GIB,
        labelled(node="gpu-large", gpu="1", name="RTX 3060"): 0,
    }
    assert registry.get_sample_value("gpu_router_node_vram_used_bytes", {"node": "gpu-large"}) == 2 * GIB


def test_loaded_model_metrics() -> None:
    registry, _ = registry_for(demo_state())
    get = registry.get_sample_value
    llama = {"node": "gpu-small", "model": "llama3.1:latest"}
    assert get("gpu_router_model_loaded_bytes", llama) == 6_499_565_568
    assert get("gpu_router_model_vram_bytes", llama) == 4_141_654_016
    assert get("gpu_router_model_gpu_ratio", llama) == pytest.approx(4_141_654_016 / 6_499_565_568)
    assert get("gpu_router_model_context_tokens", llama) == 4096
    assert get("gpu_router_model_expiry_timestamp_seconds", llama) == EXPIRY.timestamp()
    mxbai = {"node": "gpu-small", "model": "mxbai-embed-large:latest"}
    assert get("gpu_router_model_gpu_ratio", mxbai) == 0.0  # loaded with num_gpu 0
    qwen = {"node": "gpu-large", "model": "qwen2.5-coder:1.5b"}
    assert get("gpu_router_model_gpu_ratio", qwen) == 1.0
    assert get("gpu_router_model_context_tokens", qwen) is None  # not reported: no series
    assert get("gpu_router_model_expiry_timestamp_seconds", qwen) is None
    assert set(samples(registry, "gpu_router_model_loaded_bytes")) == {
        labelled(**llama),
        labelled(**mxbai),
        labelled(**qwen),
    }


def test_installed_required_priority_and_on_gpu() -> None:
    registry, _ = registry_for(demo_state())
    assert samples(registry, "gpu_router_model_installed") == {
        labelled(node=n, model=m): 1.0
        for n, m in [
            ("gpu-small", "llama3.1:latest"),
            ("gpu-small", "mxbai-embed-large:latest"),
            ("cpu-node", "all-minilm:latest"),
            ("gpu-large", "llama3.1:latest"),
            ("gpu-large", "qwen2.5-coder:1.5b"),
            ("mystery", "llama3.1:latest"),
        ]
    }
    required = samples(registry, "gpu_router_model_required_bytes")
    assert required[labelled(node="gpu-large", model="llama3.1:latest", source="estimated")] == LLAMA_NEED
    assert required[labelled(node="gpu-small", model="mxbai-embed-large:latest", source="observed")] == MXBAI_NEED
    assert {dict(k)["node"] for k in required} == {"gpu-small", "gpu-large", "mystery", "gone"}  # not the CPU node
    assert samples(registry, "gpu_router_model_priority") == {
        labelled(model="mxbai-embed-large:latest"): 1,
        labelled(model="llama3.1:latest"): 2,
    }
    assert samples(registry, "gpu_router_model_on_gpu") == {
        labelled(model="mxbai-embed-large:latest"): 0,
        labelled(model="llama3.1:latest"): 0,
        labelled(model="qwen2.5-coder:1.5b"): 1,
    }
    assert samples(registry, "gpu_router_exporter_build_info") == {labelled(version="1.2.3"): 1}
    assert registry.get_sample_value("gpu_router_collect_duration_seconds") >= 0


def test_fit_series_for_every_known_capacity_node_and_installed_or_priority_model() -> None:
    registry, _ = registry_for(demo_state())
    fits = samples(registry, "gpu_router_model_fits")
    models = ("all-minilm:latest", "llama3.1:latest", "mxbai-embed-large:latest", "qwen2.5-coder:1.5b")
    nodes = ("gpu-small", "cpu-node", "gpu-large", "gone")  # not `mystery`: unknown capacity
    assert set(fits) == {labelled(node=n, model=m) for n in nodes for m in models}
    assert set(samples(registry, "gpu_router_model_fits_free")) == set(fits)
    assert fits[labelled(node="gpu-large", model="llama3.1:latest")] == 1
    assert fits[labelled(node="gpu-small", model="llama3.1:latest")] == 0
    assert fits[labelled(node="cpu-node", model="all-minilm:latest")] == 0
    assert fits[labelled(node="gpu-small", model="mxbai-embed-large:latest")] == 1
    free = samples(registry, "gpu_router_model_fits_free")
    assert free[labelled(node="gpu-large", model="all-minilm:latest")] == 1
    assert free[labelled(node="gpu-small", model="mxbai-embed-large:latest")] == 0  # gpu-small is full
    assert free[labelled(node="gone", model="all-minilm:latest")] == 0


def test_a_model_without_a_need_gets_no_fit_series() -> None:
    state = demo_state()
    state = ClusterState(config=CONFIG, taken_at=0, nodes=state.nodes, needs=MappingProxyType({}))
    registry, _ = registry_for(state)
    assert samples(registry, "gpu_router_model_fits") == {}
    assert samples(registry, "gpu_router_model_required_bytes") == {}


def test_each_scrape_polls_again_and_leaves_no_stale_series() -> None:
    registry, observer = registry_for(demo_state(), demo_state(with_mxbai=False))
    first, second = generate_latest(registry).decode(), generate_latest(registry).decode()
    assert observer.polls == 2

    def copy_series(text: str) -> list[str]:
        key = '{model="mxbai-embed-large:latest",node="gpu-small"}'
        return [line.split("{")[0] for line in text.splitlines() if key in line and "_fits" not in line]

    per_copy = [
        "gpu_router_model_loaded_bytes",
        "gpu_router_model_vram_bytes",
        "gpu_router_model_gpu_ratio",
        "gpu_router_model_context_tokens",
        "gpu_router_model_expiry_timestamp_seconds",
    ]
    assert copy_series(first) == [*per_copy, "gpu_router_model_installed"]
    assert copy_series(second) == ["gpu_router_model_installed"]  # still installed, no longer loaded


def test_registering_does_not_poll() -> None:
    registry, observer = registry_for(demo_state())
    assert observer.polls == 0
    assert list(ClusterCollector(observer).describe()) == []  # type: ignore[arg-type]
    assert registry is not None


def test_duplicate_entries_give_one_series() -> None:
    state = demo_state()
    twice = loaded("llama3.1", GIB, GIB)
    nodes = (
        node_state("gpu-small", loaded=(twice, twice), installed=installed("llama3.1", "llama3.1:latest")),
        *state.nodes[1:],
    )
    registry, _ = registry_for(ClusterState(config=CONFIG, taken_at=0, nodes=nodes, needs=state.needs))
    assert (
        samples(registry, "gpu_router_model_loaded_bytes")[labelled(node="gpu-small", model="llama3.1:latest")] == GIB
    )
    text = generate_latest(registry).decode()
    assert text.count('gpu_router_model_installed{model="llama3.1:latest",node="gpu-small"}') == 1


def test_promtool_accepts_the_exposition() -> None:
    promtool = require_tool("promtool")
    registry, _ = registry_for(demo_state())
    text = generate_latest(registry)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result
    assert b"gpu_router_model_fits" in text and len(text.splitlines()) > 60


def test_units_in_sizes_are_bytes() -> None:
    registry, _ = registry_for(demo_state())
    assert registry.get_sample_value("gpu_router_node_vram_total_bytes", {"node": "gpu-small"}) == 4096 * MIB
