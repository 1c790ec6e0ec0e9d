"""The optimizer service end to end against a simulated fleet: webhook → job → model on GPU, idempotence,
the reconcile loop, monitor mode, bad nodes, the command (`gpu-router optimizer`) and its clean stop."""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import yaml
from conftest import alert
from conftest import payload as notification

from cli.localstack import wait_for
from gpurouter.act.jobs import JobQueue, JobResult
from gpurouter.cluster.config import Config, parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.serve.listen import is_loopback
from optimizer import service
from optimizer.reconcile import Reconciler
from optimizer.service import OptimizerHandle, parse_listen, start_optimizer
from simulator.run import Fleet, fleet_from_dict

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "svc-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LLAMA = "llama3.1:8b"  # 5816 MiB in the simulator: fits the 8 GiB node's usable 6553 MiB
SMALL = "llama3.2:3b"  # 3156 MiB: fits beside nothing priority on that node once llama3.1 is there


def fleet_spec(cpu_models: list[str], *, preload_on: str = "cpu-node", load_speed: int | str = 0) -> dict:
    """gpu-large (8 GiB) and cpu-node (no GPU); `cpu_models` preloaded with num_gpu 0 on `preload_on`."""
    models = [LLAMA, SMALL, "mxbai-embed-large"]
    preload = [{"model": m, "num_gpu": 0, "keep_alive": -1} for m in cpu_models]
    nodes = [
        {"name": "gpu-large", "port": 0, "gpus": [{"name": "RTX 3070", "vram": "8GiB"}], "ram": "32GiB"},
        {"name": "cpu-node", "port": 0, "gpus": [], "ram": "32GiB"},
    ]
    for node in nodes:
        node.update(models=models, load_speed=load_speed, max_loaded_models=4)
        node["preload"] = preload if node["name"] == preload_on else []
    return {"nodes": nodes}


def router_config(fleet: Fleet, priority: list[str], **extra: object) -> dict:
    return {
        "nodes": [
            {"name": "gpu-large", "url": fleet.urls["gpu-large"], "vram": "8GiB"},
            {"name": "cpu-node", "url": fleet.urls["cpu-node"], "vram": 0},
        ],
        "priority_models": priority,
        "check_interval": 3600,
        "request_timeout": 2,
        "optimizer": {"webhook_auth": {"bearer_token": TOKEN}, "load_timeout": 30},
        **extra,
    }


@contextmanager
def running(
    spec: dict, priority: list[str], *, reconcile: bool = False, **extra: object
) -> Iterator[tuple[Fleet, OptimizerHandle, Config]]:
    with Fleet(fleet_from_dict(spec)) as fleet:
        config = parse_config(router_config(fleet, priority, **extra))
        handle = start_optimizer(config, reconcile=reconcile)
        try:
            yield fleet, handle, config
        finally:
            handle.stop()


def loaded(fleet: Fleet, node: str) -> dict[str, tuple[int, int]]:
    """model → (size, size_vram) on a simulated node."""
    return {m["model"]: (m["size"], m["size_vram"]) for m in fleet.node(node).state()["loaded"]}


def loads(fleet: Fleet, model: str) -> int:
    return sum(fleet.node(n).counts().get(model, {}).get("loads", 0) for n in ("gpu-large", "cpu-node"))


def metric(handle: OptimizerHandle, name: str, **labels: str) -> float | None:
    return handle.app.extensions["gpu_router"].metrics.registry.get_sample_value(name, labels)


# ---------------------------------------------------------------------------------------------- webhook


