"""The optimizer's HTTP face: the Alertmanager webhook, the JSON API, /metrics and /healthz.

Handlers do no slow work: the webhook validates, queues and answers 202 at once; the read endpoints share
one cluster poll per `state_max_age` seconds. Every answer, errors included, is JSON (except /metrics).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from gpurouter import render
from gpurouter.act.demandplan import Planner
from gpurouter.act.execute import Execution
from gpurouter.act.jobs import JobQueue, Metrics, Remediator, log, log_event
from gpurouter.cluster.config import Config, PriorityModel, model_key, name_problem
from gpurouter.cluster.demandfeed import Reading
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.state import ClusterState
from gpurouter.decide import placement
from gpurouter.decide.demand import Desired
from gpurouter.serve.auth import Authenticator
from gpurouter.units import body_too_large
from optimizer import statuspage, webhook
from optimizer.reconcile import Reconciler
from optimizer.webhook import PayloadError

EXTENSION = "gpu_router"
OPEN_PATHS = ("/healthz", "/metrics")  # open even with optimizer.protect_reads: probes and Prometheus


@dataclasses.dataclass
class Services:
    """What the handlers use; `app.extensions["gpu_router"]`."""

    config: Config
    observer: Observer
    queue: JobQueue
    metrics: Metrics
    auth: Authenticator
    states: StateCache
    planner: Planner
    reconciler: Reconciler | None = None

    def desired(self, state: ClusterState, now: float) -> Desired:
        """The desired placement: the priority models, and those placed for their demand while it is read."""
        return self.planner.desired(state, now)

    @property
    def reading(self) -> Reading:
        return self.planner.reading

    def dead_loops(self) -> list[str]:
        """The threads the optimizer needs that ended on their own (the reconcile loop, job workers)."""
        dead = self.queue.dead_workers()
        if self.reconciler is not None and self.reconciler.dead:
            dead.insert(0, "optimizer-reconcile")
        return dead


class StateCache:
    """The latest poll, shared by concurrent readers; at most one poll per `max_age` seconds."""

    def __init__(self, observer: Observer, max_age: float = 1.0) -> None:
        self.observer = observer
        self.max_age = max_age
        self._lock = threading.Lock()
        self._state: ClusterState | None = None
        self._at = 0.0

    def get(self) -> ClusterState:
        with self._lock:
            if self._state is None or time.monotonic() - self._at >= self.max_age:
                self._state = self.observer.poll()
                self._at = time.monotonic()
            return self._state


class ApiError(Exception):
    """An answer other than 2xx, with a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    config: Config,
    *,
    observer: Observer | None = None,
    queue: JobQueue | None = None,
    metrics: Metrics | None = None,
    auth: Authenticator | None = None,
    state_max_age: float = 1.0,
    reconciler: Reconciler | None = None,
    planner: Planner | None = None,
) -> Flask:
    """The Flask application. Without a `queue`, one backed by a `Remediator` is made and started (its
    worker threads are daemons; stop them with ``app.extensions["gpu_router"].queue.stop()``). /healthz
    watches the queue's workers and the `reconciler`, when given."""
    observer = observer or Observer(config)
    metrics = metrics or (queue.metrics if queue is not None else Metrics())
    if queue is None:
        queue = JobQueue(config, Remediator(config, observer, dry_run=not config.auto_optimize), metrics=metrics)
        queue.start()
    services = Services(
        config=config,
        observer=observer,
        queue=queue,
        metrics=metrics,
        auth=auth or Authenticator(config.optimizer.webhook_auth),
        states=StateCache(observer, state_max_age),
        reconciler=reconciler,
        planner=planner or Planner(config),
    )
    app = Flask("gpu_router.optimizer")
    app.config["MAX_CONTENT_LENGTH"] = webhook.MAX_BODY
    app.json.sort_keys = False
    app.url_map.merge_slashes = app.url_map.strict_slashes = False  # no HTML redirects: "//x" is a JSON 404
    app.extensions[EXTENSION] = services
    _routes(app, services)
    _errors(app)
    return app


# ---------------------------------------------------------------------------------------------- routes


