"""Go wire formats the Ollama server uses: durations, `keep_alive`, timestamps, quoting, byte sizes, decoded
JSON strings (JSON errors: gpurouter/serve/gojson.py)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from gpurouter.cluster.goduration import FOREVER, go_quote, parse_duration, parse_keep_alive  # noqa: F401  (re-exported)


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


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def go_decoded(value: Any) -> Any:
    """A decoded JSON value as Go's encoding/json gives it: a lone surrogate escape ("\\ud800") in a string or
    key becomes U+FFFD (pairs were already joined by the decoder)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [go_decoded(v) for v in value]
    if isinstance(value, dict):
        return {go_decoded(k): go_decoded(v) for k, v in value.items()}
    return value
