"""The work queue (gpurouter/act/jobs.py) with injected jobs and clock: coalescing, cooldown, containment."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import generate_latest

from cli.localstack import wait_for
from gpurouter.act.jobs import HISTORY, ActionRecord, Job, JobQueue, JobResult, Metrics
from gpurouter.cluster.config import parse_config

CONFIG = parse_config(
    {
        "nodes": [{"name": "gpu", "url": "http://127.0.0.1:1", "vram": "8GiB"}],
        "priority_models": ["a", "b", "c"],
        "optimizer": {"cooldown_seconds": 10, "cooldown_max_seconds": 35},
    }
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A fake job: records each run, can be held open, and answers with a chosen result."""

    def __init__(self, result: JobResult | None = None) -> None:
        self.runs: list[str] = []
        self.result = result or JobResult(ok=True)
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, job: Job) -> JobResult:
        with self.lock:
            self.runs.append(job.model)
        self.running.set()
        assert self.gate.wait(10)
        return self.result


@pytest.fixture
def make_queue() -> Iterator[Callable[..., JobQueue]]:
    queues: list[JobQueue] = []

    def make(run_job, **kwargs) -> JobQueue:
        queue = JobQueue(CONFIG, run_job, **kwargs).start()
        queues.append(queue)
        return queue

    yield make
    for queue in queues:
        assert queue.stop(5.0)


def record(model: str, step: str = "load", outcome: str = "success") -> ActionRecord:
    return ActionRecord(time=1.0, model=model, node="gpu", action=step, outcome=outcome, duration_seconds=0.5)


def test_a_submitted_job_runs_and_its_actions_are_kept(make_queue):
    job = Recorder(JobResult(ok=True, fixed=True, actions=(record("a:latest"),)))
    queue = make_queue(job)
    sub = queue.submit("a", "gpu")
    assert (sub.model, sub.node, sub.state, sub.retry_in) == ("a:latest", "gpu", "queued", None)
    assert queue.wait_idle(5)
    assert job.runs == ["a:latest"]
    assert queue.actions() == [record("a:latest")]
    assert queue.depth == 0


