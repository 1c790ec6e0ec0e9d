"""`gpu-router proxy` end to end against a simulated fleet: the official `ollama` and `openai` clients, routing,
retries, a node failing mid-stream, client disconnects, safety, healing and metrics. Everything on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from contextlib import AbstractContextManager

import ollama
import pytest
import requests
from conftest import proxied
from conftest import proxy_metric as metric
from openai import OpenAI

from cli import main as cli
from cli.localstack import wait_for
from proxy.service import ProxyHandle
from simulator.run import Fleet

SMALL = "llama3.2:1b"
NODES = [
    {
        "name": "gpu",
        "gpus": [{"name": "RTX 3070", "vram": "8GiB"}],
        "models": [SMALL, "all-minilm", "llama3.1:8b"],
        "token_rate": 400,
        "num_parallel": 4,
    },
    {"name": "cpu", "models": [SMALL, "qwen2.5-coder:1.5b"], "cpu_token_rate": 400, "num_parallel": 4},
]
VRAM = {"gpu": "8GiB", "cpu": 0}


def stack(nodes: list[dict] = NODES, **settings: object) -> AbstractContextManager[tuple[Fleet, ProxyHandle]]:
    """A fleet and a proxy over it (no healing unless `auto_optimize` is given; polls every 60 s unless set)."""
    return proxied(nodes, **settings)


def spy(fleet: Fleet, node: str) -> list[str]:
    """The paths of every request the node receives from now on."""
    seen: list[str] = []
    server = fleet.node(node)._server._server
    assert server is not None
    app = server.app
    server.app = lambda request: (seen.append(request.path), app(request))[1]
    return seen


def test_official_ollama_client_through_the_proxy():
    with stack() as (fleet, proxy):
        client = ollama.Client(host=proxy.url, timeout=30)
        reply = client.chat(model=SMALL, messages=[{"role": "user", "content": "hi"}])
        assert reply.message.content and reply.eval_count == 24 and reply.eval_duration > 0
        chunks = list(client.chat(model=SMALL, messages=[{"role": "user", "content": "hi"}], stream=True))
        assert len(chunks) == 25 and chunks[-1].done and chunks[-1].eval_count == 24
        generated = client.generate(model=SMALL, prompt="once upon", options={"num_predict": 5})
        assert generated.done_reason == "length" and generated.eval_count == 5
        streamed = list(client.generate(model=SMALL, prompt="x", stream=True))
        assert "".join(c.response for c in streamed) and streamed[-1].eval_count == 24
        vectors = client.embed(model="all-minilm", input=["a", "b"])
        assert len(vectors.embeddings) == 2 and len(vectors.embeddings[0]) == 384
        assert len(client.embeddings(model="all-minilm", prompt="a").embedding) == 384
        assert client.show(SMALL).details.family == "llama"
        names = [m.model for m in client.list().models]
        assert sorted(names) == sorted({f"{SMALL}", "all-minilm:latest", "llama3.1:8b", "qwen2.5-coder:1.5b"})
        assert len(names) == len(set(names))  # one entry per model
        # every generation went to the GPU node: the CPU node's copy would be 5–10× slower
        assert fleet.node("cpu").traffic.counts()["served"] == 0
        assert fleet.node("gpu").traffic.counts()["served"] == 4
        assert {m.model for m in client.ps().models} == {SMALL, "all-minilm:latest"}
        with pytest.raises(ollama.ResponseError) as missing:
            client.generate(model="nope", prompt="x")
        assert missing.value.status_code == 404 and missing.value.error == "model 'nope' not found"


def test_official_openai_client_through_the_proxy():
    with stack() as (fleet, proxy):
        client = OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", timeout=30)
        chat = client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content and chat.usage.completion_tokens == 24
        stream = client.chat.completions.create(
            model=SMALL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == 24
        text = client.completions.create(model=SMALL, prompt="once", max_tokens=4)
        assert text.usage.completion_tokens == 4
        vectors = client.embeddings.create(model="all-minilm", input="abc")
        assert len(vectors.data[0].embedding) == 384
        assert {m.id for m in client.models.list()} == {SMALL, "all-minilm:latest", "llama3.1:8b", "qwen2.5-coder:1.5b"}
        with pytest.raises(Exception, match="not found") as missing:
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert missing.value.status_code == 404
        assert fleet.node("cpu").traffic.counts()["served"] == 0


def test_a_model_only_on_cpu_nodes_is_served_there():
    with stack() as (fleet, proxy):
        reply = ollama.Client(host=proxy.url, timeout=30).generate(model="qwen2.5-coder:1.5b", prompt="x")
        assert reply.eval_count == 24 and fleet.node("cpu").traffic.counts()["served"] == 1
        assert metric(proxy, "gpu_router_proxy_requests_total", node="cpu", placement="cpu", code="200") == 1


def test_a_node_that_answers_garbage_is_replaced_by_the_next(caplog):
    with stack() as (fleet, proxy):
        fleet.node("gpu").inject("garbage")  # 200 with a body that is not JSON; the proxy's view still has it up
        reply = ollama.Client(host=proxy.url, timeout=30).generate(model=SMALL, prompt="x")
        assert reply.eval_count == 24 and fleet.node("cpu").traffic.counts()["served"] == 1
        assert metric(proxy, "gpu_router_proxy_upstream_errors_total", node="gpu", kind="garbage") == 1
    assert any(
        "event=proxy.upstream node=gpu" in r.getMessage() and "kind=garbage" in r.getMessage() for r in caplog.records
    )


def test_a_node_that_fails_before_the_first_byte_is_replaced_by_the_next():
    with stack() as (fleet, proxy):
        fleet.node("gpu").inject("error")  # 500 on every API call; the proxy's view still has it up
        reply = requests.post(
            f"{proxy.url}/api/generate", json={"model": SMALL, "prompt": "x", "stream": False}, timeout=30
        )
        assert reply.status_code == 200 and reply.json()["eval_count"] == 24
        assert fleet.node("cpu").traffic.counts()["served"] == 1
        assert metric(proxy, "gpu_router_proxy_retries_total") == 1
        assert metric(proxy, "gpu_router_proxy_upstream_errors_total", node="gpu", kind="server_error") == 1
        fleet.node("gpu").clear()
        fleet.node("gpu").inject("down")  # connection refused
        fleet.node("cpu").inject("down")
        reply = requests.post(f"{proxy.url}/api/generate", json={"model": SMALL, "prompt": "x"}, timeout=30)
        said = reply.json()["error"]  # 503, not 502: clients retry it (issue 19); it names the nodes
        assert reply.status_code == 503 and "no node could serve" in said and "gpu: " in said and "cpu: " in said
        assert metric(proxy, "gpu_router_proxy_upstream_errors_total", node="cpu", kind="refused") == 1


def test_a_node_killed_mid_stream_ends_the_stream_with_a_visible_error():
    with stack() as (fleet, proxy):
        body = {"model": SMALL, "prompt": "x", "options": {"num_predict": 100000}}
        with requests.post(f"{proxy.url}/api/generate", json=body, stream=True, timeout=15) as reply:
            lines = reply.iter_lines()
            assert json.loads(next(lines))["done"] is False
            fleet.node("gpu").inject("down")
            rest = [json.loads(line) for line in lines if line]  # ends: no hang (the read timeout would fail it)
        assert rest[-1]["error"] == "gpu-router proxy: node gpu failed mid-stream (connection to the node was lost)"
        assert metric(proxy, "gpu_router_proxy_upstream_errors_total", node="gpu", kind="mid_stream") == 1
        fleet.node("gpu").clear()
        client = ollama.Client(host=proxy.url, timeout=15)
        stream = client.generate(model=SMALL, prompt="x", stream=True, options={"num_predict": 100000})
        next(stream)
        for node in ("gpu", "cpu"):  # gpu failed a moment ago, so the proxy may have sent this one to cpu
            fleet.node(node).inject("down")
        with pytest.raises(ollama.ResponseError, match="mid-stream"):
            for _ in stream:
                pass


def test_a_client_that_goes_away_cancels_the_request_on_the_node():
    with stack() as (fleet, proxy):
        for path, body in (
            (
                "/api/chat",
                {"model": SMALL, "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": 100000}},
            ),
            (
                "/v1/chat/completions",
                {"model": SMALL, "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 100000},
            ),
        ):
            before = fleet.node("gpu").traffic.counts()["cancelled"]
            reply = requests.post(proxy.url + path, json=body, stream=True, timeout=15)
            next(reply.iter_lines())
            reply.close()
            wait_for(
                lambda b=before: fleet.node("gpu").traffic.counts()["cancelled"] == b + 1,
                timeout=10,
                what="the node to see the request cancelled",
            )
            assert fleet.node("gpu").traffic.counts()["active"] == 0
        wait_for(lambda: metric(proxy, "gpu_router_proxy_in_flight", node="gpu") == 0, what="no request in flight")


def test_malformed_or_oversized_requests_never_reach_a_node():
    with stack(proxy={"max_body": "1KiB"}) as (fleet, proxy):
        seen_gpu, seen_cpu = spy(fleet, "gpu"), spy(fleet, "cpu")
        bad = {
            b"{bad": "invalid character 'b' looking for beginning of object key string",
            b"": "missing request body",
            b"[1]": "json: cannot unmarshal array into Go value of type api.GenerateRequest",
            b'{"prompt": "x"}': "model is required",
        }
        for body, message in bad.items():
            reply = requests.post(f"{proxy.url}/api/generate", data=body, timeout=5)
            assert (reply.status_code, reply.json()) == (400, {"error": message})
        big = json.dumps({"model": SMALL, "prompt": "x" * 2000})
        reply = requests.post(f"{proxy.url}/api/generate", data=big, timeout=5)
        said = f"body too large: {len(big)} bytes, the limit is 1024 bytes (proxy.max_body)"
        assert (reply.status_code, reply.json()["error"]) == (413, said)
        reply = requests.post(f"{proxy.url}/v1/chat/completions", data=b"{bad", timeout=5)
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
        assert seen_gpu == seen_cpu == []
        requests.post(f"{proxy.url}/api/generate", json={"model": SMALL, "prompt": "x"}, timeout=10)
        assert seen_gpu == ["/api/generate"]  # the spy sees what does reach the node


def test_no_request_makes_the_proxy_connect_anywhere_else():
    canary = socket.create_server(("127.0.0.1", 0))
    canary.settimeout(0.2)
    target = f"127.0.0.1:{canary.getsockname()[1]}"
    accepted: list[object] = []

    def watch() -> None:
        while not stop.is_set():
            try:
                accepted.append(canary.accept()[0])
            except OSError:
                continue

    stop = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with stack() as (_, proxy):
            base = proxy.url
            attempts = [
                ("POST", "/api/generate", {"model": f"{target}/library/{SMALL}", "prompt": "x"}, {}),
                (
                    "POST",
                    "/api/generate",
                    {"model": SMALL, "prompt": "x", "host": f"http://{target}"},
                    {"Host": target},
                ),
                ("POST", "/api/pull", {"model": f"http://{target}/x", "insecure": True}, {}),
                ("POST", "/api/copy", {"source": SMALL, "destination": f"{target}/x"}, {}),
                ("GET", f"/http://{target}/api/tags", None, {}),
                ("GET", "/api/tags", None, {"X-Forwarded-Host": target, "Forwarded": f"host={target}"}),
                ("POST", "/v1/chat/completions", {"model": SMALL, "messages": [], "base_url": f"http://{target}"}, {}),
            ]
            for method, path, body, headers in attempts:
                requests.request(method, base + path, json=body, headers=headers, timeout=10)
            raw = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
            raw.sendall(
                f"GET http://{target}/api/tags HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode()
            )
            raw.recv(65536)
            raw.close()
    finally:
        stop.set()
        watcher.join(2)
        canary.close()
    assert accepted == []


def test_bearer_auth_when_configured():
    with stack(proxy={"auth": {"bearer_token": "s3cret"}}) as (_, proxy):
        assert requests.get(f"{proxy.url}/api/tags", timeout=5).status_code == 401
        wrong = requests.get(f"{proxy.url}/api/tags", headers={"Authorization": "Bearer nope"}, timeout=5)
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
        assert requests.get(f"{proxy.url}/healthz", timeout=5).status_code == 200
        assert requests.get(f"{proxy.url}/metrics", timeout=5).status_code == 200  # Prometheus scrapes it as is
        native = ollama.Client(host=proxy.url, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert native.generate(model=SMALL, prompt="x").eval_count == 24
        openai = OpenAI(base_url=f"{proxy.url}/v1", api_key="s3cret", timeout=30)
        assert openai.models.list().data
        with pytest.raises(Exception) as denied:
            OpenAI(base_url=f"{proxy.url}/v1", api_key="nope", timeout=30).models.list()
        assert denied.value.status_code == 401


def test_loopback_by_default_and_no_open_listener_without_a_token(tmp_path, capsys):
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text("nodes: [http://127.0.0.1:9]\n")
    assert cli.main(["proxy", "--config", str(path), "--listen", "0.0.0.0:0"]) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err
    args = cli.build_parser("proxy").parse_args(["proxy"])
    assert args.listen == "127.0.0.1:11435"


def test_model_management_is_refused_with_the_nodes_to_use():
    with stack() as (fleet, proxy):
        for path in ("/api/pull", "/api/delete", "/api/create", "/api/copy", "/api/push"):
            reply = requests.post(proxy.url + path, json={"model": SMALL}, timeout=5)
            assert reply.status_code == 400
            assert fleet.urls["gpu"] in reply.json()["error"] and fleet.urls["cpu"] in reply.json()["error"]


def test_a_priority_model_on_cpu_is_healed_and_the_request_waits_for_the_gpu():
    nodes = [{**NODES[0], "token_rate": 400, "preload": [{"model": SMALL, "num_gpu": 0, "keep_alive": -1}]}]
    settings = {
        "proxy": {"refresh_interval": 0.2, "wait_for_gpu": 20},
        "auto_optimize": True,
        "priority_models": [SMALL],
    }
    settings["optimizer"] = {"cooldown_seconds": 0.1, "cooldown_max_seconds": 0.1, "load_timeout": 20}
    with stack(nodes[:1], **settings) as (fleet, proxy):
        reply = requests.post(
            f"{proxy.url}/api/generate", json={"model": SMALL, "prompt": "x", "stream": False}, timeout=30
        )
        assert reply.status_code == 200
        loaded = fleet.node("gpu").state()["loaded"]
        assert [(m["model"], m["size_vram"] == m["size"]) for m in loaded] == [(SMALL, True)]
        assert metric(proxy, "gpu_router_proxy_requests_total", node="gpu", model=SMALL, placement="gpu") == 1


def test_metric_names():
    with stack() as (_, proxy):
        ollama.Client(host=proxy.url, timeout=30).generate(model=SMALL, prompt="x")
        text = requests.get(f"{proxy.url}/metrics", timeout=5).text
        for name in (
            'gpu_router_proxy_requests_total{code="200",model="llama3.2:1b",node="gpu",placement="cold"}',
            'gpu_router_proxy_in_flight{node="cpu"}',
            'gpu_router_proxy_request_duration_seconds_bucket{le="0.005",model="llama3.2:1b"}',
            'gpu_router_proxy_time_to_first_byte_seconds_count{model="llama3.2:1b"}',
            "gpu_router_proxy_upstream_errors_total",
            "gpu_router_proxy_retries_total",
        ):
            assert name in text, name


def test_one_model_by_its_openai_path_and_json_for_unknown_paths():
    with stack() as (_, proxy):
        openai = OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", timeout=30)
        assert openai.models.retrieve(SMALL).id == SMALL
        missing = requests.get(f"{proxy.url}/v1/models/nope:1b", timeout=5)
        assert missing.status_code == 404 and missing.json()["error"]["type"]
        for path in ("/api/nothing", "/v1/nothing"):
            answer = requests.get(proxy.url + path, timeout=5)
            assert answer.status_code == 404 and answer.headers["Content-Type"].startswith("application/json")
        assert requests.get(f"{proxy.url}/api/generate", timeout=5).json() == {
            "error": "method not allowed: GET /api/generate"
        }
