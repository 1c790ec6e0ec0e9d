"""Expected latency: each node's estimate of the request's time to first token, against the best candidate's.

The estimate is the wait for a slot (the proxy's requests ahead of this one on the runner, past its slots,
each taking the runner's observed service time, shared over its slots) + the prompt tokens not cached there ÷
the node's observed prefill tokens/s + the node's observed load time (LOAD_SECONDS until one is seen) when
the model must load there. The score is
(best + FLOOR) / (this + FLOOR): 1 for the quickest node, ½ for one about twice as slow. Until a node's
answers tell, the model's fastest prefill observed elsewhere (a tenth of it on CPU or partly on GPU) and
DEFAULT_SERVICE stand in. The
affinity scorer's saturation valve uses the same wait.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def prefill_rate(c: Candidate, model: str, traffic: Traffic) -> float:
    """Observed for the model there; else the fastest observed for it on any node (an unobserved node is
    tried, not shunned); else DEFAULT_PREFILL. Off GPU (CPU or partial), a tenth of a borrowed rate."""
    rates = traffic.rates.get((c.name, model))
    if rates is not None and rates.prefill:
        return rates.prefill
    seen = [r.prefill for (_, m), r in traffic.rates.items() if m == model and r.prefill]
    rate = max(seen, default=DEFAULT_PREFILL)
    return rate / 10 if c.placement in ("partial", "cpu") else rate


def wait(c: Candidate, model: str, traffic: Traffic) -> float:
    """Seconds until a slot of the runner is free for one more request."""
    ahead = traffic.flights(c.name, model) - c.slots + 1
    if ahead <= 0:
        return 0.0
    rates = traffic.rates.get((c.name, model))
    service = rates.service if rates is not None and rates.service else DEFAULT_SERVICE
    return ahead * service / c.slots


def seconds(c: Candidate, ask: Ask, blocks: int, traffic: Traffic) -> float:
    """The expected time to first token there; `blocks`: the prompt blocks cached there."""
    uncached = ask.prompt_tokens - cached_tokens(blocks, ask)
    load = traffic.load_seconds.get(c.name, LOAD_SECONDS) if c.load else 0.0
    return wait(c, ask.model, traffic) + uncached / prefill_rate(c, ask.model, traffic) + load


def scores(found: Sequence[Candidate], ask: Ask, blocks: Sequence[int], traffic: Traffic) -> list[float]:
    """`blocks`: per candidate, the prompt blocks cached there."""
    times = [seconds(c, ask, b, traffic) for c, b in zip(found, blocks, strict=True)]
    best = min(times, default=0.0)
    return [(best + FLOOR) / (t + FLOOR) for t in times]