def test_notifications_for_a_queued_or_running_model_join_its_job(make_queue):
    job = Recorder()
    job.gate.clear()
    queue = make_queue(job, workers=4)
    first = queue.submit("a")
    assert job.running.wait(5)  # the job is running now
    states = []
    threads = [threading.Thread(target=lambda: states.append(queue.submit("a:latest").state)) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert first.state == "queued"
    assert states == ["joined"] * 50
    assert queue.jobs()[0]["state"] == "running"
    job.gate.set()
    assert queue.wait_idle(5)
    assert job.runs == ["a:latest"]


def test_jobs_for_different_models_run_at_the_same_time(make_queue):
    job = Recorder()
    job.gate.clear()
    queue = make_queue(job, workers=3)
    for model in ("a", "b", "c"):
        queue.submit(model)
    wait_for(lambda: len(job.runs) == 3)
    assert {j["state"] for j in queue.jobs()} == {"running"}
    job.gate.set()
    assert queue.wait_idle(5)


def test_failures_cool_the_model_down_exponentially_up_to_the_cap(make_queue):
    clock = Clock()
    job = Recorder(JobResult(ok=False, actions=(record("a:latest", outcome="failure"),)))
    queue = make_queue(job, clock=clock, workers=1)
    waits = []
    for attempt in range(4):
        sub = queue.submit("a")
        if attempt == 0:
            assert sub.state == "queued"
        else:
            assert sub.state == "cooldown"
            assert sub.retry_in == pytest.approx(waits[-1])
            assert queue.depth == 1 and len(job.runs) == attempt  # waiting, not running
            clock.now += waits[-1]
            queue.wake()
        wait_for(lambda n=attempt + 1: len(job.runs) == n and queue.depth == 0)
        waits.append(queue.cooldowns()["a:latest"])
    assert waits == [10, 20, 35, 35]  # cooldown_seconds doubling, capped at cooldown_max_seconds


def test_a_success_clears_the_cooldown(make_queue):
    clock = Clock()
    job = Recorder(JobResult(ok=False))
    queue = make_queue(job, clock=clock, workers=1)
    queue.submit("a")
    wait_for(lambda: queue.depth == 0 and job.runs)
    assert queue.cooldowns() == {"a:latest": 10}
    job.result = JobResult(ok=True)
    clock.now += 10
    queue.submit("a")
    wait_for(lambda: queue.depth == 0 and len(job.runs) == 2)
    assert queue.cooldowns() == {}
    assert queue.submit("a").state == "queued"
    assert queue.wait_idle(5)


def test_a_crashing_job_is_recorded_and_the_worker_lives_on(make_queue):
    calls = []

    def crash(job: Job) -> JobResult:
        calls.append(job.model)
        if job.model == "a:latest":
            raise RuntimeError("node exploded")
        return JobResult(ok=True)

    metrics = Metrics()
    queue = make_queue(crash, workers=1, metrics=metrics)
    queue.submit("a")
    assert queue.wait_idle(5)
    queue.submit("b")
    assert queue.wait_idle(5)
    assert calls == ["a:latest", "b:latest"]
    (failure,) = queue.actions()
    assert (failure.model, failure.action, failure.outcome) == ("a:latest", "job", "failure")
    assert "RuntimeError: node exploded" in failure.detail
    assert "a:latest" in queue.cooldowns()


def test_metrics_count_actions_and_remediation_time(make_queue):
    clock = Clock()
    actions = (
        record("a:latest", "evict"),
        record("a:latest", "load"),
        record("a:latest", "unload", "failure"),
        record("a:latest", "plan", "unplaced"),
    )
    job = Recorder(JobResult(ok=True, fixed=True, actions=actions))
    job.gate.clear()
    metrics = Metrics()
    queue = make_queue(job, clock=clock, metrics=metrics)
    queue.submit("a")
    assert job.running.wait(5)
    assert metrics.registry.get_sample_value("gpu_router_optimizer_queue_depth") == 1
    clock.now += 42
    job.gate.set()
    assert queue.wait_idle(5)
    value = metrics.registry.get_sample_value
    assert value("gpu_router_optimizer_actions_total", {"action": "evict", "result": "success"}) == 1
    assert value("gpu_router_optimizer_actions_total", {"action": "load", "result": "success"}) == 1
    assert value("gpu_router_optimizer_actions_total", {"action": "unload", "result": "failure"}) == 1
    assert value("gpu_router_optimizer_actions_total", {"action": "load", "result": "failure"}) == 0
    assert value("gpu_router_optimizer_remediation_seconds_sum") == 42
    assert value("gpu_router_optimizer_remediation_seconds_count") == 1
    assert value("gpu_router_optimizer_queue_depth") == 0
    text = generate_latest(metrics.registry).decode()
    assert 'gpu_router_optimizer_webhooks_total{outcome="unauthorized"} 0.0' in text


def test_history_keeps_the_last_entries_only(make_queue):
    many = tuple(record("a:latest", outcome=f"n{i}") for i in range(HISTORY + 50))
    queue = make_queue(Recorder(JobResult(ok=True, actions=many)))
    queue.submit("a")
    assert queue.wait_idle(5)
    kept = queue.actions()
    assert len(kept) == HISTORY
    assert kept[0].outcome == "n50" and kept[-1].outcome == f"n{HISTORY + 49}"


def test_stop_drops_queued_jobs_and_waits_for_the_running_one():
    job = Recorder()
    job.gate.clear()
    queue = JobQueue(CONFIG, job, workers=1).start()
    try:
        queue.submit("a")
        assert job.running.wait(5)
        queue.submit("b")
        started = time.monotonic()
        assert not queue.stop(0.2)  # the running job is still held
        assert time.monotonic() - started < 2
        assert queue.stopping.is_set()
        assert [j["model"] for j in queue.jobs()] == ["a:latest"]
    finally:
        job.gate.set()
    assert queue.stop(5)
    assert job.runs == ["a:latest"]  # b was dropped, never run
