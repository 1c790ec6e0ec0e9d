"""Ollama's eras, told from the version a node reports (reference/ollama-current.md §1).

- classic (≤ v0.12.10): Ollama's own estimate decides placement and is what `/api/ps` shows;
- layout (v0.12.11 – v0.24.x): Ollama's layout code; sizes without the per-GPU reserve;
- llama_server (≥ v0.30.0): upstream llama-server fits the layers; `/api/ps` shows measured buffers.

A version that cannot be read is taken as the newest era (the reference's advice).
"""

from __future__ import annotations

import functools
import re

from gpurouter.units import GIB

CLASSIC = "classic"
LAYOUT = "layout"
LLAMA_SERVER = "llama_server"
ERAS = (CLASSIC, LAYOUT, LLAMA_SERVER)
LABELS = {CLASSIC: "classic", LAYOUT: "layout", LLAMA_SERVER: "llama-server"}  # how people write them

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")
TIERED_CONTEXT = (0, 15, 5)  # first release whose default context follows the VRAM tier
FALLBACK_CONTEXT = 4096  # the default context before v0.15.5, and on small or unknown GPUs


@functools.lru_cache(maxsize=1024)  # a fleet runs a few versions; every node and poll asks
def parse_version(version: str | None) -> tuple[int, int, int] | None:
    """(0, 12, 6) from "0.12.6", "v0.12.6" or "0.13.0-rc1"; None for anything else ("0.0.0" included:
    a development build says nothing about its behaviour)."""
    match = _VERSION.match((version or "").strip())
    if match is None:
        return None
    parsed = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    return None if parsed == (0, 0, 0) else parsed


def era_of(version: str | None) -> str:
    """The era a node's Ollama belongs to; the newest when the version is unknown or unreadable."""
    parsed = parse_version(version)
    if parsed is None or parsed >= (0, 30, 0):
        return LLAMA_SERVER
    if parsed <= (0, 12, 10):
        return CLASSIC
    return LAYOUT


def tier_context(gpu_total: int) -> int:
    """The VRAM-tier default context of v0.15.5+ from the sum of the node's GPU memory (CPU-only: 0)."""
    if gpu_total >= 47 * GIB:
        return 262144
    if gpu_total >= 23 * GIB:
        return 32768
    return FALLBACK_CONTEXT


def default_context(version: str | None, configured: int | None, gpu_total: int | None) -> tuple[int, str]:
    """(the context a model gets on the node when nothing else sets one, where that figure comes from).

    The node's OLLAMA_CONTEXT_LENGTH when configured; else, on v0.15.5+ (or an unknown version, taken as
    the newest), the tier of its known GPU total; else 4096.
    """
    if configured:
        return configured, "configured"
    parsed = parse_version(version)
    tiered = parsed is None or parsed >= TIERED_CONTEXT
    if tiered and gpu_total is not None:
        return tier_context(gpu_total), "vram tier"
    return FALLBACK_CONTEXT, "default" if not tiered else "default (GPU total unknown)"
