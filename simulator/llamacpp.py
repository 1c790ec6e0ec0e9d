"""What llama-server allocates for a model, device by device, and how its fit chooses the layers on GPU.

The simulator's stand-in for a real llama-server process in the llama-server era (reference
ollama-current.md §2.3–§2.4). llama.cpp offloads the output layer first, then the blocks from the last one
down; every offloaded block brings its KV cache along; any device holding layers gets a compute buffer.
`token_embd` always stays in host memory. Buffers are reported as llama-server logs them (`%.2f MiB`),
and Ollama's `/api/ps` sums those figures: that is the simulator's "measured" size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpurouter.sizing.estimate import Arch
from gpurouter.sizing.llamaserver import FIT_MARGIN, compute_bytes, context_total, kv_layer_bytes
from gpurouter.units import MIB


def logged(num_bytes: int) -> int:
    """A buffer as Ollama reads it back from llama-server's `%.2f MiB` log line."""
    return int(round(num_bytes / MIB, 2) * MIB)


@dataclass(frozen=True)
class Buffers:
    """A model's buffers: bytes on each device, and in host memory; `layers` offloaded of `total_layers`."""

    devices: tuple[int, ...]
    host: int
    layers: int
    total_layers: int  # block_count + 1 (the output layer)

    @property
    def size_vram(self) -> int:
        return sum(self.devices)

    @property
    def full(self) -> bool:
        return self.layers == self.total_layers

    @property
    def size(self) -> int:
        """`/api/ps` size: with every layer on GPU it equals size_vram (token_embd is then not shown)."""
        return self.size_vram if self.full else self.size_vram + self.host


def _split(layers: int, weights: Sequence[int]) -> list[int]:
    """Offloaded layers per device, in proportion to `weights` (llama.cpp's default tensor split)."""
    total = sum(weights) or 1
    counts = [layers * w // total for w in weights]
    for i in sorted(range(len(weights)), key=lambda i: -weights[i])[: layers - sum(counts)]:
        counts[i] += 1
    return counts


def buffers(arch: Arch, num_ctx: int, parallel: int, split: Sequence[int]) -> Buffers:
    """Buffers with `split[d]` layers offloaded to device d (the output layer counts as one layer, on the
    device that holds the highest blocks)."""
    blocks = arch.block_count
    offloaded = min(sum(split), blocks + 1)
    ctx_total = context_total(arch, num_ctx, parallel)
    kv = kv_layer_bytes(arch, ctx_total)
    compute = compute_bytes(arch, ctx_total)
    output = 0 if arch.embedding else arch.output_bytes
    devices: list[int] = []
    first = blocks + 1 - offloaded  # the lowest layer on GPU; layer `blocks` is the output layer
    for count in split:
        if count == 0:
            devices.append(0)
            continue
        layer_ids = range(first, first + count)
        first += count
        weights = sum(arch.layer_bytes[i] + kv for i in layer_ids if 0 <= i < blocks)
        weights += output if blocks in layer_ids else 0
        devices.append(sum(logged(part) for part in (weights, compute)))
    on_cpu = range(min(blocks, blocks + 1 - offloaded))
    host_output = 0 if offloaded > 0 or arch.embedding or arch.tied_output else arch.output_bytes
    host_weights = arch.input_bytes + sum(arch.layer_bytes[i] for i in on_cpu) + host_output
    host = logged(host_weights) + logged(kv * len(on_cpu)) + (logged(compute) if offloaded <= blocks else 0)
    return Buffers(tuple(devices), host, offloaded, blocks + 1)


def fit(arch: Arch, num_ctx: int, parallel: int, free: Sequence[int], margin: int = FIT_MARGIN) -> Buffers:
    """llama.cpp's `--fit`: the most layers whose buffers leave `margin` free on every device."""
    room = [max(0, f - margin) for f in free]
    for layers in range(arch.block_count + 1, 0, -1):
        candidate = buffers(arch, num_ctx, parallel, _split(layers, room))
        if all(used <= r for used, r in zip(candidate.devices, room, strict=True)):
            return candidate
    return buffers(arch, num_ctx, parallel, [0] * len(free))


def exactly(arch: Arch, num_ctx: int, parallel: int, layers: int, free: Sequence[int]) -> Buffers:
    """`layers` layers on GPU as `-ngl` asks, split by free memory, with no margin (fit is off): a device whose
    buffers exceed its free memory fails at start-up."""
    return buffers(arch, num_ctx, parallel, _split(min(layers, arch.block_count + 1), free))
