"""The proxy's own metrics (`gpu_router_proxy_*`), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ERROR_KINDS = ("refused", "timeout", "reset", "redirect", "server_error", "garbage", "mid_stream")


class ProxyMetrics:
    """Requests by node, model, placement and status; in flight per node; durations by model; node errors."""

    def __init__(self, nodes: list[str]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "gpu_router_proxy_requests",
            "Requests answered, by the node that served them, model, placement (gpu, cold, partial, cpu, none) "
            "and HTTP status",
            ["node", "model", "placement", "code"],
            registry=r,
        )
        self.in_flight = Gauge("gpu_router_proxy_in_flight", "Requests in flight to each node", ["node"], registry=r)
        self.duration = Histogram(
            "gpu_router_proxy_request_duration_seconds",
            "Request received until the answer's last byte was sent",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_byte = Histogram(
            "gpu_router_proxy_time_to_first_byte_seconds",
            "Request received until the answer's first byte was sent",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gpu_router_proxy_upstream_errors",
            "Node failures seen by the proxy (refused, timeout, reset, redirect, server_error, garbage, mid_stream)",
            ["node", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "gpu_router_proxy_retries",
            "Requests sent to another node after one failed before the first byte",
            registry=r,
        )
        for node in nodes:  # every known series from the start: increase() and rate() answer 0, not nothing
            self.in_flight.labels(node=node)
            for kind in ERROR_KINDS:
                self.upstream_errors.labels(node=node, kind=kind)
