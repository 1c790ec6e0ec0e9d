"""Run the real Prometheus and Alertmanager on 127.0.0.1: for the demo, the benchmarks and the tests.

Each runs from a fresh data directory, is waited on by condition (never by a fixed sleep) and is stopped by
its own PID.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
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


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
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
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
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
