"""Node speed: the decode tokens/s observed for this model on the node (from its answers' timings) against
the fastest candidate's; 0.5 for a node not observed yet (neither preferred nor avoided)."""

from __future__ import annotations

from collections.abc import Sequence

from gpurouter.decide.route.candidates import Candidate
from gpurouter.decide.route.traffic import Traffic

UNOBSERVED = 0.5


def scores(found: Sequence[Candidate], model: str, traffic: Traffic) -> list[float]:
    rates = [traffic.rates.get((c.name, model)) for c in found]
    decode = [r.decode if r is not None and r.decode else None for r in rates]
    best = max((d for d in decode if d), default=None)
    return [UNOBSERVED if d is None or best is None else d / best for d in decode]
