"""The exit statuses of `gpu-router`, decided once: every subcommand returns one of these.

The same verdict gets the same status in every subcommand; `gpu-router --help` and the README print `TABLE`.
"""

from __future__ import annotations

import textwrap

OK = 0
FAILED = 1
USAGE = 2
INTERRUPTED = 130

TABLE: tuple[tuple[int, str], ...] = (
    (
        OK,
        "done: every node answered and the answer is complete (a model that fits no GPU but runs on CPU is an answer)",
    ),
    (
        FAILED,
        "the job failed or the answer is incomplete: a node did not answer; route/check: no node can run the model; "
        "optimize: a step did not land; a service could not start (its port is taken); the demo's story failed",
    ),
    (
        USAGE,
        "bad usage or configuration: an unknown flag or model, a configuration file that is missing or wrong, "
        "a priority model installed on no node (all nodes answered)",
    ),
    (INTERRUPTED, "interrupted (Ctrl-C) before the job was done"),
)


def worst(*codes: int) -> int:
    """The status that says most: USAGE over FAILED over OK (a wrong configuration explains a failure)."""
    order = (USAGE, FAILED, OK)
    return next((code for code in order if code in codes), OK)


def table_text(columns: int = 100) -> str:
    """The table as `gpu-router --help` and the README show it: `  0  done: ...`, wrapped at `columns`."""
    return "\n".join(
        textwrap.fill(meaning, columns, initial_indent=f"{code:>5}  ", subsequent_indent=" " * 7)
        for code, meaning in TABLE
    )
