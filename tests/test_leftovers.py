"""A CPU copy the optimizer could not remove after the GPU copy was verified (its node failed to answer) is
removed by a later reconcile pass once the node answers again."""

from __future__ import annotations

from conftest import optimizer_parts

from cli.localstack import wait_for

MODEL = "llama3.1:8b"


def test_a_copy_left_behind_is_removed_by_a_later_pass():
    nodes = [
        {"name": "gpu", "gpus": [{"vram": "8GiB"}], "models": [MODEL], "load_speed": "2GB"},
        {"name": "cpu", "models": [MODEL], "preload": [{"model": MODEL, "keep_alive": -1}]},
    ]
    with optimizer_parts(nodes, [MODEL], vram={"gpu": "8GiB", "cpu": 0}) as (fleet, _, reconciler, queue):
        queue.submit(MODEL, source="test")
        wait_for(lambda: any(m["loading"] for m in fleet.node("gpu").state()["loaded"]), timeout=10)
        fleet.node("cpu").inject("error")  # the CPU node stops answering while the GPU copy loads
        assert queue.wait_idle(30)
        unload = [a for a in queue.actions() if a.action == "unload"]
        assert [(a.node, a.outcome) for a in unload] == [("cpu", "failure")]
        assert [m["model"] for m in fleet.node("cpu").state()["loaded"]] == [MODEL]  # left behind
        reconciler.run_once()
        assert queue.wait_idle(30)
        assert fleet.node("cpu").state()["loaded"]  # still unreachable: nothing to do yet
        fleet.node("cpu").clear("error")
        reconciler.run_once()
        assert queue.wait_idle(30)
        assert fleet.node("cpu").state()["loaded"] == []
        last = [a for a in queue.actions() if a.action == "unload"][-1]
        assert (last.node, last.outcome) == ("cpu", "success")
        assert fleet.node("gpu").state()["loaded"][0]["size_vram"] > 0
