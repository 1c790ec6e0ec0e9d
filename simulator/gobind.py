"""How Go's encoding/json refuses a value of the wrong kind for a typed struct field (gin's ShouldBindJSON):
the 400 texts of Ollama's native and OpenAI-compatible handlers."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gpurouter.serve.gojson import json_kind

_KINDS: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float64": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "float32": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "slice": lambda v: isinstance(v, list),
    "struct": lambda v: isinstance(v, dict),
}


def cannot_unmarshal(value: object, field: str, go_type: str) -> str:
    """encoding/json's UnmarshalTypeError text; a fraction into an int names the number, as Go does."""
    kind = json_kind(value)
    if go_type == "int" and isinstance(value, float):
        kind = f"number {value:g}"
    return f"json: cannot unmarshal {kind} into Go struct field {field} of type {go_type}"


def type_error(data: Mapping[str, object], struct: str, path: str, fields: Mapping[str, str]) -> str | None:
    """The error for the first of `fields` (name → Go type) holding a value of the wrong kind, named as Go
    names it (Go struct field STRUCT.PATHNAME), or None. Types other than scalars and `[]…` are structs."""
    for key, go_type in fields.items():
        value = data.get(key)
        kind = "slice" if go_type.startswith("[]") else go_type if go_type in _KINDS else "struct"
        if value is not None and not _KINDS[kind](value):
            return cannot_unmarshal(value, f"{struct}.{path}{key}", go_type)
    return None
