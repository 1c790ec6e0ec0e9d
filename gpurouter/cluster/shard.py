"""A shard of the fleet: the nodes one of several exporters observes, so that they split a large fleet.

`--shard I/N` (1 ≤ I ≤ N) keeps the nodes whose shard is I. A node's shard depends on its name alone
(rendezvous hashing over SHA-256: the same in every process, on every machine, with every Python), so N
exporters given the same configuration split it with no overlap and no gap, and going from N to N + 1
shards moves only about 1/(N + 1) of the nodes.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from gpurouter.cluster.config import Config


def parse_shard(text: str) -> tuple[int, int]:
    """(I, N) from "I/N"; ValueError naming what is wrong."""
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError(f"--shard: expected I/N (e.g. 1/4), got {text!r}")
    i, n = int(index), int(count)
    if not 1 <= i <= n:
        raise ValueError(f"--shard: I must be between 1 and N, got {text!r}")
    return i, n


def shard_of(name: str, count: int) -> int:
    """The shard (1 … count) of the node called `name`: the one whose hash with the name is highest."""
    return 1 + max(range(count), key=lambda i: hashlib.sha256(f"{i}/{name}".encode()).digest())


def shard(config: Config, index: int, count: int) -> Config:
    """The configuration with only the nodes of shard `index` of `count`."""
    if count == 1:
        return config
    return replace(config, nodes=tuple(n for n in config.nodes if shard_of(n.name, count) == index))
