"""The router's sizing judged against the simulator's own model of Ollama (bench/needs.py's table): every
catalog model, at 4096 and 32768 tokens, in the classic, layout and llama-server eras. The two are written
apart, so the test names each model where they differ by more than 10 %."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gpurouter.sizing import catalog


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "needs.py"
    spec = importlib.util.spec_from_file_location("bench_needs", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_every_catalog_models_need_is_within_10_percent_of_the_simulators_size():
    bench = _bench()
    table = bench.rows()
    assert len(table) == len(catalog.CATALOG) * 2 * 3
    assert {era for era, *_ in table} == {"classic", "layout", "llama-server"}
    beyond = bench.beyond_goal(table)
    assert [f"{era} {model} at {ctx}: need {need:,}, size {size:,}" for era, model, ctx, size, need, _ in beyond] == []


def test_the_comparison_names_what_is_beyond_the_goal():
    bench = _bench()
    rows = [("classic", "a", 4096, 100, 110, None), ("layout", "b", 4096, 100, 111, None), ("x", "c", 1, 100, 89, 1)]
    assert [row[1] for row in bench.beyond_goal(rows)] == ["b", "c"]
