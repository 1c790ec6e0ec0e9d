"""Fault injection: VRAM held by another process while the capacity is static (the router cannot see it).
After the first surprise of the router's own load the fit answers are honest for one cooldown, and every model
Ollama unloads is recorded. A copy a client loaded is no evidence: its options are not listed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from conftest import optimizer_parts

from exporter.collector import cluster_families
from gpurouter import render
from gpurouter.act.jobs import JobQueue
from gpurouter.cluster.config import model_key
from gpurouter.cluster.observe import Observer
from gpurouter.decide.placement import check
from gpurouter.units import GIB
from optimizer.reconcile import Reconciler
from simulator.run import Fleet

PRIORITY = "llama3.1:8b"
OTHERS = ["mxbai-embed-large", "llama3.2:3b", "qwen2.5-coder:1.5b", "nomic-embed-text", "llama3.2:1b"]


COOLDOWN = 30.0  # long enough that an inference outlives each test (it lasts one cooldown)


def cooldown(seconds: float = COOLDOWN) -> dict[str, dict[str, float]]:
    return {"optimizer": {"cooldown_seconds": seconds, "cooldown_max_seconds": seconds, "load_timeout": 20}}


@contextmanager
def cluster(
    preload_gpu: list[dict] | None = None, seconds: float = COOLDOWN
) -> Iterator[tuple[Fleet, Observer, Reconciler, JobQueue]]:
    """An 8 GiB GPU node and a CPU node serving the priority model, capacity static (blind to other users)."""
    nodes = [
        {"name": "gpu", "gpus": [{"vram": "8GiB"}], "models": [PRIORITY, *OTHERS], "preload": preload_gpu or []},
        {"name": "cpu", "models": [PRIORITY], "preload": [{"model": PRIORITY, "keep_alive": -1}]},
    ]
    with optimizer_parts(nodes, [PRIORITY], {"gpu": "8GiB", "cpu": 0}, **cooldown(seconds)) as parts:
        yield parts


def fits_free(observer: Observer) -> dict[str, bool]:
    state = observer.poll()
    values = {}
    for family in cluster_families(state, "t", 0):
        for s in family.samples:
            if s.name == "gpu_router_model_fits_free" and s.labels["node"] == "gpu":
                values[s.labels["model"]] = bool(s.value)
    return values


def lands_fully(fleet: Fleet, model: str) -> bool:
    """Load `model` alone beside the other process's memory, as a client would; fully on GPU?"""
    fleet.node("gpu").scheduler.unload_all()
    url = fleet.urls["gpu"]
    if "embed" in model:
        requests.post(url + "/api/embed", json={"model": model, "input": []}, timeout=30).raise_for_status()
    else:
        requests.post(url + "/api/generate", json={"model": model, "prompt": ""}, timeout=30).raise_for_status()
    (entry,) = fleet.node("gpu").state()["loaded"]
    fleet.node("gpu").scheduler.unload_all()
    return entry["size_vram"] == entry["size"]


def unloads(fleet: Fleet, node: str) -> dict[str, int]:
    return {m: c["unloads"] for m, c in fleet.node(node).counts().items() if c["unloads"]}


def test_after_the_first_surprise_the_fit_answers_are_honest():
    with cluster() as (fleet, observer, reconciler, queue):
        fleet.node("gpu").inject("vram_hog", bytes=3 * GIB)
        assert fits_free(observer)[PRIORITY]  # blind: it believes 8 GiB are free
        reconciler.run_once()
        assert queue.wait_idle(30)
        (load,) = [a for a in queue.actions() if a.action == "load"]
        assert load.outcome == "failure" and "landed" in load.detail and "still served on cpu" in load.detail
        state = observer.poll()
        gpu = state.node("gpu")
        assert 3 * GIB <= gpu.hidden <= 3.25 * GIB, gpu.hidden  # the other process's 3 GiB, inferred (≤ a layer over)
        verdict = next(v for v in check(state, PRIORITY, state.taken_at).verdicts if v.node == "gpu")
        assert not verdict.fits
        assert any("held outside Ollama" in line for line in render.status_text(state, state.taken_at))
        answers = fits_free(observer)
        for model in [PRIORITY, *OTHERS]:
            promised = answers[model_key(model)]
            assert lands_fully(fleet, model) or not promised, model  # what it says fits does land fully
        assert answers[PRIORITY] is False and answers["llama3.2:1b"] is True


