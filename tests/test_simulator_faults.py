"""The control server: every fault and its clearing, the node state, dcgm-style metrics, its own errors."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from cli.localstack import wait_for
from gpurouter.units import GIB, MIB
from simulator.faults import check_fault
from simulator.run import Fleet, fleet_from_dict

LLAMA8_FULL_4096 = 6_099_560_448


@pytest.fixture
def fleet():
    spec = fleet_from_dict(
        {
            "nodes": [
                {
                    "name": "gpu",
                    "version": "0.12.6",  # classic figures below
                    "gpus": [{"name": "NVIDIA GeForce RTX 3070", "vram": "8GiB"}],
                    "models": ["llama3.1:8b", "mxbai-embed-large", "all-minilm"],
                    "token_rate": 0,
                },
                {"name": "cpu", "version": "0.12.6", "ram": "32GiB", "models": ["llama3.1:8b"], "cpu_token_rate": 200},
            ]
        }
    )
    with Fleet(spec) as running:
        yield running


def control(fleet: Fleet, method: str, path: str, body: object = None) -> requests.Response:
    data = None if body is None else body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.request(method, fleet.control_url + path, data=data, timeout=10)


def inject(fleet: Fleet, node: str, **body: object) -> dict:
    reply = control(fleet, "POST", f"/nodes/{node}/fault", body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def load(url: str, model: str, **extra: object) -> dict:
    """A load request: /api/embed for embedding models, /api/generate for the others."""
    path = "/api/embed" if model in ("mxbai-embed-large", "all-minilm") else "/api/generate"
    reply = requests.post(url + path, json={"model": model, **extra}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def ps(url: str) -> list[dict]:
    return requests.get(f"{url}/api/ps", timeout=5).json()["models"]


def test_nodes_list_and_state(fleet):
    nodes = control(fleet, "GET", "/nodes").json()
    assert nodes == [
        {"name": "gpu", "url": fleet.urls["gpu"], "faults": {}},
        {"name": "cpu", "url": fleet.urls["cpu"], "faults": {}},
    ]
    load(fleet.urls["gpu"], "llama3.1:8b")
    state = control(fleet, "GET", "/nodes/gpu/state").json()
    assert list(state) == [
        "name", "url", "faults", "gpus", "loaded", "counts", "requests", "pending_loads", "prompt_tokens",
    ]  # fmt: skip
    assert state["gpus"] == [
        {"index": 0, "name": "NVIDIA GeForce RTX 3070", "total": 8 * GIB, "used": LLAMA8_FULL_4096,
         "free": 8 * GIB - LLAMA8_FULL_4096},
    ]  # fmt: skip
    [entry] = state["loaded"]
    assert {k: entry[k] for k in ("model", "size", "size_vram", "context_length", "busy")} == {
        "model": "llama3.1:8b", "size": LLAMA8_FULL_4096, "size_vram": LLAMA8_FULL_4096, "context_length": 4096,
        "busy": 0,
    }  # fmt: skip
    assert entry["expires_at"] == ps(fleet.urls["gpu"])[0]["expires_at"]
    assert state["counts"] == {"llama3.1:8b": {"loads": 1, "unloads": 0}}
    assert fleet.node("gpu").state() == state
    assert control(fleet, "GET", "/nodes/cpu/state").json()["gpus"] == []


def test_down_refuses_connections_until_cleared_on_the_same_port(fleet):
    url = fleet.urls["gpu"]
    load(url, "all-minilm", keep_alive=-1)
    assert inject(fleet, "gpu", fault="down") == {"name": "gpu", "faults": {"down": {}}}
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)
    assert "gpu" in control(fleet, "GET", "/metrics").text  # the GPU is still there
    assert control(fleet, "DELETE", "/nodes/gpu/fault").json() == {"name": "gpu", "faults": {}}
    assert fleet.urls["gpu"] == url
    assert requests.get(url, timeout=5).text == "Ollama is running"
    assert [m["name"] for m in ps(url)] == ["all-minilm:latest"]  # models survived the outage


def test_slow_adds_latency_to_every_response(fleet):
    url = fleet.urls["gpu"]
    assert inject(fleet, "gpu", fault="slow", latency_ms=300)["faults"] == {"slow": {"latency_ms": 300}}
    started = time.monotonic()
    assert requests.get(url, timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.3
    control(fleet, "DELETE", "/nodes/gpu/fault?fault=slow")
    started = time.monotonic()
    requests.get(url, timeout=5)
    assert time.monotonic() - started < 0.3


def test_error_answers_500_on_the_api_only(fleet):
    url = fleet.urls["gpu"]
    inject(fleet, "gpu", fault="error")
    for reply in (requests.get(f"{url}/api/tags", timeout=5), requests.post(f"{url}/api/generate", timeout=5)):
        assert (reply.status_code, reply.json()) == (500, {"error": "internal error"})
    assert requests.get(url, timeout=5).status_code == 200
    control(fleet, "DELETE", "/nodes/gpu/fault?fault=error")
    assert requests.get(f"{url}/api/tags", timeout=5).status_code == 200


def test_garbage_answers_200_with_a_body_that_is_not_json(fleet):
    url = fleet.urls["gpu"]
    inject(fleet, "gpu", fault="garbage")
    reply = requests.get(f"{url}/api/ps", timeout=5)
    assert reply.status_code == 200
    with pytest.raises(ValueError):
        json.loads(reply.content)
    fleet.node("gpu").clear("garbage")
    assert ps(url) == []


def test_restart_unloads_everything_once_and_counts_it(fleet):
    url = fleet.urls["gpu"]
    load(url, "all-minilm", keep_alive=-1)
    load(url, "mxbai-embed-large")
    assert inject(fleet, "gpu", fault="restart")["faults"] == {}  # a one-shot event
    assert ps(url) == []
    counts = fleet.node("gpu").counts()
    assert counts["all-minilm:latest"] == counts["mxbai-embed-large:latest"] == {"loads": 1, "unloads": 1}
    load(url, "all-minilm")
    assert len(ps(url)) == 1


def test_restart_during_a_stream_ends_it_with_an_error_line(fleet):
    url = fleet.urls["cpu"]  # 200 tokens/s
    reply = requests.post(
        f"{url}/api/generate", json={"model": "llama3.1:8b", "prompt": "x", "options": {"num_predict": 400}},
        stream=True, timeout=10,
    )  # fmt: skip
    lines = reply.iter_lines()
    assert json.loads(next(lines))["done"] is False
    fleet.node("cpu").inject("restart")
    rest = [json.loads(line) for line in lines if line]
    assert reply.status_code == 200
    assert rest[-1] == {"error": "llama runner process has terminated: signal: killed"}
    assert ps(url) == []


def test_gpu_lost_unloads_gpu_runners_and_later_loads_go_to_cpu(fleet):
    url = fleet.urls["gpu"]
    load(url, "llama3.1:8b")
    inject(fleet, "gpu", fault="gpu_lost")
    assert ps(url) == []
    assert control(fleet, "GET", "/nodes/gpu/state").json()["gpus"] == []
    assert 'Hostname="gpu"' not in control(fleet, "GET", "/metrics").text
    load(url, "llama3.1:8b")
    [entry] = ps(url)
    assert entry["size_vram"] == 0 and entry["size"] == 5_154_267_136
    control(fleet, "DELETE", "/nodes/gpu/fault?fault=gpu_lost")
    load(url, "mxbai-embed-large")
    assert {m["name"]: m["size_vram"] > 0 for m in ps(url)} == {"llama3.1:8b": False, "mxbai-embed-large:latest": True}


def test_vram_hog_takes_gpu_memory_until_cleared(fleet):
    url = fleet.urls["gpu"]
    assert inject(fleet, "gpu", fault="vram_hog", bytes="6GiB")["faults"] == {"vram_hog": {"bytes": 6 * GIB}}
    [gpu] = fleet.node("gpu").state()["gpus"]
    assert (gpu["used"], gpu["free"]) == (6 * GIB, 2 * GIB)
    assert f'modelName="NVIDIA GeForce RTX 3070",Hostname="gpu"}} {6 * 1024}' in control(fleet, "GET", "/metrics").text
    load(url, "llama3.1:8b")  # 2 GiB free: only part of it fits
    [entry] = ps(url)
    assert 0 < entry["size_vram"] < entry["size"]
    load(url, "llama3.1:8b", keep_alive=0)
    control(fleet, "DELETE", "/nodes/gpu/fault?fault=vram_hog")
    load(url, "llama3.1:8b")
    assert ps(url)[0]["size_vram"] == LLAMA8_FULL_4096


def test_metrics_look_like_dcgm_exporter(fleet):
    load(fleet.urls["gpu"], "llama3.1:8b")
    reply = control(fleet, "GET", "/metrics")
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in reply.text.splitlines():
        if not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels.split("{", 1)[0]] = (name_labels, int(value))
    assert set(samples) == {"DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_RESERVED"}
    labels, used = samples["DCGM_FI_DEV_FB_USED"]
    assert used == round(LLAMA8_FULL_4096 / MIB)
    assert samples["DCGM_FI_DEV_FB_FREE"][1] == 8192 - used
    for part in ('gpu="0"', 'UUID="GPU-', 'device="nvidia0"', 'modelName="NVIDIA GeForce RTX 3070"', 'Hostname="gpu"'):
        assert part in labels
    assert "# TYPE DCGM_FI_DEV_FB_FREE gauge" in reply.text


def test_control_errors_are_json(fleet):
    cases = [
        ("GET", "/nodes/nope/state", None, 404, "unknown node 'nope'"),
        ("POST", "/nodes/nope/fault", {"fault": "down"}, 404, "unknown node 'nope'"),
        ("POST", "/nodes/gpu/fault", "{bad", 400, "invalid JSON body"),
        ("POST", "/nodes/gpu/fault", {"latency_ms": 5}, 400, "expected a JSON object"),
        ("POST", "/nodes/gpu/fault", {"fault": "melt"}, 400, "unknown fault 'melt'"),
        ("POST", "/nodes/gpu/fault", {"fault": "slow"}, 400, "fault 'slow' needs 'latency_ms'"),
        ("POST", "/nodes/gpu/fault", {"fault": "slow", "latency_ms": -1}, 400, "latency_ms: expected an integer"),
        (
            "POST",
            "/nodes/gpu/fault",
            {"fault": "down", "bytes": 5},
            400,
            "fault 'down' takes no parameter 'bytes' (it takes none)",
        ),
        ("POST", "/nodes/gpu/fault", {"fault": "vram_hog", "bytes": "lots"}, 400, "bytes: expected a size"),
        ("DELETE", "/nodes/gpu/fault?fault=melt", None, 400, "unknown fault 'melt'"),
        ("PUT", "/nodes/gpu/fault", None, 405, "method PUT not allowed"),
        ("POST", "/nodes", None, 405, "method POST not allowed"),
        ("GET", "/elsewhere", None, 404, "no route /elsewhere"),
    ]
    for method, path, body, status, message in cases:
        reply = control(fleet, method, path, body)
        assert reply.status_code == status, (method, path, reply.text)
        assert message in reply.json()["error"], (method, path, reply.text)
    assert control(fleet, "GET", "/nodes/gpu/state").json()["faults"] == {}


def test_in_process_inject_and_clear(fleet):
    node = fleet.node("gpu")
    assert node.inject("slow", latency_ms=5) == {"slow": {"latency_ms": 5}}
    assert node.inject("vram_hog", bytes=1024) == {"slow": {"latency_ms": 5}, "vram_hog": {"bytes": 1024}}
    assert node.clear("slow") == {"vram_hog": {"bytes": 1024}}
    assert node.clear() == {}
    with pytest.raises(ValueError, match="unknown fault"):
        node.inject("melt")
    with pytest.raises(KeyError, match="unknown node 'nope'"):
        fleet.node("nope")
    assert check_fault("vram_hog", {"bytes": "2GiB"}) == ("vram_hog", {"bytes": 2 * GIB})


def test_requests_in_flight_show_as_busy(fleet):
    url = fleet.urls["cpu"]
    load(url, "llama3.1:8b")
    answers: list[requests.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(
            requests.post(f"{url}/api/generate", timeout=10, json={"model": "llama3.1:8b", "prompt": "x",
                                                                   "stream": False, "options": {"num_predict": 60}})
        ),
        daemon=True,
    )  # fmt: skip
    thread.start()
    try:
        wait_for(lambda: fleet.node("cpu").state()["loaded"][0]["busy"] == 1)
    finally:
        thread.join(10)
    assert answers[0].json()["eval_count"] == 60
    assert fleet.node("cpu").state()["loaded"][0]["busy"] == 0
