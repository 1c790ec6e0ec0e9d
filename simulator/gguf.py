"""A model's GGUF file as the simulator holds it: the tensors (name, ggml type, shape) and the metadata, built
from a model's architecture facts (simulator/models.yaml) with llama.cpp's quantisation rules.

Tensor types (llama.cpp `llama_tensor_get_type` for the file types the simulator serves): Q4_K_M keeps most
matrices at Q4_K and raises `attn_v` and `ffn_down` to Q6_K on the first and last eighth of the blocks and on
every third block between (Q5_K for `attn_v` of 70B models); the output matrix is Q6_K; a K-quant whose rows do
not split into 256-element blocks falls back (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0). Norms and biases are F32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# ggml type → (bytes per block, elements per block)
TYPE_SIZES: dict[str, tuple[int, int]] = {
    "F32": (4, 1),
    "F16": (2, 1),
    "Q4_0": (18, 32),
    "Q5_0": (22, 32),
    "Q5_1": (24, 32),
    "Q8_0": (34, 32),
    "Q4_K": (144, 256),
    "Q5_K": (176, 256),
    "Q6_K": (210, 256),
}
FILE_TYPE_IDS = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}  # general.file_type
_MAIN_TYPE = {"F16": "F16", "Q4_0": "Q4_0", "Q8_0": "Q8_0", "Q4_K_M": "Q4_K"}
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
SUPER_BLOCK = 256

Tensor = dict[str, Any]  # {"name", "type", "shape"} as /api/show lists it


def tensor_bytes(tensor: Mapping[str, Any]) -> int:
    """Bytes of one tensor in the file."""
    per_block, elements = TYPE_SIZES[tensor["type"]]
    return math.prod(tensor["shape"]) // elements * per_block


def _row_fits(ggml_type: str, row: int) -> str:
    return _K_FALLBACK.get(ggml_type, ggml_type) if row % SUPER_BLOCK else ggml_type


def _more_bits(block: int, blocks: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth, and every third block between."""
    return block < blocks // 8 or block >= 7 * blocks // 8 or (block - blocks // 8) % 3 == 2


class _Writer:
    """Tensors of one model, in file order."""

    def __init__(self, m: Mapping[str, Any]) -> None:
        self.m = m
        self.tensors: list[Tensor] = []

    def add(self, name: str, ggml_type: str, *shape: int) -> None:
        self.tensors.append({"name": name, "type": ggml_type, "shape": list(shape)})

    def matrix(self, name: str, kind: str, block: int, n_in: int, n_out: int) -> None:
        quant = self.m["quant"]
        ggml_type = _MAIN_TYPE[quant]
        if quant == "Q4_K_M":
            if kind in ("attn_v", "ffn_down") and _more_bits(block, self.m["L"]):
                ggml_type = "Q6_K"
            elif kind == "attn_v" and self.m.get("size_class") == "70B":
                ggml_type = "Q5_K"
            ggml_type = _row_fits(ggml_type, n_in)
        self.add(name, ggml_type, n_in, n_out)

    def output_type(self) -> str:
        quant = self.m["quant"]
        if quant in ("F16", "Q8_0"):
            return _MAIN_TYPE[quant]
        return _row_fits("Q6_K", self.m["E"])


