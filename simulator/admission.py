"""Ollama's prediction in the llama-server era (reference ollama-current.md §2.1–§2.2): the figure its
scheduler compares with 80 % of free memory before it starts a runner beside others, and picks a GPU by.

    predicted = GGUF file bytes + f16 K and V of every block at min(num_ctx, trained) × parallel tokens
                (the smallest head_count_kv, head_dim = embedding / heads) + the batch surcharge

The surcharge belongs to the batch Ollama picks for a completion model: 512 up to 4096 tokens (none), 1024 up to
32768 (768 MiB), 2048 beyond (2 GiB); a larger batch is kept only while the prediction without it is at most
75 % (1024) or 60 % (2048) of the memory available and the whole prediction at most 80 %. Embedders pay none.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpurouter.units import GIB, MIB
from simulator.catalog import Arch

SHARE = 0.8  # of free memory a prediction may take
# (context × parallel above which this batch applies, batch, surcharge, share of available memory to keep it)
LARGER_BATCHES = ((32768, 2048, 2 * GIB, 0.60), (4096, 1024, 768 * MIB, 0.75))
SMALL_BATCH = 512


@dataclass(frozen=True)
class Prediction:
    """One model at one context and parallelism, before the batch is chosen."""

    file_bytes: int
    kv_bytes: int
    tokens: int  # context per sequence (capped) × parallel
    completion: bool

    @property
    def base(self) -> int:
        return self.file_bytes + self.kv_bytes

    def surcharge(self, available: int | None = None) -> int:
        """The batch surcharge Ollama adds, given the memory `available` (None: not compared)."""
        if not self.completion:
            return 0
        for above, _, extra, keep in LARGER_BATCHES:
            if self.tokens <= above:
                continue
            if available is None or (self.base <= keep * available and self.base + extra <= SHARE * available):
                return extra
        return 0

    def total(self, available: int | None = None) -> int:
        """The predicted bytes, surcharge included."""
        return self.base + self.surcharge(available)

    def fits(self, free: int) -> bool:
        """Ollama's test: the prediction at most 80 % of `free`."""
        return self.total(free) <= SHARE * free


def predict(arch: Arch, file_bytes: int, num_ctx: int, parallel: int) -> Prediction:
    """Ollama's prediction for a model whose GGUF blob holds `file_bytes`."""
    tokens = max(1, min(num_ctx, arch.context_length)) * (1 if arch.embedding else max(1, parallel))
    kv = 2 * arch.block_count * arch.head_count_kv * arch.head_dim * tokens * 2
    return Prediction(file_bytes, kv, tokens, completion=not arch.embedding)
