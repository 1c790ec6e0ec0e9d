"""Time `gpu_source: ollama_log` on a large server log: the first read of the whole file, then a read of
the lines appended since (what every later poll does).

The log holds three starts written by the simulator's `serverlog`, each followed by request lines (GIN and
slog lines of a busy server). Run: `python bench/ollamalog.py [--mib 100]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpurouter.cluster.ollamalog import LogFile, file_capacity
from gpurouter.units import GIB, MIB
from simulator.fleet import GpuSpec, NodeSpec
from simulator.scheduler import GpuUsage
from simulator.serverlog import start_lines

BUSY = (
    'time=2026-08-20T10:00:01.000+02:00 level=INFO source=server.go:1234 msg="llama runner started in 2.01 seconds"\n'
    '[GIN] 2026/08/20 - 10:00:05 | 200 |      50.263µs |       127.0.0.1 | GET      "/api/ps"\n'
) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--mib", type=int, default=100, help="size of the log (default 100 MiB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ollama.log"
        with path.open("w", encoding="utf-8") as log:
            for start, vram in enumerate((8 * GIB, 12 * GIB, 24 * GIB)):
                spec = NodeSpec(name="bench", port=0, gpus=(GpuSpec("RTX", vram),), version="0.32.15")
                gpus = [GpuUsage(0, "RTX", vram, 0, vram)]
                log.write("\n".join(start_lines(spec, (0, 32, 15), gpus, "http://127.0.0.1:11434", 1.8e9 + start)))
                log.write("\n" + BUSY * max(1, args.mib * MIB // (3 * len(BUSY))))
        reader = LogFile(path)
        began = time.perf_counter()
        capacity = file_capacity(reader)
        first = time.perf_counter() - began
        with path.open("a", encoding="utf-8") as log:
            log.write(BUSY)
        began = time.perf_counter()
        again = file_capacity(reader)
        later = time.perf_counter() - began
        size = path.stat().st_size / MIB
    assert capacity.total == again.total == 24 * GIB, capacity.reason
    appended = len(BUSY) // 1024
    print(f"log {size:.0f} MiB: first read {first * 1000:.0f} ms, next read (+{appended} KiB) {later * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
