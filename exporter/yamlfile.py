"""Reading a YAML file with one-line errors that name the file (and the line, for a syntax error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, source: str | None = None) -> Any:
    """The parsed document; ValueError `SOURCE: no such file`, `SOURCE: cannot read: …` or
    `SOURCE: line N: invalid YAML: …`. `source` is the name used in messages (default: the path)."""
    path = Path(path)
    source = source or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{source}: {where}invalid YAML: {problem}") from None
