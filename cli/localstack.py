"""Run the real Prometheus and Alertmanager on 127.0.0.1: for the demo, the benchmarks and the tests.

Each runs from a fresh data directory, is waited on by condition (never by a fixed sleep) and is stopped by
its own PID.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import requests
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    condition: Callable[[], Any], timeout: float = 5.0, what: str = "the condition", interval: float = 0.02
) -> Any:
    """Poll `condition` until it returns something truthy; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the thing waited for may not answer yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}" + (f" (last error: {last})" if last else ""))


class Process:
    """A started program, stopped by its own PID."""

    def __init__(self, args: list[str], log: Path, cwd: Path | None = None) -> None:
        self.log = log
        self._log = log.open("wb")
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Prometheus(Process):
    """Prometheus with a generated config: 1 s scrape and evaluation by default."""

    def __init__(
        self,
        workdir: Path,
        targets: dict[str, Iterable[str]],
        rule_files: Iterable[Path] = (),
        alertmanager: str | None = None,
        interval: str = "1s",
        port: int | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config: dict[str, Any] = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(hosts)}]} for job, hosts in targets.items()
            ],
        }
        if alertmanager:
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager.removeprefix("http://")]}]}]
            }
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        super().__init__(
            [
                shutil.which("prometheus") or "/usr/bin/prometheus",
                f"--config.file={path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--web.external-url={self.url}",
            ],
            workdir / "prometheus.log",
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5).json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        return body["data"]["result"]

    def wait_up(self, jobs: Iterable[str], timeout: float = 60) -> None:
        """Wait until every job's targets have been scraped successfully."""
        for job in jobs:
            wait_for(
                lambda job=job: any(r["value"][1] == "1" for r in self.query(f'up{{job="{job}"}}')),
                timeout,
                f"Prometheus to scrape job {job} ({self.tail(5)})",
            )

    def alerts(self) -> list[dict[str, Any]]:
        return requests.get(f"{self.url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]


class Alertmanager(Process):
    """Alertmanager 0.25 (Debian's prometheus-alertmanager) with no cluster port."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = workdir / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        super().__init__(
            [
                shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager",
                f"--config.file={path}",
                f"--storage.path={workdir / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--web.external-url={self.url}",
                "--cluster.listen-address=",
            ],
            workdir / "alertmanager.log",
        )

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(
            lambda: requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200,
            timeout,
            f"Alertmanager to be ready ({self.tail(5)})",
        )


REPO = Path(__file__).resolve().parent.parent
ACTING_ALERTS = (
    "GPURouterPriorityModelOnCPU",
    "GPURouterPriorityModelPartiallyOffloaded",
    "GPURouterPriorityModelNotOnGPU",
)


def fast_rules(source: Path, target: Path, duration: str = "0s") -> Path:
    """A copy of the alert rules with every `for:` set to `duration` (same expressions), for tests and demos."""
    text = re.sub(r"(?m)^(\s+for:\s*)\S+", rf"\g<1>{duration}", source.read_text(encoding="utf-8"))
    target.write_text(text, encoding="utf-8")
    return target


def fast_alertmanager(source: Path, webhook_url: str, token_file: Path | None, interval: str = "1s") -> dict[str, Any]:
    """The shipped Alertmanager config pointed at `webhook_url`, with short waits for tests and demos."""
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="0s", group_interval=interval)
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url
            if token_file is None:
                hook.pop("http_config", None)
            else:
                hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    return config


class Stack:
    """The whole loop on 127.0.0.1: simulated fleet, exporter, optimizer and proxy (each its own process), and
    optionally the real Prometheus (fast rule variant) and Alertmanager pointed at the optimizer's webhook.

    `fleet` is a fleet document without ports (they are chosen here); `config` the router configuration
    without `nodes` (made from the fleet: static capacity, or `capacity="prometheus"` to read the simulated
    GPUs through Prometheus as a central router would).
    """

    def __init__(
        self,
        workdir: Path,
        fleet: dict[str, Any],
        config: dict[str, Any],
        *,
        prometheus: bool = True,
        capacity: str = "static",
        token: str = "e2e-token",
        repeat_interval: str = "1h",
    ) -> None:
        self.workdir = workdir
        self.processes: list[Process] = []
        workdir.mkdir(parents=True, exist_ok=True)
        self.control_url = f"http://127.0.0.1:{free_port()}"
        nodes = []
        for node in fleet["nodes"]:
            node["port"] = free_port()
            nodes.append(node)
        self.urls = {n["name"]: f"http://127.0.0.1:{n['port']}" for n in nodes}
        self.fleet_file = workdir / "fleet.yaml"
        self.fleet_file.write_text(yaml.safe_dump({**fleet, "nodes": nodes}), encoding="utf-8")
        self.exporter_url = f"http://127.0.0.1:{free_port()}"
        self.optimizer_url = f"http://127.0.0.1:{free_port()}"
        self.proxy_url = f"http://127.0.0.1:{free_port()}"
        self.token = token
        token_file = workdir / "webhook_token"
        token_file.write_text(token + "\n", encoding="utf-8")
        self.prometheus: Prometheus | None = None
        self.alertmanager: Alertmanager | None = None
        prometheus_port = free_port()
        router_nodes = []
        for node in nodes:
            entry: dict[str, Any] = {"name": node["name"], "url": self.urls[node["name"]]}
            if capacity == "prometheus":
                entry["gpu_source"] = "prometheus"
            elif node.get("gpus"):
                entry["gpus"] = node["gpus"]
            else:
                entry["vram"] = 0
            router_nodes.append(entry)
        router = {"nodes": router_nodes, **config}
        router.setdefault("optimizer", {})["webhook_auth"] = {"bearer_token_file": str(token_file)}
        router.setdefault("proxy", {}).setdefault("optimizer_url", self.optimizer_url)
        router.setdefault("demand", {}).setdefault("proxy_url", self.proxy_url)  # as the compose stack
        if capacity == "prometheus":
            router["prometheus_url"] = f"http://127.0.0.1:{prometheus_port}"
        self.config_file = workdir / "gpu_router_config.yaml"
        self.config_file.write_text(yaml.safe_dump(router), encoding="utf-8")
        self._want_prometheus = prometheus or capacity == "prometheus"
        self._prometheus_port = prometheus_port
        self._token_file = token_file
        self._repeat_interval = repeat_interval

    def _cli(self, *args: str, name: str) -> Process:
        process = Process([sys.executable, "-m", "cli.main", *args], self.workdir / f"{name}.log", cwd=REPO)
        self.processes.append(process)
        return process

    def start(self) -> Stack:
        try:
            control_port = self.control_url.rsplit(":", 1)[1]
            self._cli("simulate", "--fleet", str(self.fleet_file), "--control-port", control_port, name="simulator")
            for url in self.urls.values():
                wait_for(lambda url=url: requests.get(url, timeout=1).ok, 30, f"simulated node {url}")
            if self._want_prometheus:
                self._start_prometheus()
            cfg = str(self.config_file)
            self._cli("exporter", "--config", cfg, "--listen", self.exporter_url[7:], name="exporter")
            self._cli("optimizer", "--config", cfg, "--listen", self.optimizer_url[7:], name="optimizer")
            self._cli("proxy", "--config", cfg, "--listen", self.proxy_url[7:], name="proxy")
            for url in (self.exporter_url, self.optimizer_url, self.proxy_url):
                wait_for(lambda url=url: requests.get(f"{url}/healthz", timeout=1).ok, 30, f"{url}/healthz")
            if self.prometheus is not None:
                self.prometheus.wait_up(["gpu-router-exporter", "gpu-router-optimizer", "gpu-router-proxy"])
        except BaseException:
            self.stop()
            raise
        return self

    def _start_prometheus(self) -> None:
        rules = fast_rules(REPO / "alerts" / "rules.yml", self.workdir / "rules-fast.yml")
        am_config = fast_alertmanager(
            REPO / "alerts" / "alertmanager.yml", f"{self.optimizer_url}/webhook", self._token_file
        )
        am_config["route"]["routes"][0]["repeat_interval"] = self._repeat_interval
        self.alertmanager = Alertmanager(self.workdir / "alertmanager", am_config)
        self.processes.append(self.alertmanager)
        self.alertmanager.wait_ready()
        self.prometheus = Prometheus(
            self.workdir / "prometheus",
            {
                "gpu-router-exporter": [self.exporter_url[7:]],
                "gpu-router-optimizer": [self.optimizer_url[7:]],
                "gpu-router-proxy": [self.proxy_url[7:]],
                "gpus": [self.control_url[7:]],
            },
            rule_files=[rules],
            alertmanager=self.alertmanager.url,
            port=self._prometheus_port,
        )
        self.processes.append(self.prometheus)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ looking and poking

    def fault(self, node: str, fault: str, **params: Any) -> None:
        response = requests.post(f"{self.control_url}/nodes/{node}/fault", json={"fault": fault, **params}, timeout=5)
        response.raise_for_status()

    def clear(self, node: str) -> None:
        requests.delete(f"{self.control_url}/nodes/{node}/fault", timeout=5).raise_for_status()

    def node_state(self, node: str) -> dict[str, Any]:
        response = requests.get(f"{self.control_url}/nodes/{node}/state", timeout=5)
        response.raise_for_status()
        return response.json()

    def loads(self, model: str) -> int:
        """Loads of `model` across the fleet so far (the simulator's own count)."""
        return sum(self.node_state(n)["counts"].get(model, {}).get("loads", 0) for n in self.urls)

    def ps(self, node: str) -> list[dict[str, Any]]:
        return requests.get(f"{self.urls[node]}/api/ps", timeout=5).json()["models"]

    def load(self, node: str, model: str, *, embedding: bool = False, **options: Any) -> None:
        """What a client does: load a model on a node (e.g. num_gpu=0 puts it on CPU)."""
        body: dict[str, Any] = {"model": model, "keep_alive": -1, "options": options}
        if embedding:
            body["input"] = []
        else:
            body.update(prompt="", stream=False)
        path = "/api/embed" if embedding else "/api/generate"
        requests.post(f"{self.urls[node]}{path}", json=body, timeout=60).raise_for_status()

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        assert self.prometheus is not None
        return [a for a in self.prometheus.alerts() if a["labels"]["alertname"] == alertname and a["state"] == "firing"]
