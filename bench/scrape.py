"""The exporter at fleet scale: `/metrics` scrapes of fake fleets against a minimal asyncio poller.

Fake fleets (bench/fakefleet.py: one process serving, from many ports, byte for byte what a simulated node
answers; each node with 5 models installed, 2 loaded) of 10, 100, 500 and 1000 nodes answering after 20, 50 and
100 ms. For each latency, one exporter per size (`gpu-router exporter` subprocesses, default
`request_timeout: 2`) and, in the same run, the floor: a minimal asyncio poller (aiohttp, one loop, the same two
reads per node a scrape makes, `/api/ps` and `/api/tags`, JSON decoded). They alternate in interleaved rounds
(every size, floor then scrape, once per round); each figure is the median with the range over the rounds:
scrape and floor wall time, CPU per node per scrape (the exporter's from /proc, the floor's own), whether every
node was up in every scrape. Then 50 scrapes of 1000 nodes at 100 ms while a busy loop spins on one core,
counting nodes reported down (every node answers: each one is a false "node down"), and the 1000-node
exporter's peak RSS.

Goals: scrape ≤ 1.5 × the floor at every size and latency; 1000 nodes × 100 ms scraped in ≤ 1 s; 0 false
downs in the 50 scrapes under load; RSS ≤ 100 MiB at 1000 nodes. Exits 1 when it measured nothing (no
scrape, or a scrape without node series).

Run: `python bench/scrape.py [--rounds 3] [--sizes 10,100,500,1000] [--latencies 20,50,100]
[--load-scrapes 50]`; a short look: `--sizes 100 --latencies 20 --rounds 1 --load-scrapes 0`.

`--burst N` sends N scrapes at the same instant instead, each on a connection of its own (what many
Prometheus servers, or a retry storm, do), and prints how many were answered, refused or reset, or timed out
(after `--client-timeout` seconds), and the p50 / p95 / max answer times. Goal: every scrape answered, none
refused. E.g. `python bench/scrape.py --burst 200 --nodes 3 --latency-ms 20`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fakefleet import canned  # noqa: E402
from simulator.run import Fleet, fleet_from_dict  # noqa: E402

MODELS = ("all-minilm", "nomic-embed-text", "mxbai-embed-large", "qwen2.5-coder:0.5b", "llama3.2:1b")
PROMETHEUS_ACCEPT = (  # what Prometheus asks for: OpenMetrics first
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
UP = re.compile(rb"^gpu_router_node_up\{[^}]*\} (\S+)$", re.M)
FLOOR_RATIO, BIG_SCRAPE, RSS_GOAL_MIB = 1.5, 1.0, 100.0


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


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------- the floor


async def floor_poll(session: aiohttp.ClientSession, urls: list[str]) -> float:
    """The minimal poller: every node's /api/ps and /api/tags at once, JSON decoded; its wall time."""

    async def read(url: str) -> object:
        async with session.get(url) as answer:
            return json.loads(await answer.read())

    started = time.perf_counter()
    await asyncio.gather(*(read(url + path) for url in urls for path in ("/api/ps", "/api/tags")))
    return time.perf_counter() - started


class Floor:
    """The floor's event loop and session, kept across rounds (as the exporter keeps its connections)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.session = self.loop.run_until_complete(self._open())

    @staticmethod
    async def _open() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    def poll(self, urls: list[str]) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of one poll."""
        cpu = time.process_time()
        wall = self.loop.run_until_complete(floor_poll(self.session, urls))
        return wall, time.process_time() - cpu

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


