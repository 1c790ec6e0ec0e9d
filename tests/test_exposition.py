"""A scrape's text: byte for byte what prometheus_client writes, with unchanged nodes' lines reused."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import CollectorRegistry
from test_collector import demo_state, loaded

from exporter import exposition
from exporter.collector import cluster_families
from exporter.exposition import Exposition
from gpurouter.cluster.state import ClusterState


def reference(state: ClusterState, openmetrics: bool) -> bytes:
    class Fixed:
        def collect(self) -> list:
            return cluster_families(state, "1.2.3", 0.5)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    return (generate_openmetrics if openmetrics else generate_latest)(registry)


@pytest.mark.parametrize("openmetrics", [False, True])
def test_the_text_is_what_the_client_library_writes(openmetrics: bool) -> None:
    state = demo_state()
    quoted = replace(state, nodes=(replace(state.nodes[0], version='0.12.10 "x"\\n'), *state.nodes[1:]))
    out = Exposition()
    for each in (state, quoted, state):  # built, rebuilt for the changed node, reused for the others
        assert out.render(each, "1.2.3", 0.5, openmetrics=openmetrics) == reference(each, openmetrics)


def test_unchanged_nodes_are_not_rebuilt_and_changed_ones_are(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    real = exposition.node_samples

    def counting(node, state, models):  # type: ignore[no-untyped-def]
        built.append(node.name)
        return real(node, state, models)

    monkeypatch.setattr(exposition, "node_samples", counting)
    state = demo_state()
    out = Exposition()
    out.render(state, "v", 0.1, openmetrics=False)
    assert sorted(built) == sorted(n.name for n in state.nodes)
    built.clear()
    slower = replace(state, nodes=tuple(replace(n, poll_seconds=n.poll_seconds + 1) for n in state.nodes))
    text = out.render(slower, "v", 0.1, openmetrics=False).decode()
    assert built == []  # only the poll durations changed: written afresh, nothing rebuilt
    assert 'gpu_router_node_poll_duration_seconds{node="gpu-large"} 1.25' in text
    large = state.nodes[2]
    grown = replace(large, loaded=(*large.loaded, loaded("all-minilm:latest", 1, 1)))
    changed = replace(state, nodes=(*state.nodes[:2], grown, *state.nodes[3:]))
    text = out.render(changed, "v", 0.1, openmetrics=False).decode()
    assert built == ["gpu-large"]
    assert 'gpu_router_model_loaded_bytes{model="all-minilm:latest",node="gpu-large"} 1.0' in text