def _routes(app: Flask, s: Services) -> None:
    config = s.config

    if config.optimizer.protect_reads:

        @app.before_request
        def guard_reads() -> Any:
            """With `optimizer.protect_reads`, reads other than /healthz and /metrics demand the credentials
            (the write endpoints check them, and count refusals, themselves)."""
            if request.method not in ("GET", "HEAD") or request.path in OPEN_PATHS:
                return None
            if s.auth.allows(request.headers.get("Authorization")):
                return None
            log_event(logging.WARNING, "read", outcome="unauthorized", path=request.path, remote=request.remote_addr)
            return _unauthorized(s.auth)

    @app.get("/")
    def index() -> Any:
        state, now = s.states.get(), time.time()
        status = render.status_json(state, now)
        actions = [dataclasses.asdict(a) for a in s.queue.actions()]
        next_pass = s.reconciler.next_pass_in() if s.reconciler is not None else None
        demand = render.demand_json(s.desired(state, now), s.reading, config.demand)
        monitor = not config.auto_optimize
        page = statuspage.render(status, actions, next_pass=next_pass, monitor_only=monitor, demand=demand)
        return Response(page, mimetype="text/html")

    @app.post("/webhook")
    def receive() -> Any:
        if not s.auth.allows(request.headers.get("Authorization")):
            s.metrics.webhooks.labels(outcome="unauthorized").inc()
            log_event(logging.WARNING, "webhook", outcome="unauthorized", remote=request.remote_addr)
            return _unauthorized(s.auth)
        try:
            payload = webhook.parse(_body())
        except PayloadError as exc:
            s.metrics.webhooks.labels(outcome="invalid").inc()
            log_event(logging.WARNING, "webhook", outcome="invalid", reason=str(exc))
            raise ApiError(exc.status, str(exc)) from None
        triage = webhook.triage(payload, config)
        queued = []
        for wanted in triage.wanted:
            sub = s.queue.submit(wanted.model, wanted.node, source="webhook")
            queued.append({"alertname": wanted.alertname, **_submission(sub)})
        ignored = [dataclasses.asdict(i) for i in triage.ignored]
        outcome = "accepted" if queued else "ignored"
        s.metrics.webhooks.labels(outcome=outcome).inc()
        for item in triage.ignored:
            log_event(
                logging.INFO,
                "webhook.ignored",
                alertname=item.alertname,
                model=item.model,
                node=item.node,
                reason=item.reason,
            )
        log_event(
            logging.INFO,
            "webhook",
            outcome=outcome,
            queued=len(queued),
            ignored=len(ignored),
            truncated=triage.truncated or None,
        )
        body = {"queued": queued, "ignored": ignored, "auto_optimize": config.auto_optimize}
        if triage.truncated:
            body["truncated_alerts"] = triage.truncated
        return body, 202

    @app.get("/api/v1/status")
    def status() -> Any:
        return {"command": "status", **render.status_json(s.states.get(), time.time())}

    @app.get("/api/v1/route")
    def route() -> Any:
        state, model = _model_query(s)
        return {"command": "route", **render.route_document(state, model, time.time())}

    @app.get("/api/v1/check")
    def check() -> Any:
        state, model = _model_query(s)
        return {"command": "check", **render.check_json(placement.check(state, model, time.time()))}

    @app.get("/api/v1/models")
    def models() -> Any:
        return render.models_document(s.states.get())

    @app.get("/api/v1/report")
    def report() -> Any:
        state, now = s.states.get(), time.time()
        return render.report_document(state, s.desired(state, now), s.reading, now)

    @app.get("/api/v1/placement")
    def desired_placement() -> Any:
        state, now = s.states.get(), time.time()
        desired = s.desired(state, now)
        actual = sorted((n.name, model_key(m.name)) for n in state.nodes for m in n.loaded if m.fully_on_gpu)
        return {
            "command": "placement",
            "demand": render.demand_json(desired, s.reading, config.demand),
            "actual": [{"node": n, "model": m} for n, m in actual],
            "plan": render.plan_json(desired.plan, ()),
        }

    @app.post("/api/v1/optimize")
    def optimize() -> Any:
        if not s.auth.allows(request.headers.get("Authorization")):
            log_event(logging.WARNING, "optimize", outcome="unauthorized", remote=request.remote_addr)
            return _unauthorized(s.auth)
        dry_run, wanted = _optimize_request(config)
        if dry_run:
            state, now = s.states.get(), time.time()
            desired = s.desired(state, now)
            plan = placement.restrict(desired.plan, [p.name for p in wanted])
            document = render.optimize_document(Execution(plan, (), dry_run=True), "dry_run", state, now)
            return {**document, "demand": render.demand_json(desired, s.reading, config.demand)}
        if not config.auto_optimize:
            raise ApiError(409, "auto_optimize is false (monitor only): ask with dry_run, or enable it")
        queued = [_submission(s.queue.submit(p.name, source="api")) for p in wanted]
        log_event(logging.INFO, "optimize", outcome="queued", models=",".join(q["model"] for q in queued))
        return {"command": "optimize", "dry_run": False, "mode": "auto_optimize", "queued": queued}, 202

    @app.get("/api/v1/actions")
    def actions() -> Any:
        return {
            "actions": [dataclasses.asdict(a) for a in s.queue.actions()],
            "jobs": s.queue.jobs(),
            "cooldowns": s.queue.cooldowns(),
        }

    @app.get("/healthz")
    def healthz() -> Any:
        body = {"status": "ok", "auto_optimize": config.auto_optimize, "queue_depth": s.queue.depth}
        dead = s.dead_loops()
        if not dead:
            return body
        error = f"stopped unexpectedly: {', '.join(dead)} (see the log; restart the optimizer)"
        return {"error": error, **body, "status": "failing", "dead": dead}, 503

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(s.metrics.registry), mimetype=CONTENT_TYPE_LATEST)


