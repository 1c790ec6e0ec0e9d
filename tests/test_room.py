"""What a node can take, by the rules of the Ollama it runs (gpurouter.sizing.room): the operator's margin, the
classic estimate, the layout era's reserve, llama.cpp's fit margin and Ollama's 80 % admission test."""

from __future__ import annotations

from gpurouter.cluster.state import ModelNeed
from gpurouter.sizing import catalog, eras, llamaserver
from gpurouter.sizing.estimate import RESERVE
from gpurouter.sizing.room import Room
from gpurouter.units import GIB, MIB

LLAMA = catalog.find("llama3.1:8b")
assert LLAMA is not None
FOOTPRINT = llamaserver.footprint(LLAMA.arch, 4096)  # 5024 MiB
ADMISSION = llamaserver.admission(LLAMA.arch, LLAMA.tags_size, 4096)  # predicts 5,457,624,240 bytes


def room(era: str, gpus: tuple[int, ...] = (8 * GIB,), used: int = 0, margin: float = 0.8) -> Room:
    total = sum(gpus)
    return Room(era, total, int(total * margin), used, max(gpus), len(gpus), margin)


def need(size: int, era: str = eras.CLASSIC, admission: llamaserver.Admission | None = None) -> ModelNeed:
    return ModelNeed("m:latest", size, "estimated", 4096, "n", era, 1, "t", admission)


CURRENT = need(FOOTPRINT, eras.LLAMA_SERVER, ADMISSION)


def test_classic_fits_the_usable_vram() -> None:
    r = room(eras.CLASSIC)
    assert r.fits(need(r.usable)) and not r.fits(need(r.usable + 1))
    assert r.fits_free(need(r.usable)) and not r.fits_free(need(r.usable + 1))
    busy = room(eras.CLASSIC, used=2 * GIB)
    assert busy.fits_free(need(busy.usable - 2 * GIB)) and not busy.fits_free(need(busy.usable - 2 * GIB + 1))
    assert busy.fits_free(need(busy.usable), freed=2 * GIB)  # once 2 GiB are unloaded


def test_llama_server_keeps_the_fit_margin_free() -> None:
    tight = room(eras.LLAMA_SERVER, margin=1.0)  # the operator allows all of it: Ollama's own rule decides
    assert tight.fits(need(8 * GIB - llamaserver.FIT_MARGIN, eras.LLAMA_SERVER))
    assert not tight.fits(need(8 * GIB - llamaserver.FIT_MARGIN + 1, eras.LLAMA_SERVER))
    assert room(eras.CLASSIC, margin=1.0).fits(need(8 * GIB))  # the classic estimate needs no extra


def test_llama_server_admission_runs_only_beside_another_model() -> None:
    # 8 GiB, 1.7 GiB used by another model: 6.3 GiB free ≥ 4.9 GiB + 1 GiB, but 80 % of it < 5.46 GB predicted
    r = room(eras.LLAMA_SERVER, used=int(1.7 * GIB), margin=1.0)
    assert not r.fits_free(CURRENT, others=True)  # Ollama would evict the other model first
    assert r.fits_free(CURRENT, others=False)  # the copy there is its own, reloaded in place: no test
    assert r.fits_free(CURRENT, freed=int(1.7 * GIB), others=False)
    roomy = room(eras.LLAMA_SERVER, gpus=(24 * GIB,), used=int(1.7 * GIB))
    assert roomy.fits_free(CURRENT, others=True)


def test_layout_holds_the_reserve_back() -> None:
    r = room(eras.LAYOUT, margin=1.0)
    assert r.fits(need(8 * GIB - RESERVE, eras.LAYOUT)) and not r.fits(need(8 * GIB - RESERVE + 1, eras.LAYOUT))


def test_a_multi_gpu_node_fits_on_its_largest_gpu_or_split_with_an_extra_per_gpu() -> None:
    three = room(eras.CLASSIC, gpus=(8 * GIB, 4 * GIB, 4 * GIB))
    largest = int(8 * GIB * 0.8)
    assert three.takes(largest) == largest and three.fits(need(largest))  # on the largest GPU alone
    assert three.takes(largest + 1) == largest + 1 + 2 * RESERVE  # split: two more reserves
    assert three.fits(need(three.usable - 2 * RESERVE)) and not three.fits(need(three.usable - 2 * RESERVE + 1))
    current = room(eras.LLAMA_SERVER, gpus=(8 * GIB, 4 * GIB, 4 * GIB), margin=1.0)
    assert current.headroom(4 * GIB) == llamaserver.FIT_MARGIN  # one GPU: one margin
    assert current.headroom(10 * GIB) == 3 * llamaserver.FIT_MARGIN  # spread: a margin on each
    assert current.fits(need(16 * GIB - 3 * llamaserver.FIT_MARGIN, eras.LLAMA_SERVER))


def test_a_cpu_node_fits_nothing() -> None:
    cpu = Room(eras.LLAMA_SERVER, 0, 0, 0, 0, 0, 0.8)
    assert not cpu.has_gpu and not cpu.fits(need(MIB)) and not cpu.fits_free(need(MIB))
