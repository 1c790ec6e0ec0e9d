"""The optimizer's Flask app (optimizer/app.py) through Flask's test client, over a hand-built cluster."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from types import MappingProxyType

import pytest
from conftest import alert, payload
from flask import Flask
from flask.testing import FlaskClient

from gpurouter.act.jobs import ActionRecord, Job, JobQueue, JobResult
from gpurouter.cluster.config import Config, Secret, WebhookAuth, parse_config
from gpurouter.cluster.ollama import InstalledModel, LoadedModel
from gpurouter.cluster.state import Capacity, ClusterState, GpuInfo, ModelNeed, NodeState
from gpurouter.serve.auth import Authenticator
from gpurouter.units import GIB, MIB
from optimizer import webhook
from optimizer.app import create_app

TOKEN = "hook-token"
NOW = 1_900_000_000.0
FOREVER = datetime(2318, 1, 1, tzinfo=timezone.utc)


def make_config(**extra: object) -> Config:
    return parse_config(
        {
            "nodes": [
                {"name": "gpu-small", "url": "http://127.0.0.1:9", "vram": "4GiB"},
                {"name": "cpu-node", "url": "http://127.0.0.1:10", "vram": 0},
                {"name": "gpu-large", "url": "http://127.0.0.1:11", "vram": "8GiB"},
            ],
            "priority_models": ["mxbai-embed-large", "llama3.1:latest"],
            "optimizer": {"webhook_auth": {"bearer_token": TOKEN}},
            **extra,
        }
    )


CONFIG = make_config()


def cluster(config: Config) -> ClusterState:
    """llama3.1 runs on CPU on cpu-node; mxbai-embed-large is on GPU on gpu-small; gpu-large is empty."""

    def installed(*names: str) -> tuple[InstalledModel, ...]:
        return tuple(InstalledModel(name=n, size=GIB, digest="d-" + n) for n in names)

    def capacity(gib: int) -> Capacity:
        return Capacity("static", (GpuInfo(0, "GPU", gib * GIB),)) if gib else Capacity("none")

    small, cpu, large = config.nodes
    llama = LoadedModel("llama3.1:latest", 5 * GIB, 0, "d-llama", FOREVER, 4096)
    mxbai = LoadedModel("mxbai-embed-large:latest", 700 * MIB, 700 * MIB, "d-mx", FOREVER, 512)
    nodes = (
        NodeState(small, True, 0.8, capacity(4), loaded=(mxbai,), installed=installed(mxbai.name)),
        NodeState(cpu, True, 0.8, capacity(0), loaded=(llama,), installed=installed(llama.name)),
        NodeState(large, True, 0.8, capacity(8), installed=installed(llama.name, mxbai.name)),
    )
    needs = {
        (node.name, need.model): replace(need, node=node.name, era=node.era)
        for node in nodes
        for need in (
            ModelNeed("llama3.1:latest", 5 * GIB, "configured", 4096),
            ModelNeed("mxbai-embed-large:latest", 700 * MIB, "observed", 512),
        )
    }
    return ClusterState(config, NOW, nodes, MappingProxyType(needs), frozenset({"mxbai-embed-large:latest"}))


class FakeObserver:
    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.clients: dict = {}
        self.polls = 0

    def poll(self) -> ClusterState:
        self.polls += 1
        return self.state


class Recorder:
    def __init__(self) -> None:
        self.runs: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, job: Job) -> JobResult:
        with self.lock:
            self.runs.append(job.model)
        return JobResult(ok=True)


@pytest.fixture
def parts() -> Iterator[tuple[Flask, Recorder, JobQueue]]:
    job = Recorder()
    queue = JobQueue(CONFIG, job).start()
    app = create_app(CONFIG, observer=FakeObserver(cluster(CONFIG)), queue=queue)
    yield app, job, queue
    assert queue.stop(5)


@pytest.fixture
def client(parts) -> FlaskClient:
    return parts[0].test_client()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def metric(app: Flask, name: str, **labels: str) -> float | None:
    return app.extensions["gpu_router"].metrics.registry.get_sample_value(name, labels)


# ---------------------------------------------------------------------------------------------- webhook


def test_webhook_queues_a_firing_alert_and_lists_what_it_ignored(parts, client):
    app, job, queue = parts
    body = payload(
        alert(model="llama3.1", node="cpu-node"),
        alert(status="resolved", model="mxbai-embed-large", node="gpu-small"),
        alert(model="llama3.1", node="10.0.0.66:11434"),
        alert("GPURouterNodeDown", node="gpu-small"),
    )
    answer = client.post("/webhook", json=body, headers=AUTH)
    assert answer.status_code == 202
    data = answer.get_json()
    assert data["queued"] == [
        {
            "alertname": "GPURouterPriorityModelOnCPU",
            "model": "llama3.1:latest",
            "node": "cpu-node",
            "state": "queued",
            "retry_in": None,
        }
    ]
    assert [(i["model"], i["node"], i["reason"]) for i in data["ignored"]] == [
        ("mxbai-embed-large", "gpu-small", "resolved"),
        ("llama3.1", "10.0.0.66:11434", "node is not in the configuration"),
        (None, "gpu-small", "not an alert the optimizer acts on"),
    ]
    assert set(data["ignored"][0]) == {"alertname", "model", "node", "reason"}
    assert queue.wait_idle(5)
    assert job.runs == ["llama3.1:latest"]
    assert metric(app, "gpu_router_optimizer_webhooks_total", outcome="accepted") == 1


def test_webhook_with_nothing_to_do_is_counted_as_ignored(parts, client):
    app, job, queue = parts
    answer = client.post("/webhook", json=payload(alert(status="resolved", model="llama3.1")), headers=AUTH)
    assert answer.status_code == 202 and answer.get_json()["queued"] == []
    assert metric(app, "gpu_router_optimizer_webhooks_total", outcome="ignored") == 1
    assert queue.wait_idle(5) and job.runs == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "invalid JSON"),
        (b"", "empty body"),
        (b'{"version": "4"}', "status: missing"),
        (json.dumps(payload(alert(model=["x"]))).encode(), "alerts[0].labels.model: expected a string"),
    ],
)
def test_webhook_rejects_malformed_bodies_with_400(parts, client, data, message):
    app, job, queue = parts
    answer = client.post("/webhook", data=data, headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.get_json()["error"].startswith(message)
    assert metric(app, "gpu_router_optimizer_webhooks_total", outcome="invalid") == 1
    assert queue.depth == 0 and job.runs == []


@pytest.mark.parametrize("path", ["/webhook", "/api/v1/optimize"])
def test_a_body_over_the_limit_is_413_as_everywhere_else(parts, client, path):
    _, job, queue = parts
    data = b" " * (webhook.MAX_BODY + 10)
    answer = client.post(path, data=data, headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 413
    assert answer.get_json()["error"] == f"body too large: {webhook.MAX_BODY + 10} bytes, the limit is 2097152 bytes"
    assert queue.depth == 0 and job.runs == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic aG9vazp0b2tlbg=="}],
)
def test_webhook_without_the_credentials_is_401_and_queues_nothing(parts, client, headers):
    app, job, queue = parts
    answer = client.post("/webhook", json=payload(alert(model="llama3.1")), headers=headers)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="gpu-router"'
    assert "error" in answer.get_json()
    assert queue.depth == 0 and job.runs == []
    assert metric(app, "gpu_router_optimizer_webhooks_total", outcome="unauthorized") == 1


def test_basic_auth_configuration_is_honoured():
    config = make_config(optimizer={"webhook_auth": {"username": "am", "password": "pw"}})
    queue = JobQueue(config, Recorder()).start()
    try:
        app = create_app(config, observer=FakeObserver(cluster(config)), queue=queue)
        client = app.test_client()
        good = {"Authorization": "Basic " + base64.b64encode(b"am:pw").decode()}
        assert client.post("/webhook", json=payload(), headers=good).status_code == 202
        assert client.post("/webhook", json=payload(), headers=AUTH).status_code == 401
    finally:
        assert queue.stop(5)


# ---------------------------------------------------------------------------------------------- read API


def test_status_lists_every_node(client):
    data = client.get("/api/v1/status").get_json()
    nodes = {n["name"]: n for n in data["nodes"]}
    assert set(nodes) == {"gpu-small", "cpu-node", "gpu-large"}
    assert nodes["gpu-large"]["vram_total_bytes"] == 8 * GIB
    assert nodes["gpu-large"]["vram_usable_bytes"] == int(8 * GIB * 0.8)
    (llama,) = nodes["cpu-node"]["loaded"]
    assert (llama["model"], llama["gpu_ratio"]) == ("llama3.1:latest", 0)
    assert llama["expires_at"].startswith("2318-01-01")
    assert {p["model"]: p["on_gpu"] for p in data["priority_models"]} == {
        "mxbai-embed-large:latest": True,
        "llama3.1:latest": False,
    }


def test_route_and_check_answer_for_a_known_model(client):
    route = client.get("/api/v1/route?model=llama3.1")
    assert route.status_code == 200
    assert (route.get_json()["node"], route.get_json()["processor"]) == ("gpu-large", "GPU")
    check = client.get("/api/v1/check", query_string={"model": "llama3.1:latest"}).get_json()
    verdicts = {v["node"]: v for v in check["verdicts"]}
    assert verdicts["gpu-large"]["fits"] is True
    assert verdicts["cpu-node"]["fits"] is False
    needs = {n["node"]: n for n in check["needs"]}
    assert needs["gpu-large"]["bytes"] == 5 * GIB and needs["gpu-large"]["source"] == "configured"
    assert verdicts["gpu-large"]["need"] == needs["gpu-large"]
    assert check["result"] == "fits_gpu" and check["reason"].startswith("Fits on GPU: gpu-large")


@pytest.mark.parametrize("path", ["/api/v1/route", "/api/v1/check"])
def test_model_parameter_errors(client, path):
    missing = client.get(path)
    assert missing.status_code == 400 and "missing parameter: model" in missing.get_json()["error"]
    assert client.get(path + "?model=%20").status_code == 400
    unknown = client.get(path + "?model=no-such-model")
    assert unknown.status_code == 404 and "unknown model 'no-such-model'" in unknown.get_json()["error"]


def test_models_lists_needs_and_placements(client):
    models = {m["model"]: m for m in client.get("/api/v1/models").get_json()["models"]}
    llama = models["llama3.1:latest"]
    assert (llama["priority_rank"], max(n["bytes"] for n in llama["needs"])) == (2, 5 * GIB)
    assert {n["source"] for n in llama["needs"]} == {"configured"}
    assert llama["loaded_on"] == ["cpu-node"]
    assert llama["installed_on"] == ["cpu-node", "gpu-large"]


def test_reads_share_one_poll_per_max_age(parts, client):
    observer = parts[0].extensions["gpu_router"].observer
    for _ in range(20):
        assert client.get("/api/v1/status").status_code == 200
    assert observer.polls == 1


# ---------------------------------------------------------------------------------------------- optimize


def test_optimize_dry_run_answers_with_the_plan(parts, client):
    _, job, queue = parts
    answer = client.post("/api/v1/optimize", json={"dry_run": True}, headers=AUTH)
    assert answer.status_code == 200
    plan = answer.get_json()["plan"]
    steps = [(s["action"], s["model"], s["node"]) for s in plan["steps"]]
    assert steps == [("load", "llama3.1:latest", "gpu-large"), ("unload", "llama3.1:latest", "cpu-node")]
    assert plan["already"] == [{"model": "mxbai-embed-large:latest", "node": "gpu-small"}]
    assert queue.depth == 0 and job.runs == []


def test_optimize_queues_jobs(parts, client):
    _, job, queue = parts
    answer = client.post("/api/v1/optimize", json={"models": ["llama3.1"]}, headers=AUTH)
    assert answer.status_code == 202
    assert [q["model"] for q in answer.get_json()["queued"]] == ["llama3.1:latest"]
    assert queue.wait_idle(5) and job.runs == ["llama3.1:latest"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"[1]", 400, "expected a JSON object"),
        (b"{", 400, "invalid JSON"),
        (b'{"dry_run": "yes"}', 400, "dry_run: expected true or false"),
        (b'{"models": "llama3.1"}', 400, "models: expected a list"),
        (b'{"models": [1]}', 400, "models: expected a list"),
        (b'{"force": true}', 400, "unknown field 'force'"),
        (b'{"models": ["qwen2:7b"]}', 404, "'qwen2:7b' is not a configured priority model"),
    ],
)
def test_optimize_rejects_bad_requests(parts, client, body, status, message):
    answer = client.post("/api/v1/optimize", data=body, headers=AUTH)
    assert answer.status_code == status
    assert message in answer.get_json()["error"]
    assert parts[2].depth == 0


def test_optimize_needs_the_webhook_credentials(parts, client):
    answer = client.post("/api/v1/optimize", json={"dry_run": True})
    assert answer.status_code == 401 and "error" in answer.get_json()


def test_monitor_mode_refuses_to_act_but_plans():
    config = make_config(auto_optimize=False)
    queue = JobQueue(config, Recorder()).start()
    try:
        app = create_app(config, observer=FakeObserver(cluster(config)), queue=queue)
        client = app.test_client()
        refused = client.post("/api/v1/optimize", json={}, headers=AUTH)
        assert refused.status_code == 409 and "auto_optimize is false" in refused.get_json()["error"]
        assert client.post("/api/v1/optimize", json={"dry_run": True}, headers=AUTH).status_code == 200
        hook = client.post("/webhook", json=payload(alert(model="llama3.1")), headers=AUTH).get_json()
        assert hook["auto_optimize"] is False
    finally:
        assert queue.stop(5)


# ---------------------------------------------------------------------------------------------- the rest


def test_actions_history_and_jobs():
    record = ActionRecord(NOW, "llama3.1:latest", "gpu-large", "load", "success", 1.5, "on GPU")
    gate = threading.Event()

    def job(_: Job) -> JobResult:
        assert gate.wait(5)
        return JobResult(ok=True, fixed=True, actions=(record,))

    queue = JobQueue(CONFIG, job).start()
    try:
        client = create_app(CONFIG, observer=FakeObserver(cluster(CONFIG)), queue=queue).test_client()
        client.post("/webhook", json=payload(alert(model="llama3.1", node="cpu-node")), headers=AUTH)
        running = client.get("/api/v1/actions").get_json()
        assert running["actions"] == []
        assert [(j["model"], j["nodes"], j["sources"]) for j in running["jobs"]] == [
            ("llama3.1:latest", ["cpu-node"], ["webhook"])
        ]
        gate.set()
        assert queue.wait_idle(5)
        done = client.get("/api/v1/actions").get_json()
        assert done["actions"] == [
            {
                "time": NOW,
                "model": "llama3.1:latest",
                "node": "gpu-large",
                "action": "load",
                "outcome": "success",
                "duration_seconds": 1.5,
                "detail": "on GPU",
                "by": "optimizer",
            }
        ]
        assert done["jobs"] == [] and done["cooldowns"] == {}
    finally:
        gate.set()
        assert queue.stop(5)


def test_healthz_metrics_and_index(client):
    assert client.get("/healthz").get_json()["status"] == "ok"
    text = client.get("/metrics").get_data(as_text=True)
    for name in (
        "gpu_router_optimizer_webhooks_total",
        "gpu_router_optimizer_actions_total",
        "gpu_router_optimizer_remediation_seconds_bucket",
        "gpu_router_optimizer_queue_depth",
        "gpu_router_optimizer_last_reconcile_timestamp_seconds",
    ):
        assert name in text
    index = client.get("/")
    assert (
        index.status_code == 200 and index.mimetype == "text/html" and "Priority models" in index.get_data(as_text=True)
    )


def test_unknown_routes_and_methods_answer_json(client):
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.is_json and "error" in missing.get_json()
    wrong = client.get("/webhook")
    assert wrong.status_code == 405 and wrong.is_json
    assert "POST" in wrong.headers["Allow"]
    assert client.delete("/api/v1/status").status_code == 405


def test_an_internal_error_is_a_json_500():
    class Broken(FakeObserver):
        def poll(self) -> ClusterState:
            raise RuntimeError("boom")

    queue = JobQueue(CONFIG, Recorder()).start()
    try:
        app = create_app(CONFIG, observer=Broken(cluster(CONFIG)), queue=queue)
        answer = app.test_client().get("/api/v1/status")
        assert answer.status_code == 500
        assert answer.get_json() == {"error": "internal error: RuntimeError"}
    finally:
        assert queue.stop(5)


def test_a_payload_url_is_never_contacted(parts, client):
    """A node label holding a URL only ever selects among configured nodes: it is ignored, not polled."""
    app, _, _ = parts
    hostile = alert(model="llama3.1", node="http://127.0.0.1:1/api/generate", instance="http://127.0.0.1:2")
    data = client.post("/webhook", json=payload(hostile), headers=AUTH).get_json()
    assert data["queued"] == [] and data["ignored"][0]["reason"] == "node is not in the configuration"
    assert app.extensions["gpu_router"].observer.polls == 0


def test_auth_object_can_be_injected():
    queue = JobQueue(CONFIG, Recorder()).start()
    try:
        auth = Authenticator(WebhookAuth(bearer_token=Secret(value="other")))
        app = create_app(CONFIG, observer=FakeObserver(cluster(CONFIG)), queue=queue, auth=auth)
        client = app.test_client()
        assert client.post("/webhook", json=payload(), headers=AUTH).status_code == 401
        assert client.post("/webhook", json=payload(), headers={"Authorization": "Bearer other"}).status_code == 202
    finally:
        assert queue.stop(5)


@pytest.mark.parametrize("path", ["//api/v1/status", "/api//v1/status", "/nowhere/"])
def test_no_html_redirects_doubled_slashes_get_a_json_404(path: str) -> None:
    client = create_app(parse_config({"nodes": ["http://127.0.0.1:9"]})).test_client()
    answer = client.get(path)
    assert answer.status_code == 404 and answer.is_json and "error" in answer.get_json()
    assert client.get("//").mimetype == "text/html"  # the status page, not a redirect to it
