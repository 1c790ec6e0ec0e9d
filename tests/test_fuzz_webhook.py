"""Hostile input: thousands of malformed or hostile bodies and headers (hypothesis) against /webhook and the
API through Flask's test client, then a smoke test of the same through real HTTP (waitress).

For every request: no 5xx, a JSON answer, no job run, no URL from a payload contacted; afterwards the
service still answers.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpurouter.act.jobs import Job, JobQueue, JobResult
from gpurouter.cluster.config import parse_config
from optimizer import webhook
from optimizer.app import create_app
from optimizer.service import start_optimizer

TOKEN = "fuzz-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
FUZZ = settings(
    max_examples=700,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PATHS = (
    "/",
    "/webhook",
    "/api/v1/status",
    "/api/v1/route",
    "/api/v1/check",
    "/api/v1/models",
    "/api/v1/optimize",
    "/api/v1/actions",
    "/healthz",
    "/metrics",
)


class Trap:
    """A TCP listener on 127.0.0.1 that counts connections: payloads point at it, nothing may connect."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = parse_config(
    {
        "nodes": [
            {"name": "gpu-large", "url": f"http://127.0.0.1:{closed_port()}", "vram": "8GiB"},
            {"name": "cpu-node", "url": f"http://127.0.0.1:{closed_port()}", "vram": 0},
        ],
        "priority_models": ["mxbai-embed-large", "llama3.1:latest"],
        "request_timeout": 0.5,
        "optimizer": {"webhook_auth": {"bearer_token": TOKEN}},
    }
)


class Recorder:
    def __init__(self) -> None:
        self.runs: list[str] = []

    def __call__(self, job: Job) -> JobResult:
        self.runs.append(job.model)
        return JobResult(ok=True)


@pytest.fixture(scope="module")
def trap() -> Iterator[Trap]:
    trap = Trap()
    yield trap
    trap.close()


@pytest.fixture(scope="module")
def service() -> Iterator[tuple]:
    """The app with a real Observer (its nodes refuse connections) and a queue whose jobs are recorded."""
    job = Recorder()
    queue = JobQueue(CONFIG, job).start()
    app = create_app(CONFIG, queue=queue)
    yield app, job, queue
    assert queue.stop(5)
    app.extensions["gpu_router"].observer.close()


# ---------------------------------------------------------------------------------------------- strategies

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | text
json_value = st.recursive(
    json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8
)
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
hostile_names = st.sampled_from(
    [
        "",
        " ",
        "qwen2:7b",
        "../../etc/passwd",
        "llama3.1\x00",
        "llama3.1 ",
        "LLAMA3.1",
        "http://127.0.0.1:1/api/generate",
        "a" * 5000,
        "\u202egpu-large",
        "gpu-large\n",
        "${jndi:ldap://x}",
    ]
)


def not_priority(name: str) -> bool:
    return CONFIG.priority(name) is None if name.strip() else True


@st.composite
def hostile_alert(draw: st.DrawFn, target: str) -> object:
    labels: dict[str, object] = {
        "alertname": draw(st.sampled_from(webhook.ACTIONABLE) | text),
        "model": draw((hostile_names | text).filter(not_priority)),
        "node": draw(st.sampled_from(["gpu-large", "cpu-node", target, f"{target}/api/pull"]) | text),
        "instance": target,
    }
    labels.update(draw(st.dictionaries(text, json_scalar, max_size=2)))
    alert: dict[str, object] = {
        "status": draw(st.sampled_from(["firing", "resolved"]) | json_scalar),
        "labels": labels,
        "annotations": draw(st.dictionaries(text, text | json_scalar, max_size=2)),
        "startsAt": draw(text),
        "generatorURL": target,
        "fingerprint": draw(text | json_scalar),
    }
    for key in draw(st.lists(st.sampled_from(sorted(alert)), max_size=2)):
        alert.pop(key, None)
    return draw(st.just(alert) | json_scalar)


