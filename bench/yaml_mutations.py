"""Mutations of the example configuration and fleet files: every one loads or is one line naming the file.

Each mutation inserts one hostile piece at a random place of `examples/gpu_router_config.yaml` or
`examples/demo-fleet.yaml` (a control character, an integer of thousands of digits in some base, a lone
surrogate escape, YAML punctuation), as the adversarial run did; the count of outcomes that are neither a
loaded file nor a one-line error naming it must be 0.

    python bench/yaml_mutations.py [COUNT]
"""

from __future__ import annotations

import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from gpurouter.cluster.config import ConfigError, load_config
from simulator.fleet import load_fleet

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PIECES = [
    *("0x" + "f" * 5000, "0b" + "1" * 20_000, "0" + "7" * 6000, "1" + ":59" * 3000, "9" * 5000, "-" + "9" * 5000),
    *("\x01", "\x00", "\x7f", "\x1b", "\t", '"\\ud800"', '"\\x01"', "\\ud800", "*a", "&a", "!!binary", "<<: 1"),
    *("{", "}", "[", "]", ": ", "- ", "'", '"', "#", "1e999", ".nan", "-.inf", "~", "12:30:45", "9" * 30),
]  # fmt: skip


def outcomes(name: str, load: Callable[[Path], object], error: type[Exception], count: int, seed: int) -> list[str]:
    """`loaded`, `one line` or what went wrong, per mutation."""
    text = (EXAMPLES / name).read_text(encoding="utf-8")
    rng = random.Random(seed)
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        for _ in range(count):
            at = rng.randrange(len(text) + 1)
            path.write_text(text[:at] + rng.choice(PIECES) + text[at:], encoding="utf-8")
            try:
                load(path)
                found.append("loaded")
            except error as exc:
                message = str(exc)
                good = message.startswith(str(path)) and "\n" not in message and len(message) < 600
                found.append("one line" if good else f"bad message: {message[:100]!r}")
            except Exception as exc:  # what the bench is for: any other exception is a traceback for the user
                found.append(f"{type(exc).__name__}: {str(exc)[:100]}")
    return found


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1624
    results = outcomes("gpu_router_config.yaml", load_config, ConfigError, count, 1) + outcomes(
        "demo-fleet.yaml", load_fleet, ValueError, count, 2
    )
    bad = [r for r in results if r not in ("loaded", "one line")]
    for problem in sorted(set(bad)):
        print(f"  {bad.count(problem)} × {problem}")
    print(
        f"{len(results)} mutations: {results.count('loaded')} load, {results.count('one line')} one-line errors, "
        f"{len(bad)} otherwise (goal 0): {'MET' if not bad else 'MISSED'}"
    )
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
