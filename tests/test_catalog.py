"""The built-in catalog: names, sizes, digests, metadata and tensor lists of the guide's 13 models."""

from __future__ import annotations

import re

import pytest

from gpurouter.sizing import catalog
from gpurouter.sizing.estimate import tensor_bytes

# §7: /api/tags size and digest prefix.
TAGS = {
    "all-minilm:latest": (45_960_996, "1b226e2802db"),
    "nomic-embed-text:latest": (274_302_450, "0a109f422b47"),
    "mxbai-embed-large:latest": (669_615_493, "468836162de7"),
    "qwen2.5-coder:0.5b": (397_821_319, None),
    "qwen2.5-coder:1.5b": (986_062_089, "d7372fd82851"),
    "qwen2.5-coder:3b": (1_929_912_626, "f72c60cabf62"),
    "qwen2.5-coder:7b": (4_683_087_519, "2b0496514337"),
    "llama3.2:1b": (1_321_098_329, "baf6a787fdff"),
    "llama3.2:3b": (2_019_393_189, "a80c4f17acd5"),
    "llama3.1:8b": (4_920_753_328, "46e0c10c039e"),
    "codellama:7b": (3_825_910_662, "8fdf8f752f6e"),
    "codellama:13b": (7_365_960_935, "9f438cb9cd58"),
    "llama3.1:70b": (42_520_412_561, None),
}
# Appendix: arch, E, L, H, Hkv (1 where absent), d, V, trained ctx, tied.
APPENDIX = {
    "all-minilm:latest": ("bert", 384, 6, 12, 1, 32, 30522, 512, True),
    "nomic-embed-text:latest": ("nomic-bert", 768, 12, 12, 1, 64, 30522, 2048, True),
    "mxbai-embed-large:latest": ("bert", 1024, 24, 16, 1, 64, 30522, 512, True),
    "qwen2.5-coder:0.5b": ("qwen2", 896, 24, 14, 2, 64, 151936, 32768, True),
    "qwen2.5-coder:1.5b": ("qwen2", 1536, 28, 12, 2, 128, 151936, 32768, True),
    "qwen2.5-coder:3b": ("qwen2", 2048, 36, 16, 2, 128, 151936, 32768, True),
    "qwen2.5-coder:7b": ("qwen2", 3584, 28, 28, 4, 128, 152064, 32768, False),
    "llama3.2:1b": ("llama", 2048, 16, 32, 8, 64, 128256, 131072, True),
    "llama3.2:3b": ("llama", 3072, 28, 24, 8, 128, 128256, 131072, True),
    "llama3.1:8b": ("llama", 4096, 32, 32, 8, 128, 128256, 131072, False),
    "llama3.1:70b": ("llama", 8192, 80, 64, 8, 128, 128256, 131072, False),
    "codellama:7b": ("llama", 4096, 32, 32, 32, 128, 32016, 16384, False),
    "codellama:13b": ("llama", 5120, 40, 40, 40, 128, 32016, 16384, False),
}
GUIDE = {
    "all-minilm": 45,
    "nomic-embed-text": 274,
    "qwen2.5-coder:0.5b": 500,
    "mxbai-embed-large": 705,
    "qwen2.5-coder:1.5b": 900,
    "llama3.2:1b": 1300,
    "qwen2.5-coder:3b": 1800,
    "llama3.2:3b": 1900,
    "codellama:7b": 3600,
    "qwen2.5-coder:7b": 4400,
    "llama3.1:latest": 4700,
    "codellama:13b": 6900,
}
SCALE = {"M": 1e6, "B": 1e9}


def spec(name: str) -> catalog.ModelSpec:
    found = catalog.find(name)
    assert found is not None, name
    return found


def types_of(s: catalog.ModelSpec, suffix: str) -> list[str]:
    return [t["type"] for t in s.tensors if t["name"].endswith(suffix)]


def type_of(s: catalog.ModelSpec, name: str) -> str:
    (found,) = [t["type"] for t in s.tensors if t["name"] == name]
    return found


def test_names_and_tags_sizes():
    assert {s.name for s in catalog.CATALOG} == set(TAGS)
    for name, (size, _) in TAGS.items():
        assert spec(name).tags_size == size


def test_digests_are_unique_hex_with_the_known_prefixes():
    digests = [s.digest for s in catalog.CATALOG]
    assert len(set(digests)) == len(digests)
    for s in catalog.CATALOG:
        assert re.fullmatch(r"[0-9a-f]{64}", s.digest), s.name
        prefix = TAGS[s.name][1]
        if prefix:
            assert s.digest.startswith(prefix)
    assert spec("llama3.1:8b").digest == "46e0c10c039e019119339687c3c1757cc81b9da49709a3b3924863ba87ca666e"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("llama3.1", "llama3.1:8b"),
        ("llama3.1:latest", "llama3.1:8b"),
        ("Llama3.1:8B", "llama3.1:8b"),
        ("llama3.2", "llama3.2:3b"),
        ("qwen2.5-coder", "qwen2.5-coder:7b"),
        ("qwen2.5-coder:0.5b", "qwen2.5-coder:0.5b"),
        ("codellama", "codellama:7b"),
        ("mxbai-embed-large", "mxbai-embed-large:latest"),
        ("all-minilm:latest", "all-minilm:latest"),
        ("llama3.1:70b", "llama3.1:70b"),
    ],
)
def test_find_resolves_names_and_aliases(query, expected):
    assert spec(query).name == expected


@pytest.mark.parametrize("query", ["llama3.1:405b", "mistral", "", "qwen2.5-coder:14b"])
def test_find_unknown(query):
    assert catalog.find(query) is None


