"""The fields of generate and chat requests checked as Ollama's `api` types decode them (`think`, `messages`,
`tools`, `format`), each failure the 400 text Go gives; and the `think` test against a model's capabilities."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from simulator.gobind import cannot_unmarshal, type_error
from simulator.gotypes import go_quote

THINK_VALUES = ("high", "medium", "low")
THINK_MAX = (0, 30, 0)  # "max" is accepted from the llama-server era
THINK_TYPED = (0, 11, 0)  # api.ThinkValue (a bool or a level); before, a *bool
THINK_KNOWN = (0, 9, 0)  # `think` exists; older servers ignore it
THINK_QUOTED = (0, 12, 5)  # `"x" does not support thinking`; before, the scheduler's "<full name> does not ..."
_MESSAGE = {
    "role": "string", "content": "string", "thinking": "string", "images": "[]api.ImageData",
    "tool_calls": "[]api.ToolCall", "tool_name": "string", "tool_call_id": "string",
}  # fmt: skip


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
        found = type_error(message, "Message", "messages.", _MESSAGE)
        if found is not None:
            return found
        bad = [i for i in message.get("images") or [] if not isinstance(i, str)]
        if bad:
            return cannot_unmarshal(bad[0], "Message.messages.images", "api.ImageData")
        for call in message.get("tool_calls") or []:
            if not isinstance(call, Mapping):
                return cannot_unmarshal(call, "Message.messages.tool_calls", "api.ToolCall")
            found = type_error(call, "ToolCall", "messages.tool_calls.", {"function": "api.ToolCallFunction"})
            if found is not None:
                return found
    return None


def tools_error(tools: object) -> str | None:
    """The decoding error for a chat request's `tools` (api.Tools), or None."""
    if tools is not None and not isinstance(tools, list):
        return cannot_unmarshal(tools, "ChatRequest.tools", "api.Tools")
    for tool in tools or []:
        if not isinstance(tool, Mapping):
            return cannot_unmarshal(tool, "ChatRequest.tools", "api.Tool")
        found = type_error(tool, "Tool", "tools.", {"type": "string", "function": "api.ToolFunction"})
        if found is not None:
            return found
    return None


def format_error(value: object) -> str | None:
    """llama-server's refusal of a `format` that is neither "json" nor a JSON schema object (500), or None."""
    if value in (None, "", "json") or isinstance(value, Mapping):
        return None
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return f'invalid format: {go_quote(raw)}; expected "json" or a valid JSON Schema object'
