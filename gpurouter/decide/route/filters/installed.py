"""Installed and up: a node that answered its last poll, is not in maintenance, and has the model installed or
loaded. No other node is ever a target."""

from __future__ import annotations

from gpurouter.cluster.state import ClusterState


def kept(state: ClusterState, model: str) -> list[str]:
    return [
        n.name
        for n in state.nodes
        if n.up and not n.config.maintenance and (n.installed_model(model) or n.loaded_model(model))
    ]
