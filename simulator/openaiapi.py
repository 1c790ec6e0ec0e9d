"""Ollama's OpenAI-compatible `/v1` API on a simulated node: each request is translated into the native one
and its answer back, as Ollama's own `openai` middleware does (chat and text completions stream as
server-sent events ending in `data: [DONE]`; errors are `{"error": {"message", "type", ...}}`)."""

from __future__ import annotations

import base64
import json
import random
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from simulator.gobind import cannot_unmarshal, type_error
from simulator.gotypes import go_decoded, go_quote
from simulator.httpserver import Request, Response, Stream, json_response

SSE = "text/event-stream"
FINGERPRINT = "fp_ollama"
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}

Native = Callable[[Request], Response]


def error(status: int, message: str) -> Response:
    kind = _ERROR_TYPES.get(status, "api_error")
    return json_response(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})


def _body(request: Request) -> dict[str, Any]:
    try:
        data = go_decoded(json.loads(request.body or b"null"))
    except ValueError as exc:
        raise _Fail(error(400, str(exc))) from None
    if not isinstance(data, dict):
        raise _Fail(error(400, "invalid request body: expected a JSON object"))
    return data


_CHAT_REQUEST = {
    "model": "string", "messages": "[]openai.Message", "stream": "bool", "stream_options": "openai.StreamOptions",
    "max_tokens": "int", "seed": "int", "temperature": "float64", "frequency_penalty": "float64",
    "presence_penalty": "float64", "top_p": "float64", "response_format": "openai.ResponseFormat",
    "tools": "[]api.Tool", "reasoning": "openai.Reasoning", "reasoning_effort": "string", "logprobs": "bool",
    "top_logprobs": "int",
}  # fmt: skip
_COMPLETION_REQUEST = {
    "model": "string", "frequency_penalty": "float32", "max_tokens": "int",
    "presence_penalty": "float32", "seed": "int", "stream": "bool", "stream_options": "openai.StreamOptions",
    "temperature": "float32", "top_p": "float32", "suffix": "string", "logprobs": "int",
}  # fmt: skip
_MESSAGE = {"role": "string", "reasoning": "string", "tool_calls": "[]openai.ToolCall", "name": "string",
            "tool_call_id": "string"}  # fmt: skip
_TOOL_CALL = {"id": "string", "index": "int", "type": "string", "function": "struct"}


_FUNCTION = {"name": "string", "arguments": "string"}


def _messages_error(struct: str, messages: object) -> str | None:
    """The binding error of an OpenAI request's messages and their tool calls, or None."""
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            return cannot_unmarshal(message, f"{struct}.messages", "openai.Message")
        found = type_error(message, "Message", "messages.", _MESSAGE)
        for call in message.get("tool_calls") or [] if found is None else []:
            if not isinstance(call, dict):
                return cannot_unmarshal(call, "Message.messages.tool_calls", "openai.ToolCall")
            function = call.get("function") or {}
            found = type_error(call, "ToolCall", "messages.tool_calls.", _TOOL_CALL) or type_error(
                function, "", "messages.tool_calls.function.", _FUNCTION
            )
            if found is not None:
                return found
        if found is not None:
            return found
    return None


def _bind(data: dict[str, Any], struct: str, fields: dict[str, str]) -> None:
    """ShouldBindJSON into openai.`struct`: 400 with Go's text for a value of the wrong type."""
    found = type_error(data, struct, "", fields)
    if found is None and "messages" in fields:
        found = _messages_error(struct, data.get("messages"))
    if found is not None:
        raise _Fail(error(400, found))


