"""The proxy never breaks the promise (issue 19, part A), end to end on a simulated fleet through real clients:
runner options that would evict a pinned model, pins the proxy keeps, errors true to their cause, what a
proxied load teaches, /api/ps as Ollama answers it."""

from __future__ import annotations

import time

import ollama
import pytest
import requests
from conftest import proxied
from conftest import proxy_metric as metric
from langchain_ollama import ChatOllama
from openai import APIStatusError, OpenAI

from cli.localstack import wait_for
from gpurouter.cluster.config import parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.decide import placement
from proxy.ledger import Ledger
from proxy.service import ProxyHandle
from simulator.run import Fleet, fleet_from_dict

SMALL = "llama3.2:1b"
LLAMA = "llama3.1:8b"
EMBED = "mxbai-embed-large:latest"


def loaded(fleet: Fleet, node: str) -> dict[str, dict]:
    return {m["model"]: m for m in fleet.node(node).state()["loaded"]}


def ledger(handle: ProxyHandle) -> Ledger:
    """The proxy's own ledger: what it marked failing."""
    return handle.running.proxy.view.ledger


def refreshed(handle: ProxyHandle) -> None:
    """Wait for the proxy's next poll."""
    view = handle.running.proxy.view
    before = view.state.taken_at
    wait_for(lambda: view.state.taken_at > before, timeout=10, what="the proxy's next poll")


PINNED = [
    {
        "name": "large",
        "gpus": [{"vram": "8GiB"}],
        "models": [LLAMA, "mxbai-embed-large"],
        "preload": [{"model": "mxbai-embed-large", "keep_alive": -1}, {"model": LLAMA, "keep_alive": "1h"}],
    },
    {"name": "cpu", "models": [LLAMA], "cpu_token_rate": 400},
]


def test_langchain_num_ctx_beside_a_pinned_priority_model_is_served_by_the_resident_runner(caplog):
    with proxied(PINNED, priority_models=["mxbai-embed-large"]) as (fleet, proxy):
        before = fleet.node("large").state()["counts"]
        chat = ChatOllama(model=LLAMA, base_url=proxy.url, num_ctx=16384, num_predict=8)
        assert chat.invoke("hi").content
        models = loaded(fleet, "large")
        assert models[EMBED]["size_vram"] == models[EMBED]["size"]  # the pinned model stays on GPU
        assert models[LLAMA]["context_length"] == 4096  # no reload: the runner served it as it is
        assert fleet.node("large").state()["counts"] == before
        assert fleet.node("cpu").traffic.counts()["served"] == 0  # not a 16k load on CPU either
        assert metric(proxy, "gpu_router_proxy_runner_options_replaced_total", node="large", model=LLAMA) == 1
        assert any("event=proxy.options node=large" in r.getMessage() for r in caplog.records)
        body = {"model": LLAMA, "prompt": "x", "stream": False, "options": {"num_ctx": 16384, "num_predict": 2}}
        reply = requests.post(f"{proxy.url}/api/generate", json=body, timeout=30)
        said = reply.headers["X-GPU-Router-Options"]
        assert reply.status_code == 200 and "num_ctx=4096" in said and "mxbai-embed-large" in said
        # a request that names no runner option is served by the resident runner as it is
        plain = ollama.Client(host=proxy.url, timeout=30).generate(model=LLAMA, prompt="x", options={"num_predict": 2})
        assert plain.eval_count == 2 and fleet.node("large").state()["counts"] == before
        assert (
            "X-GPU-Router-Options"
            not in requests.post(
                f"{proxy.url}/api/generate", json={"model": LLAMA, "prompt": "x", "stream": False}, timeout=30
            ).headers
        )


def test_a_load_that_fits_elsewhere_without_eviction_goes_there_as_asked():
    nodes = [*PINNED[:1], {"name": "big", "gpus": [{"vram": "24GiB"}], "models": [LLAMA]}]
    with proxied(nodes, priority_models=["mxbai-embed-large"]) as (fleet, proxy):
        chat = ChatOllama(model=LLAMA, base_url=proxy.url, num_ctx=16384, num_predict=4)
        assert chat.invoke("hi").content
        assert loaded(fleet, "big")[LLAMA]["context_length"] == 16384
        assert EMBED in loaded(fleet, "large") and loaded(fleet, "large")[LLAMA]["context_length"] == 4096
        assert metric(proxy, "gpu_router_proxy_runner_options_replaced_total", node="large", model=LLAMA) == 0


