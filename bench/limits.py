"""What hostile peers cost the router, against the bounds it sets, in one run:

- `gpu_source: ollama_log` with `yes` as the command (an output that never ends): the time the read takes and
  the memory it allocates (traced), against the poll's timeout and twice the output tail kept;
- eight 32 MiB bodies posted to the proxy at once (in this process, against a simulated fleet; the model is
  unknown, so each body is read whole and answered 404 without a node): the process's peak RSS growth, against
  the body budget plus one body per request admitted (a body is held once more while it is parsed).

Run: `python bench/limits.py`.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpurouter.cluster.config import parse_config  # noqa: E402
from gpurouter.cluster.ollamalog import OUTPUT_TAIL, command_capacity  # noqa: E402
from gpurouter.units import MIB  # noqa: E402
from proxy import limits  # noqa: E402
from proxy.service import start_proxy  # noqa: E402
from simulator.run import Fleet, fleet_from_dict  # noqa: E402


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def endless_command(timeout: float = 2.0) -> bool:
    tracemalloc.start()
    began = time.monotonic()
    capacity = command_capacity(("yes",), timeout)
    took = time.monotonic() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    ok = took < timeout + 0.5 and peak < 2 * OUTPUT_TAIL and not capacity.known
    print(
        f"ollama_log `yes`: answered in {took:.2f} s (timeout {timeout:g} s), {peak / MIB:.0f} MiB allocated at "
        f"most (bound {2 * OUTPUT_TAIL // MIB} MiB): {verdict(ok)} — {capacity.reason}"
    )
    return ok


def peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024  # type: ignore[union-attr]


def eight_bodies(count: int = 8, size: int = 32 * MIB) -> bool:
    nodes = [{"name": "gpu", "gpus": [{"name": "RTX 3070", "vram": "8GiB"}], "models": ["llama3.2:1b"]}]
    body = json.dumps({"model": "nosuch-model", "prompt": "x" * (size - 100)}).encode()
    with Fleet(fleet_from_dict({"nodes": nodes})) as fleet:
        config = parse_config({"nodes": [{"name": "gpu", "url": fleet.urls["gpu"], "vram": "8GiB"}]})
        proxy = start_proxy(config, heal=False)
        codes: list[int] = []
        try:
            before = peak_rss()

            def post() -> None:
                codes.append(requests.post(f"{proxy.url}/api/generate", data=body, timeout=120).status_code)

            threads = [threading.Thread(target=post) for _ in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            grown = peak_rss() - before
        finally:
            proxy.stop()
    admitted = codes.count(404)
    bound = limits.BODY_BUDGET + admitted * size
    ok = grown <= bound and codes.count(503) == count - admitted
    print(
        f"proxy, {count} × {size // MIB} MiB bodies at once: peak RSS +{grown / MIB:.0f} MiB (bound "
        f"{bound // MIB} MiB: budget {limits.BODY_BUDGET // MIB} MiB + one body per request admitted), "
        f"{admitted} read whole (404), {codes.count(503)} refused with 503: {verdict(ok)}"
    )
    return ok


def main() -> int:
    results = [endless_command(), eight_bodies()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
