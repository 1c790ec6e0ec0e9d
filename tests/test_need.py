"""The VRAM-need ladder per node: observed > estimated > configured > disk > catalog, pinned to the reference
figures of each era (classic: ollama-api.md §5/§7; llama-server: ollama-current.md §2)."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
from test_estimate import COLUMN_C, EMBEDDERS

from gpurouter.cluster.config import parse_config
from gpurouter.cluster.ollama import InstalledModel, LoadedModel, ShowInfo
from gpurouter.cluster.state import UNKNOWN, Capacity, GpuInfo, NodeState
from gpurouter.sizing import catalog, eras, estimate, llamaserver
from gpurouter.sizing.need import COMPUTE_ALLOWANCE, RESERVE, Facts, NeedLedger, Sizing, context_for, model_need
from gpurouter.units import GIB, MIB

CLASSIC = Sizing(None, eras.CLASSIC, 4096, "default")  # a v0.10–v0.12.10 node
CURRENT = Sizing(None, eras.LLAMA_SERVER, 4096, "vram tier")  # a v0.30+ node under 23 GiB


def classic(ctx: int) -> Sizing:
    return Sizing(None, eras.CLASSIC, ctx, "configured")


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
    need = model_need(name, Facts(observed={}), CLASSIC)
    assert need is not None and need.source == "catalog"
    assert within_1pct(need.bytes, expected), (need.bytes, expected)


@pytest.mark.parametrize(("name", "expected"), sorted(REFERENCE.items()))
def test_estimated_rung_from_show_matches_the_reference(name: str, expected: int) -> None:
    spec = catalog.find(name)
    assert spec is not None
    params = f"num_ctx                        {spec.default_num_ctx}" if spec.default_num_ctx else ""
    need = model_need(name, Facts(observed={}, show=show_of(name, parameters=params)), CLASSIC)
    assert need is not None and need.source == "estimated"
    assert within_1pct(need.bytes, expected), (need.bytes, expected)


def test_estimated_rung_without_tensors_uses_the_disk_size() -> None:
    spec = catalog.find("llama3.1:8b")
    assert spec is not None
    facts = Facts(observed={}, show=show_of("llama3.1:8b", tensors=False), disk_size=spec.tags_size)
    need = model_need("llama3.1:latest", facts, CLASSIC)
    assert need is not None and need.source == "estimated"
    assert abs(need.bytes - REFERENCE["llama3.1:8b"]) <= 0.02 * REFERENCE["llama3.1:8b"]
    no_disk = model_need("llama3.1:latest", Facts(observed={}, show=show_of("llama3.1:8b", tensors=False)), CLASSIC)
    assert no_disk is not None and no_disk.source == "catalog"  # the show alone cannot size it


@pytest.mark.parametrize(("num_ctx", "expected"), sorted(WORKED.items()))
def test_worked_example_at_the_configured_context(num_ctx: int, expected: int) -> None:
    show = show_of("llama3.1:8b")
    need = model_need("llama3.1:latest", Facts(observed={}, show=show, num_ctx=num_ctx), CLASSIC)
    assert need is not None and (need.source, need.num_ctx) == ("estimated", num_ctx)
    assert within_1pct(need.bytes, expected)
    catalog_need = model_need("llama3.1:latest", Facts(observed={}, num_ctx=num_ctx), CLASSIC)
    assert catalog_need is not None and within_1pct(catalog_need.bytes, expected)


# ------------------------------------------------------------------------------------------ the ladder


def test_observed_wins_only_at_the_same_context() -> None:
    show = show_of("llama3.1:8b")
    observed = {("classic", 4096, 1): 6_000_000_000, ("classic", 8192, 1): 7_000_000_000}
    facts = Facts(observed=observed, show=show, num_ctx=8192)
    need = model_need("llama3.1:latest", facts, CLASSIC)
    assert need is not None and (need.source, need.bytes, need.num_ctx) == ("observed", 7_000_000_000, 8192)
    elsewhere = Facts(observed={("classic", 2048, 1): 1, ("llama_server", 4096, 1): 1}, show=show)
    need = model_need("llama3.1:latest", elsewhere, CLASSIC)
    assert need is not None and need.source == "estimated"


def test_observed_context_is_the_capped_one() -> None:
    facts = Facts(observed={("classic", 512, 1): 1_000_000_000})  # Modelfile 2048, capped at the trained 512
    need = model_need("all-minilm", facts, CLASSIC)
    assert need is not None and (need.source, need.bytes, need.num_ctx) == ("observed", 1_000_000_000, 512)


def test_configured_beats_disk_and_catalog() -> None:
    facts = Facts(observed={}, configured=2500 * MIB, disk_size=GIB)
    need = model_need("llama3.1:latest", facts, CLASSIC)
    assert need is not None and (need.source, need.bytes) == ("configured", 2500 * MIB)


def test_disk_adds_kv_cache_and_reserve() -> None:
    spec = catalog.find("llama3.1:8b")
    assert spec is not None
    need = model_need("llama3.1:latest", Facts(observed={}, disk_size=spec.tags_size), CLASSIC)
    assert need is not None and need.source == "disk"
    assert need.bytes == spec.tags_size + estimate.kv_bytes(spec.arch, 4096) + RESERVE
    assert need.bytes == 4_920_753_328 + 512 * MIB + 457 * MIB
    unknown_arch = model_need("my-model", Facts(observed={}, disk_size=3 * GIB), CLASSIC)
    assert unknown_arch is not None and (unknown_arch.source, unknown_arch.bytes) == ("disk", 3 * GIB + RESERVE)


def test_a_show_that_cannot_be_read_falls_to_the_next_rung() -> None:
    broken = ShowInfo((), MappingProxyType({}), MappingProxyType({}), (), "", MappingProxyType({"model_info": {}}))
    need = model_need("llama3.1:latest", Facts(observed={}, show=broken, configured=GIB), CLASSIC)
    assert need is not None and need.source == "configured"


def test_an_unknown_model_has_no_need() -> None:
    assert model_need("my-model:latest", Facts(observed={}), CLASSIC) is None


def test_context_precedence() -> None:
    show = show_of("nomic-embed-text", parameters="num_ctx 8192")
    assert context_for(Facts(observed={}, num_ctx=1024, show=show), "nomic-embed-text", 4096)[0] == 1024
    assert context_for(Facts(observed={}, show=show), "nomic-embed-text", 4096)[0] == 8192
    assert context_for(Facts(observed={}), "nomic-embed-text", 4096)[0] == 8192  # catalog's Modelfile context
    assert context_for(Facts(observed={}, show=show_of("llama3.1:8b")), "llama3.1:8b", 2048) == (2048, "node default")


# ------------------------------------------------------------------------------------------- the ledger

CONFIG = parse_config(
    {
        "nodes": [{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:2"}],
        "priority_models": [{"name": "llama3.1:latest", "num_ctx": 8192}, "nomic-embed-text"],
        "model_sizes": {"custom": 2500},
    }
)
LLAMA_DIGEST = "46e0c10c039e019119339687c3c1757cc81b9da49709a3b3924863ba87ca666e"


def node(
    name: str, *, up: bool = True, loaded: tuple = (), installed: tuple = (), version: str = "0.12.6"
) -> NodeState:
    cfg = CONFIG.node(name)
    assert cfg is not None
    state = NodeState(config=cfg, up=up, margin=0.8, capacity=UNKNOWN, loaded=loaded, installed=installed)
    return replace(state, version=version if up else None)


def copy(name: str, size: int, size_vram: int, ctx: int | None, digest: str = LLAMA_DIGEST) -> LoadedModel:
    return LoadedModel(name=name, size=size, size_vram=size_vram, digest=digest, context_length=ctx)


def test_ledger_remembers_full_gpu_sizes_across_polls() -> None:
    ledger = NeedLedger(CONFIG)
    ledger.record([node("a", loaded=(copy("llama3.1:latest", 6_930_000_000, 6_930_000_000, 8192),))])
    ledger.record([node("a", loaded=(copy("llama3.1:latest", 9_000_000_000, 4_000_000_000, 8192),))])  # partial
    needs, _ = ledger.needs([node("a"), node("b")])  # unloaded everywhere now
    llama = needs[("b", "llama3.1:latest")]  # seen on a, valid on every node of the same era and context
    assert llama.source == "observed" and llama.bytes == 6_930_000_000


def test_ledger_covers_priority_configured_installed_and_loaded_models() -> None:
    ledger = NeedLedger(CONFIG)
    installed = (InstalledModel("qwen2.5-coder:1.5b", 986_062_089, "dq"), InstalledModel("mine:7b", 3 * GIB, "dm"))
    loaded = (copy("all-minilm:latest", 528_797_696, 528_797_696, 512, "dmini"),)
    nodes = [node("a", installed=installed), node("b", loaded=loaded)]
    ledger.record(nodes)
    needs, embedding = ledger.needs(nodes)
    assert {node for node, _ in needs} == {"a", "b"}
    needs = {model: need for (node, model), need in needs.items() if node == "a"}
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
    assert needs[("a", "llama3.1:latest")].source == "estimated"
    assert within_1pct(needs[("a", "llama3.1:latest")].bytes, WORKED[8192])  # at the priority's num_ctx


def test_ledger_skips_down_nodes_for_show() -> None:
    ledger = NeedLedger(CONFIG)
    llama = InstalledModel("llama3.1:latest", 1, LLAMA_DIGEST)
    assert ledger.missing_shows([node("a", up=False, installed=(llama,))]) == {}


# ---------------------------------------------------------------------------------- the llama-server era

# ollama-current.md §2.1: (model, context asked) → (predicted bytes, free memory needed to admit it).
ADMISSION = {
    ("mxbai-embed-large", 4096): (672_761_221, 840_951_526),
    ("nomic-embed-text", 4096): (280_593_906, 350_742_382),
    ("llama3.2:3b", 4096): (2_489_155_237, 3_111_444_046),
    ("llama3.2:3b", 32768): (6_582_795_941, 8_228_494_926),
    ("llama3.1:8b", 4096): (5_457_624_240, 6_822_030_300),
    ("llama3.1:8b", 32768): (10_021_026_992, 12_526_283_740),
    ("llama3.1:8b", 262144): (24_248_106_160, 30_310_132_700),
    ("codellama:7b", 32768): (13_221_151_622, 16_526_439_527),
}


@pytest.mark.parametrize(("model", "ctx"), sorted(ADMISSION))
def test_the_routers_prediction_reproduces_the_reference_table(model: str, ctx: int) -> None:
    spec = catalog.find(model)
    assert spec is not None
    need = model_need(model, Facts(observed={}, disk_size=spec.tags_size), Sizing(None, eras.LLAMA_SERVER, ctx, "t"))
    assert need is not None and need.admission is not None
    predicted, free_needed = ADMISSION[(model, ctx)]
    assert need.admission.predicted() == predicted
    assert int(predicted / 0.8) == free_needed
    assert need.admission.admits(-(-predicted * 100 // 80))  # just enough free memory, surcharge included
    # with less free memory Ollama first gives up the larger batch, then evicts
    assert not need.admission.admits(need.admission.base * 100 // 80 - 100)


def test_the_batch_surcharge_steps_down_when_memory_is_short() -> None:
    spec = catalog.find("llama3.1:8b")
    assert spec is not None
    big = llamaserver.admission(spec.arch, spec.tags_size, 262144)  # 131072 tokens: batch 2048, 2 GiB
    assert big.batch() == (2048, 2 * GIB)
    assert big.batch(80 * GIB) == (2048, 2 * GIB)  # 22 GB ≤ 60 % of 80 GiB
    assert big.batch(32 * GIB) == (1024, 768 * MIB)  # > 60 %, ≤ 75 %
    assert big.batch(24 * GIB) == (512, 0)
    embedder = llamaserver.admission(catalog.find("nomic-embed-text").arch, 274_302_450, 8192)  # type: ignore[union-attr]
    assert embedder.batch() == (512, 0) and embedder.ctx_total == 2048  # clamped, no surcharge


def test_a_current_node_sizes_the_footprint_at_its_own_context() -> None:
    show = show_of("llama3.1:8b")
    small = model_need("llama3.1:8b", Facts(observed={}, show=show), CURRENT)
    large = model_need("llama3.1:8b", Facts(observed={}, show=show), Sizing("g24", eras.LLAMA_SERVER, 32768, "t"))
    assert small is not None and large is not None
    assert (small.num_ctx, small.era, small.source) == (4096, eras.LLAMA_SERVER, "estimated")
    assert (large.num_ctx, large.node) == (32768, "g24")
    spec = catalog.find("llama3.1:8b")
    assert spec is not None
    assert small.bytes == llamaserver.footprint(spec.arch, 4096)
    assert large.bytes - small.bytes == llamaserver.footprint(spec.arch, 32768) - llamaserver.footprint(spec.arch, 4096)
    assert large.bytes > small.bytes + 3 * GIB  # the KV cache alone grows by 3.5 GiB
    # "ollama ps" on current Ollama shows llama3.1:8b at 4096 tokens as 5.3 GB (ollama-current.md §2.4)
    assert round(small.bytes / 1e9, 1) == 5.3


def test_a_current_node_sizes_embedders_without_kv_cache() -> None:
    spec = catalog.find("mxbai-embed-large")
    assert spec is not None
    need = model_need("mxbai-embed-large", Facts(observed={}), CURRENT)
    assert need is not None and (need.num_ctx, need.source) == (512, "catalog")
    assert need.bytes == llamaserver.footprint(spec.arch, 512) < spec.tags_size  # no KV, no output layer
    assert need.bytes < 1129 * MIB  # the classic era's figure


def test_the_disk_rung_of_a_current_node_adds_kv_and_a_compute_allowance() -> None:
    spec = catalog.find("llama3.1:8b")
    assert spec is not None
    need = model_need("llama3.1:latest", Facts(observed={}, disk_size=spec.tags_size), CURRENT)
    assert need is not None and need.source == "disk"
    kv = spec.arch.block_count * llamaserver.kv_layer_bytes(spec.arch, 4096)
    assert need.bytes == spec.tags_size + kv + COMPUTE_ALLOWANCE


def test_observed_figures_are_kept_per_era_context_and_parallel() -> None:
    observed = {("llama_server", 4096, 1): 5_000_000_000, ("llama_server", 4096, 2): 5_500_000_000}
    one = model_need("llama3.1:8b", Facts(observed=observed), CURRENT)
    two = model_need("llama3.1:8b", Facts(observed=observed), Sizing(None, eras.LLAMA_SERVER, 4096, "t", parallel=2))
    old = model_need("llama3.1:8b", Facts(observed=observed), CLASSIC)
    assert one is not None and two is not None and old is not None
    assert (one.bytes, two.bytes, two.parallel) == (5_000_000_000, 5_500_000_000, 2)
    assert old.source == "catalog"


@pytest.mark.parametrize(
    ("version", "configured", "gpus", "expected"),
    [
        ("0.32.15", None, (24 * GIB,), (32768, "vram tier")),
        ("0.32.15", None, (8 * GIB,), (4096, "vram tier")),
        ("0.32.15", None, (24 * GIB, 24 * GIB), (262144, "vram tier")),
        ("0.32.15", 8192, (24 * GIB,), (8192, "configured")),
        ("0.12.6", None, (24 * GIB,), (4096, "default")),
        ("0.15.5", None, (24 * GIB,), (32768, "vram tier")),
        ("0.15.4", None, (24 * GIB,), (4096, "default")),
        ("garbage", None, (24 * GIB,), (32768, "vram tier")),  # unreadable: the newest era
        ("0.32.15", None, None, (4096, "default (GPU total unknown)")),
    ],
)
def test_a_nodes_default_context(version: str, configured: int | None, gpus: tuple | None, expected: tuple) -> None:
    raw = {"name": "n", "url": "http://127.0.0.1:1", **({"context_length": configured} if configured else {})}
    cfg = parse_config({"nodes": [raw]}).nodes[0]
    capacity = UNKNOWN if gpus is None else Capacity("static", tuple(GpuInfo(i, "g", g) for i, g in enumerate(gpus)))
    state = NodeState(config=cfg, up=True, margin=0.8, capacity=capacity, version=version)
    assert state.default_context == expected
