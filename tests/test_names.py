"""A model or node name that is not text (a lone surrogate, what a "\\ud800" escape makes) or holds a control
character is refused where it enters: the configuration and fleet files (one line naming the key), the proxy's
request bodies (Ollama's 400 on every routed path), the webhook's labels (400) and the command line (exit 2).
Before, the proxy answered 500 with a traceback and `gpu-router status` crashed printing such a priority model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import alert, payload, run_cli
from test_proxy import stack

from gpurouter.cluster.config import ConfigError, load_config, name_problem, parse_config
from gpurouter.cluster.observe import Observer
from optimizer import webhook
from optimizer.app import create_app
from proxy.app import ROUTED
from simulator.fleet import fleet_from_dict


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("llama3.1:8b", None),
        ("hf.co/org/model:Q4_K_M", None),
        ("\ud800", "a lone surrogate (U+D800) is not text"),
        ("a\x00b", "an unprintable character (U+0000) has no place in a name"),
        ("a\nb", "an unprintable character (U+000A) has no place in a name"),
    ],
)
def test_name_problem(name: str, problem: str | None) -> None:
    assert name_problem(name) == problem


def test_every_routed_path_answers_ollamas_400_for_a_name_that_is_not_text() -> None:
    body = '{"model": "\\ud800", "name": "\\ud800", "prompt": "x", "messages": [], "input": "x"}'
    with stack() as (_, proxy):
        for path in ROUTED:
            answer = requests.post(proxy.url + path, data=body, timeout=10)
            assert answer.status_code == 400, (path, answer.text)
            error = answer.json()["error"]
            assert (error["message"] if path.startswith("/v1/") else error) == "invalid model name", path
        # and it keeps serving
        ok = requests.post(proxy.url + "/api/generate", json={"model": "llama3.2:1b", "prompt": "x"}, timeout=30)
        assert ok.status_code == 200


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ('priority_models: ["\\ud800"]', "priority_models[0]"),
        ('priority_models: [{name: "a\\x01"}]', "priority_models[0].name"),
        ('model_sizes: {"a\\x07": 1GiB}', "model_sizes.'a\\x07'"),
        ("nodes:\n  - {name: \"gpu\\ud800\", url: 'http://127.0.0.1:1'}", "nodes[0].name"),
        ("nodes:\n  - {url: 'http://127.0.0.1:1', gpus: [{name: \"\\x1b[31m\", vram: 1GiB}]}", "nodes[0].gpus[0].name"),
    ],
)
def test_the_configuration_refuses_a_name_that_is_not_text(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = tmp_path / "gpu_router_config.yaml"
    text = yaml_text if yaml_text.startswith("nodes") else "nodes: [http://127.0.0.1:1]\n" + yaml_text
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {key}: a"), str(caught.value)
    done = run_cli("status", "--config", str(path))  # crashed printing the name before
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_a_fleet_refuses_a_gpu_name_that_is_not_text() -> None:
    with pytest.raises(ValueError, match=r"nodes\[0\]\.gpus\[0\]\.name: a lone surrogate"):
        fleet_from_dict({"nodes": [{"name": "a", "gpus": [{"name": "\ud800", "vram": "1GiB"}]}]})


@pytest.mark.parametrize("label", ["model", "node"])
def test_the_webhook_refuses_a_label_that_is_not_text(label: str) -> None:
    body = json.dumps(payload(alert(**{"model": "llama3.1", label: "x\ud800"}))).encode()
    with pytest.raises(webhook.PayloadError, match=rf"[lL]abels\.{label}: a lone surrogate \(U\+D800\)"):
        webhook.parse(body)


@pytest.mark.parametrize("command", ["route", "check"])
def test_the_command_line_refuses_a_model_argument_that_is_not_text(tmp_path: Path, command: str) -> None:
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text("nodes: [http://127.0.0.1:1]\n", encoding="utf-8")
    # bytes that are not UTF-8 reach Python as lone surrogates
    argv = [sys.executable.encode(), b"-m", b"cli.main", command.encode(), b"\xff\xfe", b"--config", bytes(path)]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode == 2
    assert (
        done.stderr.decode()
        .splitlines()[-1]
        .endswith("argument MODEL: invalid model name: a lone surrogate (U+DCFF) is not text")
    )


def test_the_optimizer_api_refuses_a_model_name_that_is_not_text() -> None:
    config = parse_config({"nodes": ["http://127.0.0.1:1"], "priority_models": ["llama3.1"], "auto_optimize": False})
    with Observer(config) as observer:
        app = create_app(config, observer=observer)
        try:
            client = app.test_client()
            for path in ("/api/v1/route", "/api/v1/check"):
                answer = client.get(path, query_string={"model": "a\x01b"})
                assert answer.status_code == 400, path
                assert answer.get_json()["error"].startswith("model: an unprintable character (U+0001)"), path
            body = '{"dry_run": true, "models": ["llama3.1", "\\ud800"]}'
            answer = client.post("/api/v1/optimize", data=body)
            assert answer.status_code == 400
            assert answer.get_json() == {"error": "models[1]: a lone surrogate (U+D800) is not text"}
        finally:
            app.extensions["gpu_router"].queue.stop()
