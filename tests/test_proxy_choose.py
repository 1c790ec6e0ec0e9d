"""The proxy's routing rules, as pure functions over hand-built cluster states (gpurouter.decide.route)."""

from __future__ import annotations

from dataclasses import replace

from test_decide import NOW, build, lm, node

from gpurouter.decide.route.ask import Ask, runner_options
from gpurouter.decide.route.candidates import corrected
from gpurouter.decide.route.pipeline import Choice
from gpurouter.decide.route.pipeline import choose as run
from gpurouter.decide.route.traffic import WHOLE_NODE, Traffic

M = "llama3.1:latest"


def choose(state, model, options, traffic, now) -> Choice:
    return run(state, Ask(model, runner_options(options)), traffic, now)


def pairs(choice: Choice) -> tuple[tuple[str, str], ...]:
    return tuple((t.node, t.placement) for t in choice.targets)


def nodes_of(choice) -> list[str]:
    return choice.nodes


def flights(**by_node: int) -> dict:
    return {(n, M): v for n, v in by_node.items()}


def failing(*nodes: str) -> frozenset:
    return frozenset((n, WHOLE_NODE) for n in nodes)


def test_fully_on_gpu_first_least_in_flight_first():
    state = build(
        [
            node("a", (8192,), loaded=(lm(M, 5000),)),
            node("b", (8192,), loaded=(lm(M, 5000),)),
            node("c", (), loaded=(lm(M, 5000, 0),)),
        ],
        needs={M: 5000},
    )
    picked = choose(state, M, {}, Traffic(), NOW)
    assert pairs(picked)[:2] == (("a", "gpu"), ("b", "gpu")) and pairs(picked)[2] == ("c", "cpu")
    busy = choose(state, M, {}, Traffic(in_flight=flights(a=2, b=1)), NOW)
    assert nodes_of(busy)[:2] == ["b", "a"]
    assert not picked.heal


def test_a_runner_with_matching_options_wins_over_a_reload():
    a = replace(lm(M, 5000), context_length=4096)
    b = replace(lm(M, 5000), context_length=8192)
    state = build([node("a", (8192,), loaded=(a,)), node("b", (8192,), loaded=(b,))], needs={M: 5000})
    assert nodes_of(choose(state, M, {"num_ctx": 8192}, Traffic(in_flight=flights(b=5)), NOW))[0] == "b"
    assert nodes_of(choose(state, M, {"num_ctx": 4096}, Traffic(in_flight=flights(a=5)), NOW))[0] == "a"
    assert nodes_of(choose(state, M, {}, Traffic(in_flight=flights(a=5)), NOW))[0] == "b"
    assert nodes_of(choose(state, M, {"num_gpu": 0}, Traffic(), NOW)) == ["a", "b"]  # both reload: by load


def test_cold_load_where_route_puts_it_never_evicting_priority_or_busy():
    state = build(
        [
            node("small", (4096,), installed=(M,)),
            node("cpu", (), loaded=(lm(M, 5000, 0),)),
            node("large", (8192,), installed=(M,), loaded=(lm("other:latest", 2000),)),
        ],
        needs={M: 5000, "other:latest": 2000},
    )
    picked = choose(state, M, {}, Traffic(), NOW)
    assert pairs(picked)[0] == ("large", "cold")  # fits beside the idle model (or after evicting it)
    assert ("cpu", "cpu") in pairs(picked)
    # the other model is busy with a request through the proxy and a priority model: no room without evicting
    tight = build(
        [
            node("cpu", (), loaded=(lm(M, 5000, 0),)),
            node("large", (8192,), installed=(M,), loaded=(lm("keep:latest", 3000),)),
        ],
        priority=["keep"],
        needs={M: 5000, "keep:latest": 3000},
    )
    picked = choose(tight, M, {}, Traffic(), NOW)
    assert pairs(picked)[0] == ("cpu", "cpu")


def test_partial_or_cpu_only_when_nothing_better_and_a_priority_model_asks_for_heal():
    state = build(
        [
            node("cpu", (), loaded=(lm(M, 5000, 0),)),
            node("part", (4096,), loaded=(lm(M, 5000, 3000),)),
        ],
        priority=[M],
        needs={M: 5000},
    )
    picked = choose(state, M, {}, Traffic(), NOW)
    assert pairs(picked) == (("part", "partial"), ("cpu", "cpu"))
    assert picked.heal
    plain = build([node("cpu", (), loaded=(lm(M, 5000, 0),))], needs={M: 5000})
    assert not choose(plain, M, {}, Traffic(), NOW).heal  # not a priority model


def test_down_maintenance_and_not_installed_are_never_candidates():
    state = build(
        [
            node("down", (8192,), loaded=(lm(M, 5000),), up=False),
            node("drained", (8192,), loaded=(lm(M, 5000),), maintenance=True),
            node("without", (8192,)),
        ],
        needs={M: 5000},
    )
    picked = choose(state, M, {}, Traffic(), NOW)
    assert picked.targets == () and picked.placement == "none"


def test_nodes_that_failed_come_last():
    state = build([node("a", (8192,), loaded=(lm(M, 5000),)), node("b", (8192,), loaded=(lm(M, 5000),))])
    assert nodes_of(choose(state, M, {}, Traffic(failing=failing("a")), NOW)) == ["b", "a"]


def test_own_traffic_corrects_the_view():
    state = build(
        [node("large", (8192,), installed=(M,), loaded=(lm("other:latest", 5000, expires=NOW + 60),))],
        needs={M: 5000, "other:latest": 5000},
    )
    assert pairs(choose(state, M, {}, Traffic(), NOW))[0] == ("large", "cold")  # after evicting the idle one
    # a request the proxy has in flight makes that model busy: it is never evicted for a cold load
    busy = Traffic(in_flight={("large", "other:latest"): 1})
    refused = choose(state, M, {}, busy, NOW)
    assert refused.targets == () and refused.dropped[0][0] == "large" and "other:latest" in refused.reason
    # a cold load the proxy caused counts as on GPU there until a poll shows it
    empty = build([node("a", (8192,), installed=(M,)), node("b", (8192,), installed=(M,))], needs={M: 5000})
    sent = Traffic(loading=frozenset({("b", M)}))
    assert pairs(choose(empty, M, {}, sent, NOW))[0] == ("b", "cold")  # joins the load under way
    assert corrected(empty, sent).node("b").loaded_model(M).fully_on_gpu


def test_behind_a_gpu_copy_a_gpu_node_that_loads_it_comes_before_a_cpu_copy_and_failures_go_last():
    state = build(
        [
            node("a-cpu", (), loaded=(lm(M, 5000, 0),)),
            node("b-gpu", (8192,), loaded=(lm(M, 5000),)),
            node("c-gpu", (8192,), installed=(M,)),
        ],
        needs={M: 5000},
    )
    picked = choose(state, M, {}, Traffic(), NOW)
    assert pairs(picked) == (("b-gpu", "gpu"), ("c-gpu", "cold"), ("a-cpu", "cpu"))
    after_a_failure = choose(state, M, {}, Traffic(failing=failing("b-gpu")), NOW)
    assert nodes_of(after_a_failure) == ["c-gpu", "a-cpu", "b-gpu"]
