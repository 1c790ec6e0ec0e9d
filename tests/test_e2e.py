"""The whole loop for real: simulated Ollama fleet → exporter → Prometheus (rules) → Alertmanager → webhook →
optimizer → Ollama API → model back on GPU → alert resolved. Every part is its own process on 127.0.0.1;
Prometheus and Alertmanager are Debian's. The rules are alerts/rules.yml with every `for` set to 0s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import require_tool
from dashboard_lint import iter_panel_queries, substitute

from cli.localstack import REPO, Stack, wait_for

pytestmark = pytest.mark.e2e

LLAMA = "llama3.1:latest"
MXBAI = "mxbai-embed-large:latest"
GIGABYTE_PER_SECOND = 1_000_000_000


def fleet() -> dict:
    """The guide's cluster: a 4 GiB GPU node, a CPU node and an 8 GiB GPU node; the priority models start on GPU."""
    models = ["mxbai-embed-large", "nomic-embed-text", "llama3.2:3b", "llama3.1:latest"]
    return {
        "nodes": [
            {
                "name": "gpu-small",
                "gpus": [{"name": "NVIDIA GeForce GTX 1050 Ti", "vram": "4GiB"}],
                "ram": "16GiB",
                "models": models,
                "load_speed": 4 * GIGABYTE_PER_SECOND,
                "preload": [{"model": "mxbai-embed-large", "keep_alive": -1}],
            },
            {"name": "cpu-node", "ram": "32GiB", "models": models, "load_speed": 4 * GIGABYTE_PER_SECOND},
            {
                "name": "gpu-large",
                "gpus": [{"name": "NVIDIA GeForce RTX 3070", "vram": "8GiB"}],
                "ram": "32GiB",
                "models": models,
                "load_speed": 4 * GIGABYTE_PER_SECOND,
                "preload": [{"model": "llama3.1:latest", "keep_alive": -1}],
            },
        ]
    }


CONFIG = {
    "priority_models": ["mxbai-embed-large", "llama3.1:latest"],
    "check_interval": 3600,  # the reconcile loop stays out of the way: alerts drive the optimizer here
    "request_timeout": 1.0,
    "optimizer": {"cooldown_seconds": 1, "cooldown_max_seconds": 2, "load_timeout": 30},
}


@pytest.fixture(scope="module")
def tools() -> None:
    for tool in ("prometheus", "prometheus-alertmanager"):
        require_tool(tool)


def copies(stack: Stack, model: str) -> dict[str, float]:
    """node → GPU share of every loaded copy of `model`."""
    found = {}
    for node in stack.urls:
        try:
            for m in stack.ps(node):
                if m["name"] == model:
                    found[node] = m["size_vram"] / m["size"]
        except requests.RequestException:
            continue
    return found


def on_gpu_only(stack: Stack, model: str) -> dict[str, float] | None:
    """The copies of `model` when exactly one exists and it is fully on GPU, else None."""
    found = copies(stack, model)
    return found if len(found) == 1 and next(iter(found.values())) == 1.0 else None


def webhooks(stack: Stack) -> float:
    text = requests.get(f"{stack.optimizer_url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('gpu_router_optimizer_webhooks_total{outcome="accepted"}')
    )


@pytest.fixture
def stack(tools: None, tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path, fleet(), dict(CONFIG)) as running:
        wait_for(lambda: on_gpu_only(running, MXBAI) and on_gpu_only(running, LLAMA), 30, "the preloaded models")
        yield running


def test_a_priority_model_on_cpu_is_moved_back_to_gpu_and_its_alert_resolves(stack: Stack) -> None:
    stack.fault("gpu-small", "restart")
    stack.load("gpu-small", "mxbai-embed-large", embedding=True, num_gpu=0)  # a client's load lands on CPU
    assert copies(stack, MXBAI) == {"gpu-small": 0.0}
    wait_for(lambda: stack.firing("GPURouterPriorityModelOnCPU"), 30, "GPURouterPriorityModelOnCPU to fire")
    wait_for(lambda: on_gpu_only(stack, MXBAI), 60, "mxbai-embed-large back fully on GPU, CPU copy gone")
    wait_for(lambda: not stack.firing("GPURouterPriorityModelOnCPU"), 30, "the alert to resolve")
    assert webhooks(stack) >= 1
    actions = requests.get(f"{stack.optimizer_url}/api/v1/actions", timeout=5).json()
    assert any(a["model"] == MXBAI and a["outcome"] in ("success", "ok", True) for a in _records(actions))
    assert on_gpu_only(stack, LLAMA), "the other priority model was not disturbed"


def test_b_after_a_restart_the_priority_models_come_back(stack: Stack) -> None:
    loads_before = stack.loads(MXBAI) + stack.loads(LLAMA)
    stack.fault("gpu-small", "restart")
    stack.fault("gpu-large", "restart")
    wait_for(lambda: stack.firing("GPURouterPriorityModelNotOnGPU"), 30, "GPURouterPriorityModelNotOnGPU to fire")
    wait_for(lambda: on_gpu_only(stack, MXBAI) and on_gpu_only(stack, LLAMA), 60, "both priority models on GPU")
    assert copies(stack, LLAMA) == {"gpu-large": 1.0}, "llama3.1 only fits the 8 GiB node"
    wait_for(lambda: not stack.firing("GPURouterPriorityModelNotOnGPU"), 30, "NotOnGPU to resolve")
    assert stack.loads(MXBAI) + stack.loads(LLAMA) == loads_before + 2


