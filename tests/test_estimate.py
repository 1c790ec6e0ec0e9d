"""Ollama's classic memory estimate against the figures of reference/ollama-api.md §5.5 and §7."""

from __future__ import annotations

import json

import pytest

from gpurouter.sizing import catalog
from gpurouter.sizing.estimate import (
    RESERVE,
    arch_from_show,
    cpu_bytes,
    effective_ctx,
    full_gpu_bytes,
    graph_bytes,
    kv_bytes,
    place,
    tensor_bytes,
)
from gpurouter.units import GIB, MIB

# §5.5 llama3.1:8b, hand-derived: per-layer weights, f16 KV per layer at 4096, output layer, graphs.
W_Q6, W_Q4, KV_4096, OUT_8B = 138_936_320, 122_716_160, 16_777_216, 430_956_544
L_Q6, L_Q4 = W_Q6 + KV_4096, W_Q4 + KV_4096
Q6_LAYERS = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
GRAPH_FULL_4096, GRAPH_PARTIAL_4096 = 310_380_544, 710_385_664

# §7 column C (num_ctx 4096 × parallel 1), exact figures of the reference.
COLUMN_C = {
    "llama3.2:1b": 2_293_295_104,
    "llama3.2:3b": 3_310_184_448,
    "llama3.1:8b": 6_099_560_448,
    "llama3.1:70b": 44_916_131_840,
    "codellama:7b": 6_869_432_832,
    "codellama:13b": 11_755_865_728,
    "qwen2.5-coder:0.5b": 1_247_371_520,
    "qwen2.5-coder:1.5b": 1_925_233_152,
    "qwen2.5-coder:3b": 2_923_020_288,
    "qwen2.5-coder:7b": 5_560_907_776,
}
# §7 column A (2048 × 4) and B (4096 × 4): the same formulas with parallel > 1.
COLUMN_A = {"llama3.2:1b": 2_712_725_504, "qwen2.5-coder:7b": 5_986_631_680, "codellama:13b": 15_539_127_936}
COLUMN_B = {
    "llama3.1:70b": 50_628_773_888,
    "qwen2.5-coder:0.5b": 1_598_646_528,
    "codellama:7b": 14_343_682_560,
}
LLAMAS = ("llama3.2:1b", "llama3.2:3b", "llama3.1:8b", "llama3.1:70b", "codellama:7b")
# §7 embedding table: (Modelfile context, capped context, classic size at the capped context).
EMBEDDERS = {
    "nomic-embed-text:latest": (8192, 2048, 791_006_208),
    "all-minilm:latest": (2048, 512, 528_797_696),
    "mxbai-embed-large:latest": (512, 512, 1_183_850_496),
}


def arch(name: str):
    spec = catalog.find(name)
    assert spec is not None, name
    return spec.arch


def show(name: str, tensors: bool = True) -> dict:
    spec = catalog.find(name)
    assert spec is not None
    body = {"model_info": spec.model_info()}
    if tensors:
        body["tensors"] = [dict(t) for t in spec.tensors]
    return json.loads(json.dumps(body))  # exactly what a client decodes from the wire


def within(value: int, expected: int, tolerance: float = 0.01) -> bool:
    return abs(value - expected) <= tolerance * expected


def test_tensor_bytes_per_type():
    assert tensor_bytes("Q4_K", [4096, 4096]) == 4096 * 4096 * 144 // 256
    assert tensor_bytes("Q6_K", [4096, 128256]) == 430_940_160
    assert tensor_bytes("Q4_0", [4096, 11008]) == 4096 * 11008 * 18 // 32
    assert tensor_bytes("Q8_0", [2048, 8192]) == 2048 * 8192 * 34 // 32
    assert tensor_bytes("f16", [384, 384]) == 294_912
    assert tensor_bytes("F32", [4096]) == 16_384
    with pytest.raises(ValueError, match="IQ9_XL"):
        tensor_bytes("IQ9_XL", [32])


def test_llama31_8b_inputs_match_the_worked_example():
    a = arch("llama3.1:8b")
    assert a.layer_bytes[0] == W_Q6
    assert all(a.layer_bytes[i] == (W_Q6 if i in Q6_LAYERS else W_Q4) for i in range(32))
    assert sum(a.layer_bytes) == 4_186_439_680
    assert a.output_bytes == OUT_8B
    assert kv_bytes(a, 4096) == 512 * MIB
    assert graph_bytes(a, 2048) == (271_056_896, GRAPH_PARTIAL_4096)
    assert graph_bytes(a, 4096) == (GRAPH_FULL_4096, GRAPH_PARTIAL_4096)
    assert graph_bytes(a, 8192)[0] == 560 * MIB + 2048


