"""The proxy's HTTP face (aiohttp): Ollama's API and its OpenAI-compatible `/v1` API for the whole cluster.

A routed request (generate, chat, embed, embeddings, show, and the /v1 completions and embeddings) is read
whole (at most `proxy.max_body` bytes: the model it names decides the node, and a malformed body is answered
here with Ollama's own 400 without touching a node), sent to the node the request pipeline
(`gpurouter.decide.route`) puts first — as it is, or with the options `proxy.options` sets — once a slot of that
runner is free (`proxy.queue`), and its answer streamed back chunk by chunk as it arrives; its last bytes tell
its timings and whether it ended with the node's error line (`proxy.answers`). A node that fails before the
first byte is replaced by the next candidate (at most `proxy.retries` times); one that fails mid-stream ends the
client's stream with an error line in the stream's own format. A client that goes away cancels the request to
the node. Only the configured
node URLs are ever contacted: nothing in a request names a target, redirects are not followed, environment
proxy settings are ignored.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gpurouter import logfmt, render
from gpurouter.cluster.config import Config, PriorityModel, model_key, name_problem
from gpurouter.cluster.ollama import load_request, parse_go_time, redirect_error
from gpurouter.cluster.state import ClusterState
from gpurouter.decide.route.ask import Ask, ask_of
from gpurouter.decide.route.pipeline import Choice, Target, choose
from gpurouter.serve.auth import Authenticator
from gpurouter.serve.gojson import json_error, json_kind
from gpurouter.sizing import eras
from gpurouter.urls import redact
from proxy import options
from proxy.answers import TAIL, last_error, own_fault, timings_of
from proxy.answers import said as _said
from proxy.demand import QUEUE_SPAN, Demand
from proxy.heal import Healer
from proxy.limits import BodyBudget, Refused
from proxy.metrics import ProxyMetrics
from proxy.queue import BUSY, QueueFull, Slots
from proxy.view import ClusterView

log = logging.getLogger(__name__)

# path → (Go request type named in Ollama's errors, dialect, how Ollama words an unknown model)
ROUTED = {
    "/api/generate": ("GenerateRequest", "ollama", "model '{}' not found"),
    "/api/chat": ("ChatRequest", "ollama", "model '{}' not found"),
    "/api/embed": ("EmbedRequest", "ollama", 'model "{}" not found, try pulling it first'),
    "/api/embeddings": ("EmbeddingRequest", "ollama", 'model "{}" not found, try pulling it first'),
    "/api/show": ("ShowRequest", "ollama", "model '{}' not found"),
    "/v1/chat/completions": ("ChatCompletionRequest", "openai", "model '{}' not found"),
    "/v1/completions": ("CompletionRequest", "openai", "model '{}' not found"),
    "/v1/embeddings": ("EmbedRequest", "openai", 'model "{}" not found, try pulling it first'),
}
MANAGEMENT = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs/{digest}")
_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error"}


def _dumps(data: object) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def error(dialect: str, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """`{"error": message}` (Ollama) or `{"error": {"message", "type", ...}}` (OpenAI)."""
    body: dict[str, Any] = {"error": message}
    if dialect == "openai":
        kind = _OPENAI_TYPES.get(status, "api_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status, dumps=_dumps, headers=headers)


def _openai_model(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": m["name"],
        "object": "model",
        "created": int(_timestamp(m.get("modified_at"))),
        "owned_by": m["name"].rsplit("/", 1)[0] if "/" in m["name"] else "library",
    }


def plausible(first: bytes) -> bool:
    """The first bytes of a successful answer look like Ollama's: UTF-8 text starting a JSON object or array, or
    an event stream (a node answering something else, a captive page or a broken proxy, is tried no further)."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(first, final=False).lstrip()
    except UnicodeDecodeError:
        return False
    return not text or text[0] in "{[" or text.startswith(("data:", ":"))


def error_line(content_type: str, message: str) -> bytes | None:
    """The last line that tells a streaming client its answer broke off; None where the format has none."""
    if "ndjson" in content_type:
        return _dumps({"error": message}).encode() + b"\n"
    if "event-stream" in content_type:
        data = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        return b"data: " + _dumps(data).encode() + b"\n\n"
    return None


