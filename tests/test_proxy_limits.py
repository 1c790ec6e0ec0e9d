"""The proxy against hostile peers: a node that redirects, clients that never finish their request, bodies that
would fill memory, malformed requests. Everything on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time

import pytest
import requests
from test_proxy import SMALL, metric, stack

from cli.localstack import wait_for
from gpurouter.units import MIB
from proxy import limits
from proxy.service import ProxyHandle
from simulator.httpserver import Response


def test_a_node_that_redirects_is_a_failed_node_and_its_target_is_never_contacted():
    canary = socket.create_server(("127.0.0.1", 0))
    canary.setblocking(False)
    target = f"http://127.0.0.1:{canary.getsockname()[1]}/api/generate"
    try:
        with stack() as (fleet, proxy):
            server = fleet.node("gpu")._server._server
            assert server is not None
            app = server.app
            server.app = lambda request: (
                Response(307, b"", "text/plain", {"Location": target})
                if request.path == "/api/generate"
                else app(request)
            )
            reply = requests.post(
                f"{proxy.url}/api/generate", json={"model": SMALL, "prompt": "x", "stream": False}, timeout=30
            )
            assert reply.status_code == 200 and reply.json()["eval_count"] == 24
            assert fleet.node("cpu").traffic.counts()["served"] == 1
            assert metric(proxy, "gpu_router_proxy_upstream_errors_total", node="gpu", kind="redirect") == 1
            fleet.node("cpu").inject("down")
            reply = requests.post(f"{proxy.url}/api/generate", json={"model": SMALL, "prompt": "x"}, timeout=30)
            assert reply.status_code == 503  # every node failed: 503 naming them (issue 19)
            assert f"node answered a redirect to {target} (not followed)" in reply.json()["error"]
        try:
            canary.accept()
            raise AssertionError("the redirect's target was contacted")
        except BlockingIOError:
            pass
    finally:
        canary.close()


def connect(proxy: ProxyHandle, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def answer(sock: socket.socket) -> bytes:
    """Everything the proxy sends until it closes the connection (b"" when it closes without a word)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_connection_that_never_finishes_its_headers_is_closed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(limits, "HEADER_TIMEOUT", 0.5)
    with stack() as (_, proxy):
        began = time.monotonic()
        silent = [connect(proxy) for _ in range(20)]
        partial = [connect(proxy, b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Le") for _ in range(20)]
        for sock in silent + partial:
            assert answer(sock) == b""
            sock.close()
        assert time.monotonic() - began < 8
        assert requests.get(f"{proxy.url}/api/version", timeout=5).status_code == 200


def test_a_body_that_never_arrives_gets_408(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(limits, "BODY_TIMEOUT", 0.5)
    with stack() as (fleet, proxy):
        head = (
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        sock = connect(proxy, head + b'{"model":')
        reply = answer(sock)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert b"request body not received within 0.5s" in reply
        assert fleet.node("gpu").traffic.counts()["served"] == 0


def test_bodies_held_at_once_stay_within_the_budget(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(limits, "BODY_BUDGET", MIB)
    with stack(proxy={"max_body": "400KiB"}) as (_, proxy):
        body = json.dumps({"model": SMALL, "prompt": "x" * (300 * 1024), "stream": False}).encode()
        head = (
            f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        held = [connect(proxy, head + body[:1000]) for _ in range(3)]  # 3 × 300 KiB of the 1 MiB budget
        wait_for(lambda: proxy.running.proxy.bodies.held >= 3 * len(body), 10, "three bodies being read")
        refused = connect(proxy, head + body)
        reply = answer(refused)
        refused.close()
        assert reply.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in reply
        assert b"MiB of request bodies" in reply
        for sock in held:
            sock.sendall(body[1000:])
            assert answer(sock).startswith(b"HTTP/1.1 200 ")
            sock.close()
        wait_for(lambda: proxy.running.proxy.bodies.held == 0, 10, "the budget given back")
        reply = requests.post(f"{proxy.url}/api/generate", data=body, timeout=30)
        assert reply.status_code == 200


def test_connections_beyond_the_limit_are_answered_503_and_closed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(limits, "connection_limit", lambda: 5)
    with stack() as (_, proxy):
        held = [connect(proxy) for _ in range(5)]
        wait_for(lambda: len(proxy.running.runner.server.connections) == 5, 10, "five connections open")
        extra = connect(proxy, b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = answer(extra)
        extra.close()
        assert reply.startswith(b"HTTP/1.1 503 ") and b"Content-Length: 56\r\n" in reply
        assert reply.endswith(b'\r\n\r\n{"error":"too many connections to the gpu-router proxy"}')
        for sock in held:
            sock.close()
        wait_for(lambda: not proxy.running.runner.server.connections, 10, "the connections closed")
        assert requests.get(f"{proxy.url}/api/version", timeout=5).status_code == 200


def test_a_malformed_request_is_one_warning_line(caplog: pytest.LogCaptureFixture):
    with stack() as (_, proxy):
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            for raw in (
                b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
            ):
                sock = connect(proxy, raw)
                assert answer(sock).split(b" ", 2)[1] == b"400"
                sock.close()
            wait_for(lambda: len([r for r in caplog.records if "proxy.bad_request" in r.getMessage()]) == 2, 5, "2")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    lines = [r for r in caplog.records if "proxy.bad_request" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING] * 2
    assert all("\n" not in r.getMessage() for r in lines)


def test_accept_errors_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture):
    now = [0.0]
    handle = limits.accept_errors(clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        error = OSError(errno.EMFILE, "Too many open files")
        context = {"message": "socket.accept() out of system resource", "exception": error}
        with caplog.at_level(logging.WARNING):
            for _ in range(1000):
                handle(loop, context)
            now[0] = limits.ACCEPT_LOG_INTERVAL
            handle(loop, context)
            handle(loop, {"message": "something else", "exception": ValueError("x")})
    finally:
        loop.close()
    accepts = [r.getMessage() for r in caplog.records if "proxy.accept" in r.getMessage()]
    assert len(accepts) == 2 and "same_errors_left_out=999" in accepts[1]
    assert any(r.getMessage().startswith("something else") for r in caplog.records)
