"""Credentials in node URLs reach the node and nowhere else: metrics, API, status pages, command output, action
details and logs show `***`; with `optimizer.protect_reads` the optimizer's read endpoints demand credentials."""

from __future__ import annotations

import base64
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from exporter.server import start_exporter
from gpurouter.cluster.config import ConfigError, parse_config
from gpurouter.cluster.ollama import OllamaClient, OllamaError
from gpurouter.urls import redact
from optimizer.service import start_optimizer
from simulator.run import Fleet, fleet_from_dict

SECRET = "s3cret-Pa55"
TOKEN = "reads-token"
LLAMA = "llama3.1:8b"


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://ops:{SECRET}@")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def cluster() -> Iterator[tuple[Fleet, dict]]:
    """A simulated node reached with credentials in its URL, and a down node whose URL has them too."""
    spec = {"nodes": [{"name": "gpu", "gpus": [{"vram": "8GiB"}], "models": [LLAMA], "token_rate": 0}]}
    with Fleet(fleet_from_dict(spec)) as fleet:
        yield (
            fleet,
            {
                "nodes": [
                    {"name": "gpu", "url": with_credentials(fleet.urls["gpu"]), "vram": "8GiB"},
                    {"name": "down", "url": f"http://ops:{SECRET}@127.0.0.1:{closed_port()}", "vram": "8GiB"},
                ],
                "priority_models": [LLAMA],
                "check_interval": 3600,
                "request_timeout": 2,
            },
        )


def test_redact_replaces_user_and_password_everywhere_in_a_text() -> None:
    assert redact("http://ops:pw@gpu1:11434") == "http://***@gpu1:11434"
    assert redact("https://token@gpu1/ollama") == "https://***@gpu1/ollama"
    assert redact("http://gpu1:11434/api/ps?a=b@c") == "http://gpu1:11434/api/ps?a=b@c"
    assert redact("a http://u:p@x:1/api/ps b HTTP://u@y c") == "a http://***@x:1/api/ps b HTTP://***@y c"


def test_the_connection_keeps_the_credentials() -> None:
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = OllamaClient(f"http://ops:{SECRET}@127.0.0.1:{server.server_address[1]}")
        with pytest.raises(OllamaError) as caught:
            client.version()
        assert seen == ["Basic " + base64.b64encode(f"ops:{SECRET}".encode()).decode()]
        assert SECRET not in str(caught.value) and "http://***@127.0.0.1:" in str(caught.value)
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_api_pages_and_actions_never_show_the_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with cluster() as (fleet, raw):
        config = parse_config(raw)
        server, thread = start_exporter(config)
        handle = start_optimizer(config, reconcile=False)
        try:
            metrics = requests.get(server.url + "/metrics", timeout=30).text
            port = fleet.urls["gpu"].rsplit(":", 1)[1]
            assert f'url="http://***@127.0.0.1:{port}"' in metrics
            assert 'gpu_router_node_up{node="gpu"} 1.0' in metrics  # the credentials still reach the node
            status = requests.get(handle.url + "/api/v1/status", timeout=30)
            nodes = {n["name"]: n for n in status.json()["nodes"]}
            assert nodes["gpu"]["url"] == f"http://***@127.0.0.1:{port}"
            assert "http://***@127.0.0.1:" in nodes["down"]["error"]
            handle.queue.submit(LLAMA, "down")
            assert handle.queue.wait_idle(30)
            shown = [
                metrics,
                status.text,
                requests.get(server.url + "/", timeout=5).text,
                requests.get(handle.url + "/", timeout=30).text,
                requests.get(handle.url + "/api/v1/check", params={"model": LLAMA}, timeout=30).text,
                requests.get(handle.url + "/api/v1/actions", timeout=5).text,
                caplog.text,
            ]
            for text in shown:
                assert SECRET not in text
        finally:
            handle.stop()
            server.stop()
            thread.join(5)


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["check", LLAMA], ["report"]])
def test_command_output_never_shows_the_password(tmp_path: Path, command: list[str]) -> None:
    with cluster() as (_, raw):
        path = tmp_path / "gpu_router_config.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", *command, "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert "***@127.0.0.1" in done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_protect_reads_demands_the_webhook_credentials_on_reads() -> None:
    with cluster() as (_, raw):
        auth = {"webhook_auth": {"bearer_token": TOKEN}}
        for protect, expected in ((False, 200), (True, 401)):
            config = parse_config({**raw, "optimizer": {**auth, "protect_reads": protect}})
            handle = start_optimizer(config, reconcile=False)
            try:
                for path in (
                    "/",
                    "/api/v1/status",
                    "/api/v1/models",
                    "/api/v1/actions",
                    f"/api/v1/route?model={LLAMA}",
                ):
                    answer = requests.get(handle.url + path, timeout=30)
                    assert answer.status_code == expected
                    if protect:
                        assert answer.json() == {"error": "unauthorized: missing or wrong credentials"}
                        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="gpu-router"'
                        granted = requests.get(handle.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
                        assert granted.status_code == 200
                for path in ("/healthz", "/metrics"):
                    assert requests.get(handle.url + path, timeout=5).status_code == 200
                refused = requests.post(handle.url + "/webhook", json={}, timeout=5)
                assert refused.status_code == 401  # writes: as before
            finally:
                handle.stop()


def test_protect_reads_needs_credentials_to_demand() -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.protect_reads: needs credentials in optimizer.webhook_auth"):
        parse_config({"nodes": ["http://127.0.0.1:1"], "optimizer": {"protect_reads": True}})
