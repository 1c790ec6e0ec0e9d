"""What `gpu-router proxy` costs, in one run.

The simulated fleet and the proxy each run as their own process (`gpu-router simulate`, `gpu-router proxy`);
the clients are aiohttp tasks in this one. Figures:

- overhead: the same small non-streaming generate requests straight to a simulated node and through the
  proxy, p50/p99 of each and the difference, at 1, 50 and 200 concurrent clients, and the proxy's own CPU time
  per request against a bare aiohttp passthrough's (bench/passthrough.py, its own process, the same requests);
  the same for the time to the first byte of a stream; concurrent open streams held without error
  (spread by the proxy over four simulated nodes of 256 slots, Ollama's most per runner), with the proxy's RSS.

What the proxy gains (its routing against a plain load balancer on a replayed trace) is `bench/trace.py`.

Goals: added p99 ≤ 5 ms at 50 concurrent clients; the proxy's CPU per request within 2× the passthrough's in
every case; 1000 concurrent streams.
Run: `python bench/proxy.py [--streams 1000] [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import localstack  # noqa: E402
from cli.localstack import free_port, wait_for  # noqa: E402
from proxy.service import raise_open_files_limit  # noqa: E402

FAST, SLOW = "llama3.2:1b", "qwen2.5-coder:1.5b"


SLOW_NODES = 4  # 256 slots each (Ollama's most): 1024 streams at once


def bench_fleet() -> dict:
    """`fast` answers at once (overhead); `slow-1..4` stream 2 tokens/s (held streams); 256 slots per runner."""
    common = {"gpus": [{"name": "H100", "vram": "512GiB"}], "num_parallel": 256, "context_length": 2048}
    slow = [
        {**common, "name": f"slow-{i}", "port": free_port(), "models": [SLOW], "token_rate": 2,
         "preload": [{"model": SLOW, "keep_alive": -1}]}
        for i in range(1, SLOW_NODES + 1)
    ]  # fmt: skip
    return {
        "control_port": free_port(),
        "nodes": [
            {**common, "name": "fast", "port": free_port(), "models": [FAST], "token_rate": 0,
             "preload": [{"model": FAST, "keep_alive": -1}]},
            *slow,
        ],
    }  # fmt: skip


class Process(localstack.Process):
    """A `gpu-router` subcommand (or, with `script`, a bench script), stopped by its own PID; what it holds read
    from /proc."""

    def __init__(self, log: Path, *args: str, script: str | None = None) -> None:
        command = [str(ROOT / "bench" / script)] if script else ["-m", "cli.main"]
        super().__init__([sys.executable, *command, *args], log, cwd=ROOT)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_fleet(tmp: Path, fleet: dict) -> tuple[Process, dict[str, str]]:
    path = tmp / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    process = Process(tmp / "simulator.log", "simulate", "--fleet", str(path))
    urls = {n["name"]: f"http://127.0.0.1:{n['port']}" for n in fleet["nodes"]}
    for url in urls.values():
        wait_for(lambda u=url: requests.get(f"{u}/api/version", timeout=1).ok, 30, f"{url} ({process.tail(3)})")
    return process, urls


def start_proxy(tmp: Path, config: dict) -> tuple[Process, str]:
    path = tmp / "gpu_router_config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    process = Process(tmp / "proxy.log", "proxy", "--config", str(path), "--listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{url}/healthz", timeout=1).ok, 30, f"the proxy ({process.tail(3)})")
    return process, url


def start_passthrough(tmp: Path, upstream: str) -> tuple[Process, str]:
    """The floor: a bare aiohttp passthrough to `upstream` (bench/passthrough.py), its own process."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    process = Process(tmp / "passthrough.log", "--listen", listen, "--upstream", upstream, script="passthrough.py")
    url = f"http://{listen}"
    wait_for(lambda: requests.get(f"{url}/api/version", timeout=1).ok, 30, f"the passthrough ({process.tail(3)})")
    return process, url


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def latencies(url: str, clients: int, total: int, body: dict, first_byte: bool) -> list[float]:
    """Seconds per request (or to its first byte), `clients` at once over keep-alive connections."""
    results: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        count = iter(range(total))

        async def client() -> None:
            for _ in count:
                started = time.perf_counter()
                async with session.post(f"{url}/api/generate", json=body) as reply:
                    if first_byte:
                        await reply.content.readany()
                        results.append(time.perf_counter() - started)
                        await reply.read()
                    else:
                        await reply.read()
                        results.append(time.perf_counter() - started)
                    assert reply.status == 200, reply.status

        await asyncio.gather(*(client() for _ in range(clients)))
    return results


def idle_cpu(process: Process, seconds: float = 4.0) -> float:
    """`process`'s CPU seconds per second while no request comes (the proxy's polls, timers)."""
    cpu, started = process.cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (process.cpu_seconds() - cpu) / (time.perf_counter() - started)


def cpu_per_request(
    url: str, process: Process, idle: float, clients: int, total: int, body: dict, first: bool
) -> tuple[float, list[float]]:
    """Milliseconds of `process`'s CPU time per request while `total` requests go through `url`, less what it
    spends idle in that time; and the requests' latencies."""
    cpu, started = process.cpu_seconds(), time.perf_counter()
    seconds = asyncio.run(latencies(url, clients, total, body, first))
    used = process.cpu_seconds() - cpu - idle * (time.perf_counter() - started)
    return max(0.0, used) * 1000 / total, seconds