@pytest.mark.parametrize("preload_on", ["cpu-node", "gpu-large"])
def test_on_cpu_alert_ends_with_the_model_fully_on_gpu_and_the_cpu_copy_gone(preload_on):
    with running(fleet_spec([LLAMA], preload_on=preload_on), [LLAMA]) as (fleet, handle, _):
        assert loaded(fleet, preload_on)[LLAMA][1] == 0  # loaded with num_gpu 0: all on CPU
        started = time.monotonic()
        answer = requests.post(
            handle.url + "/webhook", json=notification(alert(model=LLAMA, node=preload_on)), headers=AUTH
        )
        assert answer.status_code == 202
        assert time.monotonic() - started < 1.0  # answered at once, the work runs behind it
        assert answer.json()["queued"][0]["state"] == "queued"
        assert handle.queue.wait_idle(30)
        size, vram = loaded(fleet, "gpu-large")[LLAMA]
        assert size == vram  # fully on GPU
        assert LLAMA not in loaded(fleet, "cpu-node")
        actions = requests.get(handle.url + "/api/v1/actions").json()["actions"]
        assert {a["outcome"] for a in actions} == {"success"}
        assert any(a["action"] == "load" and a["node"] == "gpu-large" for a in actions)
        assert metric(handle, "gpu_router_optimizer_actions_total", action="load", result="success") == 1
        assert metric(handle, "gpu_router_optimizer_remediation_seconds_count") == 1
        assert metric(handle, "gpu_router_optimizer_webhooks_total", outcome="accepted") == 1


def test_fifty_identical_notifications_at_once_cause_exactly_one_load():
    with running(fleet_spec([LLAMA], load_speed="6GB"), [LLAMA]) as (fleet, handle, _):
        body = notification(alert(model=LLAMA, node="cpu-node"))
        before = loads(fleet, LLAMA)
        with requests.Session() as session, ThreadPoolExecutor(50) as pool:
            answers = list(
                pool.map(lambda _: session.post(handle.url + "/webhook", json=body, headers=AUTH), range(50))
            )
        assert [a.status_code for a in answers] == [202] * 50
        states = [a.json()["queued"][0]["state"] for a in answers]
        assert states.count("queued") >= 1 and set(states) <= {"queued", "joined"}
        assert handle.queue.wait_idle(30)
        assert loads(fleet, LLAMA) - before == 1
        assert fleet.node("gpu-large").counts()[LLAMA]["loads"] == 1
        size, vram = loaded(fleet, "gpu-large")[LLAMA]
        assert size == vram


@pytest.mark.parametrize(
    "item",
    [
        alert(status="resolved", model=LLAMA, node="cpu-node"),
        alert(model=LLAMA, node="gpu-elsewhere"),
    ],
    ids=["resolved", "unconfigured-node"],
)
def test_resolved_alerts_and_unconfigured_nodes_cause_no_action(item):
    with running(fleet_spec([LLAMA]), [LLAMA]) as (fleet, handle, _):
        before = {n: fleet.node(n).counts() for n in ("gpu-large", "cpu-node")}
        answer = requests.post(handle.url + "/webhook", json=notification(item), headers=AUTH)
        assert answer.status_code == 202
        assert answer.json()["queued"] == [] and len(answer.json()["ignored"]) == 1
        assert handle.queue.wait_idle(5)
        assert {n: fleet.node(n).counts() for n in ("gpu-large", "cpu-node")} == before
        assert handle.queue.actions() == []
        assert metric(handle, "gpu_router_optimizer_webhooks_total", outcome="ignored") == 1


def test_jobs_sharing_a_node_never_evict_each_other():
    """Two priority models that each fit the GPU node alone, not together: the second job waits for the
    first, re-reads the cluster and leaves its model where it is rather than evicting a priority model."""
    with running(fleet_spec([LLAMA, SMALL]), [LLAMA, SMALL]) as (fleet, handle, _):
        body = notification(alert(model=LLAMA, node="cpu-node"), alert(model=SMALL, node="cpu-node"))
        assert requests.post(handle.url + "/webhook", json=body, headers=AUTH).status_code == 202
        assert handle.queue.wait_idle(30)
        on_gpu = [m for m, (size, vram) in loaded(fleet, "gpu-large").items() if size == vram]
        assert len(on_gpu) == 1
        assert fleet.node("gpu-large").counts()[on_gpu[0]]["unloads"] == 0  # never evicted
        other = SMALL if on_gpu[0] == LLAMA else LLAMA
        assert other in loaded(fleet, "cpu-node")  # its CPU copy still serves it
        outcomes = {(a.model, a.action, a.outcome) for a in handle.queue.actions()}
        assert (other, "plan", "unplaced") in outcomes


