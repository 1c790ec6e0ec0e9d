"""The proxy's cluster view: the last poll corrected by the proxy's own traffic until a later poll says more."""

from __future__ import annotations

import asyncio

import requests

from gpurouter.cluster.config import parse_config
from gpurouter.cluster.observe import Observer
from proxy.view import ClusterView
from simulator.run import Fleet, fleet_from_dict

MODEL = "llama3.2:1b"


def test_own_traffic_counts_until_a_later_poll_sees_the_node() -> None:
    nodes = [{"name": "gpu", "gpus": [{"vram": "8GiB"}], "models": [MODEL]}, {"name": "cpu", "models": [MODEL]}]
    with Fleet(fleet_from_dict({"nodes": nodes})) as fleet:
        config = parse_config(
            {
                "nodes": [{"name": n, "url": u, "vram": "8GiB" if n == "gpu" else 0} for n, u in fleet.urls.items()],
                "proxy": {"refresh_interval": 3600},
            }
        )
        observer = Observer(config)

        async def story() -> None:
            view = ClusterView(config, observer)
            await view.start()
            try:
                view.begin("gpu", MODEL, cold=True)
                view.begin("gpu", MODEL, cold=False)
                traffic = view.traffic()
                assert traffic.in_flight == {"gpu": 2} and view.in_flight("gpu") == 2
                assert ("gpu", "llama3.2:1b") in traffic.busy and ("gpu", "llama3.2:1b") in traffic.loading
                await view.refresh()  # the model is not loaded yet and the request has not ended
                assert ("gpu", "llama3.2:1b") in view.traffic().loading
                requests.post(fleet.urls["gpu"] + "/api/generate", json={"model": MODEL}, timeout=30)
                await view.refresh()  # the poll shows the copy: no longer counted as the proxy's own
                assert view.traffic().loading == frozenset()
                view.end("gpu", MODEL)
                view.end("gpu", MODEL)
                assert view.traffic().in_flight == {} and view.traffic().busy == frozenset()
                view.begin("cpu", MODEL, cold=True)
                view.failed("cpu", MODEL)
                view.end("cpu", MODEL)
                assert view.traffic().failing == {"cpu"} and view.traffic().loading == frozenset()
                await view.refresh()  # a poll that started after the failure sees the node up
                assert view.traffic().failing == frozenset()
            finally:
                await view.stop()

        try:
            asyncio.run(story())
        finally:
            observer.close()
