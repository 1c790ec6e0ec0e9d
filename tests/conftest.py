"""Shared test helpers: external tools are required in CI (GPU_ROUTER_REQUIRE_TOOLS=1), optional elsewhere."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest
import requests

from cli.main import main
from gpurouter.act.jobs import JobQueue, Metrics, Remediator
from gpurouter.cluster.config import parse_config
from gpurouter.cluster.observe import Observer
from optimizer.reconcile import Reconciler
from proxy.service import ProxyHandle, start_proxy
from simulator.run import Fleet, fleet_from_dict


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`gpu-router ARGS` in a fresh interpreter; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=60, check=False
    )


def gpu_router(config: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`gpu-router --config CONFIG ARGS` in this process: (exit status, stdout, stderr)."""
    code = main(["--config", config, *args])
    out, err = capsys.readouterr()
    return code, out, err


def missing_tool(message: str) -> NoReturn:
    """Skip the test for want of a tool, or fail it where CI demands every tool (GPU_ROUTER_REQUIRE_TOOLS=1)."""
    if os.environ.get("GPU_ROUTER_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def bench_module(name: str) -> ModuleType:
    """bench/NAME.py as a module (its helpers and figures are what some tests assert on)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def require_tool(name: str) -> str:
    """The path of an external program; skips the test without it, or fails when CI demands every tool."""
    path = shutil.which(name)
    if path is None:
        missing_tool(f"{name} is not installed (apt-get install prometheus prometheus-alertmanager chromium systemd)")
    return path


def alert(name: str = "GPURouterPriorityModelOnCPU", status: str = "firing", **labels: str) -> dict:
    """One alert as Alertmanager 0.25 sends it in a webhook notification."""
    return {
        "status": status,
        "labels": {"alertname": name, "severity": "critical", **labels},
        "annotations": {"summary": "A priority model runs on CPU."},
        "startsAt": "2026-11-26T20:12:01.544808118Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://127.0.0.1:9090/graph",
        "fingerprint": "c7a56ec958c85754",
    }


def payload(*alerts: dict, status: str | None = None) -> dict:
    """A whole webhook notification (version 4), shaped like one captured from a real Alertmanager."""
    first = alerts[0]["labels"] if alerts else {}
    return {
        "receiver": "optimizer",
        "status": status or (alerts[0]["status"] if alerts else "firing"),
        "alerts": list(alerts),
        "groupLabels": {"alertname": str(first.get("alertname", ""))},
        "commonLabels": {k: v for k, v in first.items() if isinstance(v, str)},
        "commonAnnotations": {"summary": "A priority model runs on CPU."},
        "externalURL": "http://127.0.0.1:9093",
        "version": "4",
        "groupKey": '{}:{alertname="GPURouterPriorityModelOnCPU"}',
        "truncatedAlerts": 0,
    }


@contextmanager
def optimizer_parts(
    nodes: list[dict], priority: list[str], vram: dict[str, object], **settings: object
) -> Iterator[tuple[Fleet, Observer, Reconciler, JobQueue]]:
    """A simulated fleet, an observer of it with static capacity (`vram` per node: blind to other processes),
    and the optimizer's job queue and reconciler (short cooldowns), stopped at the end."""
    with Fleet(fleet_from_dict({"nodes": [{"token_rate": 0, **n} for n in nodes]})) as fleet:
        config = parse_config(
            {
                "nodes": [{"name": name, "url": url, "vram": vram[name]} for name, url in fleet.urls.items()],
                "priority_models": priority,
                "check_interval": 3600,
                "request_timeout": 5,
                "optimizer": {"cooldown_seconds": 0.05, "cooldown_max_seconds": 0.05, "load_timeout": 20},
                **settings,
            }
        )
        with Observer(config) as observer:
            metrics = Metrics()
            job = Remediator(config, observer)
            queue = JobQueue(config, job, metrics=metrics).start()
            try:
                yield (
                    fleet,
                    observer,
                    Reconciler(config, observer, queue, metrics=metrics, leftovers=job.leftovers),
                    queue,
                )
            finally:
                queue.stop()


@contextmanager
def proxied(nodes: list[dict], **settings: object) -> Iterator[tuple[Fleet, ProxyHandle]]:
    """A fleet and a proxy over it; the proxy is told each node's GPU memory (`vram` of the node, 0 without
    GPUs), polls every 60 s unless `proxy` says otherwise, and heals nothing unless `auto_optimize` is given."""
    proxy = {"refresh_interval": 60, **settings.pop("proxy", {})}  # type: ignore[dict-item]
    vram = {n["name"]: n.get("gpus", [{}])[0].get("vram", 0) if n.get("gpus") else 0 for n in nodes}
    with Fleet(fleet_from_dict({"nodes": nodes})) as fleet:
        config = parse_config(
            {
                "nodes": [{"name": n, "url": u, "vram": vram[n]} for n, u in fleet.urls.items()],
                "auto_optimize": False,
                "request_timeout": 5,
                "proxy": proxy,
                **settings,
            }
        )
        handle = start_proxy(config)
        try:
            yield fleet, handle
        finally:
            handle.stop()


def proxy_metric(handle: ProxyHandle, name: str, **labels: str) -> float:
    """The value of one series on the proxy's /metrics (0 when absent)."""
    text = requests.get(f"{handle.url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(
                part.split("=", 1) for part in line[line.find("{") + 1 : line.rfind("}")].split(",") if "=" in part
            )
            if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0
