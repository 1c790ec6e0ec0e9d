"""The built-in catalog: the 13 models of the original guide, with the metadata `/api/show` gives for them.

Tensor lists are generated from the architecture (reference/ollama-api.md Appendix) and llama.cpp's quant
rules (§5.5), so the memory estimate of `gpurouter.sizing.estimate` runs on them exactly as on a real `/api/show`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from gpurouter.sizing.estimate import Arch, arch_from_show

QK_K = 256  # elements per K-quant block
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp, when a row is not a multiple of 256
_FILE_TYPE = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}
_BASE_TYPE = {"F16": "F16", "Q4_0": "Q4_0", "Q8_0": "Q8_0", "Q4_K_M": "Q4_K"}


@dataclass(frozen=True)
class _Shape:
    """Architecture facts (Appendix) from which tensors and metadata are generated."""

    arch: str
    quant: str
    e: int
    blocks: int
    heads: int
    heads_kv: int | None  # None: absent in metadata (bert family)
    ffn: int
    vocab: int
    tied: bool  # output shares token_embd
    trained_ctx: int
    tokenizer: str = "gpt2"  # tokenizer.ggml.model
    rope_base: float = 0.0  # <arch>.rope.freq_base (0: none)
    pooling: int | None = None  # <arch>.pooling_type: embedding models only
    rope_freqs: bool = False  # llama3.x carry rope_freqs.weight (not counted by the estimate)
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B: attn_v Q4_K → Q5_K

    @property
    def head_dim(self) -> int:
        return self.e // self.heads


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fit(ggml_type: str, row: int) -> str:
    return _FALLBACK[ggml_type] if row % QK_K and ggml_type in _FALLBACK else ggml_type


def _matrix_type(s: _Shape, kind: str, layer: int, row: int) -> str:
    """llama.cpp `llama_tensor_get_type` for the ftypes of the catalog."""
    if s.quant in ("F16", "Q8_0", "Q4_0"):
        return _BASE_TYPE[s.quant]
    t = "Q4_K"
    if kind in ("attn_v", "ffn_down") and _use_more_bits(layer, s.blocks):
        t = "Q6_K"
    elif kind == "attn_v" and s.is_70b:
        t = "Q5_K"
    return _fit(t, row)


def _output_type(s: _Shape) -> str:
    """output.weight (or the tied token_embd): Q6_K, Q8_0 where rows don't split into K-quant blocks."""
    if s.quant == "F16":
        return "F16"
    return "Q8_0" if s.e % QK_K or s.quant == "Q8_0" else "Q6_K"


