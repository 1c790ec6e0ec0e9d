"""A partial or CPU copy on its only possible node heals as soon as room exists, in both eras; a forced load
that runs out of memory leaves the model served. Real simulator, real optimizer job queue and reconcile pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests
from conftest import optimizer_parts

from gpurouter.act.jobs import JobQueue
from gpurouter.units import GIB
from optimizer.reconcile import Reconciler
from simulator.run import Fleet

MODEL = "llama3.2:3b"


@contextmanager
def cluster(version: str) -> Iterator[tuple[Fleet, Reconciler, JobQueue]]:
    """One GPU node (4 GiB, static capacity) that is the model's only GPU home, with the optimizer's parts."""
    node = {"name": "ws", "version": version, "gpus": [{"vram": "4GiB"}], "models": [MODEL]}
    with optimizer_parts([node], [MODEL], {"ws": "4GiB"}) as (fleet, _, reconciler, queue):
        yield fleet, reconciler, queue


def copy(fleet: Fleet) -> dict:
    (entry,) = fleet.node("ws").state()["loaded"]
    return entry


def counts(fleet: Fleet) -> dict[str, int]:
    return fleet.node("ws").counts().get("llama3.2:3b", {"loads": 0, "unloads": 0})


def load_by_a_client(fleet: Fleet) -> None:
    body = {"model": MODEL, "prompt": "", "stream": False, "keep_alive": -1}
    assert requests.post(fleet.urls["ws"] + "/api/generate", json=body, timeout=30).status_code == 200


def one_pass(reconciler: Reconciler, queue: JobQueue) -> list[str]:
    missing = reconciler.run_once()
    assert queue.wait_idle(30)
    return missing


@pytest.mark.parametrize("version", ["0.12.6", "0.32.15"])
def test_a_partial_copy_heals_in_one_pass_once_the_other_process_lets_go(version):
    with cluster(version) as (fleet, reconciler, queue):
        fleet.node("ws").inject("vram_hog", bytes=int(1.5 * GIB))
        load_by_a_client(fleet)
        assert 0 < copy(fleet)["size_vram"] < copy(fleet)["size"]  # partly on CPU
        fleet.node("ws").clear("vram_hog")
        before = counts(fleet)
        assert one_pass(reconciler, queue) == [MODEL]
        assert copy(fleet)["size_vram"] == copy(fleet)["size"]  # fully on GPU
        after = counts(fleet)
        assert (after["loads"] - before["loads"], after["unloads"] - before["unloads"]) == (1, 1)  # one reload
        assert one_pass(reconciler, queue) == []  # and nothing more to do
        assert counts(fleet) == after


def test_a_classic_copy_left_partial_by_an_earlier_attempt_still_heals_in_one_pass():
    """The stuck case: an attempt during the hog leaves a runner loaded with every layer asked for, yet partial;
    the same request again would change nothing in Ollama."""
    with cluster("0.12.6") as (fleet, reconciler, queue):
        fleet.node("ws").inject("vram_hog", bytes=int(1.5 * GIB))
        load_by_a_client(fleet)
        one_pass(reconciler, queue)  # blind to the other process: tries, lands partial, keeps the only copy
        assert 0 < copy(fleet)["size_vram"] < copy(fleet)["size"]
        fleet.node("ws").clear("vram_hog")
        before = counts(fleet)
        one_pass(reconciler, queue)
        assert copy(fleet)["size_vram"] == copy(fleet)["size"]
        after = counts(fleet)
        assert (after["loads"] - before["loads"], after["unloads"] - before["unloads"]) == (1, 1)


def test_a_forced_load_that_runs_out_of_memory_leaves_the_model_served():
    with cluster("0.32.15") as (fleet, reconciler, queue):
        fleet.node("ws").inject("vram_hog", bytes=int(1.7 * GIB))  # 2.3 GiB free < the 2.4 GiB footprint
        load_by_a_client(fleet)
        one_pass(reconciler, queue)  # every layer forced while the other process holds the memory: out of memory
        entry = copy(fleet)  # loaded again the way Ollama places it by itself
        assert 0 < entry["size_vram"] < entry["size"]
        (action,) = [a for a in queue.actions() if a.action == "load"]
        assert action.outcome == "failure"
        assert "out of memory" in action.detail and "loaded again" in action.detail and "stays served" in action.detail