def test_plain_requests_keep_a_priority_runner_at_its_configured_context_and_pin():
    nodes = [
        {
            "name": "gpu",
            "gpus": [{"vram": "24GiB"}],
            "models": [LLAMA, SMALL],
            "preload": [{"model": LLAMA, "num_ctx": 8192, "keep_alive": -1}],
        }
    ]
    priority = [{"name": LLAMA, "num_ctx": 8192}, SMALL]
    with proxied(nodes, priority_models=priority) as (fleet, proxy):
        client = ollama.Client(host=proxy.url, timeout=30)
        before = fleet.node("gpu").state()["counts"]
        assert client.generate(model=LLAMA, prompt="x", options={"num_predict": 2}).eval_count == 2
        assert client.chat(model=LLAMA, messages=[{"role": "user", "content": "x"}], keep_alive=0).message.content
        assert fleet.node("gpu").state()["counts"] == before  # never reloaded at the node's default context
        assert loaded(fleet, "gpu")[LLAMA]["context_length"] == 8192  # and keep_alive 0 did not unpin it
        # a priority model the proxy loads cold carries its configured keep_alive, whatever the client says
        assert client.generate(model=SMALL, prompt="x", keep_alive=0, options={"num_predict": 1}).eval_count == 1
        expires = loaded(fleet, "gpu")[SMALL]["expires_at"]
        assert int(expires[:4]) > time.gmtime().tm_year + 100  # keep_alive -1: forever


SHARED = [
    {"name": "gpu", "gpus": [{"vram": "8GiB"}], "models": [SMALL, "qwen2.5-coder:1.5b"], "num_parallel": 2},
    {"name": "cpu", "models": [SMALL, "qwen2.5-coder:1.5b"], "cpu_token_rate": 400},
]


def test_a_model_only_on_nodes_that_are_down_gets_503_naming_them_and_an_unknown_one_404():
    nodes = [SHARED[0], {"name": "other", "gpus": [{"vram": "8GiB"}], "models": ["all-minilm"]}]
    with proxied(nodes, proxy={"refresh_interval": 0.2}) as (fleet, proxy):
        fleet.node("gpu").inject("down")
        refreshed(proxy)
        refreshed(proxy)
        with pytest.raises(ollama.ResponseError) as down:
            ollama.Client(host=proxy.url, timeout=30).generate(model=SMALL, prompt="x")
        assert down.value.status_code == 503 and "gpu (down)" in down.value.error
        with pytest.raises(APIStatusError) as openai_down:
            OpenAI(base_url=f"{proxy.url}/v1", api_key="x", timeout=30, max_retries=0).chat.completions.create(
                model=SMALL, messages=[{"role": "user", "content": "x"}]
            )
        assert openai_down.value.status_code == 503 and "gpu (down)" in openai_down.value.message
        with pytest.raises(ollama.ResponseError) as unknown:
            ollama.Client(host=proxy.url, timeout=30).generate(model="nope:1b", prompt="x")
        assert unknown.value.status_code == 404


