"""The proxy's request pipeline (issue 19, part B): scorers and picker over hand-built states, the prompt-cache
index, the queue in front of Ollama, demand, and the explanation endpoint end to end."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace

import pytest
import requests
from conftest import gpu_router
from test_decide import NOW, build, lm, node
from test_proxy_promise import SMALL, metric, proxied

from cli.localstack import wait_for
from gpurouter.cluster.config import RouteWeights
from gpurouter.decide.route.ask import BLOCK_CHARS, Ask, ask_of, blocks_of
from gpurouter.decide.route.pipeline import choose
from gpurouter.decide.route.prefix import PromptIndex
from gpurouter.decide.route.traffic import Rates, Traffic
from proxy.demand import Demand
from proxy.ledger import Ledger, Timings
from proxy.queue import BUSY, QueueFull, Slots
from simulator.run import Fleet, fleet_from_dict

M = "llama3.1:latest"
SYSTEM = "You are a careful assistant. " * 200  # a long shared system prompt: many blocks


def two_copies(parallel: int = 1):
    state = build([node("a", (8192,), loaded=(lm(M, 5000),)), node("b", (8192,), loaded=(lm(M, 5000),))])
    return replace(
        state,
        nodes=tuple(replace(n, config=replace(n.config, num_parallel=parallel)) for n in state.nodes),
    )


def chat(text: str) -> Ask:
    return ask_of(
        "/api/chat", {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]}, M
    )


def test_the_prompt_stays_where_its_prefix_is_cached_until_that_node_is_saturated():
    state, index = two_copies(parallel=1), PromptIndex()
    first = chat("first question")
    index.sent("b", M, first.blocks, slots=1)
    follow = chat("second question")
    picked = choose(state, follow, Traffic(prompts=index), NOW)
    assert picked.nodes[0] == "b" and picked.targets[0].parts["affinity"] > 0.9
    assert picked.targets[0].cached_tokens >= len(SYSTEM) // 4 - BLOCK_CHARS
    # a request already running there (its one slot taken) still leaves b the better choice: the prompt is cached
    busy = Traffic(prompts=index, in_flight={("b", M): 1})
    assert choose(state, follow, busy, NOW).nodes[0] == "b"
    # past τ (observed prefill 100 tokens/s × 4 s = 400 tokens queued) affinity lets go; the expected latency
    # (three requests ahead of it for b's one slot, 2 s each, against the whole prompt at a's 1000 tokens/s)
    # sends it to a
    rates = {("b", M): Rates(prefill=100, service=2.0), ("a", M): Rates(prefill=1000)}
    saturated = Traffic(prompts=index, in_flight={("b", M): 3}, prefill_queued={"b": 500}, rates=rates)
    picked = choose(state, follow, saturated, NOW)
    assert picked.nodes == ["a", "b"] and picked.targets[1].parts["affinity"] == 0
    assert picked.targets[0].parts["latency"] == 1 and picked.targets[1].parts["latency"] < 0.5


def test_expected_latency_weighs_the_wait_for_a_slot_against_the_uncached_prompt_and_learns_from_answers():
    state = two_copies(parallel=1)
    follow = chat("second")
    ledger = Ledger(state.config)
    ledger.prompts.sent("b", M, chat("first").blocks, slots=1)
    ledger.answered("a", M, Timings(prompt_tokens=1000, prompt_seconds=1.0, generated=10, generate_seconds=0.5), 0)
    ledger.answered("b", M, Timings(prompt_tokens=1000, prompt_seconds=1.0, generated=10, generate_seconds=0.5), 0)
    assert ledger.rates[("b", M)].service == 1.5 and ledger.rates[("b", M)].prefill == 1000
    # b has the prompt cached and one request ahead for its one slot (1.5 s): a reads the whole prompt (~1.45 s)
    ledger.flights[("b", M)] = 1
    picked = choose(state, follow, ledger.traffic(), NOW, RouteWeights(affinity=0))
    assert picked.nodes == ["a", "b"] and picked.targets[1].parts["latency"] < 1
    ledger.flights[("b", M)] = 0  # its slot free: the cached prompt wins
    assert choose(state, follow, ledger.traffic(), NOW, RouteWeights(affinity=0)).nodes == ["b", "a"]
    # an answer to a request that loaded the model tells how long the node's loads take
    ledger.answered("a", M, Timings(load_seconds=0.25), 0, cold=True)
    assert ledger.traffic().load_seconds == {"a": 0.25}


def test_queue_and_speed_spread_requests_over_equal_copies():
    state = two_copies()
    ask = Ask(M)
    assert choose(state, ask, Traffic(in_flight={("a", M): 1}), NOW).nodes == ["b", "a"]
    fast = Traffic(rates={("a", M): Rates(decode=20), ("b", M): Rates(decode=80)})
    picked = choose(state, ask, fast, NOW, RouteWeights(speed=0.5))
    assert picked.nodes[0] == "b" and picked.targets[1].parts["speed"] == 0.25
    # weights come from the configuration: speed off (the default), the tie goes by free VRAM then name
    assert choose(state, ask, fast, NOW).nodes == ["a", "b"]


def test_residency_beats_every_other_score_by_default():
    state = build(
        [node("gpu", (8192,), loaded=(lm(M, 5000),)), node("cpu", (), loaded=(lm(M, 5000, 0),))], needs={M: 5000}
    )
    index = PromptIndex()
    ask = chat("x")
    index.sent("cpu", M, ask.blocks, slots=1)
    crowded = Traffic(prompts=index, in_flight={("gpu", M): 6}, rates={("cpu", M): Rates(decode=100)})
    assert choose(state, ask, crowded, NOW).nodes == ["gpu", "cpu"]


def test_prompt_blocks_follow_ollamas_render_order_and_the_index_forgets_what_slots_drop():
    a = ask_of("/api/chat", {"messages": [{"role": "system", "content": SYSTEM}]}, M)
    b = ask_of(
        "/v1/chat/completions", {"messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]}, M
    )
    assert a.blocks == b.blocks and len(a.blocks) == len("system\n" + SYSTEM + "\n") // BLOCK_CHARS
    assert ask_of("/api/embed", {"input": SYSTEM}, M).blocks == ()
    assert ask_of("/api/generate", {"system": "s", "prompt": SYSTEM}, M).blocks[:1] != a.blocks[:1]
    index = PromptIndex(limit=2)
    one, two, three = (blocks_of(c * 1024) for c in "xyz")
    index.sent("n", M, one, slots=2)
    index.sent("n", M, two, slots=2)
    assert index.cached("n", M, one) == len(one) and index.cached("n", M, two) == len(two)
    index.sent("n", M, three, slots=2)  # two slots: the oldest conversation's cache is gone
    assert index.cached("n", M, one) == 0 and index.cached("n", M, three) == len(three)
    longer = blocks_of("z" * 2048)
    index.sent("n", M, longer, slots=2)  # the slot holding its prefix takes it: "y" stays
    assert index.cached("n", M, two) == len(two) and index.cached("n", M, longer) == len(longer)
    index.sent("m", M, one, slots=1)
    index.sent("o", M, one, slots=1)  # at most `limit` (node, model) pairs: the least recently used goes
    assert index.cached("n", M, two) == 0 and index.cached("o", M, one) == len(one)


def test_slots_let_a_runners_parallelism_through_and_queue_the_rest_bounded():
    async def story() -> None:
        slots, key = Slots(max_queue=1), ("n", M)
        await slots.acquire(key, 1)
        waiter = asyncio.create_task(slots.acquire(key, 1))
        await asyncio.sleep(0)
        assert slots.depth(key) == 1 and not waiter.done()
        with pytest.raises(QueueFull, match="server busy"):
            await slots.acquire(key, 1)
        slots.release(key)
        await asyncio.wait_for(waiter, 1)
        gone = asyncio.create_task(slots.acquire(key, 1))
        await asyncio.sleep(0)
        gone.cancel()  # a client that goes away leaves the queue
        await asyncio.gather(gone, return_exceptions=True)
        assert slots.depth(key) == 0
        slots.release(key)
        await asyncio.wait_for(slots.acquire(key, 1), 1)  # the slot is free again

    asyncio.run(story())


def test_demand_is_a_rate_over_the_window():
    demand = Demand(window=10)
    for t in range(5):
        demand.record(M, "a" if t < 4 else "b", 100, 20, NOW + t)
    assert demand.rates(NOW + 5)[M] == {
        "requests_per_second": 0.5,
        "prompt_tokens_per_second": 50.0,
        "generated_tokens_per_second": 10.0,
        "in_flight_mean": 0.0,
        "waiting_mean": 0.0,
        "nodes": {"a": {"requests_per_second": 0.4}, "b": {"requests_per_second": 0.1}},
    }
    assert demand.rates(NOW + 100) == {}


def test_demand_means_in_flight_over_the_window_and_waiting_over_the_queue_span():
    """Two requests in flight for 5 s of a 10 s window: a mean of 1; one waiting for 15 s of the last 30 s: 0.5;
    a request still in flight keeps its model counted."""
    demand = Demand(window=10)
    demand.flying(M, 1, NOW)
    demand.flying(M, 1, NOW)
    demand.flying(M, -1, NOW + 5)
    demand.flying(M, -1, NOW + 5)
    demand.waiting(M, 1, NOW + 15)
    demand.waiting(M, -1, NOW + 30)
    row = demand.rates(NOW + 10)[M]
    assert row["in_flight_mean"] == pytest.approx(1.0)
    assert demand.rates(NOW + 30)[M]["waiting_mean"] == pytest.approx(0.5)
    demand.flying(M, 1, NOW + 100)
    assert demand.rates(NOW + 200)[M]["in_flight_mean"] == pytest.approx(1.0)  # in flight the whole window
    demand.flying(M, -1, NOW + 200)
    assert M not in demand.rates(NOW + 300)


NODES = [{"name": "gpu", "gpus": [{"vram": "8GiB"}], "models": [SMALL], "num_parallel": 1, "token_rate": 200}]


def test_past_the_runners_slots_requests_wait_in_the_proxy_then_get_ollamas_503():
    with proxied(NODES, proxy={"max_queue": 1}) as (fleet, proxy):
        body = {"model": SMALL, "prompt": "x", "options": {"num_predict": 400}}
        replies: list[requests.Response] = []
        threads = [
            threading.Thread(
                target=lambda: replies.append(requests.post(f"{proxy.url}/api/generate", json=body, timeout=30))
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        wait_for(
            lambda: metric(proxy, "gpu_router_proxy_queue_depth", node="gpu", model=SMALL) == 1,
            what="one request waiting in the proxy",
        )
        wait_for(lambda: fleet.node("gpu").traffic.counts()["active"] == 1, what="one request on the node")
        assert metric(proxy, "gpu_router_proxy_queue_depth", node="gpu", model=SMALL) == 1  # Ollama sees one
        busy = requests.post(f"{proxy.url}/api/generate", json=body, timeout=30)
        assert (busy.status_code, busy.json()) == (503, {"error": BUSY})
        for t in threads:
            t.join(30)
        assert [r.status_code for r in replies] == [200, 200]
        assert metric(proxy, "gpu_router_proxy_queue_wait_seconds_count", node="gpu", model=SMALL) == 2
        assert metric(proxy, "gpu_router_proxy_queue_rejected_total", node="gpu", model=SMALL) == 1


def test_the_route_endpoint_explains_a_choice_and_demand_and_cache_metrics_count_answers():
    with proxied(NODES) as (_, proxy):
        explained = requests.get(f"{proxy.url}/api/v1/route", params={"model": SMALL, "prompt": "x"}, timeout=10)
        first = explained.json()["targets"][0]
        assert first["node"] == "gpu" and set(first["scores"]) == {"residency", "queue", "latency", "affinity", "speed"}
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
        for _ in range(2):
            reply = requests.post(
                f"{proxy.url}/api/chat", json={"model": SMALL, "messages": messages, "stream": False}, timeout=30
            )
            assert reply.status_code == 200
        posted = requests.post(f"{proxy.url}/api/v1/route", json={"model": SMALL, "messages": messages}, timeout=10)
        assert posted.json()["targets"][0]["cached_tokens"] > 1000
        assert metric(proxy, "gpu_router_proxy_cached_prompt_tokens_predicted_total", node="gpu", model=SMALL) > 1000
        assert metric(proxy, "gpu_router_proxy_prompt_tokens_total", node="gpu", model=SMALL) > 2000
        assert metric(proxy, "gpu_router_proxy_generated_tokens_total", node="gpu", model=SMALL) == 48
        demand = requests.get(f"{proxy.url}/api/v1/demand", timeout=10).json()
        row = demand["models"][SMALL]
        assert row["requests_per_second"] == 2 / demand["window_seconds"] == 2 / 600
        assert row["nodes"] == {"gpu": {"requests_per_second": 2 / 600}}
        assert row["in_flight"] == {} and row["waiting"] == 0 and row["waiting_mean"] < 0.01  # never waited
        assert 0 < row["in_flight_mean"] < 1  # two requests, one after the other, within the window
        assert metric(proxy, "gpu_router_proxy_demand_requests_per_second", model=SMALL) == 2 / 600
        assert requests.get(f"{proxy.url}/api/v1/route", timeout=10).status_code == 400


def test_among_equal_nodes_the_one_with_the_most_room_wins():
    state = build(
        [
            node("a", (8192,), installed=(M,), loaded=(lm("other:latest", 500),)),
            node("b", (8192,), installed=(M,)),
        ],
        needs={M: 5000, "other:latest": 500},
    )
    picked = choose(state, Ask(M), Traffic(), NOW)
    assert picked.nodes == ["b", "a"] and picked.targets[0].score == picked.targets[1].score


def test_route_explain_runs_the_proxys_pipeline(tmp_path, capsys):
    nodes = [{"name": "gpu", "gpus": [{"vram": "8GiB"}], "models": [SMALL], "preload": [{"model": SMALL}]}]
    with Fleet(fleet_from_dict({"nodes": nodes})) as fleet:
        path = tmp_path / "gpu_router_config.yaml"
        path.write_text(f"nodes: [{{name: gpu, url: '{fleet.urls['gpu']}', vram: 8GiB}}]\n", encoding="utf-8")
        code, out, _ = gpu_router(str(path), "route", SMALL, "--explain", "--prompt", "hi", capsys=capsys)
        assert code == 0 and out.startswith(f"{SMALL}: fully on GPU on gpu\n")
        assert (
            "gpu              gpu      score 13.00  residency 1.00, queue 1.00, latency 1.00, affinity 0.00, speed 0.50"
            in out
        )
        code, out, _ = gpu_router(str(path), "--json", "route", SMALL, "--explain", capsys=capsys)
        assert code == 0 and json.loads(out)["targets"][0]["scores"]["residency"] == 1.0
