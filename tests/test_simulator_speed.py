"""The simulator serves like a GPU and like a CPU: per-placement token speeds, Ollama's final-chunk counters,
`num_parallel` requests per runner with the rest queued, cancellation seen by the node, and the /v1 API."""

from __future__ import annotations

import json
import threading
import time

import ollama
import pytest
import requests
from openai import OpenAI

from cli.localstack import wait_for
from simulator.fleet import NodeSpec
from simulator.run import Fleet, fleet_from_dict

GPU_RATE, CPU_RATE = 400.0, 50.0
NODE = {
    "name": "gpu",
    "gpus": [{"name": "RTX 3070", "vram": "8GiB"}],
    "models": ["llama3.2:1b", "all-minilm"],
    "token_rate": GPU_RATE,
    "cpu_token_rate": CPU_RATE,
    "num_parallel": 2,
    "preload": [{"model": "llama3.2:1b", "keep_alive": -1}],
}


@pytest.fixture(scope="module")
def fleet():
    with Fleet(fleet_from_dict({"nodes": [NODE]})) as running:
        yield running


def test_speed_by_placement():
    spec = NodeSpec(name="n", port=0, token_rate=80, cpu_token_rate=10)
    assert spec.rate(1.0) == 80 and spec.rate(0.0) == 10
    assert 10 < spec.rate(0.71) < spec.rate(0.9) < 80
    assert spec.rate(0.71) == pytest.approx(80 / (0.71 + 0.29 * 8))  # 29 % on CPU: about 3× slower
    assert NodeSpec(name="n", port=0, token_rate=80).rate(0.0) == 10  # the default CPU slowdown is 8×
    assert NodeSpec(name="n", port=0, token_rate=0).rate(0.5) == 0  # instant


def _final(url: str, **options: int) -> tuple[dict, int]:
    """The last NDJSON line of a streamed generation and the number of lines before it."""
    body = {"model": "llama3.2:1b", "prompt": "say something", "options": {"num_predict": 40, **options}}
    with requests.post(f"{url}/api/generate", json=body, stream=True, timeout=30) as reply:
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    return lines[-1], len(lines) - 1


def test_gpu_streams_fast_cpu_slow_with_ollama_counters(fleet):
    url = fleet.urls["gpu"]
    final, tokens = _final(url)
    assert tokens == final["eval_count"] == 40
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_duration"):
        assert final[key] > 0, key
    gpu_speed = final["eval_count"] / (final["eval_duration"] / 1e9)
    assert GPU_RATE * 0.5 < gpu_speed <= GPU_RATE * 1.05
    final, _ = _final(url, num_gpu=0)  # reloads on CPU
    cpu_speed = final["eval_count"] / (final["eval_duration"] / 1e9)
    assert CPU_RATE * 0.7 < cpu_speed <= CPU_RATE * 1.05
    assert final["load_duration"] > 0
    ps = requests.get(f"{url}/api/ps", timeout=5).json()["models"]
    assert ps[0]["size_vram"] == 0
    _final(url, num_gpu=999)  # back on GPU for the other tests


def test_num_parallel_requests_at_once_and_the_rest_queue(fleet):
    url = fleet.urls["gpu"]
    _final(url, num_gpu=999)
    first_byte: dict[int, float] = {}
    finished: dict[int, float] = {}

    def run(i: int) -> None:
        body = {"model": "llama3.2:1b", "prompt": "go", "options": {"num_predict": 60, "num_gpu": 999}}
        with requests.post(f"{url}/api/generate", json=body, stream=True, timeout=30) as reply:
            for n, _line in enumerate(reply.iter_lines()):
                if n == 0:
                    first_byte[i] = time.monotonic()
        finished[i] = time.monotonic()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: fleet.node("gpu").traffic.counts()["active"] == 3, what="three requests in progress")
    for t in threads:
        t.join(30)
    order = sorted(first_byte, key=first_byte.get)
    # two slots: the third request's first token comes only once one of the first two has ended
    assert first_byte[order[2]] >= min(finished[order[0]], finished[order[1]])
    assert first_byte[order[1]] < finished[order[0]]  # the first two ran at the same time


def test_client_going_away_cancels_the_generation(fleet):
    url = fleet.urls["gpu"]
    # an earlier test's last request may still be counted as it ends: start from a node at rest
    before = wait_for(lambda: (c := fleet.node("gpu").traffic.counts())["active"] == 0 and c, what="no request")
    body = {"model": "llama3.2:1b", "prompt": "long", "options": {"num_predict": 2000, "num_gpu": 999}}
    reply = requests.post(f"{url}/api/generate", json=body, stream=True, timeout=30)
    next(reply.iter_lines())
    reply.close()
    counts = wait_for(
        lambda: (c := fleet.node("gpu").traffic.counts())["cancelled"] == before["cancelled"] + 1 and c,
        what="the node to see the cancellation",
    )
    assert counts["active"] == 0 and counts["served"] == before["served"]


def test_official_clients_against_the_node(fleet):
    url = fleet.urls["gpu"]
    native = ollama.Client(host=url, timeout=30)
    reply = native.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}], options={"num_gpu": 999})
    assert reply.message.content and reply.eval_count == 24
    openai = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30)
    chat = openai.chat.completions.create(
        model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}], max_tokens=7
    )
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 7
    chunks = list(
        openai.chat.completions.create(
            model="llama3.2:1b",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 5
    text = openai.completions.create(model="llama3.2:1b", prompt="once", max_tokens=3)
    assert text.choices[0].text and text.object == "text_completion"
    vectors = openai.embeddings.create(model="all-minilm", input=["a", "b"])  # base64 on the wire
    assert len(vectors.data) == 2 and len(vectors.data[1].embedding) == 384
    assert sum(x * x for x in vectors.data[0].embedding) == pytest.approx(1.0, rel=1e-3)
    assert {m.id for m in openai.models.list()} == {"llama3.2:1b", "all-minilm:latest"}
    with pytest.raises(Exception, match="not found") as caught:
        openai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
