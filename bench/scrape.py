"""Time a full `/metrics` scrape of the exporter against a simulated fleet, and its peak memory.

Starts N simulated nodes (default 100), each answering after L ms (default 100) with M models loaded
(default 2), runs `gpu-router exporter` on them as a subprocess, and prints: the median wall time of a
scrape, the median of a sequential poll of the same fleet (version, ps and tags of one node after the other:
what a naive exporter does), their ratio, the number of series, and the exporter's peak RSS (VmHWM).
Goals: median scrape ≤ 2 × L for 100 nodes, RSS ≤ 60 MB.

Run: `python bench/scrape.py [--nodes 100] [--latency-ms 100] [--models 2] [--scrapes 10]`.

`--burst N` sends N scrapes at the same instant instead, each on a connection of its own (what many
Prometheus servers, or a retry storm, do), and prints how many were answered, refused or reset, or timed out
(after `--client-timeout` seconds), and the p50 / p95 / max answer times. Goal: every scrape answered, none
refused. E.g. `python bench/scrape.py --burst 200 --nodes 3 --latency-ms 20`.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpurouter.cluster.ollama import OllamaClient  # noqa: E402
from simulator.run import Fleet, fleet_from_dict  # noqa: E402

MODELS = ("all-minilm", "nomic-embed-text", "mxbai-embed-large", "qwen2.5-coder:0.5b", "llama3.2:1b")


def fleet_spec(nodes: int, latency_ms: int, loaded: int) -> dict:
    """N nodes with one 24 GiB GPU, the five small catalog models installed and `loaded` of them pinned."""
    return {
        "nodes": [
            {
                "name": f"node-{i:03d}",
                "port": 0,
                "gpus": [{"name": "NVIDIA RTX A5000", "vram": "24GiB"}],
                "ram": "64GiB",
                "models": list(MODELS),
                "latency_ms": latency_ms,
                "max_loaded_models": max(3, loaded),
                "preload": [{"model": m, "keep_alive": -1} for m in MODELS[:loaded]],
            }
            for i in range(nodes)
        ]
    }


def router_config(urls: dict[str, str], timeout: float) -> dict:
    return {
        "nodes": [{"name": name, "url": url, "vram": "24GiB"} for name, url in urls.items()],
        "priority_models": ["mxbai-embed-large", "llama3.1:latest"],
        "request_timeout": timeout,
        "log_level": "INFO",
    }


def start_exporter(config_path: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`gpu-router exporter` on an ephemeral port, logging to `log_path`; returns the process and its URL."""
    command = [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())"]
    command += ["exporter", "--config", str(config_path), "--listen", "127.0.0.1:0"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        match = re.search(r"event=listening url=(http://\S+)/metrics", log_path.read_text(errors="replace"))
        if match:
            return process, match.group(1)
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise SystemExit(f"the exporter did not start:\n{log_path.read_text(errors='replace')}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape_times(url: str, count: int) -> tuple[list[float], int]:
    """Wall times of `count` scrapes (after a warm-up), and the series in the last one."""
    session = requests.Session()
    session.get(f"{url}/metrics", timeout=30).raise_for_status()  # warm-up: /api/show once per digest
    times = []
    text = ""
    for _ in range(count):
        started = time.perf_counter()
        response = session.get(f"{url}/metrics", timeout=30)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
        text = response.text
    return times, sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def burst(url: str, count: int, timeout: float) -> tuple[list[float], dict[str, int], int]:
    """`count` scrapes released at once, one connection each: answer times of the answered ones, how many ended
    in each outcome (answered, refused or reset, timeout), and how many connections took ≥ 1 s to open (the
    kernel dropped their SYN because the listen backlog was full, and the client sent it again)."""
    requests.get(f"{url}/metrics", timeout=30).raise_for_status()  # warm-up: /api/show once per digest
    host, port = url.removeprefix("http://").rsplit(":", 1)
    gate = threading.Barrier(count)

    def one(_: int) -> tuple[str, float, float]:
        gate.wait()
        started = time.perf_counter()
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        connected = started
        try:
            connection.connect()
            connected = time.perf_counter()
            connection.request("GET", "/metrics")
            answer = connection.getresponse()
            answer.read()
            outcome = "answered" if answer.status == 200 else f"HTTP {answer.status}"
        except TimeoutError:
            outcome = "timeout"
        except OSError:
            outcome = "refused or reset"
        finally:
            connection.close()
        return outcome, time.perf_counter() - started, connected - started

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    outcomes: dict[str, int] = {}
    for outcome, _, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    answered = sorted(took for outcome, took, _ in results if outcome == "answered")
    return answered, outcomes, sum(1 for _, _, connect in results if connect >= 1.0)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, math.ceil(fraction * len(sorted_values)) - 1)]


