"""Expected latency: each node's estimate of the request's time to first token, against the best candidate's.

The estimate is the wait for a slot (the proxy's requests ahead of this one on the runner, past its slots,
each taking the runner's observed service time, shared over its slots) + the prompt tokens not cached there ÷
the node's observed prefill tokens/s + the node's observed load time (LOAD_SECONDS until one is seen) when
the model must load there. The score is (best + FLOOR) / (this + FLOOR): 1 for the quickest node, ½ for one
about twice as slow. Until a node's answers tell, the model's fastest prefill observed elsewhere (a tenth of
it on CPU or partly on GPU) and DEFAULT_SERVICE stand in. The affinity scorer's saturation valve uses the
same estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from gpurouter.decide.route.ask import BLOCK_CHARS, CHARS_PER_TOKEN, Ask
from gpurouter.decide.route.candidates import Candidate
from gpurouter.decide.route.traffic import Traffic

DEFAULT_PREFILL = 500.0  # prompt tokens/s of a runner fully on GPU, until its answers tell
DEFAULT_SERVICE = 1.0  # seconds a request holds a slot, until the runner's answers tell
LOAD_SECONDS = 5.0  # a model load before the first token, until the node's cold answers' load_duration tell
FLOOR = 0.05  # seconds: differences far below this do not count


def cached_tokens(blocks: int, ask: Ask) -> int:
    """The prompt tokens the router expects the node to find in its cache, from its cached blocks."""
    return min(ask.prompt_tokens, blocks * BLOCK_CHARS // CHARS_PER_TOKEN)


class Estimate(NamedTuple):
    """One node's expected time to first token, in its parts."""

    wait: float  # seconds until a slot of the runner is free for one more request
    prefill: float  # prompt tokens/s
    uncached: int  # prompt tokens to read
    load: float  # seconds of a model load

    @property
    def seconds(self) -> float:
        return self.wait + self.uncached / self.prefill + self.load


def estimates(found: Sequence[Candidate], ask: Ask, blocks: Sequence[int], traffic: Traffic) -> list[Estimate]:
    """`blocks`: per candidate, the prompt blocks cached there. The prefill rate is the one observed for the
    model there; else the fastest observed for it on any node (an unobserved node is tried, not shunned); else
    DEFAULT_PREFILL; off GPU (CPU or partial) a tenth of a borrowed rate."""
    borrowed = max(
        (r.prefill for (_, m), r in traffic.rates.items() if m == ask.model and r.prefill), default=DEFAULT_PREFILL
    )
    out = []
    for c, cached in zip(found, blocks, strict=True):
        rates = traffic.rates.get((c.name, ask.model))
        if rates is not None and rates.prefill:
            prefill = rates.prefill
        else:
            prefill = borrowed / 10 if c.placement in ("partial", "cpu") else borrowed
        wait = 0.0
        ahead = traffic.flights(c.name, ask.model) - c.slots + 1
        if ahead > 0:
            wait = ahead * (rates.service if rates is not None and rates.service else DEFAULT_SERVICE) / c.slots
        load = traffic.load_seconds.get(c.name, LOAD_SECONDS) if c.load else 0.0
        out.append(Estimate(wait, prefill, ask.prompt_tokens - cached_tokens(cached, ask), load))
    return out


def scores(found: Sequence[Estimate]) -> list[float]:
    times = [e.seconds for e in found]
    best = min(times, default=0.0)
    return [(best + FLOOR) / (t + FLOOR) for t in times]