class _Fail(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _call(native: Native, path: str, body: dict[str, Any]) -> Response:
    """The native endpoint's answer; a non-200 one becomes an OpenAI-shaped error."""
    response = native(Request("POST", path, {}, json.dumps(body).encode()))
    if response.status != 200:
        raw = response.body if isinstance(response.body, bytes) else b"{}"
        try:
            message = json.loads(raw).get("error", "")
        except (ValueError, AttributeError):
            message = raw.decode(errors="replace")
        raise _Fail(error(response.status, message))
    return response


def _options(data: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    limit = data.get("max_completion_tokens", data.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool):
        options["num_predict"] = limit
    for key in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty"):
        if data.get(key) is not None:
            options[key] = data[key]
    stop = data.get("stop")  # a string or a list whose strings are kept; anything else is ignored
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        options["stop"] = [s for s in stop if isinstance(s, str)]
    return options


def _text(content: Any) -> str:
    """A message's content: a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def _event(data: object) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _usage(final: dict[str, Any]) -> dict[str, int]:
    prompt, completion = final.get("prompt_eval_count", 0), final.get("eval_count", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(final: dict[str, Any], tool_calls: bool = False) -> str:
    if final.get("done_reason") == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _tool_calls(native: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Ollama's tool calls in OpenAI's shape: arguments as a JSON string."""
    return [
        {
            "id": call.get("id", ""),
            "index": call["function"].get("index", 0),
            "type": "function",
            "function": {
                "name": call["function"]["name"],
                "arguments": json.dumps(call["function"].get("arguments") or {}, separators=(",", ":")),
            },
        }
        for call in native or []
    ]


def _native_calls(calls: object) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments a JSON string) as Ollama's (arguments an object)."""
    native = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, ValueError):
            raise _Fail(error(400, "invalid tool call arguments")) from None
        native.append(
            {"id": call.get("id", ""), "function": {"name": function.get("name", ""), "arguments": arguments}}
        )
    return native


def _messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI messages as Ollama's: content parts joined, tool calls converted, a tool result named."""
    names = {
        call.get("id"): (call.get("function") or {}).get("name")
        for m in data.get("messages") or []
        if isinstance(m, dict)
        for call in (m.get("tool_calls") or [])
        if isinstance(call, dict)
    }
    messages = []
    for m in data.get("messages") or []:
        if not isinstance(m, dict):
            raise _Fail(error(400, "invalid message format"))
        message: dict[str, Any] = {"role": m.get("role"), "content": _text(m.get("content"))}
        if m.get("tool_calls"):
            message["tool_calls"] = _native_calls(m["tool_calls"])
        if m.get("tool_call_id"):
            message["tool_call_id"] = m["tool_call_id"]
            message["tool_name"] = names.get(m["tool_call_id"]) or ""
        messages.append(message)
    return messages


def _format(data: dict[str, Any]) -> object:
    """`response_format` as Ollama's `format`: json_object → "json", json_schema → its schema."""
    response_format = data.get("response_format")
    if not isinstance(response_format, dict):
        return None
    kind = str(response_format.get("type") or "").strip().lower()
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    return None


def _think(data: dict[str, Any]) -> object:
    """`reasoning_effort` (or `reasoning.effort`) as Ollama's `think` (thinkFromReasoningEffort): none → false,
    minimal → low, xhigh and ultra → max; anything else is a 400."""
    reasoning = data.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else data.get("reasoning_effort")
    if not effort:
        return None
    levels = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "max": "max"}
    levels.update(xhigh="max", ultra="max")
    if effort not in levels:
        allowed = '"minimal", "low", "medium", "high", "xhigh", "ultra", "max", or "none"'
        raise _Fail(error(400, f"invalid reasoning value: {go_quote(str(effort))} (must be {allowed})"))
    return levels[effort]


def _sse(
    response: Response,
    head: dict[str, Any],
    choice: Callable[[dict[str, Any], str | None], dict[str, Any]],
    include_usage: bool,
) -> Response:
    """The native NDJSON stream as server-sent events (closing this stream closes the native one)."""
    native = response.body
    assert isinstance(native, Stream)

    def events() -> Iterator[bytes]:
        for line in native:
            data = json.loads(line)
            if "error" in data:
                yield _event({"error": {"message": data["error"], "type": "api_error", "param": None, "code": None}})
                return
            if not data.get("done"):
                yield _event({**head, "choices": [choice(data, None)]})
                continue
            yield _event({**head, "choices": [choice({}, _finish(data))]})
            if include_usage:
                yield _event({**head, "choices": [], "usage": _usage(data)})
        yield b"data: [DONE]\n\n"

    return Response(200, Stream(events(), native.close), SSE)


def _head(kind: str, prefix: str, model: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{random.randint(0, 998)}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }


