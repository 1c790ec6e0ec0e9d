"""The optimizer's work queue: at most one job per model, run in the background, failures contained.

A notification for a model that is already queued or being fixed joins that job. A job (`Remediator`)
re-reads the cluster, plans for every priority model and executes the part of the plan that serves its own.
After a failed attempt the model cools down (cooldown_seconds, doubling up to cooldown_max_seconds): a job
submitted meanwhile waits for the end of the cooldown. Every outcome lands in the actions history, the log
and the metrics; nothing a job raises leaves its worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gpurouter import logfmt
from gpurouter.act import execute, journal
from gpurouter.act.demandplan import Planner
from gpurouter.cluster.config import Config, PriorityModel, model_key
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.ollama import OllamaClient, OllamaError
from gpurouter.cluster.state import ClusterState
from gpurouter.decide import placement
from gpurouter.units import size_text
from gpurouter.urls import redact

log = logging.getLogger("gpu_router.optimizer")

HISTORY = 200  # actions kept for /api/v1/actions
ACTIONS = ("load", "unload", "evict", "pin", "release")
WEBHOOK_OUTCOMES = ("accepted", "ignored", "invalid", "unauthorized")
REMEDIATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)


def log_event(level: int, event: str, **fields: object) -> None:
    """One log line `event=NAME key=value ...` on the optimizer's logger (gpurouter.logfmt)."""
    logfmt.log_event(log, level, event, **fields)


