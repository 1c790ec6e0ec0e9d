"""Sizing is worked out once per model digest (and per era, context and parallel), never per poll."""

from __future__ import annotations

import itertools

import pytest
from test_need import CLASSIC, CURRENT, classic, show_of

from gpurouter.cluster.config import parse_config
from gpurouter.cluster.ollama import InstalledModel
from gpurouter.cluster.state import Capacity, GpuInfo, NodeState
from gpurouter.sizing import estimate, need
from gpurouter.sizing.need import Facts, Memo, NeedLedger, model_need
from gpurouter.units import GIB

_digests = itertools.count()


def digest() -> str:
    """A digest no other test has used (the memo lives as long as the process)."""
    return f"sha256:memo-test-{next(_digests)}"


@pytest.fixture
def derived(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts architectures derived from an /api/show and classic figures worked out."""
    calls: list[str] = []
    arch_from_show, full_gpu_bytes = estimate.arch_from_show, estimate.full_gpu_bytes

    def counting_arch(*args: object, **kw: object) -> estimate.Arch:
        calls.append("arch")
        return arch_from_show(*args, **kw)  # type: ignore[arg-type]

    def counting_bytes(*args: object, **kw: object) -> int:
        calls.append("bytes")
        return full_gpu_bytes(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(estimate, "arch_from_show", counting_arch)
    monkeypatch.setattr(estimate, "full_gpu_bytes", counting_bytes)
    return calls


def test_an_unchanged_model_is_sized_once(derived: list[str]) -> None:
    facts = Facts(observed={}, show=show_of("llama3.1:8b"), disk_size=5 * GIB, digest=digest())
    first = model_need("llama3.1:8b", facts, classic(5120))
    again = [model_need("llama3.1:8b", facts, classic(5120)) for _ in range(3)]
    assert derived.count("arch") == 1 and derived.count("bytes") == 1
    assert all(n == first for n in again)
    other_context = model_need("llama3.1:8b", facts, classic(6144))
    model_need("llama3.1:8b", facts, CURRENT)  # another era: its own figure, the same architecture
    assert derived.count("arch") == 1 and derived.count("bytes") == 2
    assert other_context is not None and first is not None and other_context.bytes > first.bytes


def test_a_new_digest_is_sized_afresh(derived: list[str]) -> None:
    show = show_of("qwen2.5-coder:1.5b")
    model_need("qwen2.5-coder:1.5b", Facts(observed={}, show=show, digest=digest()), CLASSIC)
    model_need("qwen2.5-coder:1.5b", Facts(observed={}, show=show, digest=digest()), CLASSIC)
    assert derived.count("arch") == 2  # pulled again: a new digest is derived again
    model_need("qwen2.5-coder:1.5b", Facts(observed={}, show=show, disk_size=GIB, digest=digest()), CLASSIC)
    assert derived.count("arch") == 3


def test_facts_without_a_digest_are_not_memoised(derived: list[str]) -> None:
    for _ in range(2):
        model_need("llama3.1:8b", Facts(observed={}, show=show_of("llama3.1:8b")), CLASSIC)
    assert derived.count("arch") == 2


def test_the_memo_is_bounded() -> None:
    memo = Memo(size=3)
    for key in range(10):
        assert memo.get(key, lambda key=key: key * 2) == key * 2
    assert len(memo._values) == 3 and memo.get(9, lambda: -1) == 18 and memo.get(0, lambda: -1) == -1


def test_polls_of_an_unchanged_fleet_reuse_every_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"nodes": [{"name": f"n{i}", "url": f"http://127.0.0.1:{20000 + i}"} for i in range(3)]})
    tagged = digest()
    nodes = [
        NodeState(
            config=node,
            up=True,
            margin=0.8,
            capacity=Capacity("static", (GpuInfo(0, "GPU", 8 * GIB),)),
            version="0.12.6",
            installed=(InstalledModel("llama3.1:8b", 5 * GIB, tagged),),
        )
        for node in config.nodes
    ]
    ledger = NeedLedger(config)
    ledger.add_show(tagged, show_of("llama3.1:8b"))
    sized: list[str] = []
    real = need.model_need
    monkeypatch.setattr(need, "model_need", lambda *a: sized.append(a[0]) or real(*a))
    first, _ = ledger.needs(nodes)
    assert len(sized) == 3 and first[("n0", "llama3.1:8b")].source == "estimated"
    second, _ = ledger.needs(nodes)
    assert len(sized) == 3 and second == first  # nothing changed: nothing sized again
    ledger.add_show(digest(), show_of("llama3.1:8b"))
    moved = [*nodes[:2], NodeState(**{**nodes[2].__dict__, "version": "0.30.0"})]
    third, _ = ledger.needs(moved)
    assert len(sized) == 4 and third[("n2", "llama3.1:8b")].era != first[("n2", "llama3.1:8b")].era