def _tensors(s: _Shape) -> tuple[dict, ...]:
    """Every GGUF tensor, in file order, as `/api/show` lists them."""
    e, d, ffn = s.e, s.head_dim, s.ffn
    kv = (s.heads_kv or s.heads) * d
    out: list[dict] = []

    def add(name: str, ggml_type: str, *shape: int) -> None:
        out.append({"name": name, "type": ggml_type, "shape": list(shape)})

    if s.rope_freqs:
        add("rope_freqs.weight", "F32", d // 2)
    add("token_embd.weight", _output_type(s) if s.tied else _BASE_TYPE[s.quant], e, s.vocab)
    if s.arch == "bert":
        add("position_embd.weight", "F16", e, s.trained_ctx)
    if s.arch in ("bert", "nomic-bert"):
        add("token_types.weight", "F16", e, 2)
        add("token_embd_norm.weight", "F32", e)
        add("token_embd_norm.bias", "F32", e)
    for i in range(s.blocks):
        p = f"blk.{i}."
        if s.arch in ("llama", "qwen2"):
            add(p + "attn_norm.weight", "F32", e)
            for kind, n_out in (("attn_q", e), ("attn_k", kv), ("attn_v", kv)):
                add(p + kind + ".weight", _matrix_type(s, kind, i, e), e, n_out)
                if s.arch == "qwen2":
                    add(p + kind + ".bias", "F32", n_out)
            add(p + "attn_output.weight", _matrix_type(s, "attn_output", i, e), e, e)
            add(p + "ffn_norm.weight", "F32", e)
            add(p + "ffn_gate.weight", _matrix_type(s, "ffn_gate", i, e), e, ffn)
            add(p + "ffn_up.weight", _matrix_type(s, "ffn_up", i, e), e, ffn)
            add(p + "ffn_down.weight", _matrix_type(s, "ffn_down", i, ffn), ffn, e)
        elif s.arch == "bert":
            for kind in ("attn_q", "attn_k", "attn_v", "attn_output"):
                add(p + kind + ".weight", "F16", e, e)
                add(p + kind + ".bias", "F32", e)
            add(p + "attn_output_norm.weight", "F32", e)
            add(p + "attn_output_norm.bias", "F32", e)
            add(p + "ffn_up.weight", "F16", e, ffn)
            add(p + "ffn_up.bias", "F32", ffn)
            add(p + "ffn_down.weight", "F16", ffn, e)
            add(p + "ffn_down.bias", "F32", e)
            add(p + "layer_output_norm.weight", "F32", e)
            add(p + "layer_output_norm.bias", "F32", e)
        else:  # nomic-bert: fused qkv, SwiGLU, no matrix biases
            add(p + "attn_qkv.weight", "F16", e, 3 * e)
            add(p + "attn_output.weight", "F16", e, e)
            add(p + "attn_output_norm.weight", "F32", e)
            add(p + "attn_output_norm.bias", "F32", e)
            add(p + "ffn_up.weight", "F16", e, ffn)
            add(p + "ffn_gate.weight", "F16", e, ffn)
            add(p + "ffn_down.weight", "F16", ffn, e)
            add(p + "layer_output_norm.weight", "F32", e)
            add(p + "layer_output_norm.bias", "F32", e)
    if s.arch in ("llama", "qwen2"):
        add("output_norm.weight", "F32", e)
        if not s.tied:
            add("output.weight", _output_type(s), e, s.vocab)
    return tuple(out)


def _parameter_count(tensors: tuple[dict, ...]) -> int:
    """general.parameter_count: the checkpoint's parameters (the generated rope_freqs excluded)."""
    return sum(math.prod(t["shape"]) for t in tensors if t["name"] != "rope_freqs.weight")


def _model_info(s: _Shape, tensors: tuple[dict, ...]) -> dict:
    a = s.arch
    info: dict = {
        "general.architecture": a,
        "general.file_type": _FILE_TYPE[s.quant],
        "general.parameter_count": _parameter_count(tensors),
        "general.quantization_version": 2,
        f"{a}.block_count": s.blocks,
        f"{a}.context_length": s.trained_ctx,
        f"{a}.embedding_length": s.e,
        f"{a}.feed_forward_length": s.ffn,
        f"{a}.attention.head_count": s.heads,
    }
    if s.heads_kv is not None:
        info[f"{a}.attention.head_count_kv"] = s.heads_kv
    if s.pooling is None:
        info[f"{a}.attention.layer_norm_rms_epsilon"] = 1e-6 if a == "qwen2" else 1e-5
    else:
        info[f"{a}.attention.layer_norm_epsilon"] = 1e-12
        info[f"{a}.attention.causal"] = False
        info[f"{a}.pooling_type"] = s.pooling
    if s.rope_base:
        info[f"{a}.rope.freq_base"] = s.rope_base
    if a == "llama":
        info["llama.rope.dimension_count"] = s.head_dim
        info["llama.vocab_size"] = s.vocab
    info["tokenizer.ggml.model"] = s.tokenizer
    info["tokenizer.ggml.tokens"] = []
    info["tokenizer.ggml.token_type"] = []
    info["tokenizer.ggml.merges" if s.tokenizer == "gpt2" else "tokenizer.ggml.scores"] = []
    return info


@dataclass(frozen=True)
class ModelSpec:
    """One catalog model: its `/api/tags` entry, `/api/show` metadata and estimate input."""

    name: str
    aliases: tuple[str, ...]
    family: str
    families: tuple[str, ...] | None
    parameter_size: str
    quantization_level: str
    tags_size: int
    digest: str
    capabilities: tuple[str, ...]
    guide_mb: int | None
    default_num_ctx: int | None
    arch: Arch
    tensors: tuple[dict, ...] = field(repr=False)  # as /api/show lists them; treat as read-only
    _info: dict = field(repr=False, compare=False)

    def model_info(self, verbose: bool = False) -> dict:
        """GGUF metadata as `/api/show` `model_info`: arrays longer than 5 elements (the tokenizer's) come back
        as `[]` unless `verbose`; with it, synthetic arrays of the vocabulary's length stand in for them."""
        info = {k: (list(v) if isinstance(v, list) else v) for k, v in self._info.items()}
        if verbose:
            vocab = self.arch.vocab_size
            info["tokenizer.ggml.tokens"] = [f"<t{i}>" for i in range(vocab)]
            info["tokenizer.ggml.token_type"] = [1] * vocab
            if "tokenizer.ggml.merges" in info:
                info["tokenizer.ggml.merges"] = [f"<t{i}> <t{i + 1}>" for i in range(vocab - 256)]
            else:
                info["tokenizer.ggml.scores"] = [0.0] * vocab
        return info


def _spec(
    name: str,
    shape: _Shape,
    parameter_size: str,
    tags_size: int,
    digest: str | None,
    capabilities: tuple[str, ...],
    *,
    guide_mb: int | None,
    default_num_ctx: int | None = None,
    aliases: tuple[str, ...] = (),
    families_null: bool = False,
) -> ModelSpec:
    """A catalog entry; `digest` is §7's prefix (or whole digest), completed from sha256(name)."""
    tensors = _tensors(shape)
    info = _model_info(shape, tensors)
    return ModelSpec(
        name=name,
        aliases=aliases,
        family=shape.arch,
        families=None if families_null else (shape.arch,),
        parameter_size=parameter_size,
        quantization_level=shape.quant,
        tags_size=tags_size,
        digest=((digest or "") + hashlib.sha256(name.encode()).hexdigest())[:64],
        capabilities=capabilities,
        guide_mb=guide_mb,
        default_num_ctx=default_num_ctx,
        arch=arch_from_show({"model_info": info, "tensors": tensors}),
        tensors=tensors,
        _info=info,
    )


_EMBED = ("embedding",)
_CHAT = ("completion", "tools")
_CODER = ("completion", "tools", "insert")
_INSERT = ("completion", "insert")
_BERT = {"tokenizer": "bert", "pooling": 1}
_QWEN = {"rope_base": 1e6}
_LLAMA3 = {"rope_base": 5e5, "rope_freqs": True}
_CODELLAMA = {"tokenizer": "llama", "rope_base": 1e6}

# Appendix: arch, quant, E, L, H, Hkv, FFN, V, tied, trained ctx; §7: parameter_size, tags size, digest.
# fmt: off
CATALOG: tuple[ModelSpec, ...] = (
    _spec("all-minilm:latest",
          _Shape("bert", "F16", 384, 6, 12, None, 1536, 30522, True, 512, **_BERT),
          "23M", 45_960_996, "1b226e2802db", _EMBED, guide_mb=45, default_num_ctx=2048),
    _spec("nomic-embed-text:latest",
          _Shape("nomic-bert", "F16", 768, 12, 12, None, 3072, 30522, True, 2048, **_BERT, rope_base=1e3),
          "137M", 274_302_450, "0a109f422b47", _EMBED, guide_mb=274, default_num_ctx=8192),
    _spec("mxbai-embed-large:latest",
          _Shape("bert", "F16", 1024, 24, 16, None, 4096, 30522, True, 512, tokenizer="bert", pooling=2),
          "334M", 669_615_493, "468836162de7", _EMBED, guide_mb=705, default_num_ctx=512),
    _spec("qwen2.5-coder:0.5b",
          _Shape("qwen2", "Q4_K_M", 896, 24, 14, 2, 4864, 151936, True, 32768, **_QWEN),
          "494.03M", 397_821_319, None, _CODER, guide_mb=500),
    _spec("qwen2.5-coder:1.5b",
          _Shape("qwen2", "Q4_K_M", 1536, 28, 12, 2, 8960, 151936, True, 32768, **_QWEN),
          "1.5B", 986_062_089, "d7372fd82851", _CODER, guide_mb=900),
    _spec("qwen2.5-coder:3b",
          _Shape("qwen2", "Q4_K_M", 2048, 36, 16, 2, 11008, 151936, True, 32768, **_QWEN),
          "3.1B", 1_929_912_626, "f72c60cabf62", _CODER, guide_mb=1800),
    _spec("qwen2.5-coder:7b",
          _Shape("qwen2", "Q4_K_M", 3584, 28, 28, 4, 18944, 152064, False, 32768, **_QWEN),
          "7.6B", 4_683_087_519, "2b0496514337", _CODER, guide_mb=4400, aliases=("qwen2.5-coder:latest",)),
    _spec("llama3.2:1b",
          _Shape("llama", "Q8_0", 2048, 16, 32, 8, 8192, 128256, True, 131072, **_LLAMA3),
          "1.2B", 1_321_098_329, "baf6a787fdff", _CHAT, guide_mb=1300),
    _spec("llama3.2:3b",
          _Shape("llama", "Q4_K_M", 3072, 28, 24, 8, 8192, 128256, True, 131072, **_LLAMA3),
          "3.2B", 2_019_393_189, "a80c4f17acd5", _CHAT, guide_mb=1900, aliases=("llama3.2:latest",)),
    _spec("llama3.1:8b",
          _Shape("llama", "Q4_K_M", 4096, 32, 32, 8, 14336, 128256, False, 131072, **_LLAMA3),
          "8.0B", 4_920_753_328, "46e0c10c039e019119339687c3c1757cc81b9da49709a3b3924863ba87ca666e", _CHAT,
          guide_mb=4700, aliases=("llama3.1:latest",)),
    _spec("llama3.1:70b",
          _Shape("llama", "Q4_K_M", 8192, 80, 64, 8, 28672, 128256, False, 131072, **_LLAMA3, is_70b=True),
          "70.6B", 42_520_412_561, None, _CHAT, guide_mb=None),
    _spec("codellama:7b",
          _Shape("llama", "Q4_0", 4096, 32, 32, 32, 11008, 32016, False, 16384, **_CODELLAMA),
          "7B", 3_825_910_662, "8fdf8f752f6e", _INSERT, guide_mb=3600, aliases=("codellama:latest",),
          families_null=True),
    _spec("codellama:13b",
          _Shape("llama", "Q4_0", 5120, 40, 40, 40, 13824, 32016, False, 16384, **_CODELLAMA),
          "13B", 7_365_960_935, "9f438cb9cd58", _INSERT, guide_mb=6900),
)
# fmt: on

_GUIDE_ORDER = (
    "all-minilm",
    "nomic-embed-text",
    "qwen2.5-coder:0.5b",
    "mxbai-embed-large",
    "qwen2.5-coder:1.5b",
    "llama3.2:1b",
    "qwen2.5-coder:3b",
    "llama3.2:3b",
    "codellama:7b",
    "qwen2.5-coder:7b",
    "llama3.1:latest",
    "codellama:13b",
)


def _normalize(name: str) -> str:
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


_BY_NAME = {n: spec for spec in CATALOG for n in (spec.name, *spec.aliases)}


def find(name: str) -> ModelSpec | None:
    """The catalog entry for a name or alias; a name without a tag means `:latest`."""
    return _BY_NAME.get(_normalize(name))


def guide_table() -> dict[str, int]:
    """The guide's size table (MB), in its order and with its names."""
    table = {}
    for name in _GUIDE_ORDER:
        spec = find(name)
        assert spec is not None and spec.guide_mb is not None
        table[name] = spec.guide_mb
    return table
