"""The shared actions log (`actions_log: PATH`): one JSON line per action, from every process that acts.

The optimizer's jobs, the proxy's in-process heals and `gpu-router optimize` each append what they did; the
optimizer's status page and `GET /api/v1/actions` read the log back, so they show every process's actions,
not only the optimizer's own. Each append is one `write` to a file opened with O_APPEND, so lines from
processes writing at once do not interleave. Past `MAX_BYTES` the file is moved to `PATH.1` (replacing the one
before) and a new one begun; a read looks at the last `TAIL_BYTES` only. A log that cannot be written costs a
warning, never the action.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from gpurouter.logfmt import log_event

log = logging.getLogger(__name__)

MAX_BYTES = 4 * 1024 * 1024
TAIL_BYTES = 256 * 1024  # about a thousand records: more than the status page and the API show
_FIELDS = {"time": float, "model": str, "node": (str, type(None)), "action": str, "outcome": str}


def append(path: str | Path, records: Iterable[dict[str, object]]) -> None:
    """Append `records` (`ActionRecord`s as dicts) to the log at `path`, one JSON object a line."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not data:
        return
    try:
        if os.path.getsize(path) > MAX_BYTES:
            os.replace(path, f"{path}.1")
    except FileNotFoundError:
        pass
    except OSError as exc:
        log_event(log, logging.WARNING, "actions_log", path=str(path), outcome="not rotated", error=exc.strerror)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data.encode("utf-8", "replace"))  # a lone surrogate in a detail: "?"
        finally:
            os.close(fd)
    except OSError as exc:
        log_event(log, logging.WARNING, "actions_log", path=str(path), outcome="not written", error=exc.strerror)


def read(path: str | Path, limit: int) -> list[dict[str, object]]:
    """The last `limit` records of the log, oldest first (none when it does not exist yet); a line that is
    not a record (cut by a rotation, written by hand) is left out."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - TAIL_BYTES))
            tail = file.read(TAIL_BYTES)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log_event(log, logging.WARNING, "actions_log", path=str(path), outcome="not read", error=exc.strerror)
        return []
    records = []
    for line in tail.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in _FIELDS.items()):
            records.append(record)
    return sorted(records, key=lambda r: float(r["time"]))[-limit:]
