"""The optimizer's desired placement, shared by its jobs and its reconcile loop: the priority list, and, while
the proxy's demand is fresh, the models placed for their demand (`gpurouter.decide.demand`). It remembers which
models it placed for their demand, so that one whose demand fell is released."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gpurouter.cluster.config import Config
from gpurouter.cluster.demandfeed import NOT_READ, DemandFeed, Reading
from gpurouter.cluster.state import ClusterState
from gpurouter.decide import demand
from gpurouter.decide.demand import Desired

STALE_PASSES = 3  # a reading older than this many demand.interval is not acted on (priority list only)


class Planner:
    def __init__(self, config: Config, feed: DemandFeed | None = None, wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.feed = feed
        self.wall = wall
        self._placed: set[str] = set()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.feed is not None and self.feed.active

    def refresh(self) -> Reading:
        """Read the proxy's demand now (the reconcile loop's demand pass)."""
        return self.feed.read(self.wall()) if self.feed is not None else NOT_READ

    @property
    def reading(self) -> Reading:
        return self.feed.last if self.feed is not None else NOT_READ

    def fresh(self, now: float) -> Reading | None:
        """The latest reading when it is recent enough to act on."""
        reading = self.reading
        if reading.models is None or now - reading.at > STALE_PASSES * self.config.demand.interval:
            return None
        return reading

    def desired(self, state: ClusterState, now: float) -> Desired:
        reading = self.fresh(now) if self.active else None
        with self._lock:
            placed = frozenset(self._placed)
        found = demand.desired(state, reading.models if reading else None, self.config.demand, now, placed)
        if reading is not None:  # a model placed before is remembered while a copy of it is loaded somewhere
            still = {k for k in placed if any(n.loaded_model(k) is not None for n in state.nodes)}
            with self._lock:
                self._placed = set(found.placed) | still
        return found


def desired_once(config: Config, state: ClusterState, now: float) -> tuple[Desired, Reading]:
    """For a one-shot command (`report`, `optimize`): the proxy's demand read once, and the desired placement
    from it. It has no memory of earlier passes, so releases are left to the running optimizer."""
    feed = DemandFeed(config)
    try:
        planner = Planner(config, feed, wall=lambda: now)
        reading = planner.refresh()
        return planner.desired(state, now), reading
    finally:
        feed.close()