def test_a_model_ollama_evicts_on_its_own_is_recorded():
    preload = [{"model": "nomic-embed-text", "keep_alive": "5m"}]  # idle, not a priority model
    with cluster(preload) as (fleet, _, reconciler, queue):
        fleet.node("gpu").inject("vram_hog", bytes=int(1.8 * GIB))  # enough to fail Ollama's admission test
        reconciler.run_once()
        assert queue.wait_idle(30)
        records = queue.actions()
        steps = [(a.action, a.model, a.node, a.outcome) for a in records]
        assert ("load", "llama3.1:8b", "gpu", "success") in steps
        assert ("evict", "nomic-embed-text:latest", "gpu", "by_ollama") in steps  # not in the plan, still recorded
        metric = queue.metrics.registry.get_sample_value(
            "gpu_router_optimizer_actions_total", {"action": "evict", "result": "by_ollama"}
        )
        assert metric == 1
        # every unload the simulator counted is one the router recorded
        recorded = {(a.node, a.model) for a in records if a.action in ("evict", "unload") and a.outcome != "failure"}
        counted = {(node, model) for node in ("gpu", "cpu") for model in unloads(fleet, node)}
        assert counted == recorded


def test_after_ollama_evicts_a_priority_model_to_admit_a_load_no_plan_asks_for_that_again():
    """Blind to a 1.8 GiB process, the first load makes Ollama's 80 % admission test evict the other priority
    model (recorded); the eviction says how much is held elsewhere, so no later plan repeats it."""
    preload = [{"model": "nomic-embed-text", "keep_alive": "5m"}]
    nodes = [
        {"name": "gpu", "gpus": [{"vram": "8GiB"}], "models": [PRIORITY, *OTHERS], "preload": preload},
        {"name": "cpu", "models": [PRIORITY], "preload": [{"model": PRIORITY, "keep_alive": -1}]},
    ]
    with optimizer_parts(nodes, [PRIORITY, "nomic-embed-text"], {"gpu": "8GiB", "cpu": 0}, **cooldown(3.0)) as parts:
        fleet, observer, reconciler, queue = parts
        fleet.node("gpu").inject("vram_hog", bytes=int(1.8 * GIB))
        reconciler.run_once()
        assert queue.wait_idle(30)
        steps = [(a.action, a.model, a.outcome) for a in queue.actions()]
        assert ("evict", "nomic-embed-text:latest", "by_ollama") in steps  # the first surprise, recorded
        assert observer.poll().node("gpu").hidden > 0
        # the router puts things back as a client would find them: the big model on CPU, the embedder on GPU
        fleet.node("gpu").scheduler.unload_all()
        requests.post(
            fleet.urls["gpu"] + "/api/embed", json={"model": "nomic-embed-text", "input": []}, timeout=30
        ).raise_for_status()
        fleet.node("cpu").scheduler.unload_all()
        requests.post(
            fleet.urls["cpu"] + "/api/generate", json={"model": PRIORITY, "prompt": "", "keep_alive": -1}, timeout=30
        ).raise_for_status()
        evictions = unloads(fleet, "gpu").get("nomic-embed-text:latest", 0)
        reconciler.run_once()
        assert queue.wait_idle(30)
        assert unloads(fleet, "gpu").get("nomic-embed-text:latest", 0) == evictions  # not asked for again
        assert [m["model"] for m in fleet.node("gpu").state()["loaded"]] == ["nomic-embed-text:latest"]


def test_a_clients_partial_copy_is_no_evidence_the_routers_own_attempt_is_and_the_retest_heals_it():
    """A copy a client loaded partly on GPU says nothing (its num_gpu is not listed): the router tries. Its own
    attempt, out of memory beside the other process, leaves the model served and is the evidence: the fit
    answers are honest until one cooldown has passed; then a fresh attempt heals it once the memory is back."""
    with cluster(seconds=2.0) as (fleet, observer, reconciler, queue):
        fleet.node("gpu").inject("vram_hog", bytes=4 * GIB)
        requests.post(fleet.urls["gpu"] + "/api/generate", json={"model": PRIORITY, "prompt": ""}, timeout=30)
        state = observer.poll()
        (copy,) = state.node("gpu").loaded
        assert 0 < copy.size_vram < copy.size and state.node("gpu").hidden == 0  # a client's copy: no inference
        reconciler.run_once()
        assert queue.wait_idle(30)
        (load,) = [a for a in queue.actions() if a.action == "load"]
        assert load.outcome == "failure" and "out of memory" in load.detail
        state = observer.poll()
        assert state.node("gpu").hidden > 3 * GIB
        verdict = next(v for v in check(state, PRIORITY, state.taken_at).verdicts if v.node == "gpu")
        assert not verdict.fits and "held outside Ollama" in verdict.reason
        fleet.node("gpu").clear()  # the other process lets go: the retest after one cooldown heals it
        deadline = time.monotonic() + 20
        while not any(e["size_vram"] == e["size"] for e in fleet.node("gpu").state()["loaded"]):
            assert time.monotonic() < deadline, fleet.node("gpu").state()["loaded"]
            reconciler.run_once()
            assert queue.wait_idle(30)
