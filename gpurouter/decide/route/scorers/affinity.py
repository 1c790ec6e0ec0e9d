"""Prompt-cache affinity, sticky until saturated: the share of the prompt's blocks the node's runner should
have cached (the proxy's PromptIndex), while the node's queued uncached prompt tokens, this request's
included, stay under τ = its observed prefill tokens/s × `proxy.max_queue_seconds`; past τ it scores 0 and
the request spreads. Where no prefill rate was observed yet, DEFAULT_PREFILL stands in."""

from __future__ import annotations

from gpurouter.decide.route.ask import BLOCK_CHARS, CHARS_PER_TOKEN, Ask
from gpurouter.decide.route.candidates import Candidate
from gpurouter.decide.route.traffic import Traffic

DEFAULT_PREFILL = 500.0  # tokens/s, until the node's answers tell


def cached_blocks(c: Candidate, ask: Ask, traffic: Traffic) -> int:
    if traffic.prompts is None or not ask.blocks or c.load:
        return 0
    return traffic.prompts.cached(c.name, ask.model, ask.blocks)


def cached_tokens(blocks: int, ask: Ask) -> int:
    """The prompt tokens the router expects the node to find in its cache, from its cached blocks."""
    return min(ask.prompt_tokens, blocks * BLOCK_CHARS // CHARS_PER_TOKEN)


def tau(c: Candidate, model: str, traffic: Traffic, max_queue_seconds: float) -> float:
    rates = traffic.rates.get((c.name, model))
    prefill = rates.prefill if rates is not None and rates.prefill else DEFAULT_PREFILL
    return prefill * max_queue_seconds


def score(c: Candidate, ask: Ask, blocks: int, traffic: Traffic, max_queue_seconds: float) -> float:
    """`blocks`: cached_blocks(c, ask, traffic)."""
    if not blocks:
        return 0.0
    uncached = ask.prompt_tokens - cached_tokens(blocks, ask)
    if traffic.prefill_queued.get(c.name, 0) + uncached > tau(c, ask.model, traffic, max_queue_seconds):
        return 0.0  # saturated: spread
    return blocks / len(ask.blocks)
