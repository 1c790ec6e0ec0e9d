"""The exporter over HTTP against a simulated demo-like fleet: every figure as the nodes report it, faults,
no stale series, promtool on a real scrape, concurrent scrapes, and the `gpu-router exporter` command."""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import require_tool
from prometheus_client.parser import text_string_to_metric_families

from cli.localstack import wait_for
from exporter.server import ExporterServer, limit_malloc_arenas, start_exporter
from gpurouter.cluster.config import Config, parse_config
from gpurouter.cluster.ollama import OllamaClient
from gpurouter.serve.listen import parse_listen
from simulator.run import Fleet, fleet_from_dict

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 1.0  # the config's request_timeout in these tests
MARGIN = 0.5

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def demo_fleet_dict() -> dict:
    """examples/demo-fleet.yaml on ephemeral ports, with instant loads and three models loaded."""
    data = yaml.safe_load((ROOT / "examples" / "demo-fleet.yaml").read_text())
    data["control_port"] = 0
    preload = {
        # a priority model forced onto CPU, and a small model fully on GPU
        "gpu-small": [{"model": "mxbai-embed-large", "num_gpu": 0, "keep_alive": -1}, {"model": "llama3.2:1b"}],
        "cpu-node": [{"model": "qwen2.5-coder:1.5b"}],
        # the first model on the node, too large at this context: partly offloaded
        "gpu-large": [{"model": "codellama:7b", "num_ctx": 16384, "keep_alive": -1}],
    }
    for node in data["nodes"]:
        node.update(port=0, load_speed=0, token_rate=0, preload=preload[node["name"]])
    return data


def demo_config(urls: dict[str, str]) -> Config:
    """examples/gpu_router_config.yaml pointed at the running fleet."""
    data = yaml.safe_load((ROOT / "examples" / "gpu_router_config.yaml").read_text())
    for node in data["nodes"]:
        node["url"] = urls[node["name"]]
    data["request_timeout"] = TIMEOUT
    return parse_config(data, "gpu_router_config.yaml")


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    with Fleet(fleet_from_dict(demo_fleet_dict())) as running:
        yield running


