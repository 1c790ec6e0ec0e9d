"""The picker: the weighted sum of the scores, best first; among equal sums the node with the most free VRAM,
then the name. A candidate whose runner options the proxy replaced comes after every one served as asked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gpurouter.cluster.config import RouteWeights
from gpurouter.decide.route.candidates import Candidate


def total(parts: Mapping[str, float], weights: RouteWeights) -> float:
    return sum(getattr(weights, name) * value for name, value in parts.items())


def order(found: Sequence[tuple[Candidate, float]]) -> list[tuple[Candidate, float]]:
    return sorted(found, key=lambda ct: (ct[0].adjusted, -round(ct[1], 9), -(ct[0].node.vram_free or 0), ct[0].name))
