"""The six ways the heal loop stranded a priority model (issue 17, "Why"), one test each, against the simulator
and the optimizer's real job, queue and reconcile pass. Each of them failed on the code before the fix."""

from __future__ import annotations

import time
from collections.abc import Callable

import requests
from conftest import bench_module, optimizer_parts

from gpurouter import render
from gpurouter.act import execute
from gpurouter.act.jobs import Job, JobQueue, Remediator
from gpurouter.cluster.ollama import parse_go_time
from gpurouter.decide import placement
from gpurouter.units import GIB
from optimizer.reconcile import Reconciler
from simulator.run import Fleet

PRIORITY = "llama3.2:3b"
OTHER = "llama3.2:1b"
matrix = bench_module("heal_matrix")


def nodes(version: str = "0.32.15", gpu_preload: tuple[dict, ...] = (), cpu_copy: bool = True) -> list[dict]:
    """An 8 GiB GPU node and a CPU node; the priority model on the CPU node unless `cpu_copy` is False."""
    return [
        {"name": "gpu", "version": version, "gpus": [{"vram": "8GiB"}], "models": [PRIORITY, OTHER]}
        | {"preload": list(gpu_preload)},
        {"name": "cpu", "version": version, "models": [PRIORITY]}
        | {"preload": [{"model": PRIORITY, "keep_alive": -1}] if cpu_copy else []},
    ]


VRAM = {"gpu": "8GiB", "cpu": 0}


def cooldown(seconds: float) -> dict[str, dict[str, float]]:
    return {"optimizer": {"cooldown_seconds": seconds, "cooldown_max_seconds": seconds, "load_timeout": 30}}


def on_gpu(fleet: Fleet) -> bool:
    return any(e["model"] == PRIORITY and e["size_vram"] == e["size"] for e in fleet.node("gpu").state()["loaded"])


def copies(fleet: Fleet) -> list[str]:
    return [name for name in ("gpu", "cpu") if any(e["model"] == PRIORITY for e in fleet.node(name).state()["loaded"])]


