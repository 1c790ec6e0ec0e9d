"""The asynchronous poll: per-node deadlines that count the node's time, not this process's; no redirects;
bounded concurrency."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpurouter.cluster.poll import Poller, Target
from simulator.run import Fleet, fleet_from_dict

READS = ("ps", "tags")


def node(name: str, latency_ms: int) -> dict:
    gpus = [{"name": "NVIDIA GeForce RTX 3070", "vram": "8GiB"}]
    return {"name": name, "gpus": gpus, "models": ["all-minilm"], "latency_ms": latency_ms, "token_rate": 0}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    spec = fleet_from_dict({"nodes": [node("fast", 0), node("answers-in-100ms", 100), node("slow", 2000)]})
    with Fleet(spec) as running:
        yield running


@pytest.fixture
def poller(fleet: Fleet) -> Iterator[Poller]:
    poller = Poller(fleet.urls.values())
    yield poller
    poller.close()


def targets(fleet: Fleet, *names: str) -> list[Target]:
    return [Target(name, fleet.urls[name], READS) for name in names]


def test_a_slow_node_is_down_at_its_deadline_and_the_others_are_up(fleet: Fleet, poller: Poller) -> None:
    started = time.monotonic()
    answers = poller.read(targets(fleet, "fast", "slow"), 0.4)
    took = time.monotonic() - started
    assert 0.4 <= took < 1.5, took  # not the slow node's 2 s
    assert answers["fast"].error is None and [m.name for m in answers["fast"].values["tags"]] == ["all-minilm:latest"]
    error = answers["slow"].error
    assert error is not None and error.kind == "timeout" and "no answer within 0.4s" in str(error)
    assert 0.4 <= answers["slow"].seconds < 1.5


def test_a_node_is_not_down_because_this_process_was_late(fleet: Fleet, poller: Poller) -> None:
    """The loop is held for 0.8 s (CPU-heavy work of ours) as the node's turn begins, before its requests go
    out: the 0.3 s deadline passes with nothing sent, and the node, which answers in 100 ms, is still up."""
    real = poller._get
    held: list[float] = []

    async def late(url: str, what: str) -> object:
        if not held:
            held.append(0.8)
            time.sleep(0.8)  # holds the event loop
        return await real(url, what)

    poller._get = late  # type: ignore[method-assign]
    started = time.monotonic()
    answers = poller.read(targets(fleet, "answers-in-100ms"), 0.3)
    assert time.monotonic() - started >= 0.8 + 0.1
    assert answers["answers-in-100ms"].error is None


def test_an_answer_that_arrived_while_this_process_was_busy_is_read(fleet: Fleet, poller: Poller) -> None:
    """The loop is held from 30 ms to 830 ms into the poll: the answer arrives at 100 ms, the 0.3 s deadline
    passes while nothing here can read, and the node is up."""
    poller.read(targets(fleet, "answers-in-100ms"), 2)  # connections open
    poller._loop.call_soon_threadsafe(poller._loop.call_later, 0.03, time.sleep, 0.8)
    answers = poller.read(targets(fleet, "answers-in-100ms"), 0.3)
    assert answers["answers-in-100ms"].error is None


NODE_PROCESS = """
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Node(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        time.sleep(float(sys.argv[1]))
        body = json.dumps({"models": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Node)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture
def node_process() -> Iterator[str]:
    """A node in a process of its own answering in 50 ms, whatever this process does."""
    child = subprocess.Popen([sys.executable, "-c", NODE_PROCESS, "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        yield f"http://127.0.0.1:{child.stdout.readline().strip()}"
    finally:
        child.kill()
        child.wait()


def test_a_node_under_local_cpu_load_is_not_down(node_process: str) -> None:
    """Threads of this process spin the whole time (the GIL contended): the node is up in every poll."""
    poller = Poller([node_process])
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(10_000))

    spinners = [threading.Thread(target=spin) for _ in range(4)]
    for spinner in spinners:
        spinner.start()
    try:
        polls = [poller.read([Target("busy-here", node_process, READS)], 0.5) for _ in range(10)]
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()
        poller.close()
    assert [str(a.error) for answers in polls for a in answers.values() if a.error is not None] == []


def test_concurrency_is_bounded_and_a_deadline_starts_with_the_nodes_turn(fleet: Fleet) -> None:
    one_at_a_time = Poller(fleet.urls.values(), concurrency=1)
    try:
        nodes = [Target(f"copy-{i}", fleet.urls["answers-in-100ms"], READS) for i in range(6)]
        started = time.monotonic()
        answers = one_at_a_time.read(nodes, 0.4)
        took = time.monotonic() - started
    finally:
        one_at_a_time.close()
    assert took >= 6 * 0.1  # one node after the other
    assert all(a.error is None for a in answers.values())  # 0.6 s in all, but each within its own 0.4 s


class _Redirecting(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "/api/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_redirect_is_a_node_error_and_is_not_followed(fleet: Fleet) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    poller = Poller([url])
    try:
        answers = poller.read([Target("moved", url, READS)], 1)
    finally:
        poller.close()
        server.shutdown()
        server.server_close()
    error = answers["moved"].error
    assert error is not None and error.kind == "redirect" and error.status == 302 and "(not followed)" in str(error)
