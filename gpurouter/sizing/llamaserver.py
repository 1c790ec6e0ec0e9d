"""Memory of a model under Ollama's llama-server era (≥ v0.30): pure functions.

Two different figures (reference/ollama-current.md §2):

- Ollama's own **prediction**, the admission figure: `file bytes + f16 KV of every layer at the context ×
  parallel + a batch surcharge` (§2.1). A model is admitted beside other loaded models when the prediction is
  at most 80 % of the free memory of the GPU(s) it would use; otherwise Ollama evicts a runner first.
- the **footprint** llama-server then allocates on the GPU when every layer is offloaded (§2.4): the repeating
  blocks and the output layer, the KV cache (none for non-causal encoders), and the compute buffer of one
  micro-batch. This is what `/api/ps` reports (measured). llama.cpp's fit leaves `FIT_MARGIN` free on each
  device, so a model lands fully on GPU only when its footprint + the margin is free (§2.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpurouter.sizing.estimate import Arch
from gpurouter.units import GIB, MIB

FIT_MARGIN = 1 * GIB  # LLAMA_ARG_FIT_TARGET: what llama.cpp's fit leaves free on each device
KV_PAD = 256  # llama.cpp rounds the KV cache's context up to a multiple of this
UBATCH = 512  # n_ubatch: the micro-batch the compute buffer is reserved for
F16 = 2
F32 = 4

# (largest context × parallel, batch, surcharge, share of free memory the prediction may take to keep that batch)
_BATCHES = ((4096, 512, 0, 1.0), (32768, 1024, 768 * MIB, 0.75), (None, 2048, 2 * GIB, 0.6))


def clamped(arch: Arch, num_ctx: int) -> int:
    """The context per sequence a model gets: `num_ctx` clamped to its trained context."""
    return max(1, min(num_ctx, arch.context_length) if arch.context_length > 0 else num_ctx)


def context_total(arch: Arch, num_ctx: int, parallel: int = 1) -> int:
    """Tokens of KV cache: the clamped context × parallel sequences (embedding models run one sequence)."""
    return clamped(arch, num_ctx) * (1 if arch.embedding else max(1, parallel))


@dataclass(frozen=True)
class Admission:
    """Ollama's prediction for one model at one context: what its 80 % admission test compares."""

    base: int  # file bytes + f16 KV (Ollama always assumes f16 here)
    ctx_total: int  # context per sequence (clamped) × parallel
    completion: bool  # completion models pay the batch surcharge; embedders do not

    def batch(self, available: int | None = None) -> tuple[int, int]:
        """(batch, surcharge) Ollama picks: larger batches for longer contexts, each kept only while the
        prediction stays under its share of `available` and the surcharge under 80 % of it less the prediction
        (sched.go automaticGenerationBatch; None: no GPU memory to compare, the context alone decides)."""
        if not self.completion:
            return 512, 0
        start = next(i for i, (limit, *_) in enumerate(_BATCHES) if limit is None or self.ctx_total <= limit)
        for _, batch, surcharge, share in reversed(_BATCHES[: start + 1]):
            if surcharge == 0 or not available:
                return batch, surcharge
            threshold = available * 80 // 100
            if self.base <= share * available and self.base <= threshold and surcharge <= threshold - self.base:
                return batch, surcharge
        raise AssertionError("the smallest batch has no surcharge")

    def predicted(self, available: int | None = None) -> int:
        """The bytes Ollama predicts for the model, surcharge included."""
        return self.base + self.batch(available)[1]

    def admits(self, free: int) -> bool:
        """True when Ollama starts the model beside others without evicting: predicted ≤ 80 % of `free`."""
        return self.predicted(free) <= free * 80 // 100

    def fits_single(self, free: int) -> bool:
        """Ollama's test for putting the model on one GPU with `free` bytes: the prediction without the batch
        surcharge ≤ 80 % of it."""
        return self.base <= free * 80 // 100


def admission(arch: Arch, file_bytes: int, num_ctx: int, parallel: int = 1) -> Admission:
    """Ollama's prediction inputs: `file_bytes` is the model blob (the `/api/tags` size is a few KB more)."""
    head_dim = arch.embedding_length // arch.head_count
    ctx_total = context_total(arch, num_ctx, parallel)
    kv = 2 * arch.block_count * max(1, arch.head_count_kv) * head_dim * ctx_total * F16
    return Admission(base=file_bytes + kv, ctx_total=ctx_total, completion=not arch.embedding)


def padded(ctx_total: int) -> int:
    return -(-ctx_total // KV_PAD) * KV_PAD


def kv_layer_bytes(arch: Arch, ctx_total: int) -> int:
    """One layer's f16 K and V cache in llama-server; none for non-causal encoders (bert, nomic-bert)."""
    if not arch.causal:
        return 0
    return padded(ctx_total) * (arch.key_length + arch.value_length) * arch.head_count_kv * F16


def compute_bytes(arch: Arch, ctx_total: int) -> int:
    """The GPU compute buffer of one micro-batch with flash attention: activations of the widest layer, the
    attention mask over the context, and the logits of one output (llama.cpp PR #23861)."""
    ubatch = min(UBATCH, padded(ctx_total))
    ffn = arch.feed_forward_length or 4 * arch.embedding_length
    activations = F32 * ubatch * (6 * arch.embedding_length + 2 * ffn)
    return activations + F16 * ubatch * padded(ctx_total) + F32 * arch.vocab_size


def gpu_weights(arch: Arch) -> int:
    """Weights llama-server puts on the GPU with every layer offloaded: the blocks and the output layer
    (a GPU copy of token_embd when the output is tied to it); token_embd itself stays in host memory, and
    embedding models have no output layer."""
    return sum(arch.layer_bytes) + (0 if arch.embedding else arch.output_bytes)


def footprint(arch: Arch, num_ctx: int, parallel: int = 1) -> int:
    """GPU bytes of the model fully offloaded (what `/api/ps` then reports as size and size_vram): the model
    buffer (weights and KV cache) and the compute buffer, each rounded up to the 0.01 MiB llama-server logs."""
    ctx_total = context_total(arch, num_ctx, parallel)
    kv = arch.block_count * kv_layer_bytes(arch, ctx_total)
    return _logged_up(gpu_weights(arch) + kv) + _logged_up(compute_bytes(arch, ctx_total))


def _logged_up(num_bytes: int) -> int:
    """Bytes rounded up to the 0.01 MiB grid of llama-server's `%.2f MiB`: never below what its log says."""
    return math.ceil(math.ceil(num_bytes * 100 / MIB) * MIB / 100)
