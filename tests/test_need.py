"""The VRAM-need ladder: observed > estimated > configured > disk > catalog, pinned to the reference figures."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from test_estimate import COLUMN_C, EMBEDDERS

from exporter import catalog, estimate
from exporter.config import parse_config
from exporter.need import RESERVE, Facts, NeedLedger, context_for, default_context, model_need
from exporter.ollama import InstalledModel, LoadedModel, ShowInfo
from exporter.state import UNKNOWN, NodeState
from exporter.units import GIB, MIB

# reference/ollama-api.md §7 column C (num_ctx 4096 × parallel 1) and the embedding table (capped context).
REFERENCE = COLUMN_C | {name: size for name, (_, _, size) in EMBEDDERS.items()}
# §5.5: llama3.1:8b fully on one GPU at num_ctx × 1.
WORKED = {2048: 5_783_412_736, 4096: 6_099_560_448, 8192: 6_930_032_640}


def within_1pct(value: int, expected: int) -> bool:
    return abs(value - expected) <= 0.01 * expected


def show_of(name: str, *, tensors: bool = True, parameters: str = "") -> ShowInfo:
    """What /api/show answers for a catalog model."""
    spec = catalog.find(name)
    assert spec is not None
    raw = {"model_info": spec.model_info(), "capabilities": list(spec.capabilities), "parameters": parameters}
    if tensors:
        raw["tensors"] = [dict(t) for t in spec.tensors]
    return ShowInfo(
        capabilities=spec.capabilities,
        details=MappingProxyType({}),
        model_info=MappingProxyType(raw["model_info"]),
        tensors=tuple(MappingProxyType(t) for t in raw.get("tensors", ())),
        parameters=parameters,
        raw=MappingProxyType(raw),
    )


def test_all_catalog_models_are_pinned() -> None:
    assert {spec.name for spec in catalog.CATALOG} == set(REFERENCE)


# ---------------------------------------------------------------------------------------- single rungs


@pytest.mark.parametrize(("name", "expected"), sorted(REFERENCE.items()))
def test_catalog_rung_matches_the_reference(name: str, expected: int) -> None:
    need = model_need(name, Facts(observed={}), default_ctx=4096)
    assert need is not None and need.source == "catalog"
    assert within_1pct(need.bytes, expected), (need.bytes, expected)


@pytest.mark.parametrize(("name", "expected"), sorted(REFERENCE.items()))
def test_estimated_rung_from_show_matches_the_reference(name: str, expected: int) -> None:
    spec = catalog.find(name)
    assert spec is not None
    params = f"num_ctx                        {spec.default_num_ctx}" if spec.default_num_ctx else ""
    need = model_need(name, Facts(observed={}, show=show_of(name, parameters=params)), default_ctx=4096)
    assert need is not None and need.source == "estimated"
    assert within_1pct(need.bytes, expected), (need.bytes, expected)


def test_estimated_rung_without_tensors_uses_the_disk_size() -> None:
    spec = catalog.find("llama3.1:8b")
    assert spec is not None
    facts = Facts(observed={}, show=show_of("llama3.1:8b", tensors=False), disk_size=spec.tags_size)
    need = model_need("llama3.1:latest", facts, default_ctx=4096)
    assert need is not None and need.source == "estimated"
    assert abs(need.bytes - REFERENCE["llama3.1:8b"]) <= 0.02 * REFERENCE["llama3.1:8b"]
    no_disk = model_need("llama3.1:latest", Facts(observed={}, show=show_of("llama3.1:8b", tensors=False)), 4096)
    assert no_disk is not None and no_disk.source == "catalog"  # the show alone cannot size it


@pytest.mark.parametrize(("num_ctx", "expected"), sorted(WORKED.items()))
def test_worked_example_at_the_configured_context(num_ctx: int, expected: int) -> None:
    show = show_of("llama3.1:8b")
    need = model_need("llama3.1:latest", Facts(observed={}, show=show, num_ctx=num_ctx), default_ctx=4096)
    assert need is not None and (need.source, need.num_ctx) == ("estimated", num_ctx)
    assert within_1pct(need.bytes, expected)
    catalog_need = model_need("llama3.1:latest", Facts(observed={}, num_ctx=num_ctx), default_ctx=4096)
    assert catalog_need is not None and within_1pct(catalog_need.bytes, expected)


# ------------------------------------------------------------------------------------------ the ladder


def test_observed_wins_only_at_the_same_context() -> None:
    show = show_of("llama3.1:8b")
    facts = Facts(observed={4096: 6_000_000_000, 8192: 7_000_000_000}, show=show, num_ctx=8192)
    need = model_need("llama3.1:latest", facts, default_ctx=4096)
    assert need is not None and (need.source, need.bytes, need.num_ctx) == ("observed", 7_000_000_000, 8192)
    elsewhere = Facts(observed={2048: 1}, show=show)
    need = model_need("llama3.1:latest", elsewhere, default_ctx=4096)
    assert need is not None and need.source == "estimated"


def test_observed_context_is_the_capped_one() -> None:
    facts = Facts(observed={512: 1_000_000_000})  # all-minilm loaded with its Modelfile 2048, capped at 512
    need = model_need("all-minilm", facts, default_ctx=4096)
    assert need is not None and (need.source, need.bytes, need.num_ctx) == ("observed", 1_000_000_000, 512)


def test_configured_beats_disk_and_catalog() -> None:
    facts = Facts(observed={}, configured=2500 * MIB, disk_size=GIB)
    need = model_need("llama3.1:latest", facts, default_ctx=4096)
    assert need is not None and (need.source, need.bytes) == ("configured", 2500 * MIB)


def test_disk_adds_kv_cache_and_reserve() -> None:
    spec = catalog.find("llama3.1:8b")
    assert spec is not None
    need = model_need("llama3.1:latest", Facts(observed={}, disk_size=spec.tags_size), default_ctx=4096)
    assert need is not None and need.source == "disk"
    assert need.bytes == spec.tags_size + estimate.kv_bytes(spec.arch, 4096) + RESERVE
    assert need.bytes == 4_920_753_328 + 512 * MIB + 457 * MIB
    unknown_arch = model_need("my-model", Facts(observed={}, disk_size=3 * GIB), default_ctx=4096)
    assert unknown_arch is not None and (unknown_arch.source, unknown_arch.bytes) == ("disk", 3 * GIB + RESERVE)


def test_a_show_that_cannot_be_read_falls_to_the_next_rung() -> None:
    broken = ShowInfo((), MappingProxyType({}), MappingProxyType({}), (), "", MappingProxyType({"model_info": {}}))
    need = model_need("llama3.1:latest", Facts(observed={}, show=broken, configured=GIB), default_ctx=4096)
    assert need is not None and need.source == "configured"


def test_an_unknown_model_has_no_need() -> None:
    assert model_need("my-model:latest", Facts(observed={}), default_ctx=4096) is None


def test_context_precedence() -> None:
    show = show_of("nomic-embed-text", parameters="num_ctx 8192")
    assert context_for(Facts(observed={}, num_ctx=1024, show=show), "nomic-embed-text", 4096) == 1024
    assert context_for(Facts(observed={}, show=show), "nomic-embed-text", 4096) == 8192
    assert context_for(Facts(observed={}), "nomic-embed-text", 4096) == 8192  # catalog's Modelfile context
    assert context_for(Facts(observed={}, show=show_of("llama3.1:8b")), "llama3.1:8b", 2048) == 2048
    cfg = parse_config(
        {"nodes": [{"url": "http://a:1", "context_length": 2048}, {"url": "http://b:1", "context_length": 8192}]}
    )
    assert default_context(cfg) == 8192


# ------------------------------------------------------------------------------------------- the ledger

CONFIG = parse_config(
    {
        "nodes": [{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:2"}],
        "priority_models": [{"name": "llama3.1:latest", "num_ctx": 8192}, "nomic-embed-text"],
        "model_sizes": {"custom": 2500},
    }
)
LLAMA_DIGEST = "46e0c10c039e019119339687c3c1757cc81b9da49709a3b3924863ba87ca666e"


def node(name: str, *, up: bool = True, loaded: tuple = (), installed: tuple = ()) -> NodeState:
    cfg = CONFIG.node(name)
    assert cfg is not None
    return NodeState(config=cfg, up=up, margin=0.8, capacity=UNKNOWN, loaded=loaded, installed=installed)


def copy(name: str, size: int, size_vram: int, ctx: int | None, digest: str = LLAMA_DIGEST) -> LoadedModel:
    return LoadedModel(name=name, size=size, size_vram=size_vram, digest=digest, context_length=ctx)


def test_ledger_remembers_full_gpu_sizes_across_polls() -> None:
    ledger = NeedLedger(CONFIG)
    ledger.record([node("a", loaded=(copy("llama3.1:latest", 6_930_000_000, 6_930_000_000, 8192),))])
    ledger.record([node("a", loaded=(copy("llama3.1:latest", 9_000_000_000, 4_000_000_000, 8192),))])  # partial
    needs, _ = ledger.needs([node("a"), node("b")])  # unloaded everywhere now
    assert needs["llama3.1:latest"].source == "observed" and needs["llama3.1:latest"].bytes == 6_930_000_000


def test_ledger_covers_priority_configured_installed_and_loaded_models() -> None:
    ledger = NeedLedger(CONFIG)
    installed = (InstalledModel("qwen2.5-coder:1.5b", 986_062_089, "dq"), InstalledModel("mine:7b", 3 * GIB, "dm"))
    loaded = (copy("all-minilm:latest", 528_797_696, 528_797_696, 512, "dmini"),)
    nodes = [node("a", installed=installed), node("b", loaded=loaded)]
    ledger.record(nodes)
    needs, embedding = ledger.needs(nodes)
    assert set(needs) == {
        "llama3.1:latest",
        "nomic-embed-text:latest",
        "custom:latest",
        "qwen2.5-coder:1.5b",
        "mine:7b",
        "all-minilm:latest",
    }
    assert needs["custom:latest"].source == "configured" and needs["custom:latest"].bytes == 2500 * MIB
    assert needs["mine:7b"].source == "disk"
    assert needs["llama3.1:latest"].source == "catalog" and within_1pct(needs["llama3.1:latest"].bytes, WORKED[8192])
    assert needs["all-minilm:latest"].source == "observed"
    assert embedding == {"nomic-embed-text:latest", "all-minilm:latest"}


def test_ledger_asks_show_once_per_digest_and_uses_it() -> None:
    ledger = NeedLedger(CONFIG)
    llama = InstalledModel("llama3.1:latest", 4_920_753_328, LLAMA_DIGEST)
    nodes = [node("a", installed=(llama,)), node("b", installed=(llama,)), node("b", up=False)]
    missing = ledger.missing_shows(nodes)
    assert list(missing) == [LLAMA_DIGEST] and missing[LLAMA_DIGEST][1] == "llama3.1:latest"
    ledger.add_show(LLAMA_DIGEST, show_of("llama3.1:8b"))
    assert ledger.missing_shows(nodes) == {}
    needs, _ = ledger.needs(nodes)
    assert needs["llama3.1:latest"].source == "estimated"
    assert within_1pct(needs["llama3.1:latest"].bytes, WORKED[8192])  # at the priority's num_ctx


def test_ledger_skips_down_nodes_for_show() -> None:
    ledger = NeedLedger(CONFIG)
    llama = InstalledModel("llama3.1:latest", 1, LLAMA_DIGEST)
    assert ledger.missing_shows([node("a", up=False, installed=(llama,))]) == {}
