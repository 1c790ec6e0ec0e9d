"""Queue: the proxy's own requests in flight (or waiting in it) for this runner against its slots (the
runner's effective parallelism). A free slot scores 1; past the slots, slots / (in flight + 1)."""

from __future__ import annotations

from gpurouter.decide.route.candidates import Candidate
from gpurouter.decide.route.traffic import Traffic


def score(c: Candidate, model: str, traffic: Traffic) -> float:
    flights = traffic.flights(c.name, model)
    return 1.0 if flights < c.slots else c.slots / (flights + 1)
