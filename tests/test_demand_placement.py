"""Placement from demand (gpurouter.decide.demand): pure decisions on built cluster states, a test per rule."""

from __future__ import annotations

import pytest
from test_decide import NOW, build, lm, node

from gpurouter.act.demandplan import Planner
from gpurouter.cluster.config import ConfigError, DemandSettings, PriorityModel, parse_config
from gpurouter.cluster.demandfeed import NOT_READ, DemandFeed, ModelDemand, parse_demand
from gpurouter.decide import placement
from gpurouter.decide.demand import desired

ON = DemandSettings(proxy_url="http://127.0.0.1:11434")  # the defaults: 1 request/min, min_gain 0.5, 30m


def want(model: str, per_minute: float, **more) -> ModelDemand:
    return ModelDemand(f"{model}:latest", requests_per_second=per_minute / 60, **more)


def demand(*rows: ModelDemand) -> dict[str, ModelDemand]:
    return {d.model: d for d in rows}


def steps(result) -> list[tuple[str, str, str]]:
    return [(s.action, s.model, s.node) for s in result.plan.steps]


def test_without_demand_the_plan_is_the_priority_list_only():
    """No reading (no proxy, or demand.placement: false): exactly the plan of the priority models."""
    state = build([node("a", installed=("p", "hot"))], priority=["p"], needs={"p": 1000, "hot": 1000})
    result = desired(state, None, ON, NOW)
    assert result.plan == placement.plan(state, now=NOW) and steps(result) == [("load", "p:latest", "a")]
    assert [m.name for m in result.models] == ["p"] and result.choices == ()


def test_a_model_asked_for_is_loaded_after_the_priority_models_with_the_demand_keep_alive():
    state = build([node("a", installed=("p", "hot"))], priority=["p"], needs={"p": 1000, "hot": 1000})
    result = desired(state, demand(want("hot", 6)), ON, NOW)
    assert steps(result) == [("load", "p:latest", "a"), ("load", "hot:latest", "a")]
    load = result.plan.loads[1]
    assert load.keep_alive == "30m" and result.plan.loads[0].keep_alive == -1  # the priority model keeps its pin
    assert [m.name for m in result.models] == ["p", "hot:latest"] and result.placed == {"hot:latest"}
    assert result.targets == {("a", "p:latest"), ("a", "hot:latest")}
    (choice,) = result.choices
    assert choice.copies == 1 and choice.why == "6.0 requests/min: to load on a"


def test_below_the_threshold_a_model_is_not_placed():
    state = build([node("a", installed=("cold",))], needs={"cold": 1000})
    result = desired(state, demand(want("cold", 0.5)), ON, NOW)
    assert steps(result) == [] and result.choices[0].copies == 0
    assert result.choices[0].why == "0.5 requests/min, below demand.min_requests_per_minute (1)"


def test_the_hotter_model_wins_the_room_by_requests_times_size():
    """Room for one of two: 10 requests/min of a 2000 MiB model beat 12 of a 1500 MiB one."""
    state = build([node("a", installed=("big", "small"))], needs={"big": 2000, "small": 1500})
    result = desired(state, demand(want("big", 10), want("small", 12)), ON, NOW)
    assert steps(result) == [("load", "big:latest", "a")]
    small = next(c for c in result.choices if c.model == "small:latest")
    assert small.copies == 0 and "no room on GPU" in small.why


@pytest.mark.parametrize(("challenger", "displaced"), [(14, False), (20, True)])
def test_a_model_on_gpu_gives_way_only_to_one_clearly_hotter(challenger, displaced):
    """min_gain 0.5: the idle incumbent (10 requests/min) keeps its place against 14 requests/min of a model
    of the same size, and is evicted for 20 (more than 1.5 × its score)."""
    there = (lm("old", 2000, expires=NOW + 1500),)  # more than half of demand.keep_alive left: no renewal
    state = build([node("a", loaded=there, installed=("new",))], needs={"old": 2000, "new": 2000})
    result = desired(state, demand(want("old", 10), want("new", challenger)), ON, NOW, placed_before={"old:latest"})
    if displaced:
        assert steps(result) == [("evict", "old:latest", "a"), ("load", "new:latest", "a")]
    else:
        assert steps(result) == []
        assert {c.model: c.copies for c in result.choices} == {"old:latest": 1, "new:latest": 0}


