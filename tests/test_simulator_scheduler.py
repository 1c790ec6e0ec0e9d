"""The simulated node's scheduler: sizes, fit and eviction, reloads, keep_alive, refcounts, load time."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from cli.localstack import wait_for
from gpurouter.units import GIB
from simulator.catalog import find
from simulator.classic import estimate
from simulator.fleet import GpuSpec
from simulator.gotypes import FOREVER
from simulator.options import RunnerOptions, merge_options
from simulator.placer import Choice
from simulator.run import Fleet, fleet_from_dict
from simulator.scheduler import LoadRequest, Runner, Scheduler, SchedulerError, pick_victim

LLAMA8_FULL_4096 = 6_099_560_448  # §5.5: llama3.1:8b, ctx 4096 × 1, one GPU with room
LLAMA8_FULL_8192 = 6_930_032_640
LLAMA8_PARTIAL_4GIB = (6_499_565_568, 4_141_654_016)  # §5.5: 19/33 layers on a 4.0 GiB GPU
MXBAI = 1_183_850_496  # §7, parallel 1, ctx 512
NOMIC_CAPPED = 791_006_208  # §7: Modelfile num_ctx 8192 capped at the trained 2048


class FakeClock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    gpus: tuple[int, ...] = (8 * GIB,), ram: int = 32 * GIB, clock: FakeClock | None = None, **kwargs: object
) -> Scheduler:
    kwargs.setdefault("max_loaded", 3 * max(1, len(gpus)))
    return Scheduler([GpuSpec(f"GPU {i}", v) for i, v in enumerate(gpus)], ram, clock=clock or FakeClock(), **kwargs)  # type: ignore[arg-type]


def request(name: str, keep_alive: float | None = None, node_ctx: int = 4096, **options: object) -> LoadRequest:
    spec = find(name)
    assert spec is not None
    return LoadRequest(spec.name, spec, merge_options(node_ctx, spec.default_num_ctx, options), keep_alive)


def load(sched: Scheduler, name: str, keep_alive: float | None = None, **options: object) -> Runner:
    """A load request: attach, then finish at once (the keep_alive starts)."""
    runner = sched.acquire(request(name, keep_alive, **options))
    sched.release(runner)
    return runner


def loaded(sched: Scheduler) -> dict[str, tuple[int, int]]:
    return {v.name: (v.size, v.size_vram) for v in sched.snapshot()}


# -- sizes (§5.5, §7)


def test_full_gpu_load_has_the_reference_size():
    sched = make(gpus=(8 * GIB,))
    load(sched, "llama3.1:8b")
    assert loaded(sched) == {"llama3.1:8b": (LLAMA8_FULL_4096, LLAMA8_FULL_4096)}
    [gpu] = sched.gpu_usage()
    assert (gpu.used, gpu.free) == (LLAMA8_FULL_4096, 8 * GIB - LLAMA8_FULL_4096)


def test_first_model_too_big_for_the_gpu_is_partially_offloaded():
    sched = make(gpus=(4 * GIB,))
    load(sched, "llama3.1:8b")
    assert loaded(sched) == {"llama3.1:8b": LLAMA8_PARTIAL_4GIB}


def test_num_gpu_zero_and_a_node_without_gpu_load_on_cpu():
    cpu_size = estimate(find("llama3.1:8b").arch, 4096, 1, ()).size  # type: ignore[union-attr]
    assert cpu_size == 5_154_267_136
    gpu_node = make(gpus=(8 * GIB,))
    load(gpu_node, "llama3.1:8b", num_gpu=0)
    assert loaded(gpu_node) == {"llama3.1:8b": (cpu_size, 0)}
    assert gpu_node.gpu_usage()[0].used == 0
    cpu_node = make(gpus=())
    load(cpu_node, "llama3.1:8b")
    assert loaded(cpu_node) == {"llama3.1:8b": (cpu_size, 0)}
    assert cpu_node.gpu_usage() == []


def test_embedding_models_use_modelfile_ctx_capped_and_parallel_one():
    sched = make(gpus=(8 * GIB,), num_parallel=4)
    load(sched, "mxbai-embed-large")
    load(sched, "nomic-embed-text")
    views = {v.name: v for v in sched.snapshot()}
    assert views["mxbai-embed-large:latest"].size == MXBAI
    assert views["nomic-embed-text:latest"].size == NOMIC_CAPPED
    assert views["nomic-embed-text:latest"].context_length == 2048


def test_request_num_ctx_beats_modelfile_beats_node_default():
    spec = find("nomic-embed-text")
    assert merge_options(4096, spec.default_num_ctx, {}).num_ctx == 8192  # type: ignore[union-attr]
    assert merge_options(4096, spec.default_num_ctx, {"num_ctx": 1024}).num_ctx == 1024  # type: ignore[union-attr]
    assert merge_options(2048, None, {}).num_ctx == 2048
    with pytest.raises(ValueError, match='option "num_ctx" must be of type integer'):
        merge_options(4096, None, {"num_ctx": "x"})


def test_multi_gpu_prefers_one_gpu_that_fits_else_splits():
    sched = make(gpus=(4 * GIB, 6 * GIB))
    load(sched, "mxbai-embed-large")
    usage = sched.gpu_usage()
    assert [g.used for g in usage] == [0, MXBAI]  # the GPU with the most free memory
    load(sched, "llama3.1:8b", num_ctx=2048)
    view = next(v for v in sched.snapshot() if v.name == "llama3.1:8b")
    assert view.size == view.size_vram  # fully on GPU, over both
    assert all(g.used > MXBAI / 2 for g in sched.gpu_usage())


def test_model_larger_than_ram_is_a_500_with_ollamas_text():
    sched = make(gpus=(), ram=4 * GIB)
    with pytest.raises(SchedulerError) as caught:
        sched.acquire(request("llama3.1:8b"))
    assert caught.value.status == 500
    assert str(caught.value) == "model requires more system memory (4.8 GiB) than is available (4.0 GiB)"
    assert sched.snapshot() == []


# -- fit, eviction, max loaded


def test_only_the_first_model_may_spill_others_evict_first():
    sched = make(gpus=(4 * GIB,))
    load(sched, "mxbai-embed-large")
    load(sched, "llama3.1:8b")  # does not fit beside mxbai: mxbai goes, then llama3.1 loads partially
    assert loaded(sched) == {"llama3.1:8b": LLAMA8_PARTIAL_4GIB}
    assert sched.counts()["mxbai-embed-large:latest"] == {"loads": 1, "unloads": 1}


def test_eviction_takes_the_shortest_keep_alive_first_and_forever_last():
    sched = make(gpus=(5 * GIB,))
    load(sched, "all-minilm", keep_alive=FOREVER)
    load(sched, "nomic-embed-text", keep_alive=60)
    load(sched, "mxbai-embed-large", keep_alive=600)
    load(sched, "llama3.2:1b")  # 2.29 GB: one of the three must go
    assert set(loaded(sched)) == {"all-minilm:latest", "mxbai-embed-large:latest", "llama3.2:1b"}
    load(sched, "llama3.2:3b")  # 3.31 GB: llama3.2:1b (5m) goes before mxbai (10m)
    assert set(loaded(sched)) == {"all-minilm:latest", "mxbai-embed-large:latest", "llama3.2:3b"}
    assert sched.counts()["all-minilm:latest"] == {"loads": 1, "unloads": 0}


def test_pick_victim_prefers_idle_runners_then_the_shortest():
    runners = []
    for name, session, busy in (("a", 600.0, 0), ("b", 60.0, 1), ("c", FOREVER, 0)):
        runner = Runner(request("all-minilm"), Choice(1, 0, {}, 1, 0, 7), session)
        runner.name, runner.refcount, runner.loading = name, busy, False
        runners.append(runner)
    assert pick_victim(runners).name == "a"  # type: ignore[union-attr]
    runners[0].refcount = runners[2].refcount = 1
    assert pick_victim(runners).name == "b"  # type: ignore[union-attr]
    assert pick_victim([]) is None


def test_max_loaded_models_evicts_even_when_memory_is_free():
    sched = make(gpus=(24 * GIB,), max_loaded=2)
    load(sched, "all-minilm", keep_alive=600)
    load(sched, "nomic-embed-text", keep_alive=60)
    load(sched, "mxbai-embed-large", keep_alive=600)
    assert set(loaded(sched)) == {"all-minilm:latest", "mxbai-embed-large:latest"}


def test_a_busy_victim_is_waited_for():
    sched = make(gpus=(8 * GIB,))
    busy = sched.acquire(request("llama3.1:8b"))  # a request in flight
    done = threading.Event()
    result: list[Runner] = []

    def other() -> None:
        result.append(sched.acquire(request("codellama:7b")))  # 6.9 GB: llama3.1 must go first
        done.set()

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    try:
        assert not done.wait(0.3)  # still waiting for llama3.1's request to finish
        assert set(loaded(sched)) == {"llama3.1:8b"}
        sched.release(busy)
        assert done.wait(5)
        assert set(loaded(sched)) == {"codellama:7b"}
    finally:
        sched.close()
        thread.join(5)
    sched.release(result[0])


# -- reloads


def test_changed_num_ctx_reloads_and_default_num_gpu_does_not():
    sched = make(gpus=(8 * GIB,))
    load(sched, "llama3.1:8b")
    load(sched, "llama3.1:8b", num_ctx=8192)
    assert loaded(sched) == {"llama3.1:8b": (LLAMA8_FULL_8192, LLAMA8_FULL_8192)}
    assert sched.counts()["llama3.1:8b"] == {"loads": 2, "unloads": 1}
    load(sched, "llama3.1:8b", num_ctx=8192, num_gpu=-1)  # same options: attach, no reload
    assert sched.counts()["llama3.1:8b"] == {"loads": 2, "unloads": 1}


def test_needs_reload_ignores_num_gpu_only_when_the_request_leaves_it_default():
    on_cpu = RunnerOptions(num_ctx=4096, num_gpu=0)
    assert not on_cpu.needs_reload(RunnerOptions(num_ctx=4096, num_gpu=-1))
    assert on_cpu.needs_reload(RunnerOptions(num_ctx=4096, num_gpu=33))
    for change in ({"num_batch": 256}, {"main_gpu": 1}, {"num_thread": 8}, {"use_mmap": False}):
        assert RunnerOptions(num_ctx=4096).needs_reload(RunnerOptions(num_ctx=4096, **change))  # type: ignore[arg-type]


# -- keep_alive, refcounts


def test_keep_alive_expiry_is_never_reported_and_default_is_5m():
    clock = FakeClock()
    sched = make(clock=clock)
    load(sched, "all-minilm", keep_alive=1.0)
    load(sched, "nomic-embed-text")
    expiries = {v.name: v.expires_at - clock.now for v in sched.snapshot()}
    assert expiries == {"nomic-embed-text:latest": 300.0, "all-minilm:latest": 1.0}
    clock.advance(0.5)
    assert "all-minilm:latest" in loaded(sched)
    clock.advance(0.5)
    assert set(loaded(sched)) == {"nomic-embed-text:latest"}
    clock.advance(300)
    assert sched.snapshot() == [] and sched.gpu_usage()[0].used == 0


def test_snapshot_is_sorted_by_expiry_descending_and_forever_looks_like_year_2318():
    clock = FakeClock()
    sched = make(clock=clock)
    load(sched, "all-minilm", keep_alive=60)
    load(sched, "mxbai-embed-large", keep_alive=FOREVER)
    load(sched, "nomic-embed-text", keep_alive=600)
    views = sched.snapshot()
    assert [v.name for v in views] == ["mxbai-embed-large:latest", "nomic-embed-text:latest", "all-minilm:latest"]
    assert 290 < (views[0].expires_at - clock.now) / (365.25 * 86400) < 293


def test_a_busy_runner_does_not_expire_and_expiry_restarts_when_the_last_request_ends():
    clock = FakeClock()
    sched = make(clock=clock)
    load(sched, "all-minilm", keep_alive=10)
    stale = sched.snapshot()[0].expires_at
    first = sched.acquire(request("all-minilm"))
    second = sched.acquire(request("all-minilm"))
    clock.advance(60)
    [view] = sched.snapshot()
    assert (view.busy, view.expires_at) == (2, stale)  # not updated while requests run
    sched.release(first)
    assert sched.snapshot()[0].expires_at == stale
    sched.release(second)
    assert sched.snapshot()[0].expires_at == clock.now + 10


def test_keep_alive_is_sticky_unless_a_request_sets_it():
    clock = FakeClock()
    sched = make(clock=clock)
    load(sched, "all-minilm", keep_alive=FOREVER)
    load(sched, "all-minilm")  # keep_alive absent: stays forever
    assert sched.snapshot()[0].expires_at > clock.now + 1e9
    load(sched, "all-minilm", keep_alive=120)
    assert sched.snapshot()[0].expires_at == clock.now + 120


def test_keep_alive_zero_unloads_after_the_request_and_unload_waits_for_busy_runners():
    clock = FakeClock()
    sched = make(clock=clock)
    load(sched, "all-minilm", keep_alive=0)
    assert sched.snapshot() == []
    busy = sched.acquire(request("nomic-embed-text"))
    sched.expire(find("nomic-embed-text"))  # type: ignore[arg-type]
    [view] = sched.snapshot()
    assert view.expires_at == clock.now  # "Stopping..." until the request ends
    sched.release(busy)
    assert sched.snapshot() == []
    assert sched.counts()["nomic-embed-text:latest"] == {"loads": 1, "unloads": 1}


def test_loads_take_size_over_load_speed_and_show_while_loading():
    sched = make(load_speed=MXBAI * 2)  # 0.5 s
    started = time.monotonic()
    thread = threading.Thread(target=load, args=(sched, "mxbai-embed-large"), daemon=True)
    thread.start()
    try:
        view = wait_for(lambda: next(iter(sched.snapshot()), None))
        assert view.loading and view.size == MXBAI  # type: ignore[union-attr]
        thread.join(5)
        assert time.monotonic() - started >= 0.45
        assert not sched.snapshot()[0].loading
    finally:
        sched.close()
        thread.join(5)


def test_concurrent_requests_for_one_model_share_one_load():
    sched = make(load_speed=MXBAI * 5)  # 0.2 s
    threads = [threading.Thread(target=load, args=(sched, "mxbai-embed-large"), daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sched.counts() == {"mxbai-embed-large:latest": {"loads": 1, "unloads": 0}}
    assert sched.snapshot()[0].busy == 0


def test_restart_during_a_load_fails_the_load():
    sched = make(load_speed=MXBAI * 2)
    errors: list[SchedulerError] = []

    def loader() -> None:
        try:
            load(sched, "mxbai-embed-large")
        except SchedulerError as exc:
            errors.append(exc)

    thread = threading.Thread(target=loader, daemon=True)
    thread.start()
    wait_for(sched.snapshot)
    sched.unload_all()
    thread.join(5)
    assert [e.status for e in errors] == [500]
    assert sched.snapshot() == []


# -- over HTTP, with real time


@pytest.fixture
def fleet():
    spec = fleet_from_dict(
        {
            "nodes": [
                {
                    "name": "gpu",
                    "version": "0.12.6",
                    "gpus": [{"name": "NVIDIA GeForce RTX 3070", "vram": "8GiB"}],
                    "models": ["llama3.1:8b", "all-minilm", "mxbai-embed-large"],
                    "load_speed": "10GB",
                    "token_rate": 0,
                }
            ]
        }
    )
    with Fleet(spec) as running:
        yield running


def test_short_keep_alive_expires_in_real_time(fleet):
    url = fleet.urls["gpu"]
    reply = requests.post(f"{url}/api/embed", json={"model": "all-minilm", "keep_alive": "1s"}, timeout=10)
    assert reply.json() == {"model": "all-minilm", "embeddings": []}
    started = time.monotonic()
    assert requests.get(f"{url}/api/ps", timeout=5).json()["models"][0]["name"] == "all-minilm:latest"
    wait_for(lambda: requests.get(f"{url}/api/ps", timeout=5).json()["models"] == [], timeout=5)
    assert time.monotonic() - started >= 0.5


def test_model_shows_in_ps_while_it_loads(fleet):
    url = fleet.urls["gpu"]
    answers: list[requests.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(requests.post(f"{url}/api/generate", json={"model": "llama3.1:8b"}, timeout=20)),
        daemon=True,
    )
    started = time.monotonic()
    thread.start()
    try:
        models = wait_for(lambda: requests.get(f"{url}/api/ps", timeout=5).json()["models"])
        assert models[0]["size"] == LLAMA8_FULL_4096  # type: ignore[index]
        assert answers == []  # the load request is still waiting
        assert fleet.node("gpu").state()["loaded"][0]["loading"] is True
    finally:
        thread.join(20)
    assert time.monotonic() - started >= LLAMA8_FULL_4096 / 1e10 * 0.9
    assert answers[0].json()["done_reason"] == "load"
