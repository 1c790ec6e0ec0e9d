"""Time the optimizer's answer to Alertmanager notifications while a model load is running, and its memory.

Starts a simulated fleet with a slow load speed (a GPU node and a CPU node holding a priority model on
CPU), runs `gpu-router optimizer` on it as a subprocess, posts one firing alert so that a long load starts,
and while that load runs sends the same real-shaped notification (each sender on its own connection):
from one sender (the floor), from 50 senders in bursts of 50 at once (what Alertmanager HA pairs and many
alert groups do), and from 50 senders back to back (a flood: answer time = 50 / throughput). Prints
p50/p90/p99/max per phase, whether the load was still running at the end (it must be: otherwise the
figures are not "under load"), how many loads the notifications caused (must be 1), and the optimizer's RSS
(VmRSS, and the peak VmHWM). Goal: p99 < 50 ms.

Run: `python bench/webhook.py [--senders 50] [--requests 40] [--load-seconds 30]`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulator.run import Fleet, fleet_from_dict  # noqa: E402

MODEL = "llama3.1:8b"
SIZE = 6_099_560_448  # its /api/ps size in the simulator at the default context
TOKEN = "bench-token"


def fleet_spec(load_seconds: float) -> dict:
    speed = int(SIZE / load_seconds)
    node = {"port": 0, "ram": "32GiB", "models": [MODEL], "load_speed": speed}
    return {
        "nodes": [
            {**node, "name": "gpu-large", "gpus": [{"name": "NVIDIA GeForce RTX 3070", "vram": "8GiB"}]},
            {**node, "name": "cpu-node", "gpus": [], "preload": [{"model": MODEL, "num_gpu": 0, "keep_alive": -1}]},
        ]
    }


def router_config(urls: dict[str, str]) -> dict:
    return {
        "nodes": [
            {"name": "gpu-large", "url": urls["gpu-large"], "vram": "8GiB"},
            {"name": "cpu-node", "url": urls["cpu-node"], "vram": 0},
        ],
        "priority_models": [MODEL],
        "check_interval": 3600,
        "log_level": "INFO",
        "optimizer": {"webhook_auth": {"bearer_token": TOKEN}, "load_timeout": 600},
    }


def notification() -> dict:
    labels = {"alertname": "GPURouterPriorityModelOnCPU", "model": MODEL, "node": "cpu-node", "severity": "critical"}
    return {
        "receiver": "optimizer",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"summary": "A priority model runs on CPU."},
                "startsAt": "2026-11-26T20:12:01.544808118Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://127.0.0.1:9090/graph",
                "fingerprint": "c7a56ec958c85754",
            }
        ],
        "groupLabels": {"alertname": labels["alertname"]},
        "commonLabels": labels,
        "commonAnnotations": {"summary": "A priority model runs on CPU."},
        "externalURL": "http://127.0.0.1:9093",
        "version": "4",
        "groupKey": '{}:{alertname="GPURouterPriorityModelOnCPU", model="llama3.1:8b", node="cpu-node"}',
        "truncatedAlerts": 0,
    }


class Optimizer:
    """The optimizer as a child process, its log written to a file (reading a pipe would cost the senders)."""

    def __init__(self, config: Path, log: Path) -> None:
        command = [sys.executable, "-m", "cli.main", "optimizer", "--config", str(config)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = log
        with log.open("w") as sink:
            self.proc = subprocess.Popen(
                [*command, "--listen", "127.0.0.1:0"], cwd=ROOT, env=env, stderr=sink, text=True
            )
        self.url = self._wait_url(30.0)

    def _wait_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.log.read_text().splitlines():
                if "event=listening" in line:
                    return line.split("url=", 1)[1].split()[0]
            time.sleep(0.05)
        raise SystemExit(f"the optimizer did not start:\n{self.log.read_text()}")

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM in KiB, from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def job_running(url: str) -> bool:
    jobs = requests.get(url + "/api/v1/actions", timeout=5).json()["jobs"]
    return any(j["model"] == MODEL and j["state"] == "running" for j in jobs)


def send(url: str, body: bytes, count: int, rounds: threading.Barrier, burst: bool, out: list[float]) -> None:
    """One sender on its own keep-alive connection (http.client: the lightest client, so that the figures
    are the optimizer's rather than a client library's): `count` notifications, back to back, or with
    `burst` each one at the same moment as every other sender's (a barrier before each)."""
    parts = urlsplit(url)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("POST", "/webhook", body, headers)  # connect outside the timing
        conn.getresponse().read()
        rounds.wait()
        for _ in range(count):
            if burst:
                rounds.wait()
            began = time.perf_counter()
            conn.request("POST", "/webhook", body, headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 202:
                raise SystemExit(f"the optimizer answered {answer.status}: {answer.read()[:200]!r}")
            out.append(time.perf_counter() - began)
    finally:
        conn.close()


def run(url: str, body: bytes, senders: int, count: int, burst: bool) -> tuple[list[float], float]:
    """Answer times (ms) of `senders` × `count` notifications, and the wall time they took."""
    times: list[float] = []
    rounds = threading.Barrier(senders)
    threads = [threading.Thread(target=send, args=(url, body, count, rounds, burst, times)) for _ in range(senders)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(times) != senders * count:
        raise SystemExit("a sender failed")
    return [t * 1000 for t in times], time.perf_counter() - began


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(name: str, times: list[float], wall: float) -> str:
    p99 = percentile(times, 99)
    return (
        f"{name:<30} {len(times):5d} answers, {len(times) / wall:5.0f}/s:"
        f"  p50 {statistics.median(times):5.1f} ms  p90 {percentile(times, 90):5.1f} ms"
        f"  p99 {p99:5.1f} ms  max {max(times):5.1f} ms  (goal p99 < 50 ms: {'met' if p99 < 50 else 'MISSED'})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--senders", type=int, default=50)
    parser.add_argument("--requests", type=int, default=40, help="notifications per sender and phase")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="how long the simulated load takes")
    args = parser.parse_args()

    with Fleet(fleet_from_dict(fleet_spec(args.load_seconds))) as fleet, tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gpu_router_config.yaml"
        config.write_text(yaml.safe_dump(router_config(fleet.urls)))
        optimizer = Optimizer(config, Path(tmp) / "optimizer.log")
        try:
            idle = optimizer.memory()
            body = json.dumps(notification()).encode()
            first = requests.post(
                optimizer.url + "/webhook",
                data=body,
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                timeout=10,
            )
            assert first.status_code == 202, first.text
            deadline = time.monotonic() + 10
            while not job_running(optimizer.url):
                if time.monotonic() > deadline:
                    raise SystemExit("the load did not start")
                time.sleep(0.05)
            single, single_wall = run(optimizer.url, body, 1, 200, burst=False)
            bursts, bursts_wall = run(optimizer.url, body, args.senders, args.requests, burst=True)
            flood, flood_wall = run(optimizer.url, body, args.senders, args.requests, burst=False)
            still_loading = job_running(optimizer.url)
            busy = optimizer.memory()
            loads = fleet.node("gpu-large").counts().get(MODEL, {}).get("loads", 0)
        finally:
            optimizer.stop()

    print(f"webhook answer time while a {args.load_seconds:g} s load runs ({args.senders} concurrent senders):")
    print("  " + report("1 sender, back to back", single, single_wall))
    print("  " + report(f"{args.senders} senders, all at once", bursts, bursts_wall))
    print("  " + report(f"{args.senders} senders, back to back", flood, flood_wall))
    print(f"  the load was still running at the end: {still_loading}; loads caused by all notifications: {loads}")
    print(
        f"optimizer RSS: {idle['VmRSS'] / 1024:.1f} MiB idle, {busy['VmRSS'] / 1024:.1f} MiB after the runs, "
        f"peak {busy['VmHWM'] / 1024:.1f} MiB"
    )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs shared by the senders, the optimizer and the fleet; load average {load}")
    return 0 if still_loading and loads == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
