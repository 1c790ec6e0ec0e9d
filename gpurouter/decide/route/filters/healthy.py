"""Not failing: a (node, model) that failed since the last poll (or a node that refused the connection) is
set aside; it stays at the end of the list, tried only when every healthy candidate has failed too."""

from __future__ import annotations

from gpurouter.decide.route.candidates import Candidate
from gpurouter.decide.route.traffic import Traffic


def split(found: list[Candidate], model: str, traffic: Traffic) -> tuple[list[Candidate], list[Candidate]]:
    """(healthy, failing)."""
    failing = [c for c in found if traffic.is_failing(c.name, model)]
    return [c for c in found if c not in failing], failing