def overhead(direct: str, proxy: str, process: Process, floor: tuple[str, Process], quick: bool) -> list[str]:
    small = {"model": FAST, "prompt": "hi", "stream": False, "options": {"num_predict": 4}}
    stream = {"model": FAST, "prompt": "hi", "options": {"num_predict": 4}}
    lines = [
        "overhead (fast node, instant answers; clients, proxy and simulator share the CPUs): ms; added = proxy − "
        "direct; CPU = the proxy process's CPU time per request (less its idle rate: polls); floor = a bare "
        "aiohttp passthrough's (bench/passthrough.py), the same requests",
        f"{'what':<34}{'clients':>8}{'requests':>9}{'direct p50':>11}{'p99':>8}{'proxy p50':>11}{'p99':>8}"
        f"{'added p50':>11}{'p99':>8}{'CPU':>7}{'floor':>7}{'×':>6}",
    ]
    ratios = []
    idle, floor_idle = idle_cpu(process), idle_cpu(floor[1])
    cases = [("small non-streaming requests", small, False, c) for c in (1, 50, 200)]
    cases += [("time to first byte of a stream", stream, True, c) for c in (1, 50)]
    for what, body, first, clients in cases:
        total = {1: 200, 50: 2000, 200: 4000}[clients] // (4 if quick else 1)
        asyncio.run(latencies(direct, clients, min(total, 100), body, first))  # warm both paths
        asyncio.run(latencies(proxy, clients, min(total, 100), body, first))
        a = [x * 1000 for x in asyncio.run(latencies(direct, clients, total, body, first))]
        cpu, seconds = cpu_per_request(proxy, process, idle, clients, total, body, first)
        b = [x * 1000 for x in seconds]
        asyncio.run(latencies(floor[0], clients, min(total, 100), body, first))
        bare, _ = cpu_per_request(floor[0], floor[1], floor_idle, clients, total, body, first)
        ratios.append(cpu / bare if bare else float("inf"))
        pa, pb = (percentile(a, 50), percentile(a, 99)), (percentile(b, 50), percentile(b, 99))
        lines.append(
            f"{what:<34}{clients:>8}{total:>9}{pa[0]:>11.2f}{pa[1]:>8.2f}{pb[0]:>11.2f}{pb[1]:>8.2f}"
            f"{pb[0] - pa[0]:>11.2f}{pb[1] - pa[1]:>8.2f}{cpu:>7.2f}{bare:>7.2f}{ratios[-1]:>6.2f}"
        )
    worst = max(ratios)
    verdict = "MET" if worst <= 2.0 else "MISSED"
    goal = "the proxy's CPU per request within 2× a bare aiohttp passthrough's"
    lines.append(f"goal {goal}: {verdict} (at most {worst:.2f}×)")
    return lines


async def hold_streams(proxy: str, count: int, hold: float) -> tuple[int, int, int]:
    """Open `count` streams through the proxy at once and keep them open `hold` seconds after the last one
    started: (streams that got their first chunk, streams still open at the end, errors)."""
    body = {"model": SLOW, "prompt": "go", "options": {"num_predict": 100000}}
    started = 0
    errors = 0
    all_started = asyncio.Event()
    release = asyncio.Event()
    open_at_end = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            nonlocal started, errors, open_at_end
            try:
                async with session.post(f"{proxy}/api/generate", json=body) as reply:
                    line = await reply.content.readline()
                    if reply.status != 200 or "error" in json.loads(line):
                        errors += 1
                        return
                    started += 1
                    if started == count:
                        all_started.set()
                    while not release.is_set():
                        line = await asyncio.wait_for(reply.content.readline(), 10)
                        if not line or b'"error"' in line:
                            errors += 1
                            return
                    open_at_end += 1
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                errors += 1

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(all_started.wait(), 120)
        await asyncio.sleep(hold)
        release.set()
        await asyncio.gather(*tasks)
    return started, open_at_end, errors


def streams(proxy: str, process: Process, count: int) -> list[str]:
    before = process.rss_mib()
    peak = [before]

    async def run() -> tuple[int, int, int]:
        async def watch() -> None:
            while True:
                peak[0] = max(peak[0], process.rss_mib())
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        try:
            return await hold_streams(proxy, count, hold=5.0)
        finally:
            watcher.cancel()

    started, still_open, errors = asyncio.run(run())
    return [
        f"concurrent streams through the proxy: {count} opened, {started} streaming at once, {still_open} still "
        f"open after 5 s, {errors} errors; proxy RSS {before:.0f} MiB idle, {peak[0]:.0f} MiB peak"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams to hold (default 1000)")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    raise_open_files_limit()
    out: list[str] = [f"gpu-router proxy benchmark, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"]
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as name:
        tmp = Path(name)
        fleet, urls = start_fleet(tmp, bench_fleet())
        try:
            nodes = [
                {"name": n, "url": u, "gpus": [{"name": "H100", "vram": "512GiB"}], "num_parallel": 256,
                 "context_length": 2048}
                for n, u in urls.items()
            ]  # fmt: skip
            proxy, proxy_url = start_proxy(tmp, {"nodes": nodes, "auto_optimize": False})
            try:
                bare, bare_url = start_passthrough(tmp, urls["fast"])
                try:
                    out += overhead(urls["fast"], proxy_url, proxy, (bare_url, bare), args.quick)
                finally:
                    bare.stop()
                out.append("")
                out += streams(proxy_url, proxy, args.streams)
            finally:
                proxy.stop()
        finally:
            fleet.stop()
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