@pytest.mark.parametrize(
    ("num_ctx", "parallel", "expected"),
    [(2048, 1, 5_783_412_736), (4096, 1, 6_099_560_448), (8192, 1, 6_930_032_640), (4096, 4, 8_590_977_024)],
)
def test_worked_example_table(num_ctx, parallel, expected):
    assert full_gpu_bytes(arch("llama3.1:8b"), num_ctx, parallel) == expected


def test_worked_example_sum():
    a = arch("llama3.1:8b")
    parts = RESERVE + L_Q6 + sum(a.layer_bytes) + kv_bytes(a, 4096) + OUT_8B + GRAPH_FULL_4096
    assert parts == full_gpu_bytes(a, 4096) == 6_099_560_448


@pytest.mark.parametrize(("name", "expected"), sorted(COLUMN_C.items()))
def test_column_c_default_context(name, expected):
    p = place(arch(name), 4096, gpu_free=(200 * GIB,))
    assert p.fully_on_gpu and p.size == p.size_vram == expected


@pytest.mark.parametrize(("name", "expected"), sorted(COLUMN_A.items()))
def test_column_a_parallel_four(name, expected):
    assert full_gpu_bytes(arch(name), 2048, parallel=4) == expected


@pytest.mark.parametrize(("name", "expected"), sorted(COLUMN_B.items()))
def test_column_b_parallel_four(name, expected):
    assert full_gpu_bytes(arch(name), 4096, parallel=4) == expected


@pytest.mark.parametrize(("name", "facts"), sorted(EMBEDDERS.items()))
def test_embedders_at_capped_default_context(name, facts):
    modelfile_ctx, capped, expected = facts
    spec = catalog.find(name)
    assert spec.default_num_ctx == modelfile_ctx
    assert effective_ctx(spec.arch, modelfile_ctx) == capped
    assert full_gpu_bytes(spec.arch, modelfile_ctx) == expected
    # embedding models are always loaded with parallel 1
    assert full_gpu_bytes(spec.arch, modelfile_ctx, parallel=4) == expected


