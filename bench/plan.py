"""Time `gpurouter.decide.placement.plan` on synthetic clusters: 10/100/1000 nodes × 20/100/200 priority models.

Goal: 1,000 nodes × 200 models planned in under 1 s on one core (the median of the rounds). Run:
`python bench/plan.py [--rounds N]`. Each node has 1–4 GPUs of 4–24 GiB, a few idle or busy non-priority
models loaded and about half the models installed; some priority models are already on GPU and some sit on
CPU. Every model's need is known on every node (a state's needs are per node and model, as a poll gives
them). The sizes are timed in interleaved rounds (every size once per round) and each prints the range over
the rounds. Exits 1 when the goal size planned no load (every need unknown: nothing was measured).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpurouter.cluster.config import parse_config
from gpurouter.cluster.ollama import InstalledModel, LoadedModel
from gpurouter.cluster.state import Capacity, ClusterState, GpuInfo, ModelNeed, NodeState
from gpurouter.decide.placement import plan
from gpurouter.units import GIB, MIB

NOW = 1_900_000_000.0


def cluster(nodes: int, models: int, seed: int = 0) -> ClusterState:
    """A random cluster of `nodes` nodes with `models` priority models."""
    rng = random.Random(seed)
    names = [f"model-{i}:latest" for i in range(models)]
    raw = {
        "nodes": [{"name": f"node-{i:04d}", "url": f"http://127.0.0.1:{20000 + i}"} for i in range(nodes)],
        "priority_models": names,
    }
    config = parse_config(raw, "bench.yaml")
    needs = {n: rng.randint(300, 9000) * MIB for n in names}
    states = []
    for cfg in config.nodes:
        gpus = tuple(GpuInfo(g, "GPU", rng.choice((4, 8, 12, 16, 24)) * GIB) for g in range(rng.randint(1, 4)))
        loaded = []
        for j in range(rng.randint(0, 3)):
            expires = NOW - 1 if rng.random() < 0.2 else NOW + rng.randint(10, 3600)
            size = rng.randint(200, 3000) * MIB
            at = datetime.fromtimestamp(expires, tz=timezone.utc)
            loaded.append(LoadedModel(f"other-{j}:latest", size, size, expires_at=at))
        if rng.random() < 0.2:
            name = rng.choice(names)
            loaded.append(LoadedModel(name, needs[name], rng.choice((0, needs[name])), expires_at=None))
        installed = [InstalledModel(n, 1, n) for n in names if rng.random() < 0.5]
        states.append(
            NodeState(cfg, True, 0.8, Capacity("static", gpus), loaded=tuple(loaded), installed=tuple(installed))
        )
    need_map = {
        (node.name, model): ModelNeed(model, size, "configured", 4096, node.name)
        for node in config.nodes
        for model, size in needs.items()
    }
    return ClusterState(config, NOW, tuple(states), MappingProxyType(need_map))


SIZES = [(nodes, models) for nodes in (10, 100, 1000) for models in (20, 100, 200)]
GOAL_SIZE, GOAL_SECONDS = (1000, 200), 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every size once per round)")
    args = parser.parse_args()
    states = {size: cluster(*size) for size in SIZES}
    times: dict[tuple[int, int], list[float]] = {size: [] for size in SIZES}
    results = {}
    for _ in range(max(1, args.rounds)):
        for size in SIZES:
            started = time.perf_counter()
            results[size] = plan(states[size], now=NOW)
            times[size].append(time.perf_counter() - started)
    print(f"{'nodes':>6} {'models':>6} {'plan s (median, min–max)':>26} {'loads':>6} {'evicts':>6} {'unplaced':>8}")
    for size in SIZES:
        result, spread = results[size], times[size]
        evicts = sum(s.action == "evict" for s in result.steps)
        figure = f"{statistics.median(spread):.3f} ({min(spread):.3f}–{max(spread):.3f})"
        print(f"{size[0]:>6} {size[1]:>6} {figure:>26} {len(result.loads):>6} {evicts:>6} {len(result.unplaced):>8}")
    goal = statistics.median(times[GOAL_SIZE])
    met = goal < GOAL_SECONDS
    nodes, models = GOAL_SIZE
    verdict = "MET" if met else "MISSED"
    print(f"goal: {nodes} nodes × {models} models planned in < {GOAL_SECONDS:g} s: median {goal:.3f} s {verdict}")
    if not results[GOAL_SIZE].loads:
        print(f"FAILED: the {nodes} × {models} plan has no load: every need unknown, nothing was measured")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
