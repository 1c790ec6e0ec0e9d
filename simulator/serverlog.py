"""The lines a simulated node appends to its server log at every start, shaped like Ollama's own.

The shapes, and where in ollama/ollama they come from, are quoted in `gpurouter/cluster/ollamalog.py` (which reads
them back): `server config` (OLLAMA_CONTEXT_LENGTH 0 when the node sets none, v0.15.5+), `Listening on`,
one `inference compute` line per GPU, most free memory first (the v0.12.4+ fields, `filter_id` from v0.12.10,
the older `variant`/`name` shape before), or the `id=cpu` line without GPU, and from v0.15.5 the
`vram-based default context` line, which Ollama writes even when OLLAMA_CONTEXT_LENGTH is set.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from simulator.eras import FIRST_TIERED, tier_context
from simulator.fleet import NodeSpec
from simulator.gotypes import go_quote, human_bytes2
from simulator.scheduler import GpuUsage

_PLAIN = re.compile(r"^[^\s=\"\x00-\x1f\x7f]+$")  # slog's TextHandler quotes anything else


def slog_time(seconds: float) -> str:
    """slog's `time=` value: local time with milliseconds and the offset ("Z" for UTC)."""
    text = datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


def slog_line(now: float, source: str, msg: str, **fields: object) -> str:
    """One INFO line as Ollama's slog TextHandler writes it."""
    pairs = {"time": slog_time(now), "level": "INFO", "source": source, "msg": msg, **fields}
    return " ".join(f"{key}={_value(value)}" for key, value in pairs.items())


def _value(value: object) -> str:
    text = str(value)
    return text if _PLAIN.match(text) else go_quote(text)


def start_lines(spec: NodeSpec, version: tuple[int, ...], gpus: Sequence[GpuUsage], url: str, now: float) -> list[str]:
    """What a node of `spec` logs when its server starts with these GPUs (none: CPU only) at `url`."""
    address = url.removeprefix("http://")
    tiered = version >= FIRST_TIERED
    context = spec.context_length or (0 if tiered else 4096)
    env = {
        "CUDA_VISIBLE_DEVICES": "",
        "OLLAMA_CONTEXT_LENGTH": context,
        "OLLAMA_GPU_OVERHEAD": spec.gpu_overhead,
        "OLLAMA_HOST": url,
        "OLLAMA_MAX_LOADED_MODELS": spec.max_loaded_models,
        "OLLAMA_NUM_PARALLEL": spec.num_parallel,
    }
    lines = [
        slog_line(
            now, "routes.go:1951", "server config", env="map[" + " ".join(f"{k}:{v}" for k, v in env.items()) + "]"
        ),
        slog_line(now, "routes.go:2008", f"Listening on {address} (version {spec.version})"),
    ]
    lines += [_device_line(now, spec.name, version, gpu) for gpu in sorted(gpus, key=lambda g: -g.free)]
    if not gpus:
        lines.append(_cpu_line(now, version, spec.ram))
    if tiered:
        total = sum(max(0, g.total - spec.gpu_overhead) for g in gpus)
        lines.append(
            slog_line(
                now,
                "routes.go:2058",
                "vram-based default context",
                total_vram=human_bytes2(total),
                default_num_ctx=tier_context(total),
            )
        )
    return lines


def _device_line(now: float, node: str, version: tuple[int, ...], gpu: GpuUsage) -> str:
    sizes = {"total": human_bytes2(gpu.total), "available": human_bytes2(gpu.free)}
    gpu_id = f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{node}.gpu{gpu.index}')}"
    if version < (0, 12, 4):
        fields = {"id": gpu_id, "library": "cuda", "variant": "v12", "compute": "8.6", "driver": "12.8"}
        return slog_line(now, "types.go:130", "inference compute", **fields, name=gpu.name, **sizes)
    fields = {"id": gpu_id, **({"filter_id": ""} if version >= (0, 12, 10) else {}), "library": "CUDA"}
    return slog_line(
        now,
        "types.go:32",
        "inference compute",
        **fields,
        compute="8.6",
        name=f"CUDA{gpu.index}",
        description=gpu.name,
        libdirs="ollama,cuda_v12",
        driver="12.8",
        pci_id=f"0000:{gpu.index + 1:02x}:00.0",
        type="discrete",
        **sizes,
    )


def _cpu_line(now: float, version: tuple[int, ...], ram: int) -> str:
    sizes = {"total": human_bytes2(ram), "available": human_bytes2(ram)}
    if version < (0, 12, 4):
        fields = {"id": "0", "library": "cpu", "variant": "", "compute": "", "driver": "0.0", "name": ""}
        return slog_line(now, "types.go:130", "inference compute", **fields, **sizes)
    fields = {"id": "cpu", "library": "cpu", "compute": "", "name": "cpu", "description": "cpu", "libdirs": "ollama"}
    return slog_line(now, "types.go:50", "inference compute", **fields, driver="", pci_id="", type="", **sizes)


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append whole lines to the log file (its folder is made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        log.write("".join(line + "\n" for line in lines))
