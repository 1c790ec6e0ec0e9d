"""Go wire formats the Ollama server uses: durations, `keep_alive`, timestamps, quoting, byte sizes."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from exporter.goduration import FOREVER, go_quote, parse_duration, parse_keep_alive  # noqa: F401  (re-exported)


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