def test_c_a_lost_gpu_sends_the_model_to_another_gpu_node(tools: None, tmp_path: Path) -> None:
    """A central router reading GPU capacity through Prometheus (dcgm-shaped series) sees the GPU vanish."""
    nodes = fleet()["nodes"]
    nodes[2]["gpus"] = [{"name": "NVIDIA RTX A2000 12GB", "vram": "12GiB"}]
    with Stack(tmp_path, {"nodes": nodes}, dict(CONFIG), capacity="prometheus") as stack:
        wait_for(lambda: on_gpu_only(stack, MXBAI) and on_gpu_only(stack, LLAMA), 30, "the preloaded models")
        stack.fault("gpu-small", "gpu_lost")
        wait_for(lambda: stack.firing("GPURouterPriorityModelNotOnGPU"), 30, "NotOnGPU after the GPU was lost")
        wait_for(lambda: on_gpu_only(stack, MXBAI) == {"gpu-large": 1.0}, 60, "mxbai-embed-large on gpu-large")
        assert on_gpu_only(stack, LLAMA) == {"gpu-large": 1.0}
        assert stack.node_state("gpu-small")["counts"].get(MXBAI, {}).get("loads", 0) == 1, "no load tried there"


def test_e_repeated_notifications_still_cause_one_load(tools: None, tmp_path: Path) -> None:
    """A CPU copy stays (and its alert keeps firing, re-sent every second) until the slow GPU load is verified."""
    nodes = fleet()["nodes"]
    nodes[0]["load_speed"] = 100_000_000  # mxbai-embed-large takes about 12 s to load on gpu-small
    with Stack(tmp_path, {"nodes": nodes}, dict(CONFIG), repeat_interval="1s") as stack:
        wait_for(lambda: on_gpu_only(stack, MXBAI) and on_gpu_only(stack, LLAMA), 60, "the preloaded models")
        stack.load("cpu-node", "mxbai-embed-large", embedding=True)  # a CPU copy beside the GPU one
        loads_before = stack.loads(MXBAI)
        stack.fault("gpu-small", "restart")  # now the CPU copy is the only one
        accepted = webhooks(stack)
        wait_for(lambda: webhooks(stack) >= accepted + 3, 60, "Alertmanager to notify and repeat during the load")
        wait_for(lambda: on_gpu_only(stack, MXBAI) == {"gpu-small": 1.0}, 60, "mxbai on GPU and the CPU copy gone")
        assert stack.loads(MXBAI) == loads_before + 1
        assert webhooks(stack) >= accepted + 3


def test_d_a_node_down_fires_node_down_and_the_optimizer_leaves_it_alone(stack: Stack) -> None:
    unloads_before = stack.node_state("gpu-small")["counts"]
    stack.fault("gpu-small", "down")
    wait_for(lambda: stack.firing("GPURouterNodeDown"), 30, "GPURouterNodeDown to fire")
    (alert,) = stack.firing("GPURouterNodeDown")
    assert alert["labels"]["node"] == "gpu-small"
    stack.clear("gpu-small")
    wait_for(lambda: not stack.firing("GPURouterNodeDown"), 30, "NodeDown to resolve once the node is back")
    assert stack.node_state("gpu-small")["counts"] == unloads_before, "nothing was loaded or unloaded there"
    # the copy there is intact; while the node was down the model was served nowhere, so the optimizer may have
    # put a copy on another node (the e2e rules fire at once), but it touched nothing on the node that was down
    assert copies(stack, MXBAI)["gpu-small"] == 1.0
    actions = requests.get(f"{stack.optimizer_url}/api/v1/actions", timeout=5).json()["actions"]
    assert all(a.get("node") != "gpu-small" for a in actions), actions


def test_every_dashboard_query_returns_data(tools: None, tmp_path: Path) -> None:
    """With GPU figures read through Prometheus (so per-GPU used memory is known too)."""
    with Stack(tmp_path, fleet(), dict(CONFIG), capacity="prometheus") as stack:
        wait_for(lambda: on_gpu_only(stack, MXBAI) and on_gpu_only(stack, LLAMA), 30, "the preloaded models")
        stack.fault("gpu-small", "restart")
        stack.load("gpu-small", "mxbai-embed-large", embedding=True, num_gpu=0)
        wait_for(lambda: on_gpu_only(stack, MXBAI), 60, "the optimizer's fix (so its metrics have data)")
        for _ in range(3):  # traffic through the proxy (so its metrics have data)
            body = {"model": LLAMA, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
            assert requests.post(f"{stack.proxy_url}/api/generate", json=body, timeout=30).ok
        _every_query_answers(stack)


def _every_query_answers(stack: Stack) -> None:
    prometheus = stack.prometheus
    assert prometheus is not None
    empty = []
    for path in sorted((REPO / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for title, expr in iter_panel_queries(dashboard):
            query = substitute(expr)
            if not wait_for(lambda q=query: prometheus.query(q), 20, f"{path.name}: {title}", interval=0.5):
                empty.append((path.name, title))
    assert empty == []


def _records(actions: object) -> list[dict]:
    return actions["actions"] if isinstance(actions, dict) else list(actions)
