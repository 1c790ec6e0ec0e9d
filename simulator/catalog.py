"""The models the simulator serves (simulator/models.yaml), with their GGUF tensors and metadata (simulator/gguf.py)
and the facts its memory model reads from them. The simulator's own: the router's catalog is what it judges."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simulator import gguf

MODELS_FILE = Path(__file__).with_name("models.yaml")


@dataclass(frozen=True)
class Arch:
    """What the simulated Ollama and llama-server read from a model's GGUF file."""

    architecture: str
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int  # 1 where the metadata has none (bert family), as Ollama assumes
    head_dim: int
    feed_forward_length: int
    vocab_size: int
    context_length: int  # trained
    embedding: bool  # has a pooling type: an embedder (one sequence, no output layer)
    causal: bool  # non-causal encoders keep no KV cache in llama-server
    tied: bool  # no output.weight: the output reuses token_embd
    block_bytes: tuple[int, ...]  # every blk.i.* tensor
    output_bytes: int  # the output layer: output.weight (token_embd when tied) + output_norm
    token_embd_bytes: int
    other_bytes: int  # tensors outside the blocks, the output and token_embd (rope_freqs, position_embd, …)


def _arch(m: Mapping[str, Any], tensors: tuple[gguf.Tensor, ...]) -> Arch:
    blocks = [0] * m["L"]
    groups: dict[str, int] = {}
    for t in tensors:
        head, _, rest = t["name"].partition(".")
        if head == "blk":
            blocks[int(rest.split(".", 1)[0])] += gguf.tensor_bytes(t)
        else:
            groups[head] = groups.get(head, 0) + gguf.tensor_bytes(t)
    token_embd = groups.pop("token_embd")
    norm = groups.pop("output_norm", 0)
    output = groups.pop("output", token_embd if m["tied"] else 0)
    return Arch(
        architecture=m["arch"],
        block_count=m["L"],
        embedding_length=m["E"],
        head_count=m["H"],
        head_count_kv=m["Hkv"] or 1,
        head_dim=m["E"] // m["H"],
        feed_forward_length=m["FFN"],
        vocab_size=m["V"],
        context_length=m["trained_ctx"],
        embedding=m.get("pooling") is not None,
        causal=m.get("pooling") is None,
        tied=m["tied"],
        block_bytes=tuple(blocks),
        output_bytes=output + norm,
        token_embd_bytes=token_embd,
        other_bytes=sum(groups.values()),
    )


@dataclass(frozen=True)
class ModelSpec:
    """One model: its `/api/tags` entry, its `/api/show` metadata and tensors, and its architecture."""

    name: str
    aliases: tuple[str, ...]
    family: str
    families: tuple[str, ...] | None
    parameter_size: str
    quantization_level: str
    tags_size: int
    digest: str
    capabilities: tuple[str, ...]
    default_num_ctx: int | None  # the Modelfile's PARAMETER num_ctx
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


def _spec(m: Mapping[str, Any]) -> ModelSpec:
    tensors = gguf.tensors(m)
    return ModelSpec(
        name=m["name"],
        aliases=tuple(m.get("aliases", ())),
        family=m["arch"],
        families=(m["arch"],) if m.get("families", True) is not None else None,
        parameter_size=str(m["parameter_size"]),
        quantization_level=m["quant"],
        tags_size=m["tags_size"],
        digest=str(m["digest"]),
        capabilities=tuple(m["capabilities"]),
        default_num_ctx=m.get("num_ctx"),
        arch=_arch(m, tensors),
        tensors=tensors,
        _info=gguf.metadata(m, tensors),
    )


def load(path: Path = MODELS_FILE) -> tuple[ModelSpec, ...]:
    """Every model of a models file."""
    return tuple(_spec(m) for m in yaml.safe_load(path.read_text(encoding="utf-8")))


CATALOG: tuple[ModelSpec, ...] = load()
_BY_NAME = {n: spec for spec in CATALOG for n in (spec.name, *spec.aliases)}


def find(name: str) -> ModelSpec | None:
    """The model for a name or alias; a name without a tag means `:latest`."""
    name = name.strip().lower()
    return _BY_NAME.get(name if ":" in name.rsplit("/", 1)[-1] else name + ":latest")


def effective_ctx(arch: Arch, num_ctx: int) -> int:
    """The context per sequence a runner gets: `num_ctx` capped at the trained context (v0.9.3+), at least 4."""
    return max(4, min(num_ctx, arch.context_length) if arch.context_length > 0 else num_ctx)