def test_a_model_with_proxy_requests_in_flight_is_never_evicted():
    """Ollama shows it idle (its expiry ahead), but the proxy has a request in flight on it there."""
    there = (lm("old", 2000, expires=NOW + 600),)
    state = build([node("a", loaded=there, installed=("new",))], needs={"old": 2000, "new": 2000})
    rows = demand(want("old", 0), want("new", 30))
    assert steps(desired(state, rows, ON, NOW)) == [("evict", "old:latest", "a"), ("load", "new:latest", "a")]
    rows["old:latest"] = want("old", 0, in_flight={"a": 1})
    result = desired(state, rows, ON, NOW)
    assert steps(result) == [] and "no room on GPU" in result.choices[0].why


def test_partial_and_cpu_copies_are_evicted_before_copies_fully_on_gpu():
    """Two idle victims of the same demand: the one half on CPU goes first, though it expires later."""
    there = (lm("full", 1000, expires=NOW + 60), lm("half", 2000, 1000, expires=NOW + 900))
    state = build([node("a", loaded=there, installed=("new",))], needs={"full": 1000, "half": 2000, "new": 2000})
    result = desired(state, demand(want("new", 30)), ON, NOW)
    assert steps(result) == [("evict", "half:latest", "a"), ("load", "new:latest", "a")]


def test_a_queue_that_stays_long_pre_warms_another_copy_on_the_next_node():
    there = (lm("hot", 1000, expires=NOW + 1500),)
    nodes = [node("a", loaded=there), node("b", installed=("hot",)), node("c", installed=("hot",), gpus=(2048,))]
    state = build(nodes, needs={"hot": 1000})
    calm = desired(state, demand(want("hot", 30, waiting_mean=1.0)), ON, NOW)
    assert steps(calm) == [] and calm.choices[0].copies == 1
    queued = desired(state, demand(want("hot", 30, waiting_mean=4.0)), ON, NOW)
    assert steps(queued) == [("load", "hot:latest", "b")]  # the most room: b, not the smaller c
    assert queued.choices[0].copies == 2 and "another copy (pre-warm): 4.0 requests waiting" in queued.choices[0].why
    assert queued.plan.loads[0].reason.startswith("put another copy of hot:latest on GPU")


def test_load_beyond_one_runners_slots_spreads_a_model_over_nodes():
    """5 requests in flight on average against 1 slot a runner (num_parallel 1): up to one copy per GPU node,
    one more a pass; a copy elsewhere is never unloaded for it."""
    there = (lm("hot", 1000, expires=NOW + 1500),)
    state = build([node("a", loaded=there), node("b", installed=("hot",))], needs={"hot": 1000})
    result = desired(state, demand(want("hot", 30, in_flight_mean=5.0)), ON, NOW)
    assert steps(result) == [("load", "hot:latest", "b")]
    assert (
        result.choices[0].copies == 2
        and "2 copies: 5.0 requests in flight on average, 1 at once a runner (the load asks for 5; 2 GPU nodes"
        in result.choices[0].why
    )


def test_a_placed_model_is_kept_warm_once_half_its_keep_alive_is_gone():
    """10 of demand.keep_alive's 30 minutes left: asked again with it (a pin, no reload); 25 left: nothing."""
    for left, renewed in ((600, True), (1500, False)):
        state = build([node("a", loaded=(lm("hot", 1000, expires=NOW + left),))], needs={"hot": 1000})
        result = desired(state, demand(want("hot", 30)), ON, NOW)
        assert steps(result) == ([("pin", "hot:latest", "a")] if renewed else [])
        if renewed:
            pin = result.plan.steps[0]
            assert pin.keep_alive == "30m" and pin.reason.startswith("keep hot:latest warm: 600s of keep_alive left")


def test_a_model_whose_demand_fell_is_released_but_one_only_outranked_stays():
    there = (lm("was", 1000, expires=NOW + 1500),)
    state = build([node("a", loaded=there)], needs={"was": 1000})
    fell = desired(state, demand(want("was", 0.2)), ON, NOW, placed_before={"was:latest"})
    assert steps(fell) == [("release", "was:latest", "a")]
    assert fell.plan.steps[0].reason == "release: 0.2 requests/min, below demand.min_requests_per_minute (1)"
    never = desired(state, demand(want("was", 0.2)), ON, NOW)  # not placed by demand: not ours to release
    assert steps(never) == []
    busy = desired(state, demand(want("was", 0.2, in_flight={"a": 1})), ON, NOW, placed_before={"was:latest"})
    assert steps(busy) == []


