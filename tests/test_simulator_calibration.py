"""The simulator's own model of Ollama and llama.cpp reproduces the reference's worked figures: Ollama's
llama-server-era prediction (ollama-current.md §2.1), llama-server's buffers for llama3.1:8b (§2.4), the classic
estimate (ollama-api.md §5.5, §7) and the layout era's size (§5.6)."""

from __future__ import annotations

import math

import pytest

from gpurouter.units import GIB, MIB
from simulator import catalog, classic, llamacpp
from simulator.admission import predict
from simulator.catalog import ModelSpec

HUGE = 1 << 40


def model(name: str) -> ModelSpec:
    spec = catalog.find(name)
    assert spec is not None
    return spec


# ollama-current.md §2.1: model, context asked, KV bytes, surcharge, predicted, free memory needed (÷ 0.8)
PREDICTIONS = [
    ("mxbai-embed-large", 512, 3_145_728, 0, 672_761_221, 840_951_526),
    ("nomic-embed-text", 2048, 6_291_456, 0, 280_593_906, 350_742_382),
    ("llama3.2:3b", 4096, 469_762_048, 0, 2_489_155_237, 3_111_444_046),
    ("llama3.2:3b", 32768, 3_758_096_384, 805_306_368, 6_582_795_941, 8_228_494_926),
    ("llama3.1:8b", 4096, 536_870_912, 0, 5_457_624_240, 6_822_030_300),
    ("llama3.1:8b", 32768, 4_294_967_296, 805_306_368, 10_021_026_992, 12_526_283_740),
    ("llama3.1:8b", 262144, 17_179_869_184, 2_147_483_648, 24_248_106_160, 30_310_132_700),
    ("codellama:7b", 32768, 8_589_934_592, 805_306_368, 13_221_151_622, 16_526_439_527),
]


@pytest.mark.parametrize(("name", "ctx", "kv", "surcharge", "predicted", "needed"), PREDICTIONS)
def test_the_prediction_reproduces_the_worked_figures(name, ctx, kv, surcharge, predicted, needed):
    spec = model(name)
    p = predict(spec.arch, spec.tags_size, ctx, 1)  # the table takes the /api/tags size as the file size
    assert (p.kv_bytes, p.surcharge(), p.total()) == (kv, surcharge, predicted)
    assert math.floor(p.total() / 0.8) == needed
    assert p.fits(needed + 1)
    assert not p.fits(math.floor(p.base / 0.8) - 1)  # below that not even the smallest batch fits


def test_a_large_batch_is_given_up_where_its_surcharge_does_not_fit():
    spec = model("llama3.1:8b")
    p = predict(spec.arch, spec.tags_size, 32768, 1)
    assert p.surcharge(HUGE) == 768 * MIB
    assert p.surcharge(12 * GIB) == 768 * MIB
    assert p.surcharge(11 * GIB) == 0  # 9.2 GB is more than 75 % of 11 GiB: back to batch 512
    assert predict(spec.arch, spec.tags_size, 131072, 1).surcharge(28 * GIB) == 768 * MIB  # 2048 → 1024


def test_llama_server_buffers_of_llama3_1_8b_match_the_public_logs():
    arch = model("llama3.1:8b").arch
    assert llamacpp.logged(sum(arch.block_bytes) + arch.output_bytes) == 440349 * MIB // 100  # CUDA0 model buffer
    assert llamacpp.logged(arch.token_embd_bytes) == 28181 * MIB // 100  # CPU_Mapped: the Q4_K token_embd
    cells = llamacpp.kv_context(4096, arch, 1)
    assert arch.block_count * llamacpp.kv_layer(arch, cells) == 512 * MIB  # CUDA0 KV buffer at 4096
    whole = llamacpp.buffers(arch, 4096, 1, [arch.block_count + 1])
    assert f"{whole.size / 1e9:.1f} GB" == "5.3 GB"  # `ollama ps` at 4096 tokens
    at_32k = llamacpp.compute_buffer(arch, llamacpp.kv_context(32768, arch, 1))
    assert abs(at_32k - 140 * MIB) < 5 * MIB  # "about 140 MiB" with flash attention


