"""The Ollama HTTP API of one simulated node (reference/ollama-api.md §1–§3, classic era)."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from gpurouter.serve.gojson import json_error, json_kind
from simulator import eras, fields, openaiapi, showinfo
from simulator.catalog import ModelSpec
from simulator.fleet import display_name
from simulator.generation import RUNNER_GONE, Answer, Generation, answer
from simulator.gobind import cannot_unmarshal
from simulator.gotypes import go_decoded, go_quote, go_time, parse_keep_alive
from simulator.httpserver import Request, Response, Stream, error_response, json_response, text_response
from simulator.options import merge_options, num_predict
from simulator.prompt import render_chat, render_generate, tokenize
from simulator.scheduler import LoadRequest, Runner, SchedulerError

if TYPE_CHECKING:
    from simulator.node import Installed, SimNode

NDJSON = "application/x-ndjson"
GARBAGE = b'{"models":[{"name":"\xff\xfe<html>502 Bad Gateway'  # what the `garbage` fault answers
_OPTIONS = "map[string]interface {}"
_ANY = "any"  # a field decoded as json.RawMessage or interface{}: any JSON value


class _Reject(Exception):
    """Ends a request early with this response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _matches(value: object, go_type: str) -> bool:
    checks = {
        "string": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "[]int": lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
        "[]string": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "[]api.Message": lambda v: isinstance(v, list),
        _OPTIONS: lambda v: isinstance(v, dict),
    }
    return go_type not in checks or checks[go_type](value)


def _no_constant(name: str) -> float:
    """NaN and Infinity are not JSON to Go."""
    raise ValueError(f"invalid character '{name[0]}' looking for beginning of value")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"json: cannot unmarshal number {text} into Go value of type float64")
    return value


def _cannot(value: object, field: str, go_type: str) -> Response:
    """encoding/json's error for a value of the wrong kind in a struct field."""
    return error_response(400, cannot_unmarshal(value, field, go_type))


def decode(request: Request, type_name: str, fields: Mapping[str, str]) -> dict:
    """The JSON body bound as gin's ShouldBindJSON would do it into api.`type_name`; _Reject on errors."""
    if not request.body.strip():
        raise _Reject(error_response(400, "missing request body"))
    try:
        text = request.body.decode("utf-8", errors="replace")  # Go keeps invalid UTF-8 as U+FFFD
        data = go_decoded(json.loads(text, parse_constant=_no_constant, parse_float=_finite))
    except json.JSONDecodeError as exc:
        raise _Reject(error_response(400, json_error(exc))) from None
    except ValueError as exc:  # NaN, Infinity, or a number beyond float64
        raise _Reject(error_response(400, str(exc))) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _Reject(
            error_response(400, f"json: cannot unmarshal {json_kind(data)} into Go value of type api.{type_name}")
        )
    for key, go_type in fields.items():
        value = data.get(key)
        if value is not None and not _matches(value, go_type):
            raise _Reject(_cannot(value, f"{type_name}.{key}", go_type))
    if data.get("keep_alive") is not None:
        try:
            data["keep_alive"] = parse_keep_alive(data["keep_alive"])
        except ValueError as exc:
            raise _Reject(error_response(400, str(exc))) from None
    return data


def details(spec: ModelSpec) -> dict:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": spec.family,
        "families": list(spec.families) if spec.families is not None else None,
        "parameter_size": spec.parameter_size,
        "quantization_level": spec.quantization_level,
    }


def _unit(vector: list[float]) -> list[float]:
    """L2-normalized, rounded like a float32."""
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [float(f"{x / norm:.8g}") for x in vector]


def fake_vector(key: str, text: str, dimension: int) -> list[float]:
    """A deterministic unit vector for `text`, different per model."""
    rng = random.Random(hashlib.sha256(f"{key}\0{text}".encode()).digest())
    return _unit([rng.gauss(0.0, 1.0) for _ in range(dimension)])


def _line(data: dict) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _metrics(**values: int) -> dict:
    """Metric fields in ns/counts; zeros omitted (omitempty)."""
    return {key: value for key, value in values.items() if value}


