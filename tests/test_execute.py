"""The executor: unit tests over a fake Ollama client, integration tests against a simulated fleet."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from types import MappingProxyType

import pytest

from gpurouter.act.execute import execute
from gpurouter.cluster.config import parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.ollama import InstalledModel, LoadedModel, OllamaError
from gpurouter.cluster.state import Capacity, ClusterState, GpuInfo, ModelNeed, NodeState
from gpurouter.decide.placement import Plan, Step, plan
from gpurouter.units import MIB
from simulator.run import Fleet, fleet_from_dict

FOREVER = datetime(2318, 1, 1, tzinfo=timezone.utc)


class FakeClock:
    """Monotonic time that only moves when the executor sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeOllama:
    """One node's /api/ps, load and unload; `landing` is the GPU share a load gets (1 = all on GPU)."""

    def __init__(self, loaded: tuple[LoadedModel, ...] = (), landing: float = 1.0) -> None:
        self.loaded = {m.name: m for m in loaded}
        self.landing = landing
        self.calls: list[tuple[str, str]] = []
        self.fail_load: OllamaError | None = None

    def ps(self, timeout: float | None = None) -> tuple[LoadedModel, ...]:
        return tuple(self.loaded.values())

    def load(self, model: str, *, num_ctx=None, keep_alive=-1, num_gpu=None, embedding=False, timeout=300.0):
        self.calls.append(("load", model))
        if self.fail_load is not None:
            raise self.fail_load
        size = 1000 * MIB
        self.loaded[model] = LoadedModel(model, size, int(size * self.landing), expires_at=FOREVER)

    def unload(self, model: str, *, embedding: bool = False, timeout: float | None = None) -> None:
        self.calls.append(("unload", model))
        self.loaded.pop(model, None)


def lm(name: str, vram: int = 1000, size: int = 1000, expires: datetime | None = FOREVER) -> LoadedModel:
    return LoadedModel(name, size * MIB, vram * MIB, expires_at=expires)


def make_state(nodes: dict[str, tuple[LoadedModel, ...]]) -> ClusterState:
    config = parse_config(
        {"nodes": [{"name": n, "url": f"http://127.0.0.1:{10000 + i}"} for i, n in enumerate(nodes)]}, "t.yaml"
    )
    states = tuple(
        NodeState(
            cfg,
            True,
            0.8,
            Capacity("static", (GpuInfo(0, "g", 8192 * MIB),)),
            loaded=nodes[cfg.name],
            installed=(InstalledModel("m:latest", 1, "d"),),
        )
        for cfg in config.nodes
    )
    return ClusterState(config, 0.0, states, MappingProxyType({"m:latest": ModelNeed("m:latest", 1000 * MIB, "x", 1)}))


def run(plan_: Plan, state: ClusterState, clients: dict, **kwargs):
    clock = FakeClock()
    return execute(plan_, state, clients, load_timeout=30, clock=clock, sleep=clock.sleep, wall=lambda: 0.0, **kwargs)


MOVE = Plan(
    steps=(
        Step("evict", "idle:latest", "gpu", "make room", for_model="m:latest"),
        Step("load", "m:latest", "gpu", "put on GPU"),
        Step("unload", "m:latest", "cpu", "remove CPU copy"),
    ),
    unplaced=(),
    already=(),
)


def test_dry_run_does_nothing():
    gpu, cpu = FakeOllama((lm("idle:latest"),)), FakeOllama((lm("m:latest", vram=0),))
    state = make_state({"gpu": gpu.ps(), "cpu": cpu.ps()})
    result = run(MOVE, state, {"gpu": gpu, "cpu": cpu}, dry_run=True)
    assert result.dry_run and result.ok and result.outcomes == ()
    assert gpu.calls == [] and cpu.calls == []


def test_evict_load_verify_then_remove_the_cpu_copy():
    gpu, cpu = FakeOllama((lm("idle:latest"),)), FakeOllama((lm("m:latest", vram=0),))
    state = make_state({"gpu": gpu.ps(), "cpu": cpu.ps()})
    events: list[tuple[str, str]] = []
    result = run(MOVE, state, {"gpu": gpu, "cpu": cpu}, on_event=lambda k, s, d: events.append((k, s.action)))
    assert result.ok, result.outcomes
    assert gpu.calls == [("unload", "idle:latest"), ("load", "m:latest")] and cpu.calls == [("unload", "m:latest")]
    assert [o.step.action for o in result.outcomes] == ["evict", "load", "unload"]
    assert ("progress", "load") in events and events[-1] == ("done", "unload")
    assert "100% GPU" in result.outcomes[1].detail


