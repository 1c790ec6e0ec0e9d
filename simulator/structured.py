"""Structured answers, deterministic: a JSON value that conforms to a JSON schema (`format`, `response_format`,
a tool's parameters), and the tool call a model makes when a request offers tools."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
_MAX_DEPTH = 8  # a recursive schema ends here (with the smallest value its type allows)
_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "192.0.2.1",
}


def _pick(seed: str, choices: Sequence[Any]) -> Any:
    return choices[hashlib.sha256(seed.encode()).digest()[0] % len(choices)]


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local `$ref` ("#/$defs/Name", "#/definitions/Name"); anything else is taken as it is."""
    ref = schema.get("$ref")
    while isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, Mapping) else None
        if not isinstance(target, Mapping):
            break
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        ref = target.get("$ref")
    return schema


def _string(schema: Mapping[str, Any], seed: str) -> str:
    if schema.get("format") in _FORMATS:
        return _FORMATS[schema["format"]]
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    text = _pick(seed, _WORDS)
    while len(text) < low:
        text += " " + _pick(seed + text, _WORDS)
    return text[: int(high)] if isinstance(high, int) else text


def _number(schema: Mapping[str, Any], integer: bool) -> int | float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    value: float = 1
    if isinstance(low, (int, float)):
        value = max(value, low + (1 if "exclusiveMinimum" in schema and "minimum" not in schema else 0))
    if isinstance(high, (int, float)):
        value = min(value, high - (1 if "exclusiveMaximum" in schema and "maximum" not in schema else 0))
    if integer:
        return int(value) if value == int(value) else int(value) + 1
    return float(value)


def value_for(schema: object, seed: str = "", root: Mapping[str, Any] | None = None, depth: int = 0) -> Any:
    """A value valid under `schema` (JSON Schema: type, properties, required, items, enum, const, anyOf,
    oneOf, allOf, $ref, minItems, minimum, ...), the same for the same schema and seed."""
    if not isinstance(schema, Mapping):
        return {}  # `true`, `{}` or no schema: any value, an object is the most useful
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return _pick(seed, schema["enum"])
    for key in ("anyOf", "oneOf"):
        options = [o for o in schema.get(key) or [] if not (isinstance(o, Mapping) and o.get("type") == "null")]
        if options or schema.get(key):
            return value_for((options or schema[key])[0], seed, root, depth)
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = _resolve(part, root) if isinstance(part, Mapping) else {}
            merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
            merged.setdefault("properties", {}).update(part.get("properties") or {})
            merged.setdefault("required", []).extend(part.get("required") or [])
        return value_for({**{k: v for k, v in schema.items() if k != "allOf"}, **merged}, seed, root, depth)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        return _object(schema, seed, root, depth)
    if kind == "array":
        count = max(1, int(schema.get("minItems", 1)))
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        if depth >= _MAX_DEPTH:
            count = int(schema.get("minItems", 0))
        items = schema.get("items", {})
        return [value_for(items, f"{seed}[{i}]", root, depth + 1) for i in range(count)]
    if kind == "string":
        return _string(schema, seed)
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return _pick(seed, (True, False))
    return None


def _object(schema: Mapping[str, Any], seed: str, root: Mapping[str, Any], depth: int) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    keys = list(properties) if depth < _MAX_DEPTH else [k for k in properties if k in required]
    value = {k: value_for(properties[k], f"{seed}.{k}", root, depth + 1) for k in keys}
    for k in required - set(value):  # required but not described
        value[k] = _pick(f"{seed}.{k}", _WORDS)
    return value


def json_answer(format_value: object, seed: str) -> str:
    """The text of an answer under `format`: "json" gives an object; a schema gives a value valid under it."""
    if format_value == "json":
        return json.dumps({"answer": " ".join(_pick(f"{seed}{i}", _WORDS) for i in range(3))})
    return json.dumps(value_for(format_value, seed), ensure_ascii=False)


def tool_call(tools: Sequence[Any], last_message: str) -> tuple[str, dict[str, Any]] | None:
    """The tool a model calls, with its arguments: the first tool whose name the last message mentions, else the
    first tool; None when no tool has a function name."""
    functions = [t["function"] for t in tools if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)]
    named = [f for f in functions if isinstance(f.get("name"), str) and f["name"]]
    if not named:
        return None
    chosen = next((f for f in named if f["name"] in last_message), named[0])
    arguments = value_for(chosen.get("parameters") or {"type": "object"}, chosen["name"] + last_message)
    return chosen["name"], arguments if isinstance(arguments, dict) else {"value": arguments}
