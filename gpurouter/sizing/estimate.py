"""Ollama's classic memory estimate (llm/memory.go + fs/ggml GraphSize, v0.10–v0.12.10): pure functions.

See reference/ollama-api.md §5: per-layer weights and f16 KV, the compute graph, the 457 MiB per-GPU reserve
and the placement walk (last layer to first) that gives `/api/ps` `size` and `size_vram`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gpurouter.units import MIB

RESERVE = 457 * MIB  # MinimumMemory() of a CUDA/ROCm GPU, counted in the classic `size`
KV_BYTES = 2  # f16 cache (quantized KV needs flash attention, off in the classic era)
DEFAULT_BATCH = 512
_HUGE = 1 << 62

# GGML type → (bytes per block, elements per block), as fs/ggml TypeSize/BlockSize.
GGML_TYPES: dict[str, tuple[int, int]] = {
    "F32": (4, 1),
    "F16": (2, 1),
    "BF16": (2, 1),
    "F64": (8, 1),
    "I8": (1, 1),
    "I16": (2, 1),
    "I32": (4, 1),
    "I64": (8, 1),
    "Q4_0": (18, 32),
    "Q4_1": (20, 32),
    "Q5_0": (22, 32),
    "Q5_1": (24, 32),
    "Q8_0": (34, 32),
    "Q2_K": (84, 256),
    "Q3_K": (110, 256),
    "Q4_K": (144, 256),
    "Q5_K": (176, 256),
    "Q6_K": (210, 256),
    "Q8_K": (292, 256),
}

# general.file_type → (type of the untied token_embd and of most matrices, type of output.weight).
FILE_TYPES: dict[int, tuple[str, str]] = {
    0: ("F32", "F32"),
    1: ("F16", "F16"),
    2: ("Q4_0", "Q6_K"),
    3: ("Q4_1", "Q6_K"),
    7: ("Q8_0", "Q8_0"),
    8: ("Q5_0", "Q6_K"),
    9: ("Q5_1", "Q6_K"),
    10: ("Q2_K", "Q6_K"),
    11: ("Q3_K", "Q6_K"),
    12: ("Q3_K", "Q6_K"),
    13: ("Q3_K", "Q6_K"),
    14: ("Q4_K", "Q6_K"),
    15: ("Q4_K", "Q6_K"),
    16: ("Q5_K", "Q6_K"),
    17: ("Q5_K", "Q6_K"),
    18: ("Q6_K", "Q6_K"),
    32: ("BF16", "BF16"),
}


@dataclass(frozen=True)
class Arch:
    """What the estimate needs to know about a model."""

    architecture: str  # "llama", "qwen2", "bert", "nomic-bert"
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int  # 1 when absent in metadata (bert family)
    key_length: int
    value_length: int
    vocab_size: int
    context_length: int  # trained context
    layer_bytes: tuple[int, ...]  # W_i: bytes of all blk.i.* tensors
    output_bytes: int  # OUT: output_norm + output.weight, or token_embd when tied
    embedding: bool  # has <arch>.pooling_type: always parallel 1, no output layer
    causal: bool = True  # <arch>.attention.causal; non-causal encoders keep no KV cache in llama-server
    feed_forward_length: int = 0  # <arch>.feed_forward_length (0 when absent)
    input_bytes: int = 0  # tensors outside the blocks and the output layer (token_embd, ...): host memory
    tied_output: bool = False  # no output.weight: the output layer reuses token_embd


@dataclass(frozen=True)
class Placement:
    """Where a model goes: `size`/`size_vram` as `/api/ps` reports them, and the layers on GPU."""

    size: int
    size_vram: int
    gpu_layers: int
    total_layers: int  # block_count + 1 (the output layer)
    per_gpu: tuple[int, ...]  # bytes allocated on each GPU given

    @property
    def fully_on_gpu(self) -> bool:
        return self.gpu_layers == self.total_layers


def tensor_bytes(ggml_type: str, shape: Sequence[int]) -> int:
    """Bytes of one tensor: elements × type size / block size."""
    try:
        size, block = GGML_TYPES[ggml_type.upper()]
    except KeyError:
        raise ValueError(f"unknown tensor type {ggml_type!r}") from None
    return math.prod(int(n) for n in shape) * size // block


def effective_ctx(arch: Arch, num_ctx: int) -> int:
    """`num_ctx` per sequence as the classic era uses it: capped at the trained context, at least 4."""
    ctx = min(num_ctx, arch.context_length) if arch.context_length > 0 else num_ctx
    return max(4, ctx)


def _kv_layer(arch: Arch, ctx_total: int) -> int:
    return ctx_total * (arch.key_length + arch.value_length) * arch.head_count_kv * KV_BYTES


def kv_bytes(arch: Arch, ctx_total: int) -> int:
    """Σ KV cache over the layers for `ctx_total` = num_ctx × parallel tokens (f16)."""
    return arch.block_count * _kv_layer(arch, ctx_total)


def graph_bytes(arch: Arch, ctx_total: int, batch: int = DEFAULT_BATCH) -> tuple[int, int]:
    """(graph_full, graph_partial) of fs/ggml GraphSize for one GPU; the fallback where no formula exists."""
    b, c = min(ctx_total, batch), ctx_total
    e, h, hkv, v = arch.embedding_length, arch.head_count, arch.head_count_kv, arch.vocab_size
    if arch.architecture == "llama":
        d = e // h
        full = max(4 * b * (1 + 4 * e + c * (1 + h)), 4 * b * (e + v))
        partial = 4 * b * e + max(
            4 * b * (1 + e + max(c, e)) + e * e * 9 // 16 + 4 * c * (b * h + d * hkv),
            4 * b * (e + v) + e * v * 105 // 128,
        )
        return full, partial
    if arch.architecture == "qwen2":
        full = max(4 * b * (e + v), 4 * b * (1 + 2 * e + c + c * h))
        partial = max(4 * b * (e + v) + e * v * 105 // 128, 4 * (b * (1 + 2 * e + c * (1 + h)) + e * (1 + c)))
        return full, partial
    graph = (h // max(hkv, 1)) * kv_bytes(arch, c) // 6
    return graph, graph


def cpu_bytes(arch: Arch, num_ctx: int, parallel: int = 1) -> int:
    """`size` of a CPU-only load in v0.10–v0.12.10: Σ(W_i + KV_i) + OUT."""
    ctx_total = effective_ctx(arch, num_ctx) * (1 if arch.embedding else parallel)
    return sum(arch.layer_bytes) + kv_bytes(arch, ctx_total) + arch.output_bytes


def place(
    arch: Arch,
    num_ctx: int,
    parallel: int = 1,
    gpu_free: Sequence[int] = (),
    num_gpu: int = -1,
    gpu_overhead: int = 0,
) -> Placement:
    """Ollama's classic layer placement (§5.4) over GPUs with `gpu_free` bytes free each.

    No GPU or `num_gpu` 0 gives the CPU-only estimate; `num_gpu` N > 0 puts at most N layers on GPU.
    """
    n_gpu = len(gpu_free)
    parallel = 1 if arch.embedding else max(1, parallel)
    ctx_total = effective_ctx(arch, num_ctx) * parallel
    if n_gpu == 0 or num_gpu == 0:
        return Placement(cpu_bytes(arch, num_ctx, parallel), 0, 0, arch.block_count + 1, (0,) * n_gpu)

    kv = _kv_layer(arch, ctx_total)
    full, partial = graph_bytes(arch, ctx_total)
    if n_gpu > 1:
        full = partial
    graph = max(full, partial)
    buffer_layer = arch.layer_bytes[0] + kv

    alloc = [0] * n_gpu
    split = [0] * n_gpu
    with_space = []
    for g, free in enumerate(gpu_free):
        if free >= gpu_overhead + graph + RESERVE + 2 * buffer_layer:
            with_space.append(g)
            alloc[g] = RESERVE + buffer_layer

    overflow = 0
    placed = 0

    def put(index: int, size: int, drop: bool) -> bool:
        """Deal one layer to the GPUs with space from `index` on, as memory.go does."""
        nonlocal placed
        for j in range(len(with_space), 0, -1):
            g = with_space[index % j]
            if gpu_free[g] > gpu_overhead + alloc[g] + graph + size:
                alloc[g] += size
                split[g] += 1
                placed += 1
                return True
            if drop:
                del with_space[index % j]
        return False

    for i in range(arch.block_count - 1, -1, -1):
        size = arch.layer_bytes[i] + kv
        if (num_gpu >= 0 and placed >= num_gpu) or not put(i, size, drop=True):
            overflow += size
    if (num_gpu < 0 or placed < num_gpu) and with_space:
        put(placed, arch.output_bytes, drop=False)
    total_layers = arch.block_count + 1
    if placed < total_layers:
        overflow += arch.output_bytes
    graph_used = full if placed == total_layers else partial
    for g in range(n_gpu):
        if split[g] > 0:
            alloc[g] += graph_used

    size = sum(alloc) + overflow
    if placed == 0:  # Ollama falls back to CPU but keeps this estimate's total
        return Placement(size, 0, 0, total_layers, (0,) * n_gpu)
    return Placement(size, sum(alloc), placed, total_layers, tuple(alloc))


def full_gpu_bytes(arch: Arch, num_ctx: int, parallel: int = 1) -> int:
    """`size` (= `size_vram`) of a load fully on one GPU with room to spare."""
    return place(arch, num_ctx, parallel, gpu_free=(_HUGE,)).size


def _head_max(value: Any) -> int:
    return max((int(v) for v in value), default=0) if isinstance(value, (list, tuple)) else int(value)


def _head_kv_min(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        return min((int(v) for v in value if int(v) > 0), default=1)
    return int(value) or 1


def _layer_params(a: Arch, ffn: int) -> int | None:
    """Parameters of one standard llama/qwen2 block (tells tied from untied models without tensors)."""
    if a.architecture not in ("llama", "qwen2"):
        return None
    e, h, hkv, dk, dv = a.embedding_length, a.head_count, a.head_count_kv, a.key_length, a.value_length
    params = e * h * dk + e * hkv * (dk + dv) + h * dv * e + 3 * e * ffn + 2 * e
    return params + (h * dk + hkv * (dk + dv) if a.architecture == "qwen2" else 0)


def arch_from_show(show: Mapping, disk_size: int | None = None) -> Arch:
    """The `Arch` of a model from its `/api/show` body.

    Exact with `tensors` (v0.6.1+); otherwise approximated from `disk_size` (the `/api/tags` size).
    Raises ValueError naming what is missing or malformed.
    """
    info = show.get("model_info")
    if not isinstance(info, Mapping):
        raise ValueError("/api/show has no model_info")
    arch = info.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError("missing model_info key general.architecture")

    def key(name: str, default: Any = None, convert: Callable[[Any], int] = int) -> int:
        value = info.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"missing model_info key {arch}.{name}")
        try:
            return convert(value)
        except (TypeError, ValueError):
            raise ValueError(f"model_info key {arch}.{name}: expected a number, got {value!r}") from None

    blocks, e = key("block_count"), key("embedding_length")
    h = key("attention.head_count", convert=_head_max)
    if blocks <= 0 or e <= 0 or h <= 0:
        raise ValueError(f"{arch}: block_count, embedding_length and attention.head_count must be positive")
    tokens = info.get("tokenizer.ggml.tokens")
    a = Arch(
        architecture=arch,
        block_count=blocks,
        embedding_length=e,
        head_count=h,
        head_count_kv=key("attention.head_count_kv", 1, _head_kv_min),
        key_length=key("attention.key_length", e // h),
        value_length=key("attention.value_length", e // h),
        vocab_size=len(tokens) if isinstance(tokens, list) and tokens else key("vocab_size", 0),
        context_length=key("context_length"),
        layer_bytes=(),
        output_bytes=0,
        embedding=f"{arch}.pooling_type" in info,
        causal=info.get(f"{arch}.attention.causal", True) is not False,
        feed_forward_length=key("feed_forward_length", 0, _head_max),
    )
    tensors = show.get("tensors")
    return _from_tensors(a, tensors) if tensors else _from_disk(a, info, disk_size)


def _from_tensors(a: Arch, tensors: Sequence[Mapping]) -> Arch:
    """Exact W_i and OUT from the tensor list, grouped as fs/ggml GroupLayers does."""
    layers = [0] * a.block_count
    groups: dict[str, int] = {}
    vocab = a.vocab_size
    for t in tensors:
        try:
            name, shape = str(t["name"]), list(t["shape"])
            size = tensor_bytes(str(t["type"]), shape)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad tensor entry {t!r}") from exc
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
            if int(parts[1]) < a.block_count:
                layers[int(parts[1])] += size
            continue
        groups[parts[0]] = groups.get(parts[0], 0) + size
        if name == "token_embd.weight" and not vocab and len(shape) == 2:
            vocab = int(shape[1])
    if not vocab:
        raise ValueError("vocabulary size unknown: no tokenizer.ggml.tokens, vocab_size or token_embd")
    out = groups.get("output_norm", 0) + groups.get("output", groups.get("token_embd", 0))
    host = sum(size for group, size in groups.items() if group not in ("output", "output_norm"))
    return replace(
        a,
        vocab_size=vocab,
        layer_bytes=tuple(layers),
        output_bytes=out,
        input_bytes=host,
        tied_output="output" not in groups,
    )


def _from_disk(a: Arch, info: Mapping, disk_size: int | None) -> Arch:
    """Approximate W_i and OUT: the output layer at the file type's quant, the rest spread over the blocks."""
    if not disk_size:
        raise ValueError("/api/show has no tensors and no disk size was given")
    e, vocab = a.embedding_length, a.vocab_size
    if not vocab:
        raise ValueError(f"missing model_info key {a.architecture}.vocab_size (and no tokenizer.ggml.tokens)")
    file_type = info.get("general.file_type")
    if file_type not in FILE_TYPES:
        raise ValueError(f"missing or unknown model_info key general.file_type: {file_type!r}")
    base, out_type = FILE_TYPES[file_type]
    if out_type.endswith("_K") and e % 256:
        out_type = "Q8_0"  # llama.cpp's fallback when a row does not split into 256-element blocks
    params = info.get("general.parameter_count")
    ffn = info.get(f"{a.architecture}.feed_forward_length")
    per_layer = _layer_params(a, ffn) if isinstance(ffn, int) else None
    tied = True  # unknown: the larger (cautious) estimate
    if isinstance(params, int) and per_layer is not None:
        tied = params - a.block_count * per_layer - e < 1.5 * vocab * e
    norm = 0 if a.architecture in ("bert", "nomic-bert") else 4 * e
    out = norm + tensor_bytes(out_type, (e, vocab))
    embd = tensor_bytes(out_type if tied else base, (e, vocab))
    rest = disk_size - out - (0 if tied else embd)
    if rest <= 0:
        raise ValueError(f"disk size {disk_size} is too small for the model's output layer")
    layers = (rest // a.block_count,) * a.block_count
    return replace(a, layer_bytes=layers, output_bytes=out, input_bytes=embd, tied_output=tied)
