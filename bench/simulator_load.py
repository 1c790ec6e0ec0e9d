"""The simulator under a replayed trace's load: what a large idle fleet costs, and 1000 requests at once.

Starts one simulator process (`python -m simulator`) with N nodes (default 1000), each with one 24 GiB GPU and
qwen2.5-coder:0.5b loaded, generating T tokens a second (default 20). Prints:

- idle: the process's CPU use over a quiet window (default 5 s), as a share of one core. Goal: ≤ 1 %.
- burst: R requests (default 1000) sent at the same instant, request i to node i mod N (with a slot for each
  of its requests), each asking for K tokens (default 40, so 2 s alone), beside the floor: the same request
  alone, measured in the same run.
  Prints the burst's wall time, throughput, p50 / p95 / max answer times and the simulator's CPU seconds, for
  each of --rounds rounds (default 3; the best counts, as the machine may be busy with other work).
  Goal: every request answered 200 and the burst done within 1.5 × the floor.

Run: `python bench/simulator_load.py [--nodes 1000] [--requests 1000] [--tokens 40] [--token-rate 20] [--idle 5]
[--rounds 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-coder:0.5b"
IDLE_GOAL = 0.01  # of one core
BURST_GOAL = 1.5  # × a lone request's time


def fleet_file(path: Path, nodes: int, token_rate: float, parallel: int) -> None:
    node = {"gpus": [{"vram": "24GiB"}], "models": [MODEL], "token_rate": token_rate, "num_parallel": parallel}
    node["preload"] = [{"model": MODEL, "keep_alive": -1}]
    path.write_text(yaml.safe_dump({"nodes": [{"name": f"n{i:04d}", **node} for i in range(nodes)]}))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(fleet: Path, nodes: int) -> tuple[subprocess.Popen, list[str]]:
    """The simulator process and its nodes' URLs, once every node serves."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "simulator", "--fleet", str(fleet)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    urls = []
    assert proc.stdout is not None
    for line in proc.stdout:
        name, _, value = line.strip().partition(" ")
        if name == "config":
            break
        if name != "control":
            urls.append(value)
    if len(urls) != nodes:
        proc.kill()
        raise SystemExit(f"the simulator started {len(urls)} of {nodes} nodes")
    return proc, urls


async def _one(session: aiohttp.ClientSession, url: str, tokens: int) -> tuple[int, float]:
    body = {"model": MODEL, "prompt": "Write a haiku.", "stream": False, "options": {"num_predict": tokens}}
    began = time.perf_counter()
    async with session.post(url + "/api/generate", json=body) as reply:
        await reply.read()
        return reply.status, time.perf_counter() - began


async def burst(urls: list[str], count: int, tokens: int) -> tuple[list[tuple[int, float]], float]:
    """`count` requests at once, request i to urls[i mod len]: their (status, seconds), and the wall time."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        began = time.perf_counter()
        answers = await asyncio.gather(*(_one(session, urls[i % len(urls)], tokens) for i in range(count)))
        return list(answers), time.perf_counter() - began


def _round(proc: subprocess.Popen, urls: list[str], count: int, tokens: int) -> tuple[float, float, int]:
    """One lone request, then the burst: (floor, burst wall, answered 200); prints the burst's figures."""
    lone, _ = asyncio.run(burst(urls[-1:], 1, tokens))
    ((_, floor),) = lone
    cpu0, client0 = cpu_seconds(proc.pid), time.process_time()
    answers, wall = asyncio.run(burst(urls, count, tokens))
    cpu, client = cpu_seconds(proc.pid) - cpu0, time.process_time() - client0
    ok = sum(status == 200 for status, _ in answers)
    times = sorted(seconds for _, seconds in answers)
    p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
    print(
        f"  floor {floor:.2f} s; burst: {ok}/{count} answered 200, wall {wall:.2f} s ({count / wall:.0f} requests/s, "
        f"{wall / floor:.2f} × the floor), p50 {statistics.median(times):.2f} s, p95 {p95:.2f} s, "
        f"max {times[-1]:.2f} s; simulator CPU {cpu:.1f} s ({cpu / count * 1000:.1f} ms a request), "
        f"client CPU {client:.1f} s"
    )
    return floor, wall, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--token-rate", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle window")
    parser.add_argument("--rounds", type=int, default=3, help="lone request + burst, the best round counts")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet.yaml"
        fleet_file(fleet, args.nodes, args.token_rate, -(-args.requests // args.nodes))
        began = time.perf_counter()
        proc, urls = start(fleet, args.nodes)
        try:
            print(f"{args.nodes} nodes serving after {time.perf_counter() - began:.1f} s")
            time.sleep(1.0)  # let start-up settle
            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            time.sleep(args.idle)
            idle = (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
            print(
                f"idle: {idle:.2%} of a core over {args.idle:.0f} s (goal ≤ {IDLE_GOAL:.0%}: "
                f"{'MET' if idle <= IDLE_GOAL else 'MISSED'})"
            )
            print(f"{args.requests} requests at once over {len(urls)} nodes, {args.tokens} tokens each:")
            rounds = [_round(proc, urls, args.requests, args.tokens) for _ in range(args.rounds)]
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    floor, wall, ok = min(rounds, key=lambda r: r[1] / r[0])
    met = ok == args.requests and wall <= BURST_GOAL * floor
    print(
        f"best round: {wall:.2f} s for the burst, {wall / floor:.2f} × the floor of {floor:.2f} s; goal: all answered "
        f"and within {BURST_GOAL} × the floor: {'MET' if met else 'MISSED'}"
    )
    return 0 if met and idle <= IDLE_GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
