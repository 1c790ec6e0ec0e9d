"""A fleet that mixes Ollama eras: each node is judged by the Ollama it runs. `check --json` gives every node
the context and the need its own Ollama uses, and the fit gauges agree with what the simulator then really
does when the model is loaded there, cell by cell."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from cli.main import main
from exporter.collector import cluster_families
from gpurouter.cluster.config import parse_config
from gpurouter.cluster.observe import Observer
from simulator.run import Fleet, fleet_from_dict

MODELS = ["llama3.1:8b", "codellama:7b", "codellama:13b", "llama3.2:3b", "qwen2.5-coder:7b", "mxbai-embed-large"]
NODES = [
    {"name": "classic-8", "version": "0.12.6", "gpus": [{"vram": "8GiB"}]},
    {"name": "current-8", "version": "0.32.15", "gpus": [{"vram": "8GiB"}]},
    {"name": "current-24", "version": "0.32.15", "gpus": [{"vram": "24GiB"}]},
    {"name": "cpu", "version": "0.32.15", "gpus": []},
]
VRAM = {"classic-8": "8GiB", "current-8": "8GiB", "current-24": "24GiB", "cpu": 0}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    nodes = [{**n, "models": MODELS, "token_rate": 0} for n in NODES]
    with Fleet(fleet_from_dict({"nodes": nodes})) as running:
        yield running


def config_file(fleet: Fleet, tmp_path: Path, margin: float = 0.8) -> Path:
    raw = {
        "nodes": [{"name": n, "url": fleet.urls[n], "vram": VRAM[n]} for n in fleet.urls],
        "vram_safety_margin": margin,
        "request_timeout": 5,
    }
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def gauges(config: Path) -> dict[tuple[str, str, str], float]:
    """(metric, node, model) → value of the fit and need gauges, after /api/show has been read."""
    with Observer(parse_config(yaml.safe_load(config.read_text()))) as observer:
        observer.poll()  # the first poll asks /api/show; the second estimates from it
        state = observer.poll()
        out = {}
        for family in cluster_families(state, "test", 0.0):
            for s in family.samples:
                if "node" in s.labels and "model" in s.labels:
                    out[(s.name, s.labels["node"], s.labels["model"])] = s.value
        return out


def load_alone(fleet: Fleet, node: str, model: str) -> dict:
    """Load `model` the way a client does (no options) on an otherwise empty node; its /api/ps entry."""
    fleet.node(node).scheduler.unload_all()
    url = fleet.urls[node]
    if "embed" in model:
        reply = requests.post(url + "/api/embed", json={"model": model, "input": []}, timeout=30)
    else:
        reply = requests.post(url + "/api/generate", json={"model": model, "prompt": "", "stream": False}, timeout=30)
    assert reply.status_code == 200, reply.text
    (entry,) = requests.get(url + "/api/ps", timeout=5).json()["models"]
    fleet.node(node).scheduler.unload_all()
    return entry


def test_check_gives_each_node_the_context_and_need_of_its_own_ollama(fleet, tmp_path, capsys):
    config = config_file(fleet, tmp_path)
    main(["--config", str(config), "check", "llama3.1:8b", "--json"])  # first read: /api/show gets asked
    capsys.readouterr()
    assert main(["--config", str(config), "check", "llama3.1:8b", "--json"]) == 0
    needs = {n["node"]: n for n in json.loads(capsys.readouterr().out)["needs"]}
    assert set(needs) == {"classic-8", "current-8", "current-24"}  # a CPU node has no GPU need
    expected = {
        "classic-8": ("classic", 4096, "default"),
        "current-8": ("llama_server", 4096, "vram tier"),
        "current-24": ("llama_server", 32768, "vram tier"),
    }
    for node, (era, ctx, why) in expected.items():
        need = needs[node]
        assert (need["era"], need["num_ctx"], need["context_source"]) == (era, ctx, why)
        ps = load_alone(fleet, node, "llama3.1:8b")
        assert ps["context_length"] == ctx  # the context its Ollama really gives the model
        assert abs(need["bytes"] - ps["size"]) <= ps["size"] * 0.10  # within 10 % of what its Ollama takes
    assert needs["classic-8"]["bytes"] == 6_099_560_448  # ollama-api.md §5.5
    assert needs["current-24"]["predicted_bytes"] == 10_021_026_992  # ollama-current.md §2.1


@pytest.mark.parametrize("margin", [0.8, 1.0])
def test_fit_gauges_agree_with_what_each_node_really_does(fleet, tmp_path, margin):
    values = gauges(config_file(fleet, tmp_path, margin))
    agree = disagree = 0
    for node in ("classic-8", "current-8", "current-24", "cpu"):
        for model in MODELS:
            key = f"{model}:latest" if ":" not in model else model
            fits = values[("gpu_router_model_fits", node, key)]
            assert values[("gpu_router_model_fits_free", node, key)] == fits  # the node is empty
            entry = load_alone(fleet, node, model)
            full = entry["size_vram"] == entry["size"] > 0
            if margin == 1.0:
                assert bool(fits) == full, (node, model, entry)  # Ollama's own rules, nothing stricter
            else:
                assert full or not fits, (node, model, entry)  # the operator's margin may only be stricter
            if node != "cpu" and (("gpu_router_model_required_bytes", node, key) not in values):
                pytest.fail(f"no need published for {model} on {node}")
            agree += bool(fits) == full
            disagree += bool(fits) != full
    assert agree >= 20  # the fleet has both kinds of cells
    assert (disagree == 0) if margin == 1.0 else True
