"""Memory and CPU of each service against the simulated demo fleet: the figures behind the Kubernetes requests
and limits (deploy/kubernetes/base/).

`gpu-router simulate` (the demo fleet on ephemeral ports), then `gpu-router exporter`, `optimizer` and `proxy`
on it, each its own process. Per service: RSS once started and settled; CPU while idle (the optimizer's
reconcile loop, the proxy's background poll every `proxy.refresh_interval`); then a load — exporter: scrapes
(sequential, then 8 at once), optimizer: webhook notifications and API reads, proxy: small generate requests
from 16 concurrent clients — with the CPU seconds per request, and the peak RSS (VmHWM) at the end.

Run: `python bench/footprint.py [--idle 20] [--requests 300]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import localstack  # noqa: E402
from cli.localstack import free_port, wait_for  # noqa: E402
from simulator.run import DEMO_FLEET, fleet_from_dict, router_config  # noqa: E402

GENERATE = {"model": "llama3.2:1b", "prompt": "Why is the sky blue?", "stream": False, "options": {"num_predict": 4}}


class Process(localstack.Process):
    """A `gpu-router` subcommand, stopped by its own PID; what it holds and used read from /proc."""

    def __init__(self, log: Path, *args: str) -> None:
        super().__init__([sys.executable, "-m", "cli.main", *args], log, cwd=ROOT)

    def status_mib(self, key: str) -> float:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(tmp: Path, name: str, config: Path) -> tuple[Process, str]:
    port = free_port()
    process = Process(tmp / f"{name}.log", name, "--config", str(config), "--listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{url}/healthz", timeout=1).ok, 60, f"the {name} ({process.tail(3)})")
    return process, url


def load(name: str, url: str, count: int) -> None:
    session = requests.Session()

    def one(i: int) -> None:
        if name == "exporter":
            session.get(f"{url}/metrics", timeout=30).raise_for_status()
        elif name == "optimizer" and i % 2:
            alert = {"status": "firing", "labels": {"alertname": "GPURouterPriorityModelNotOnGPU", "model": "x"}}
            body = {"version": "4", "status": "firing", "alerts": [alert], "groupKey": str(i)}
            session.post(f"{url}/webhook", json=body, timeout=30).raise_for_status()
        elif name == "optimizer":
            session.get(f"{url}/api/v1/status", timeout=30).raise_for_status()
        else:
            session.post(f"{url}/api/generate", data=json.dumps(GENERATE), timeout=60).raise_for_status()

    workers = {"exporter": 8, "optimizer": 4, "proxy": 16}[name]
    if name == "exporter":  # half one after the other, as Prometheus scrapes, half at once
        for i in range(count // 2):
            one(i)
        count -= count // 2
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))


def measure(tmp: Path, name: str, config: Path, idle: float, count: int) -> dict[str, Any]:
    process, url = start(tmp, name, config)
    try:
        time.sleep(2)
        started = process.status_mib("VmRSS")
        cpu = process.cpu_seconds()
        time.sleep(idle)
        idle_cpu = (process.cpu_seconds() - cpu) / idle
        cpu = process.cpu_seconds()
        began = time.monotonic()
        load(name, url, count)
        wall = time.monotonic() - began
        used = process.cpu_seconds() - cpu
        return {
            "service": name,
            "rss_started_mib": round(started, 1),
            "idle_cpu_millicores": round(idle_cpu * 1000, 1),
            "requests": count,
            "load_cpu_millicores": round(used / wall * 1000),
            "cpu_ms_per_request": round(used / count * 1000, 2),
            "rss_after_load_mib": round(process.status_mib("VmRSS"), 1),
            "peak_rss_mib": round(process.status_mib("VmHWM"), 1),
        }
    finally:
        process.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--idle", type=float, default=20, help="seconds of idle measurement per service")
    parser.add_argument("--requests", type=int, default=300, help="requests of the load per service")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        fleet = yaml.safe_load(DEMO_FLEET.read_text())
        fleet["control_port"] = free_port()
        for node in fleet["nodes"]:
            node["port"] = free_port()
        (tmp / "fleet.yaml").write_text(yaml.safe_dump(fleet))
        simulator = Process(tmp / "simulator.log", "simulate", "--fleet", str(tmp / "fleet.yaml"))
        try:
            urls = {n["name"]: f"http://127.0.0.1:{n['port']}" for n in fleet["nodes"]}
            for url in urls.values():
                wait_for(lambda u=url: requests.get(f"{u}/api/version", timeout=1).ok, 30, f"{url}")
            config = router_config(fleet_from_dict(fleet), urls)
            config["proxy"] = {"refresh_interval": 2}
            (tmp / "config.yaml").write_text(yaml.safe_dump(config))
            for service in ("exporter", "optimizer", "proxy"):
                print(json.dumps(measure(tmp, service, tmp / "config.yaml", args.idle, args.requests)), flush=True)
        finally:
            simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
