"""Where a simulated node puts a model, by the era of the Ollama version it reports (simulator.eras).

- classic (≤ v0.12.10): Ollama's estimate walks the layers (`simulator.classic`); a model must fit
  beside the loaded ones, only the first may spill to CPU;
- layout (v0.12.11 – v0.24): the same walk, but the per-GPU reserve and one-layer buffer are held back from
  free memory instead of being counted in the model's size;
- llama_server (≥ v0.30, reference ollama-current.md §2): admission by Ollama's prediction against 80 % of
  free memory (`simulator.admission`; only when another model is loaded), one GPU when it fits there
  (`main_gpu` pins), then llama.cpp's fit, or exactly the layers `num_gpu` forces — an out-of-memory failure
  when they do not fit (`simulator.llamacpp`).

A placer answers a `Choice`, None (evict a runner and ask again) or raises `OutOfMemory`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from simulator import eras, llamacpp, showinfo
from simulator.admission import Prediction, predict
from simulator.catalog import Arch, ModelSpec
from simulator.classic import Estimate, estimate
from simulator.options import RunnerOptions


class OutOfMemory(Exception):
    """llama-server could not allocate its buffers at start-up; `needed` is the largest device's request."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"cannot allocate {needed} bytes")
        self.needed = needed


@dataclass(frozen=True)
class Choice:
    """A placement: `/api/ps` size and size_vram, bytes per GPU index, parallel sequences."""

    size: int
    size_vram: int
    per_gpu: dict[int, int] = field(hash=False)
    parallel: int
    layers: int  # layers on GPU of total_layers (the output layer included)
    total_layers: int


class Placer(Protocol):
    era: str

    def place(
        self, spec: ModelSpec, options: RunnerOptions, free: Sequence[int], parallel: int, others: int
    ) -> Choice | None: ...


def file_bytes(spec: ModelSpec) -> int:
    """The GGUF blob: the `/api/tags` size less the manifest's other layers (template, license, parameters,
    config)."""
    extra = len(showinfo.template(spec)) + len(showinfo.license_text(spec)) + len(showinfo.parameters(spec)) + 485
    return spec.tags_size - extra


def _parallel(arch: Arch, parallel: int) -> int:
    return 1 if arch.embedding else max(1, parallel)


class ClassicPlacer:
    """One GPU that fits the model (most free first), else all of them; the first model may spill to CPU."""

    era = eras.CLASSIC
    reserve_in_size = True

    def __init__(self, overhead: int = 0) -> None:
        self.overhead = overhead

    def place(
        self, spec: ModelSpec, options: RunnerOptions, free: Sequence[int], parallel: int, others: int
    ) -> Choice | None:
        arch, ctx = spec.arch, options.num_ctx
        parallel = _parallel(arch, parallel)
        if not free or options.num_gpu == 0:
            e = estimate(arch, ctx, parallel, ())
            return Choice(e.size, 0, {}, parallel, 0, e.total_layers)
        order = tuple(sorted(range(len(free)), key=lambda g: -free[g]))
        for gpus in [(g,) for g in order] + ([order] if len(order) > 1 else []):
            e = estimate(arch, ctx, parallel, [free[g] for g in gpus], options.num_gpu, self.overhead)
            wanted = e.total_layers if options.num_gpu < 0 else min(options.num_gpu, e.total_layers)
            if e.layers >= wanted:
                return self._choice(e, gpus, parallel)
        if others == 0:
            e = estimate(arch, ctx, 1, [free[g] for g in order], options.num_gpu, self.overhead)
            return self._choice(e, order, 1)
        return None

    def _choice(self, e: Estimate, gpus: Sequence[int], parallel: int) -> Choice:
        held = 0 if self.reserve_in_size else e.held
        per_gpu = {g: used - held for g, used in zip(gpus, e.per_gpu, strict=True) if used}
        hidden = held * len(per_gpu)
        return Choice(e.size - hidden, e.size_vram - hidden, per_gpu, parallel, e.layers, e.total_layers)


class LayoutPlacer(ClassicPlacer):
    """v0.12.11 – v0.24: the reserve and the one-layer buffer are subtracted from free memory, not shown in the
    size (reference ollama-api.md §5.6: llama3.1:8b at 4096 tokens ≈ 5,464,647,680 bytes)."""

    era = eras.LAYOUT
    reserve_in_size = False


class LlamaServerPlacer:
    """v0.30+: Ollama admits by its prediction, llama-server fits the layers."""

    era = eras.LLAMA_SERVER

    def place(
        self, spec: ModelSpec, options: RunnerOptions, free: Sequence[int], parallel: int, others: int
    ) -> Choice | None:
        arch, ctx = spec.arch, options.num_ctx
        parallel = _parallel(arch, parallel)
        total_layers = arch.block_count + 1
        if not free or options.num_gpu == 0:
            b = llamacpp.buffers(arch, ctx, parallel, [0] * len(free))
            return Choice(b.size, 0, {}, parallel, 0, total_layers)
        predicted = predict(arch, file_bytes(spec), ctx, parallel)
        group = self._gpus(options, free, predicted)
        group_free = [free[g] for g in group]
        exact = 0 < options.num_gpu < total_layers  # an exact layer count skips the admission test
        if others and not exact and not predicted.fits(sum(group_free)):
            return None
        if options.num_gpu < 0:
            b = llamacpp.fit(arch, ctx, parallel, group_free)
        else:
            b = llamacpp.exactly(arch, ctx, parallel, options.num_gpu, group_free)
            short = [used for used, f in zip(b.devices, group_free, strict=True) if used > f]
            if short:
                raise OutOfMemory(max(short))
        per_gpu = {g: used for g, used in zip(group, b.devices, strict=True) if used}
        return Choice(b.size, b.size_vram, per_gpu, parallel, b.layers, total_layers)

    @staticmethod
    def _gpus(options: RunnerOptions, free: Sequence[int], predicted: Prediction) -> tuple[int, ...]:
        """`main_gpu` when given (pinned, no fit test); else the GPU with the most free memory where the
        prediction takes at most 80 % of it; else every GPU."""
        if options.main_gpu is not None and 0 <= options.main_gpu < len(free):
            return (options.main_gpu,)
        order = tuple(sorted(range(len(free)), key=lambda g: -free[g]))
        single = next((g for g in order if predicted.fits(free[g])), None)
        return (single,) if single is not None else order


def placer_for(version: str, overhead: int = 0) -> Placer:
    """The placer of the era `version` belongs to."""
    era = eras.era_of(version)
    if era == eras.LLAMA_SERVER:
        return LlamaServerPlacer()
    return LayoutPlacer(overhead) if era == eras.LAYOUT else ClassicPlacer(overhead)
