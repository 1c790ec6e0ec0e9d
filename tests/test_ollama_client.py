"""The Ollama client: errors classified by HTTP status and transport, typed answers, the load/unload calls.

A small canned HTTP server on 127.0.0.1 plays the misbehaving node (statuses and bodies a real Ollama or a
broken proxy sends); the well-behaved paths run against the simulator in the integration tests.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from datetime import timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpurouter.cluster.ollama import OllamaClient, OllamaError

PS = {
    "models": [
        {
            "name": "llama3.1:8b",
            "model": "llama3.1:8b",
            "size": 6099560448,
            "digest": "46e0c10c039e019119339687c3c1757cc81b9da49709a3b3924863ba87ca666e",
            "details": {"family": "llama"},
            "expires_at": "2318-08-01T14:38:31.837530123-07:00",
            "size_vram": 4141654016,
            "context_length": 4096,
        }
    ]
}


class Canned(BaseHTTPRequestHandler):
    """Answers from `server.routes`: path → (status, content type, body[, headers]); records every request body."""

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.requests.append((self.command, self.path, json.loads(self.rfile.read(length) or b"null")))
        route = self.path.split("?", 1)[0]
        status, kind, body, *extra = self.server.routes.get(route, (404, "text/plain", "404 page not found"))
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        for name, value in (extra[0] if extra else {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer


@contextlib.contextmanager
def canned() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    server.routes = {}
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def node() -> Iterator[ThreadingHTTPServer]:
    with canned() as server:
        yield server


def client_for(server: ThreadingHTTPServer, read_timeout: float = 2.0) -> OllamaClient:
    return OllamaClient(f"http://127.0.0.1:{server.server_port}", read_timeout=read_timeout)


def test_ps_is_typed(node: ThreadingHTTPServer) -> None:
    node.routes["/api/ps"] = (200, "application/json", PS)
    (model,) = client_for(node).ps()
    assert (model.name, model.size, model.size_vram, model.context_length) == (
        "llama3.1:8b",
        6099560448,
        4141654016,
        4096,
    )
    assert model.expires_at.year == 2318 and model.expires_at.utcoffset() is not None
    assert model.expires_at.astimezone(timezone.utc).hour == 21
    assert round(model.gpu_ratio, 2) == 0.68 and not model.fully_on_gpu


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (404, {"error": "model 'x' not found"}, "not_found"),
        (400, {"error": "missing request body"}, "bad_request"),
        (503, {"error": "server busy, please try again.  maximum pending requests exceeded"}, "busy"),
        (500, {"error": "model requires more system memory"}, "server_error"),
        (502, "bad gateway", "server_error"),
        (401, "nope", "http"),
    ],
)
def test_errors_are_classified_by_status(node: ThreadingHTTPServer, status: int, body: object, kind: str) -> None:
    node.routes["/api/ps"] = (status, "application/json", body)
    with pytest.raises(OllamaError) as caught:
        client_for(node).ps()
    assert caught.value.kind == kind and caught.value.status == status
    assert f"HTTP {status}" in str(caught.value)


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        "[]",
        {"models": "many"},
        {"models": [{"name": "x"}]},
        {"models": [{"name": "x", "size": -1}]},
    ],
)
def test_garbage(node: ThreadingHTTPServer, body: object) -> None:
    node.routes["/api/ps"] = (200, "application/json", body)
    with pytest.raises(OllamaError) as caught:
        client_for(node).ps()
    assert caught.value.kind == "garbage"


def test_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OllamaError) as caught:
        OllamaClient(f"http://127.0.0.1:{port}").version()
    assert caught.value.kind == "refused" and caught.value.status is None


def test_timeout() -> None:
    with socket.socket() as sock:  # accepts connections (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        client = OllamaClient(f"http://127.0.0.1:{sock.getsockname()[1]}", read_timeout=0.2)
        with pytest.raises(OllamaError) as caught:
            client.tags()
    assert caught.value.kind == "timeout"


def test_load_uses_generate_for_chat_models_and_embed_for_embedders(node: ThreadingHTTPServer) -> None:
    node.routes["/api/generate"] = (
        200,
        "application/json",
        {"model": "m", "done": True, "done_reason": "load"},
    )
    node.routes["/api/embed"] = (200, "application/json", {"model": "e", "embeddings": []})
    client = client_for(node)
    client.load("m", num_ctx=8192, keep_alive=-1)
    client.load("e", embedding=True, keep_alive="10m", num_gpu=0)
    client.unload("m")
    client.unload("e", embedding=True)
    assert node.requests == [
        (
            "POST",
            "/api/generate",
            {"model": "m", "keep_alive": -1, "options": {"num_ctx": 8192}, "prompt": "", "stream": False},
        ),
        ("POST", "/api/embed", {"model": "e", "keep_alive": "10m", "options": {"num_gpu": 0}, "input": []}),
        ("POST", "/api/generate", {"model": "m", "prompt": "", "keep_alive": 0, "stream": False}),
        ("POST", "/api/embed", {"model": "e", "input": [], "keep_alive": 0}),
    ]


def test_show_reads_capabilities_and_modelfile_context(node: ThreadingHTTPServer) -> None:
    node.routes["/api/show"] = (
        200,
        "application/json",
        {
            "capabilities": ["embedding"],
            "parameters": 'num_ctx                        8192\nstop "x"',
            "model_info": {},
        },
    )
    show = client_for(node).show("nomic-embed-text")
    assert show.embedding and show.num_ctx == 8192
    assert node.requests[-1] == ("POST", "/api/show", {"model": "nomic-embed-text"})


def test_one_session_reuses_connections(node: ThreadingHTTPServer) -> None:
    node.routes["/api/version"] = (200, "application/json", {"version": "0.12.6"})
    client = client_for(node)
    assert [client.version() for _ in range(3)] == ["0.12.6"] * 3
    assert len(client.session.adapters["http://"].poolmanager.pools) == 1


# ------------------------------------------------------------------------ transport errors, each its own words


def _closing_server(reply: bytes = b"") -> tuple[socket.socket, str]:
    """A listener on 127.0.0.1 that reads a request, sends `reply` (maybe nothing) and closes the connection."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