def test_nomic_kv_matches_the_log():
    a = arch("nomic-embed-text")
    assert kv_bytes(a, 8192) == 24 * MIB  # "24.0 MiB" in real logs (head_count_kv absent → 1)
    assert graph_bytes(a, 2048) == (12 * kv_bytes(a, 2048) // 6,) * 2  # bert family: H/Hkv × ΣKV / 6


def test_effective_ctx_caps_and_floors():
    a = arch("codellama:7b")
    assert effective_ctx(a, 4096) == 4096
    assert effective_ctx(a, 100_000) == 16384
    assert effective_ctx(a, 1) == 4


def test_partial_offload_example():
    p = place(arch("llama3.1:8b"), 4096, gpu_free=(4 * GIB,))
    assert (p.gpu_layers, p.total_layers) == (19, 33)
    assert (p.size, p.size_vram) == (6_499_565_568, 4_141_654_016)
    assert p.per_gpu == (4_141_654_016,) and not p.fully_on_gpu
    # v0.12 walks from the last layer: blocks 31..13 are on GPU, plus the buffer layer and the partial graph
    on_gpu = sum(L_Q6 if i in Q6_LAYERS else L_Q4 for i in range(13, 32))
    assert p.size_vram == RESERVE + L_Q6 + on_gpu + GRAPH_PARTIAL_4096


def test_partial_offload_70b_example():
    p = place(arch("llama3.1:70b"), 2048, gpu_free=(23 * GIB,))
    assert (p.gpu_layers, p.size, p.size_vram) == (43, 44_782_387_200, 24_589_189_120)


def test_gpu_overhead_shrinks_the_offload():
    p = place(arch("llama3.1:8b"), 4096, gpu_free=(4 * GIB,), gpu_overhead=GIB)
    assert p.gpu_layers == 12  # blocks 31..20
    on_gpu = sum(L_Q6 if i in Q6_LAYERS else L_Q4 for i in range(20, 32))
    assert p.size_vram == RESERVE + L_Q6 + on_gpu + GRAPH_PARTIAL_4096
    assert p.size == 6_499_565_568  # single-GPU partial size does not depend on the split


def test_cpu_only():
    a = arch("llama3.1:8b")
    expected = sum(a.layer_bytes) + 32 * KV_4096 + OUT_8B
    assert cpu_bytes(a, 4096) == expected == 5_154_267_136
    for p in (place(a, 4096), place(a, 4096, gpu_free=(80 * GIB,), num_gpu=0)):
        assert (p.size, p.size_vram, p.gpu_layers) == (expected, 0, 0)
    # not even reserve + graph + two buffer layers fit: CPU only
    p = place(a, 4096, gpu_free=(GIB,))
    assert (p.size, p.size_vram, p.per_gpu) == (expected, 0, (0,))


def test_num_gpu_limits_the_layers():
    a = arch("llama3.1:8b")
    p = place(a, 4096, gpu_free=(80 * GIB,), num_gpu=10)
    on_gpu = sum(L_Q6 if i in Q6_LAYERS else L_Q4 for i in range(22, 32))
    assert p.gpu_layers == 10
    assert p.size_vram == RESERVE + L_Q6 + on_gpu + GRAPH_PARTIAL_4096 == 2_837_553_152
    assert p.size == 6_499_565_568
    p = place(a, 4096, gpu_free=(80 * GIB,), num_gpu=32)
    assert p.gpu_layers == 32 and not p.fully_on_gpu  # every block, but not the output layer
    assert p.size - p.size_vram == OUT_8B
    p = place(a, 4096, gpu_free=(80 * GIB,), num_gpu=99)
    assert p.fully_on_gpu and p.size == 6_099_560_448


def test_multi_gpu_deals_layers_and_uses_the_partial_graph():
    a = arch("llama3.1:8b")
    p = place(a, 4096, gpu_free=(8 * GIB, 8 * GIB))
    assert p.fully_on_gpu
    # block i goes to GPU i mod 2: 8 Q6-heavy and 8 Q4 layers each; the output layer (33rd) to GPU 0
    half = 8 * L_Q6 + 8 * L_Q4
    gpu0 = RESERVE + L_Q6 + half + OUT_8B + GRAPH_PARTIAL_4096
    gpu1 = RESERVE + L_Q6 + half + GRAPH_PARTIAL_4096
    assert p.per_gpu == (gpu0, gpu1) == (4_137_910_272, 3_706_953_728)
    assert p.size == p.size_vram == gpu0 + gpu1


def test_multi_gpu_with_one_unusable_gpu():
    p = place(arch("llama3.1:8b"), 4096, gpu_free=(8 * GIB, GIB))
    assert p.fully_on_gpu and p.per_gpu[1] == 0
    # more than one GPU given: the full graph is replaced by the partial one
    assert p.size == p.size_vram == 6_099_560_448 - GRAPH_FULL_4096 + GRAPH_PARTIAL_4096


def test_round_trip_through_show():
    for spec in catalog.CATALOG:
        assert arch_from_show(show(spec.name)) == spec.arch, spec.name


@pytest.mark.parametrize("name", LLAMAS)
def test_without_tensors_approximates_from_disk_size(name):
    spec = catalog.find(name)
    approx = arch_from_show(show(name, tensors=False), spec.tags_size)
    assert approx.output_bytes == spec.arch.output_bytes  # tied/untied told apart by parameter_count
    assert within(full_gpu_bytes(approx, 4096), full_gpu_bytes(spec.arch, 4096), 0.02)


@pytest.mark.parametrize("name", ["qwen2.5-coder:0.5b", "qwen2.5-coder:7b", "mxbai-embed-large"])
def test_without_tensors_needs_a_vocabulary_size(name):
    spec = catalog.find(name)
    body = show(name, tensors=False)
    key = f"{spec.arch.architecture}.vocab_size"
    with pytest.raises(ValueError, match=key):
        arch_from_show(body, spec.tags_size)
    body["model_info"][key] = spec.arch.vocab_size
    approx = arch_from_show(body, spec.tags_size)
    ctx = spec.default_num_ctx or 4096
    assert within(full_gpu_bytes(approx, ctx), full_gpu_bytes(spec.arch, ctx), 0.02)


def test_show_errors_name_what_is_missing():
    body = show("llama3.1:8b")
    with pytest.raises(ValueError, match="model_info"):
        arch_from_show({})
    del body["model_info"]["llama.block_count"]
    with pytest.raises(ValueError, match=r"llama\.block_count"):
        arch_from_show(body)
    with pytest.raises(ValueError, match=r"general\.architecture"):
        arch_from_show({"model_info": {}})
    with pytest.raises(ValueError, match="disk size"):
        arch_from_show(show("llama3.1:8b", tensors=False))
    body = show("llama3.1:8b")
    body["tensors"][0]["type"] = "Q9_Z"
    with pytest.raises(ValueError, match="Q9_Z"):
        arch_from_show(body)


def test_head_count_arrays():
    body = show("llama3.1:8b")
    body["model_info"]["llama.attention.head_count"] = [32] * 32
    body["model_info"]["llama.attention.head_count_kv"] = [8, 0, 4] + [8] * 29
    a = arch_from_show(body)
    assert (a.head_count, a.head_count_kv, a.key_length) == (32, 4, 128)


def test_bert_family_defaults_head_count_kv_to_one():
    body = show("all-minilm")
    assert not any(k.endswith("head_count_kv") for k in body["model_info"])
    a = arch_from_show(body)
    assert (a.head_count_kv, a.key_length, a.embedding) == (1, 32, True)
