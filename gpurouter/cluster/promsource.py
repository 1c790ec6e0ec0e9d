"""`gpu_source: prometheus`: a remote node's GPU memory from GPU metrics a Prometheus already collects.

Built-in templates read NVIDIA's dcgm-exporter, utkuozdemir/nvidia_gpu_exporter, or this project's own
exporter running on the node; `custom` takes two PromQL queries. `{match}` in a query is replaced by the node's
label matcher (`prometheus_match`, else the template's default). A missing or stale answer makes the capacity
unknown, with the reason; nothing is guessed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from gpurouter.cluster.config import NodeConfig, PrometheusSource
from gpurouter.cluster.ollama import transport_error
from gpurouter.cluster.state import Capacity, GpuInfo, read_each
from gpurouter.urls import redact

MIB = 1024 * 1024


@dataclass(frozen=True)
class Template:
    """PromQL for one GPU exporter: bytes per GPU, and a plain selector whose sample age tells staleness."""

    total: str
    used: str
    fresh: str
    default_match: str  # {name} = the configured node name, {host} = the host of its URL


TEMPLATES: Mapping[str, Template] = {
    # dcgm-exporter reports framebuffer memory in MiB; FB_RESERVED is absent in older releases.
    "dcgm": Template(
        total=(
            "(DCGM_FI_DEV_FB_FREE{{{match}}} + DCGM_FI_DEV_FB_USED{{{match}}}"
            " + (DCGM_FI_DEV_FB_RESERVED{{{match}}} or DCGM_FI_DEV_FB_FREE{{{match}}} * 0)) * 1048576"
        ),
        used="DCGM_FI_DEV_FB_USED{{{match}}} * 1048576",
        fresh="DCGM_FI_DEV_FB_USED{{{match}}}",
        default_match='Hostname="{name}"',
    ),
    "nvidia_gpu_exporter": Template(
        total="nvidia_smi_memory_total_bytes{{{match}}}",
        used="nvidia_smi_memory_used_bytes{{{match}}}",
        fresh="nvidia_smi_memory_used_bytes{{{match}}}",
        default_match='instance=~"{host}(:[0-9]+)?"',
    ),
    "gpu_router": Template(
        total="gpu_router_gpu_memory_total_bytes{{{match}}}",
        used="gpu_router_gpu_memory_used_bytes{{{match}}}",
        fresh="gpu_router_gpu_memory_total_bytes{{{match}}}",
        default_match='node="{name}"',
    ),
}

_INDEX_LABELS = ("gpu", "minor_number", "index")
_NAME_LABELS = ("modelName", "name", "gpu_name")
Query = Callable[[str, float], list[dict[str, Any]]]


def queries_for(source: PrometheusSource, node: NodeConfig) -> tuple[str, str, str | None]:
    """(total, used, fresh) PromQL for one node; fresh is None for custom queries (age not checked)."""
    if source.template == "custom":
        match = node.prometheus_match or f'node="{node.name}"'
        return (
            str(source.total_query).replace("{match}", match),
            str(source.used_query).replace("{match}", match),
            None,
        )
    template = TEMPLATES[source.template]
    host = urlsplit(node.url).hostname or node.name
    match = node.prometheus_match or template.default_match.format(name=node.name, host=host.replace(".", "\\\\."))
    return (
        template.total.format(match=match),
        template.used.format(match=match),
        f"time() - timestamp({template.fresh.format(match=match)})",
    )


def http_query(url: str, session: requests.Session | None = None) -> Query:
    """A function that runs an instant query against the Prometheus at `url` and returns its vector."""
    http = session or requests.Session()

    def query(expr: str, timeout: float) -> list[dict[str, Any]]:
        response = http.get(
            f"{url.rstrip('/')}/api/v1/query", params={"query": expr}, timeout=timeout, allow_redirects=False
        )
        if response.is_redirect:  # only the configured URL is contacted
            raise ValueError(f"HTTP {response.status_code}: a redirect (not followed)")
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise ValueError(body.get("error") or f"HTTP {response.status_code}")
        data = body.get("data") or {}
        if data.get("resultType") != "vector":
            raise ValueError(f"expected a vector, got {data.get('resultType')}")
        return list(data.get("result") or [])

    return query


def _series(result: list[dict[str, Any]]) -> dict[tuple[tuple[str, str], ...], tuple[dict[str, str], float]]:
    series = {}
    for item in result:
        labels = {k: v for k, v in (item.get("metric") or {}).items() if k != "__name__"}
        value = float(item["value"][1])
        if math.isfinite(value):
            series[tuple(sorted(labels.items()))] = (labels, value)
    return series


def capacity_from(
    total: list[dict[str, Any]],
    used: list[dict[str, Any]],
    ages: list[dict[str, Any]] | None,
    max_age: float,
    where: str,
) -> Capacity:
    """Turn the three query answers into a Capacity (pure; `where` names the node and template for reasons)."""
    totals = _series(total)
    if not totals:
        return Capacity(source="unknown", reason=f"Prometheus has no GPU memory series for {where}")
    if ages is not None:
        oldest = max((v for _, v in _series(ages).values()), default=math.inf)
        if oldest > max_age:
            age = "no sample" if math.isinf(oldest) else f"last sample {oldest:.0f}s old"
            return Capacity(source="unknown", reason=f"GPU memory series for {where} are stale ({age} > {max_age:g}s)")
    useds = _series(used)
    gpus = []
    for position, (key, (labels, value)) in enumerate(sorted(totals.items())):
        index_label = next((labels[k] for k in _INDEX_LABELS if labels.get(k, "").isdigit()), None)
        index = int(index_label) if index_label is not None else position
        name = next((labels[k] for k in _NAME_LABELS if labels.get(k)), f"GPU {index}")
        used_value = useds.get(key, (None, None))[1]
        gpus.append(
            GpuInfo(index=index, name=name, total=int(value), used=None if used_value is None else int(used_value))
        )
    gpus.sort(key=lambda g: g.index)
    return Capacity(source="prometheus", gpus=tuple(gpus), reason=f"from Prometheus ({where})")


class PrometheusCapacity:
    """Reads the capacity of the `gpu_source: prometheus` nodes, one pair of queries per node, concurrently."""

    def __init__(self, source: PrometheusSource, query: Query | None = None) -> None:
        self.source = source
        self.query = query or http_query(str(source.url))

    def read(self, nodes: Sequence[NodeConfig], timeout: float) -> dict[str, Capacity]:
        return read_each(nodes, lambda n: self.read_node(n, timeout))

    def read_node(self, node: NodeConfig, timeout: float) -> Capacity:
        total_q, used_q, fresh_q = queries_for(self.source, node)
        where = f"node {node.name}, template {self.source.template}"
        started = time.monotonic()
        try:
            total = self.query(total_q, timeout)
            used = self.query(used_q, max(0.1, timeout - (time.monotonic() - started)))
            ages = self.query(fresh_q, max(0.1, timeout - (time.monotonic() - started))) if fresh_q else None
        except (requests.RequestException, ValueError, KeyError, TypeError, IndexError) as exc:
            words = (
                transport_error(exc, timeout)[1]
                if isinstance(exc, (requests.ConnectionError, requests.Timeout))
                else None
            )
            words = words or f"{type(exc).__name__}: {exc}"
            reason = redact(f"Prometheus at {self.source.url} could not be read for {where}: {words}")
            return Capacity(source="unknown", reason=reason[:300])
        return capacity_from(total, used, ages, self.source.max_age, where)