def test_embedders_keep_no_kv_cache_and_a_small_compute_buffer():
    for name in ("all-minilm", "nomic-embed-text", "mxbai-embed-large"):
        arch = model(name).arch
        cells = llamacpp.kv_context(2048, arch, 4)
        assert llamacpp.kv_layer(arch, cells) == 0
        assert 1 * MIB < llamacpp.compute_buffer(arch, cells) < 64 * MIB  # "a few tens of MiB"


# ollama-api.md §5.5 (llama3.1:8b) and §7 columns A (2048 × 4), B (4096 × 4), C (4096 × 1)
CLASSIC_FULL = [
    ("llama3.1:8b", 2048, 1, 5_783_412_736),
    ("llama3.1:8b", 8192, 1, 6_930_032_640),
    ("llama3.2:1b", 2048, 4, 2_712_725_504),
    ("llama3.2:1b", 4096, 4, 3_551_586_304),
    ("llama3.2:1b", 4096, 1, 2_293_295_104),
    ("llama3.2:3b", 2048, 4, 3_972_362_240),
    ("llama3.2:3b", 4096, 4, 5_364_871_168),
    ("llama3.2:3b", 4096, 1, 3_310_184_448),
    ("llama3.1:8b", 2048, 4, 6_930_032_640),
    ("llama3.1:8b", 4096, 4, 8_590_977_024),
    ("llama3.1:8b", 4096, 1, 6_099_560_448),
    ("llama3.1:70b", 2048, 4, 46_820_345_856),
    ("llama3.1:70b", 4096, 4, 50_628_773_888),
    ("llama3.1:70b", 4096, 1, 44_916_131_840),
    ("codellama:7b", 2048, 4, 9_360_849_408),
    ("codellama:7b", 4096, 4, 14_343_682_560),
    ("codellama:7b", 4096, 1, 6_869_432_832),
    ("codellama:13b", 2048, 4, 15_539_127_936),
    ("codellama:13b", 4096, 4, 23_105_652_352),
    ("codellama:13b", 4096, 1, 11_755_865_728),
    ("qwen2.5-coder:0.5b", 2048, 4, 1_299_800_320),
    ("qwen2.5-coder:0.5b", 4096, 4, 1_598_646_528),
    ("qwen2.5-coder:0.5b", 4096, 1, 1_247_371_520),
    ("qwen2.5-coder:1.5b", 2048, 4, 2_046_867_968),
    ("qwen2.5-coder:1.5b", 4096, 4, 2_418_328_064),
    ("qwen2.5-coder:1.5b", 4096, 1, 1_925_233_152),
    ("qwen2.5-coder:3b", 2048, 4, 3_078_209_536),
    ("qwen2.5-coder:3b", 4096, 4, 3_652_044_800),
    ("qwen2.5-coder:3b", 4096, 1, 2_923_020_288),
    ("qwen2.5-coder:7b", 2048, 4, 5_986_631_680),
    ("qwen2.5-coder:7b", 4096, 4, 6_959_710_208),
    ("qwen2.5-coder:7b", 4096, 1, 5_560_907_776),
    ("nomic-embed-text", 8192, 1, 791_006_208),  # capped at its trained 2048 (v0.9.3+)
    ("all-minilm", 2048, 1, 528_797_696),
    ("mxbai-embed-large", 512, 4, 1_183_850_496),  # embedders run one sequence
]


@pytest.mark.parametrize(("name", "ctx", "parallel", "size"), CLASSIC_FULL)
def test_the_classic_estimate_reproduces_the_worked_figures(name, ctx, parallel, size):
    e = classic.estimate(model(name).arch, ctx, parallel, [HUGE])
    assert (e.size, e.size_vram, e.layers) == (size, size, e.total_layers)


def test_classic_partial_offloads_reproduce_the_worked_figures():
    e = classic.estimate(model("llama3.1:8b").arch, 4096, 1, [4 * GIB])
    assert (e.layers, e.size, e.size_vram) == (19, 6_499_565_568, 4_141_654_016)
    e = classic.estimate(model("llama3.1:70b").arch, 2048, 1, [23 * GIB])
    assert (e.layers, e.size, e.size_vram) == (43, 44_782_387_200, 24_589_189_120)


def test_the_layout_era_holds_the_reserve_and_one_layer_back():
    e = classic.estimate(model("llama3.1:8b").arch, 4096, 1, [HUGE])
    assert e.size - e.held == 5_464_647_680  # ollama-api.md §5.6
