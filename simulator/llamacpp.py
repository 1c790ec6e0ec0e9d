"""What llama-server allocates for a model, device by device, and how its fit chooses the layers on GPU: the
simulator's stand-in for a real llama-server process in the llama-server era (reference ollama-current.md
§2.3–§2.4), calibrated on the public logs it cites.

llama.cpp offloads the output layer first, then the blocks from the last one down; every offloaded block brings
its KV cache along; any device holding layers gets a compute buffer. `token_embd` always stays in host memory.
Each buffer is logged as llama-server logs it (`<device> model|KV|compute buffer size = %.2f MiB`), and
Ollama's `/api/ps` sums those figures: that is the simulator's "measured" size.

Calibration (llama3.1:8b Q4_K_M, fully on one GPU): model buffer 4403.49 MiB (the blocks, output.weight and
output_norm), CPU_Mapped 281.81 MiB (its Q4_K token_embd), KV 512.00 MiB at 4096 tokens, `ollama ps` 5.3 GB at
4096, and a compute buffer of about 140 MiB at 32768 tokens with flash attention and one output's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpurouter.units import GIB, MIB
from simulator.catalog import Arch

FIT_TARGET = 1 * GIB  # LLAMA_ARG_FIT_TARGET: what --fit leaves free on each device
KV_PADDING = 256  # the KV cache's context is rounded up to a multiple of this
UBATCH = 512  # n_ubatch: the compute graph is reserved for one micro-batch
F16 = 2
F32 = 4


def logged(num_bytes: int) -> int:
    """A buffer as Ollama reads it back from llama-server's `%.2f MiB` log line."""
    return round(num_bytes * 100 / MIB) * MIB // 100


def kv_context(num_ctx: int, arch: Arch, parallel: int) -> int:
    """`-c`: Ollama's num_ctx (capped at the trained context) × parallel sequences (embedders run one),
    padded to llama.cpp's KV granularity."""
    per_sequence = max(1, min(num_ctx, arch.context_length))
    cells = per_sequence * (1 if arch.embedding else max(1, parallel))
    return -(-cells // KV_PADDING) * KV_PADDING


def kv_layer(arch: Arch, cells: int) -> int:
    """One block's K and V (f16); encoders that attend both ways (bert, nomic-bert) keep no cache."""
    return cells * arch.head_count_kv * arch.head_dim * 2 * F16 if arch.causal else 0


def compute_buffer(arch: Arch, cells: int) -> int:
    """The compute graph of one micro-batch with flash attention: at the feed-forward peak three tensors of
    the FFN's width (gate, up and their product; two without a gate) and three of the embedding's width
    (residual, normed input, attention output) per token, the f16 attention mask over the context, and the
    logits of one output (llama.cpp PR #23861) — the pooled embedding for an embedder."""
    tokens = min(UBATCH, cells)
    gated = arch.architecture != "bert"  # bert's feed-forward has no gate
    widths = (3 if gated else 2) * arch.feed_forward_length + 3 * arch.embedding_length
    outputs = arch.embedding_length if arch.embedding else arch.vocab_size
    return F32 * tokens * widths + F16 * tokens * cells + F32 * outputs


@dataclass(frozen=True)
class Buffers:
    """A model's buffers as llama-server logs them: bytes on each device and in host memory, `layers` offloaded
    of `total_layers`."""

    devices: tuple[int, ...]
    host: int
    layers: int
    total_layers: int  # block_count + 1 (the output layer)

    @property
    def size_vram(self) -> int:
        return sum(self.devices)

    @property
    def size(self) -> int:
        """`/api/ps` size: with every layer on GPU it is size_vram (token_embd, in host memory, is then not
        shown); otherwise every buffer."""
        return self.size_vram if self.layers == self.total_layers else self.size_vram + self.host


def split_layers(layers: int, weights: Sequence[int]) -> list[int]:
    """Offloaded layers per device, in proportion to `weights` (llama.cpp's default tensor split), the
    remainder to the largest."""
    total = sum(weights) or 1
    counts = [layers * w // total for w in weights]
    for d in sorted(range(len(weights)), key=lambda d: -weights[d])[: layers - sum(counts)]:
        counts[d] += 1
    return counts


def buffers(arch: Arch, num_ctx: int, parallel: int, split: Sequence[int]) -> Buffers:
    """The buffers with `split[d]` layers on device d: the highest layers go to the GPUs (layer block_count is
    the output layer, on the device that holds the highest blocks); the rest stays in host memory."""
    blocks = arch.block_count
    cells = kv_context(num_ctx, arch, parallel)
    kv = kv_layer(arch, cells)
    compute = compute_buffer(arch, cells)
    output = 0 if arch.embedding else arch.output_bytes
    offloaded = min(sum(split), blocks + 1)
    lowest = blocks + 1 - offloaded
    devices = []
    for count in split:
        ids = range(lowest, lowest + count)
        lowest += count
        on_device = [i for i in ids if i < blocks]
        weights = sum(arch.block_bytes[i] for i in on_device) + (output if blocks in ids else 0)
        devices.append(logged(weights) + logged(kv * len(on_device)) + logged(compute) if count else 0)
    on_host = range(min(blocks, blocks + 1 - offloaded))
    host_output = arch.output_bytes if offloaded == 0 and not arch.embedding and not arch.tied else 0
    host_weights = arch.token_embd_bytes + arch.other_bytes + sum(arch.block_bytes[i] for i in on_host) + host_output
    host = logged(host_weights) + logged(kv * len(on_host)) + (logged(compute) if offloaded <= blocks else 0)
    return Buffers(tuple(devices), host, offloaded, blocks + 1)


def fit(arch: Arch, num_ctx: int, parallel: int, free: Sequence[int], target: int = FIT_TARGET) -> Buffers:
    """llama.cpp's `--fit`: the most layers whose buffers leave `target` free on every device."""
    room = [max(0, f - target) for f in free]
    for layers in range(arch.block_count + 1, 0, -1):
        candidate = buffers(arch, num_ctx, parallel, split_layers(layers, room))
        if all(used <= r for used, r in zip(candidate.devices, room, strict=True)):
            return candidate
    return buffers(arch, num_ctx, parallel, [0] * len(free))


def exactly(arch: Arch, num_ctx: int, parallel: int, layers: int, free: Sequence[int]) -> Buffers:
    """`-ngl layers` as Ollama passes it when the request sets num_gpu: split by free memory, no fit margin
    (a device whose buffers exceed its free memory fails at start-up)."""
    return buffers(arch, num_ctx, parallel, split_layers(min(layers, arch.block_count + 1), free))
