"""plan() against brute force on random small clusters: it must put on GPU exactly the models that the best
priority-respecting assignment does (lexicographically best by priority order), with valid steps."""

from __future__ import annotations

import itertools
import random
from datetime import datetime, timezone
from types import MappingProxyType

import pytest

from gpurouter.cluster.config import model_key, parse_config
from gpurouter.cluster.ollama import InstalledModel, LoadedModel
from gpurouter.cluster.state import Capacity, ClusterState, GpuInfo, ModelNeed, NodeState
from gpurouter.decide.placement import plan
from gpurouter.units import MIB

NOW = 1_900_000_000.0
RESERVE = 457 * MIB
MARGIN = 0.8
GPU_CHOICES = [None, (), (2048,), (3072,), (4096,), (6144,), (2048, 2048), (4096, 2048)]


def _loaded(name: str, size: int, vram: int, busy: bool, forever: bool, rng: random.Random) -> LoadedModel:
    expires = NOW - 1 if busy else (NOW + 292 * 365 * 86400 if forever else NOW + rng.randint(1, 900))
    return LoadedModel(name, size, vram, expires_at=datetime.fromtimestamp(expires, tz=timezone.utc))


def random_cluster(seed: int) -> ClusterState:
    rng = random.Random(seed)
    priority = [f"p{i}:latest" for i in range(rng.randint(1, 5))]
    others = [f"o{i}:latest" for i in range(3)]
    n_nodes = rng.randint(1, 4)
    raw = {
        "nodes": [
            {
                "name": f"n{i}",
                "url": f"http://127.0.0.1:{12000 + i}",
                "maintenance": rng.random() < 0.1,
                "max_loaded_models": 16,  # memory is what this compares; the loaded-model limit has its own tests
            }
            for i in range(n_nodes)
        ],
        "priority_models": priority,
    }
    config = parse_config(raw, "random.yaml")
    needs = {p: rng.choice([300, 800, 1200, 1800, 2500, 3200, 4500]) * MIB for p in priority}
    nodes = []
    for cfg in config.nodes:
        gpus = rng.choice(GPU_CHOICES)
        up = rng.random() > 0.1
        if gpus is None:
            capacity = Capacity(source="unknown")
        elif not gpus:
            capacity = Capacity(source="none")
        else:
            capacity = Capacity(source="static", gpus=tuple(GpuInfo(i, "g", g * MIB) for i, g in enumerate(gpus)))
        usable = int(sum(gpus or ()) * MIB * MARGIN)
        installed = {p for p in priority if rng.random() < 0.7}
        loaded = []
        for name in others:
            if rng.random() < 0.4:
                size = rng.choice([200, 500, 900, 1500]) * MIB
                vram = size if gpus and rng.random() < 0.8 else 0
                loaded.append(_loaded(name, size, vram, rng.random() < 0.3, rng.random() < 0.3, rng))
        for p in priority:
            if rng.random() < 0.2:
                size = needs[p]
                vram = rng.choice([0, size // 3, size]) if gpus else 0
                loaded.append(_loaded(p, size, vram, rng.random() < 0.2, True, rng))
        used = sum(m.size_vram for m in loaded)
        if gpus and used > usable * 1.1:  # keep clusters plausible: Ollama fills at most the card
            loaded = [m for m in loaded if m.size_vram == 0]
        names = sorted(installed | {m.name for m in loaded})
        nodes.append(
            NodeState(
                config=cfg,
                up=up,
                margin=MARGIN,
                capacity=capacity,
                loaded=tuple(loaded) if up else (),
                installed=tuple(InstalledModel(n, 1, "d" + n) for n in names) if up else (),
                version="0.12.6" if up else None,  # the classic era: room is additive
            )
        )
    need_map = {
        (n.name, k): ModelNeed(k, v, "configured", 4096, n.name, n.era) for k, v in needs.items() for n in nodes
    }
    return ClusterState(config, NOW, tuple(nodes), MappingProxyType(need_map))


def _gpus(node: NodeState) -> list[int]:
    return [g.total for g in node.capacity.gpus]


def _eligible_size(state: ClusterState, node: NodeState, model: str) -> int | None:
    """Bytes `model` takes on `node` as a target, or None when it cannot go there (written from the rules)."""
    if not node.up or node.config.maintenance or node.capacity.source in ("unknown", "none"):
        return None
    copy = next((m for m in node.loaded if m.name == model), None)
    if copy is None and not any(m.name == model for m in node.installed):
        return None
    need = state.needs[(node.name, model)].bytes
    gpus = _gpus(node)
    if need > max(int(g * MARGIN) for g in gpus) and len(gpus) > 1:
        need += RESERVE * (len(gpus) - 1)
    if copy is not None:
        if copy.expires_at.timestamp() < NOW:
            return None
        need = max(0, need - copy.size_vram)
    return need


def _capacity(state: ClusterState, node: NodeState) -> int:
    priority = {model_key(p.name) for p in state.config.priority_models}
    usable = int(sum(_gpus(node)) * MARGIN)
    used = sum(m.size_vram for m in node.loaded)
    idle = sum(m.size_vram for m in node.loaded if m.name not in priority and m.expires_at.timestamp() >= NOW)
    return usable - used + idle


def brute_force(state: ClusterState) -> set[str]:
    """The lexicographically best set of placeable priority models, by trying every assignment."""
    live = [n for n in state.nodes if n.up and not n.config.maintenance]
    already = {m.name for n in live for m in n.loaded if m.size_vram >= m.size > 0}
    todo = [model_key(p.name) for p in state.config.priority_models if model_key(p.name) not in already]
    choices = [[None] + [n.name for n in state.nodes if _eligible_size(state, n, m) is not None] for m in todo]
    best: tuple[bool, ...] = tuple(False for _ in todo)
    for assignment in itertools.product(*choices):
        load: dict[str, int] = {}
        for model, target in zip(todo, assignment, strict=True):
            if target is not None:
                load[target] = load.get(target, 0) + _eligible_size(state, state.node(target), model)
        if all(total <= _capacity(state, state.node(name)) for name, total in load.items()):
            best = max(best, tuple(t is not None for t in assignment))
    return {m for m, placed in zip(todo, best, strict=True) if placed}


def check_steps(state: ClusterState, result) -> None:
    """Every eviction is of an idle non-priority model, every node's loads fit what it frees, unloads last."""
    priority = {model_key(p.name) for p in state.config.priority_models}
    loaded_models = {m.model for m in result.loads}
    balance: dict[str, int] = {}
    for step in result.steps:
        node = state.node(step.node)
        assert node.up and not node.config.maintenance
        copy = node.loaded_model(step.model)
        if step.action == "evict":
            assert copy is not None and copy.expires_at.timestamp() >= NOW
            assert step.model not in priority
            balance[step.node] = balance.get(step.node, 0) + copy.size_vram
        elif step.action == "load":
            balance[step.node] = balance.get(step.node, 0) - _eligible_size(state, node, step.model)
            if copy is not None:  # reload in place: Ollama swaps the runner, freeing the old copy's VRAM
                assert step.num_gpu is not None
                balance[step.node] = balance.get(step.node, 0) + copy.size_vram
            assert balance[step.node] + (int(sum(_gpus(node)) * MARGIN) - node.vram_used) >= 0
        else:
            assert step.model in loaded_models and copy is not None and not copy.fully_on_gpu
            loads = [i for i, s in enumerate(result.steps) if s.action == "load" and s.model == step.model]
            assert loads and loads[0] < result.steps.index(step)


@pytest.mark.parametrize("batch", range(10))
def test_plan_matches_brute_force(batch):
    for seed in range(batch * 30, batch * 30 + 30):  # 300 clusters in all
        state = random_cluster(seed)
        result = plan(state, now=NOW)
        placed = {s.model for s in result.loads}
        assert placed == brute_force(state), f"seed {seed}"
        check_steps(state, result)
        assert len(placed) + len(result.unplaced) + len(result.already) == len(state.config.priority_models)


def test_random_clusters_exercise_the_hard_cases():
    """The generator is not trivial: some clusters need evictions, in-place reloads and leave models out."""
    actions, unplaced, moved = set(), 0, 0
    for seed in range(300):
        state = random_cluster(seed)
        result = plan(state, now=NOW)
        actions.update(s.action for s in result.steps)
        unplaced += bool(result.unplaced)
        moved += any(s.action == "load" and s.num_gpu is not None for s in result.steps)
    assert actions == {"evict", "load", "unload"} and unplaced > 20 and moved > 0