# ------------------------------------------------------------------------------------------- the exporter


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads so far, to the nanosecond (/proc/PID/task/*/schedstat; the
    exporter's threads live as long as it does)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


@dataclass
class Exporter:
    """One exporter subprocess observing the first `nodes` nodes of a fake fleet."""

    nodes: int
    process: subprocess.Popen[bytes]
    url: str
    session: requests.Session = field(default_factory=requests.Session)

    def scrape(self) -> tuple[float, float, int, int]:
        """(wall seconds, exporter CPU seconds, node series, nodes down) of one scrape."""
        cpu = cpu_seconds(self.process.pid)
        started = time.perf_counter()
        answer = self.session.get(f"{self.url}/metrics", headers={"Accept": PROMETHEUS_ACCEPT}, timeout=60)
        wall = time.perf_counter() - started
        answer.raise_for_status()
        ups = UP.findall(answer.content)
        return wall, cpu_seconds(self.process.pid) - cpu, len(ups), sum(float(v) == 0 for v in ups)


@contextlib.contextmanager
def exporters(urls: dict[str, str], sizes: list[int], timeout: float, tmp: Path) -> Iterator[dict[int, Exporter]]:
    """One exporter per size, each started on the first `size` nodes, all stopped at the end."""
    started: dict[int, Exporter] = {}
    try:
        for size in sizes:
            config = tmp / f"config-{size}.yaml"
            chosen = dict(list(urls.items())[:size])
            config.write_text(yaml.safe_dump(router_config(chosen, timeout)))
            process, url = start_exporter(config, tmp / f"exporter-{size}.log")
            started[size] = Exporter(size, process, url)
        yield started
    finally:
        for exporter in started.values():
            exporter.process.send_signal(signal.SIGTERM)
        for exporter in started.values():
            try:
                exporter.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                exporter.process.kill()
                exporter.process.wait()


@contextlib.contextmanager
def fake_fleet(answers: Path, nodes: int, latency_ms: int) -> Iterator[dict[str, str]]:
    """bench/fakefleet.py serving `nodes` nodes; their URLs by name."""
    command = [sys.executable, str(ROOT / "bench" / "fakefleet.py"), str(answers)]
    command += ["--nodes", str(nodes), "--latency-ms", str(latency_ms)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("ready "):
            raise SystemExit(f"the fake fleet did not start: {line!r}")
        yield json.loads(line.removeprefix("ready "))
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def busy_loop_on_one_core() -> Iterator[None]:
    """A process that spins on CPU 0 (or wherever it may run) until the block ends."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(spinner.pid, {0})
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


# -------------------------------------------------------------------------------------------- measuring


@dataclass
class Figures:
    """One (latency, size): per round, the floor's and the scrape's wall and CPU, and nodes down."""

    floor_wall: list[float] = field(default_factory=list)
    floor_cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    down: int = 0
    series: list[int] = field(default_factory=list)


def spread(values: list[float], scale: float = 1000.0, digits: int = 0) -> str:
    """`median (min–max)`, scaled (ms by default)."""
    if not values:
        return "—"
    low, mid, high = (scale * v for v in (min(values), statistics.median(values), max(values)))
    return f"{mid:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def measure(args: argparse.Namespace, answers: Path, tmp: Path) -> tuple[dict[tuple[int, int], Figures], dict]:
    """The interleaved rounds at every latency; then, at the largest size and latency, the scrapes under load
    and the exporter's peak RSS."""
    figures: dict[tuple[int, int], Figures] = {}
    extra: dict = {}
    biggest = max(args.sizes)
    for latency in args.latencies:
        with fake_fleet(answers, biggest, latency) as urls, exporters(urls, args.sizes, args.timeout, tmp) as running:
            floor = Floor()
            try:
                for size, exporter in running.items():  # warm-up: connections, /api/show once per digest
                    exporter.scrape()
                    exporter.scrape()
                    floor.poll(list(urls.values())[:size])
                for _ in range(args.rounds):
                    for size, exporter in running.items():
                        each = figures.setdefault((latency, size), Figures())
                        wall, cpu = floor.poll(list(urls.values())[:size])
                        each.floor_wall.append(wall)
                        each.floor_cpu.append(cpu / size)
                        wall, cpu, series, down = exporter.scrape()
                        each.wall.append(wall)
                        each.cpu.append(cpu / size)
                        each.series.append(series)
                        each.down += down
            finally:
                floor.close()
            if latency == max(args.latencies) and args.load_scrapes:
                exporter = running[biggest]
                with busy_loop_on_one_core():
                    loaded = [exporter.scrape() for _ in range(args.load_scrapes)]
                extra["load"] = loaded
            if latency == max(args.latencies):
                extra["rss"] = peak_rss_mb(running[biggest].process.pid)
                extra["threads"] = len(os.listdir(f"/proc/{running[biggest].process.pid}/task"))
    return figures, extra


def report(args: argparse.Namespace, figures: dict[tuple[int, int], Figures], extra: dict) -> int:
    print(f"rounds: {args.rounds}, interleaved; each figure: median (min–max) over the rounds; request_timeout "
          f"{args.timeout:g} s")  # fmt: skip
    print(f"{'latency':>7} {'nodes':>5} {'scrape ms':>18} {'floor ms':>18} {'ratio':>5} "
          f"{'CPU/node ms':>17} {'floor CPU/node':>17} {'down':>4}")  # fmt: skip
    worst = 0.0
    measured = True
    for (latency, size), each in sorted(figures.items()):
        ratio = statistics.median(each.wall) / statistics.median(each.floor_wall)
        worst = max(worst, ratio)
        measured = measured and bool(each.series) and min(each.series) == size
        print(
            f"{latency:>5}ms {size:>5} {spread(each.wall):>18} {spread(each.floor_wall):>18} {ratio:>5.2f} "
            f"{spread(each.cpu, digits=2):>17} {spread(each.floor_cpu, digits=2):>17} {each.down:>4}"
        )
    if not figures or not measured:
        print("FAILED: a scrape had no series for some node: nothing was measured")
        return 1
    verdict = {True: "MET", False: "MISSED"}
    print(
        f"goal scrape ≤ {FLOOR_RATIO:g} × the floor at every size and latency: worst {worst:.2f} × "
        f"{verdict[worst <= FLOOR_RATIO]}"
    )
    downs = sum(each.down for each in figures.values())
    print(f"every node up in every timed scrape: {downs} reported down {verdict[downs == 0]}")
    key = (max(args.latencies), max(args.sizes))
    if key == (100, 1000):
        big = statistics.median(figures[key].wall)
        print(
            f"goal 1000 nodes × 100 ms scraped in ≤ {BIG_SCRAPE:g} s: median {big:.2f} s {verdict[big <= BIG_SCRAPE]}"
        )
    if "load" in extra:
        loaded = extra["load"]
        false = sum(down for _, _, _, down in loaded)
        bad = sum(1 for _, _, _, down in loaded if down)
        walls = [wall for wall, _, _, _ in loaded]
        print(
            f"goal 0 false downs in {len(loaded)} scrapes of {key[1]} nodes × {key[0]} ms beside a busy loop on one "
            f"core: {false} nodes reported down, in {bad} of them (scrape {spread(walls)} ms) {verdict[false == 0]}"
        )
    if "rss" in extra:
        rss = extra["rss"]
        print(
            f"goal RSS ≤ {RSS_GOAL_MIB:g} MiB at {key[1]} nodes: peak {rss:.1f} MiB, {extra['threads']} threads "
            f"{verdict[rss <= RSS_GOAL_MIB]}"
        )
    return 0


def sizes(text: str) -> list[int]:
    values = [positive(part) for part in text.split(",")]
    return sorted(set(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--sizes", type=sizes, default=[10, 100, 500, 1000], help="fleet sizes (default 10,100,500,1000)"
    )
    parser.add_argument(
        "--latencies", type=sizes, default=[20, 50, 100], help="node latencies in ms (default 20,50,100)"
    )
    parser.add_argument("--rounds", type=positive, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--load-scrapes", type=int, default=50, help="scrapes beside the busy loop (0: none)")
    parser.add_argument("--timeout", type=float, default=2.0, help="the exporter's request_timeout")
    parser.add_argument("--burst", type=positive, help="send this many scrapes at once instead (see above)")
    parser.add_argument("--nodes", type=positive, default=100, help="--burst: simulated nodes")
    parser.add_argument("--latency-ms", type=positive, default=100, help="--burst: their latency")
    parser.add_argument("--models", type=int, choices=range(len(MODELS) + 1), default=2, help="models loaded per node")
    parser.add_argument("--client-timeout", type=float, default=30.0, help="a burst scrape's client timeout (s)")
    args = parser.parse_args()
    if args.burst:
        return main_burst(args)
    with tempfile.TemporaryDirectory() as tmp:
        answers = Path(tmp) / "answers.json"
        answers.write_text(json.dumps(canned(fleet_spec(1, 0, args.models)["nodes"][0])))
        figures, extra = measure(args, answers, Path(tmp))
    return report(args, figures, extra)


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