class Metrics:
    """The optimizer's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None, *, demand: bool = False) -> None:
        """`demand`: placement from demand is configured (only then is `demand_up` a series)."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.webhooks = Counter(
            "gpu_router_optimizer_webhooks", "Webhook notifications by outcome", ["outcome"], registry=r
        )
        self.actions = Counter(
            "gpu_router_optimizer_actions", "Actions on Ollama nodes by result", ["action", "result"], registry=r
        )
        self.remediation = Histogram(
            "gpu_router_optimizer_remediation_seconds",
            "Alert received or problem seen until the model is verified on GPU",
            buckets=REMEDIATION_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("gpu_router_optimizer_queue_depth", "Jobs queued or running", registry=r)
        self.last_reconcile = Gauge(
            "gpu_router_optimizer_last_reconcile_timestamp_seconds",
            "Unix time of the last reconcile pass",
            registry=r,
        )
        self.desired = Gauge(
            "gpu_router_optimizer_placement_desired",
            "1 where the desired placement (priority models, then models placed for their demand) has a GPU copy "
            "of the model on the node",
            ["node", "model"],
            registry=r,
        )
        self.actual = Gauge(
            "gpu_router_optimizer_placement_actual",
            "1 where the model is fully on GPU on the node now (the models of the desired placement)",
            ["node", "model"],
            registry=r,
        )
        self.demand_up = (
            Gauge(
                "gpu_router_optimizer_demand_up",
                "1 when the last read of the proxy's demand (demand.proxy_url) succeeded; 0: placing the priority "
                "models only",
                registry=r,
            )
            if demand
            else None
        )
        self._placement: set[tuple[str, str]] = set()
        for outcome in WEBHOOK_OUTCOMES:
            self.webhooks.labels(outcome=outcome)
        for action in ACTIONS:
            for result in ("success", "failure"):
                self.actions.labels(action=action, result=result)
        self.actions.labels(action="evict", result="by_ollama")

    def show_placement(self, pairs: dict[tuple[str, str], tuple[bool, bool]]) -> None:
        """(node, model) → (desired, actual): the placement gauges; a pair no longer shown loses its series."""
        for node, model in self._placement - set(pairs):
            self.desired.remove(node, model)
            self.actual.remove(node, model)
        for (node, model), (want, have) in pairs.items():
            self.desired.labels(node=node, model=model).set(1 if want else 0)
            self.actual.labels(node=node, model=model).set(1 if have else 0)
        self._placement = set(pairs)


@dataclass(frozen=True)
class ActionRecord:
    """One entry of the actions history (GET /api/v1/actions), named as optimize's outcomes are. `action` is
    load/unload/evict/pin, or plan/job for a job's own outcome;
    `outcome` is success, failure, skipped (an earlier step failed), abandoned (the service stopped),
    dry-run (auto_optimize: false), unplaced (the plan found no node for the model) or by_ollama (an `evict`
    Ollama did on its own while a load of ours ran). `by` is the process that took it: optimizer, proxy (its
    in-process heal) or cli (`gpu-router optimize`)."""

    time: float  # Unix seconds when it started
    model: str
    node: str | None
    action: str
    outcome: str
    duration_seconds: float
    detail: str = ""
    by: str = "optimizer"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActionRecord:
        """A record read back from the actions log (`journal.read` checked the fields every record has)."""
        return cls(
            time=float(data["time"]),
            model=data["model"],
            node=data["node"],
            action=data["action"],
            outcome=data["outcome"],
            duration_seconds=float(data.get("duration_seconds") or 0.0),
            detail=str(data.get("detail") or ""),
            by=str(data.get("by") or "?"),
        )


def action_records(
    execution: execute.Execution, offset: float, now: float, *, stopping: bool = False, by: str = "optimizer"
) -> list[ActionRecord]:
    """The records of a plan's execution: each step's outcome (its start moved to Unix time by `offset`), each
    model Ollama evicted on its own meanwhile; for a dry run each planned step, as of `now`."""
    if execution.dry_run:
        return [
            ActionRecord(now, s.model, s.node, s.action, "dry-run", 0.0, s.reason, by) for s in execution.plan.steps
        ]
    records = []
    for o in execution.outcomes:
        outcome = "success" if o.ok else "abandoned" if stopping else "skipped" if o.skipped else "failure"
        step = o.step
        records.append(
            ActionRecord(o.started + offset, step.model, step.node, step.action, outcome, o.duration, o.detail, by)
        )
        why = f"Ollama unloaded it on its own while {step.model} loaded (not in the plan)"
        records += [
            ActionRecord(o.started + offset, m, step.node, "evict", "by_ollama", 0.0, why, by) for m in o.evicted
        ]
    return records


@dataclass(frozen=True)
class JobResult:
    """What a job did. `fixed`: it put the model on GPU and verified it there."""

    ok: bool
    fixed: bool = False
    actions: tuple[ActionRecord, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class Submission:
    """The answer to a submit: `state` is queued (a new job), joined (an existing one) or cooldown (a new job
    that waits `retry_in` seconds, the rest of the model's cooldown)."""

    model: str
    node: str | None
    state: str
    retry_in: float | None = None


@dataclass
class Job:
    """The work for one model: every notification for it while it waits or runs joins it."""

    model: str
    received: float  # clock time of the first notification: remediation time counts from here
    not_before: float
    nodes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    running: bool = False

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "model": self.model,
            "state": "running" if self.running else "queued",
            "nodes": list(self.nodes),
            "sources": list(self.sources),
            "waiting_seconds": round(max(0.0, now - self.received), 3),
            "starts_in": round(max(0.0, self.not_before - now), 3) if not self.running else 0.0,
        }


RunJob = Callable[[Job], JobResult]


class JobQueue:
    """Jobs keyed by model, run by `workers` threads; never two jobs for one model at a time."""

    def __init__(
        self,
        config: Config,
        run_job: RunJob,
        *,
        metrics: Metrics | None = None,
        workers: int | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        by: str = "optimizer",
    ) -> None:
        """`by`: the process that runs it, as its records name it (optimizer or proxy)."""
        self.config = config
        self.run_job = run_job
        self.by = by
        self.metrics = metrics or Metrics()
        self.stopping = stop or threading.Event()
        self.clock = clock
        self.wall = wall
        self._workers = workers or max(1, min(8, len(config.priority_models)))
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._failures: dict[str, int] = {}
        self._cool_until: dict[str, float] = {}
        self._history: deque[ActionRecord] = deque(maxlen=HISTORY)
        self.metrics.queue_depth.set_function(lambda: self.depth)

    # ------------------------------------------------------------------------------------------ control

    def start(self) -> JobQueue:
        for i in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"optimizer-job-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Take no new job, drop queued ones, wait up to `timeout` for running ones; True when all ended."""
        self.stopping.set()
        with self._cond:
            dropped = [m for m, job in self._jobs.items() if not job.running]
            for model in dropped:
                del self._jobs[model]
            self._cond.notify_all()
        for model in dropped:
            log_event(logging.INFO, "job.dropped", model=model, outcome="stopping")
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def dead_workers(self) -> list[str]:
        """The names of worker threads that ended although the queue was not stopped."""
        if self.stopping.is_set():
            return []
        return [t.name for t in self._threads if not t.is_alive()]

    def wake(self) -> None:
        """Make idle workers look at the queue again (after the injected clock moved)."""
        with self._cond:
            self._cond.notify_all()

    def submit(self, model: str, node: str | None = None, *, source: str = "webhook") -> Submission:
        """Queue a job for `model`, or join the one already queued or running."""
        key = model_key(model)
        now = self.clock()
        with self._cond:
            job = self._jobs.get(key)
            if job is not None:
                state = "joined"
            else:
                until = self._cool_until.get(key, 0.0)
                job = self._jobs[key] = Job(model=key, received=now, not_before=max(now, until))
                state = "cooldown" if until > now else "queued"
                self._cond.notify()
            if node is not None and node not in job.nodes:
                job.nodes.append(node)
            if source not in job.sources:
                job.sources.append(source)
            retry_in = job.not_before - now if job.not_before > now and not job.running else None
        level = logging.DEBUG if state == "joined" else logging.INFO  # duplicates are routine: keep them quiet
        log_event(level, "job.submit", model=key, node=node, source=source, outcome=state)
        return Submission(model=key, node=node, state=state, retry_in=retry_in)

    # ------------------------------------------------------------------------------------------ reading

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    def jobs(self) -> list[dict[str, object]]:
        now = self.clock()
        with self._cond:
            return [job.snapshot(now) for job in self._jobs.values()]

    def actions(self) -> list[ActionRecord]:
        """The last HISTORY actions, oldest first: this queue's own, and with `actions_log` every process's from
        the log (this queue's own still shown when the log could not be written)."""
        with self._cond:
            own = list(self._history)
        if self.config.actions_log is None:
            return own
        shared = {ActionRecord.from_json(r) for r in journal.read(self.config.actions_log, HISTORY)}
        return sorted(shared.union(own), key=lambda r: r.time)[-HISTORY:]

    def cooldowns(self) -> dict[str, float]:
        """Seconds of cooldown left per model that has one."""
        now = self.clock()
        with self._cond:
            return {m: round(until - now, 3) for m, until in self._cool_until.items() if until > now}

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is queued or running; False when `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs, timeout)

    # ------------------------------------------------------------------------------------------ workers

    def _work(self) -> None:
        try:
            while (job := self._take()) is not None:
                result = self._run(job)
                self._finish(job, result)
        except BaseException:  # the worker itself broke: say so; /healthz reports it from now on
            log.exception("event=job.worker outcome=dead")

    def _take(self) -> Job | None:
        with self._cond:
            while not self.stopping.is_set():
                now = self.clock()
                waiting = [j for j in self._jobs.values() if not j.running]
                ready = next((j for j in waiting if j.not_before <= now), None)
                if ready is not None:
                    ready.running = True
                    return ready
                soonest = min((j.not_before - now for j in waiting), default=None)
                self._cond.wait(None if soonest is None else min(soonest, 1.0))
        return None

    def _run(self, job: Job) -> JobResult:
        started, wall = self.clock(), self.wall()
        log_event(logging.INFO, "job.start", model=job.model, node=",".join(job.nodes) or None)
        try:
            return self.run_job(job)
        except Exception as exc:  # a job must never take its worker down
            log.exception(logfmt.event_line("job.crash", model=job.model, outcome="failure"))
            detail = redact(f"{type(exc).__name__}: {exc}")
            record = ActionRecord(wall, job.model, None, "job", "failure", self.clock() - started, detail)
            return JobResult(ok=False, actions=(record,), detail=detail)

    def _finish(self, job: Job, result: JobResult) -> None:
        now = self.clock()
        records = [replace(r, by=self.by) for r in result.actions]
        if self.config.actions_log is not None:
            journal.append(self.config.actions_log, [asdict(r) for r in records])
        for record in records:
            if record.action in ACTIONS and record.outcome in ("success", "failure", "by_ollama"):
                self.metrics.actions.labels(action=record.action, result=record.outcome).inc()
            level = logging.WARNING if record.outcome in ("failure", "unplaced", "by_ollama") else logging.INFO
            log_event(
                level,
                "action",
                model=record.model,
                node=record.node,
                action=record.action,
                outcome=record.outcome,
                duration=record.duration_seconds,
                detail=record.detail or None,
            )
        if result.fixed:
            self.metrics.remediation.observe(max(0.0, now - job.received))
        with self._cond:
            self._history.extend(records)
            if result.ok:
                self._failures.pop(job.model, None)
                self._cool_until.pop(job.model, None)
                wait = None
            else:
                failures = self._failures[job.model] = self._failures.get(job.model, 0) + 1
                opt = self.config.optimizer
                wait = min(opt.cooldown_seconds * 2 ** (failures - 1), opt.cooldown_max_seconds)
                self._cool_until[job.model] = now + wait
            del self._jobs[job.model]
            self._cond.notify_all()
        log_event(
            logging.INFO if result.ok else logging.WARNING,
            "job.done",
            model=job.model,
            outcome="success" if result.ok else "failure",
            fixed=result.fixed,
            cooldown=wait,
            detail=result.detail or None,
        )


class _Guarded:
    """A node's client that refuses every call once the service is stopping, so that an execution in flight
    takes no new step: its next read fails, and the executor never removes a CPU copy unverified."""

    def __init__(self, client: OllamaClient, stopping: threading.Event) -> None:
        self._client = client
        self._stopping = stopping

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._stopping.is_set():
                raise OllamaError("refused", "not sent: the optimizer is stopping")
            return method(*args, **kwargs)

        return call


class Remediator:
    """The real job: re-read the cluster, plan for all priority models and those placed for their demand (the
    `planner`'s desired placement, so that one model never takes the room a higher one needs), execute the steps
    that serve the job's model.

    Jobs for different models run at once only on disjoint nodes: a job reserves every node its plan
    touches (at most `max_loads_per_node` jobs per node), and a job whose plan needs a node that is taken
    waits for a release and then re-reads the cluster, so no plan is acted on from a state that another job
    was changing. With `dry_run` (auto_optimize: false) the plan is recorded, never executed.
    """

    def __init__(
        self,
        config: Config,
        observer: Observer,
        *,
        dry_run: bool = False,
        stop: threading.Event | None = None,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        planner: Planner | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        self.planner = planner or Planner(config, wall=wall)
        self.dry_run = dry_run
        self.stopping = stop or threading.Event()
        self.wall = wall
        self.clock = clock
        self._clients = {name: _Guarded(c, self.stopping) for name, c in observer.clients.items()}
        self._cond = threading.Condition()
        self._reserved: dict[str, int] = {}
        self._generation = 0
        self._leftovers: dict[str, set[str]] = {}  # model → nodes holding a copy it failed to remove
        self._healed: dict[str, tuple[float, str]] = {}  # model → (clock time, node) a job last put it on GPU

    def leftovers(self) -> list[str]:
        """Models with a CPU or partial copy that a job could not remove after verifying the GPU copy (the
        node did not answer): a later job finishes the removal."""
        with self._cond:
            return sorted(model for model, nodes in self._leftovers.items() if nodes)

    def __call__(self, job: Job) -> JobResult:
        priority = self.config.priority(job.model)
        reserved = self._reserve(job.model)
        if reserved is None:
            return JobResult(ok=True, detail="abandoned: the service is stopping")
        state, plan, nodes = reserved
        if priority is None and not plan.steps and not plan.unplaced:
            self._release(nodes)
            return JobResult(ok=True, detail="nothing to do: not a priority model, and not placed for its demand")
        undone = self._undone(job.model, plan, state)
        if undone is not None:
            plan = replace(plan, steps=tuple(s for s in plan.steps if s.action == "pin"))
        try:
            offset = self.wall() - self.clock()
            execution = execute.execute(
                plan,
                state,
                self._clients,  # type: ignore[arg-type]
                load_timeout=self.config.optimizer.load_timeout,
                dry_run=self.dry_run,
                clock=self.clock,
                wall=self.wall,
            )
        finally:
            self._release(nodes)
        result = self._result(job.model, plan, execution, offset)
        if undone is not None:
            record = ActionRecord(self.wall(), job.model, None, "plan", "unplaced", 0.0, undone)
            result = replace(result, ok=False, actions=(*result.actions, record), detail=undone)
        elif result.fixed:
            home = next(o.step.node for o in execution.outcomes if o.verified and model_key(o.step.serves) == job.model)
            with self._cond:
                self._healed[job.model] = (self.clock(), home)
        if self.dry_run or result.ok or self.stopping.is_set() or priority is None:
            return result
        kept = self._keep_served(priority)
        return result if kept is None else replace(result, actions=(*result.actions, kept))

    def _undone(self, model: str, plan: placement.Plan, state: ClusterState) -> str | None:
        """Why the model is not put on GPU again now: a job put it there less than one cooldown ago, and another
        model took its place on that node (Ollama unloaded it for a request that does not fit beside it):
        loading it again at once would only start a load/unload loop. None when the plan may run (a restart,
        or a copy of it still on that node, is no such sign)."""
        with self._cond:
            healed = self._healed.get(model)
        if healed is None or not plan.loads:
            return None
        since, home = self.clock() - healed[0], state.node(healed[1])
        if since >= self.config.optimizer.cooldown_seconds or home is None or not home.up:
            return None
        if home.loaded_model(model) is not None or not home.loaded:
            return None
        return (
            f"put on GPU on {home.name} {since:.1f}s ago, and another model took its place there since: kept "
            "served, tried again after one cooldown"
        )

    def _keep_served(self, priority: PriorityModel) -> ActionRecord | None:
        """A priority model with no copy on any node that answers is loaded at once where Ollama places it
        (partly or all on CPU if need be), so it stays served while later jobs keep trying for GPU. On a node
        with a GPU where other models are loaded it is loaded on CPU (`num_gpu: 0`): a load Ollama places by
        itself could make it evict one of them."""
        key = model_key(priority.name)
        state = self.observer.poll()
        if any(n.loaded_model(key) is not None for n in state.nodes if n.up) or not any(n.up for n in state.nodes):
            return None
        now = self.wall()
        node_name = placement.route(state, key, now).node
        node = state.node(node_name) if node_name is not None else None
        if node is None:
            return None
        on_cpu = bool(node.loaded) and node.capacity.source != "none" and node.vram_total != 0
        started = self.clock()
        try:
            self._clients[node.name].load(
                key,
                num_ctx=priority.num_ctx,
                keep_alive=priority.keep_alive,
                num_gpu=0 if on_cpu else None,
                embedding=state.is_embedding(key),
                timeout=self.config.optimizer.load_timeout,
            )
            outcome, detail = "success", f"no copy anywhere: loaded on {node.name}{' on CPU' if on_cpu else ''} "
            detail += "so that it stays served; the plan keeps trying for GPU"
        except OllamaError as exc:
            outcome, detail = "failure", f"no copy anywhere; loading it on {node.name} to keep it served failed: {exc}"
        return ActionRecord(now, key, node.name, "load", outcome, self.clock() - started, detail)

    def _reserve(self, model: str) -> tuple[ClusterState, placement.Plan, list[str]] | None:
        """Poll and plan until the plan's nodes can be reserved; None when the service stops first."""
        limit = self.config.optimizer.max_loads_per_node
        while not self.stopping.is_set():
            with self._cond:
                generation = self._generation
            state = self.observer.poll()
            desired = self.planner.desired(state, self.wall())
            plan = self._finishing(placement.restrict(desired.plan, [model]), state)
            nodes = sorted({step.node for step in plan.steps})
            with self._cond:
                if generation == self._generation and all(self._reserved.get(n, 0) < limit for n in nodes):
                    for node in nodes:
                        self._reserved[node] = self._reserved.get(node, 0) + 1
                    return state, plan, nodes
                self._cond.wait_for(lambda g=generation: self._generation != g or self.stopping.is_set(), timeout=30.0)
        return None

    def _finishing(self, plan: placement.Plan, state: ClusterState) -> placement.Plan:
        """The plan plus the removal of copies an earlier job left behind, once the model is on GPU."""
        extra = []
        now = self.wall()
        for model, home in plan.already:
            with self._cond:
                nodes = sorted(self._leftovers.get(model, ()))
            for name in nodes:
                node = state.node(name)
                copy = node.loaded_model(model) if node is not None and node.up else None
                if node is not None and node.up and (copy is None or copy.fully_on_gpu):
                    with self._cond:
                        self._leftovers[model].discard(name)  # gone, or on GPU there too: nothing left to do
                elif copy is not None and not placement.is_busy(copy, now):
                    why = f"finish: remove the {copy.gpu_ratio:.0%}-on-GPU copy left behind ({model} is on {home})"
                    extra.append(placement.Step("unload", model, name, why))
        return replace(plan, steps=plan.steps + tuple(extra)) if extra else plan

    def _release(self, nodes: list[str]) -> None:
        with self._cond:
            for node in nodes:
                self._reserved[node] -= 1
            self._generation += 1
            self._cond.notify_all()

    def _result(self, model: str, plan: placement.Plan, execution: execute.Execution, offset: float) -> JobResult:
        now = self.wall()
        records = action_records(execution, offset, now, stopping=self.stopping.is_set())
        if not execution.dry_run:
            for o in execution.outcomes:
                self._track_removal(o)
                if o.hidden:
                    why = (
                        f"Ollama unloaded {', '.join(o.evicted)} to admit {o.step.model}"
                        if o.ok
                        else f"{o.step.model} came up short by {size_text(o.hidden)}"
                    )
                    self.observer.hidden.record(o.step.node, o.hidden, why, o.evidence)
        unplaced = [why for m, why in plan.unplaced if model_key(m) == model]
        records += [ActionRecord(now, model, None, "plan", "unplaced", 0.0, why) for why in unplaced]
        fixed = not execution.dry_run and any(
            o.verified and model_key(o.step.serves) == model for o in execution.outcomes
        )
        return JobResult(
            ok=execution.ok and not unplaced,
            fixed=fixed,
            actions=tuple(records),
            detail="; ".join([o.detail for o in execution.failed] + unplaced),
        )

    def _track_removal(self, outcome: execute.Outcome) -> None:
        """Remember a copy whose removal failed after its model was verified on GPU; forget a removed one."""
        step = outcome.step
        if step.action != "unload" or outcome.skipped:
            return
        with self._cond:
            nodes = self._leftovers.setdefault(model_key(step.model), set())
            if outcome.ok:
                nodes.discard(step.node)
            else:
                nodes.add(step.node)
