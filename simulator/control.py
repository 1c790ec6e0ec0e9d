"""The fleet's control server: list nodes, inject and clear faults, read a node's state, GPU metrics.

Routes: GET /nodes, POST|DELETE /nodes/{name}/fault, GET /nodes/{name}/state, GET /metrics (Prometheus
text in the shape of NVIDIA's dcgm-exporter). Every answer other than /metrics is JSON.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from urllib.parse import unquote

from gpurouter.units import MIB
from simulator.httpserver import Request, Response, error_response, json_response
from simulator.node import SimNode

_METRICS = (
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "free"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "used"),
    ("DCGM_FI_DEV_FB_RESERVED", "Framebuffer memory reserved (in MiB).", "reserved"),
)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def gpu_uuid(node: str, index: int) -> str:
    """A stable UUID for a simulated GPU, in nvidia-smi's form."""
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, f'gpu-router-simulator/{node}/{index}')}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def dcgm_metrics(nodes: Mapping[str, SimNode]) -> str:
    """FB_FREE / FB_USED / FB_RESERVED (MiB) per node and GPU; a down node's GPUs too, lost GPUs not."""
    rows = []
    for node in nodes.values():
        for gpu in node.scheduler.gpu_usage():
            labels = (
                f'gpu="{gpu.index}",UUID="{gpu_uuid(node.name, gpu.index)}",'
                f'pci_bus_id="00000000:{gpu.index + 1:02X}:00.0",device="nvidia{gpu.index}",'
                f'modelName="{_label(gpu.name)}",Hostname="{_label(node.name)}"'
            )
            used = round(gpu.used / MIB)
            rows.append((labels, {"free": gpu.total // MIB - used, "used": used, "reserved": 0}))
    lines = []
    for name, help_text, key in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f"{name}{{{labels}}} {max(0, values[key])}" for labels, values in rows]
    return "\n".join(lines) + "\n"


class ControlApi:
    """Request → Response over the fleet's nodes."""

    def __init__(self, nodes: Mapping[str, SimNode]) -> None:
        self._nodes = nodes

    def __call__(self, request: Request) -> Response:
        parts = [unquote(p) for p in request.path.split("/") if p]
        if parts == ["nodes"]:
            return self._only(request, "GET") or json_response(
                200, [{"name": n.name, "url": n.url, "faults": n.faults()} for n in self._nodes.values()]
            )
        if parts == ["metrics"]:
            refused = self._only(request, "GET")
            return refused or Response(200, dcgm_metrics(self._nodes).encode(), PROMETHEUS_TEXT)
        if len(parts) == 3 and parts[0] == "nodes" and parts[2] in ("fault", "state"):
            node = self._nodes.get(parts[1])
            if node is None:
                return error_response(404, f"unknown node {parts[1]!r}; nodes: {', '.join(self._nodes)}")
            if parts[2] == "state":
                return self._only(request, "GET") or json_response(200, node.state())
            if request.method == "POST":
                return self._inject(node, request)
            if request.method == "DELETE":
                return self._clear(node, request)
            return error_response(405, f"method {request.method} not allowed on {request.path}; use POST or DELETE")
        return error_response(404, f"no route {request.path}; try GET /nodes")

    @staticmethod
    def _only(request: Request, method: str) -> Response | None:
        if request.method in (method, "HEAD" if method == "GET" else method):
            return None
        return error_response(405, f"method {request.method} not allowed on {request.path}; use {method}")

    @staticmethod
    def _inject(node: SimNode, request: Request) -> Response:
        try:
            body = json.loads(request.body or b"null")
        except ValueError as exc:
            return error_response(400, f"invalid JSON body: {exc}")
        if not isinstance(body, dict) or "fault" not in body:
            return error_response(400, 'expected a JSON object like {"fault": "down"}')
        params = {k: v for k, v in body.items() if k != "fault"}
        try:
            faults = node.inject(body["fault"], **params)
        except ValueError as exc:
            return error_response(400, str(exc))
        except OSError as exc:
            return error_response(500, f"fault {body['fault']!r} failed: {exc}")
        return json_response(200, {"name": node.name, "faults": faults})

    @staticmethod
    def _clear(node: SimNode, request: Request) -> Response:
        names = request.query.get("fault")
        try:
            faults = node.clear(names[-1] if names else None)
        except ValueError as exc:
            return error_response(400, str(exc))
        except OSError as exc:
            return error_response(500, f"cannot listen again on {node.url}: {exc}")
        return json_response(200, {"name": node.name, "faults": faults})
