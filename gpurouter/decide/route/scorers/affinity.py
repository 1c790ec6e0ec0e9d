"""Prompt-cache affinity, sticky until saturated: the share of the prompt's blocks the node's runner should
have cached (the proxy's PromptIndex), while the node is not saturated: its wait for a slot (the latency
scorer's) plus its queued uncached prompt tokens, this request's included, read at its prefill rate, stay
under `proxy.max_queue_seconds` — in tokens, τ = prefill tokens/s × `max_queue_seconds`. Past it the score is
0 and the request spreads."""

from __future__ import annotations

from gpurouter.decide.route.ask import Ask
from gpurouter.decide.route.candidates import Candidate
from gpurouter.decide.route.scorers import latency
from gpurouter.decide.route.traffic import Traffic


def cached_blocks(c: Candidate, ask: Ask, traffic: Traffic) -> int:
    if traffic.prompts is None or not ask.blocks or c.load:
        return 0
    return traffic.prompts.cached(c.name, ask.model, ask.blocks)


def score(ask: Ask, blocks: int, there: latency.Estimate, queued: int, max_queue_seconds: float) -> float:
    """`blocks`: cached_blocks(c, ask, traffic); `there`: the latency scorer's estimate for the node; `queued`:
    the uncached prompt tokens the proxy has queued on the node."""
    if not blocks:
        return 0.0
    if there.wait * there.prefill + queued + there.uncached > there.prefill * max_queue_seconds:
        return 0.0  # saturated: spread
    return blocks / len(ask.blocks)
