"""Go wire formats the Ollama server uses: durations, `keep_alive`, timestamps, quoting, byte sizes."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

FOREVER = (2**63 - 1) / 1e9  # seconds in Go's math.MaxInt64 nanoseconds: "keep forever"
_MAX_NS = 2**63 - 1
_UNITS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}
_NUMBER = re.compile(r"(\d*)(\.\d*)?")
_UNIT = re.compile(r"[^\d.]*")


def go_quote(text: str) -> str:
    """Go's `%q` / strconv.Quote for ordinary text."""
    return json.dumps(text, ensure_ascii=False)


def parse_duration(text: str) -> float:
    """Seconds from a Go `time.ParseDuration` string ("5m", "1h30m", "-1s", "0"); ValueError with Go's text."""
    rest, negative = text, False
    if rest[:1] in ("-", "+"):
        negative, rest = rest[0] == "-", rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {go_quote(text)}")
    total = 0.0
    while rest:
        number = _NUMBER.match(rest)
        whole, frac = number.group(1), number.group(2) or ""  # type: ignore[union-attr]
        if not whole and len(frac) <= 1:
            raise ValueError(f"time: invalid duration {go_quote(text)}")
        rest = rest[number.end() :]  # type: ignore[union-attr]
        unit = _UNIT.match(rest).group(0)  # type: ignore[union-attr]
        if not unit:
            raise ValueError(f"time: missing unit in duration {go_quote(text)}")
        if unit not in _UNITS:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {go_quote(text)}")
        rest = rest[len(unit) :]
        total += float((whole or "0") + frac) * _UNITS[unit]
        if total > _MAX_NS:
            raise ValueError(f"time: invalid duration {go_quote(text)}")
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
        return FOREVER if value < 0 else min(float(value), FOREVER)
    if isinstance(value, str):
        seconds = parse_duration(value)
        return FOREVER if seconds < 0 else min(seconds, FOREVER)
    raise ValueError(f"Unsupported type: '{_go_type(value)}'")


def go_time(seconds: float, utc: bool = False) -> str:
    """A Go `time.Time` as JSON (RFC 3339, ≤9 fractional digits, zeros trimmed): local with offset, or UTC."""
    whole, micros = divmod(round(seconds * 1e6), 10**6)  # a float holds microseconds, not nanoseconds
    moment = datetime.fromtimestamp(whole, tz=timezone.utc)
    if not utc:
        moment = moment.astimezone()
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if micros:
        text += f".{micros:06d}".rstrip("0")
    offset = moment.utcoffset()
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def human_bytes2(num: int) -> str:
    """Go format.HumanBytes2: "5.7 GiB", "809.9 MiB", "12.0 KiB", "12 B"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num >= size:
            return f"{num / size:.1f} {unit}"
    return f"{num} B"


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