@pytest.fixture
def exporter(fleet: Fleet) -> Iterator[ExporterServer]:
    server, thread = start_exporter(demo_config(fleet.urls), "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.stop()
        thread.join(5)
        assert not thread.is_alive()


def scrape(server: ExporterServer) -> tuple[str, float]:
    started = time.monotonic()
    response = requests.get(f"{server.url}/metrics", timeout=10)
    took = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return response.text, took


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(frozenset(labels.items()))


def series(samples: Samples, name: str) -> set[frozenset[tuple[str, str]]]:
    return set(samples.get(name, {}))


# ------------------------------------------------------------------------------------------ the figures


def test_every_figure_equals_what_the_nodes_report(fleet: Fleet, exporter: ExporterServer) -> None:
    samples = parse(scrape(exporter)[0])
    config = demo_config(fleet.urls)
    for node in config.nodes:
        client = OllamaClient(node.url)
        version, loaded, installed = client.version(), client.ps(), client.tags()
        client.close()
        name = node.name
        assert value(samples, "gpu_router_node_up", node=name) == 1
        source = "none" if name == "cpu-node" else "static"
        info = {"node": name, "url": node.url, "version": version, "era": "llama_server", "gpu_source": source}
        assert value(samples, "gpu_router_node_info", **info) == 1
        context = 4096  # the demo's GPUs are under 23 GiB: the smallest VRAM tier
        assert value(samples, "gpu_router_node_default_context_tokens", node=name) == context
        total = sum(g.vram for g in node.static_gpus or ())
        used = sum(m.size_vram for m in loaded)
        assert value(samples, "gpu_router_node_vram_total_bytes", node=name) == total
        assert value(samples, "gpu_router_node_vram_usable_bytes", node=name) == int(total * 0.8)
        assert value(samples, "gpu_router_node_vram_used_bytes", node=name) == used
        assert value(samples, "gpu_router_node_vram_free_bytes", node=name) == max(0, int(total * 0.8) - used)
        for m in loaded:
            labels = {"node": name, "model": m.name}
            assert value(samples, "gpu_router_model_loaded_bytes", **labels) == m.size
            assert value(samples, "gpu_router_model_vram_bytes", **labels) == m.size_vram
            assert value(samples, "gpu_router_model_gpu_ratio", **labels) == pytest.approx(m.size_vram / m.size)
            assert value(samples, "gpu_router_model_context_tokens", **labels) == m.context_length
            assert m.expires_at is not None
            expiry = value(samples, "gpu_router_model_expiry_timestamp_seconds", **labels)
            assert expiry == pytest.approx(m.expires_at.timestamp(), abs=1e-3)
        assert {
            dict(k)["model"] for k in series(samples, "gpu_router_model_loaded_bytes") if dict(k)["node"] == name
        } == {m.name for m in loaded}
        assert {dict(k)["model"] for k in series(samples, "gpu_router_model_installed") if dict(k)["node"] == name} == {
            m.name for m in installed
        }
    gpus = samples["gpu_router_gpu_memory_total_bytes"]
    assert gpus == {
        frozenset({"node": "gpu-small", "gpu": "0", "name": "NVIDIA GeForce GTX 1050 Ti"}.items()): 4 * 1024**3,
        frozenset({"node": "gpu-large", "gpu": "0", "name": "NVIDIA GeForce RTX 3070"}.items()): 8 * 1024**3,
    }


def test_cpu_partial_and_fits_as_the_issue_demands(exporter: ExporterServer, fleet: Fleet) -> None:
    samples = parse(scrape(exporter)[0])
    # the priority embedder loaded with num_gpu 0 is on CPU
    assert value(samples, "gpu_router_model_gpu_ratio", node="gpu-small", model="mxbai-embed-large:latest") == 0
    assert value(samples, "gpu_router_model_on_gpu", model="mxbai-embed-large:latest") == 0
    # the partial load shows its fraction, strictly between 0 and 1
    (codellama,) = fleet.node("gpu-large").state()["loaded"]
    ratio = value(samples, "gpu_router_model_gpu_ratio", node="gpu-large", model="codellama:7b")
    assert ratio == pytest.approx(codellama["size_vram"] / codellama["size"]) and 0 < ratio < 1
    assert value(samples, "gpu_router_model_on_gpu", model="codellama:7b") == 0
    assert value(samples, "gpu_router_model_on_gpu", model="llama3.2:1b") == 1
    # llama3.1:latest fits the 8 GiB node's usable VRAM, not the 4 GiB one's, and never the CPU node
    assert value(samples, "gpu_router_model_fits", node="gpu-large", model="llama3.1:latest") == 1
    assert value(samples, "gpu_router_model_fits", node="gpu-small", model="llama3.1:latest") == 0
    assert value(samples, "gpu_router_model_fits", node="cpu-node", model="llama3.1:latest") == 0
    assert value(samples, "gpu_router_model_fits_free", node="gpu-large", model="llama3.1:latest") == 0  # full now
    assert value(samples, "gpu_router_model_fits_free", node="gpu-small", model="nomic-embed-text:latest") == 1
    assert value(samples, "gpu_router_model_priority", model="mxbai-embed-large:latest") == 1
    assert value(samples, "gpu_router_model_priority", model="llama3.1:latest") == 2
    assert value(samples, "gpu_router_model_on_gpu", model="llama3.1:latest") == 0  # loaded nowhere
    required = {
        (dict(k)["node"], dict(k)["model"]): dict(k)["source"]
        for k in series(samples, "gpu_router_model_required_bytes")
    }
    assert required[("gpu-large", "llama3.1:latest")] in ("estimated", "disk")  # /api/show may still be on its way
    assert {node for node, _ in required} == {"gpu-small", "gpu-large"}  # not the CPU node


def test_the_need_of_a_model_is_estimated_once_show_has_answered(exporter: ExporterServer) -> None:
    labels = {"node": "gpu-large", "model": "llama3.1:latest", "source": "estimated"}
    footprint = 5_268_035_339  # llama-server at 4096 tokens: blocks, output layer, KV cache, compute buffer,
    # each rounded up to the 0.01 MiB its log prints
    wait_for(lambda: value(parse(scrape(exporter)[0]), "gpu_router_model_required_bytes", **labels) == footprint)


def test_promtool_accepts_a_real_scrape(exporter: ExporterServer) -> None:
    promtool = require_tool("promtool")
    text = scrape(exporter)[0]
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result


# ---------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize(("fault", "params"), [("down", {}), ("slow", {"latency_ms": 5000}), ("garbage", {})])
def test_a_bad_node_is_down_alone_and_the_scrape_keeps_its_deadline(
    fleet: Fleet, exporter: ExporterServer, fault: str, params: dict[str, int]
) -> None:
    scrape(exporter)
    fleet.node("gpu-small").inject(fault, **params)
    text, took = scrape(exporter)
    samples = parse(text)
    assert took <= TIMEOUT + MARGIN, took
    assert {dict(k)["node"]: v for k, v in samples["gpu_router_node_up"].items()} == {
        "gpu-small": 0,
        "cpu-node": 1,
        "gpu-large": 1,
    }
    assert (
        value(
            samples,
            "gpu_router_node_info",
            node="gpu-small",
            url=fleet.urls["gpu-small"],
            version="",
            era="llama_server",
            gpu_source="static",
        )
        == 1
    )
    for name in samples:
        if name.startswith("gpu_router_model_") and "fits" not in name and "required" not in name:
            assert all(dict(k).get("node") != "gpu-small" for k in samples[name]), name  # nothing stale
    # what a model needs there and whether it fits are facts of the node's hardware: still published
    assert value(samples, "gpu_router_node_vram_used_bytes", node="gpu-small") is None
    assert value(samples, "gpu_router_node_vram_total_bytes", node="gpu-small") == 4 * 1024**3
    assert value(samples, "gpu_router_model_fits_free", node="gpu-small", model="all-minilm:latest") == 0
    assert value(samples, "gpu_router_model_loaded_bytes", node="gpu-large", model="codellama:7b") is not None
    fleet.node("gpu-small").clear(fault)
    assert value(parse(scrape(exporter)[0]), "gpu_router_node_up", node="gpu-small") == 1


def test_an_unloaded_model_leaves_no_series(fleet: Fleet, exporter: ExporterServer) -> None:
    labels = {"node": "gpu-small", "model": "llama3.2:1b"}
    assert value(parse(scrape(exporter)[0]), "gpu_router_model_loaded_bytes", **labels) is not None
    OllamaClient(fleet.urls["gpu-small"]).unload("llama3.2:1b")
    samples = wait_for(
        lambda: (s := parse(scrape(exporter)[0])) and value(s, "gpu_router_model_loaded_bytes", **labels) is None and s
    )
    for name in ("vram_bytes", "gpu_ratio", "context_tokens", "expiry_timestamp_seconds"):
        assert value(samples, f"gpu_router_model_{name}", **labels) is None
    assert value(samples, "gpu_router_model_installed", **labels) == 1
    assert value(samples, "gpu_router_model_on_gpu", model="llama3.2:1b") is None  # not priority, not loaded


# ------------------------------------------------------------------------------------------------ HTTP


def test_concurrent_scrapes_all_answer(exporter: ExporterServer) -> None:
    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda _: scrape(exporter)[0], range(6)))
    shapes = [
        {(n, k) for n, ks in parse(t).items() for k in ks if n != "gpu_router_model_required_bytes"} for t in texts
    ]
    assert all(shape == shapes[0] for shape in shapes)