def test_a_down_node_is_recorded_and_cools_the_model_down():
    with running(fleet_spec([LLAMA]), [LLAMA]) as (fleet, handle, _):
        fleet.node("gpu-large").inject("down")
        body = notification(alert(model=LLAMA, node="cpu-node"))
        assert requests.post(handle.url + "/webhook", json=body, headers=AUTH).status_code == 202
        assert handle.queue.wait_idle(30)
        data = requests.get(handle.url + "/api/v1/actions").json()
        assert [(a["action"], a["outcome"]) for a in data["actions"]] == [("plan", "unplaced")]
        assert data["cooldowns"][LLAMA] > 25  # cooldown_seconds 30 by default
        again = requests.post(handle.url + "/webhook", json=body, headers=AUTH).json()
        assert again["queued"][0]["state"] == "cooldown" and again["queued"][0]["retry_in"] > 25
        assert requests.get(handle.url + "/healthz").json()["queue_depth"] == 1


def test_stopping_during_a_load_takes_no_further_step():
    """Stop while a 1.5 s load runs: the service ends within a few seconds, sends nothing more, and the CPU
    copy is kept (it is only ever removed after the GPU copy is verified)."""
    spec = fleet_spec([LLAMA], load_speed=int(6_099_560_448 / 1.5))
    with Fleet(fleet_from_dict(spec)) as fleet:
        config = parse_config(router_config(fleet, [LLAMA]))
        handle = start_optimizer(config, reconcile=False)
        try:
            body = notification(alert(model=LLAMA, node="cpu-node"))
            assert requests.post(handle.url + "/webhook", json=body, headers=AUTH).status_code == 202
            wait_for(lambda: handle.queue.jobs() and handle.queue.jobs()[0]["state"] == "running")
            wait_for(lambda: LLAMA in loaded(fleet, "gpu-large"), what="the load to start")
        finally:
            started = time.monotonic()
            handle.stop()
        assert time.monotonic() - started < 6
        handle.stop()  # a second stop is a no-op
        assert LLAMA in loaded(fleet, "cpu-node")
        assert fleet.node("cpu-node").counts()[LLAMA]["unloads"] == 0
        assert {(a.action, a.outcome) for a in handle.queue.actions()} == {
            ("load", "abandoned"),
            ("unload", "abandoned"),
        }


# ---------------------------------------------------------------------------------------------- reconcile


def test_the_reconcile_loop_heals_without_any_alert():
    spec = fleet_spec([LLAMA])
    with running(spec, [LLAMA], reconcile=True, check_interval=0.2) as (fleet, handle, _):
        wait_for(lambda: LLAMA in loaded(fleet, "gpu-large") and LLAMA not in loaded(fleet, "cpu-node"))
        assert handle.queue.wait_idle(30)
        size, vram = loaded(fleet, "gpu-large")[LLAMA]
        assert size == vram
        assert (metric(handle, "gpu_router_optimizer_last_reconcile_timestamp_seconds") or 0) > 0
        assert metric(handle, "gpu_router_optimizer_remediation_seconds_count") == 1


def test_a_failing_reconcile_pass_does_not_end_the_loop(caplog):
    config = parse_config({"nodes": ["http://127.0.0.1:9"], "priority_models": [LLAMA], "request_timeout": 0.5})
    runs: list[str] = []

    class Flaky:
        """Raises on the first poll, then reports every node down (so nothing can be done)."""

        def __init__(self) -> None:
            self.calls = 0
            self.observer = Observer(config)

        def poll(self):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("first poll breaks")
            return self.observer.poll()

    flaky = Flaky()
    jobs = JobQueue(config, lambda job: runs.append(job.model) or JobResult(ok=True)).start()
    loop = Reconciler(config, flaky, jobs, metrics=jobs.metrics, interval=0.05).start()
    try:
        wait_for(lambda: "no node answered" in caplog.text, what="a pass after the failing one")
    finally:
        assert loop.stop(5)
        assert jobs.stop(5)
        flaky.observer.close()
    assert runs == []  # every node down: nothing queued, and the pass says it failed (never outcome=ok)
    assert "event=reconcile outcome=failure" in caplog.text and "first poll breaks" in caplog.text
    assert "outcome=ok" not in caplog.text
    assert 'event=reconcile outcome=failure reason="no node answered (127.0.0.1:9: ' in caplog.text
    assert (jobs.metrics.registry.get_sample_value("gpu_router_optimizer_last_reconcile_timestamp_seconds") or 0) > 0


