"""Go's duration text and Ollama's `keep_alive` as its API reads them (the configuration and the simulator)."""

from __future__ import annotations

import json
import re

FOREVER = (2**63 - 1) / 1e9  # seconds in Go's math.MaxInt64 nanoseconds: "keep forever"
_MAX_NS = 2**63 - 1
_UNITS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}
_NUMBER = re.compile(r"(\d*)(\.\d*)?")
_UNIT = re.compile(r"[^\d.]*")


def go_quote(text: str) -> str:
    """Go's `%q` / strconv.Quote for ordinary text."""
    return json.dumps(text, ensure_ascii=False)


def time_quote(text: str) -> str:
    """The quoting of Go's time package errors: printable ASCII as is (\" and \\ escaped), every other byte of
    the UTF-8 text as \\xNN (U+FFFD → "\\xef\\xbf\\xbd")."""
    out = []
    for byte in text.encode("utf-8", "surrogatepass"):
        if byte < 0x20 or byte >= 0x80:
            out.append(f"\\x{byte:02x}")
        else:
            out.append("\\" + chr(byte) if chr(byte) in '"\\' else chr(byte))
    return '"' + "".join(out) + '"'


def parse_duration(text: str) -> float:
    """Seconds from a Go `time.ParseDuration` string ("5m", "1h30m", "-1s", "0"); ValueError with Go's text."""
    rest, negative = text, False
    if rest[:1] in ("-", "+"):
        negative, rest = rest[0] == "-", rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {time_quote(text)}")
    total = 0.0
    while rest:
        number = _NUMBER.match(rest)
        whole, frac = number.group(1), number.group(2) or ""  # type: ignore[union-attr]
        if not whole and len(frac) <= 1:
            raise ValueError(f"time: invalid duration {time_quote(text)}")
        rest = rest[number.end() :]  # type: ignore[union-attr]
        unit = _UNIT.match(rest).group(0)  # type: ignore[union-attr]
        if not unit:
            raise ValueError(f"time: missing unit in duration {time_quote(text)}")
        if unit not in _UNITS:
            raise ValueError(f"time: unknown unit {time_quote(unit)} in duration {time_quote(text)}")
        rest = rest[len(unit) :]
        total += float((whole or "0") + frac) * _UNITS[unit]
        if total > _MAX_NS:
            raise ValueError(f"time: invalid duration {time_quote(text)}")
    return (-total if negative else total) / 1e9


def _go_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return type(value).__name__


def parse_keep_alive(value: object) -> float:
    """Seconds from a request's `keep_alive` as api.Duration reads it; negative means FOREVER.

    Numbers are seconds (fractions kept, v0.11.8+), strings Go durations. ValueError carries the 400 text.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return FOREVER if value < 0 else float(min(value, FOREVER))  # no float() of a huge int
    if isinstance(value, str):
        seconds = parse_duration(value)
        return FOREVER if seconds < 0 else min(seconds, FOREVER)
    raise ValueError(f"Unsupported type: '{_go_type(value)}'")