def test_landing_page_health_and_errors(exporter: ExporterServer) -> None:
    page = requests.get(f"{exporter.url}/", timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "href='/metrics'" in page.text and "gpu-large" in page.text
    health = requests.get(f"{exporter.url}/healthz", timeout=5)
    assert (health.status_code, health.text) == (200, "ok\n")
    assert requests.get(f"{exporter.url}/nope", timeout=5).status_code == 404
    assert requests.post(f"{exporter.url}/metrics", timeout=5).status_code == 405


def test_malloc_arenas_are_capped_on_glibc() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the C library is not glibc")
    assert limit_malloc_arenas() is True


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9877") == ("127.0.0.1", 9877)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9877") == ("0.0.0.0", 9877)  # every Prometheus exporter's habit: all interfaces
    for bad in ("9877", "host:", "h:99999", "h:x", "::1:9877", "[]:80"):
        with pytest.raises(Exception, match="expected HOST:PORT"):
            parse_listen(bad)


# --------------------------------------------------------------------------------------------- command


def cli(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, stderr=subprocess.PIPE, **kwargs)


def test_the_command_serves_and_stops_on_sigterm(fleet: Fleet, tmp_path: Path) -> None:
    config = tmp_path / "gpu_router_config.yaml"
    raw = yaml.safe_load((ROOT / "examples" / "gpu_router_config.yaml").read_text())
    for node in raw["nodes"]:
        node["url"] = fleet.urls[node["name"]]
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "exporter.log"
    with log.open("w") as out:
        process = cli("exporter", "--config", str(config), "--listen", "127.0.0.1:0", stdout=out)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert re.match(r"time=\S+ level=INFO event=listening ", line), line  # the optimizer's format
        match = re.search(r"url=(http://127\.0\.0\.1:\d+)/metrics nodes=3 config=", line)
        assert match, line
        text = requests.get(f"{match.group(1)}/metrics", timeout=10).text
        assert 'gpu_router_node_up{node="gpu-large"} 1.0' in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_command_rejects_bad_usage_in_one_line(tmp_path: Path) -> None:
    process = cli("exporter", "--config", str(tmp_path / "missing.yaml"))
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2 and err.strip().count("\n") == 0 and "missing.yaml: no such file" in err
    process = cli("exporter", "--config", str(tmp_path / "missing.yaml"), "--listen", "nowhere")
    _, err = process.communicate(timeout=30)
    assert (
        process.returncode == 2 and "expected HOST:PORT, [IPv6]:PORT or :PORT like 127.0.0.1:9877, got 'nowhere'" in err
    )


