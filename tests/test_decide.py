"""Unit tests for gpurouter.decide.placement over hand-built ClusterStates: check, route, plan."""

from __future__ import annotations

from datetime import datetime, timezone
from types import MappingProxyType

import pytest

from gpurouter import render
from gpurouter.cluster.config import PriorityModel, parse_config
from gpurouter.cluster.ollama import InstalledModel, LoadedModel
from gpurouter.cluster.state import Capacity, ClusterState, GpuInfo, ModelNeed, NodeState
from gpurouter.decide.placement import check, close_models, eviction_order, is_busy, plan, route
from gpurouter.units import GIB, MIB

NOW = 1_900_000_000.0
FOREVER = NOW + 292 * 365 * 86400


def at(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def lm(name: str, size_mb: int, vram_mb: int | None = None, expires: float | None = FOREVER) -> LoadedModel:
    vram = size_mb if vram_mb is None else vram_mb
    return LoadedModel(name=name, size=size_mb * MIB, size_vram=vram * MIB, expires_at=at(expires))


def node(
    name: str,
    gpus: tuple[int, ...] | None = (4096,),
    *,
    loaded: tuple[LoadedModel, ...] = (),
    installed: tuple[str, ...] = (),
    up: bool = True,
    maintenance: bool = False,
    max_loaded: int | None = None,
) -> dict:
    return {
        "name": name,
        "gpus": gpus,
        "loaded": loaded,
        "installed": installed,
        "up": up,
        "mnt": maintenance,
        "max_loaded": max_loaded,
    }


def build(
    nodes: list[dict], priority: list = (), needs: dict[str, int] | None = None, version: str = "0.12.6"
) -> ClusterState:
    """A state of classic-era nodes (unless `version` says otherwise): gpus None = capacity unknown, () = no
    GPU; needs in MiB (source configured), the same on every node."""
    raw = {
        "nodes": [
            {
                "name": n["name"],
                "url": f"http://127.0.0.1:{11000 + i}",
                "maintenance": n["mnt"],
                **({"max_loaded_models": n["max_loaded"]} if n.get("max_loaded") else {}),
            }
            for i, n in enumerate(nodes)
        ],
        "priority_models": list(priority),
    }
    config = parse_config(raw, "test.yaml")
    states = []
    for spec, cfg in zip(nodes, config.nodes, strict=True):
        gpus = spec["gpus"]
        if gpus is None:
            capacity = Capacity(source="unknown", reason="unknown")
        elif not gpus:
            capacity = Capacity(source="none")
        else:
            capacity = Capacity(source="static", gpus=tuple(GpuInfo(i, f"GPU{i}", g * MIB) for i, g in enumerate(gpus)))
        installed = set(spec["installed"]) | {m.name for m in spec["loaded"]}
        states.append(
            NodeState(
                config=cfg,
                up=spec["up"],
                margin=0.8,
                capacity=capacity,
                error_kind=None if spec["up"] else "refused",
                error=None if spec["up"] else "connection refused",
                loaded=spec["loaded"] if spec["up"] else (),
                installed=tuple(InstalledModel(_key(m), 1, "d" + m) for m in sorted(installed)) if spec["up"] else (),
                version=version if spec["up"] else None,
            )
        )
    per_node = {
        (n.name, _key(k)): ModelNeed(_key(k), v * MIB, "configured", 4096, n.name, n.era)
        for k, v in (needs or {}).items()
        for n in states
    }
    return ClusterState(config=config, taken_at=NOW, nodes=tuple(states), needs=MappingProxyType(per_node))


def _key(name: str) -> str:
    return name if ":" in name else name + ":latest"


def kinds(result) -> dict[str, str]:
    return {v.node: v.kind for v in result.verdicts}


# ---------------------------------------------------------------------------------------------- busy


def test_busy_means_expiry_in_the_past():
    assert is_busy(lm("a", 100, expires=NOW - 1), NOW)
    assert not is_busy(lm("a", 100, expires=NOW + 60), NOW)
    assert not is_busy(lm("a", 100, expires=None), NOW)


def test_eviction_order_soonest_first_forever_and_unknown_last():
    models = [lm("forever", 1), lm("unknown", 1, expires=None), lm("late", 1, expires=NOW + 600)]
    models.append(lm("soon", 1, expires=NOW + 30))
    assert [m.name for m in sorted(models, key=eviction_order)] == ["soon", "late", "forever", "unknown"]


# --------------------------------------------------------------------------------------------- check


def test_guide_example_2_and_3_reasons_read_like_the_guide():
    state = build(
        [node("gpu", loaded=(lm("other", 705),), installed=("mxbai", "llama3.1")), node("cpu", ())],
        needs={"mxbai": 705, "llama3.1": 4700},
    )
    fit = {v.node: v for v in check(state, "mxbai", NOW).verdicts}
    assert fit["gpu"].kind == "fits_free" and fit["gpu"].fits
    assert fit["gpu"].reason == "Fits in 3277 MB VRAM (2572 MB free)"
    assert fit["cpu"].kind == "not_installed"
    big = check(state, "llama3.1", NOW)
    assert kinds(big)["gpu"] == "too_large"
    assert big.verdicts[0].reason == "Model too large (4700 MB > 3277 MB usable VRAM)"
    assert big.result == "Model must run on CPU"


def test_every_rejection_kind_has_its_reason():
    state = build(
        [
            node("down", up=False),
            node("drained", maintenance=True, installed=("m",)),
            node("bare", installed=("other",)),
            node("cpu", (), installed=("m",)),
            node("cpu-running", (), loaded=(lm("m", 900, 0),)),
            node("unknown", None, installed=("m",)),
        ],
        needs={"m": 900},
    )
    result = check(state, "m", NOW)
    assert kinds(result) == {
        "down": "down",
        "drained": "maintenance",
        "bare": "not_installed",
        "cpu": "no_gpu",
        "cpu-running": "cpu",
        "unknown": "capacity_unknown",
    }
    unknown = next(v for v in result.verdicts if v.node == "unknown")
    assert "set vram or gpus for node unknown, or gpu_source" in unknown.reason
    assert not any(v.fits for v in result.verdicts)
    assert "GPU capacity unknown on unknown" in result.result


def test_an_unknown_capacity_is_named_as_the_cause_not_a_gpu_too_small():
    state = build([node("big", None, installed=("m",)), node("cpu", (), installed=("other",))], needs={"m": 900})
    result = check(state, "m", NOW)
    assert result.result == "Unknown whether a GPU can hold it (GPU capacity unknown on big)"
    best = route(state, "m", NOW)
    assert (best.node, best.processor) == ("big", "CPU")
    assert best.reason.startswith("GPU capacity unknown on big; big has the model installed")
    roomless = build([node("gpu", loaded=(lm("busy", 3000, expires=NOW - 1),), installed=("m",))], needs={"m": 900})
    assert route(roomless, "m", NOW).reason.startswith("No room now on gpu; gpu has the model installed")
    assert check(roomless, "m", NOW).result.endswith("it runs on CPU meanwhile")


def test_a_node_name_that_starts_the_reason_keeps_its_case():
    state = build([node("gpu-large", up=False), node("cpu", (), installed=("m",))], needs={"m": 900})
    best = route(state, "m", NOW)
    assert (best.node, best.processor) == ("cpu", "CPU")
    assert best.reason.startswith("gpu-large did not answer; cpu has no GPU"), best.reason


def test_already_on_gpu_wins():
    state = build([node("a", loaded=(lm("m", 900),))], needs={"m": 900})
    result = check(state, "m", NOW)
    assert kinds(result) == {"a": "loaded_on_gpu"} and result.result == "Already on GPU: a"


def test_eviction_names_idle_non_priority_models_soonest_expiring_first():
    loaded = (
        lm("pinned", 1000),  # priority: never evicted
        lm("busy", 500, expires=NOW - 5),  # requests in flight
        lm("late", 600, expires=NOW + 600),
        lm("soon", 600, expires=NOW + 30),
    )
    state = build([node("a", loaded=loaded, installed=("m",), max_loaded=8)], priority=["pinned"], needs={"m": 900})
    verdict = check(state, "m", NOW).verdicts[0]
    # free = 3277 − 2700 = 577; needs 900: evicting "soon" (600) is enough
    assert verdict.kind == "fits_after_eviction" and verdict.evict == ("soon:latest",)
    bigger = build([node("a", loaded=loaded, installed=("m",), max_loaded=8)], priority=["pinned"], needs={"m": 1700})
    verdict = check(bigger, "m", NOW).verdicts[0]
    assert verdict.evict == ("soon:latest", "late:latest")
    blocked = build([node("a", loaded=loaded, installed=("m",), max_loaded=8)], priority=["pinned"], needs={"m": 2000})
    verdict = check(blocked, "m", NOW).verdicts[0]
    assert verdict.kind == "not_enough_free" and not verdict.fits
    assert "busy:latest" in verdict.reason and "pinned:latest" in verdict.reason


def test_loaded_model_limit_counts_like_ollama():
    """Ollama keeps 3 × GPUs models loaded (OLLAMA_MAX_LOADED_MODELS when set): a fourth load on a one-GPU node
    makes it unload one of its own choosing, so the verdict names an idle victim even with memory free, and
    says no when only priority or busy models are loaded."""
    idle = (lm("pinned", 100), lm("a", 100, expires=NOW + 600), lm("b", 100, expires=NOW + 30))
    state = build([node("n", loaded=idle, installed=("m",))], priority=["pinned"], needs={"m": 100})
    verdict = check(state, "m", NOW).verdicts[0]
    assert verdict.kind == "fits_after_eviction" and verdict.evict == ("b:latest",), verdict
    assert "3 models loaded at most" in verdict.reason
    held = (lm("pinned", 100), lm("busy", 100, expires=NOW - 5), lm("other", 100))
    state = build([node("n", loaded=held, installed=("m",))], priority=["pinned", "other"], needs={"m": 100})
    verdict = check(state, "m", NOW).verdicts[0]
    assert verdict.kind == "not_enough_free" and "loaded-model limit (3)" in verdict.reason, verdict.reason
    roomy = build(
        [node("n", loaded=held, installed=("m",), max_loaded=4)], priority=["pinned", "other"], needs={"m": 100}
    )
    assert check(roomy, "m", NOW).verdicts[0].kind == "fits_free"
    state = build([node("n", loaded=idle, installed=("m",))], priority=["pinned"], needs={"m": 100})
    steps = plan(state, [PriorityModel("m")], NOW).steps
    assert [(s.action, s.model) for s in steps] == [("evict", "b:latest"), ("load", "m:latest")], steps


def test_partial_copy_here_can_be_reloaded_in_place_unless_busy():
    state = build([node("a", loaded=(lm("m", 3000, 1000),))], needs={"m": 3000})
    verdict = check(state, "m", NOW).verdicts[0]
    assert verdict.kind == "fits_free" and verdict.in_place and "33% on GPU" in verdict.reason
    busy = build([node("a", loaded=(lm("m", 3000, 1000, expires=NOW - 1),))], needs={"m": 3000})
    assert check(busy, "m", NOW).verdicts[0].kind == "not_enough_free"


def test_multi_gpu_fits_on_one_gpu_or_split_with_reserve():
    state = build(
        [node("duo", (4096, 4096), installed=("small", "split", "huge"))],
        needs={"small": 3000, "split": 5000, "huge": 6300},
    )
    assert check(state, "small", NOW).verdicts[0].need == 3000 * MIB
    split = check(state, "split", NOW).verdicts[0]
    assert split.kind == "fits_free" and split.need == 5000 * MIB + 457 * MIB
    assert check(state, "huge", NOW).verdicts[0].kind == "too_large"


def test_unknown_size_is_reported():
    state = build([node("a", installed=("mystery",))])
    verdict = check(state, "mystery", NOW).verdicts[0]
    assert verdict.kind == "size_unknown" and "model_sizes" in verdict.reason


def test_catalog_need_used_for_models_the_state_does_not_know():
    state = build([node("a", installed=("llama3.1",))])
    result = check(state, "llama3.1:latest", NOW)
    assert result.needs["a"].source == "catalog" and result.needs["a"].era == "classic"
    assert kinds(result) == {"a": "too_large"}


# --------------------------------------------------------------------------------------------- route


def test_route_preference_order_and_most_free_vram():
    need = {"m": 1000}
    loaded_there = build([node("big", (8192,), installed=("m",)), node("hot", loaded=(lm("m", 1000),))], needs=need)
    assert route(loaded_there, "m", NOW).node == "hot"
    free = build(
        [node("small", installed=("m",)), node("big", (8192,), installed=("m",))],
        needs=need,
    )
    r = route(free, "m", NOW)
    assert (r.node, r.processor) == ("big", "GPU") and r.reason.startswith("Fits in 6554 MB VRAM")
    evict = build(
        [
            node("full", (8192,), loaded=(lm("x", 6000, expires=NOW + 60),), installed=("m",)),
            node("roomy", installed=("m",)),
        ],
        needs=need,
    )
    assert route(evict, "m", NOW).node == "roomy"  # fits free beats fits after eviction
    tie = build([node("b", installed=("m",)), node("a", installed=("m",))], needs=need)
    assert route(tie, "m", NOW).node == "a"


def test_route_cpu_fallback_prefers_a_node_without_gpu_and_explains():
    state = build(
        [
            node("gpu", installed=("llama3.1",)),
            node("cpu2", (), loaded=(lm("other", 2000, 0),), installed=("llama3.1",)),
            node("cpu1", (), installed=("llama3.1",)),
        ],
        needs={"llama3.1": 4700},
    )
    r = route(state, "llama3.1", NOW)
    assert (r.node, r.processor) == ("cpu1", "CPU")
    assert "cpu1 has no GPU" in r.reason and "0 MB held in RAM" in r.reason


def test_route_nowhere_when_not_installed_on_any_up_node():
    state = build([node("a", installed=("x",)), node("b", up=False)], needs={"m": 100})
    r = route(state, "m", NOW)
    assert r.node is None and r.processor is None and "not installed" in r.reason


def test_route_never_targets_maintenance_or_down_nodes():
    state = build(
        [node("drained", (8192,), maintenance=True, installed=("m",)), node("small", installed=("m",))],
        needs={"m": 1000},
    )
    assert route(state, "m", NOW).node == "small"


# ---------------------------------------------------------------------------------------------- plan


def test_plan_skips_models_already_on_gpu():
    state = build([node("a", loaded=(lm("m", 900),))], priority=["m"], needs={"m": 900})
    result = plan(state, now=NOW)
    assert result.steps == () and result.already == (("m:latest", "a"),) and result.unplaced == ()


def test_plan_moves_cpu_copy_to_gpu_then_removes_it():
    state = build(
        [node("cpu", (), loaded=(lm("m", 900, 0),)), node("gpu", installed=("m",))],
        priority=[{"name": "m", "num_ctx": 8192}],
        needs={"m": 900},
    )
    steps = plan(state, now=NOW).steps
    assert [(s.action, s.node) for s in steps] == [("load", "gpu"), ("unload", "cpu")]
    assert steps[0].num_ctx == 8192 and steps[0].keep_alive == -1


def test_plan_evicts_shortest_keep_alive_first_and_never_priority_or_busy():
    loaded = (
        lm("p2", 1000),
        lm("busy", 700, expires=NOW - 1),
        lm("forever", 700),
        lm("soon", 500, expires=NOW + 10),
    )
    state = build([node("a", loaded=loaded, installed=("p1",))], priority=["p1", "p2"], needs={"p1": 1200})
    steps = plan(state, now=NOW).steps
    # free = 3277 − 2900 = 377; needs 1200: evict soon (500), then forever (700)
    assert [(s.action, s.model) for s in steps] == [
        ("evict", "soon:latest"),
        ("evict", "forever:latest"),
        ("load", "p1:latest"),
    ]


def test_plan_never_touches_maintenance_down_or_unknown_nodes():
    idle = (lm("idle", 3000, expires=NOW + 10),)
    state = build(
        [
            node("drained", maintenance=True, loaded=idle, installed=("p",)),
            node("unknown", None, loaded=idle, installed=("p",)),
            node("down", up=False),
        ],
        priority=["p"],
        needs={"p": 2000},
    )
    result = plan(state, now=NOW)
    assert result.steps == ()
    assert result.unplaced[0][0] == "p:latest" and "no node can hold it on GPU" in result.unplaced[0][1]


def test_plan_leaves_room_for_later_models():
    # big node has the most free VRAM, but only it can hold "large": "small" must go to the small node
    state = build(
        [node("small", installed=("small",)), node("big", (8192,), installed=("small", "large"))],
        priority=["small", "large"],
        needs={"small": 2000, "large": 5000},
    )
    loads = {s.model: s.node for s in plan(state, now=NOW).loads}
    assert loads == {"small:latest": "small", "large:latest": "big"}


def test_plan_higher_priority_first_when_not_everything_fits():
    state = build(
        [node("a", installed=("p1", "p2", "p3"))],
        priority=["p1", "p2", "p3"],
        needs={"p1": 2000, "p2": 2000, "p3": 1000},
    )
    result = plan(state, now=NOW)
    assert [s.model for s in result.loads] == ["p1:latest", "p3:latest"]
    assert result.unplaced[0][0] == "p2:latest" and "no room left" in result.unplaced[0][1]


def test_plan_reloads_in_place_when_that_is_the_only_gpu():
    state = build([node("ws", loaded=(lm("p", 1500, 300),))], priority=["p"], needs={"p": 1500})
    steps = plan(state, now=NOW).steps
    # no unload of ours before the GPU copy exists: a load with every layer on GPU makes Ollama swap the runner
    assert [(s.action, s.model, s.node, s.num_gpu) for s in steps] == [("load", "p:latest", "ws", 999)]
    assert "reloading its 20%-on-GPU copy in place" in steps[0].reason


def test_plan_prefers_another_node_over_reloading_in_place():
    state = build(
        [node("a", (8192,), loaded=(lm("p", 1500, 300),)), node("b", installed=("p",))],
        priority=["p"],
        needs={"p": 1500},
    )
    steps = plan(state, now=NOW).steps
    assert [(s.action, s.node) for s in steps] == [("load", "b"), ("unload", "a")]


def test_plan_with_explicit_models_still_protects_configured_priorities():
    loaded = (lm("p1", 3000, expires=NOW + 5),)
    state = build([node("a", loaded=loaded, installed=("x",))], priority=["p1"], needs={"x": 1000})
    result = plan(state, [PriorityModel("x")], now=NOW)
    assert result.steps == () and result.unplaced[0][0] == "x:latest"


@pytest.mark.parametrize("gib", [4, 8])
def test_plan_uses_catalog_needs(gib):
    state = build([node("a", (gib * 1024,), installed=("llama3.1",))], priority=["llama3.1"])
    result = plan(state, now=NOW)
    placed = [s.model for s in result.loads]
    assert placed == (["llama3.1:latest"] if gib * GIB * 0.8 > 5817 * MIB else [])


def test_did_you_mean_offers_the_names_that_begin_with_the_one_given_first():
    state = build([node("a", installed=("llama3.1:latest", "mxbai-embed-large:latest", "llama3.2:1b", "llama3.2:3b"))])
    assert close_models(state, "mxbai")[0] == "mxbai-embed-large:latest"  # not llama3.1, alike only in ":latest"
    assert close_models(state, "llama3.2") == ["llama3.2:1b", "llama3.2:3b"]
    assert close_models(state, "nope") == []  # nothing is close: no distant cousin
    assert close_models(state, "mxbai-embed-larg") == ["mxbai-embed-large:latest"]


def test_a_catalog_name_installed_nowhere_is_offered_as_what_it_is():
    state = build([node("a", installed=("llama3.1:latest",))])
    assert close_models(state, "nomic-embed-txt") == ["nomic-embed-text:latest"]
    assert "(did you mean nomic-embed-text:latest, known but installed on no node?)" in render.unknown_model_text(
        state, "nomic-embed-txt"
    )


def test_a_model_installed_only_under_other_tags_is_offered_them():
    state = build([node("a", installed=("llama3.2:1b",)), node("b", installed=("llama3.2:3b",))])
    result = check(state, "llama3.2", NOW)
    assert result.code == "nowhere"
    assert result.result.endswith(
        "not installed on any node that is up and not in maintenance (did you mean llama3.2:1b, llama3.2:3b?)"
    ), result.result
    assert route(state, "llama3.2", NOW).reason == result.result


def test_with_every_node_down_a_priority_model_gets_no_other_names():
    state = build([node("a", up=False), node("b", up=False)], priority=["nomic-embed-text", "mxbai-embed-large"])
    for model in ("nomic-embed-text", "mxbai-embed-large"):
        assert render.not_installed_text(state, model) == "unknown whether it is installed: no node answered"
    assert not any("did you mean" in line for line in render.status_text(state, NOW))