def test_a_requests_own_fault_goes_back_at_once_and_marks_no_node():
    with proxied(SHARED) as (fleet, proxy):
        with pytest.raises(ollama.ResponseError) as bad:
            ollama.Client(host=proxy.url, timeout=30).generate(model=SMALL, prompt="x", options={"num_predict": "x"})
        assert bad.value.status_code == 500 and "must be of type integer" in bad.value.error
        assert metric(proxy, "gpu_router_proxy_retries_total") == 0 and not ledger(proxy).traffic().failing
        assert fleet.node("cpu").traffic.counts() == {**fleet.node("cpu").traffic.counts(), "served": 0}
        # the same 5xx from every node: the request's (or the whole fleet's) problem, not one node's
        for name in ("gpu", "cpu"):
            fleet.node(name).inject("error")
        reply = requests.post(f"{proxy.url}/api/generate", json={"model": SMALL, "prompt": "x"}, timeout=30)
        assert reply.status_code == 500 and not ledger(proxy).traffic().failing
        for name in ("gpu", "cpu"):
            fleet.node(name).clear()
        # a real failure marks the (node, model) it concerns, not the node
        fleet.node("gpu").inject("error")
        reply = requests.post(f"{proxy.url}/api/generate", json={"model": SMALL, "prompt": "x"}, timeout=30)
        assert reply.status_code == 200 and reply.headers["X-GPU-Router-Node"] == "cpu"
        assert ledger(proxy).traffic().failing == {("gpu", SMALL)}
        fleet.node("gpu").clear()
        other = requests.post(
            f"{proxy.url}/api/generate", json={"model": "qwen2.5-coder:1.5b", "prompt": "x"}, timeout=30
        )
        assert other.status_code == 200 and other.headers["X-GPU-Router-Node"] == "gpu"


def test_a_stream_that_ends_with_the_nodes_error_line_counts_as_that_node_failing():
    with proxied(SHARED) as (fleet, proxy):
        stream = ollama.Client(host=proxy.url, timeout=30).generate(
            model=SMALL, prompt="x", stream=True, options={"num_predict": 100000}
        )
        next(stream)
        fleet.node("gpu").inject("restart")  # the runner dies: Ollama ends the stream with its error line
        with pytest.raises(ollama.ResponseError, match="terminated"):
            for _ in stream:
                pass
        wait_for(lambda: ("gpu", SMALL) in ledger(proxy).traffic().failing, timeout=5, what="gpu marked failing")
        assert metric(proxy, "gpu_router_proxy_upstream_errors_total", node="gpu", kind="error_line") == 1


def test_a_cold_load_that_evicted_a_priority_model_teaches_hidden_memory():
    nodes = [
        {
            "name": "a",
            "gpus": [{"vram": "10GiB"}],
            "models": [LLAMA, "mxbai-embed-large"],
            "preload": [{"model": "mxbai-embed-large", "keep_alive": -1}],
        },
        {"name": "b", "gpus": [{"vram": "8GiB"}], "models": [LLAMA]},
    ]
    with proxied(nodes, priority_models=["mxbai-embed-large"], proxy={"refresh_interval": 0.2}) as (fleet, proxy):
        # a process the static capacity cannot see: llama3.1 fits fully on GPU only once the pinned model is gone
        fleet.node("a").inject("vram_hog", bytes="3900MiB")
        reply = requests.post(f"{proxy.url}/api/generate", json={"model": LLAMA, "prompt": "x"}, timeout=60)
        assert reply.status_code == 200 and reply.headers["X-GPU-Router-Node"] == "a"  # the most room, it seemed
        assert EMBED not in loaded(fleet, "a")  # Ollama evicted the pinned model for it
        assert loaded(fleet, "a")[LLAMA]["size_vram"] == loaded(fleet, "a")[LLAMA]["size"]
        hidden = proxy.running.observer.hidden
        wait_for(lambda: hidden.get("a") is not None, timeout=10, what="the eviction learnt")
        assert f"evicted the priority model {EMBED}" in hidden.get("a").why


def test_api_ps_lists_one_entry_per_model_its_best_copy():
    nodes = [
        {**SHARED[0], "preload": [{"model": SMALL}]},
        {**SHARED[1], "preload": [{"model": SMALL}]},
    ]
    with proxied(nodes) as (_, proxy):
        listed = ollama.Client(host=proxy.url, timeout=30).ps().models
        assert [m.model for m in listed] == [SMALL] and listed[0].size_vram == listed[0].size


