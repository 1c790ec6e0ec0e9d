"""Protected models stay safe: a candidate whose load would evict a priority or busy model is dropped (never
a target, not even for a retry). `candidates` already turned such a load beside a resident runner into a
request for that runner (`adjusted`)."""

from __future__ import annotations

from gpurouter.decide.route.candidates import Candidate


def split(found: list[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
    """(kept, dropped)."""
    return [c for c in found if c.safe], [c for c in found if not c.safe]
