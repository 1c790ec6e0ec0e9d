"""The per-node topology: an exporter on each GPU node reads its own GPU (NVML or AMD sysfs), the real
Prometheus scrapes them all, and a central router reads that capacity back with `gpu_source: prometheus`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from test_capacity import FakeNvml, write_card

from cli.localstack import Prometheus, wait_for
from exporter.server import ExporterServer, start_exporter
from gpurouter.cluster.capacity import CapacityReader
from gpurouter.cluster.config import parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.decide import placement as decide
from gpurouter.units import GIB
from simulator.run import Fleet, fleet_from_dict

MODELS = ["mxbai-embed-large", "llama3.2:3b"]


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    nodes = [
        {"name": "gpu-a", "port": 0, "gpus": [{"name": "RTX 3070", "vram": "8GiB"}], "models": MODELS},
        {"name": "gpu-b", "port": 0, "gpus": [{"name": "Radeon RX 6600", "vram": "8GiB"}], "models": MODELS},
        {"name": "gpu-c", "port": 0, "gpus": [{"name": "RTX 3060", "vram": "12GiB"}], "models": MODELS},
    ]
    with Fleet(fleet_from_dict({"nodes": nodes})) as running:
        yield running


def node_exporter(fleet: Fleet, name: str, source: str, reader: dict) -> tuple[ExporterServer, object]:
    """`gpu-router exporter` as it runs on one GPU node: its local Ollama, its local GPU."""
    config = parse_config({"nodes": [{"name": name, "url": fleet.urls[name], "gpu_source": source}]})
    capacity = CapacityReader(config, local=lambda url: True, **reader)
    return start_exporter(config, observer=Observer(config, capacity=capacity))


def test_exporters_on_the_nodes_feed_a_central_router(fleet: Fleet, tmp_path: Path) -> None:
    require_tool("prometheus")
    write_card(tmp_path / "sys", "card0", 8 * GIB, 2 * GIB, name="Radeon RX 6600")
    nvml = FakeNvml([("NVIDIA GeForce RTX 3070", 8 * GIB, 7 * GIB, 256 * 1024 * 1024)])
    exporters = [
        node_exporter(fleet, "gpu-a", "nvml", {"nvml": nvml}),
        node_exporter(fleet, "gpu-b", "amd", {"sysfs_root": tmp_path / "sys"}),
    ]
    targets = [server.url.removeprefix("http://") for server, _ in exporters]
    prometheus = Prometheus(tmp_path / "prom", {"gpu-router-exporter": targets})
    try:
        prometheus.wait_up(["gpu-router-exporter"])
        wait_for(lambda: len(prometheus.query("gpu_router_gpu_memory_total_bytes")) == 2, 30, "both nodes' GPUs")
        # one series per node: the `node` label (the configured name) keeps the exporters apart
        counts = {r["metric"]["node"]: r["value"][1] for r in prometheus.query("count by (node) (gpu_router_node_up)")}
        assert counts == {"gpu-a": "1", "gpu-b": "1"}

        central = parse_config(
            {
                "prometheus": {"url": prometheus.url, "template": "gpu_router"},
                "nodes": [{"name": n, "url": fleet.urls[n], "gpu_source": "prometheus"} for n in fleet.urls],
                "priority_models": ["mxbai-embed-large"],
            }
        )
        with Observer(central) as observer:
            state = observer.poll(deadline=5)
        a, b, c = (state.node(n) for n in ("gpu-a", "gpu-b", "gpu-c"))
        used_a = 8 * GIB - 7 * GIB  # NVML's total − free: the driver's reserve counts as used
        assert (a.capacity.source, a.vram_total, a.capacity.device_used) == ("prometheus", 8 * GIB, used_a)
        assert a.capacity.gpus[0].name == "NVIDIA GeForce RTX 3070"
        assert (b.capacity.source, b.vram_total, b.capacity.device_used) == ("prometheus", 8 * GIB, 2 * GIB)
        assert not c.capacity.known  # no exporter runs on gpu-c

        verdicts = {v.node: v for v in decide.check(state, "mxbai-embed-large", state.taken_at).verdicts}
        assert verdicts["gpu-a"].fits and verdicts["gpu-b"].fits
        assert verdicts["gpu-c"].kind == "capacity_unknown"
        assert "or gpus on gpu-c, or another gpu_source" in verdicts["gpu-c"].reason
        assert "Prometheus has no GPU memory series for node gpu-c, template gpu_router" in verdicts["gpu-c"].reason
    finally:
        prometheus.stop()
        for server, thread in exporters:
            server.stop()
            thread.join(5)
