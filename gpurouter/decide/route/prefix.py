"""Which prompt prefixes each runner has cached, from what the proxy sent where (model-scoped, bounded).

A runner with N slots (`num_parallel`) keeps one cached sequence per slot: Ollama gives a request the slot
holding its longest common prefix, else the least recently used one. The index does the same per (node,
model): at most N block chains, the matching chain replaced by the new prompt, else the oldest; so it forgets
what the node itself must have dropped. At most `limit` (node, model) pairs are kept, least recently used
first out.
"""

from __future__ import annotations

from collections import OrderedDict


def common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading blocks two chains share (chained hashes: the last equal one tells)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search: equal at i means equal at every j < i
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PromptIndex:
    """Per (node, model), the block chains of the last prompts sent there, one per slot."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._slots: OrderedDict[tuple[str, str], list[tuple[int, ...]]] = OrderedDict()

    def cached(self, node: str, model: str, blocks: tuple[int, ...]) -> int:
        """The blocks of `blocks` the runner of `model` on `node` should have cached."""
        chains = self._slots.get((node, model))
        if not chains or not blocks:
            return 0
        return max(common(c, blocks) for c in chains)

    def sent(self, node: str, model: str, blocks: tuple[int, ...], slots: int) -> None:
        """`blocks` went to the runner: its slot now holds them."""
        if not blocks:
            return
        key = (node, model)
        chains = self._slots.pop(key, [])
        best = max(range(len(chains)), key=lambda i: common(chains[i], blocks), default=None)
        if best is not None and (common(chains[best], blocks) or len(chains) >= slots):
            del chains[best if common(chains[best], blocks) else 0]  # the matching slot, else the oldest
        chains.append(blocks)
        del chains[: max(0, len(chains) - max(1, slots))]
        self._slots[key] = chains
        while len(self._slots) > self.limit:
            self._slots.popitem(last=False)

    def pairs(self) -> list[tuple[str, str]]:
        """The (node, model) pairs indexed."""
        return list(self._slots)

    def forget(self, node: str, model: str) -> None:
        """The runner is gone (unloaded, reloaded, failed): nothing of it is cached."""
        self._slots.pop((node, model), None)
