"""The simulator's HTTP server: one accepting thread for every server of the process (an idle fleet polls
nothing), and a closed server refuses connections until it reopens on the same port."""

from __future__ import annotations

import socket
import threading

import pytest
import requests

from simulator.httpserver import HttpServer, Request, Response, text_response


def _hello(request: Request) -> Response:
    return text_response(200, f"hello {request.path}")


def test_many_servers_share_one_accepting_thread():
    first = HttpServer(_hello)
    first.open()  # the acceptor exists from here on
    before = threading.active_count()
    servers = [HttpServer(_hello) for _ in range(50)]
    try:
        for server in servers:
            server.open()
        assert threading.active_count() == before  # no thread per listening server
        for server in servers[::10]:
            assert requests.get(server.url + "/x", timeout=5).text == "hello /x"
    finally:
        for server in [first, *servers]:
            server.close()


def test_a_closed_server_refuses_and_reopens_on_its_port():
    server = HttpServer(_hello)
    server.open()
    port = server.port
    try:
        assert requests.get(server.url + "/a", timeout=5).status_code == 200
        server.close()
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        server.open()
        assert server.port == port
        assert requests.get(server.url + "/b", timeout=5).text == "hello /b"
    finally:
        server.close()
