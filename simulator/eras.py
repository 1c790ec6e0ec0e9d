"""Which Ollama a simulated node behaves as, from the version its fleet entry gives (reference
ollama-current.md §1): classic ≤ v0.12.10, layout v0.12.11 – v0.24, llama-server ≥ v0.30; and the default context
of that version."""

from __future__ import annotations

from gpurouter.units import GIB

CLASSIC = "classic"
LAYOUT = "layout"
LLAMA_SERVER = "llama_server"
LAST_CLASSIC = (0, 12, 10)
FIRST_LLAMA_SERVER = (0, 30, 0)
FIRST_TIERED = (0, 15, 5)  # the default context follows the GPUs' total memory
OLD_DEFAULT_CONTEXT = 4096
TIERS = ((47 * GIB, 262144), (23 * GIB, 32768))  # (at least this much GPU memory, default context)


def version_tuple(version: str) -> tuple[int, ...]:
    """(0, 12, 6) from "0.12.6" or "0.12.6-rc1" (a fleet file's versions are checked to have this form)."""
    return tuple(int(part) for part in version.split("-", 1)[0].split("."))


def era_of(version: str) -> str:
    """The era of a node that reports `version`."""
    v = version_tuple(version)
    if v <= LAST_CLASSIC:
        return CLASSIC
    return LLAMA_SERVER if v >= FIRST_LLAMA_SERVER else LAYOUT


def tier_context(gpu_total: int) -> int:
    """The default context of v0.15.5+ for GPUs of `gpu_total` bytes together (each less OLLAMA_GPU_OVERHEAD)."""
    return next((ctx for least, ctx in TIERS if gpu_total >= least), OLD_DEFAULT_CONTEXT)


def default_context(version: str, configured: int | None, gpu_total: int) -> int:
    """OLLAMA_CONTEXT_LENGTH when set, else the VRAM tier on v0.15.5+, else 4096."""
    if configured:
        return configured
    return tier_context(gpu_total) if version_tuple(version) >= FIRST_TIERED else OLD_DEFAULT_CONTEXT
