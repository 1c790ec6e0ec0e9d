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


def saturated(c: Candidate, ask: Ask, blocks: int, traffic: Traffic, max_queue_seconds: float) -> bool:
    prefill = latency.prefill_rate(c, ask.model, traffic)
    uncached = ask.prompt_tokens - latency.cached_tokens(blocks, ask)
    queued = traffic.prefill_queued.get(c.name, 0) + uncached
    return latency.wait(c, ask.model, traffic) * prefill + queued > prefill * max_queue_seconds


def score(c: Candidate, ask: Ask, blocks: int, traffic: Traffic, max_queue_seconds: float) -> float:
    """`blocks`: cached_blocks(c, ask, traffic)."""
    if not blocks or saturated(c, ask, blocks, traffic, max_queue_seconds):
        return 0.0
    return blocks / len(ask.blocks)