def passes_until(done: Callable[[], bool], reconciler: Reconciler, queue: JobQueue, seconds: float) -> float:
    """Reconcile passes (each waited out) until `done`; the seconds it took (fails past `seconds`)."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < seconds, f"not done within {seconds:g}s"
        reconciler.run_once()
        assert queue.wait_idle(30)
    return time.monotonic() - started


def nothing_running(queue: JobQueue, seconds: float) -> bool:
    """Wait until no job runs (queued ones may wait out a cooldown); False when `seconds` passed first."""
    deadline = time.monotonic() + seconds
    while any(j["state"] == "running" for j in queue.jobs()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_case_1_a_clients_num_gpu_copy_plants_no_hidden_memory():
    """`num_gpu: 1` from a client leaves a model 1 layer on GPU on an empty GPU: no memory is inferred held
    outside Ollama from it, and the priority model goes onto that GPU at once."""
    client_copy = {"model": OTHER, "keep_alive": -1, "num_gpu": 1}
    with optimizer_parts(nodes(gpu_preload=(client_copy,)), [PRIORITY], VRAM) as (fleet, observer, reconciler, queue):
        assert observer.poll().node("gpu").hidden == 0
        reconciler.run_once()
        assert queue.wait_idle(30)
        assert on_gpu(fleet)


def test_case_2_memory_a_hog_held_during_the_one_attempt_is_retested_one_cooldown_after():
    """A hog during the only load attempt: the copy landed short (the evidence) and was removed again. Once the
    hog lets go, the priority model is on GPU within two cooldowns — the inference lasts one."""
    with optimizer_parts(nodes(), [PRIORITY], VRAM, **cooldown(1.0)) as (fleet, observer, reconciler, queue):
        fleet.node("gpu").inject("vram_hog", bytes=5 * GIB)
        reconciler.run_once()
        assert queue.wait_idle(30)
        (load,) = [a for a in queue.actions() if a.action == "load"]
        assert load.outcome == "failure" and "landed" in load.detail
        assert observer.poll().node("gpu").hidden > 0
        fleet.node("gpu").clear()
        assert passes_until(lambda: on_gpu(fleet), reconciler, queue, 2 * 1.0 + 1.0) <= 3.0


class _Vanishing:
    """A node's client whose loads Ollama undoes at once (as for a busy client's request)."""

    def __init__(self, client: object, fleet: Fleet, node: str) -> None:
        self._client, self._fleet, self._node = client, fleet, node

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)

    def load(self, model: str, **kwargs: object) -> None:
        self._client.load(model, **kwargs)  # type: ignore[attr-defined]
        self._fleet.node(self._node).scheduler.unload_all()


def test_case_3_a_fresh_copy_that_vanishes_fails_the_step_at_once_and_is_recorded_by_ollama():
    with optimizer_parts(nodes(), [PRIORITY], VRAM, **cooldown(1.0)) as (fleet, observer, _, _):
        observer.clients["gpu"] = _Vanishing(observer.clients["gpu"], fleet, "gpu")  # type: ignore[assignment]
        started = time.monotonic()
        result = Remediator(observer.config, observer)(Job(model=PRIORITY, received=0.0, not_before=0.0))
        assert time.monotonic() - started < 5  # not the 30 s load_timeout
        steps = [(a.action, a.node, a.outcome) for a in result.actions]
        assert ("load", "gpu", "failure") in steps and ("evict", "gpu", "by_ollama") in steps
        assert any("gone" in a.detail for a in result.actions)
        assert copies(fleet) == ["cpu"]  # still served


def test_case_4_the_last_copy_is_not_removed_when_the_gpu_copy_is_gone_again():
    """Ollama evicts the fresh GPU copy right after it was verified (for the next load, under a too-big static
    vram): the CPU copy, now the last one, stays."""
    with optimizer_parts(nodes(), [PRIORITY], {"gpu": "12GiB", "cpu": 0}) as (fleet, observer, _, _):
        state = observer.poll()
        plan = placement.plan(state, now=time.time())
        assert [s.action for s in plan.steps] == ["load", "unload"]

        def evicted_after_verification(kind: str, step: placement.Step, _: str) -> None:
            if kind == "done" and step.action == "load":
                fleet.node("gpu").scheduler.unload_all()

        run = execute.execute(
            plan, state, observer.clients, load_timeout=30, on_event=evicted_after_verification, poll_interval=0.05
        )
        load, unload = run.outcomes
        assert load.ok and load.verified
        assert not unload.ok and unload.skipped and "gone again" in unload.detail
        assert copies(fleet) == ["cpu"]


def test_case_5_a_priority_model_without_its_pin_is_pinned_again_without_a_reload():
    """Brought back by a client after a restart with Ollama's 5-minute keep_alive: the dry run says it will be
    pinned, and one reconcile pass pins it with a same-options request (no reload)."""
    client_copy = {"model": PRIORITY, "keep_alive": "5m"}
    with optimizer_parts(nodes(gpu_preload=(client_copy,), cpu_copy=False), [PRIORITY], VRAM) as parts:
        fleet, observer, reconciler, queue = parts
        state = observer.poll()
        text = "\n".join(render.plan_text(placement.plan(state, now=time.time()), state, time.time()))
        assert "pin llama3.2:3b on gpu (keep_alive -1)" in text, text
        loads = fleet.node("gpu").counts()[PRIORITY]["loads"]
        reconciler.run_once()
        assert queue.wait_idle(30)
        (entry,) = fleet.node("gpu").state()["loaded"]
        assert parse_go_time(entry["expires_at"]).timestamp() - time.time() > 10 * 365 * 86400
        assert fleet.node("gpu").counts()[PRIORITY]["loads"] == loads  # the same runner
        assert [(a.action, a.outcome) for a in queue.actions()] == [("pin", "success")]


def test_case_6_ollama_evicts_a_model_a_client_keeps_using_for_our_load_at_most_once():
    """Classic node, static capacity blind to a 4.5 GiB hog, a client using another model between the optimizer's
    passes: the first load makes Ollama evict the client's model (no figure could foresee it), and the client
    brings it back, evicting the priority model. That surprise is counted: no later pass within the cooldown asks
    a load that makes Ollama evict the client's model again, and the priority model is served meanwhile."""
    client_copy = {"model": OTHER, "keep_alive": -1}
    version = "0.12.6"
    with optimizer_parts(nodes(version, (client_copy,)), [PRIORITY], VRAM, **cooldown(10.0)) as parts:
        fleet, _, reconciler, queue = parts
        evictions = matrix.Evictions(fleet.node("gpu"), OTHER)
        fleet.node("gpu").inject("vram_hog", bytes=int(4.5 * GIB))  # the priority model fits alone
        body = {"model": OTHER, "prompt": "hi", "stream": False, "keep_alive": -1}
        for _ in range(4):
            reconciler.run_once()
            assert nothing_running(queue, 10)
            requests.post(fleet.urls["gpu"] + "/api/generate", json=body, timeout=30).raise_for_status()
        assert evictions.count == 1
        assert copies(fleet), "the priority model has no copy"


def test_a_restart_right_after_a_heal_is_healed_at_once():
    """The no-loop wait is for a copy another model displaced, not for a restart: within the cooldown of the
    first heal, the next pass puts the model back on GPU."""
    with optimizer_parts(nodes(), [PRIORITY], VRAM, **cooldown(30.0)) as (fleet, _, reconciler, queue):
        reconciler.run_once()
        assert queue.wait_idle(30) and on_gpu(fleet)
        fleet.node("gpu").inject("restart")
        assert copies(fleet) == []
        reconciler.run_once()
        assert queue.wait_idle(30) and on_gpu(fleet)
