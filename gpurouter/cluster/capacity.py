"""GPU capacity of each node, from the source its configuration names; unknown is never guessed.

Sources (DESIGN.md, "GPU capacity of a node"):

- `static`: `vram`/`gpus` from the configuration (`vram: 0` is a CPU node: source `none`, total 0);
- `none`: a CPU node (total 0, so nothing fits there);
- `nvml`: every NVIDIA GPU of this machine through nvidia-ml-py (name, total, used);
- `amd`: every AMD GPU of this machine through sysfs `mem_info_vram_total`/`mem_info_vram_used`;
- `auto`: static if the node states its GPUs, else, when the node's URL is this host, NVML then AMD, else
  unknown;
- `prometheus`: `gpurouter.cluster.promsource.PrometheusCapacity` when `prometheus_url` is set; any source can be
  replaced or added through `sources={"prometheus": reader}` (see `Source`);
- `ollama_log`: the devices of the newest start in each node's own Ollama server log, read from its file or
  its command's output (`gpurouter.cluster.ollamalog`), with the default context that log states.

A probe that finds no GPU or fails (no driver, NVML error, unreadable sysfs) gives `unknown` with the reason,
never an exception: an explicit `gpu_source: nvml` on a machine without NVIDIA driver is unknown, and so is
`auto` on a local machine where neither NVML nor sysfs shows a GPU (a CPU node says `vram: 0`).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from gpurouter.cluster.config import Config, NodeConfig
from gpurouter.cluster.ollamalog import LogFile, command_capacity, file_capacity
from gpurouter.cluster.promsource import PrometheusCapacity
from gpurouter.cluster.state import Capacity, GpuInfo
from gpurouter.urls import redact

# A batch reader: the capacity of each of `nodes` (by name) within `timeout` seconds. A node it leaves out
# is unknown. Local probes ignore the nodes (they read this machine); a Prometheus reader queries per node.
Source = Callable[[Sequence[NodeConfig], float], Mapping[str, Capacity]]

_CARD = re.compile(r"card(\d+)$")


def static_capacity(node: NodeConfig) -> Capacity | None:
    """The GPUs the configuration states (vram: 0 means a CPU node), or None when it states none."""
    gpus = node.static_gpus
    if gpus is None:
        return None
    if not gpus:
        return Capacity(source="none", reason="configured without GPU (vram: 0)")
    return Capacity(
        source="static",
        gpus=tuple(GpuInfo(index=i, name=g.name, total=g.vram) for i, g in enumerate(gpus)),
        reason="from the configuration",
    )


def is_local(url: str) -> bool:
    """True when the node's URL points at this machine."""
    host = (urlsplit(url).hostname or "").lower()
    return host in {"localhost", "127.0.0.1", "::1", socket.gethostname().lower()}


def unknown(reason: str) -> Capacity:
    return Capacity(source="unknown", reason=reason)


def nvml_capacity(nvml: ModuleType | Any) -> Capacity:
    """Every NVIDIA GPU of this machine; unknown (with NVML's message) when NVML fails or finds none.

    `used` is total − free: memory that nothing new can take (other processes and the driver's reserve
    included), the same figure as NVML's v1 `used`.
    """
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return unknown(f"NVML: {exc}")
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            total, free = _nvml_memory(nvml, handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total=total,
                    used=max(0, total - free),
                )
            )
    except nvml.NVMLError as exc:
        return unknown(f"NVML: {exc}")
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    if not gpus:
        return unknown("NVML: no NVIDIA GPU found")
    return Capacity(source="nvml", gpus=tuple(gpus), reason="NVML")


