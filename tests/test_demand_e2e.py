"""Placement from demand end to end: a simulated fleet, the proxy counting demand, the optimizer reading it over
HTTP and acting through Ollama's API — kept warm, released, pre-warmed, in sight; no proxy: the priority list."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from test_operator import schema_errors

from cli.localstack import wait_for
from gpurouter.cluster.config import parse_config
from optimizer.service import OptimizerHandle, start_optimizer
from proxy.service import ProxyHandle, start_proxy
from simulator.run import Fleet, fleet_from_dict

SMALL = "llama3.2:1b"
NODES = [
    {"name": name, "gpus": [{"vram": "8GiB"}], "models": [SMALL], "num_parallel": 1, "token_rate": 400}
    for name in ("a", "b")
]


@contextmanager
def stack(demand: dict, nodes: list[dict] = NODES) -> Iterator[tuple[Fleet, ProxyHandle, OptimizerHandle]]:
    """A fleet, a proxy over it and an optimizer reading the proxy's demand (`demand` settings on top of a short
    window and a fast pass); the reconcile loop's own pass only once an hour."""
    with Fleet(fleet_from_dict({"nodes": nodes})) as fleet:
        base = {
            "nodes": [{"name": n, "url": u, "vram": "8GiB", "num_parallel": 1} for n, u in fleet.urls.items()],
            "request_timeout": 5,
            "check_interval": 3600,
            "proxy": {"refresh_interval": 0.2},
        }
        settings = {"window": 4, "interval": 0.2, **demand}
        proxy = start_proxy(parse_config({**base, "demand": settings}), heal=False)
        try:
            config = parse_config({**base, "demand": {"proxy_url": proxy.url, **settings}})
            optimizer = start_optimizer(config)
            try:
                yield fleet, proxy, optimizer
            finally:
                optimizer.stop()
        finally:
            proxy.stop()


def copies(fleet: Fleet, model: str) -> dict[str, float | None]:
    """node → the expiry (Unix time) of the model's copy there, for each node holding one."""
    found = {}
    for name in fleet.urls:
        for runner in fleet.node(name).scheduler.snapshot():
            if runner.name in (model, f"{model}:latest"):
                found[name] = runner.expires_at
    return found


def gauge(handle: OptimizerHandle, name: str, **labels: str) -> float | None:
    return handle.app.extensions["gpu_router"].metrics.registry.get_sample_value(name, labels)


def ask(proxy: ProxyHandle, n: int = 3, predict: int = 4) -> None:
    for _ in range(n):
        body = {"model": SMALL, "prompt": "hi", "stream": False, "options": {"num_predict": predict}}
        assert requests.post(f"{proxy.url}/api/generate", json=body, timeout=30).status_code == 200


def test_a_model_asked_for_is_kept_warm_in_sight_and_released_when_its_demand_falls():
    with stack({}) as (fleet, proxy, optimizer):
        ask(proxy)  # the proxy loads it cold, with Ollama's default keep_alive (5 minutes)
        (node,) = wait_for(lambda: copies(fleet, SMALL), timeout=10, what="a copy")

        def renewed() -> bool:
            expiry = copies(fleet, SMALL).get(node)
            return expiry is not None and expiry > time.time() + 20 * 60  # demand.keep_alive: 30m

        wait_for(renewed, timeout=10, what="the copy kept warm with demand.keep_alive")
        labels = {"node": node, "model": SMALL}
        assert gauge(optimizer, "gpu_router_optimizer_placement_desired", **labels) == 1
        assert gauge(optimizer, "gpu_router_optimizer_placement_actual", **labels) == 1
        assert gauge(optimizer, "gpu_router_optimizer_demand_up") == 1
        placement = requests.get(f"{optimizer.url}/api/v1/placement", timeout=10).json()
        (row,) = placement["demand"]["models"]
        assert placement["demand"]["state"] == "on" and row["model"] == SMALL and row["copies"] == 1
        assert f"requests/min: on GPU on {node}" in row["why"]
        assert {"node": node, "model": SMALL} in placement["demand"]["desired"]
        page = requests.get(f"{optimizer.url}/", timeout=10).text
        assert f'<tr class="demand" data-model="{SMALL}" data-copies="1">' in page
        report = requests.get(f"{optimizer.url}/api/v1/report", timeout=10).json()
        assert report["demand"]["models"] == placement["demand"]["models"] and schema_errors("report", report) == []
        # no request for longer than the window: below the threshold, released
        wait_for(lambda: not copies(fleet, SMALL), timeout=15, what="the copy released")
        actions = requests.get(f"{optimizer.url}/api/v1/actions", timeout=10).json()["actions"]
        released = [a for a in actions if a["action"] == "release"]
        assert [(a["outcome"], a["node"]) for a in released] == [("success", node)]
        assert gauge(optimizer, "gpu_router_optimizer_placement_desired", **labels) is None  # no longer shown