def sequential_times(urls: dict[str, str], count: int, timeout: float) -> list[float]:
    """The baseline: the same reads as one poll, one node after the other."""
    clients = [OllamaClient(url, connect_timeout=timeout, read_timeout=timeout) for url in urls.values()]
    times = []
    for _ in range(count):
        started = time.perf_counter()
        for client in clients:
            client.version()
            client.ps()
            client.tags()
        times.append(time.perf_counter() - started)
    for client in clients:
        client.close()
    return times


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--nodes", type=positive, default=100)
    parser.add_argument("--latency-ms", type=positive, default=100)
    parser.add_argument("--models", type=int, choices=range(len(MODELS) + 1), default=2, help="models loaded per node")
    parser.add_argument("--scrapes", type=positive, default=10)
    parser.add_argument("--baseline-runs", type=positive, default=1, help="sequential polls for the baseline")
    parser.add_argument("--timeout", type=float, default=2.0, help="the exporter's request_timeout")
    parser.add_argument("--burst", type=positive, help="send this many scrapes at once instead (see above)")
    parser.add_argument("--client-timeout", type=float, default=30.0, help="a burst scrape's client timeout (s)")
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    if args.burst:
        return main_burst(args)

    with Fleet(fleet_from_dict(fleet_spec(args.nodes, args.latency_ms, args.models))) as fleet:
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp) / "gpu_router_config.yaml"
            config_path.write_text(yaml.safe_dump(router_config(fleet.urls, args.timeout)))
            process, url = start_exporter(config_path, Path(tmp) / "exporter.log")
            try:
                scrapes, series = scrape_times(url, args.scrapes)
                rss = peak_rss_mb(process.pid)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=10)
        sequential = sequential_times(fleet.urls, args.baseline_runs, args.timeout)

    scrape, baseline = statistics.median(scrapes), statistics.median(sequential)
    print(f"fleet: {args.nodes} nodes, {args.latency_ms} ms latency, {args.models} models loaded per node")
    spread = f"(min {min(scrapes) * 1000:.1f}, max {max(scrapes) * 1000:.1f})"
    print(f"median scrape:          {scrape * 1000:8.1f} ms  {spread}")
    print(f"median sequential poll: {baseline * 1000:8.1f} ms")
    print(f"ratio sequential/scrape: {baseline / scrape:7.1f}x")
    print(f"series per scrape:      {series:8d}")
    print(f"exporter peak RSS:      {rss:8.1f} MB")
    scrape_ok, rss_ok = scrape <= 2 * latency, rss <= 60
    print(f"goal scrape ≤ 2 × L ({2 * args.latency_ms} ms): {'met' if scrape_ok else 'MISSED'}")
    print(f"goal RSS ≤ 60 MB: {'met' if rss_ok else 'MISSED'}")
    return 0


def main_burst(args: argparse.Namespace) -> int:
    spec = fleet_from_dict(fleet_spec(args.nodes, args.latency_ms, args.models))
    with Fleet(spec) as fleet, tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "gpu_router_config.yaml"
        config_path.write_text(yaml.safe_dump(router_config(fleet.urls, args.timeout)))
        process, url = start_exporter(config_path, Path(tmp) / "exporter.log")
        try:
            started = time.perf_counter()
            times, outcomes, slow_connects = burst(url, args.burst, args.client_timeout)
            wall = time.perf_counter() - started
            threads = len(os.listdir(f"/proc/{process.pid}/task"))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
    print(f"fleet: {args.nodes} nodes, {args.latency_ms} ms latency; {args.burst} scrapes at once")
    print("outcomes:               " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(
        f"answer time:            p50 {percentile(times, 0.5):.2f} s, p95 {percentile(times, 0.95):.2f} s, "
        f"max {times[-1] if times else float('nan'):.2f} s; all done in {wall:.2f} s"
    )
    print(f"connections that took ≥ 1 s to open (SYN dropped, backlog full): {slow_connects}")
    print(f"exporter threads after: {threads}")
    ok = outcomes.get("answered", 0) == args.burst and not slow_connects
    print(f"goal every scrape answered, no connection refused or held back: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
