"""The reconcile loop: every `check_interval` seconds, queue a job for each priority model not fully on GPU
or loaded without its pin (the job asks for it again with its keep_alive: no reload). With placement from
demand (`demand.proxy_url` set, `demand.placement` on), every `demand.interval` seconds it also reads the
proxy's demand and queues a job for each model the desired placement acts on: a load, another copy, a renewal
of a demand-placed model's keep_alive, a release.

It heals the cluster when Alertmanager is down or a notification was lost. With `auto_optimize: false` it
only computes the plan and logs it (monitor mode); nothing is executed. Each pass sets the placement gauges
(desired against actual, per node and model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from gpurouter.act.demandplan import Planner
from gpurouter.act.jobs import JobQueue, Metrics, log, log_event
from gpurouter.cluster.config import Config, model_key
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.state import ClusterState
from gpurouter.decide import placement
from gpurouter.decide.demand import Desired

MIN_INTERVAL = 0.05  # seconds; a check_interval of 0 must not spin


class Reconciler:
    """Runs `run_once` now and then every `interval` seconds in a thread of its own until stopped."""

    def __init__(
        self,
        config: Config,
        observer: Observer,
        queue: JobQueue,
        *,
        metrics: Metrics,
        interval: float | None = None,
        wall: Callable[[], float] = time.time,
        leftovers: Callable[[], list[str]] = list,
        planner: Planner | None = None,
    ) -> None:
        self.config = config
        self.planner = planner or Planner(config, wall=wall)
        self.observer = observer
        self.queue = queue
        self.metrics = metrics
        self.interval = max(MIN_INTERVAL, config.check_interval if interval is None else interval)
        self.wall = wall
        self.leftovers = leftovers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next: float | None = None  # time.monotonic() of the next pass; None while one runs

    def run_once(self) -> list[str]:
        """One pass: the priority models not fully on GPU (queued, or only planned in monitor mode)."""
        state = self.observer.poll()
        missing = [p for p in self.config.priority_models if not state.on_gpu(p.name)]
        unpinned = sorted({s.model for s in placement.unpinned(state, self.wall())})
        down = [n.name for n in state.nodes if not n.up]
        if len(down) == len(state.nodes):  # nothing can be read or done: say so, queue nothing
            self.metrics.last_reconcile.set(self.wall())
            reasons = "; ".join(f"{n.name}: {n.error or n.error_kind}" for n in state.nodes)
            log_event(logging.WARNING, "reconcile", outcome="failure", reason=f"no node answered ({reasons})")
            return [p.name for p in missing]
        if self.config.auto_optimize:
            for name in dict.fromkeys([*(p.name for p in missing), *unpinned]):  # a lost pin is restored too
                self.queue.submit(name, source="reconcile")
            for model in self.leftovers():  # a copy an earlier job could not remove: finish it
                self.queue.submit(model, source="reconcile")
        elif missing or unpinned:
            _log_plan(placement.plan(state, now=self.wall()))  # the whole picture: missing and unpinned models
        self._show(state, self.planner.desired(state, self.wall()))
        self.metrics.last_reconcile.set(self.wall())
        names = [p.name for p in missing]
        log_event(
            logging.WARNING if down else logging.INFO,
            "reconcile",
            outcome="partial" if down else "ok",
            not_on_gpu=",".join(model_key(n) for n in names) or "none",
            unpinned=",".join(unpinned) or None,
            nodes_down=",".join(down) or None,
        )
        return names

    def demand_once(self) -> list[str]:
        """One pass over demand: read the proxy's demand, and queue a job for every model the desired placement
        acts on (only logged in monitor mode); the models, sorted."""
        reading = self.planner.refresh()
        if self.metrics.demand_up is not None:
            self.metrics.demand_up.set(0 if reading.error else 1)
        state = self.observer.poll()
        desired = self.planner.desired(state, self.wall())
        self._show(state, desired)
        if not any(n.up for n in state.nodes):
            return []
        models = sorted({model_key(s.serves) for s in desired.plan.steps})
        if self.config.auto_optimize:
            for model in models:
                self.queue.submit(model, source="demand")
        else:
            _log_plan(desired.plan)
        log_event(
            logging.INFO if models else logging.DEBUG,
            "demand",
            outcome="ok" if reading.error is None else "failure",
            placed=",".join(sorted(desired.placed)) or "none",
            acting_on=",".join(models) or "none",
        )
        return models

    def _show(self, state: ClusterState, desired: Desired) -> None:
        """The placement gauges: per (node, model) of the desired placement's models, wanted and had on GPU."""
        pairs: dict[tuple[str, str], tuple[bool, bool]] = {}
        for pm in desired.models:
            key = model_key(pm.name)
            for node, copy in state.placements(key):
                if copy.fully_on_gpu:
                    pairs[(node.name, key)] = ((node.name, key) in desired.targets, True)
        for pair in desired.targets:
            pairs[pair] = (True, pairs.get(pair, (True, False))[1])
        self.metrics.show_placement(pairs)

    def start(self) -> Reconciler:
        if not self.config.auto_optimize:
            log_event(
                logging.WARNING,
                "reconcile.mode",
                outcome="monitor only: auto_optimize is false, plans are logged and never executed",
            )
        self._thread = threading.Thread(target=self._loop, name="optimizer-reconcile", daemon=True)
        self._thread.start()
        return self

    def next_pass_in(self) -> float:
        """Seconds until the next pass starts; 0 while one runs (or before the first)."""
        due = self._next
        return 0.0 if due is None else max(0.0, due - time.monotonic())

    @property
    def dead(self) -> bool:
        """True when the loop's thread ended although nobody stopped it."""
        return self._thread is not None and not self._thread.is_alive() and not self._stop.is_set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop after the pass in progress; True when the thread ended within `timeout`."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        every = max(MIN_INTERVAL, self.config.demand.interval) if self.planner.active else None
        demand_due = time.monotonic()
        try:
            while not self._stop.is_set():
                self._next = None
                try:
                    self.run_once()
                except Exception:  # a bad pass must not end the loop
                    log.exception("event=reconcile outcome=failure")
                self._next = time.monotonic() + self.interval
                while every is not None and not self._stop.is_set() and time.monotonic() < self._next:
                    if time.monotonic() >= demand_due:
                        try:
                            self.demand_once()
                        except Exception:  # a bad pass must not end the loop
                            log.exception("event=demand outcome=failure")
                        demand_due = time.monotonic() + every
                    self._stop.wait(max(0.0, min(demand_due, self._next) - time.monotonic()))
                self._stop.wait(max(0.0, self._next - time.monotonic()))
        except BaseException:  # the loop itself broke: say so; /healthz reports it from now on
            log.exception("event=reconcile outcome=dead")


def _log_plan(plan: placement.Plan) -> None:
    """Monitor mode: every step of the plan, not executed, and every model it cannot place."""
    for step in plan.steps:
        log_event(
            logging.INFO,
            "reconcile.plan",
            model=step.model,
            node=step.node,
            action=step.action,
            outcome="not executed (auto_optimize: false)",
            reason=step.reason,
        )
    for model, why in plan.unplaced:
        log_event(logging.WARNING, "reconcile.plan", model=model, outcome="unplaced", reason=why)