def failing_health(handle: OptimizerHandle) -> dict | None:
    """/healthz's body when it answers 503."""
    answer = requests.get(handle.url + "/healthz", timeout=5)
    return answer.json() if answer.status_code == 503 else None


def test_healthz_fails_naming_the_reconcile_loop_when_it_died():
    with Fleet(fleet_from_dict(fleet_spec([]))) as fleet:
        config = parse_config(router_config(fleet, [LLAMA]))
        broken = dataclasses.replace(config, check_interval=1e300)  # what the configuration now refuses
        handle = start_optimizer(broken, reconcile=True)
        try:
            body = wait_for(lambda: failing_health(handle), what="/healthz failing")
            assert body["status"] == "failing" and body["dead"] == ["optimizer-reconcile"]
            assert "optimizer-reconcile" in body["error"]
        finally:
            handle.stop()


def test_healthz_fails_naming_a_job_worker_that_died():
    with Fleet(fleet_from_dict(fleet_spec([LLAMA]))) as fleet:
        config = parse_config(router_config(fleet, [LLAMA]))
        handle = start_optimizer(config, reconcile=False, run_job=lambda job: None)  # type: ignore[arg-type,return-value]
        try:
            assert requests.get(handle.url + "/healthz", timeout=5).status_code == 200
            handle.queue.submit(LLAMA)
            assert wait_for(lambda: failing_health(handle), what="/healthz failing")["dead"] == ["optimizer-job-0"]
        finally:
            handle.stop()


def test_monitor_mode_logs_plans_and_never_acts(caplog):
    caplog.set_level(logging.INFO, logger="gpu_router.optimizer")
    spec = fleet_spec([LLAMA])
    with running(spec, [LLAMA], reconcile=True, check_interval=0.1, auto_optimize=False) as (fleet, handle, _):
        before = loads(fleet, LLAMA)
        body = notification(alert(model=LLAMA, node="cpu-node"))
        answer = requests.post(handle.url + "/webhook", json=body, headers=AUTH).json()
        assert answer["auto_optimize"] is False
        assert handle.queue.wait_idle(30)
        wait_for(lambda: "event=reconcile.plan" in caplog.text, what="a logged plan")
        assert loads(fleet, LLAMA) == before
        assert LLAMA not in loaded(fleet, "gpu-large")
        assert {a.outcome for a in handle.queue.actions()} == {"dry-run"}
        assert "monitor only: auto_optimize is false" in caplog.text
        refused = requests.post(handle.url + "/api/v1/optimize", json={}, headers=AUTH)
        assert refused.status_code == 409


# ---------------------------------------------------------------------------------------------- the command


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9878") == ("127.0.0.1", 9878)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9878") == ("0.0.0.0", 9878) and parse_listen("[::1]:9878") == ("::1", 9878)
    for bad in ("9878", "host:", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="--listen: expected HOST:PORT"):
            parse_listen(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.com")


def _args(config: Path, listen: str, insecure: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    service.add_arguments(parser)
    argv = ["--listen", listen] + (["--insecure"] if insecure else [])
    args = parser.parse_args(argv)
    args.config = str(config)
    return args


def test_refuses_a_public_address_without_credentials(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"nodes": ["http://127.0.0.1:9"], "priority_models": ["x"]}))
    assert service.main(_args(path, "0.0.0.0:9878")) == 2
    assert service.main(_args(path, ":9878")) == 2  # all interfaces: the same rule
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0" in err and "--insecure" in err
    assert service.main(_args(path, "nonsense")) == 2
    assert "--listen: expected HOST:PORT" in capsys.readouterr().err