def test_a_taken_port_is_a_clear_error(fleet: Fleet, tmp_path: Path, exporter: ExporterServer) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"nodes": [fleet.urls["gpu-large"]]}))
    host, port = exporter.url.removeprefix("http://").rsplit(":", 1)
    process = cli("exporter", "--config", str(config), "--listen", f"{host}:{port}")
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1 and f"cannot listen on {host}:{port}" in err and err.count("\n") == 1


def test_idle_connections_hold_no_thread_and_a_burst_is_not_held_back(exporter: ExporterServer) -> None:
    host, port = exporter.url.removeprefix("http://").rsplit(":", 1)
    address = (host, int(port))
    scrape(exporter)  # the poll's worker threads exist from now on
    threads = threading.active_count()
    idle = [socket.create_connection(address, timeout=10) for _ in range(50)]
    try:
        for sock in idle:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # a request that never ends
        assert scrape(exporter)[0]  # answered behind them: they have all been accepted by now
        assert threading.active_count() - threads < 10
    finally:
        for sock in idle:
            sock.close()
    gate = threading.Barrier(200)

    def connect(_: int) -> float:
        gate.wait()
        started = time.monotonic()
        with socket.create_connection(address, timeout=10):
            return time.monotonic() - started

    with ThreadPoolExecutor(200) as pool:
        waits = list(pool.map(connect, range(200)))
    assert max(waits) < 1.0  # a dropped SYN (backlog full) is sent again only after 1 s
