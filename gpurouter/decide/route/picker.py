"""The picker: the weighted sum of the scores, best first; among equal sums the node with the most free VRAM,
then the name. A candidate whose runner options the proxy would replace (the request's load would evict a
protected model there) comes after every one that serves the request as asked fully on GPU, and before any
that would serve it as asked only partly on GPU or on CPU: a request never gets its own options at the cost
of the GPU, nor another runner's options where a GPU can take its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gpurouter.cluster.config import RouteWeights
from gpurouter.decide.route.candidates import Candidate


def total(parts: Mapping[str, float], weights: RouteWeights) -> float:
    return sum(getattr(weights, name) * value for name, value in parts.items())


def order(found: Sequence[tuple[Candidate, float]]) -> list[tuple[Candidate, float]]:
    replacing = any(c.adjusted for c, _ in found)

    def rank(c: Candidate) -> int:
        if c.adjusted:
            return 1
        return 2 if replacing and c.placement in ("partial", "cpu") else 0

    return sorted(found, key=lambda ct: (rank(ct[0]), -round(ct[1], 9), -ct[0].free, ct[0].name))
