"""What a GPU node can take, by the rules of the Ollama it runs: one implementation for the exporter's fit
gauges and the optimizer's decisions.

Two limits apply on every node: the operator's, when set (`vram_safety_margin`: a model may use at most
`usable` = total × margin, less what is loaded; unset, `usable` is the total: the default verdict is the node's
Ollama's own) and Ollama's own (reference/ollama-current.md §4):

- classic: Ollama's estimate must fit the GPU's free memory (the estimate already holds the reserve);
- layout: the estimate plus the 457 MiB reserve per GPU it uses;
- llama-server: the footprint plus llama.cpp's fit margin (1 GiB per device it uses) must be free, or the
  model lands partly on CPU; and when another model stays loaded, Ollama's prediction must be at most 80 %
  of the free memory, or Ollama evicts a model before starting this one.

A node with several GPUs takes a model on its largest GPU, or split over all of them at the cost of the
era's per-GPU extra (the reserve, or the fit margin) on every other GPU. Free memory is counted per node.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpurouter.cluster.state import ModelNeed, NodeState
from gpurouter.sizing import eras
from gpurouter.sizing.estimate import RESERVE
from gpurouter.sizing.llamaserver import FIT_MARGIN


def per_gpu_extra(era: str) -> int:
    """Memory the era keeps free (or reserved) on every GPU a model uses, beyond the model's own figure."""
    return {eras.LLAMA_SERVER: FIT_MARGIN, eras.LAYOUT: RESERVE}.get(era, 0)


@dataclass(frozen=True)
class Room:
    """A node of known GPU capacity, as one poll saw it."""

    era: str
    total: int  # Σ GPU memory
    usable: int  # total × vram_safety_margin
    used: int  # VRAM in use (Σ size_vram, or the GPUs' own figure when larger)
    largest: int  # memory of the largest GPU
    gpus: int
    margin: float  # vram_safety_margin

    @classmethod
    def of(cls, node: NodeState) -> Room | None:
        """The node's room, or None when its capacity is unknown."""
        if not node.capacity.known:
            return None
        return cls(
            era=node.era,
            total=node.vram_total or 0,
            usable=node.vram_usable or 0,
            used=node.vram_used,
            largest=max((g.total for g in node.capacity.gpus), default=0),
            gpus=len(node.capacity.gpus),
            margin=node.margin,
        )

    @property
    def has_gpu(self) -> bool:
        return self.gpus > 0 and self.total > 0

    def split(self, need: int) -> bool:
        """True when the model does not fit the largest GPU alone and must be spread over every GPU."""
        return self.gpus > 1 and need + per_gpu_extra(self.era) > self.largest * self.margin

    def takes(self, need: int) -> int:
        """Bytes of the node's memory the model occupies (classic: one reserve more per extra GPU when split)."""
        if self.era == eras.CLASSIC and self.split(need):
            return need + RESERVE * (self.gpus - 1)
        return need

    def headroom(self, need: int) -> int:
        """Memory that must stay free beside the model on the GPUs it uses (the fit margin, the reserve)."""
        return per_gpu_extra(self.era) * (self.gpus if self.split(need) else 1)

    def fits(self, need: ModelNeed) -> bool:
        """The model fits this node's GPU memory when nothing else is loaded."""
        size = self.takes(need.bytes)
        return self.has_gpu and size <= self.usable and size + self.headroom(need.bytes) <= self.total

    def fits_free(self, need: ModelNeed, *, freed: int = 0, others: bool = False) -> bool:
        """The model fits what is free now, once `freed` bytes are unloaded (its own copy reloaded in place,
        idle models evicted); `others`: some other model stays loaded (Ollama's admission test then runs)."""
        return self.short_of(need, freed=freed, others=others) is None

    def short_of(self, need: ModelNeed, *, freed: int = 0, others: bool = False) -> str | None:
        """The first rule the model breaks on what is free now: `usable` (the operator's margin), `memory`
        (the GPU's own free memory, with the era's headroom), `admission` (Ollama would evict a model first);
        None when it fits."""
        if not self.has_gpu:
            return "memory"
        size = self.takes(need.bytes)
        used = max(0, self.used - freed)
        if size > self.usable - used:
            return "usable"
        free = self.total - used
        if size + self.headroom(need.bytes) > free:
            return "memory"
        if others and self.era == eras.LLAMA_SERVER and need.admission and not need.admission.admits(free):
            return "admission"
        return None

    def real_free(self, freed: int = 0) -> int:
        """The GPU memory free by Ollama's count (total − used), once `freed` bytes are unloaded."""
        return self.total - max(0, self.used - freed)
