"""The proxy's own metrics (`gpu_router_proxy_*`), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ERROR_KINDS = ("refused", "timeout", "reset", "redirect", "server_error", "garbage", "mid_stream", "error_line")
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ProxyMetrics:
    """Requests by node, model, placement and status; in flight per node; durations by model; node errors;
    the queue; prompt-cache predictions against what the answers show; demand per model."""

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
            "Node failures seen by the proxy (refused, timeout, reset, redirect, server_error, garbage, mid_stream, "
            "error_line: a stream that ended with the node's error line)",
            ["node", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "gpu_router_proxy_retries",
            "Requests sent to another node after one failed before the first byte",
            registry=r,
        )
        self.queue_depth = Gauge(
            "gpu_router_proxy_queue_depth",
            "Requests waiting in the proxy for a slot of the runner (past its effective parallelism)",
            ["node", "model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "gpu_router_proxy_queue_wait_seconds",
            "Time a request waited in the proxy for a slot of the runner",
            ["node", "model"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.queue_rejected = Counter(
            "gpu_router_proxy_queue_rejected",
            "Requests answered 503 server busy: proxy.max_queue requests were already waiting for the runner",
            ["node", "model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gpu_router_proxy_prompt_tokens",
            "Prompt tokens of the answers (prompt_eval_count: cached and new)",
            ["node", "model"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "gpu_router_proxy_generated_tokens", "Tokens generated (eval_count)", ["node", "model"], registry=r
        )
        self.cached_predicted = Counter(
            "gpu_router_proxy_cached_prompt_tokens_predicted",
            "Prompt tokens the router expected the chosen node to find in its prompt cache",
            ["node", "model"],
            registry=r,
        )
        self.cached_realised = Counter(
            "gpu_router_proxy_cached_prompt_tokens_realised",
            "Prompt tokens the node took from its cache, inferred: prompt_eval_count less what "
            "prompt_eval_duration processed at the node's observed prefill rate",
            ["node", "model"],
            registry=r,
        )
        self.options_kept = Counter(
            "gpu_router_proxy_runner_options_replaced",
            "Requests whose runner options (num_ctx, num_gpu, ...) were replaced by the resident runner's because "
            "loading as asked would evict a priority or busy model",
            ["node", "model"],
            registry=r,
        )
        self.demand_requests = Gauge(
            "gpu_router_proxy_demand_requests_per_second",
            "Requests per second for the model over the last demand.window (what the optimizer reads)",
            ["model"],
            registry=r,
        )
        self.demand_tokens = Gauge(
            "gpu_router_proxy_demand_tokens_per_second",
            "Prompt and generated tokens per second for the model over the last demand.window",
            ["model", "kind"],
            registry=r,
        )
        self._demand_models: set[str] = set()
        for node in nodes:  # every known series from the start: increase() and rate() answer 0, not nothing
            self.in_flight.labels(node=node)
            for kind in ERROR_KINDS:
                self.upstream_errors.labels(node=node, kind=kind)

    def show_demand(self, rates: dict[str, dict[str, object]]) -> None:
        """Set the demand gauges from `Demand.rates`; a model no longer counted loses its series."""
        for model in self._demand_models - set(rates):
            self.demand_requests.remove(model)
            for kind in ("prompt", "generated"):
                self.demand_tokens.remove(model, kind)
        for model, row in rates.items():
            self.demand_requests.labels(model=model).set(float(row["requests_per_second"]))  # type: ignore[arg-type]
            for kind in ("prompt", "generated"):
                value = float(row[f"{kind}_tokens_per_second"])  # type: ignore[arg-type]
                self.demand_tokens.labels(model=model, kind=kind).set(value)
        self._demand_models = set(rates)