class OllamaApi:
    """Request → Response for one node; faults and latency are applied before routing."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.generation = Generation(node.spec, node.version, node.sleep)
        self._routes = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/generate": {"POST": self._generate},
            "/api/chat": {"POST": self._chat},
            "/api/embed": {"POST": self._embed},
            "/api/embeddings": {"POST": self._embeddings},
            "/v1/chat/completions": {"POST": lambda r: openaiapi.chat(self._dispatch, r)},
            "/v1/completions": {"POST": lambda r: openaiapi.completions(self._dispatch, r)},
            "/v1/embeddings": {"POST": lambda r: openaiapi.embeddings(self._dispatch, r)},
            "/v1/models": {"GET": lambda r: openaiapi.models(self._model_dates)},
        }

    def __call__(self, request: Request) -> Response:
        faults = self.node.faults()
        delay = self.node.spec.latency_ms + faults.get("slow", {}).get("latency_ms", 0)
        if delay and not self.node.sleep(delay / 1000):
            return error_response(503, "server shutting down")
        if request.path.startswith(("/api/", "/v1/")):
            if "error" in faults:
                return error_response(500, "internal error")
            if "garbage" in faults:
                return Response(200, GARBAGE)
        return self._dispatch(request)

    def _dispatch(self, request: Request) -> Response:
        """The endpoint's answer, faults and latency already applied."""
        route = self._routes.get(request.path)
        if route is None:
            return text_response(404, "404 page not found")
        handler = route.get(request.method)
        if handler is None:
            return text_response(405, "405 method not allowed")
        try:
            return handler(request)
        except _Reject as reject:
            return reject.response

    # -- helpers

    def _now(self) -> str:
        return go_time(self.node.clock(), utc=True)

    def _schedule(self, installed: Installed, body: dict) -> tuple[Runner, int]:
        """Merge options and get a runner (loading the model if needed); (runner, ns spent)."""
        started = time.monotonic()
        try:
            options = merge_options(
                self.node.spec.default_context,
                installed.spec.default_num_ctx,
                body.get("options") or {},
                node_ctx_set=self.node.spec.context_length is not None,
            )
        except ValueError as exc:
            raise _Reject(error_response(500, str(exc))) from None
        request = LoadRequest(installed.name, installed.spec, options, body.get("keep_alive"))
        try:
            runner = self.node.scheduler.acquire(request)
        except SchedulerError as exc:
            raise _Reject(error_response(exc.status, str(exc))) from None
        return runner, int((time.monotonic() - started) * 1e9)

    def _require(self, installed: Installed, capability: str, model: str, what: str) -> None:
        """400 for a missing capability: `"x" does not support chat` where the handler checks it itself (generate,
        chat, embedding), the scheduler's `<full name> does not support tools` for tools and insert."""
        if capability not in installed.spec.capabilities:
            shown = self._full_name(installed) if capability in ("tools", "insert") else go_quote(model)
            raise _Reject(error_response(400, f"{shown} does not support {what}"))

    @staticmethod
    def _full_name(installed: Installed) -> str:
        """The name the scheduler uses: registry.ollama.ai/library/llama3.1:8b."""
        path = installed.name if "/" in installed.name else f"library/{installed.name}"
        return path if path.count("/") >= 2 else f"registry.ollama.ai/{path}"

    def _check_think(self, installed: Installed, model: str, body: dict, request_type: str) -> None:
        """400 for a `think` value of the wrong type, or for thinking asked of a model without it."""
        error = fields.think_error(body.get("think"), request_type, self.node.version)
        if error is not None:
            raise _Reject(error_response(400, error))
        think = body.get("think") if self.node.version >= fields.THINK_KNOWN else None
        if fields.wants_thinking(think) and "thinking" not in installed.spec.capabilities:
            refused = fields.thinking_refused(model, self._full_name(installed), self.node.version)
            raise _Reject(error_response(400, refused))

    def _respond(
        self,
        runner: Runner,
        rendered: str,
        reply: Answer,
        stream: bool,
        chunk: Callable[[str, tuple[dict, ...]], dict],
        final: Callable[[dict, str, tuple[dict, ...]], dict],
    ) -> Response:
        """NDJSON stream (errors as a last line) or one JSON object (errors as 500) of one completion.

        Takes the runner's free slot with the longest cached prefix first (the rest wait in order); the slot
        keeps the prompt and the answer in its cache, and it and the runner are released at the end. A tool
        call is sent as one chunk before the final one. The node's traffic counts the request as served,
        failed, or cancelled (the client went away before the end).
        """
        scheduler = self.node.scheduler
        traffic = self.node.traffic
        traffic.begin()
        prompt = tokenize(rendered)
        lease = runner.slots.take(prompt, lambda: scheduler.serving(runner))
        if lease is None:
            scheduler.release(runner)
            traffic.end("failed")
            return error_response(500, RUNNER_GONE)
        outcome = ["cancelled"]
        generated: list[str] = []

        def finish() -> None:
            runner.slots.give_back(lease, Generation.cached(rendered, generated, runner.context_length))
            scheduler.release(runner)
            traffic.end(outcome[0])

        def events() -> Iterator[dict]:
            for event in self.generation.run(runner, lease, prompt, reply):
                if "token" in event:
                    generated.append(event["token"])
                yield event

        if stream:

            def lines() -> Iterator[bytes]:
                for event in events():
                    if "error" in event:
                        data = {"error": event["error"]}
                        outcome[0] = "failed"
                    elif "token" in event:
                        if reply.tool_calls:
                            continue
                        data = chunk(event["token"], ())
                    else:
                        if reply.tool_calls:
                            yield _line(chunk("", reply.tool_calls))
                        data = final(event, "", ())
                        outcome[0] = "served"
                    yield _line(data)

            return Response(200, Stream(lines(), finish), NDJSON)
        try:
            *_, last = list(events())
            outcome[0] = "failed" if "error" in last else "served"
        finally:
            finish()
        if "error" in last:
            return error_response(500, last["error"])
        return json_response(200, final(last, reply.text, reply.tool_calls))

    @staticmethod
    def _final_metrics(event: dict, started: float, load_ns: int) -> dict:
        return _metrics(
            total_duration=int((time.monotonic() - started) * 1e9),
            load_duration=load_ns,
            prompt_eval_count=event["prompt_eval_count"],
            prompt_eval_duration=event["prompt_eval_duration"],
            eval_count=event["eval_count"],
            eval_duration=event["eval_duration"],
        )

    def _resolve(self, model: str, status: int, message: str) -> Installed:
        installed = self.node.resolve(model) if model else None
        if installed is None:
            raise _Reject(error_response(status, message))
        return installed

    # -- endpoints

    def _root(self, request: Request) -> Response:
        return text_response(200, "Ollama is running")

    def _version(self, request: Request) -> Response:
        return json_response(200, {"version": self.node.spec.version})

    def _tags(self, request: Request) -> Response:
        models = sorted(self.node.installed, key=lambda m: -int(m.modified_at))
        return json_response(
            200,
            {"models": [self._tag(m) for m in models]},
        )

    def _model_dates(self) -> list[tuple[str, float]]:
        return [(m.name, m.modified_at) for m in sorted(self.node.installed, key=lambda m: -int(m.modified_at))]

    def _tag(self, m: Installed) -> dict:
        """One /api/tags entry; v0.30+ adds the capabilities and the trained context and embedding length."""
        entry = {
            "name": m.name,
            "model": m.name,
            "modified_at": go_time(m.modified_at),
            "size": m.spec.tags_size,
            "digest": m.spec.digest,
            "details": details(m.spec),
        }
        if self.node.version >= (0, 30, 0):
            arch = m.spec.arch
            entry["details"].update(context_length=arch.context_length, embedding_length=arch.embedding_length)
            entry["capabilities"] = list(m.spec.capabilities)
        return entry

    def _ps(self, request: Request) -> Response:
        with_context = self.node.version >= (0, 10, 0)
        models = []
        for view in self.node.scheduler.snapshot():
            if view.loading and self.node.era == eras.LLAMA_SERVER:
                continue  # listed once llama-server reports healthy
            entry = {
                "name": view.name,
                "model": view.name,
                "size": view.size,
                "digest": view.spec.digest,
                "details": details(view.spec),
                "expires_at": go_time(view.expires_at),
                "size_vram": view.size_vram,
            }
            if with_context:
                entry["context_length"] = view.context_length
            models.append(entry)
        return json_response(200, {"models": models})

    def _show(self, request: Request) -> Response:
        fields = {"model": "string", "name": "string", "system": "string", "template": "string", "verbose": "bool"}
        body = decode(request, "ShowRequest", {**fields, "options": _OPTIONS})
        model = body.get("model") or body.get("name") or ""
        if not model:
            return error_response(400, "model is required")
        shown = display_name(model) if self.node.era == eras.LLAMA_SERVER else model
        installed = self._resolve(model, 404, f"model '{shown}' not found")
        spec = installed.spec
        verbose = body.get("verbose") is True
        info = spec.model_info(verbose=verbose)
        if not verbose and self.node.era == eras.LLAMA_SERVER:  # v0.30+ drops the values of non-empty arrays
            info = {k: (None if isinstance(v, list) and k.startswith("tokenizer.") else v) for k, v in info.items()}
        response = {
            "license": showinfo.license_text(spec),
            "modelfile": showinfo.modelfile(spec, installed.name),
            "parameters": showinfo.parameters(spec),
            "template": showinfo.template(spec),
            "details": details(spec),
            "model_info": info,
            "tensors": list(spec.tensors),
            "capabilities": list(spec.capabilities),
            "modified_at": go_time(installed.modified_at),
        }
        return json_response(200, {k: v for k, v in response.items() if v != ""})

    def _generate(self, request: Request) -> Response:
        started = time.monotonic()
        body = decode(
            request,
            "GenerateRequest",
            {
                "model": "string", "prompt": "string", "suffix": "string", "system": "string",
                "template": "string", "context": "[]int", "stream": "bool", "raw": "bool",
                "images": "[]string", "options": _OPTIONS,
            },
        )  # fmt: skip
        model, prompt = body.get("model") or "", body.get("prompt") or ""
        installed = self._resolve(model, 404, f"model '{model}' not found")
        if not prompt and body.get("keep_alive") == 0:
            self.node.scheduler.expire(installed.spec)
            reply = {"model": model, "created_at": self._now(), "response": "", "done": True, "done_reason": "unload"}
            return json_response(200, reply)
        raw = bool(body.get("raw"))
        if raw and (body.get("template") or body.get("system") or body.get("context")):
            return error_response(400, "raw mode does not support template, system, or context")
        self._check_think(installed, model, body, "GenerateRequest")
        self._require(installed, "completion", model, "generate")
        if body.get("suffix"):
            self._require(installed, "insert", model, "insert")
        runner, load_ns = self._schedule(installed, body)
        if not prompt:
            self.node.scheduler.release(runner)
            reply = {"model": model, "created_at": self._now(), "response": "", "done": True, "done_reason": "load"}
            return json_response(200, reply)
        self._check_format(runner, body.get("format"))
        rendered = render_generate(prompt, str(body.get("system") or ""), str(body.get("suffix") or ""), raw)
        predict = num_predict(body.get("options") or {})
        reply = answer(rendered, predict, runner.context_length, body.get("format"))

        def chunk(word: str, calls: tuple[dict, ...]) -> dict:
            return {"model": model, "created_at": self._now(), "response": word, "done": False}

        def final(event: dict, text: str, calls: tuple[dict, ...]) -> dict:
            reply = {"model": model, "created_at": self._now(), "response": text, "done": True}
            reply["done_reason"] = event["done_reason"]
            if not raw:
                seed = hashlib.sha256(rendered.encode()).digest()
                total = event["prompt_eval_count"] + event["eval_count"]
                reply["context"] = [1 + (seed[i % 32] * 131 + i * 7919) % 128000 for i in range(total)]
            return {**reply, **self._final_metrics(event, started, load_ns)}

        return self._respond(runner, rendered, reply, body.get("stream") is not False, chunk, final)

    def _chat(self, request: Request) -> Response:
        started = time.monotonic()
        body = decode(
            request,
            "ChatRequest",
            {"model": "string", "messages": "[]api.Message", "stream": "bool", "options": _OPTIONS},
        )
        model = body.get("model") or ""
        messages = body.get("messages") or []
        invalid = fields.message_error(messages) or fields.tools_error(body.get("tools"))
        if invalid is not None:
            return error_response(400, invalid)
        if not model:
            return error_response(400, "model is required")
        missing = f"model '{model}' not found"
        if self.node.version < (0, 11, 0):
            missing = f'model "{model}" not found, try pulling it first'
        installed = self._resolve(model, 404, missing)
        if not messages and body.get("keep_alive") == 0:
            self.node.scheduler.expire(installed.spec)
            reply = {"model": model, "created_at": self._now(), "message": {"role": "assistant", "content": ""}}
            return json_response(200, {**reply, "done": True, "done_reason": "unload"})
        self._check_think(installed, model, body, "ChatRequest")
        self._require(installed, "completion", model, "chat")
        tools = body.get("tools") or []
        if tools:
            self._require(installed, "tools", model, "tools")
        runner, load_ns = self._schedule(installed, body)
        if not messages:
            self.node.scheduler.release(runner)
            reply = {"model": model, "created_at": self._now(), "message": {"role": "assistant", "content": ""}}
            return json_response(200, {**reply, "done": True, "done_reason": "load"})
        self._check_format(runner, body.get("format"))
        rendered = render_chat(messages, tools)
        predict = num_predict(body.get("options") or {})
        reply = answer(rendered, predict, runner.context_length, body.get("format"), tools, messages[-1])

        def message(text: str, calls: tuple[dict, ...]) -> dict:
            said: dict = {"role": "assistant", "content": text}
            return {**said, "tool_calls": list(calls)} if calls else said

        def chunk(word: str, calls: tuple[dict, ...]) -> dict:
            return {"model": model, "created_at": self._now(), "message": message(word, calls), "done": False}

        def final(event: dict, text: str, calls: tuple[dict, ...]) -> dict:
            reply = {"model": model, "created_at": self._now(), "message": message(text, calls), "done": True}
            return {**reply, "done_reason": event["done_reason"], **self._final_metrics(event, started, load_ns)}

        return self._respond(runner, rendered, reply, body.get("stream") is not False, chunk, final)

    def _pass_slot(self, runner: Runner) -> bool:
        """Wait in order for a slot of an embedding runner and give it back (embeddings cache nothing)."""
        lease = runner.slots.take((), lambda: self.node.scheduler.serving(runner))
        if lease is not None:
            runner.slots.give_back(lease, ())
        return lease is not None

    def _check_format(self, runner: Runner, value: object) -> None:
        """500 for a `format` llama-server refuses (the runner is released)."""
        error = fields.format_error(value)
        if error is not None:
            self.node.scheduler.release(runner)
            raise _Reject(error_response(500, error))

    def _embed(self, request: Request) -> Response:
        started = time.monotonic()
        fields = {"model": "string", "truncate": "bool", "dimensions": "int", "options": _OPTIONS}
        body = decode(request, "EmbedRequest", fields)
        model = body.get("model") or ""
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            texts = [raw_input] if raw_input else []
        elif isinstance(raw_input, list) and all(isinstance(t, str) for t in raw_input):
            texts = list(raw_input)
        elif raw_input is None:
            texts = []
        else:
            return error_response(400, "invalid input type")
        missing = f'model "{model}" not found, try pulling it first' if model else "model '' not found"
        installed = self._resolve(model, 404, missing)
        runner, load_ns = self._schedule(installed, body)
        try:
            if not texts:
                return json_response(200, {"model": model, "embeddings": []})
            counts = [len(tokenize(t)) + 2 for t in texts]
            if body.get("truncate") is False and max(counts) > runner.context_length:
                return error_response(400, "input length exceeds maximum context length")
            if not self._pass_slot(runner):
                return error_response(500, RUNNER_GONE)
            size = installed.spec.arch.embedding_length
            vectors = [fake_vector(installed.spec.digest, t, size) for t in texts]
            wanted = body.get("dimensions") or 0
            if 0 < wanted < size:  # truncated, then normalized again
                vectors = [_unit(v[:wanted]) for v in vectors]
            reply = {"model": model, "embeddings": vectors}
            timing = _metrics(total_duration=int((time.monotonic() - started) * 1e9), load_duration=load_ns)
            return json_response(200, {**reply, **timing, "prompt_eval_count": sum(counts)})
        finally:
            self.node.scheduler.release(runner)

    def _embeddings(self, request: Request) -> Response:
        body = decode(request, "EmbeddingRequest", {"model": "string", "prompt": "string", "options": _OPTIONS})
        model = body.get("model") or ""
        if not model:
            return error_response(400, "model is required")
        installed = self._resolve(model, 404, f'model "{model}" not found, try pulling it first')
        runner, _ = self._schedule(installed, body)
        try:
            prompt = body.get("prompt") or ""
            if not prompt:
                return json_response(200, {"embedding": []})
            if not self._pass_slot(runner):
                return error_response(500, RUNNER_GONE)
            scale = math.sqrt(installed.spec.arch.embedding_length)
            vector = fake_vector(installed.spec.digest, prompt, installed.spec.arch.embedding_length)
            return json_response(200, {"embedding": [x * scale for x in vector]})
        finally:
            self.node.scheduler.release(runner)
