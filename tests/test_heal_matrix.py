"""The heal matrix (bench/heal_matrix.py's cells): simulated v0.32 and classic nodes, a busy client on the GPU
node, each fault set and then cleared, the priority model starting on the CPU node or partly on GPU. Every cell:
healed within 2 cooldowns of the clearing, never without a copy longer than a reconcile pass and one load, no
busy model evicted, a bounded number of loads and none once healed. The cells run two at a time, each with
its own fleet and optimizer (short cooldown and check_interval, loads of about 0.25 s)."""

from __future__ import annotations

import pytest
from conftest import bench_module

matrix = bench_module("heal_matrix")
CELLS = matrix.cells()


@pytest.fixture(scope="module")
def results() -> dict[str, object]:
    return {r.cell.name: r for r in matrix.run_matrix(CELLS, jobs=2)}


def test_the_matrix_has_every_fault_era_and_start():
    assert len(CELLS) == len(matrix.ERAS) * len(matrix.FAULTS) * len(matrix.STARTS) == 36


@pytest.mark.parametrize("cell", CELLS, ids=[c.name for c in CELLS])
def test_cell_heals_within_its_goals(results, cell):
    result = results[cell.name]
    assert result.misses() == [], "\n".join(matrix.table([result]))
    assert result.healed_in is not None and result.loads >= 1  # it did heal, by loading