def test_requests_that_keep_waiting_in_the_proxy_pre_warm_a_copy_on_another_node():
    """One slot a runner: four clients at once keep three waiting in the proxy; the optimizer loads a second
    copy on the other node, and the proxy sends requests there too."""
    with stack({"prewarm_queue": 0.2, "window": 30}) as (fleet, proxy, optimizer):
        ask(proxy, 1)
        (first,) = wait_for(lambda: copies(fleet, SMALL), timeout=10, what="a copy")
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                ask(proxy, 1, predict=200)

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            both = wait_for(lambda: len(copies(fleet, SMALL)) == 2, timeout=30, what="a second copy")
            assert both
            other = next(n for n in fleet.urls if n != first)
            wait_for(lambda: fleet.node(other).traffic.counts()["served"] > 0, timeout=15, what="requests there")
        finally:
            stop.set()
            for t in clients:
                t.join(30)
        loads = [
            a
            for a in requests.get(f"{optimizer.url}/api/v1/actions", timeout=10).json()["actions"]
            if a["action"] == "load"
        ]
        assert [(a["node"], a["outcome"]) for a in loads] == [(other, "success")]


def test_without_a_proxy_to_read_the_optimizer_places_the_priority_list_only():
    """demand.proxy_url names a port nothing listens on: demand_up 0, the report says why, nothing is loaded
    for demand, and the optimizer keeps serving."""
    with Fleet(fleet_from_dict({"nodes": NODES[:1]})) as fleet:
        config = parse_config(
            {
                "nodes": [{"name": "a", "url": fleet.urls["a"], "vram": "8GiB"}],
                "check_interval": 3600,
                "demand": {"proxy_url": "http://127.0.0.1:9", "interval": 0.1},
            }
        )
        optimizer = start_optimizer(config)
        try:

            def report() -> dict:
                return requests.get(f"{optimizer.url}/api/v1/report", timeout=10).json()

            wait_for(lambda: report()["demand"]["error"], timeout=10, what="a failed read of the demand")
            assert gauge(optimizer, "gpu_router_optimizer_demand_up") == 0
            assert report()["demand"]["state"] == "unread" and "127.0.0.1:9" in report()["demand"]["error"]
            assert requests.get(f"{optimizer.url}/healthz", timeout=10).status_code == 200
            page = requests.get(f"{optimizer.url}/", timeout=10).text
            assert '<h2>Placement from demand</h2><p class="muted">The proxy&#x27;s demand could not be read' in page
            assert copies(fleet, SMALL) == {}
        finally:
            optimizer.stop()


def test_without_placement_from_demand_there_is_no_demand_series_to_alert_on():
    """`GPURouterDemandUnread` fires on demand_up 0: an optimizer that reads no demand has no such series."""
    with Fleet(fleet_from_dict({"nodes": NODES[:1]})) as fleet:
        config = parse_config(
            {"nodes": [{"name": "a", "url": fleet.urls["a"], "vram": "8GiB"}], "check_interval": 3600}
        )
        optimizer = start_optimizer(config)
        try:
            assert gauge(optimizer, "gpu_router_optimizer_demand_up") is None
            metrics = requests.get(f"{optimizer.url}/metrics", timeout=10).text
            assert (
                "gpu_router_optimizer_demand_up" not in metrics and "gpu_router_optimizer_placement_desired" in metrics
            )
        finally:
            optimizer.stop()
