"""`gpu_source: prometheus`: capacity of remote nodes from dcgm- and nvidia_gpu_exporter-shaped series.

The integration test runs the real Prometheus from Debian scraping a small fixture exporter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from test_ollama_client import canned

from cli.localstack import Prometheus, free_port, wait_for
from gpurouter.cluster.config import NodeConfig, PrometheusSource, parse_config
from gpurouter.cluster.promsource import PrometheusCapacity, capacity_from, queries_for
from gpurouter.units import GIB, MIB


def node(name: str, match: str | None = None) -> NodeConfig:
    return NodeConfig(name=name, url="http://127.0.0.1:11501", gpu_source="prometheus", prometheus_match=match)


def sample(labels: dict[str, str], value: float) -> dict:
    return {"metric": labels, "value": [1.0, str(value)]}


def test_queries_use_the_node_matcher() -> None:
    total, used, fresh = queries_for(PrometheusSource(url="http://p", template="dcgm"), node("gpu-large"))
    assert 'DCGM_FI_DEV_FB_FREE{Hostname="gpu-large"}' in total and "* 1048576" in total
    assert used == 'DCGM_FI_DEV_FB_USED{Hostname="gpu-large"} * 1048576'
    assert fresh == 'time() - timestamp(DCGM_FI_DEV_FB_USED{Hostname="gpu-large"})'
    total, _, _ = queries_for(PrometheusSource(url="http://p", template="gpu_router"), node("a", 'node="b"'))
    assert total == 'gpu_router_gpu_memory_total_bytes{node="b"}'
    custom = PrometheusSource(url="http://p", template="custom", total_query="t{{match}}", used_query="u{{match}}")
    assert queries_for(custom, node("n", 'host="n"'))[:2] == ('t{host="n"}', 'u{host="n"}')


def test_capacity_from_pairs_total_and_used_per_gpu() -> None:
    labels = [{"gpu": "1", "modelName": "B"}, {"gpu": "0", "modelName": "A"}]
    capacity = capacity_from(
        [sample(labels[0], 4 * GIB), sample(labels[1], 8 * GIB)],
        [sample(labels[1], GIB)],
        [sample(labels[0], 3), sample(labels[1], 2)],
        120,
        "node x",
    )
    assert capacity.source == "prometheus" and capacity.total == 12 * GIB
    assert [(g.index, g.name, g.used) for g in capacity.gpus] == [(0, "A", GIB), (1, "B", None)]
    assert capacity.device_used is None


def test_missing_and_stale_answers_are_unknown_with_the_reason() -> None:
    missing = capacity_from([], [], [], 120, "node gpu-x, template dcgm")
    assert not missing.known and missing.reason == "Prometheus has no GPU memory series for node gpu-x, template dcgm"
    stale = capacity_from([sample({}, GIB)], [], [sample({}, 600)], 120, "node n")
    assert not stale.known and "stale (last sample 600s old > 120s)" in stale.reason


def test_an_unreachable_prometheus_is_unknown_not_an_error() -> None:
    reader = PrometheusCapacity(PrometheusSource(url=f"http://127.0.0.1:{free_port()}"))
    capacity = reader.read([node("gpu-large")], 1.0)["gpu-large"]
    assert not capacity.known and "could not be read for node gpu-large" in capacity.reason


def test_a_prometheus_that_redirects_is_unknown_and_its_target_never_contacted() -> None:
    answer = {"status": "success", "data": {"resultType": "vector", "result": []}}
    with canned() as prometheus, canned() as elsewhere:
        target = f"http://127.0.0.1:{elsewhere.server_port}/api/v1/query"
        elsewhere.routes["/api/v1/query"] = (200, "application/json", answer)
        prometheus.routes["/api/v1/query"] = (302, "text/plain", "", {"Location": target})
        reader = PrometheusCapacity(PrometheusSource(url=f"http://127.0.0.1:{prometheus.server_port}"))
        capacity = reader.read([node("gpu-large")], 2.0)["gpu-large"]
        assert not capacity.known and capacity.reason.endswith("HTTP 302: a redirect (not followed)")
        assert len(prometheus.requests) == 1 and elsewhere.requests == []


@pytest.fixture
def gpu_exporter() -> Iterator[str]:
    """A fixture exporter serving dcgm-exporter and nvidia_gpu_exporter shaped series for two hosts."""
    registry = CollectorRegistry()
    dcgm = ["gpu", "UUID", "device", "modelName", "Hostname"]
    free = Gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", dcgm, registry=registry)
    used = Gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", dcgm, registry=registry)
    reserved = Gauge("DCGM_FI_DEV_FB_RESERVED", "Framebuffer memory reserved (in MiB).", dcgm, registry=registry)
    for host, gpu, name, (f, u, r) in [
        ("gpu-large", "0", "NVIDIA GeForce RTX 3070", (6000, 1800, 392)),
        ("gpu-small", "0", "NVIDIA GeForce GTX 1050 Ti", (3000, 1000, 96)),
    ]:
        labels = (gpu, f"GPU-{host}", "nvidia0", name, host)
        free.labels(*labels).set(f)
        used.labels(*labels).set(u)
        reserved.labels(*labels).set(r)
    smi_total = Gauge("nvidia_smi_memory_total_bytes", "Total memory.", ["uuid"], registry=registry)
    smi_used = Gauge("nvidia_smi_memory_used_bytes", "Used memory.", ["uuid"], registry=registry)
    smi_total.labels("GPU-x").set(24 * GIB)
    smi_used.labels("GPU-x").set(3 * GIB)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_capacity_through_a_real_prometheus(tmp_path: Path, gpu_exporter: str) -> None:
    require_tool("prometheus")
    prometheus = Prometheus(tmp_path / "prom", {"gpus": [gpu_exporter]})
    try:
        prometheus.wait_up(["gpus"])
        wait_for(lambda: prometheus.query("DCGM_FI_DEV_FB_RESERVED"), 30, "the dcgm series")
        config = parse_config(
            {
                "prometheus_url": prometheus.url,
                "nodes": [
                    {"name": "gpu-large", "url": "http://127.0.0.1:11503", "gpu_source": "prometheus"},
                    {"name": "gpu-small", "url": "http://127.0.0.1:11501", "gpu_source": "prometheus"},
                    {"name": "gone", "url": "http://127.0.0.1:11504", "gpu_source": "prometheus"},
                ],
            }
        )
        capacities = PrometheusCapacity(config.prometheus).read(config.nodes, 5.0)
        large, small, gone = (capacities[n] for n in ("gpu-large", "gpu-small", "gone"))
        assert large.source == "prometheus" and large.total == 8192 * MIB and large.device_used == 1800 * MIB
        assert large.gpus[0].name == "NVIDIA GeForce RTX 3070"
        assert small.total == 4096 * MIB and small.device_used == 1000 * MIB
        assert not gone.known and gone.reason == "Prometheus has no GPU memory series for node gone, template dcgm"

        smi = parse_config(
            {
                "prometheus": {"url": prometheus.url, "template": "nvidia_gpu_exporter"},
                "nodes": [{"name": "ws", "url": "http://127.0.0.1:11434", "gpu_source": "prometheus"}],
            }
        )
        (ws,) = PrometheusCapacity(smi.prometheus).read(smi.nodes, 5.0).values()
        assert ws.total == 24 * GIB and ws.device_used == 3 * GIB

        strict = PrometheusSource(url=prometheus.url, template="dcgm", max_age=0.001)
        stale = PrometheusCapacity(strict).read_node(config.nodes[0], 5.0)
        assert not stale.known and "are stale" in stale.reason
    finally:
        prometheus.stop()