def _nvml_memory(nvml: ModuleType | Any, handle: object) -> tuple[int, int]:
    """(total, free) bytes: the v2 memory info where the driver has it, else v1."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            return int(info.total), int(info.free)
        except nvml.NVMLError:
            pass  # an older driver without nvmlDeviceGetMemoryInfo_v2
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return int(info.total), int(info.free)


def amd_capacity(root: Path) -> Capacity:
    """Every AMD GPU under `root`/class/drm/card*/device (sysfs, bytes); unknown when none is readable."""
    drm = root / "class" / "drm"
    cards = sorted(
        (int(m.group(1)), path)
        for path in (drm.iterdir() if drm.is_dir() else ())
        if (m := _CARD.match(path.name)) and (path / "device" / "mem_info_vram_total").is_file()
    )
    if not cards:
        return unknown(f"AMD: no GPU with mem_info_vram_total under {drm}")
    gpus = []
    for index, (_, card) in enumerate(cards):
        device = card / "device"
        try:
            total = int((device / "mem_info_vram_total").read_text().strip())
            used_file = device / "mem_info_vram_used"
            used = int(used_file.read_text().strip()) if used_file.is_file() else None
        except (OSError, ValueError) as exc:
            return unknown(f"AMD: cannot read {device}: {exc}")
        name_file = device / "product_name"
        name = name_file.read_text().strip() if name_file.is_file() else ""
        gpus.append(GpuInfo(index=index, name=name or f"AMD GPU ({card.name})", total=total, used=used))
    return Capacity(source="amd", gpus=tuple(gpus), reason="sysfs")


class Deadlines:
    """Reads that answer within a deadline: each key (a node, a local probe) has at most one read running, in a
    thread of its own. A read that has not ended by the deadline is left running, and the key's next reads wait
    for that one instead of starting another (a blocked source holds one thread, not one per poll)."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[Future[Capacity], float]] = {}  # key → its read, and when it started
        self._lock = threading.Lock()

    def read(self, calls: Mapping[str, Callable[[float], Capacity]], timeout: float) -> dict[str, Capacity]:
        """key → `call(budget)`, or unknown for a call still running when `timeout` is near: the answer comes
        a margin before `timeout` (the caller waits `timeout` in all), each call given a budget below that."""
        slack = min(0.5, timeout / 4)
        reads = {key: self._start(key, call, timeout - slack) for key, call in calls.items()}
        wait([future for future, _ in reads.values()], timeout=timeout - slack / 2)
        now = time.monotonic()
        return {
            key: future.result()
            if future.done()
            else unknown(
                f"{key}: no answer within {timeout:g} s (a read running for {now - since:.0f} s; only what it "
                "reads is unknown until it ends)"
            )
            for key, (future, since) in reads.items()
        }

    def _start(self, key: str, call: Callable[[float], Capacity], budget: float) -> tuple[Future[Capacity], float]:
        with self._lock:
            running = self._running.get(key)
            if running is not None and not running[0].done():
                return running
            future: Future[Capacity] = Future()
            running = self._running[key] = (future, time.monotonic())
        threading.Thread(target=_run, args=(key, call, budget, future), name="capacity", daemon=True).start()
        return running


def _run(key: str, call: Callable[[float], Capacity], budget: float, future: Future[Capacity]) -> None:
    try:
        future.set_result(call(budget))
    except Exception as exc:  # a reader's bug must not leave its key waiting forever
        future.set_result(unknown(redact(f"{key}: {type(exc).__name__}: {exc}")))


def _local(name: str, probe: Callable[[], Capacity]) -> Source:
    """A source that reads this machine once and gives that capacity to every node asked about."""
    deadlines = Deadlines()

    def read(nodes: Sequence[NodeConfig], timeout: float) -> Mapping[str, Capacity]:
        capacity = deadlines.read({name: lambda _: probe()}, timeout)[name]
        return {node.name: capacity for node in nodes}

    return read


class OllamaLogReader:
    """The `gpu_source: ollama_log` nodes: each reads its own log file (incrementally) or runs its own command,
    all at once, within the poll's timeout (`Deadlines`: a command is killed shortly before it; a read that has
    not ended by then, a file on a hung network mount, makes only its own node's capacity unknown)."""

    def __init__(self) -> None:
        self._files: dict[str, LogFile] = {}
        self._deadlines = Deadlines()

    def read(self, nodes: Sequence[NodeConfig], timeout: float) -> dict[str, Capacity]:
        calls = {f"ollama_log: {node.name}": partial(self.read_node, node) for node in nodes}
        answers = self._deadlines.read(calls, timeout)
        return {node.name: answers[f"ollama_log: {node.name}"] for node in nodes}

    def read_node(self, node: NodeConfig, timeout: float) -> Capacity:
        source = node.ollama_log
        if source is None:
            return unknown(f"ollama_log: {node.name} has no ollama_log setting")
        if source.file is not None:
            log = self._files.get(source.file) or self._files.setdefault(source.file, LogFile(source.file))
            return file_capacity(log)
        return command_capacity(source.command, timeout)


