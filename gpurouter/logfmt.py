"""One log format for every service (exporter, optimizer, simulator): logfmt, one line per event.

`time=2026-01-02T03:04:05+0000 level=INFO event=listening url=http://127.0.0.1:9877 nodes=3`. Values with
spaces or odd characters are JSON-quoted; model names are normalised (`mxbai-embed-large:latest`); a line
from a library (waitress, werkzeug) becomes `event=log logger=NAME msg="…"`; a traceback is folded into the
line's `error=` field.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sys
from logging.handlers import QueueHandler, QueueListener
from typing import TextIO

from gpurouter.cluster.config import model_key

_PLAIN = re.compile(r"[A-Za-z0-9_.:/+,\-@]+")
_MODEL_KEYS = frozenset(("model", "for_model"))
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def value_text(value: object) -> str:
    """A logfmt value: plain when it can be, else JSON-quoted; booleans `true`/`false`, floats to the
    millisecond without trailing zeros (`300`, `1.5`, `0.001`)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") or "0"
    else:
        text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def event_line(event: str, **fields: object) -> str:
    """`event=NAME key=value …` (None values left out; model names normalised)."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        if value is None:
            continue
        if key in _MODEL_KEYS and isinstance(value, str) and value:
            value = model_key(value)
        elif key == "models" and isinstance(value, str):
            value = ",".join(model_key(m) for m in value.split(",") if m)
        parts.append(f"{key}={value_text(value)}")
    return " ".join(parts)


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    """Log one event line on `logger` (nothing is formatted when the level is off)."""
    if logger.isEnabledFor(level):
        logger.log(level, event_line(event, **fields))


class Formatter(logging.Formatter):
    """`time=… level=… ` before an event line; any other message as `event=log logger=… msg=…`."""

    def __init__(self) -> None:
        super().__init__(datefmt=TIME_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.startswith("event="):
            message = event_line("log", logger=record.name, msg=message)
        if record.exc_info:
            message += f" error={value_text(self.formatException(record.exc_info))}"
        head = f"time={self.formatTime(record, self.datefmt)} level={record.levelname}"
        return f"{head} {message}".replace("\n", "\\n")


def handler(stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing this format."""
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(Formatter())
    return h


def setup(level: str | int) -> None:
    """Every logger of this process writes this format on stderr at `level` (the exporter and the simulator;
    `setup_queued` puts a queue in front)."""
    root = logging.getLogger()
    root.handlers[:] = [handler()]
    root.setLevel(level)


def setup_queued(level: str | int) -> QueueListener:
    """`setup`, with lines written by a thread of their own (the optimizer and the proxy).

    A request thread that waited on the log's file would hand the interpreter lock to the server's busy I/O
    loop and wait for it back, which under a burst of requests multiplies the answer time. The caller stops
    the returned listener to flush the log.
    """
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [QueueHandler(records)]
    root.setLevel(level)
    listener = QueueListener(records, handler())
    listener.start()
    return listener