def _errors(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Any:
        return {"error": str(exc)}, exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        response = exc.get_response()
        response.data = json.dumps({"error": f"{exc.name}: {exc.description}"})
        response.content_type = "application/json"
        return response

    @app.errorhandler(Exception)
    def crash(exc: Exception) -> Any:
        log.exception("event=http.error path=%s", request.path)
        return {"error": f"internal error: {type(exc).__name__}"}, 500


# ---------------------------------------------------------------------------------------------- requests


def _body() -> bytes:
    """The request body, within webhook.MAX_BODY."""
    try:
        return request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise webhook.BodyTooLarge(body_too_large(request.content_length, webhook.MAX_BODY)) from None


def _unauthorized(auth: Authenticator) -> Any:
    return {"error": "unauthorized: missing or wrong credentials"}, 401, {"WWW-Authenticate": auth.challenge}


def _model_query(s: Services) -> tuple[ClusterState, str]:
    model = request.args.get("model", "").strip()
    if not model:
        raise ApiError(400, "missing parameter: model (e.g. ?model=llama3.1:latest)")
    if problem := name_problem(model):
        raise ApiError(400, f"model: {problem}")
    state = s.states.get()
    if not placement.is_known(state, model):
        raise ApiError(404, render.unknown_model_text(state, webhook.clip(model)))
    return state, model


def _optimize_request(config: Config) -> tuple[bool, list[PriorityModel]]:
    """(dry_run, the priority models asked for) from the body of POST /api/v1/optimize."""
    try:
        raw = _body()
        data = json.loads(raw) if raw.strip() else {}
    except PayloadError as exc:
        raise ApiError(exc.status, str(exc)) from None
    except (ValueError, RecursionError):
        raise ApiError(400, 'invalid JSON: expected {"dry_run": true, "models": [...]}') from None
    if not isinstance(data, dict):
        raise ApiError(400, 'expected a JSON object like {"dry_run": true, "models": [...]}')
    unknown = sorted(set(data) - {"dry_run", "models"})
    if unknown:
        raise ApiError(400, f"unknown field {webhook.clip(unknown[0])!r} (known: dry_run, models)")
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise ApiError(400, "dry_run: expected true or false")
    names = data.get("models")
    if names is None:
        return dry_run, list(config.priority_models)
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ApiError(400, "models: expected a list of model names")
    wanted = []
    for i, name in enumerate(names):
        if problem := name_problem(name):
            raise ApiError(400, f"models[{i}]: {problem}")
        priority = config.priority(name)
        if priority is None:
            raise ApiError(404, f"{webhook.clip(name)!r} is not a configured priority model")
        if priority not in wanted:
            wanted.append(priority)
    return dry_run, wanted


def _submission(sub: Any) -> dict[str, Any]:
    return {"model": sub.model, "node": sub.node, "state": sub.state, "retry_in": sub.retry_in}