OPEN_PATHS = frozenset(("/healthz", "/metrics"))  # for probes and Prometheus, as on the optimizer


class _Failed(Exception):
    """A node failed before the first byte of its answer."""

    def __init__(self, kind: str, message: str, text: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.text = text or message


class Proxy:
    """The handlers and what they share; `application()` builds the aiohttp app."""

    def __init__(
        self, config: Config, view: ClusterView, healer: Healer, metrics: ProxyMetrics, auth: Authenticator
    ) -> None:
        self.config = config
        self.settings = config.proxy
        self.view = view
        self.healer = healer
        self.metrics = metrics
        self.auth = auth
        self.urls = {n.name: n.url for n in config.nodes}
        self.bodies = BodyBudget(self.settings.max_body)
        self.session: aiohttp.ClientSession | None = None
        self.slots = Slots(self.settings.max_queue)
        self.demand = Demand(config.demand.window)
        self._pins: set[asyncio.Task[None]] = set()  # keep_alive requests after OpenAI API requests, in flight

    # ------------------------------------------------------------------------------------------ wiring

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate])
        for path in ROUTED:
            app.router.add_post(path, self.routed)
        app.router.add_get("/", self.root)  # GET and HEAD
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/api/v1/route", self.explain)
        app.router.add_post("/api/v1/route", self.explain)
        app.router.add_get("/api/v1/demand", self.demand_rates)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/healthz", self.healthz)
        for path in MANAGEMENT:
            app.router.add_route("*", path, self.management)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.request_timeout, sock_read=self.settings.read_timeout
        )
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            trust_env=False,  # never an environment proxy: only the configured URLs are contacted
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )
        await self.view.start()

    async def _close(self, app: web.Application) -> None:
        await self.view.stop()
        if self.session is not None:
            await self.session.close()

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        dialect = "openai" if request.path.startswith("/v1/") else "ollama"
        if request.path in OPEN_PATHS or self.auth.allows(request.headers.get("Authorization")):
            try:
                return await handler(request)
            except web.HTTPNotFound:
                return error(dialect, 404, f"not found: {request.method} {request.path}")
            except web.HTTPMethodNotAllowed:
                return error(dialect, 405, f"method not allowed: {request.method} {request.path}")
        message = "unauthorized: send Authorization: Bearer <the token of proxy.auth>"
        return error(dialect, 401, message, {"WWW-Authenticate": self.auth.challenge})

    # ------------------------------------------------------------------------------------------ routed

    async def routed(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        type_name, dialect, missing = ROUTED[request.path]
        try:
            raw = await self.bodies.read(request, self.settings.max_body)
        except Refused as refused:  # the rest of the body is not read: the connection ends with the answer
            response = error(dialect, refused.status, str(refused), refused.headers)
            response.force_close()
            return response
        data = _parse(raw, type_name)
        if isinstance(data, str):
            return error(dialect, 400, data)
        model = data.get("model") or (data.get("name") if request.path == "/api/show" else None)
        if not isinstance(model, str) or not model.strip():
            return error(dialect, 400, "model is required")
        if name_problem(model):  # a lone surrogate from a "\ud800" escape could not even be written into an answer
            return error(dialect, 400, "invalid model name")
        ask = ask_of(request.path, data, model) if request.path != "/api/show" else Ask(model_key(model))
        picked = self.choose(ask)
        if picked.heal and self.healer.mode != "off":
            self.healer.ask(picked.model)
            picked = await self._wait(picked, ask, lambda p: p.placement in ("gpu", "cold"))
        elif not picked.targets and picked.waits:  # only loads that evict a busy or priority model: for now
            picked = await self._wait(picked, ask, lambda p: bool(p.targets))
        if not picked.targets:
            return self._nowhere(picked, model, dialect, missing)
        return await self._forward(request, raw, data, picked, ask, dialect, started)

    def choose(self, ask: Ask) -> Choice:
        """The request pipeline over the last poll and the proxy's own traffic; per-node scores at debug level."""
        state = self.view.state
        assert state is not None  # the first poll ends before the server listens
        traffic = self.view.ledger.traffic()
        picked = choose(state, ask, traffic, time.time(), None, self.settings.max_queue_seconds, self.view.memo)
        if log.isEnabledFor(logging.DEBUG):
            scores = " ".join(
                f"{t.node}:{t.score:.2f}[" + ",".join(f"{k}={v:.2f}" for k, v in t.parts.items()) + "]"
                for t in picked.targets
            )
            logfmt.log_event(log, logging.DEBUG, "proxy.route", model=picked.model, reason=picked.reason, scores=scores)
        return picked

    async def _wait(self, picked: Choice, ask: Ask, done: Callable[[Choice], bool]) -> Choice:
        """Choose again after each poll until `done` (the model on GPU after the heal; a place that evicts
        nothing protected once a busy model is idle), at most `proxy.wait_for_gpu` seconds: the request goes
        where things are then, not where they were."""
        deadline = time.monotonic() + self.settings.wait_for_gpu
        while not done(picked) and (left := deadline - time.monotonic()) > 0:
            if not await self.view.next_refresh(left):
                break
            picked = self.choose(ask)
        return picked

    def _nowhere(self, picked: Choice, model: str, dialect: str, missing: str) -> web.Response:
        """503 naming the nodes when the model is installed where it cannot be served now (down, failing, in
        maintenance: last-known installed lists count), or only loadable by evicting a protected model; 404
        when no node has ever listed it."""
        state = self.view.state
        assert state is not None
        listed = sorted(n for n, models in self.view.ledger.installed.items() if picked.model in models)
        if picked.dropped:
            status = 503
            message = f"{picked.model} would load only by evicting a priority or busy model: "
            message += "; ".join(f"{node}: {why}" for node, why in picked.dropped)
        elif listed:
            status = 503
            message = f"{picked.model} is installed only on nodes that are down, failing or in maintenance: "
            message += ", ".join(f"{n} ({self._condition(state, n)})" for n in listed)
        else:
            status, message = 404, missing.format(model)
        label = picked.model if listed or picked.model in state.known_models() else "unknown"
        self.metrics.requests.labels(node="", model=label, placement="none", code=str(status)).inc()
        return error(dialect, status, message)

    def _condition(self, state: ClusterState, name: str) -> str:
        node = state.node(name)
        if node is None or not node.up:
            return "down"
        return "in maintenance" if node.config.maintenance else "failing"

    async def _forward(
        self,
        request: web.Request,
        raw: bytes,
        data: dict[str, Any],
        picked: Choice,
        ask: Ask,
        dialect: str,
        started: float,
    ) -> web.StreamResponse:
        failures: list[tuple[str, str, str]] = []  # (node, kind, what it said)
        attempts = picked.targets[: 1 + self.settings.retries]
        ledger = self.view.ledger
        priority = self.config.priority(picked.model)
        for i, target in enumerate(attempts):
            if i:
                self.metrics.retries.inc()
            node, key = target.node, (target.node, picked.model)
            pin = options.pin_for(self.view.state, picked.model, node, priority)
            body = options.body_for(request.path, raw, data, target, pin)
            cold = target.placement == "cold" and request.path != "/api/show"
            ledger.begin(node, picked.model, cold, self.view.state)
            self.demand.flying(picked.model, 1, time.time())
            gauge = self.metrics.in_flight.labels(node=node)
            gauge.inc()
            queued = False
            uncached = max(0, ask.prompt_tokens - target.cached_tokens)
            ledger.prefill[node] += uncached  # queued prefill: waiting here for a slot, or being read by the node
            try:
                try:
                    try:
                        queued = await self._queue(key, target)
                    except QueueFull:
                        self.metrics.queue_rejected.labels(node=node, model=picked.model).inc()
                        self.metrics.requests.labels(node=node, model=picked.model, placement="none", code="503").inc()
                        return error(dialect, 503, BUSY)
                    upstream, first = await self._open_upstream(node, request.path, body, last=i == len(attempts) - 1)
                except _Failed as failed:
                    self._failed(node, picked.model, failed.kind, str(failed), retry=i < len(attempts) - 1)
                    failures.append((node, failed.kind, failed.text))
                    continue
                finally:
                    ledger.prefill[node] -= uncached
                    if ledger.prefill[node] <= 0:
                        del ledger.prefill[node]
                if upstream.status >= 500:
                    self._last_error(node, picked.model, first, failures)
                elif upstream.status == 200 and ask.blocks:
                    ledger.prompts.sent(node, picked.model, ask.blocks, target.slots)
                if target.adjusted:
                    self._adjusted(node, picked.model, ask, target)
                response = await self._relay(request, upstream, first, target, picked.model, started)
                if ask.openai and pin is not None and upstream.status == 200:
                    self._repin(node, picked.model, pin, ask.embedding)
                return response
            finally:
                if queued:
                    self.slots.release(key)
                gauge.dec()
                ledger.end(node, picked.model)
                self.demand.flying(picked.model, -1, time.time())
        self.metrics.requests.labels(node="", model=picked.model, placement="none", code="503").inc()
        said = "; ".join(f"{node}: {text}" for node, _, text in failures)
        return error(dialect, 503, f"no node could serve {picked.model}: {said}")

    def _repin(self, node: str, model: str, pin: PriorityModel, embedding: bool) -> None:
        """After an OpenAI API request (it cannot carry a keep_alive: Ollama gave the runner its default), ask
        the pinned copy again with its own context and the configured keep_alive: no reload, the pin is back."""
        there = self.view.state.node(node) if self.view.state is not None else None
        copy = there.loaded_model(model) if there is not None else None
        ctx = copy.context_length if copy is not None else None
        path, body = load_request(model, num_ctx=ctx or None, keep_alive=pin.keep_alive, embedding=embedding)
        task = asyncio.get_running_loop().create_task(self._send_pin(node, path, body))
        self._pins.add(task)
        task.add_done_callback(self._pins.discard)

    async def _send_pin(self, node: str, path: str, body: dict[str, Any]) -> None:
        assert self.session is not None
        try:
            async with self.session.post(self.urls[node] + path, json=body, allow_redirects=False) as reply:
                outcome = "ok" if reply.status == 200 else f"HTTP {reply.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        level = logging.DEBUG if outcome == "ok" else logging.WARNING
        logfmt.log_event(log, level, "proxy.repin", node=node, model=body["model"], outcome=outcome)

    async def _queue(self, key: tuple[str, str], target: Target) -> bool:
        """Wait here for a slot of the runner (QueueFull past `proxy.max_queue`); True once one is ours."""
        depth = self.metrics.queue_depth.labels(node=key[0], model=key[1])
        for counter in (self.metrics.queue_rejected, self.metrics.options_kept):  # 0, not nothing, for increase()
            counter.labels(node=key[0], model=key[1])
        depth.inc()
        self.demand.waiting(key[1], 1, time.time())
        waited = time.monotonic()
        try:
            await self.slots.acquire(key, target.slots)
        finally:
            depth.dec()
            self.demand.waiting(key[1], -1, time.time())
        self.metrics.queue_wait.labels(node=key[0], model=key[1]).observe(time.monotonic() - waited)
        return True

    def _failed(self, node: str, model: str, kind: str, reason: str, retry: bool) -> None:
        """A real failure of `node` for `model`: counted, logged, and the (node, model) goes last for a while (the
        node, when it refused the connection)."""
        self.metrics.upstream_errors.labels(node=node, kind=kind).inc()
        logfmt.log_event(
            log, logging.WARNING, "proxy.upstream", node=node, model=model, kind=kind, reason=reason, retry=retry
        )
        self.view.ledger.failed(node, model, whole_node=kind == "refused")

    def _last_error(self, node: str, model: str, first: bytes, failures: list[tuple[str, str, str]]) -> None:
        """The last node tried answered 5xx: the request's own fault when every node said the same (those are
        absolved), else a failure of this one too."""
        text = _said(first)
        if failures and all(kind == "server_error" and said == text for _, kind, said in failures):
            for name, _, _ in failures:
                self.view.ledger.absolved(name, model)
        elif not own_fault(text):
            self._failed(node, model, "server_error", text, retry=False)

    def _adjusted(self, node: str, model: str, ask: Ask, target: Target) -> None:
        asked = ", ".join(f"{k}={v}" for k, v in ask.runner.items())
        served = ", ".join(f"{k}={v}" for k, v in target.sets.items()) or "the runner's"
        self.metrics.options_kept.labels(node=node, model=model).inc()
        logfmt.log_event(
            log, logging.WARNING, "proxy.options", node=node, model=model, asked=asked, served=served, why=target.why
        )

    async def _open_upstream(
        self, node: str, path: str, raw: bytes, last: bool
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """The node's answer and its first bytes; _Failed when it fails before them (a 5xx answer counts as a
        failure unless it is the request's own fault or no other node is left to try)."""
        assert self.session is not None
        url = self.urls[node] + path
        try:
            upstream = await self.session.post(
                url, data=raw, headers={"Content-Type": "application/json"}, allow_redirects=False
            )
        except aiohttp.ClientConnectorError as exc:
            raise _Failed("refused", f"cannot connect ({exc.os_error.strerror or exc})") from None
        except asyncio.TimeoutError:
            raise _Failed("timeout", "no answer in time") from None
        except aiohttp.ClientError as exc:
            raise _Failed("reset", f"{type(exc).__name__}: {exc}") from None
        try:
            first = await upstream.content.readany()
        except asyncio.TimeoutError:
            upstream.close()
            raise _Failed("timeout", f"no answer within {self.settings.read_timeout:g}s") from None
        except aiohttp.ClientError:
            upstream.close()
            raise _Failed("reset", "connection to the node was lost before the answer") from None
        except BaseException:
            upstream.close()
            raise
        redirect = redirect_error(redact(url), upstream.status, upstream.headers.get("Location"))
        if redirect is not None:  # a node error wherever it comes from: never relayed, never followed
            upstream.close()
            raise _Failed("redirect", str(redirect))
        if upstream.status >= 500 and not last and not own_fault(_said(first)):
            upstream.close()
            raise _Failed("server_error", f"HTTP {upstream.status} {_said(first)}", _said(first))
        if upstream.status == 200 and not last and not plausible(first):
            upstream.close()
            raise _Failed("garbage", "an answer that is not Ollama's JSON")
        return upstream, first

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        first: bytes,
        target: Target,
        model: str,
        started: float,
    ) -> web.StreamResponse:
        """Send the node's answer on as it arrives. The upstream connection is closed unless read to its end,
        so a client that goes away (the handler is cancelled, or a write fails) cancels the node's work. The
        answer's last bytes tell its timings, and whether it ended with the node's error line."""
        node, sent_at = target.node, time.time()
        content_type = upstream.headers.get("Content-Type", "application/json")
        headers = {"Content-Type": content_type, "X-GPU-Router-Node": node}
        if target.adjusted:
            served = ", ".join(f"{k}={v}" for k, v in target.sets.items()) or "the runner's options"
            headers["X-GPU-Router-Options"] = _latin1(f"served with {served}: {target.why}")
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        complete = False
        tail = first[-TAIL:]
        try:
            await response.prepare(request)
            if first:
                await response.write(first)
            self.metrics.first_byte.labels(model=model).observe(time.monotonic() - started)
            broken: str | None = None
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    timeout = isinstance(exc, asyncio.TimeoutError)
                    broken = "no bytes in time" if timeout else "connection to the node was lost"
                    break
                if not chunk:
                    complete = True
                    break
                tail = (tail + chunk)[-TAIL:]
                await response.write(chunk)
            if broken is not None:
                self._failed(node, model, "mid_stream", broken, retry=False)
                line = error_line(content_type, f"gpu-router proxy: node {node} failed mid-stream ({broken})")
                if line is None or response.content_length is not None:
                    if request.transport is not None:
                        request.transport.close()  # the client sees a short body: never a silent success
                    return response
                await response.write(line)
            await response.write_eof()
        finally:
            if complete:
                upstream.release()
            else:
                upstream.close()
            placement = target.placement
            if upstream.status == 200 and request.path != "/api/show":  # a client gone after the error line too
                placement = self._learn(node, model, target, tail, content_type, sent_at, complete) or placement
            self.metrics.requests.labels(node=node, model=model, placement=placement, code=str(upstream.status)).inc()
            self.metrics.duration.labels(model=model).observe(time.monotonic() - started)
        return response

    def _learn(
        self, node: str, model: str, target: Target, tail: bytes, content_type: str, sent: float, whole: bool
    ) -> str | None:
        """What an answer tells: the node's error line (a failure of that node) and, when `whole`, its timings
        (speed, cached tokens, demand) and where the model really ran (a poll taken after it was sent)."""
        said = last_error(tail, content_type)
        if said is not None:
            self._failed(node, model, "error_line", said, retry=False)
        if not whole:
            return None
        timings = timings_of(tail)
        cold = target.placement == "cold"
        realised = self.view.ledger.answered(node, model, timings, target.cached_tokens, cold)
        self.metrics.cached_predicted.labels(node=node, model=model).inc(target.cached_tokens)
        self.metrics.cached_realised.labels(node=node, model=model).inc(realised)
        self.metrics.prompt_tokens.labels(node=node, model=model).inc(timings.prompt_tokens)
        self.metrics.generated_tokens.labels(node=node, model=model).inc(timings.generated)
        self.demand.record(model, node, timings.prompt_tokens, timings.generated, time.time())
        state = self.view.state
        there = state.node(node) if state is not None and state.taken_at > sent else None
        copy = there.loaded_model(model) if there is not None else None
        if copy is None:
            return None
        return "gpu" if copy.fully_on_gpu else ("partial" if copy.size_vram > 0 else "cpu")

    # ------------------------------------------------------------------------------------------ cluster-wide

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running", content_type="text/plain", charset="utf-8")

    async def version(self, request: web.Request) -> web.Response:
        """The oldest version among the nodes that are up: what a client can count on wherever it lands."""
        state = self.view.state
        assert state is not None
        versions = [n.version for n in state.nodes if n.up and n.version]
        if not versions:
            return error("ollama", 503, "no node is up")
        return web.json_response(
            {"version": min(versions, key=lambda v: eras.parse_version(v) or (1 << 30,))}, dumps=_dumps
        )

    async def _gather(self, path: str) -> list[dict[str, Any]]:
        """GET `path` from every node that is up and not in maintenance, at once; answers that fail are left out."""
        assert self.session is not None and self.view.state is not None
        live = [n.name for n in self.view.state.nodes if n.up and not n.config.maintenance]
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout)

        async def one(node: str) -> dict[str, Any] | None:
            assert self.session is not None
            try:
                async with self.session.get(self.urls[node] + path, timeout=timeout, allow_redirects=False) as reply:
                    body = await reply.json(content_type=None) if reply.status == 200 else None
                    return body if isinstance(body, dict) else None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return None

        return [b for b in await asyncio.gather(*(one(n) for n in live)) if b is not None]

    async def _installed(self) -> list[dict[str, Any]]:
        """/api/tags over the nodes that are up: one entry per model, newest first."""
        merged: dict[str, dict[str, Any]] = {}
        for answer in await self._gather("/api/tags"):
            for entry in answer.get("models") or []:
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    merged.setdefault(entry["name"], entry)
        return sorted(merged.values(), key=lambda m: _timestamp(m.get("modified_at")), reverse=True)

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": await self._installed()}, dumps=_dumps)

    async def ps(self, request: web.Request) -> web.Response:
        """/api/ps over the nodes that are up: one entry per model name, as Ollama answers (its best copy: the
        most on GPU, then the longest expiry), each as its node shapes it, the longest expiry first. Per-node
        detail is in `gpu-router models` and the optimizer's API."""
        best: dict[str, dict[str, Any]] = {}
        for answer in await self._gather("/api/ps"):
            for entry in answer.get("models") or []:
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    name = entry["name"]
                    if name not in best or _better(entry, best[name]):
                        best[name] = entry
        entries = sorted(best.values(), key=lambda m: _timestamp(m.get("expires_at")), reverse=True)
        return web.json_response({"models": entries}, dumps=_dumps)

    async def explain(self, request: web.Request) -> web.Response:
        """GET /api/v1/route?model=&prompt= or POST it a generate/chat body: the pipeline's choice for it now,
        with every node's scores (nothing is sent to a node)."""
        if request.method == "POST":
            try:
                raw = await self.bodies.read(request, self.settings.max_body)
            except Refused as refused:
                response = error("ollama", refused.status, str(refused), refused.headers)
                response.force_close()
                return response
            data = _parse(raw, "ChatRequest")
            if isinstance(data, str):
                return error("ollama", 400, data)
        else:
            data = {"model": request.query.get("model"), "prompt": request.query.get("prompt", "")}
        model = data.get("model")
        if not isinstance(model, str) or not model.strip():
            return error("ollama", 400, "model is required")
        return web.json_response(render.route_choice(self.choose(ask_of("/api/chat", data, model))), dumps=_dumps)

    async def demand_rates(self, request: web.Request) -> web.Response:
        """Per model: requests and tokens per second and the mean in flight over the last window, the mean
        waiting in the queue lately, and now, the requests in flight per node and those waiting (what the
        optimizer's placement from demand reads)."""
        rates = self.demand.rates(time.time())
        for (node, model), n in self.view.ledger.flights.items():
            row = rates.setdefault(model, self.demand.empty())
            row.setdefault("in_flight", {})[node] = n  # type: ignore[union-attr]
        for model, row in rates.items():
            row.setdefault("in_flight", {})
            row["waiting"] = self.slots.waiting(model)
        answer = {"window_seconds": self.demand.window, "queue_seconds": QUEUE_SPAN, "models": rates}
        return web.json_response(answer, dumps=_dumps)

    async def models(self, request: web.Request) -> web.Response:
        rows = [_openai_model(m) for m in await self._installed()]
        return web.json_response({"object": "list", "data": rows}, dumps=_dumps)

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}: one model of the cluster, as OpenAI's API shapes it."""
        wanted = model_key(request.match_info["model"])
        for m in await self._installed():
            if model_key(m["name"]) == wanted:
                return web.json_response(_openai_model(m), dumps=_dumps)
        return error("openai", 404, f"model '{request.match_info['model']}' not found")

    async def management(self, request: web.Request) -> web.Response:
        nodes = ", ".join(f"{n.name} ({redact(n.url)})" for n in self.config.nodes if not n.maintenance)
        action = request.path.split("/")[2]
        message = f"gpu-router proxy does not {action} models: send /api/{action} to a node itself: {nodes}"
        return error("ollama", 400, message)

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.show_demand(self.demand.rates(time.time()))
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        state = self.view.state
        up = sum(1 for n in state.nodes if n.up) if state is not None else 0
        age = time.time() - state.taken_at if state is not None else None
        return web.json_response({"status": "ok", "nodes_up": up, "nodes": len(self.config.nodes), "view_age": age})


def _parse(raw: bytes, type_name: str) -> dict[str, Any] | str:
    """The JSON object, or the message of Ollama's 400 for it."""
    if not raw.strip():
        return "missing request body"
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        return json_error(exc)
    except (ValueError, RecursionError):
        return "invalid JSON"
    if not isinstance(data, dict):
        return f"json: cannot unmarshal {json_kind(data)} into Go value of type api.{type_name}"
    return data


def _better(entry: dict[str, Any], other: dict[str, Any]) -> bool:
    """The copy more on GPU, then the one that stays longer."""

    def rank(e: dict[str, Any]) -> tuple[float, float]:
        size, vram = e.get("size"), e.get("size_vram")
        share = vram / size if isinstance(size, int) and isinstance(vram, int) and size > 0 else 0.0
        return (share, _timestamp(e.get("expires_at")))

    return rank(entry) > rank(other)


def _latin1(text: str) -> str:
    """A header value HTTP can carry."""
    return text.encode("latin-1", errors="replace").decode("latin-1")


def _timestamp(value: object) -> float:
    try:
        parsed = parse_go_time(value)
    except (TypeError, ValueError):
        return 0.0
    return parsed.timestamp() if parsed is not None else 0.0
