"""The router's VRAM need beside what the simulator's own model of Ollama reports, for every catalog model.

The two are written apart: the router sizes with `gpurouter.sizing`; the simulator with its own model of
Ollama's scheduler and llama.cpp's buffers (simulator/classic.py, admission.py, llamacpp.py, its own model data
in simulator/models.yaml), calibrated on the reference's worked figures (tests/test_simulator_calibration.py).
Each model is loaded alone, fully on GPU, at 4096 and 32768 tokens on a simulated node of each era (classic
v0.12.10, layout v0.20.0, llama-server v0.32.15) with an 80 GiB GPU; its `/api/ps` size is printed beside the
need the router computes for that node and context (from `/api/show`, the `estimated` rung). Goal: every need
within 10 % of the size; the rows beyond it are named, and `under` marks a need below the size (the router
would think a model fits where it does not quite).

    python bench/needs.py
"""

from __future__ import annotations

import sys

import requests

from gpurouter.cluster.config import parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.sizing import catalog
from simulator.run import Fleet, fleet_from_dict

CONTEXTS = (4096, 32768)
ERAS = {"classic": "0.12.10", "layout": "0.20.0", "llama-server": "0.32.15"}  # node name → version
GOAL = 0.10

Row = tuple[str, str, int, int, int, int | None]  # era, model, context asked, /api/ps size, need, Ollama's prediction


def _loaded_size(url: str, model: str, ctx: int, embedder: bool) -> int:
    path, extra = ("/api/embed", {"input": []}) if embedder else ("/api/generate", {})
    body = {**extra, "model": model, "options": {"num_ctx": ctx}, "stream": False}
    requests.post(url + path, json=body, timeout=60).raise_for_status()
    (entry,) = requests.get(url + "/api/ps", timeout=5).json()["models"]
    assert entry["size"] == entry["size_vram"], model  # fully on GPU
    return entry["size"]


def rows() -> list[Row]:
    """One row per era, catalog model and context."""
    models = [spec.name for spec in catalog.CATALOG]
    nodes = [
        {"name": era, "version": v, "gpus": [{"vram": "80GiB"}], "models": models, "token_rate": 0}
        for era, v in ERAS.items()
    ]
    out: list[Row] = []
    with Fleet(fleet_from_dict({"nodes": nodes})) as fleet:
        for ctx in CONTEXTS:
            config = parse_config(
                {"nodes": [{"name": e, "url": fleet.urls[e], "vram": "80GiB", "context_length": ctx} for e in ERAS]}
            )
            with Observer(config) as observer:
                observer.poll()  # asks /api/show
                state = observer.poll()
            for era in ERAS:
                for model in models:
                    fleet.node(era).scheduler.unload_all()
                    spec = catalog.find(model)
                    assert spec is not None
                    size = _loaded_size(fleet.urls[era], model, ctx, "embedding" in spec.capabilities)
                    need = state.need(model, era)
                    assert need is not None and need.source == "estimated", model
                    predicted = need.admission.predicted() if need.admission else None
                    out.append((era, model, ctx, size, need.bytes, predicted))
                fleet.node(era).scheduler.unload_all()
    return out


def beyond_goal(table: list[Row]) -> list[Row]:
    """The rows where the router's need and the simulator's size differ by more than the goal."""
    return [row for row in table if abs(row[4] - row[3]) > GOAL * row[3]]


def main() -> int:
    table = rows()
    print(f"{'era':<13} {'model':<25} {'ctx':>6} {'/api/ps size':>14} {'router need':>14} {'need/size':>9}")
    for era, model, ctx, size, need, _ in table:
        mark = "  under" if need < size else ""
        print(f"{era:<13} {model:<25} {ctx:>6} {size:>14,} {need:>14,} {need / size:>9.4f}{mark}")
    ratios = [need / size for _, _, _, size, need, _ in table]
    off = beyond_goal(table)
    under = sum(need < size for _, _, _, size, need, _ in table)
    print(
        f"\n{len(table)} rows; need/size from {min(ratios):.4f} to {max(ratios):.4f}; {under} rows under the size; "
        f"goal: every need within {GOAL:.0%} of the simulator's size: {'MET' if not off else 'MISSED'}"
    )
    for era, model, ctx, size, need, _ in off:
        print(f"  beyond the goal: {era} {model} at {ctx} tokens: need {need:,} for size {size:,}")
    return 0 if not off else 1


if __name__ == "__main__":
    sys.exit(main())
