"""The proxy against hostile peers: a node that redirects, clients that never finish their request, bodies that
would fill memory, malformed requests. Everything on 127.0.0.1."""

from __future__ import annotations

import socket

import requests
from test_proxy import SMALL, metric, stack

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
            assert reply.status_code == 502
            assert f"node answered a redirect to {target} (not followed)" in reply.json()["error"]
        try:
            canary.accept()
            raise AssertionError("the redirect's target was contacted")
        except BlockingIOError:
            pass
    finally:
        canary.close()
