"""The pure parts of the heal loop: an inference of memory held outside Ollama lives one cooldown at most and
goes as soon as a poll can contradict it; a priority copy that lost its pin gets a `pin` step."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_decide import NOW, build, lm, node

from gpurouter.cluster.state import ClusterState
from gpurouter.decide.placement import plan, unpinned
from gpurouter.sizing.hidden import HiddenUsage
from proxy.options import pin_for

P = "llama3.2:3b"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def gpu_node(*loaded) -> ClusterState:
    return build([node("gpu", (8192,), loaded=tuple(loaded), installed=(P,))], [P], {P: 2400})


def evidence(clock: Clock, state: ClusterState, model: str | None = P) -> HiddenUsage:
    hidden = HiddenUsage(ttl=30.0, clock=clock)
    hidden.record("gpu", 3000 * 2**20, "a load landed short", model)
    hidden.observe(state)  # the first poll after it: what backs it
    return hidden


def test_an_inference_lasts_one_cooldown_without_new_evidence():
    clock = Clock()
    state = gpu_node(lm(P, 2400, 1800), lm("llama3.2:1b", 1300))
    hidden = evidence(clock, state)
    clock.now += 29
    hidden.observe(state)
    assert hidden.get("gpu") is not None
    clock.now += 2
    assert hidden.get("gpu") is None


@pytest.mark.parametrize(
    "later",
    [
        (lm("llama3.2:1b", 1300),),  # the copy that gave the evidence is gone
        (lm(P, 2400, 1200), lm("llama3.2:1b", 1300)),  # reloaded: another placement
        (lm(P, 2400), lm("llama3.2:1b", 1300)),  # fully on GPU now
        (),  # nothing listed at all: the node restarted
        (lm(P, 2400, 1800), lm("llama3.2:1b", 1300), lm("qwen2.5-coder:1.5b", 3500)),  # more in use than it allows
    ],
    ids=["gone", "reloaded", "on-gpu", "restart", "room"],
)
def test_a_poll_that_can_contradict_the_inference_drops_it(later):
    clock = Clock()
    hidden = evidence(clock, gpu_node(lm(P, 2400, 1800), lm("llama3.2:1b", 1300)))
    hidden.observe(gpu_node(*later))
    assert hidden.get("gpu") is None


def test_the_same_poll_again_keeps_it_and_a_down_node_drops_it():
    clock = Clock()
    state = gpu_node(lm(P, 2400, 1800), lm("llama3.2:1b", 1300))
    hidden = evidence(clock, state)
    hidden.observe(state)
    assert hidden.get("gpu") is not None
    down = replace(state, nodes=tuple(replace(n, up=False, loaded=()) for n in state.nodes))
    hidden.observe(down)
    assert hidden.get("gpu") is None


def test_a_partial_copy_seen_in_a_poll_is_no_evidence():
    hidden = HiddenUsage(ttl=30.0, clock=Clock())
    hidden.observe(gpu_node(lm("llama3.2:1b", 1300, 100)))  # a client's num_gpu: 1, or memory held? unknown
    assert hidden.get("gpu") is None


def pinned(expires: float, keep_alive: object = -1, busy: bool = False) -> list[tuple[str, str, str]]:
    state = build(
        [node("gpu", (8192,), loaded=(lm(P, 2400, expires=NOW - 5 if busy else expires),), installed=(P,))],
        [{"name": P, "keep_alive": keep_alive}],
        {P: 2400},
    )
    return [(s.action, s.model, s.node) for s in unpinned(state, NOW)]


def test_a_priority_copy_that_lost_its_pin_gets_a_pin_step():
    assert pinned(NOW + 300) == [("pin", P, "gpu")]  # Ollama's 5 minutes, configured forever
    assert pinned(NOW + 292 * 365 * 86400) == []  # forever
    assert pinned(NOW + 300, busy=True) == []  # busy: no expiry to judge
    assert pinned(NOW + 292 * 365 * 86400, keep_alive="10m") == [("pin", P, "gpu")]  # longer than configured
    assert pinned(NOW + 300, keep_alive="10m") == []  # could be 10 minutes, idle for 5


def test_the_plan_pins_a_copy_it_does_not_replace():
    state = gpu_node(lm(P, 2400, expires=NOW + 300))
    assert [(s.action, s.node) for s in plan(state, now=NOW).steps] == [("pin", "gpu")]


def test_only_the_first_gpu_copy_of_a_priority_model_is_pinned():
    """A further GPU copy (the proxy's, for load) keeps its own keep_alive: pinned, it would stay for good."""
    copies = {"a": lm(P, 2400, expires=NOW + 292 * 365 * 86400), "b": lm(P, 2400, expires=NOW + 300)}
    nodes = [node(name, (8192,), loaded=(copy,), installed=(P,)) for name, copy in copies.items()]
    state = build(nodes, [P], {P: 2400})
    assert unpinned(state, NOW) == []
    copies["a"] = lm(P, 2400, expires=NOW + 300)
    state = build(
        [node(name, (8192,), loaded=(copy,), installed=(P,)) for name, copy in copies.items()], [P], {P: 2400}
    )
    assert [(s.action, s.node) for s in unpinned(state, NOW)] == [("pin", "a")]
    assert pin_for(state, P, "a", state.config.priority(P)) == state.config.priority(P)
    assert pin_for(state, P, "b", state.config.priority(P)) is None  # a request to the other copy: its own
    assert pin_for(state, "other", "b", None) is None
