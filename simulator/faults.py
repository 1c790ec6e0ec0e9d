"""Faults a node can suffer, and the checking of their parameters (pure)."""

from __future__ import annotations

from collections.abc import Mapping

from gpurouter.units import parse_size

# fault → its parameters (all required)
FAULTS: dict[str, tuple[str, ...]] = {
    "down": (),  # connections refused until cleared
    "slow": ("latency_ms",),  # latency added to every response
    "error": (),  # HTTP 500 {"error":"internal error"} on /api/*
    "garbage": (),  # status 200 with a body that is not JSON on /api/*
    "restart": (),  # one-shot: every model unloaded at once
    "gpu_lost": (),  # GPUs vanish until cleared
    "vram_hog": ("bytes",),  # another process holds `bytes` of GPU 0 until cleared
}
ONE_SHOT = ("restart",)


def check_fault(fault: object, params: Mapping[str, object]) -> tuple[str, dict[str, int]]:
    """(fault, normalized parameters), or ValueError with a one-line reason."""
    if not isinstance(fault, str) or fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of: {', '.join(FAULTS)}")
    wanted = FAULTS[fault]
    extra = sorted(set(params) - set(wanted))
    if extra:
        takes = f"its parameters: {', '.join(wanted)}" if wanted else "it takes none"
        raise ValueError(f"fault {fault!r} takes no parameter {extra[0]!r} ({takes})")
    checked: dict[str, int] = {}
    for key in wanted:
        if key not in params:
            raise ValueError(f"fault {fault!r} needs {key!r}")
        value = params[key]
        if key == "bytes" and isinstance(value, str):
            try:
                checked[key] = parse_size(value)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key}: expected an integer ≥ 0, got {value!r}")
        else:
            checked[key] = value
    return fault, checked
