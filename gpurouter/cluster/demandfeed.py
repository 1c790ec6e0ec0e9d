"""Demand as the proxy counts it, read by the optimizer for placement from demand: `GET /api/v1/demand` of the
proxy at `demand.proxy_url` (with the proxy's bearer token when it demands one). A reading that fails — no
proxy runs, it is down, slow or answers garbage — leaves the optimizer with the priority list only (the
placement without demand), and says why once."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

from gpurouter import logfmt
from gpurouter.cluster.config import Config, model_key
from gpurouter.urls import redact

log = logging.getLogger("gpu_router.optimizer")


@dataclass(frozen=True)
class ModelDemand:
    """One model's demand as the proxy counts it."""

    model: str
    requests_per_second: float = 0.0
    tokens_per_second: float = 0.0  # prompt + generated
    in_flight_mean: float = 0.0  # over the window
    waiting_mean: float = 0.0  # in the proxy's queue, over its last 30 s
    in_flight: Mapping[str, int] = field(default_factory=dict)  # node → requests in flight now

    @property
    def per_minute(self) -> float:
        return self.requests_per_second * 60


@dataclass(frozen=True)
class Reading:
    """One read of the proxy's demand: `models` keyed by model_key, or None and the `error` that says why."""

    models: Mapping[str, ModelDemand] | None
    at: float  # Unix time of the read
    error: str | None = None
    window: float = 0.0  # the proxy's window, seconds


NOT_READ = Reading(None, 0.0, "not read yet")


def _rate(row: Mapping[str, Any], key: str, where: str) -> float:
    value = row.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}.{key}: expected a number ≥ 0, got {value!r}"[:200])
    return float(value)


def parse_demand(data: Any) -> tuple[dict[str, ModelDemand], float]:
    """The proxy's answer as ModelDemand per model_key, and its window; ValueError names what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ValueError("expected a JSON object with a models mapping")
    window = _rate(data, "window_seconds", "demand")
    found = {}
    for name, row in data["models"].items():
        where = f"models[{name!r}]"[:80]
        if not isinstance(name, str) or not isinstance(row, dict):
            raise ValueError(f"{where}: expected a model name and a mapping")
        flights = row.get("in_flight", {})
        if not isinstance(flights, dict) or not all(
            isinstance(n, str) and isinstance(c, int) and not isinstance(c, bool) for n, c in flights.items()
        ):
            raise ValueError(f"{where}.in_flight: expected node → count")
        key = model_key(name)
        found[key] = ModelDemand(
            model=key,
            requests_per_second=_rate(row, "requests_per_second", where),
            tokens_per_second=_rate(row, "prompt_tokens_per_second", where)
            + _rate(row, "generated_tokens_per_second", where),
            in_flight_mean=_rate(row, "in_flight_mean", where),
            waiting_mean=_rate(row, "waiting_mean", where),
            in_flight=dict(flights),
        )
    return found, window


class DemandFeed:
    """`read(now)` asks the proxy; `last` is the latest reading. Never raises."""

    def __init__(self, config: Config) -> None:
        self.settings = config.demand
        self.timeout = config.request_timeout
        token = config.proxy.auth.bearer_token
        self._headers = {"Authorization": f"Bearer {token.resolve()}"} if token is not None else {}
        self._session = requests.Session()
        self._session.trust_env = False
        self.last = NOT_READ

    @property
    def active(self) -> bool:
        """Placement from demand is on and there is a proxy to read."""
        return self.settings.placement and self.settings.proxy_url is not None

    def read(self, now: float) -> Reading:
        if not self.active:
            return NOT_READ
        url = f"{self.settings.proxy_url}/api/v1/demand"
        try:
            reply = self._session.get(url, headers=self._headers, timeout=self.timeout, allow_redirects=False)
            if reply.status_code != 200:
                raise ValueError(f"HTTP {reply.status_code}: {reply.text[:200]!r}")
            models, window = parse_demand(reply.json())
            reading = Reading(models, now, window=window)
        except (requests.RequestException, ValueError) as exc:  # JSONDecodeError is a ValueError
            reading = Reading(None, now, redact(f"{url}: {type(exc).__name__}: {exc}")[:300])
        if (reading.error is None) != (self.last.error is None) or self.last is NOT_READ:
            level = logging.WARNING if reading.error else logging.INFO
            outcome = "failure" if reading.error else "ok"
            reason = f"{reading.error}; placing the priority models only" if reading.error else None
            count = len(reading.models or ())
            logfmt.log_event(log, level, "demand.read", outcome=outcome, models=count, reason=reason)
        self.last = reading
        return reading

    def close(self) -> None:
        self._session.close()
