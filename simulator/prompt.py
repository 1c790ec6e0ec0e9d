"""A request's prompt as the runner sees it: Ollama's rendering of a chat or a generate request, cut into
tokens deterministically (about 4 characters a token), and the common prefix two token lists share."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

CHARS_PER_TOKEN = 4
Tokens = tuple[str, ...]


def tokenize(text: str) -> Tokens:
    """The text in pieces of 4 characters (the last may be shorter): the same text, the same tokens."""
    return tuple(text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN))


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _turn(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}<|end|>\n"


def render_chat(messages: Sequence[Mapping[str, object]], tools: Sequence[object] = (), system: str = "") -> str:
    """The chat template's output: the system message(s) first (the Modelfile's `system` when the request has
    none), then the tools the request offers, then the other messages in order, then the assistant's turn."""
    systems = [str(m.get("content") or "") for m in messages if m.get("role") == "system"]
    if not systems and system:
        systems = [system]
    text = "".join(_turn("system", s) for s in systems)
    if tools:
        text += _turn("tools", json.dumps(list(tools), sort_keys=True, ensure_ascii=False))
    for m in messages:
        if m.get("role") != "system":
            content = str(m.get("content") or "")
            calls = m.get("tool_calls")
            if calls:
                content += json.dumps(calls, sort_keys=True, ensure_ascii=False)
            text += _turn(str(m.get("role") or "user"), content)
    return text + "<|assistant|>\n"


def render_generate(prompt: str, system: str = "", suffix: str = "", raw: bool = False) -> str:
    """A generate request's prompt: as sent when `raw`, else in the template with its system and suffix."""
    if raw:
        return prompt
    text = _turn("system", system) if system else ""
    if suffix:
        return text + f"<|prefix|>{prompt}<|suffix|>{suffix}<|middle|>"
    return text + _turn("user", prompt) + "<|assistant|>\n"
