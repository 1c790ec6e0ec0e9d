"""What the proxy knows that the last poll does not: requests in flight, loads it caused, failures, the prefill
it has queued, the speeds it observed and the prompts it sent. A read-only view handed to the pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpurouter.decide.route.prefix import PromptIndex

WHOLE_NODE = ""  # the model of a failure that concerns the node itself (it refused the connection)


@dataclass(frozen=True)
class Rates:
    """Tokens per second observed for one model on one node, from its answers' timings."""

    decode: float | None = None
    prefill: float | None = None
    service: float | None = None  # seconds a request holds a slot: its prefill + its generation


@dataclass(frozen=True)
class Traffic:
    in_flight: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (node, model) → sent or waiting
    loading: frozenset[tuple[str, str]] = frozenset()  # (node, model) sent there cold, not yet seen loaded
    failing: frozenset[tuple[str, str]] = frozenset()  # (node, model) failed since the last poll; WHOLE_NODE
    prefill_queued: Mapping[str, int] = field(default_factory=dict)  # node → uncached prompt tokens not yet read
    rates: Mapping[tuple[str, str], Rates] = field(default_factory=dict)
    load_seconds: Mapping[str, float] = field(default_factory=dict)  # node → seconds its cold loads took
    prompts: PromptIndex | None = None

    @property
    def busy(self) -> frozenset[tuple[str, str]]:
        """(node, model) serving a request through the proxy: never evicted, never reloaded."""
        return frozenset(k for k, v in self.in_flight.items() if v > 0)

    def flights(self, node: str, model: str) -> int:
        return self.in_flight.get((node, model), 0)

    def is_failing(self, node: str, model: str) -> bool:
        return (node, model) in self.failing or (node, WHOLE_NODE) in self.failing
