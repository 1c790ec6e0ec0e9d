"""The shared waitress setup (gpurouter.serve.wsgiserve) with descriptors numbered above 1024, as a process
that polls a thousand nodes holds: it keeps answering, and a loop that dies all the same stops the process."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from gpurouter.cluster.config import parse_config
from gpurouter.serve import wsgiserve
from gpurouter.serve.wsgiserve import serve


@contextlib.contextmanager
def descriptors_above(number: int) -> Iterator[None]:
    """Hold open sockets until the next descriptor the process opens is numbered above `number`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < number + 64:
        pytest.skip(f"the open files limit ({hard}) is below {number + 64}")
    if soft != resource.RLIM_INFINITY and soft < number + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (number + 64, hard))
    held: list[socket.socket] = []
    try:
        while not held or held[-1].fileno() < number:
            held.extend(socket.socketpair())
        yield
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def test_serves_with_descriptors_above_1024() -> None:
    with descriptors_above(1100):
        served = serve(hello, "127.0.0.1", 0, name="test", threads=2)
        try:
            for _ in range(3):
                assert requests.get(served.url, timeout=5).text == "hello"
            assert served.failure is None
        finally:
            served.stop()


def test_exporter_metrics_with_descriptors_above_1024() -> None:
    from exporter.server import start_exporter

    config = parse_config(
        {"nodes": [{"name": "a", "url": "http://127.0.0.1:9", "vram": "8GiB"}], "request_timeout": 0.5}
    )
    with descriptors_above(1100):
        server, thread = start_exporter(config)
        try:
            answer = requests.get(f"{server.url}/metrics", timeout=10)
            assert answer.status_code == 200
            assert "gpu_router_node_up" in answer.text
        finally:
            server.stop()
            thread.join(5)


def test_a_loop_that_dies_stops_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The I/O loop raising is logged and ends in SIGTERM to this process (its main then stops and exits 1)."""
    signals: list[int] = []
    died = threading.Event()

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("filedescriptor out of range in select()")

    def kill(pid: int, sig: int) -> None:
        assert pid == os.getpid()
        signals.append(sig)
        died.set()

    monkeypatch.setattr(wsgiserve.wasyncore, "loop", fail)
    monkeypatch.setattr(wsgiserve.os, "kill", kill)
    served = serve(hello, "127.0.0.1", 0, name="test", threads=1)
    try:
        assert died.wait(5)
        assert signals == [signal.SIGTERM]
        assert isinstance(served.failure, ValueError)
        assert served.serving  # until stop() is called: the optimizer's stop still runs in full
    finally:
        served.stop()
    assert not served.serving