def test_load_landing_on_cpu_fails_and_is_undone_while_another_copy_serves():
    gpu, cpu = FakeOllama(landing=0.4), FakeOllama((lm("m:latest", vram=0),))
    state = make_state({"gpu": gpu.ps(), "cpu": cpu.ps()})
    result = run(Plan(MOVE.steps[1:], (), ()), state, {"gpu": gpu, "cpu": cpu})
    assert not result.ok
    load, unload = result.outcomes
    assert not load.ok and "landed 40% on GPU" in load.detail and "still served on cpu" in load.detail
    assert unload.skipped and not unload.ok
    assert "m:latest" not in gpu.loaded and "m:latest" in cpu.loaded and cpu.calls == []


def test_a_failed_landing_is_kept_when_it_is_the_only_copy():
    gpu = FakeOllama(landing=0.0)
    state = make_state({"gpu": ()})
    result = run(Plan((Step("load", "m:latest", "gpu", "x"),), (), ()), state, {"gpu": gpu})
    assert not result.ok and "kept: it is the only copy" in result.outcomes[0].detail
    assert "m:latest" in gpu.loaded


def test_a_victim_that_became_busy_is_not_evicted_and_the_load_is_skipped():
    busy = lm("idle:latest", expires=datetime(2000, 1, 1, tzinfo=timezone.utc))
    gpu, cpu = FakeOllama((busy,)), FakeOllama((lm("m:latest", vram=0),))
    state = make_state({"gpu": (lm("idle:latest"),), "cpu": cpu.ps()})
    clock = FakeClock()
    result = execute(
        MOVE, state, {"gpu": gpu, "cpu": cpu}, load_timeout=5, clock=clock, sleep=clock.sleep, wall=lambda: 1.9e9
    )
    evict, load, unload = result.outcomes
    assert not evict.ok and "busy" in evict.detail
    assert load.skipped and unload.skipped and gpu.calls == [] and cpu.calls == []


def test_already_on_gpu_at_re_read_means_done_and_the_copy_removal_goes_ahead():
    gpu, cpu = FakeOllama((lm("m:latest"),)), FakeOllama((lm("m:latest", vram=0),))
    state = make_state({"gpu": (lm("idle:latest"),), "cpu": cpu.ps()})
    result = run(MOVE, state, {"gpu": gpu, "cpu": cpu})
    assert result.ok and gpu.calls == [] and cpu.calls == [("unload", "m:latest")]
    assert "not needed" in result.outcomes[0].detail and "not needed" in result.outcomes[1].detail


def test_errors_are_recorded_never_raised():
    gpu, cpu = FakeOllama(), FakeOllama((lm("m:latest", vram=0),))
    gpu.fail_load = OllamaError("server_error", "http://gpu/api/generate: HTTP 500: boom", 500)
    state = make_state({"gpu": (), "cpu": cpu.ps()})
    result = run(Plan(MOVE.steps[1:], (), ()), state, {"gpu": gpu, "cpu": cpu})
    assert not result.ok and "HTTP 500: boom" in result.outcomes[0].detail
    assert result.outcomes[1].skipped and cpu.calls == []


def test_shared_node_slots_are_used():
    class Recording(threading.Semaphore):
        def __init__(self) -> None:
            super().__init__(1)
            self.taken = 0

        def acquire(self, *args, **kwargs):
            self.taken += 1
            return super().acquire(*args, **kwargs)

        __enter__ = acquire

    slots = {"gpu": Recording(), "cpu": Recording()}
    gpu, cpu = FakeOllama((lm("idle:latest"),)), FakeOllama((lm("m:latest", vram=0),))
    state = make_state({"gpu": gpu.ps(), "cpu": cpu.ps()})
    assert run(MOVE, state, {"gpu": gpu, "cpu": cpu}, node_slots=slots).ok
    assert slots["gpu"].taken == 1 and slots["cpu"].taken == 1


# ------------------------------------------------------------------------------- against the simulator


def _fleet(nodes: list[dict], version: str = "0.12.6") -> Fleet:
    """Simulated nodes of one era (classic by default: the figures below are Ollama's classic estimate)."""
    return Fleet(fleet_from_dict({"nodes": [{"port": 0, "load_speed": 0, "version": version, **n} for n in nodes]}))


