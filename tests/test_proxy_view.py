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
                ledger = view.ledger
                ledger.begin("gpu", MODEL, cold=True)
                ledger.begin("gpu", MODEL, cold=False)
                traffic = ledger.traffic()
                assert traffic.in_flight == {("gpu", MODEL): 2}
                assert ("gpu", "llama3.2:1b") in traffic.busy and ("gpu", "llama3.2:1b") in traffic.loading
                await view.refresh()  # the model is not loaded yet and the request has not ended
                assert ("gpu", "llama3.2:1b") in ledger.traffic().loading
                requests.post(fleet.urls["gpu"] + "/api/generate", json={"model": MODEL}, timeout=30)
                await view.refresh()  # the poll shows the copy: no longer counted as the proxy's own
                assert ledger.traffic().loading == frozenset()
                ledger.end("gpu", MODEL)
                ledger.end("gpu", MODEL)
                assert ledger.traffic().in_flight == {} and ledger.traffic().busy == frozenset()
                ledger.begin("cpu", MODEL, cold=True)
                ledger.failed("cpu", MODEL)
                ledger.end("cpu", MODEL)
                assert ledger.traffic().failing == {("cpu", MODEL)} and ledger.traffic().loading == frozenset()
                await view.refresh()  # a poll that started after the failure sees the node up
                assert ledger.traffic().failing == frozenset()
            finally:
                await view.stop()

        try:
            asyncio.run(story())
        finally:
            observer.close()