@st.composite
def hostile_payload(draw: st.DrawFn, target: str) -> bytes:
    data: dict[str, object] = {
        "receiver": draw(text | json_scalar),
        "status": draw(st.sampled_from(["firing", "resolved"]) | json_scalar),
        "alerts": draw(st.lists(hostile_alert(target), max_size=3) | json_scalar),
        "groupLabels": draw(st.dictionaries(text, text, max_size=2) | json_scalar),
        "commonLabels": {"node": target},
        "commonAnnotations": {},
        "externalURL": target,
        "version": draw(st.sampled_from(["4", 4, "3", "", None, "4 "])),
        "groupKey": draw(text),
        "truncatedAlerts": draw(st.integers() | json_scalar),
    }
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=2)):
        data.pop(key, None)
    encoded = json.dumps(data)  # NaN and Infinity included when drawn
    return draw(
        st.sampled_from(
            [
                encoded.encode(),
                encoded.encode()[: max(0, len(encoded) - 3)],
                encoded.encode("utf-16"),
                b"\xff" + encoded.encode(),
            ]
        )
    )


bodies = (
    st.binary(max_size=300)
    | text.map(str.encode)
    | json_value.map(lambda v: json.dumps(v).encode())
    | st.sampled_from([b"[" * 50_000, b'{"a":' * 20_000, b"1e999999", b"9" * 5000, b"NaN", b'"\\ud800"'])
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Authorization": st.sampled_from([f"Bearer {TOKEN}", "Bearer", "Basic Og==", f"bearer  {TOKEN} "])
        | header_text,
        "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x"])
        | header_text,
        "Content-Encoding": st.sampled_from(["gzip", "deflate"]),
        "X-Forwarded-For": header_text,
    },
)


def check_answer(answer, path: str) -> None:
    assert answer.status_code < 500, (path, answer.status_code, answer.get_data()[:200])
    if path.strip("/") == "" and answer.status_code == 200:
        assert answer.mimetype == "text/html"  # the status page
    elif path != "/metrics":
        assert answer.is_json, (path, answer.status_code)
        assert isinstance(answer.get_json(), dict)


def run(strategy_test) -> None:
    """Run a hypothesis test and check it really sent FUZZ.max_examples requests."""
    seen.clear()
    strategy_test()
    assert len(seen) >= FUZZ.max_examples


seen: list[int] = []  # one entry per request of the fuzz test running now


def assert_alive(client) -> None:
    """After fuzzing: health, a valid notification and the metrics still answer."""
    assert client.get("/healthz").get_json()["status"] == "ok"
    body = {"version": "4", "status": "firing", "alerts": []}
    assert client.post("/webhook", json=body, headers=GOOD).status_code == 202
    assert "gpu_router_optimizer_webhooks_total" in client.get("/metrics").get_data(as_text=True)


# ---------------------------------------------------------------------------------------------- tests


def test_fuzz_webhook_bodies_and_headers(service, trap):
    app, job, queue = service
    client = app.test_client()

    @FUZZ
    @given(body=bodies | hostile_payload(trap.url), head=headers, auth=st.booleans())
    def fuzz(body, head, auth):
        seen.append(1)
        answer = client.post("/webhook", data=body, headers={**head, **(GOOD if auth else {})})
        check_answer(answer, "/webhook")
        assert answer.status_code in (202, 400, 401)

    run(fuzz)
    assert queue.wait_idle(5)
    assert job.runs == [] and trap.hits == 0
    assert_alive(client)


def test_fuzz_valid_but_hostile_payloads_are_accepted_or_rejected_cleanly(service, trap):
    app, job, queue = service
    client = app.test_client()

    statuses: set[int] = set()

    @FUZZ
    @given(body=hostile_payload(trap.url))
    def fuzz(body):
        seen.append(1)
        answer = client.post("/webhook", data=body, headers=GOOD)
        check_answer(answer, "/webhook")
        statuses.add(answer.status_code)
        if answer.status_code == 202:
            assert answer.get_json()["queued"] == []

    run(fuzz)
    assert statuses == {202, 400}  # both validation and triage were reached
    assert queue.wait_idle(5)
    assert job.runs == [] and trap.hits == 0
    assert_alive(client)


