"""Byte sizes: parsing the configuration's forms and printing them the way the guide does.

One style for people, everywhere (command line, status page, log lines): whole MiB written `4096 MB`, as the
guide prints them (`size_text`); the models list adds GB the guide's way (`format_mb`). JSON and metrics
carry bytes.
"""

from __future__ import annotations

import re

MIB = 1024 * 1024
GIB = 1024 * MIB

_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": MIB,
    "gb": 1000**3,
    "gib": GIB,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from `4GiB`, `4096MiB`, `4.5GB`, `705MB`, `512B` or a plain number of MiB.

    Raises ValueError (with the accepted forms) for anything else, including negatives and booleans.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 8GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected a size like 8GiB, got {value!r}")
        return int(value * MIB)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            number, unit = float(match.group(1)), match.group(2).lower()
            if unit == "":
                return int(number * MIB)
            if unit in _UNITS:
                return int(number * _UNITS[unit])
    raise ValueError(f"expected a size like 8GiB, got {value!r}")


def mb(num_bytes: int | float) -> int:
    """Whole MiB, the unit the guide prints as "MB"."""
    return round(num_bytes / MIB)


def size_text(num_bytes: int | float | None) -> str:
    """`4096 MB` (MiB, the guide's "MB"); `?` when unknown."""
    return "?" if num_bytes is None else f"{mb(num_bytes)} MB"


def format_mb(num_bytes: int | float) -> str:
    """`4700 MB (4.59 GB)`: the guide's way of printing a size."""
    return f"{mb(num_bytes)} MB ({num_bytes / GIB:.2f} GB)"
