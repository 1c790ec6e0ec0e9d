"""A scrape's text: the Prometheus text format or OpenMetrics, byte for byte what prometheus_client writes for
`exporter.collector.cluster_families`, with each node's lines reused while what they show is unchanged.

A node's lines are rebuilt only when its state (poll duration aside: that one line is written every scrape),
the models that get fit series, or what those models need on it changed; in a steady fleet a scrape formats
the nodes that changed and joins the rest. Only the nodes of the last scrape are kept.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from prometheus_client.utils import floatToGoString

from exporter.collector import METRICS, Sample, cluster_models, cluster_samples, node_samples
from gpurouter.cluster.config import model_key
from gpurouter.cluster.state import ClusterState, NodeState

POLL_DURATION = "gpu_router_node_poll_duration_seconds"
_NODE_FIELDS = tuple(f.name for f in fields(NodeState) if f.name != "poll_seconds")  # what a node's lines show
_ORDER = {name: sorted(range(len(labels)), key=labels.__getitem__) for name, (labels, _) in METRICS.items()}  # by name


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def sample_line(name: str, labels: tuple[str, ...], value: float) -> str:
    """One sample as both formats write a gauge's: labels in name order, values escaped, Go's float text."""
    names = METRICS[name][0]
    if not labels:
        return f"{name} {floatToGoString(value)}\n"
    pairs = ",".join(f'{names[i]}="{_escape(labels[i])}"' for i in _ORDER[name])
    return f"{name}{{{pairs}}} {floatToGoString(value)}\n"


def _headers(openmetrics: bool) -> dict[str, bytes]:
    def help_text(text: str) -> str:
        text = text.replace("\\", r"\\").replace("\n", r"\n")
        return text.replace('"', r"\"") if openmetrics else text

    return {
        name: f"# HELP {name} {help_text(text)}\n# TYPE {name} gauge\n".encode() for name, (_, text) in METRICS.items()
    }


HEADERS = {False: _headers(False), True: _headers(True)}


def _lines(samples: list[Sample]) -> dict[str, bytes]:
    """The samples' lines, joined per metric."""
    by_name: dict[str, list[str]] = {}
    for name, labels, value in samples:
        by_name.setdefault(name, []).append(sample_line(name, labels, value))
    return {name: "".join(lines).encode() for name, lines in by_name.items()}


class Exposition:
    """Renders scrapes; remembers each node's lines and what they were built from."""

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[Any, dict[str, bytes]]] = {}  # node → (what the lines show, lines by metric)

    def render(self, state: ClusterState, version: str, collect_seconds: float, *, openmetrics: bool) -> bytes:
        return b"".join(self.chunks(state, version, collect_seconds, openmetrics=openmetrics))

    def chunks(self, state: ClusterState, version: str, collect_seconds: float, *, openmetrics: bool) -> list[bytes]:
        """The text in pieces, one per metric (joined from the nodes' kept lines): joined, or compressed one
        after the other."""
        models = cluster_models(state)
        nodes: dict[str, tuple[Any, dict[str, bytes]]] = {}
        for node in state.nodes:
            basis = self._basis(node, state, models)
            known = self._nodes.get(node.name)
            if known is not None and known[0] == basis:
                nodes[node.name] = known
            else:
                samples = [s for s in node_samples(node, state, models) if s[0] != POLL_DURATION]
                nodes[node.name] = (basis, _lines(samples))
        self._nodes = nodes
        durations = "".join(sample_line(POLL_DURATION, (n.name,), n.poll_seconds) for n in state.nodes).encode()
        rest = _lines(cluster_samples(state, version, collect_seconds))
        headers = HEADERS[openmetrics]
        out = []
        for name in METRICS:
            if name == POLL_DURATION:
                out.append(headers[name] + durations)
            else:
                each = [lines[name] for _, lines in nodes.values() if name in lines]
                out.append(b"".join([headers[name], *each, rest.get(name, b"")]))
        if openmetrics:
            out.append(b"# EOF\n")
        return out

    @staticmethod
    def _basis(node: NodeState, state: ClusterState, models: frozenset[str]) -> tuple[Any, ...]:
        """Everything a node's lines are built from, poll duration aside."""
        names = sorted(models | {model_key(m.name) for m in node.loaded})
        shown = tuple(getattr(node, name) for name in _NODE_FIELDS)
        return shown, models, tuple(state.need(m, node.name) for m in names)