def test_priority_models_come_first_and_keep_their_pins():
    """A hot model never takes a priority model's room, and a priority model with demand gets no demand
    keep_alive: its configured pin stays."""
    state = build([node("a", installed=("p", "hot"))], priority=["p"], needs={"p": 2000, "hot": 2000})
    result = desired(state, demand(want("hot", 100), want("p", 1)), ON, NOW)
    assert steps(result) == [("load", "p:latest", "a")]
    assert result.entry("p") == PriorityModel("p") and result.entry("hot") is None
    hot = next(c for c in result.choices if c.model == "hot:latest")
    assert hot.copies == 0 and "no room on GPU" in hot.why


def test_the_loaded_model_limit_bounds_what_demand_places():
    """Three models loaded on a one-GPU node (Ollama's limit: 3): a fourth hot model evicts the coldest."""
    there = tuple(lm(m, 100, expires=NOW + 900) for m in ("x", "y", "z"))
    state = build([node("a", loaded=there, installed=("hot",))], needs={"hot": 100})
    rows = demand(want("x", 5), want("y", 2), want("z", 8), want("hot", 50))
    result = desired(state, rows, ON, NOW, placed_before={"x:latest", "y:latest", "z:latest"})
    assert steps(result) == [("evict", "y:latest", "a"), ("load", "hot:latest", "a")]


def test_the_proxys_answer_is_read_strictly():
    data = {
        "window_seconds": 600,
        "models": {
            "hot": {
                "requests_per_second": 0.5,
                "prompt_tokens_per_second": 10,
                "generated_tokens_per_second": 5,
                "in_flight_mean": 1.5,
                "waiting_mean": 0,
                "in_flight": {"a": 2},
            }
        },
    }
    models, window = parse_demand(data)
    assert window == 600 and models == {"hot:latest": ModelDemand("hot:latest", 0.5, 15.0, 1.5, 0.0, {"a": 2})}
    for bad, words in (
        ([], "expected a JSON object"),
        ({"models": {"hot": {"requests_per_second": -1}}}, "requests_per_second: expected a number ≥ 0"),
        ({"models": {"hot": {"in_flight": {"a": "x"}}}}, "in_flight: expected node → count"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_demand(bad)


def test_another_copy_never_evicts_a_model_placed_for_its_own_demand_and_says_so():
    there = (lm("hot", 1000, expires=NOW + 1500),)
    nodes = [node("a", loaded=there), node("b", loaded=(lm("other", 3000, expires=NOW + 1500),), installed=("hot",))]
    state = build(nodes, needs={"hot": 1000, "other": 3000})
    result = desired(state, demand(want("hot", 30, in_flight_mean=5.0), want("other", 20)), ON, NOW)
    assert steps(result) == []
    hot = next(c for c in result.choices if c.model == "hot:latest")
    assert hot.why.endswith("; 1 placed: no other GPU node has room without evicting a model placed before it")


def test_the_off_switch_reads_nothing_and_places_the_priority_list_only():
    state = build([node("a", installed=("p", "hot"))], priority=["p"], needs={"p": 1000, "hot": 1000})
    for settings in ({"proxy_url": "http://127.0.0.1:9", "placement": False}, {}):
        config = parse_config({"nodes": ["http://127.0.0.1:11434"], "demand": settings})
        feed = DemandFeed(config)
        planner = Planner(config, feed, wall=lambda: NOW)
        assert not planner.active and planner.refresh() is NOT_READ  # nothing is asked of any proxy
        result = planner.desired(state, NOW)
        assert result.choices == () and steps(result) == [("load", "p:latest", "a")]
        feed.close()


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"window": 0}, "demand.window: expected a number > 0, got 0"),
        ({"proxy_url": "proxy"}, "demand.proxy_url: expected an http(s) URL"),
        ({"keep_alive": "forever"}, "demand.keep_alive: expected seconds (-1 = forever) or a duration"),
        ({"prewarm_que": 3}, "demand.prewarm_que: unknown key (did you mean 'prewarm_queue'?)"),
        ({"placement": "yes"}, "demand.placement: expected true or false, got 'yes'"),
    ],
)
def test_demand_settings_are_checked_like_every_other(settings, words):
    with pytest.raises(ConfigError) as error:
        parse_config({"nodes": ["http://127.0.0.1:11434"], "demand": settings}, "f.yaml")
    assert words in str(error.value)


def test_the_defaults_are_the_documented_ones():
    d = parse_config({"nodes": ["http://127.0.0.1:11434"]}).demand
    assert (d.placement, d.proxy_url, d.window, d.interval) == (True, None, 600.0, 15.0)
    assert (d.min_requests_per_minute, d.min_gain, d.keep_alive, d.prewarm_queue) == (1.0, 0.5, "30m", 3.0)