class ServiceProcess:
    """`python -m cli.main optimizer` as a child process, its stderr read line by line."""

    def __init__(self, config: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "cli.main", "optimizer", "--config", str(config)]
        self.proc = subprocess.Popen(
            [*command, "--listen", "127.0.0.1:0"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no log line with {needle!r}; got {self.seen}"
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_the_command_serves_then_stops_cleanly_on_sigterm(tmp_path):
    with Fleet(fleet_from_dict(fleet_spec([LLAMA]))) as fleet:
        path = tmp_path / "gpu_router_config.yaml"
        path.write_text(yaml.safe_dump(router_config(fleet, [LLAMA])))
        child = ServiceProcess(path)
        try:
            line = child.wait_line("event=listening")
            url = line.split("url=", 1)[1].split()[0]
            assert url.startswith("http://127.0.0.1:")
            assert requests.get(url + "/healthz", timeout=5).json()["status"] == "ok"
            body = notification(alert(model=LLAMA, node="cpu-node"))
            assert requests.post(url + "/webhook", json=body, headers=AUTH, timeout=5).status_code == 202
            action = child.wait_line("action=unload")
            assert "model=llama3.1:8b node=cpu-node" in action and "outcome=success" in action
            assert action.startswith("time=") and " level=INFO " in action
            done = child.wait_line("event=job.done")
            assert "model=llama3.1:8b" in done and "outcome=success" in done
            started = time.monotonic()
            child.proc.send_signal(signal.SIGTERM)
            assert child.proc.wait(10) == 0
            assert time.monotonic() - started < 6
            child.wait_line("event=stopped")
        finally:
            child.stop()
        size, vram = loaded(fleet, "gpu-large")[LLAMA]
        assert size == vram


def raw_request(url: str, head: str) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (request line and headers, no body) as is; the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()


@pytest.mark.parametrize(
    ("head", "status", "words"),
    [
        (
            f"POST /webhook HTTP/1.1\nHost: x\nContent-Length: {64 * 1024 * 1024}\n",
            413,
            f"body too large: {64 * 1024 * 1024} bytes, the limit is {2 * 1024 * 1024} bytes",  # the webhook's
        ),
        ("POST /webhook HTTP/1.1\nHost: x\nTransfer-Encoding: chunked, identity\n", 501, "Not Implemented"),
        ("GET /healthz HTTP/1.1\nHost: x\nContent-Length: nine\n", 400, "Bad Request"),
    ],
)
def test_the_servers_own_errors_are_json_too(head: str, status: int, words: str):
    with running(fleet_spec([]), [LLAMA]) as (_, handle, _):
        code, headers, body = raw_request(handle.url, head)
    assert code == status and headers["content-type"] == "application/json"
    assert json.loads(body)["error"].startswith(words)


def test_sigterm_during_a_long_load_exits_within_5_s_and_the_model_stays_served(tmp_path):
    size = 5024 * 1024 * 1024  # llama3.1:8b's size on a llama-server node at 4096 tokens
    with Fleet(fleet_from_dict(fleet_spec([LLAMA], load_speed=size // 60))) as fleet:  # a 60 s load
        raw = router_config(fleet, [LLAMA])
        raw["optimizer"]["load_timeout"] = 300
        path = tmp_path / "gpu_router_config.yaml"
        path.write_text(yaml.safe_dump(raw))
        child = ServiceProcess(path)
        try:
            url = child.wait_line("event=listening").split("url=", 1)[1].split()[0]
            body = notification(alert(model=LLAMA, node="cpu-node"))
            assert requests.post(url + "/webhook", json=body, headers=AUTH, timeout=5).status_code == 202
            wait_for(
                lambda: any(m["model"] == LLAMA and m["loading"] for m in fleet.node("gpu-large").state()["loaded"]),
                timeout=20,
                what="the load under way on gpu-large",
            )
            started = time.monotonic()
            child.proc.send_signal(signal.SIGTERM)
            assert child.proc.wait(10) == 0
            assert time.monotonic() - started < 5
            child.wait_line("event=stopped")
        finally:
            child.stop()
        assert LLAMA in loaded(fleet, "cpu-node")  # the CPU copy was never removed: the model is still served
        answer = requests.post(
            fleet.urls["cpu-node"] + "/api/generate", json={"model": LLAMA, "prompt": "hi", "stream": False}, timeout=30
        )
        assert answer.status_code == 200 and answer.json()["done"] is True
