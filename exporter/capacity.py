"""GPU capacity of each node, from the source its configuration names; unknown is never guessed."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from exporter.config import Config, NodeConfig
from exporter.state import Capacity, GpuInfo


def static_capacity(node: NodeConfig) -> Capacity | None:
    """The GPUs the configuration states (vram: 0 means a CPU node), or None when it states none."""
    gpus = node.static_gpus
    if gpus is None:
        return None
    if not gpus:
        return Capacity(source="none", reason="configured without GPU (vram: 0)")
    return Capacity(
        source="static",
        gpus=tuple(GpuInfo(index=i, name=g.name, total=g.vram) for i, g in enumerate(gpus)),
        reason="from the configuration",
    )


def is_local(url: str) -> bool:
    """True when the node's URL points at this machine."""
    host = (urlsplit(url).hostname or "").lower()
    return host in {"localhost", "127.0.0.1", "::1", socket.gethostname().lower()}


class CapacityReader:
    """Reads the capacity of every node once per poll."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def read(self, nodes: Sequence[NodeConfig], timeout: float) -> dict[str, Capacity]:
        return {node.name: self.read_node(node) for node in nodes}

    def read_node(self, node: NodeConfig) -> Capacity:
        source = node.gpu_source
        if source == "none":
            return Capacity(source="none", reason="gpu_source: none")
        if source in ("static", "auto"):
            static = static_capacity(node)
            if static is not None:
                return static
        return Capacity(
            source="unknown",
            reason=f"no GPU capacity for {node.name}: set vram (or gpus) on the node, or gpu_source",
        )