def _failure(url: str, **timeouts: float) -> OllamaError:
    with pytest.raises(OllamaError) as caught:
        OllamaClient(url, **timeouts).version()
    return caught.value


def test_a_name_that_does_not_resolve_is_not_called_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def lookup(host: object, *args: object, **kwargs: object) -> object:
        if host == "no-such-node.invalid":  # answered here: the test sends nothing to a DNS server
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    error = _failure("http://no-such-node.invalid:11434")
    assert error.kind == "name_lookup" and "host name does not resolve" in str(error)
    assert "refused" not in str(error)


def test_refused_reset_tls_and_timeout_each_get_their_own_words() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    refused = _failure(f"http://127.0.0.1:{free}")
    assert refused.kind == "refused" and "connection refused" in str(refused) and "reset" not in str(refused)
    server, where = _closing_server()
    with server:
        reset = _failure(f"http://{where}")
        assert reset.kind == "reset" and "closed it before answering" in str(reset) and "refused" not in str(reset)
    server, where = _closing_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with server:
        tls = _failure(f"https://{where}")
    assert tls.kind == "tls" and "TLS handshake failed" in str(tls)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        slow = _failure(f"http://127.0.0.1:{silent.getsockname()[1]}", read_timeout=0.2)
    assert slow.kind == "timeout" and "no answer within 0.2s" in str(slow)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_node_error_and_never_followed(node: ThreadingHTTPServer, status: int) -> None:
    """Only configured URLs are contacted: a node that redirects (reads, show, and a load with its body) is in
    error, and the address it names is never reached."""
    with canned() as elsewhere:
        target = f"http://127.0.0.1:{elsewhere.server_port}"
        for path in ("/api/ps", "/api/tags", "/api/version", "/api/show", "/api/generate", "/api/embed"):
            elsewhere.routes[path] = (200, "application/json", {"models": [], "version": "0.1.0"})
            node.routes[path] = (status, "text/html", "<a>moved</a>", {"Location": f"{target}{path}"})
        client = client_for(node)
        calls = [client.ps, client.tags, client.version, lambda: client.show("m"), lambda: client.load("m")]
        calls.append(lambda: client.unload("m", embedding=True))
        for call in calls:
            with pytest.raises(OllamaError) as failed:
                call()
            assert failed.value.kind == "redirect"
            assert failed.value.status == status
            assert f"node answered a redirect to {target}/api/" in str(failed.value)
            assert str(failed.value).endswith("(not followed)")
        assert elsewhere.requests == []
    assert len(node.requests) == len(calls)


def test_a_redirect_without_location_and_credentials_in_it(node: ThreadingHTTPServer) -> None:
    node.routes["/api/ps"] = (302, "text/plain", "")
    with pytest.raises(OllamaError, match=r"node answered a redirect to nowhere \(not followed\)"):
        client_for(node).ps()
    node.routes["/api/ps"] = (307, "text/plain", "", {"Location": "http://ops:s3cret@elsewhere:1/api/ps"})
    with pytest.raises(OllamaError) as failed:
        client_for(node).ps()
    assert "s3cret" not in str(failed.value)
    assert "http://***@elsewhere:1/api/ps" in str(failed.value)
