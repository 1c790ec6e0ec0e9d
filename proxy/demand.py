"""Demand per model, for the optimizer's placement from demand (`GET /api/v1/demand` and the
`gpu_router_proxy_demand_*` gauges): over the last `window` seconds (`demand.window`), requests, prompt tokens
and generated tokens per second (per model, and requests per second per node) and the mean number of requests
in flight; over the last QUEUE_SPAN seconds, the mean number waiting in the proxy's queue. In one-second
buckets: memory bounded by models × window."""

from __future__ import annotations

from collections import defaultdict, deque

WINDOW = 600
QUEUE_SPAN = 30  # seconds the mean queue is taken over: "a queue that stays long", not a moment's burst


class Level:
    """A count that goes up and down (requests in flight, or waiting) and its mean over a recent span: the
    area under it, marked at the last change of every second (at most `keep` marks)."""

    def __init__(self, keep: float) -> None:
        self.keep = keep
        self.value = 0
        self._marks: deque[tuple[float, float, int]] = deque()  # (time, area until then, value from then on)

    def change(self, delta: int, now: float) -> None:
        area = self._area(now)
        self.value += delta
        if self._marks and int(self._marks[-1][0]) == int(now):
            self._marks.pop()  # one mark a second: the last change of the second
        self._marks.append((now, area, self.value))
        while len(self._marks) > 1 and self._marks[1][0] <= now - self.keep:
            self._marks.popleft()

    def _area(self, at: float) -> float:
        """The area under the count from its first mark until `at` (0 before it)."""
        for time, area, value in reversed(self._marks):
            if time <= at:
                return area + value * (at - time)
        return 0.0

    def mean(self, span: float, now: float) -> float:
        return max(0.0, self._area(now) - self._area(now - span)) / span

    def idle(self, now: float) -> bool:
        """Nothing in it now, and nothing for longer than it keeps."""
        return self.value == 0 and (not self._marks or self._marks[-1][0] <= now - self.keep)


class Demand:
    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._buckets: dict[str, dict[int, list[int]]] = defaultdict(dict)  # model → second → [n, prompt, gen]
        self._nodes: dict[str, dict[str, dict[int, int]]] = defaultdict(dict)  # model → node → second → n
        self._flying: dict[str, Level] = {}
        self._waiting: dict[str, Level] = {}

    def record(self, model: str, node: str, prompt: int, generated: int, now: float) -> None:
        """A request answered in full."""
        buckets = self._buckets[model]
        bucket = buckets.setdefault(int(now), [0, 0, 0])
        bucket[0] += 1
        bucket[1] += prompt
        bucket[2] += generated
        per_node = self._nodes[model].setdefault(node, {})
        per_node[int(now)] = per_node.get(int(now), 0) + 1
        if len(buckets) > self.window:
            self._prune(buckets, now)
        if len(per_node) > self.window:
            self._prune(per_node, now)

    def flying(self, model: str, delta: int, now: float) -> None:
        """A request for `model` came in (+1, until it ends: -1)."""
        self._flying.setdefault(model, Level(self.window)).change(delta, now)

    def waiting(self, model: str, delta: int, now: float) -> None:
        """A request for `model` waits in the proxy's queue (+1, until it has a slot: -1)."""
        self._waiting.setdefault(model, Level(QUEUE_SPAN)).change(delta, now)

    def _prune(self, buckets: dict[int, object], now: float) -> None:
        for second in [s for s in buckets if s <= now - self.window]:
            del buckets[second]

    @staticmethod
    def empty() -> dict[str, object]:
        """The row of a model with nothing counted yet."""
        return {
            "requests_per_second": 0.0,
            "prompt_tokens_per_second": 0.0,
            "generated_tokens_per_second": 0.0,
            "in_flight_mean": 0.0,
            "waiting_mean": 0.0,
            "nodes": {},
        }

    def rates(self, now: float) -> dict[str, dict[str, object]]:
        """model → requests, prompt_tokens and generated_tokens per second over the window, in_flight_mean over
        the window, waiting_mean over QUEUE_SPAN and per node requests per second."""
        answer: dict[str, dict[str, object]] = {}
        for model in sorted(set(self._buckets) | set(self._flying) | set(self._waiting)):
            buckets = self._buckets.get(model, {})
            self._prune(buckets, now)
            per_node = {}
            for node, counts in sorted(self._nodes.get(model, {}).items()):
                self._prune(counts, now)
                if counts:
                    per_node[node] = {"requests_per_second": sum(counts.values()) / self.window}
            sums = [sum(b[i] for b in buckets.values()) for i in range(3)]
            flying, waiting = self._flying.get(model), self._waiting.get(model)
            row = self.empty()
            row.update(
                requests_per_second=sums[0] / self.window,
                prompt_tokens_per_second=sums[1] / self.window,
                generated_tokens_per_second=sums[2] / self.window,
                in_flight_mean=flying.mean(self.window, now) if flying else 0.0,
                waiting_mean=waiting.mean(QUEUE_SPAN, now) if waiting else 0.0,
                nodes=per_node,
            )
            if not buckets and row["in_flight_mean"] == 0 and row["waiting_mean"] == 0:
                self._forget(model, now)
                continue
            answer[model] = row
        return answer

    def _forget(self, model: str, now: float) -> None:
        """A model with nothing in the window: its memory goes (unless a request of it is still in flight)."""
        self._buckets.pop(model, None)
        self._nodes.pop(model, None)
        for levels in (self._flying, self._waiting):
            level = levels.get(model)
            if level is not None and level.idle(now):
                del levels[model]