def test_a_priority_model_on_cpu_waits_for_the_heal_by_default_and_goes_where_it_is_then():
    nodes = [
        {**SHARED[0], "token_rate": 400, "preload": [{"model": SMALL, "num_gpu": 0, "keep_alive": -1}]},
        {**SHARED[1], "preload": [{"model": SMALL, "keep_alive": -1}]},
    ]
    settings = {"proxy": {"refresh_interval": 0.2}, "auto_optimize": True, "priority_models": [SMALL]}
    settings["optimizer"] = {"cooldown_seconds": 0.1, "cooldown_max_seconds": 0.1, "load_timeout": 20}
    with proxied(nodes, **settings) as (fleet, proxy):  # no proxy.wait_for_gpu: its default, 30 s
        reply = ollama.Client(host=proxy.url, timeout=60).generate(model=SMALL, prompt="x")
        assert reply.eval_count == 24 and fleet.node("cpu").traffic.counts()["served"] == 0
        copy = loaded(fleet, "gpu")[SMALL]
        assert copy["size_vram"] == copy["size"]
        assert metric(proxy, "gpu_router_proxy_requests_total", node="gpu", model=SMALL, placement="gpu") == 1


def test_fit_is_judged_as_the_nodes_ollama_judges_it_unless_a_stricter_margin_is_set():
    """codellama:13b at 16k on a 24 GiB llama-server node: Ollama loads it fully on GPU; the default verdict
    agrees (no 0.8 margin stacked on llama.cpp's own 1 GiB); an explicit margin stays the operator's choice."""
    nodes = [{"name": "gpu", "gpus": [{"vram": "24GiB"}], "models": ["codellama:13b"]}]
    with Fleet(fleet_from_dict({"nodes": nodes})) as fleet:
        body = {"model": "codellama:13b", "prompt": "x", "stream": False, "options": {"num_ctx": 16384}}
        assert requests.post(fleet.urls["gpu"] + "/api/generate", json=body, timeout=60).status_code == 200
        copy = loaded(fleet, "gpu")["codellama:13b"]
        assert copy["size_vram"] == copy["size"]  # Ollama's own verdict: fully on GPU
        requests.post(fleet.urls["gpu"] + "/api/generate", json={"model": "codellama:13b", "keep_alive": 0}, timeout=30)
        wait_for(lambda: not loaded(fleet, "gpu"), what="the model unloaded")
        for margin, fits in ((None, True), (0.8, False)):
            raw = {
                "nodes": [{"name": "gpu", "url": fleet.urls["gpu"], "vram": "24GiB"}],
                "priority_models": [{"name": "codellama:13b", "num_ctx": 16384}],
                **({"vram_safety_margin": margin} if margin else {}),
            }
            observer = Observer(parse_config(raw))
            try:
                verdict = placement.check(observer.poll(), "codellama:13b", time.time()).verdicts[0]
            finally:
                observer.close()
            assert verdict.fits is fits, (margin, verdict.reason)


def test_openai_requests_never_reload_or_unpin_a_priority_runner():
    """The OpenAI API carries no num_ctx and no keep_alive: Ollama would serve such a request at the node's
    default context (reloading a runner pinned at another) and give the runner its default keep_alive. The proxy
    refuses the reload with a 503 that says why and what to do, and pins a runner it served again at once."""
    nodes = [
        {
            "name": "gpu",
            "gpus": [{"vram": "24GiB"}],
            "models": [LLAMA, SMALL],
            "preload": [{"model": LLAMA, "num_ctx": 8192, "keep_alive": -1}, {"model": SMALL, "keep_alive": -1}],
        }
    ]
    priority = [{"name": LLAMA, "num_ctx": 8192}, SMALL]
    with proxied(nodes, priority_models=priority) as (fleet, proxy):
        client = OpenAI(base_url=f"{proxy.url}/v1", api_key="x", timeout=30, max_retries=0)
        before = fleet.node("gpu").state()["counts"]
        with pytest.raises(APIStatusError) as refused:
            client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert refused.value.status_code == 503
        assert "OpenAI API request cannot set num_ctx" in refused.value.message
        assert "OLLAMA_CONTEXT_LENGTH" in refused.value.message
        assert fleet.node("gpu").state()["counts"] == before and loaded(fleet, "gpu")[LLAMA]["context_length"] == 8192
        answer = client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert answer.choices[0].message.content and fleet.node("gpu").state()["counts"] == before

        def pinned() -> bool:
            return int(loaded(fleet, "gpu")[SMALL]["expires_at"][:4]) > time.gmtime().tm_year + 100

        wait_for(pinned, timeout=10, what="the runner pinned again after the OpenAI API request")