class CapacityReader:
    """Reads the capacity of every node once per poll.

    `nvml` (a pynvml-like module; imported on first use when not given) and `sysfs_root` are injectable for
    tests; `sources` adds or replaces readers by `gpu_source` name (e.g. `{"prometheus": reader}`).
    """

    def __init__(
        self,
        config: Config,
        *,
        nvml: ModuleType | Any | None = None,
        sysfs_root: str | Path = "/sys",
        sources: Mapping[str, Source] | None = None,
        local: Callable[[str], bool] = is_local,
    ) -> None:
        self.config = config
        self._nvml = nvml
        self.sysfs_root = Path(sysfs_root)
        self.local = local
        self.sources: dict[str, Source] = {
            "nvml": _local("NVML", lambda: nvml_capacity(self.nvml)),
            "amd": _local("AMD", lambda: amd_capacity(self.sysfs_root)),
            "ollama_log": OllamaLogReader().read,
            **(sources or {}),
        }
        if config.prometheus.url and "prometheus" not in self.sources:
            self.sources["prometheus"] = PrometheusCapacity(config.prometheus).read

    @property
    def nvml(self) -> ModuleType | Any:
        if self._nvml is None:
            import pynvml

            self._nvml = pynvml
        return self._nvml

    def read(self, nodes: Sequence[NodeConfig], timeout: float) -> dict[str, Capacity]:
        """Each node's capacity: fixed answers first, then each source once for all the nodes that ask it,
        falling through a node's chain (auto: nvml → amd) while the answer is unknown."""
        result: dict[str, Capacity] = {}
        chains: dict[str, list[str]] = {}
        reasons: dict[str, list[str]] = {}
        by_name = {node.name: node for node in nodes}
        for node in nodes:
            fixed = self._fixed(node)
            if fixed is not None:
                result[node.name] = fixed
            else:
                chains[node.name] = self._chain(node)
                reasons[node.name] = []
        while chains:
            asking: dict[str, list[NodeConfig]] = {}
            for name, chain in chains.items():
                asking.setdefault(chain[0], []).append(by_name[name])
            for source, group in asking.items():
                answers = self._ask(source, group, timeout)
                for node in group:
                    capacity = answers.get(node.name) or unknown(f"{source}: no answer for {node.name}")
                    chain = chains[node.name]
                    chain.pop(0)
                    if capacity.known:
                        result[node.name] = capacity
                    else:
                        reasons[node.name].append(capacity.reason)
                        if chain:
                            continue
                        hint = f"set vram (vram: 0 for a CPU node) or gpus on {node.name}, or another gpu_source"
                        result[node.name] = unknown(f"{'; '.join(reasons[node.name])} ({hint})")
                    del chains[node.name]
        return result

    def read_node(self, node: NodeConfig, timeout: float = 2.0) -> Capacity:
        """One node's capacity."""
        return self.read([node], timeout)[node.name]

    def _fixed(self, node: NodeConfig) -> Capacity | None:
        """The answer that needs no probe, or None when the node's sources must be asked."""
        source = node.gpu_source
        if source == "none":
            return Capacity(source="none", reason="gpu_source: none")
        if source in ("static", "auto"):
            static = static_capacity(node)
            if static is not None:
                return static
        if source == "auto" and not self.local(node.url):
            return unknown(f"no GPU capacity for {node.name}: set vram (or gpus) on the node, or gpu_source")
        return None

    @staticmethod
    def _chain(node: NodeConfig) -> list[str]:
        return ["nvml", "amd"] if node.gpu_source == "auto" else [node.gpu_source]

    def _ask(self, source: str, nodes: list[NodeConfig], timeout: float) -> Mapping[str, Capacity]:
        reader = self.sources.get(source)
        if reader is None:
            return {n.name: unknown(f"gpu_source: {source} has no reader in this exporter") for n in nodes}
        try:
            return reader(nodes, timeout)
        except Exception as exc:  # a reader's bug must not hide the other nodes
            return {n.name: unknown(redact(f"{source}: {type(exc).__name__}: {exc}")) for n in nodes}
