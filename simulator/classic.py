"""Ollama's own memory estimate before llama-server (`llm/memory.go` + `fs/ggml` GraphSize, reference
ollama-api.md §5), as the simulated classic (≤ v0.12.10) and layout (v0.12.11 – v0.24) nodes compute it.

Layers are walked from the last block to the first, dealt over the GPUs that still have room; a GPU is used
only when it holds the 457 MiB reserve, two copies of block 0 and the larger compute graph. `size` is the GPU
allocations plus what overflows to CPU; `size_vram` the GPU allocations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpurouter.units import MIB
from simulator.catalog import Arch, effective_ctx

RESERVE = 457 * MIB  # MinimumMemory() of a CUDA or ROCm device
BATCH = 512  # num_batch's default
F16 = 2


@dataclass(frozen=True)
class Estimate:
    """Where Ollama's estimate puts a model: bytes per GPU given, layers offloaded, and the CPU overflow."""

    per_gpu: tuple[int, ...]
    overflow: int
    layers: int
    total_layers: int  # block_count + 1: the output layer counts
    held: int = 0  # what every GPU in use starts with: the reserve and a one-layer buffer (W_0 + KV_0)

    @property
    def size_vram(self) -> int:
        return sum(self.per_gpu)

    @property
    def size(self) -> int:
        return self.size_vram + self.overflow


def context_total(arch: Arch, num_ctx: int, parallel: int) -> int:
    """num_ctx × parallel, the context capped per sequence; embedders run one sequence."""
    return effective_ctx(arch, num_ctx) * (1 if arch.embedding else max(1, parallel))


def kv_per_layer(arch: Arch, ctx_total: int) -> int:
    """K and V of one layer in f16 (the classic era has no quantised cache without flash attention)."""
    return ctx_total * 2 * arch.head_dim * arch.head_count_kv * F16


def graphs(arch: Arch, ctx_total: int, gpus: int = 1) -> tuple[int, int]:
    """(graph with every layer on GPU, graph of a partial offload): GraphSize's formulas for llama and qwen2;
    for the others (bert, nomic-bert) H / Hkv × ΣKV / 6 both. With several GPUs the full graph is the partial."""
    b, c = min(ctx_total, BATCH), ctx_total
    e, h, hkv, v, d = arch.embedding_length, arch.head_count, arch.head_count_kv, arch.vocab_size, arch.head_dim
    logits = 4 * b * (e + v)
    if arch.architecture == "llama":
        full = max(4 * b * (1 + 4 * e + c * (1 + h)), logits)
        attention = 4 * b * (1 + e + max(c, e)) + e * e * 9 // 16 + 4 * c * (b * h + d * hkv)
        partial = 4 * b * e + max(attention, logits + e * v * 105 // 128)
    elif arch.architecture == "qwen2":
        full = max(logits, 4 * b * (1 + 2 * e + c + c * h))
        partial = max(logits + e * v * 105 // 128, 4 * (b * (1 + 2 * e + c * (1 + h)) + e * (1 + c)))
    else:
        full = partial = h // hkv * kv_per_layer(arch, c) * arch.block_count // 6
    return (partial if gpus > 1 else full), partial


def estimate(
    arch: Arch, num_ctx: int, parallel: int, free: Sequence[int], num_gpu: int = -1, overhead: int = 0
) -> Estimate:
    """The estimate over GPUs with `free` bytes each; no GPU or `num_gpu` 0: the CPU-only estimate
    (v0.10+: Σ(W + KV) + OUT); `num_gpu` N > 0: at most N layers offloaded."""
    ctx = context_total(arch, num_ctx, parallel)
    kv = kv_per_layer(arch, ctx)
    blocks = arch.block_count
    total_layers = blocks + 1
    everything = sum(arch.block_bytes) + blocks * kv + arch.output_bytes
    if not free or num_gpu == 0:
        return Estimate((0,) * len(free), everything, 0, total_layers)
    full, partial = graphs(arch, ctx, len(free))
    graph = max(full, partial)
    first = arch.block_bytes[0] + kv
    alloc = [RESERVE + first if f >= overhead + graph + RESERVE + 2 * first else 0 for f in free]
    open_gpus = [g for g, a in enumerate(alloc) if a]
    counts = [0] * len(free)
    limit = total_layers if num_gpu < 0 else num_gpu

    def offload(turn: int, size: int, close: bool) -> bool:
        """memory.go's loop: try the open GPUs from `turn` mod their count; a block closes a GPU it misses."""
        for j in range(len(open_gpus), 0, -1):
            g = open_gpus[turn % j]
            if free[g] > overhead + alloc[g] + graph + size:
                alloc[g] += size
                counts[g] += 1
                return True
            if close:
                del open_gpus[turn % j]
        return False

    overflow = 0
    for i in reversed(range(blocks)):
        size = arch.block_bytes[i] + kv
        if sum(counts) >= limit or not offload(i, size, close=True):
            overflow += size
    placed = sum(counts)
    if placed >= limit or not offload(placed, arch.output_bytes, close=False):
        overflow += arch.output_bytes
    placed = sum(counts)
    if placed == 0:  # nothing fits: Ollama runs on CPU but keeps this estimate's total
        return Estimate((0,) * len(free), sum(alloc) + overflow, 0, total_layers)
    graph_used = full if placed == total_layers else partial
    per_gpu = tuple(a + graph_used if n else a for a, n in zip(alloc, counts, strict=True))
    return Estimate(per_gpu, overflow, placed, total_layers, RESERVE + first)
