"""What the proxy reads in a node's answer without parsing all of it: the last bytes of an answer hold its
timings (Ollama's native `prompt_eval_count`, `prompt_eval_duration`, `eval_count`, `eval_duration`, or the
OpenAI API's `usage` counts) and, in a stream, the node's error line; an error answer's first bytes say
whether the request itself was at fault."""

from __future__ import annotations

import json
import re

from proxy.ledger import Timings

TAIL = 8192  # bytes of an answer's end kept to read its timings and error line
_FIELD = re.compile(
    rb'"(prompt_eval_count|prompt_eval_duration|eval_count|eval_duration|prompt_tokens|completion_tokens)"\s*:\s*(\d+)'
)
# Ollama's words for a request's own mistakes that it answers with 500 (reference/ollama-api.md §3)
_OWN_FAULT = re.compile(r'option "[^"]*" must be|cannot unmarshal|invalid (option|value|format)|does not support')


def said(first: bytes) -> str:
    """An error answer's message: its `error` text, else its first 200 characters."""
    text = first[:2000].decode(errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text[:200]
    message = data.get("error") if isinstance(data, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    return str(message)[:200] if message is not None else text[:200]


def own_fault(message: str) -> bool:
    """True for Ollama's answer to a request's own mistake (an option of the wrong type, say)."""
    return bool(_OWN_FAULT.search(message))


def timings_of(tail: bytes) -> Timings:
    """The answer's timings (the last value of each field in its tail; durations are nanoseconds)."""
    found = {name.decode(): int(value) for name, value in _FIELD.findall(tail)}
    return Timings(
        prompt_tokens=found.get("prompt_eval_count", found.get("prompt_tokens", 0)),
        prompt_seconds=found.get("prompt_eval_duration", 0) / 1e9,
        generated=found.get("eval_count", found.get("completion_tokens", 0)),
        generate_seconds=found.get("eval_duration", 0) / 1e9,
        load_seconds=found.get("load_duration", 0) / 1e9,
    )


def last_error(tail: bytes, content_type: str) -> str | None:
    """The message of a stream's last line when it is the node's error line (`{"error": ...}`), else None."""
    if "ndjson" not in content_type and "event-stream" not in content_type:
        return None
    lines = [line for line in tail.split(b"\n") if line.strip() and line.strip() != b"data: [DONE]"]
    if not lines:
        return None
    last = lines[-1].strip()
    if last.startswith(b"data:"):
        last = last[5:].strip()
    try:
        data = json.loads(last)
    except ValueError:
        return None
    if not isinstance(data, dict) or "error" not in data:
        return None
    message = data["error"]
    return str(message.get("message") if isinstance(message, dict) else message)[:200]