def test_guide_table_in_the_guides_order():
    table = catalog.guide_table()
    assert list(table.items()) == list(GUIDE.items())
    for name, mb in table.items():
        assert spec(name).guide_mb == mb
    assert spec("llama3.1:70b").guide_mb is None


@pytest.mark.parametrize("name", sorted(APPENDIX))
def test_arch_matches_the_appendix(name):
    s = spec(name)
    arch, e, blocks, h, hkv, d, vocab, ctx, tied = APPENDIX[name]
    a = s.arch
    assert (a.architecture, a.embedding_length, a.block_count, a.head_count, a.head_count_kv) == (
        arch,
        e,
        blocks,
        h,
        hkv,
    )
    assert (a.key_length, a.value_length, a.vocab_size, a.context_length) == (d, d, vocab, ctx)
    assert len(a.layer_bytes) == blocks
    assert any(t["name"] == "output.weight" for t in s.tensors) is not tied
    assert s.family == arch and s.quantization_level in ("Q4_K_M", "Q4_0", "Q8_0", "F16")


@pytest.mark.parametrize("name", sorted(TAGS))
def test_tensor_bytes_fit_the_disk_size(name):
    s = spec(name)
    total = sum(tensor_bytes(t["type"], t["shape"]) for t in s.tensors)
    # the rest of the /api/tags size is GGUF metadata (the tokenizer arrays) and the small blobs
    gap = s.tags_size - total
    assert 0 < gap < 8_000_000
    assert gap / s.tags_size < (0.01 if s.tags_size > 900_000_000 else 0.02)


@pytest.mark.parametrize("name", sorted(TAGS))
def test_parameter_count_matches_parameter_size(name):
    s = spec(name)
    count = s.model_info()["general.parameter_count"]
    stated = float(s.parameter_size[:-1]) * SCALE[s.parameter_size[-1]]
    assert abs(count - stated) / stated < 0.05


def test_parameter_count_exact_for_llama31_8b():
    assert spec("llama3.1:8b").model_info()["general.parameter_count"] == 8_030_261_248


def test_model_info_keys():
    info = spec("llama3.1:8b").model_info()
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length"):
        assert f"llama.{key}" in info
    assert info["general.architecture"] == "llama" and info["general.file_type"] == 15
    assert info["llama.attention.head_count_kv"] == 8 and info["llama.vocab_size"] == 128256
    assert info["tokenizer.ggml.tokens"] == [] and info["tokenizer.ggml.merges"] == []
    info["tokenizer.ggml.tokens"].append("x")  # a copy: the catalog stays intact
    assert spec("llama3.1:8b").model_info()["tokenizer.ggml.tokens"] == []
    minilm = spec("all-minilm").model_info()
    assert "bert.pooling_type" in minilm and "bert.attention.head_count_kv" not in minilm


def test_capabilities_and_families():
    for s in catalog.CATALOG:
        embedder = s.arch.embedding
        assert (s.capabilities == ("embedding",)) is embedder
        assert (f"{s.family}.pooling_type" in s.model_info()) is embedder
    assert spec("qwen2.5-coder:3b").capabilities == ("completion", "tools", "insert")
    assert spec("llama3.2:1b").capabilities == ("completion", "tools")
    assert "insert" in spec("codellama:13b").capabilities
    assert spec("codellama:7b").families is None
    assert spec("llama3.1:8b").families == ("llama",)
    assert [s.name for s in catalog.CATALOG if s.default_num_ctx] == [
        "all-minilm:latest",
        "nomic-embed-text:latest",
        "mxbai-embed-large:latest",
    ]


def test_q4_k_m_rules_llama31_8b():
    s = spec("llama3.1:8b")
    more_bits = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for kind in ("attn_v", "ffn_down"):
        for i in range(32):
            (t,) = [t for t in s.tensors if t["name"] == f"blk.{i}.{kind}.weight"]
            assert t["type"] == ("Q6_K" if i in more_bits else "Q4_K")
    assert set(types_of(s, "attn_q.weight")) == set(types_of(s, "ffn_up.weight")) == {"Q4_K"}
    assert type_of(s, "output.weight") == "Q6_K" and type_of(s, "token_embd.weight") == "Q4_K"
    assert set(types_of(s, "norm.weight")) == {"F32"}


def test_q4_k_m_fallbacks_of_qwen_05b():
    s = spec("qwen2.5-coder:0.5b")  # 896 is not a multiple of 256
    assert set(types_of(s, "attn_q.weight")) == set(types_of(s, "ffn_gate.weight")) == {"Q5_0"}
    assert set(types_of(s, "attn_v.weight")) == {"Q5_0", "Q8_0"}
    assert set(types_of(s, "ffn_down.weight")) == {"Q4_K", "Q6_K"}  # rows of 4864 split into 256-blocks
    assert type_of(s, "token_embd.weight") == "Q8_0"
    assert set(types_of(s, ".bias")) == {"F32"}


def test_other_quant_rules():
    assert type_of(spec("llama3.2:3b"), "token_embd.weight") == "Q6_K"  # tied: quantized as the output
    assert type_of(spec("llama3.2:1b"), "token_embd.weight") == "Q8_0"
    assert set(types_of(spec("llama3.2:1b"), "ffn_up.weight")) == {"Q8_0"}
    codellama = spec("codellama:7b")
    assert type_of(codellama, "output.weight") == "Q6_K"
    assert set(types_of(codellama, "attn_v.weight")) == {"Q4_0"}
    assert set(types_of(spec("llama3.1:70b"), "attn_v.weight")) == {"Q5_K", "Q6_K"}
    bert = spec("mxbai-embed-large")
    assert type_of(bert, "position_embd.weight") == "F16"
    assert set(types_of(bert, "attn_q.weight")) == {"F16"} and set(types_of(bert, ".bias")) == {"F32"}
