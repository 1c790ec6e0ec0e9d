"""One poll of a simulated fleet: bad nodes do not spoil good ones, and the poll keeps to its deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cli.localstack import wait_for
from gpurouter.cluster.config import Config, parse_config
from gpurouter.cluster.observe import Observer, node_session
from gpurouter.cluster.ollama import OllamaClient, OllamaError
from simulator.run import Fleet, fleet_from_dict

DEADLINE = 0.6
MODELS = ["llama3.1:8b", "mxbai-embed-large", "all-minilm", "qwen2.5-coder:1.5b"]


def gpu_node(name: str, **extra: object) -> dict:
    return {
        "name": name,
        "gpus": [{"name": "NVIDIA GeForce RTX 3070", "vram": "8GiB"}],
        "models": MODELS,
        "token_rate": 0,
        **extra,
    }


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    spec = fleet_from_dict(
        {
            "nodes": [
                gpu_node("good", preload=[{"model": "llama3.1:8b", "keep_alive": -1}], version="0.12.6"),
                gpu_node("also-good", preload=[{"model": "all-minilm", "num_gpu": 0}], version="0.11.4"),
                gpu_node("down"),
                gpu_node("slow"),
                gpu_node("garbage"),
                gpu_node("error"),
            ]
        }
    )
    with Fleet(spec) as running:
        running.node("down").inject("down")
        running.node("slow").inject("slow", latency_ms=int(DEADLINE * 5000))
        running.node("garbage").inject("garbage")
        running.node("error").inject("error")
        yield running


def config_for(urls: dict[str, str], timeout: float = DEADLINE) -> Config:
    return parse_config(
        {
            "nodes": [{"name": name, "url": url, "vram": "8GiB"} for name, url in urls.items()],
            "priority_models": ["llama3.1:latest"],
            "request_timeout": timeout,
        }
    )


def test_bad_nodes_are_down_only_themselves_and_the_poll_keeps_its_deadline(fleet: Fleet) -> None:
    with Observer(config_for(fleet.urls)) as observer:
        started = time.monotonic()
        state = observer.poll()
        took = time.monotonic() - started
    assert DEADLINE * 0.9 <= took <= DEADLINE + 0.4, took  # waits for the slow node, no longer
    assert state.duration <= DEADLINE + 0.4
    by_name = {n.name: n for n in state.nodes}
    assert {n: s.up for n, s in by_name.items()} == {
        "good": True,
        "also-good": True,
        "down": False,
        "slow": False,
        "garbage": False,
        "error": False,
    }
    assert {n: s.error_kind for n, s in by_name.items() if not s.up} == {
        "down": "refused",
        "slow": "timeout",
        "garbage": "garbage",
        "error": "server_error",
    }
    assert "HTTP 500" in (by_name["error"].error or "")
    assert by_name["slow"].poll_seconds == pytest.approx(DEADLINE, abs=0.2)
    for name in ("down", "slow", "garbage", "error"):
        assert by_name[name].version is None and by_name[name].loaded == () and by_name[name].installed == ()


def test_good_nodes_are_read_exactly(fleet: Fleet) -> None:
    with Observer(config_for(fleet.urls)) as observer:
        state = observer.poll()
    for name, version in (("good", "0.12.6"), ("also-good", "0.11.4")):
        node = state.node(name)
        assert node is not None and node.up and node.version == version
        truth = fleet.node(name).state()
        assert [(m.name, m.size, m.size_vram, m.context_length) for m in node.loaded] == [
            (m["model"], m["size"], m["size_vram"], m["context_length"]) for m in truth["loaded"]
        ]
        assert sorted(m.name for m in node.installed) == sorted(
            ["llama3.1:8b", "mxbai-embed-large:latest", "all-minilm:latest", "qwen2.5-coder:1.5b"]
        )
        assert node.capacity.source == "static" and node.capacity.total == 8 * 1024**3
        assert 0 < node.poll_seconds < DEADLINE
    good = state.node("good")
    assert good is not None and good.loaded[0].fully_on_gpu
    minilm = state.node("also-good")
    assert minilm is not None and minilm.loaded[0].size_vram == 0  # num_gpu 0: on CPU


def test_latencies_overlap_instead_of_adding_up() -> None:
    spec = fleet_from_dict({"nodes": [gpu_node(f"n{i}", latency_ms=300) for i in range(8)]})
    with Fleet(spec) as fleet, Observer(config_for(fleet.urls, timeout=2.0)) as observer:
        observer.poll()  # connections and /api/show
        started = time.monotonic()
        state = observer.poll()
        took = time.monotonic() - started
    assert all(n.up for n in state.nodes)
    assert took < 0.3 * 2, took  # one latency (plus overhead), not 8 × 3 of them


def test_a_node_that_recovers_is_up_again_with_its_version(fleet: Fleet) -> None:
    urls = {"good": fleet.urls["good"]}
    with Observer(config_for(urls)) as observer:
        calls: list[str] = []
        real = observer.poller._get

        async def counting(url: str, what: str) -> Any:
            calls.append(what)
            return await real(url, what)

        observer.poller._get = counting  # type: ignore[method-assign]
        assert observer.poll().nodes[0].version == "0.12.6"
        assert observer.poll().nodes[0].version == "0.12.6"
        assert calls.count("version") == 1  # re-read only after a while or after the node was down
        fleet.node("good").inject("down")
        assert not observer.poll().nodes[0].up
        fleet.node("good").clear("down")
        back = observer.poll().nodes[0]
        assert back.up and back.version == "0.12.6" and calls.count("version") == 2


def test_show_is_asked_once_per_digest_and_a_late_answer_is_kept() -> None:
    spec = fleet_from_dict({"nodes": [gpu_node("a"), gpu_node("b")]})
    with Fleet(spec) as fleet, Observer(config_for(fleet.urls, timeout=0.5)) as observer:
        asked: list[str] = []
        release = threading.Event()
        real = observer.poller._show

        async def slow_show(url: str, model: str, timeout: float) -> Any:
            asked.append(model)
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 5)  # a node slow to answer
            return await real(url, model, timeout)

        observer.poller._show = slow_show  # type: ignore[method-assign]
        started = time.monotonic()
        first = observer.poll()
        assert time.monotonic() - started < 0.5 + 0.3  # did not wait for /api/show past the deadline
        node = first.nodes[0].name
        assert first.need("llama3.1:8b", node) is not None and first.need("llama3.1:8b", node).source == "disk"
        assert sorted(asked) == sorted(MODELS_AS_LISTED)  # one per digest, though both nodes have them
        observer.poll()
        assert len(asked) == len(MODELS_AS_LISTED)  # still in flight: not asked twice
        release.set()
        wait_for(lambda: not observer.ledger.missing_shows(first.nodes))
        assert observer.poll().need("llama3.1:8b", node).source == "estimated"


MODELS_AS_LISTED = ["llama3.1:8b", "mxbai-embed-large:latest", "all-minilm:latest", "qwen2.5-coder:1.5b"]


# ------------------------------------------------------------------------------------------- transport


def test_node_session_errors_are_classified(fleet: Fleet) -> None:
    def kind(url: str, timeout: float = 1.0) -> str:
        client = OllamaClient(url, connect_timeout=timeout, read_timeout=timeout, session=node_session(url))
        try:
            client.ps()
        except OllamaError as exc:
            return exc.kind
        finally:
            client.close()
        return "ok"

    assert kind(fleet.urls["good"]) == "ok"
    assert kind(fleet.urls["down"]) == "refused"
    assert kind(fleet.urls["slow"], timeout=0.2) == "timeout"
    assert kind(fleet.urls["garbage"]) == "garbage"
    assert kind(fleet.urls["error"]) == "server_error"


def test_node_session_posts_json(fleet: Fleet) -> None:
    url = fleet.urls["good"]
    client = OllamaClient(url, session=node_session(url))
    try:
        assert client.show("llama3.1:8b").model_info["general.architecture"] == "llama"
        with pytest.raises(OllamaError) as raised:
            client.show("no-such-model")
        assert raised.value.kind == "not_found" and raised.value.status == 404
        client.load("all-minilm", embedding=True, keep_alive=-1, timeout=10)
        assert any(m.name == "all-minilm:latest" for m in client.ps())
    finally:
        client.close()


def test_node_session_honours_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert node_session("http://127.0.0.1:11434").trust_env is False  # looked up once: none applies
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    assert node_session("http://127.0.0.1:11434").trust_env is True  # requests keeps applying it
