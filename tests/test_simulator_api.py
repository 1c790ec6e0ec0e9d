"""The simulated node's Ollama API against reference/ollama-api.md §1–§3, the fleet file and the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
import requests

from simulator.catalog import find
from simulator.fleet import load_fleet
from simulator.gotypes import FOREVER, go_time, parse_duration, parse_keep_alive
from simulator.run import DEMO_FLEET, Fleet, fleet_from_dict

ROOT = Path(__file__).resolve().parents[1]
LOCAL_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")
UTC_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
PS_KEYS = ["name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"]
DETAILS_KEYS = ["parent_model", "format", "family", "families", "parameter_size", "quantization_level"]
GPU_NODE = {  # the classic era (v0.10–v0.12.10) the shapes below were captured from
    "name": "gpu",
    "version": "0.12.6",
    "gpus": [{"name": "NVIDIA GeForce RTX 3070", "vram": "8GiB"}],
    "models": ["llama3.1:8b", "codellama:7b", "mxbai-embed-large", "nomic-embed-text", "all-minilm"],
    "token_rate": 0,
}


@pytest.fixture(scope="module")
def fleet():
    old = {**GPU_NODE, "name": "old", "version": "0.9.6", "models": ["llama3.2:1b"]}
    with Fleet(fleet_from_dict({"nodes": [GPU_NODE, old]})) as running:
        yield running


@pytest.fixture
def url(fleet):
    """The GPU node, with nothing loaded."""
    fleet.node("gpu").scheduler.unload_all()
    return fleet.urls["gpu"]


def post(url: str, path: str, body: object = None, **kwargs: object) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + path, data=data, timeout=10, **kwargs)  # type: ignore[arg-type]


def ps(url: str) -> list[dict]:
    return requests.get(f"{url}/api/ps", timeout=5).json()["models"]


# -- simple endpoints


def test_root_and_version(url):
    for method in ("GET", "HEAD"):
        reply = requests.request(method, url + "/", timeout=5)
        assert reply.status_code == 200
        assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert reply.text == ("Ollama is running" if method == "GET" else "")
    assert requests.get(f"{url}/api/version", timeout=5).json() == {"version": "0.12.6"}
    assert requests.head(f"{url}/api/version", timeout=5).status_code == 200


def test_tags_lists_installed_models_newest_first_with_catalog_facts(url):
    reply = requests.get(f"{url}/api/tags", timeout=5)
    assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
    models = reply.json()["models"]
    assert [m["name"] for m in models] == [
        "llama3.1:8b", "codellama:7b", "mxbai-embed-large:latest", "nomic-embed-text:latest", "all-minilm:latest",
    ]  # fmt: skip
    first = models[0]
    assert list(first) == ["name", "model", "modified_at", "size", "digest", "details"]
    assert first["model"] == first["name"]
    assert first["size"] == 4_920_753_328
    assert first["digest"] == "46e0c10c039e019119339687c3c1757cc81b9da49709a3b3924863ba87ca666e"
    assert list(first["details"]) == DETAILS_KEYS
    assert first["details"]["families"] == ["llama"] and first["details"]["parameter_size"] == "8.0B"
    assert models[1]["details"]["families"] is None  # codellama:7b: an old manifest config
    stamps = [m["modified_at"] for m in models]
    assert all(LOCAL_TIME.match(s) for s in stamps)
    assert stamps == sorted(stamps, reverse=True)


def test_unknown_route_and_wrong_method_are_plain_text(url):
    reply = requests.get(f"{url}/api/nothing", timeout=5)
    assert (reply.status_code, reply.text) == (404, "404 page not found")
    assert reply.headers["Content-Type"].startswith("text/plain")
    reply = requests.get(f"{url}/api/generate", timeout=5)
    assert (reply.status_code, reply.text) == (405, "405 method not allowed")
    assert requests.post(f"{url}/api/ps", timeout=5).status_code == 405


# -- ps


def test_ps_shape_key_order_and_types(url):
    assert requests.get(f"{url}/api/ps", timeout=5).json() == {"models": []}
    before = time.time()
    assert post(url, "/api/generate", {"model": "llama3.1:8b"}).json()["done_reason"] == "load"
    [entry] = ps(url)
    assert list(entry) == PS_KEYS
    assert entry["name"] == entry["model"] == "llama3.1:8b"
    assert entry["size"] == entry["size_vram"] == 6_099_560_448
    assert entry["context_length"] == 4096
    assert list(entry["details"]) == DETAILS_KEYS
    assert LOCAL_TIME.match(entry["expires_at"])
    expires = _epoch(entry["expires_at"])
    assert before + 299 <= expires <= time.time() + 301


def _epoch(stamp: str) -> float:
    """Epoch seconds of a Go RFC 3339 time (Python 3.10's fromisoformat wants 6 fraction digits)."""
    match = LOCAL_TIME.match(stamp)
    assert match is not None, stamp
    fraction, zone = match.group(1) or "", match.group(2)
    base = stamp[: len(stamp) - len(zone) - len(fraction)]
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(base + zone).timestamp() + float(fraction or 0)


def test_ps_forever_and_sorting(url):
    post(url, "/api/embed", {"model": "all-minilm", "keep_alive": 60})
    post(url, "/api/embed", {"model": "mxbai-embed-large", "keep_alive": -1})
    post(url, "/api/embed", {"model": "nomic-embed-text", "keep_alive": "10m"})
    models = ps(url)
    assert [m["name"] for m in models] == ["mxbai-embed-large:latest", "nomic-embed-text:latest", "all-minilm:latest"]
    assert int(models[0]["expires_at"][:4]) >= 2300
    assert models[1]["context_length"] == 2048  # nomic: Modelfile 8192 capped at the trained context
    assert models[1]["size"] == 791_006_208


def test_ps_of_an_old_version_has_no_context_length(fleet):
    url = fleet.urls["old"]
    post(url, "/api/generate", {"model": "llama3.2:1b"})
    assert "context_length" not in ps(url)[0]


# -- generate


def test_generate_load_and_unload_answers(url):
    assert post(url, "/api/generate", {"model": "llama3.1"}).status_code == 404  # only the :8b tag is installed
    reply = post(url, "/api/generate", {"model": "llama3.1:8b", "keep_alive": "5m"})
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert list(body) == ["model", "created_at", "response", "done", "done_reason"]
    assert (body["model"], body["response"], body["done"], body["done_reason"]) == ("llama3.1:8b", "", True, "load")
    assert UTC_TIME.match(body["created_at"])
    reply = post(url, "/api/generate", {"model": "llama3.1:8b", "keep_alive": 0}).json()
    assert reply["done_reason"] == "unload" and ps(url) == []
    # unloading a model that is not loaded is a no-op that still answers 200, even for an embedder
    assert post(url, "/api/generate", {"model": "all-minilm", "keep_alive": 0}).json()["done_reason"] == "unload"


def test_generate_streams_ndjson_with_metrics_in_ns(url):
    reply = post(url, "/api/generate", {"model": "llama3.1:8b", "prompt": "Why is the sky blue?"}, stream=True)
    assert reply.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert all(not line["done"] and list(line) == ["model", "created_at", "response", "done"] for line in lines[:-1])
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["response"] == ""
    for key in ("total_duration", "load_duration", "prompt_eval_count", "eval_count", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0
    assert final["eval_count"] == len(lines) - 1
    assert isinstance(final["context"], list) and final["context"]


def test_generate_without_stream_and_num_predict(url):
    body = post(url, "/api/generate", {"model": "llama3.1:8b", "prompt": "hi", "stream": False, "raw": True,
                                       "options": {"num_predict": 3}}).json()  # fmt: skip
    assert body["done_reason"] == "length" and body["eval_count"] == 3
    assert body["response"] and "context" not in body


def test_generate_errors(url):
    cases = [
        (b"", 400, "missing request body"),
        (b"{bad", 400, "invalid character 'b' looking for beginning of object key string"),
        (b'{"model": "llama3.1:8b"', 400, "unexpected EOF"),
        (b"[1]", 400, "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
        (
            b'{"model": 5}',
            400,
            "json: cannot unmarshal number into Go struct field GenerateRequest.model of type string",
        ),
        (b'{"model": "llama3.1:8b", "keep_alive": "300"}', 400, 'time: missing unit in duration "300"'),
        (b'{"model": "llama3.1:8b", "keep_alive": true}', 400, "Unsupported type: 'bool'"),
        (b'{"model": "nope"}', 404, "model 'nope' not found"),
        (b'{"model": ""}', 404, "model '' not found"),
        (b'{"model": "all-minilm", "prompt": "x"}', 400, '"all-minilm" does not support generate'),
        (
            b'{"model": "llama3.1:8b", "suffix": "x", "prompt": "y"}',
            400,
            "registry.ollama.ai/library/llama3.1:8b does not support insert",  # scheduleRunner's "%s %w", full name
        ),
        (b'{"model": "llama3.1:8b", "options": {"num_ctx": "x"}}', 500, 'option "num_ctx" must be of type integer'),
    ]
    for body, status, message in cases:
        reply = post(url, "/api/generate", body)
        assert (reply.status_code, reply.json()) == (status, {"error": message}), body
        assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
    assert ps(url) == []


# -- chat


def test_chat_load_stream_and_unload(url):
    body = post(url, "/api/chat", {"model": "llama3.1:8b", "messages": []}).json()
    assert list(body) == ["model", "created_at", "message", "done", "done_reason"]
    assert body["message"] == {"role": "assistant", "content": ""} and body["done_reason"] == "load"
    reply = post(url, "/api/chat", {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]})
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert lines[0]["message"]["role"] == "assistant" and lines[0]["done"] is False
    assert lines[-1]["done"] is True and "context" not in lines[-1] and lines[-1]["eval_count"] == len(lines) - 1
    whole = post(url, "/api/chat", {"model": "llama3.1:8b", "stream": False,
                                    "messages": [{"role": "user", "content": "hi"}]}).json()  # fmt: skip
    assert whole["message"]["content"] == "".join(line["message"]["content"] for line in lines)
    body = post(url, "/api/chat", {"model": "llama3.1:8b", "keep_alive": 0}).json()
    assert body["done_reason"] == "unload" and ps(url) == []


def test_chat_errors_and_version_dependent_text(url, fleet):
    assert post(url, "/api/chat", {"model": ""}).json() == {"error": "model is required"}
    assert post(url, "/api/chat", {"model": "nope"}).json() == {"error": "model 'nope' not found"}
    reply = post(url, "/api/chat", {"model": "nomic-embed-text"})
    assert (reply.status_code, reply.json()["error"]) == (400, '"nomic-embed-text" does not support chat')
    reply = post(url, "/api/chat", {"model": "llama3.1:8b", "messages": "hi"})
    assert reply.json()["error"] == (
        "json: cannot unmarshal string into Go struct field ChatRequest.messages of type []api.Message"
    )
    old = post(fleet.urls["old"], "/api/chat", {"model": "nope"})
    assert (old.status_code, old.json()) == (404, {"error": 'model "nope" not found, try pulling it first'})


# -- embeddings


def test_embed_loads_on_empty_input_and_returns_unit_vectors(url):
    assert post(url, "/api/embed", {"model": "mxbai-embed-large"}).json() == {
        "model": "mxbai-embed-large",
        "embeddings": [],
    }
    assert ps(url)[0]["name"] == "mxbai-embed-large:latest"
    body = post(url, "/api/embed", {"model": "mxbai-embed-large", "input": ["a cat", "a dog"]}).json()
    assert list(body) == ["model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"]
    first, second = body["embeddings"]
    assert len(first) == find("mxbai-embed-large").arch.embedding_length == 1024  # type: ignore[union-attr]
    assert math.isclose(math.sqrt(sum(x * x for x in first)), 1.0, rel_tol=1e-5)
    assert first != second
    again = post(url, "/api/embed", {"model": "mxbai-embed-large", "input": "a cat"}).json()["embeddings"][0]
    assert again == first
    short = post(url, "/api/embed", {"model": "mxbai-embed-large", "input": "a cat", "dimensions": 8}).json()
    assert len(short["embeddings"][0]) == 8


def test_embed_errors(url):
    assert post(url, "/api/embed", {"model": "mxbai-embed-large", "input": [1]}).json() == {
        "error": "invalid input type"
    }
    assert post(url, "/api/embed", {"model": "mxbai-embed-large", "input": 3}).status_code == 400
    reply = post(url, "/api/embed", {"model": "nope", "input": "x"})
    assert (reply.status_code, reply.json()) == (404, {"error": 'model "nope" not found, try pulling it first'})
    long_text = "word " * 600
    reply = post(url, "/api/embed", {"model": "all-minilm", "input": long_text, "truncate": False})
    assert reply.json() == {"error": "input length exceeds maximum context length"}


def test_legacy_embeddings(url):
    assert post(url, "/api/embeddings", {"model": "all-minilm"}).json() == {"embedding": []}
    body = post(url, "/api/embeddings", {"model": "all-minilm", "prompt": "hello"}).json()
    assert list(body) == ["embedding"] and len(body["embedding"]) == 384
    assert abs(math.sqrt(sum(x * x for x in body["embedding"])) - 1.0) > 0.1  # not normalized
    assert post(url, "/api/embeddings", {"prompt": "x"}).json() == {"error": "model is required"}


# -- show


def test_show_shape_and_parameters(url):
    body = post(url, "/api/show", {"name": "nomic-embed-text"}).json()  # the legacy field
    assert list(body) == [
        "license", "modelfile", "parameters", "template", "details", "model_info", "tensors", "capabilities",
        "modified_at",
    ]  # fmt: skip
    assert body["capabilities"] == ["embedding"]
    assert "num_ctx                        8192" in body["parameters"].splitlines()
    assert body["model_info"]["general.architecture"] == "nomic-bert"
    assert body["model_info"]["nomic-bert.pooling_type"] == 1
    assert body["tensors"][0].keys() == {"name", "type", "shape"}
    assert body["modelfile"].startswith('# Modelfile generated by "ollama show"\n')
    assert LOCAL_TIME.match(body["modified_at"])
    llama = post(url, "/api/show", {"model": "llama3.1:8b"}).json()
    assert "num_ctx" not in llama["parameters"] and '"<|eot_id|>"' in llama["parameters"]
    assert llama["details"]["quantization_level"] == "Q4_K_M"
    assert post(url, "/api/show", {}).json() == {"error": "model is required"}
    reply = post(url, "/api/show", {"model": "llama3.2:3b"})  # in the catalog, not on this node
    assert (reply.status_code, reply.json()) == (404, {"error": "model 'llama3.2:3b' not found"})


# -- Go formats


def test_keep_alive_and_duration_parsing():
    assert parse_keep_alive(300) == 300.0 and parse_keep_alive(0.5) == 0.5
    assert parse_keep_alive(-1) == FOREVER and parse_keep_alive("-1m") == FOREVER
    assert parse_keep_alive("1h30m") == 5400.0 and parse_keep_alive("300ms") == 0.3 and parse_keep_alive("0") == 0
    for value, message in (
        ("300", 'time: missing unit in duration "300"'),
        ("5d", 'time: unknown unit "d" in duration "5d"'),
        ("abc", 'time: invalid duration "abc"'),
        (True, "Unsupported type: 'bool'"),
        ([1], "Unsupported type: '[]interface {}'"),
        ({}, "Unsupported type: 'map[string]interface {}'"),
    ):
        with pytest.raises(ValueError) as caught:
            parse_keep_alive(value)
        assert str(caught.value) == message
    assert parse_duration(".5s") == 0.5


def test_timestamps_are_go_rfc3339():
    assert go_time(1_722_548_311.5, utc=True) == "2024-08-01T21:38:31.5Z"
    assert go_time(1_722_548_311.0, utc=True) == "2024-08-01T21:38:31Z"
    assert LOCAL_TIME.match(go_time(1_722_548_311.25))


# -- fleet file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes: [{name: a, prot: 1}]", "nodes[0].prot: unknown key (did you mean 'port'?)"),
        ("nodes: [{name: a, gpus: [{vram: eight}]}]", "nodes[0].gpus[0].vram: expected a size like 8GiB, got 'eight'"),
        ("nodes: [{name: a}, {name: a}]", "nodes[1].name: duplicate node name 'a' (also nodes[0])"),
        ("nodes: [{name: a, port: 9}, {name: b, port: 9}]", "nodes[1].port: port 9 is already used by nodes[0]"),
        ("control_port: 9\nnodes: [{name: a, port: 9}]", "nodes[0].port: port 9 is already used by control_port"),
        ("nodes: [{name: a, models: [llama9]}]", "nodes[0].models[0]: unknown model 'llama9'"),
        ("nodes: [{name: a, models: [all-minilm], preload: [{model: llama3.1:8b}]}]",
         "nodes[0].preload[0].model: 'llama3.1:8b' is not among this node's models"),
        ("nodes: [{name: a, keep_alive: '300'}]", 'nodes[0].keep_alive: expected a duration like 5m'),
        ("nodes: [{name: a, num_parallel: 0}]", "nodes[0].num_parallel: expected an integer ≥ 1, got 0"),
        ("nodes: []", "nodes: expected a non-empty list of nodes"),
        ("nodes: [{name: a b}]", "nodes[0].name: expected a name of letters"),
        ("nodes: [{name: a}\n", "invalid YAML"),
        ("", "empty file"),
    ],
)  # fmt: skip
def test_fleet_file_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as caught:
        load_fleet(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_fleet_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.yaml: no such file"):
        load_fleet(tmp_path / "missing.yaml")


def test_fleet_file_defaults_and_forms():
    spec = fleet_from_dict({"nodes": [{"name": "a", "ram": 2048, "load_speed": 1000, "gpu_overhead": "1GiB",
                                       "keep_alive": -1, "models": ["llama3.1"]}]})  # fmt: skip
    node = spec.nodes[0]
    assert (node.ram, node.load_speed, node.gpu_overhead) == (2048 * 2**20, 1000, 2**30)
    assert node.keep_alive == FOREVER and node.models == ("llama3.1:latest",)
    assert (node.port, node.version, node.context_length, node.max_loaded, spec.control_port) == (
        0,
        "0.32.15",  # the current era unless the file says otherwise
        None,  # OLLAMA_CONTEXT_LENGTH unset: the era's default
        3,
        0,
    )
    assert node.default_context == 4096  # no GPU: the smallest tier


def test_preload_loads_at_start_with_its_options():
    spec = fleet_from_dict(
        {"nodes": [{**GPU_NODE, "preload": [{"model": "llama3.1:8b", "num_gpu": 0, "keep_alive": -1}]}]}
    )
    with Fleet(spec) as running:
        [entry] = ps(running.urls["gpu"])
    assert entry["size_vram"] == 0 and entry["size"] == 5_154_267_136 and entry["expires_at"] > "2300"


# -- the demo fleet and the CLI


def test_demo_fleet_starts_and_matches_the_example():
    assert (ROOT / "examples" / "demo-fleet.yaml").read_text() == DEMO_FLEET.read_text()
    spec = load_fleet(DEMO_FLEET)
    assert [n.name for n in spec.nodes] == ["gpu-small", "cpu-node", "gpu-large"]
    assert [n.port for n in spec.nodes] == [11501, 11502, 11503] and spec.control_port == 11500
    assert [len(n.gpus) for n in spec.nodes] == [1, 0, 1]
    ephemeral = replace(spec, control_port=0, nodes=tuple(replace(n, port=0) for n in spec.nodes))
    with Fleet(ephemeral) as running:
        for name, node_url in running.urls.items():
            assert requests.get(node_url, timeout=5).text == "Ollama is running", name
        assert "llama3.1:latest" in [
            m["name"] for m in requests.get(running.urls["cpu-node"] + "/api/tags").json()["models"]
        ]
        nodes = requests.get(running.control_url + "/nodes", timeout=5).json()
        assert [n["name"] for n in nodes] == ["gpu-small", "cpu-node", "gpu-large"]


def _cli(fleet_file: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "simulator", "--fleet", str(fleet_file)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_cli_prints_urls_serves_and_stops_cleanly_on_sigterm(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("nodes:\n  - {name: a, models: [all-minilm]}\n  - {name: b}\n")
    process = _cli(path)
    try:
        lines = [process.stdout.readline().strip() for _ in range(3)]  # type: ignore[union-attr]
        names = [line.split(" ", 1)[0] for line in lines]
        assert names == ["a", "b", "control"], lines
        urls = [line.split(" ", 1)[1] for line in lines]
        assert all(re.match(r"^http://127\.0\.0\.1:\d+$", u) for u in urls)
        assert requests.get(urls[0], timeout=5).text == "Ollama is running"
        assert requests.get(urls[2] + "/nodes", timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(urls[0], timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_cli_bad_fleet_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("nodes: [{name: a, gpus: [{vram: lots}]}]\n")
    process = _cli(path)
    try:
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert process.returncode == 2
    assert err.strip().splitlines() == [
        f"gpu-router simulate: {path}: nodes[0].gpus[0].vram: expected a size like 8GiB, got 'lots'"
    ]