def _dry_run(body: bytes) -> bool:
    """The optimize request is a dry run, or refused before anything is queued (an empty body asks to act)."""
    if not body.strip():
        return False
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return True  # refused as malformed before anything is queued
    return isinstance(data, dict) and data.get("dry_run") is True


def test_fuzz_the_api(service, trap):
    app, job, queue = service
    client = app.test_client()
    optimize_body = st.dictionaries(st.sampled_from(["dry_run", "models", "x"]) | text, json_value, max_size=3)

    @FUZZ
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
        path=st.sampled_from(PATHS) | text.map(lambda t: "/" + quote(t, safe="")),  # "//x" would name a host
        query=st.dictionaries(st.sampled_from(["model", "x"]) | text, hostile_names | text, max_size=2),
        body=bodies | optimize_body.map(lambda d: json.dumps({**d, "dry_run": True}).encode()),
        head=headers,
    )
    def fuzz(method, path, query, body, head):
        seen.append(1)
        if method == "POST" and path == "/api/v1/optimize" and not _dry_run(body):
            head = {k: v for k, v in head.items() if k != "Authorization"}  # an authorised one would really act
        answer = client.open(path, method=method, query_string=query, data=body, headers=head)
        check_answer(answer, path if method not in ("HEAD", "OPTIONS") else "/metrics")

    run(fuzz)
    assert queue.wait_idle(5)
    assert job.runs == [] and trap.hits == 0
    assert_alive(client)


def test_real_http_smoke_through_waitress(trap):
    """Hostile requests over real sockets, raw HTTP garbage included; the server keeps answering."""
    job = Recorder()
    handle = start_optimizer(CONFIG, "127.0.0.1", 0, run_job=job, reconcile=False)
    try:
        session = requests.Session()
        hostile = json.dumps(
            {
                "version": "4",
                "status": "firing",
                "externalURL": trap.url,
                "alerts": [
                    {
                        "status": "firing",
                        "labels": {"alertname": webhook.ACTIONABLE[0], "model": "qwen2", "node": trap.url},
                        "generatorURL": trap.url,
                    }
                ],
            }
        )
        cases = [
            ("POST", "/webhook", b"{", GOOD, 400),
            ("POST", "/webhook", hostile.encode(), GOOD, 202),
            ("POST", "/webhook", hostile.encode(), {"Authorization": "Bearer x"}, 401),
            ("POST", "/webhook", b"x" * (webhook.MAX_BODY + 1), GOOD, 413),
            ("GET", "/api/v1/route?model=%00%ff", b"", {}, 400),  # not a name: refused where it enters
            ("GET", "/api/v1/check", b"", {}, 400),
            ("POST", "/api/v1/optimize", b'{"dry_run": true}', GOOD, 200),
            ("PUT", "/webhook", b"", {}, 405),
            ("GET", "/" + "a" * 4000, b"", {}, 404),
        ]
        for method, path, data, head, status in cases:
            answer = session.request(method, handle.url + path, data=data, headers=head, timeout=10)
            assert answer.status_code == status, (method, path, answer.status_code, answer.text[:200])
            assert answer.headers["Content-Type"].startswith("application/json")
        for raw in (b"GARBAGE\r\n\r\n", b"POST /webhook HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"\x00" * 100):
            with socket.create_connection(("127.0.0.1", int(handle.url.rsplit(":", 1)[1])), timeout=5) as conn:
                conn.sendall(raw)
                conn.shutdown(socket.SHUT_WR)
                reply = conn.recv(100)
                assert not reply or not reply.startswith(b"HTTP/1.1 5"), reply
        assert session.get(handle.url + "/healthz", timeout=5).json()["status"] == "ok"
        session.close()
    finally:
        handle.stop()
    assert job.runs == [] and trap.hits == 0
