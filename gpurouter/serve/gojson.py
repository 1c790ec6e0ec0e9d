"""How Go's encoding/json words what it refuses (Ollama's 400 answers): the simulator and the proxy."""

from __future__ import annotations

import json


def _quote_char(char: str) -> str:
    if char == "'":
        return "'\\''"
    return "'" + (char if char == '"' else json.dumps(char, ensure_ascii=False)[1:-1]) + "'"


def json_error(exc: json.JSONDecodeError) -> str:
    """The text Go's encoding/json gives for the same malformed document."""
    doc, pos = exc.doc, exc.pos
    if pos >= len(doc) or exc.msg.startswith("Unterminated"):
        return "unexpected EOF"
    char = _quote_char(doc[pos])
    if exc.msg.startswith("Expecting property name"):
        return f"invalid character {char} looking for beginning of object key string"
    if exc.msg.startswith("Expecting ':'"):
        return f"invalid character {char} after object key"
    if exc.msg.startswith("Expecting ','"):
        inside = "object key:value pair" if doc.rfind("{", 0, pos) > doc.rfind("[", 0, pos) else "array element"
        return f"invalid character {char} after {inside}"
    if exc.msg.startswith("Extra data"):
        return f"invalid character {char} after top-level value"
    if exc.msg.startswith("Invalid control"):
        return f"invalid character {char} in string literal"
    if exc.msg.startswith("Invalid"):  # Python points at the backslash, Go at the character after it
        return f"invalid character {_quote_char(doc[pos + 1 : pos + 2] or doc[pos])} in string escape code"
    return f"invalid character {char} looking for beginning of value"


def json_kind(value: object) -> str:
    """encoding/json's name for a JSON value's kind."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "null")
