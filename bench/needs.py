"""The router's VRAM need beside what a current-era (llama-server) Ollama really reports, for every catalog model.

Each model is loaded alone, fully on GPU, at 4096 and at 32768 tokens on a simulated v0.32 node with an 80 GiB
GPU; its `/api/ps` size is printed beside the need the router computes for that node and context (from
`/api/show`, the `estimated` rung), with Ollama's own admission prediction. The need must be at least the
footprint and within 10 % of it.

    python bench/needs.py
"""

from __future__ import annotations

import sys

import requests

from gpurouter.cluster.config import parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.sizing import catalog
from gpurouter.units import MIB
from simulator.run import Fleet, fleet_from_dict

CONTEXTS = (4096, 32768)


def rows() -> list[tuple[str, int, int, int, int | None]]:
    """(model, context asked, /api/ps size, router need, Ollama's prediction) per catalog model and context."""
    models = [spec.name for spec in catalog.CATALOG]
    node = {"name": "big", "version": "0.32.15", "gpus": [{"vram": "80GiB"}], "models": models, "token_rate": 0}
    out = []
    with Fleet(fleet_from_dict({"nodes": [node]})) as fleet:
        url = fleet.urls["big"]
        for ctx in CONTEXTS:
            config = parse_config({"nodes": [{"name": "big", "url": url, "vram": "80GiB", "context_length": ctx}]})
            with Observer(config) as observer:
                observer.poll()  # asks /api/show
                state = observer.poll()
            for model in models:
                fleet.node("big").scheduler.unload_all()
                spec = catalog.find(model)
                assert spec is not None
                embedder = "embedding" in spec.capabilities
                path, extra = ("/api/embed", {"input": []}) if embedder else ("/api/generate", {})
                body = {**extra, "model": model, "options": {"num_ctx": ctx}, "stream": False}
                requests.post(url + path, json=body, timeout=60).raise_for_status()
                (entry,) = requests.get(url + "/api/ps", timeout=5).json()["models"]
                assert entry["size"] == entry["size_vram"], model
                need = state.need(model, "big")
                assert need is not None and need.source == "estimated", model
                predicted = need.admission.predicted() if need.admission else None
                out.append((model, ctx, entry["size"], need.bytes, predicted))
    return out


def main() -> int:
    table = rows()
    print(f"{'model':<26} {'ctx':>6} {'/api/ps size':>14} {'router need':>14} {'need/size':>9} {'Ollama predicts':>16}")
    worst = 0.0
    for model, ctx, size, need, predicted in table:
        ratio = need / size
        worst = max(worst, ratio)
        shown = f"{predicted:>16,}" if predicted else f"{'–':>16}"
        print(f"{model:<26} {ctx:>6} {size:>14,} {need:>14,} {ratio:>9.4f} {shown}")
    ok = all(size <= need <= size * 1.10 for _, _, size, need, _ in table)
    print(
        f"\n{len(table)} rows; need ≥ size and within 10 %: {'yes' if ok else 'NO'} (largest need/size {worst:.4f}; "
        f"sizes are llama-server's MiB-rounded buffers, {MIB:,} bytes per MiB)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
