"""How the simulator serves requests (issue 18): prompts rendered and counted in tokens, prefill time, parallel
slots and their prompt cache, OLLAMA_MAX_QUEUE, one GPU shared by the runners generating on it, and the
control API's view of slots, queues and prompt tokens."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import requests

from cli.localstack import wait_for
from simulator.catalog import find
from simulator.fleet import NodeSpec, load_fleet
from simulator.gpushare import GpuShare, shared_rate
from simulator.prompt import common_prefix, render_chat, render_generate, tokenize
from simulator.run import Fleet, fleet_from_dict
from simulator.scheduler import MAX_QUEUE, parallel_for
from simulator.slots import Slot, Slots, choose_slot, reusable

PREFILL = 2000.0  # prompt tokens per second on GPU, fast enough for tests
NODE = {
    "name": "gpu",
    "gpus": [{"name": "RTX 4090", "vram": "24GiB"}],
    "models": ["llama3.1:8b", "llama3.2:1b", "llama3.2:3b", "codellama:7b", "nomic-embed-text"],
    "token_rate": 0,
    "prefill_rate": PREFILL,
    "num_parallel": 2,
}
SYSTEM = {"role": "system", "content": "You answer questions about the weather in one short sentence. " * 20}


@pytest.fixture(scope="module")
def fleet():
    cpu = {**NODE, "name": "cpu", "gpus": [], "models": ["llama3.2:1b"], "cpu_prefill_rate": 100}
    with Fleet(fleet_from_dict({"nodes": [NODE, cpu]})) as running:
        yield running


@pytest.fixture
def url(fleet):
    fleet.node("gpu").scheduler.unload_all()
    return fleet.urls["gpu"]


def chat(url: str, messages: list[dict], model: str = "llama3.1:8b", **extra: object) -> dict:
    body = {"model": model, "messages": messages, "stream": False, **extra}
    reply = requests.post(f"{url}/api/chat", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def state(fleet, name: str = "gpu") -> dict:
    return requests.get(f"{fleet.control_url}/nodes/{name}/state", timeout=5).json()


# -- 1. prompt processing


def test_prompts_are_rendered_system_first_and_cut_into_4_character_tokens():
    user, system = {"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}
    assert render_chat([user, system]) == render_chat([system, user])  # the system message leads
    assert render_chat([user, system]).startswith("<|system|>\nbe brief")
    assert render_chat([user], system="from the Modelfile").startswith("<|system|>\nfrom the Modelfile")
    assert "get_weather" in render_chat([user], tools=[{"function": {"name": "get_weather"}}])
    assert render_generate("abc", raw=True) == "abc"
    assert tokenize("abcdefghij") == ("abcd", "efgh", "ij")
    assert len(tokenize(render_chat([SYSTEM, user]))) == -(-len(render_chat([SYSTEM, user])) // 4)
    assert common_prefix(tokenize("abcdefgh"), tokenize("abcdxyz")) == 1


def test_time_to_first_token_is_the_uncached_prompt_over_the_prefill_rate(url):
    first = chat(url, [SYSTEM, {"role": "user", "content": "Rain in Paris?"}])
    tokens = len(tokenize(render_chat([SYSTEM, {"role": "user", "content": "Rain in Paris?"}])))
    assert first["prompt_eval_count"] == tokens
    assert first["prompt_eval_duration"] == int(tokens / PREFILL * 1e9)
    assert first["total_duration"] >= first["prompt_eval_duration"]


def test_prefill_on_cpu_is_far_slower_than_on_gpu(fleet):
    spec = NodeSpec(name="n", port=0, token_rate=50)
    assert spec.prefill(1.0) == 2000 and spec.prefill(0.0) == pytest.approx(2000 / 30)
    assert spec.prefill(0.0) < spec.prefill(0.5) < spec.prefill(1.0)
    assert NodeSpec(name="n", port=0, token_rate=50, prefill_rate=900, cpu_prefill_rate=90).prefill(0.0) == 90
    messages = [{"role": "user", "content": "x" * 40}]
    cpu = chat(fleet.urls["cpu"], messages, model="llama3.2:1b")
    assert cpu["prompt_eval_duration"] == int(cpu["prompt_eval_count"] / 100 * 1e9)


def test_fleet_file_takes_the_new_node_settings(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "nodes:\n- name: a\n  prefill_rate: 5000\n  cpu_prefill_rate: 80\n  gpu_token_rate: 120\n  max_queue: 3\n"
    )
    node = load_fleet(path).nodes[0]
    assert (node.prefill_rate, node.cpu_prefill_rate, node.gpu_token_rate, node.max_queue) == (5000, 80, 120, 3)
    path.write_text("nodes:\n- name: a\n  max_queue: 0\n")
    with pytest.raises(ValueError, match=r"nodes\[0\]\.max_queue: expected an integer ≥ 1"):
        load_fleet(path)


# -- 2. slots and the prompt cache


def test_a_request_takes_the_free_slot_with_the_longest_common_prefix_else_the_least_recently_used():
    a, b, c = Slot(0, tokenize("hello world, how are you"), used=2), Slot(1, tokenize("hello there"), used=1), Slot(2)
    assert choose_slot([a, b, c], tokenize("hello world, fine")) is a
    assert choose_slot([a, b, c], tokenize("nothing shared")) is c  # never used: least recently
    assert choose_slot([a, b], tokenize("nothing shared")) is b
    assert choose_slot([a, b, c], tokenize("hello" + " and much more" * 10)) is c  # 1 token of 35: too little
    a.busy = True
    assert choose_slot([a, b], tokenize("hello world, fine")) is b
    assert reusable(tokenize("abcdefgh"), tokenize("abcdefgh")) == 1  # the last prompt token is always computed


def test_requests_beyond_the_slots_wait_in_order():
    slots = Slots(1)
    first = slots.take(tokenize("a"), lambda: True)
    assert first is not None
    order: list[str] = []

    def waiter(name: str) -> None:
        lease = slots.take(tokenize(name), lambda: True)
        order.append(name)
        assert lease is not None
        slots.give_back(lease, ())

    threads = []
    for count, name in enumerate(("b", "c", "d"), 1):
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        wait_for(lambda n=count: slots.state()["queue"] == n, what="the queue")
    slots.give_back(first, ())
    for thread in threads:
        thread.join(5)
    assert order == ["b", "c", "d"]


def test_two_conversations_each_reuse_their_own_slot_and_a_reload_loses_the_cache(fleet, url):
    talks = {name: [{"role": "system", "content": f"You are {name}. " * 30}] for name in ("alice", "bob")}
    for turn in range(2):
        for name, messages in talks.items():
            messages.append({"role": "user", "content": f"question {turn} from {name}"})
            reply = chat(url, messages)
            rendered = tokenize(render_chat(messages))
            if turn:  # everything up to the new question was cached: the system prompt and the last answer
                assert reply["prompt_eval_count"] == len(rendered)
                assert reply["prompt_eval_duration"] < len(rendered) / PREFILL * 1e9 / 5
            messages.append(reply["message"])
    loaded = state(fleet)["loaded"][0]
    assert [s["cached_tokens"] > 100 for s in loaded["slots"]] == [True, True]
    assert loaded["prompt_tokens"]["cached"] > loaded["prompt_tokens"]["computed"] / 2
    chat(url, [{"role": "user", "content": "hi"}], options={"num_ctx": 4096})  # another context: a reload
    loaded = state(fleet)["loaded"][0]
    assert loaded["prompt_tokens"]["cached"] == 0
    assert sorted(s["cached_tokens"] > 0 for s in loaded["slots"]) == [False, True]


def test_embedding_models_and_some_families_get_one_slot(fleet, url):
    llama = find("llama3.1:8b")
    assert parallel_for(llama, 4) == 4
    assert parallel_for(find("nomic-embed-text"), 4) == 1
    assert parallel_for(replace(llama, family="qwen35"), 4) == 1
    requests.post(f"{url}/api/embed", json={"model": "nomic-embed-text", "input": "x"}, timeout=10)
    chat(url, [{"role": "user", "content": "hi"}])
    slots = {m["model"]: len(m["slots"]) for m in state(fleet)["loaded"]}
    assert slots == {"nomic-embed-text:latest": 1, "llama3.1:8b": 2}


# -- 4. queue limits


@pytest.mark.parametrize(("version", "loaded_status"), [("0.32.15", 200), ("0.11.4", 503)])
def test_more_than_max_queue_requests_waiting_for_a_load_get_503(version, loaded_status):
    """From v0.11.5 a request for a loaded model passes the full queue; before, every request was queued."""
    preload = [{"model": "llama3.2:1b", "keep_alive": -1}]
    node = {**NODE, "version": version, "load_speed": "1MiB", "max_queue": 1, "preload": preload}  # loads take hours
    with Fleet(fleet_from_dict({"nodes": [node]})) as running:
        url, results = running.urls["gpu"], []

        def generate(model: str) -> None:
            try:
                reply = requests.post(f"{url}/api/generate", json={"model": model, "prompt": "hi"}, timeout=30)
                results.append(reply.status_code)
            except requests.RequestException:  # the stop closed the connection before its 503 was read
                results.append("closed")

        loading = threading.Thread(target=generate, args=("llama3.1:8b",))
        loading.start()
        wait_for(lambda: len(state(running)["loaded"]) == 2, what="the second load")
        waiting = threading.Thread(target=generate, args=("codellama:7b",))
        waiting.start()
        wait_for(lambda: state(running)["pending_loads"] == 1, what="one request waiting for a load")
        refused = requests.post(f"{url}/api/generate", json={"model": "llama3.2:1b", "prompt": "x"}, timeout=10)
        assert refused.status_code == loaded_status
        refused = requests.post(f"{url}/api/generate", json={"model": "llama3.2:3b", "prompt": "x"}, timeout=10)
        assert (refused.status_code, refused.json()) == (503, {"error": MAX_QUEUE})
        assert MAX_QUEUE == "server busy, please try again.  maximum pending requests exceeded"
    loading.join(10)
    waiting.join(10)
    # the stop wakes them ("server shutting down"), none is left waiting
    assert not loading.is_alive() and not waiting.is_alive()
    assert len(results) == 2 and set(results) <= {503, "closed"}


# -- 6. the control API


def test_the_control_api_shows_slots_queues_and_prompt_token_counters(fleet, url):
    before = state(fleet)["prompt_tokens"]
    reply = chat(url, [SYSTEM, {"role": "user", "content": "Snow?"}])
    after = state(fleet)
    loaded = after["loaded"][0]
    assert set(loaded) >= {"slots", "queue", "prompt_tokens"} and loaded["queue"] == 0
    rendered = render_chat([SYSTEM, {"role": "user", "content": "Snow?"}]) + reply["message"]["content"]
    assert loaded["slots"][0] == {"id": 0, "busy": False, "cached_tokens": len(tokenize(rendered))}
    assert after["prompt_tokens"]["computed"] - before["computed"] == reply["prompt_eval_count"]
    assert after["pending_loads"] == 0


# -- 8. one GPU is shared


def test_runners_generating_on_one_gpu_share_its_throughput():
    assert shared_rate(50, [50], 100) == 50
    assert shared_rate(50, [50, 50, 100], 100) == 25
    assert shared_rate(50, [50, 50], 0) == 50  # unbounded
    share = GpuShare(100)
    share.begin(1, [0], 80)
    assert share.rate(1, [0], 80) == 80
    share.begin(2, [0], 80)
    share.begin(2, [0], 80)  # a second sequence of the same runner is batched: counted once
    assert share.rate(1, [0], 80) == share.rate(2, [0], 80) == 50
    assert share.rate(3, [1], 80) == 80  # another GPU
    share.end(2, [0])
    assert share.generating() == {0: 2}
    share.end(2, [0])
    assert share.rate(1, [0], 80) == 80


def test_two_models_generating_at_once_on_one_gpu_each_slow_down():
    rate = 200.0
    node = {**NODE, "token_rate": rate, "prefill_rate": 0}
    with Fleet(fleet_from_dict({"nodes": [node]})) as running:
        url = running.urls["gpu"]
        body = {"prompt": "hi", "stream": False, "options": {"num_predict": 40}}
        for model in ("llama3.2:1b", "llama3.1:8b"):  # load both first
            requests.post(f"{url}/api/generate", json={"model": model, "prompt": "", "keep_alive": -1}, timeout=30)
        alone = requests.post(f"{url}/api/generate", json={"model": "llama3.2:1b", **body}, timeout=30).json()
        finals: list[dict] = []
        threads = [
            threading.Thread(
                target=lambda m=m: finals.append(
                    requests.post(f"{url}/api/generate", json={"model": m, **body}, timeout=30).json()
                )
            )
            for m in ("llama3.2:1b", "llama3.1:8b")
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        both = time.monotonic() - started
    assert alone["eval_duration"] >= 40 / rate * 1e9
    assert both >= 1.5 * 40 / rate  # 80 tokens at the GPU's 200 tokens/s take ≥ 0.4 s, not 0.2 s
    assert max(f["eval_duration"] for f in finals) >= 1.5 * 40 / rate * 1e9