def _decoder_block(w: _Writer, i: int, biases: bool) -> None:
    m = w.m
    e, ffn = m["E"], m["FFN"]
    kv = m["Hkv"] * (e // m["H"])
    p = f"blk.{i}."
    w.add(p + "attn_norm.weight", "F32", e)
    for kind, width in (("attn_q", e), ("attn_k", kv), ("attn_v", kv)):
        w.matrix(p + kind + ".weight", kind, i, e, width)
        if biases:
            w.add(p + kind + ".bias", "F32", width)
    w.matrix(p + "attn_output.weight", "attn_output", i, e, e)
    w.add(p + "ffn_norm.weight", "F32", e)
    w.matrix(p + "ffn_gate.weight", "ffn_gate", i, e, ffn)
    w.matrix(p + "ffn_up.weight", "ffn_up", i, e, ffn)
    w.matrix(p + "ffn_down.weight", "ffn_down", i, ffn, e)


def _bert_block(w: _Writer, i: int) -> None:
    e, ffn = w.m["E"], w.m["FFN"]
    p = f"blk.{i}."
    for kind in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add(p + kind + ".weight", "F16", e, e)
        w.add(p + kind + ".bias", "F32", e)
    w.add(p + "attn_output_norm.weight", "F32", e)
    w.add(p + "attn_output_norm.bias", "F32", e)
    w.add(p + "ffn_up.weight", "F16", e, ffn)
    w.add(p + "ffn_up.bias", "F32", ffn)
    w.add(p + "ffn_down.weight", "F16", ffn, e)
    w.add(p + "ffn_down.bias", "F32", e)
    w.add(p + "layer_output_norm.weight", "F32", e)
    w.add(p + "layer_output_norm.bias", "F32", e)


def _nomic_block(w: _Writer, i: int) -> None:
    e, ffn = w.m["E"], w.m["FFN"]
    p = f"blk.{i}."
    w.add(p + "attn_qkv.weight", "F16", e, 3 * e)
    w.add(p + "attn_output.weight", "F16", e, e)
    w.add(p + "attn_output_norm.weight", "F32", e)
    w.add(p + "attn_output_norm.bias", "F32", e)
    w.add(p + "ffn_up.weight", "F16", e, ffn)
    w.add(p + "ffn_gate.weight", "F16", e, ffn)
    w.add(p + "ffn_down.weight", "F16", ffn, e)
    w.add(p + "layer_output_norm.weight", "F32", e)
    w.add(p + "layer_output_norm.bias", "F32", e)


def tensors(m: Mapping[str, Any]) -> tuple[Tensor, ...]:
    """Every tensor of the model's GGUF file, in file order."""
    w = _Writer(m)
    arch, e, vocab = m["arch"], m["E"], m["V"]
    if m.get("rope_freqs"):
        w.add("rope_freqs.weight", "F32", e // m["H"] // 2)
    w.add("token_embd.weight", w.output_type() if m["tied"] else _MAIN_TYPE[m["quant"]], e, vocab)
    if arch == "bert":
        w.add("position_embd.weight", "F16", e, m["trained_ctx"])
    if arch in ("bert", "nomic-bert"):
        w.add("token_types.weight", "F16", e, 2)
        w.add("token_embd_norm.weight", "F32", e)
        w.add("token_embd_norm.bias", "F32", e)
    for i in range(m["L"]):
        if arch == "bert":
            _bert_block(w, i)
        elif arch == "nomic-bert":
            _nomic_block(w, i)
        else:
            _decoder_block(w, i, biases=arch == "qwen2")
    if arch in ("llama", "qwen2"):
        w.add("output_norm.weight", "F32", e)
        if not m["tied"]:
            w.add("output.weight", w.output_type(), e, vocab)
    return tuple(w.tensors)


def metadata(m: Mapping[str, Any], file_tensors: tuple[Tensor, ...]) -> dict[str, Any]:
    """GGUF key/values as `/api/show` `model_info` lists them (the tokenizer's arrays left empty)."""
    a = m["arch"]
    params = sum(math.prod(t["shape"]) for t in file_tensors if t["name"] != "rope_freqs.weight")
    info: dict[str, Any] = {
        "general.architecture": a,
        "general.file_type": FILE_TYPE_IDS[m["quant"]],
        "general.parameter_count": params,
        "general.quantization_version": 2,
        f"{a}.block_count": m["L"],
        f"{a}.context_length": m["trained_ctx"],
        f"{a}.embedding_length": m["E"],
        f"{a}.feed_forward_length": m["FFN"],
        f"{a}.attention.head_count": m["H"],
    }
    if m["Hkv"] is not None:
        info[f"{a}.attention.head_count_kv"] = m["Hkv"]
    if m.get("pooling") is None:
        info[f"{a}.attention.layer_norm_rms_epsilon"] = 1e-6 if a == "qwen2" else 1e-5
    else:
        info[f"{a}.attention.layer_norm_epsilon"] = 1e-12
        info[f"{a}.attention.causal"] = False
        info[f"{a}.pooling_type"] = m["pooling"]
    if m.get("rope_base"):
        info[f"{a}.rope.freq_base"] = m["rope_base"]
    if a == "llama":
        info["llama.rope.dimension_count"] = m["E"] // m["H"]
        info["llama.vocab_size"] = m["V"]
    tokenizer = m.get("tokenizer", "gpt2")
    info["tokenizer.ggml.model"] = tokenizer
    info["tokenizer.ggml.tokens"] = []
    info["tokenizer.ggml.token_type"] = []
    info["tokenizer.ggml.merges" if tokenizer == "gpt2" else "tokenizer.ggml.scores"] = []
    return info