def chat(native: Native, request: Request) -> Response:
    """POST /v1/chat/completions."""
    try:
        data = _body(request)
        _bind(data, "ChatCompletionRequest", _CHAT_REQUEST)
        if not data.get("messages"):
            raise _Fail(error(400, "[] is too short - 'messages'"))
        model = str(data.get("model") or "")
        stream = data.get("stream") is True
        body = {"model": model, "messages": _messages(data), "stream": stream, "options": _options(data)}
        extra = {"tools": data.get("tools"), "format": _format(data), "think": _think(data)}
        body.update({k: v for k, v in extra.items() if v is not None})
        response = _call(native, "/api/chat", body)
    except _Fail as fail:
        return fail.response
    head = _head("chat.completion.chunk" if stream else "chat.completion", "chatcmpl", model)
    if stream:
        return _chat_stream(response, head, bool((data.get("stream_options") or {}).get("include_usage")))
    final = json.loads(response.body)  # type: ignore[arg-type]
    calls = _tool_calls(final["message"].get("tool_calls"))
    message: dict[str, Any] = {"role": "assistant", "content": final["message"]["content"]}
    if calls:
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "finish_reason": _finish(final, bool(calls))}
    return json_response(200, {**head, "choices": [choice], "usage": _usage(final)})


def _chat_stream(response: Response, head: dict[str, Any], include_usage: bool) -> Response:
    """Ollama's chat stream as OpenAI chunks: the role in the first, a tool call in its own, the finish reason
    in an empty delta, then the usage when asked (closing this stream closes the native one)."""
    native = response.body
    assert isinstance(native, Stream)

    def events() -> Iterator[bytes]:
        first, called = True, False
        for line in native:
            data = json.loads(line)
            if "error" in data:
                yield _event({"error": {"message": data["error"], "type": "api_error", "param": None, "code": None}})
                return
            said = data.get("message") or {}
            calls = _tool_calls(said.get("tool_calls"))
            if not data.get("done") or first or said.get("content") or calls:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                delta["content"] = said.get("content", "")
                if calls:
                    delta["tool_calls"] = calls
                    called = True
                yield _event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                first = False
            if data.get("done"):
                yield _event({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": _finish(data, called)}]})
                if include_usage:
                    yield _event({**head, "choices": [], "usage": _usage(data)})
        yield b"data: [DONE]\n\n"

    return Response(200, Stream(events(), native.close), SSE)


def completions(native: Native, request: Request) -> Response:
    """POST /v1/completions."""
    try:
        data = _body(request)
        _bind(data, "CompletionRequest", _COMPLETION_REQUEST)
        model = str(data.get("model") or "")
        prompt = data.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else ""
        stream = data.get("stream") is True
        body = {"model": model, "prompt": str(prompt or ""), "stream": stream, "options": _options(data)}
        if data.get("suffix"):
            body["suffix"] = data["suffix"]
        response = _call(native, "/api/generate", body)
    except _Fail as fail:
        return fail.response
    if stream:
        head = _head("text_completion", "cmpl", model)
        usage = bool((data.get("stream_options") or {}).get("include_usage"))

        def choice(chunk: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"text": chunk.get("response", ""), "index": 0, "finish_reason": finish}

        return _sse(response, head, choice, usage)
    final = json.loads(response.body)  # type: ignore[arg-type]
    choice = {"text": final["response"], "index": 0, "finish_reason": _finish(final)}
    return json_response(200, {**_head("text_completion", "cmpl", model), "choices": [choice], "usage": _usage(final)})


def embeddings(native: Native, request: Request) -> Response:
    """POST /v1/embeddings (encoding_format float or base64: little-endian float32, as the openai client asks)."""
    try:
        data = _body(request)
        model = str(data.get("model") or "")
        texts = data.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _Fail(error(400, "invalid input type"))
        body: dict[str, Any] = {"model": model, "input": texts}
        if data.get("dimensions"):
            body["dimensions"] = data["dimensions"]
        final = json.loads(_call(native, "/api/embed", body).body)  # type: ignore[arg-type]
    except _Fail as fail:
        return fail.response
    packed = data.get("encoding_format") == "base64"
    rows = [
        {
            "object": "embedding",
            "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if packed else v,
            "index": i,
        }
        for i, v in enumerate(final["embeddings"])
    ]
    tokens = final.get("prompt_eval_count", 0)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return json_response(200, {"object": "list", "data": rows, "model": model, "usage": usage})


def models(tags: Callable[[], list[tuple[str, float]]]) -> Response:
    """GET /v1/models from (name, modified_at) pairs."""
    rows = [{"id": name, "object": "model", "created": int(at), "owned_by": "library"} for name, at in tags()]
    return json_response(200, {"object": "list", "data": rows})
