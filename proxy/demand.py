"""Demand per model, for the optimizer (`GET /api/v1/demand` and the `gpu_router_proxy_demand_*` gauges):
requests, prompt tokens and generated tokens per second over the last WINDOW seconds, in one-second buckets
(memory bounded by models × WINDOW)."""

from __future__ import annotations

from collections import defaultdict

WINDOW = 300


class Demand:
    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._buckets: dict[str, dict[int, list[int]]] = defaultdict(dict)  # model → second → [n, prompt, gen]

    def record(self, model: str, prompt: int, generated: int, now: float) -> None:
        buckets = self._buckets[model]
        bucket = buckets.setdefault(int(now), [0, 0, 0])
        bucket[0] += 1
        bucket[1] += prompt
        bucket[2] += generated
        if len(buckets) > self.window:
            self._prune(buckets, now)

    def _prune(self, buckets: dict[int, list[int]], now: float) -> None:
        for second in [s for s in buckets if s <= now - self.window]:
            del buckets[second]

    def rates(self, now: float) -> dict[str, dict[str, float]]:
        """model → requests, prompt_tokens and generated_tokens per second over the window."""
        answer = {}
        for model, buckets in list(self._buckets.items()):
            self._prune(buckets, now)
            if not buckets:
                del self._buckets[model]
                continue
            sums = [sum(b[i] for b in buckets.values()) for i in range(3)]
            answer[model] = {
                "requests_per_second": sums[0] / self.window,
                "prompt_tokens_per_second": sums[1] / self.window,
                "generated_tokens_per_second": sums[2] / self.window,
            }
        return answer
