"""Byte sizes: parsing the configuration's forms and printing them the way the guide does.

One style for people, everywhere (command line, status page, log lines): whole MiB written `4096 MB`, as the
guide prints them (`size_text`); the models list adds GB the guide's way (`4700 MB (4.59 GB)`). JSON and metrics
carry bytes.
"""

from __future__ import annotations

import math
import re

from gpurouter.cluster.yamlfile import show

MIB = 1024 * 1024
GIB = 1024 * MIB
MAX_SIZE = 1024**5  # 1 PiB: larger than any GPU or model, small enough for exact arithmetic

# MB and GB are read as the router prints them (and as GPU memory is sold: an "8GB" card has 8 GiB), so a
# figure copied from any output or card label means the same bytes here.
_UNITS = {"b": 1} | {
    unit: 1024**power for power, prefix in enumerate("kmgtp", start=1) for unit in (f"{prefix}b", f"{prefix}ib")
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from `4GiB`, `4096MiB`, `4.5GB`, `705MB`, `512B` or a plain number of MiB, up to `MAX_SIZE`
    (every prefix a power of 1024).

    Raises ValueError (with the accepted forms) for anything else, including negatives, booleans, .inf and .nan.
    """
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value >= 0 and (isinstance(value, int) or math.isfinite(value)):  # NaN compares False
            number = float(min(value, MAX_SIZE + 1)) * MIB
    elif isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match and (unit == "" or unit in _UNITS):
            number = float(match.group(1)) * (_UNITS[unit] if unit else MIB)
    if number is None or not math.isfinite(number):
        raise ValueError(f"expected a size like 8GiB, got {show(value)}")
    if number > MAX_SIZE:
        raise ValueError(f"expected a size up to 1 PiB, got {show(value)}")
    return int(number)


def mb(num_bytes: int | float) -> int:
    """Whole MiB, the unit the guide prints as "MB"."""
    return round(num_bytes / MIB)


def size_text(num_bytes: int | float | None) -> str:
    """`4096 MB` (MiB, the guide's "MB"); `?` when unknown."""
    return "?" if num_bytes is None else f"{mb(num_bytes)} MB"


def body_too_large(size: int | None, limit: int, setting: str = "") -> str:
    """`body too large: 3000000 bytes, the limit is 2097152 bytes (proxy.max_body)` — the one phrasing of a
    refused request body (its size left out when it is not known: a chunked body)."""
    got = f"{size} bytes, " if size else ""
    return f"body too large: {got}the limit is {limit} bytes" + (f" ({setting})" if setting else "")