def _config(fleet: Fleet, vram: dict[str, str], priority: list) -> object:
    nodes = [{"name": name, "url": url, "vram": vram[name]} for name, url in fleet.urls.items()]
    raw = {"nodes": nodes, "priority_models": priority, "request_timeout": 5, "vram_safety_margin": 0.8}
    return parse_config(raw, "t.yaml")  # the figures below use the guide's margin


def _counts(fleet: Fleet) -> dict:
    return {name: fleet.node(name).counts() for name in fleet.urls}


@pytest.fixture
def moved_fleet():
    """A CPU node serving mxbai-embed-large (num_gpu 0) and an empty GPU node."""
    with _fleet(
        [
            {"name": "cpu", "gpus": [], "models": ["mxbai-embed-large"], "preload": [{"model": "mxbai-embed-large"}]},
            {
                "name": "gpu",
                "gpus": [{"name": "GTX", "vram": "4GiB"}],
                "models": ["mxbai-embed-large", "llama3.2:1b"],
                "preload": [{"model": "llama3.2:1b", "keep_alive": "5m"}],
            },
        ]
    ) as fleet:
        yield fleet


def test_vram_hog_after_observation_fails_and_leaves_the_model_serving(moved_fleet):
    config = _config(moved_fleet, {"cpu": "0", "gpu": "4GiB"}, ["mxbai-embed-large"])
    with Observer(config) as observer:
        state = observer.poll()
        result = plan(state)
        assert [s.action for s in result.steps] == ["evict", "load", "unload"]
        moved_fleet.node("gpu").inject("vram_hog", bytes=4 * 1024 * MIB)
        execution = execute(result, state, observer.clients, load_timeout=10, poll_interval=0.05)
    assert not execution.ok
    _, load, unload = execution.outcomes
    assert not load.ok and "landed" in load.detail and "still served on cpu" in load.detail
    assert unload.skipped
    loaded = {name: [m["model"] for m in moved_fleet.node(name).state()["loaded"]] for name in ("cpu", "gpu")}
    assert "mxbai-embed-large:latest" in loaded["cpu"] and "mxbai-embed-large:latest" not in loaded["gpu"]


def test_real_eviction_load_and_removal(moved_fleet):
    config = _config(moved_fleet, {"cpu": "0", "gpu": "2GiB"}, ["mxbai-embed-large"])
    with Observer(config) as observer:
        state = observer.poll()
        result = plan(state)
        assert [(s.action, s.model) for s in result.steps] == [
            ("evict", "llama3.2:1b"),
            ("load", "mxbai-embed-large:latest"),
            ("unload", "mxbai-embed-large:latest"),
        ]
        execution = execute(result, state, observer.clients, load_timeout=10, poll_interval=0.05)
        assert execution.ok, execution.outcomes
        after = observer.poll()
    assert after.on_gpu("mxbai-embed-large") and [n.name for n, _ in after.placements("mxbai-embed-large")] == ["gpu"]
    counts = _counts(moved_fleet)
    assert counts["gpu"]["llama3.2:1b"]["unloads"] == 1 and counts["cpu"]["mxbai-embed-large:latest"]["unloads"] == 1


def test_a_model_on_cpu_on_the_only_gpu_node_is_reloaded_in_place_without_an_unload_of_ours():
    """Use case 2 (one workstation): the CPU copy is swapped for a GPU copy by Ollama itself (num_gpu changed)."""
    node = {
        "name": "ws",
        "gpus": [{"name": "RTX 3070", "vram": "8GiB"}],
        "models": ["llama3.2:3b"],
        "preload": [{"model": "llama3.2:3b", "num_gpu": 0, "keep_alive": -1}],
    }
    with _fleet([node]) as fleet:
        config = _config(fleet, {"ws": "8GiB"}, ["llama3.2:3b"])
        with Observer(config) as observer:
            state = observer.poll()
            assert state.node("ws").loaded_model("llama3.2:3b").size_vram == 0
            result = plan(state)
            assert [(s.action, s.num_gpu) for s in result.steps] == [("load", 29)]  # 28 blocks + output
            execution = execute(result, state, observer.clients, load_timeout=10, poll_interval=0.05)
            assert execution.ok, execution.outcomes
            after = observer.poll()
        (copy,) = after.node("ws").loaded
        assert copy.fully_on_gpu and copy.size == 3_310_184_448  # §7 column C
        assert plan(after).steps == ()
