"""One GPU, shared: runners generating at once on the same GPU share its throughput. Each runner asks for its
own token rate; when the rates of the runners generating on a GPU add up to more than the GPU's, each gets
its share (its rate × GPU rate ÷ their sum). A runner's parallel sequences are batched: one runner counts
once however many of its slots generate."""

from __future__ import annotations

import threading
from collections.abc import Iterable


def shared_rate(own: float, rates: Iterable[float], capacity: float) -> float:
    """`own` tokens/s scaled down so that the rates generating on the GPU sum to at most `capacity` (0 = no
    bound); `rates` includes `own`."""
    total = sum(rates)
    if capacity <= 0 or total <= capacity:
        return own
    return own * capacity / total


class GpuShare:
    """The runners generating on each GPU of a node, and the rate each gets; thread-safe."""

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity  # tokens per second one GPU generates in all; 0 = unbounded
        self._lock = threading.Lock()
        self._active: dict[int, dict[int, tuple[float, int]]] = {}  # GPU → runner id → (rate, sequences)

    def begin(self, runner: int, gpus: Iterable[int], rate: float) -> None:
        """A sequence of `runner` starts generating on `gpus` at up to `rate` tokens/s."""
        with self._lock:
            for g in gpus:
                old = self._active.setdefault(g, {}).get(runner, (rate, 0))
                self._active[g][runner] = (rate, old[1] + 1)

    def end(self, runner: int, gpus: Iterable[int]) -> None:
        with self._lock:
            for g in gpus:
                on_gpu = self._active.get(g, {})
                rate, count = on_gpu.get(runner, (0.0, 1))
                if count <= 1:
                    on_gpu.pop(runner, None)
                else:
                    on_gpu[runner] = (rate, count - 1)

    def rate(self, runner: int, gpus: Iterable[int], own: float) -> float:
        """The rate `runner` generates at now: its own, bounded by its tightest GPU's share."""
        with self._lock:
            rates = [[r for r, _ in self._active.get(g, {}).values()] for g in gpus]
        return min((shared_rate(own, on_gpu, self.capacity) for on_gpu in rates), default=own)

    def generating(self) -> dict[int, int]:
        """How many runners generate on each GPU now."""
        with self._lock:
            return {g: len(on_gpu) for g, on_gpu in self._active.items() if on_gpu}
