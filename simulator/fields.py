"""The fields of generate and chat requests checked as Ollama's `api` types decode them (`think`, `messages`,
`tools`, `format`), each failure the 400 text Go gives; and the `think` test against a model's capabilities."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from simulator.gobind import cannot_unmarshal
from simulator.gotypes import go_quote

THINK_VALUES = ("high", "medium", "low")
THINK_MAX = (0, 30, 0)  # "max" is accepted from the llama-server era
THINK_TYPED = (0, 11, 0)  # api.ThinkValue (a bool or a level); before, a *bool
THINK_KNOWN = (0, 9, 0)  # `think` exists; older servers ignore it
THINK_QUOTED = (0, 12, 5)  # `"x" does not support thinking`; before, the scheduler's "<full name> does not ..."
_MESSAGE_STRINGS = ("role", "content", "thinking", "tool_name", "tool_call_id")


def think_error(value: object, request_type: str, version: tuple[int, ...]) -> str | None:
    """The decoding error for a `think` value, or None when it is acceptable (or ignored, before v0.9)."""
    if value is None or version < THINK_KNOWN:
        return None
    if version < THINK_TYPED:
        return None if isinstance(value, bool) else cannot_unmarshal(value, f"{request_type}.think", "bool")
    levels = (*THINK_VALUES, "max") if version >= THINK_MAX else THINK_VALUES
    shown = ", ".join(f'"{v}"' for v in levels)
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return None if value in levels else f"invalid think value: {go_quote(value)} (must be {shown}, true, or false)"
    if version >= THINK_MAX:
        return f"think must be a boolean or string ({shown}, true, or false)"
    return f"think must be a boolean or string ({shown})"


def wants_thinking(value: object) -> bool:
    """ThinkValue.Bool: true, or a thinking level."""
    return value is True or value in (*THINK_VALUES, "max")


def thinking_refused(model: str, full_name: str, version: tuple[int, ...]) -> str:
    """Ollama's 400 text for `think` on a model without the thinking capability."""
    if version >= THINK_QUOTED:
        return f"{go_quote(model)} does not support thinking"
    return f"{full_name} does not support thinking"


def message_error(messages: list[Any]) -> str | None:
    """The decoding error for a chat request's messages (each an api.Message), or None."""
    for message in messages:
        if not isinstance(message, Mapping):
            return cannot_unmarshal(message, "ChatRequest.messages", "api.Message")
        for key in _MESSAGE_STRINGS:
            if message.get(key) is not None and not isinstance(message[key], str):
                return cannot_unmarshal(message[key], f"Message.messages.{key}", "string")
        images = message.get("images")
        if images is not None:
            if not isinstance(images, list):
                return cannot_unmarshal(images, "Message.messages.images", "[]api.ImageData")
            if not all(isinstance(i, str) for i in images):
                bad = next(i for i in images if not isinstance(i, str))
                return cannot_unmarshal(bad, "Message.messages.images", "api.ImageData")
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                return cannot_unmarshal(calls, "Message.messages.tool_calls", "[]api.ToolCall")
            for call in calls:
                if not isinstance(call, Mapping):
                    return cannot_unmarshal(call, "Message.messages.tool_calls", "api.ToolCall")
                function = call.get("function")
                if function is not None and not isinstance(function, Mapping):
                    return cannot_unmarshal(function, "ToolCall.messages.tool_calls.function", "api.ToolCallFunction")
    return None


def tools_error(tools: object) -> str | None:
    """The decoding error for a chat request's `tools` (api.Tools), or None."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        return cannot_unmarshal(tools, "ChatRequest.tools", "api.Tools")
    for tool in tools:
        if not isinstance(tool, Mapping):
            return cannot_unmarshal(tool, "ChatRequest.tools", "api.Tool")
        for key, go_type in (("type", "string"), ("function", "api.ToolFunction")):
            value = tool.get(key)
            wanted = str if go_type == "string" else Mapping
            if value is not None and not isinstance(value, wanted):
                return cannot_unmarshal(value, f"Tool.tools.{key}", go_type)
    return None


def format_error(value: object) -> str | None:
    """llama-server's refusal of a `format` that is neither "json" nor a JSON schema object (500), or None."""
    if value in (None, "", "json") or isinstance(value, Mapping):
        return None
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return f'invalid format: {go_quote(raw)}; expected "json" or a valid JSON Schema object'
