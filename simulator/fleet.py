"""The fleet file: YAML → a typed `FleetSpec`, every error naming the file and the key path."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from gpurouter.cluster.config import name_problem
from gpurouter.cluster.yamlfile import closest, read_yaml, show, show_key
from gpurouter.units import GIB, MAX_SIZE, parse_size
from simulator import catalog, eras
from simulator.gotypes import FOREVER, parse_keep_alive

_NODE_KEYS = (
    "name", "port", "gpus", "ram", "models", "version", "latency_ms", "load_speed", "max_loaded_models",
    "num_parallel", "max_queue", "context_length", "gpu_overhead", "keep_alive", "token_rate", "cpu_token_rate",
    "gpu_token_rate", "prefill_rate", "cpu_prefill_rate", "preload",
)  # fmt: skip
_GPU_KEYS = ("name", "vram")
PRELOAD_OPTIONS = ("num_ctx", "num_gpu", "num_batch", "main_gpu", "num_thread", "use_mmap")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CPU_SLOWDOWN = 8.0  # a model fully on CPU generates this many times slower than fully on GPU (5–10× in practice)
PREFILL_SPEEDUP = 40.0  # a GPU reads a prompt this many times faster than it generates (batched, compute-bound)
CPU_PREFILL_SLOWDOWN = 30.0  # a CPU reads a prompt this many times slower than a GPU does
CURRENT_VERSION = "0.32.15"  # the newest stable release when this was written (llama-server era)
MAX_INTEGER = 1 << 24  # larger than any count, context or option a fleet needs
_VERSION = re.compile(r"^\d+\.\d+\.\d+(-[0-9A-Za-z.]+)?$")


@dataclass(frozen=True)
class GpuSpec:
    name: str
    vram: int  # bytes


@dataclass(frozen=True)
class PreloadSpec:
    """A model loaded at start, as if by a load request with these options and keep_alive."""

    model: str
    options: Mapping[str, Any] = field(hash=False)
    keep_alive: float | None = None  # seconds; None = the node's default


@dataclass(frozen=True)
class NodeSpec:
    name: str
    port: int  # 0 = ephemeral
    gpus: tuple[GpuSpec, ...] = ()
    ram: int = 16 * GIB
    models: tuple[str, ...] = ()  # installed, as /api/tags names them ("x" → "x:latest")
    version: str = CURRENT_VERSION
    latency_ms: int = 0
    load_speed: int = 0  # bytes of `size` per second; 0 = instant
    max_loaded_models: int = 0  # 0 = 3 × GPUs (3 without GPU)
    num_parallel: int = 1  # OLLAMA_NUM_PARALLEL: slots per runner (1 for embedding models and some families)
    max_queue: int = 512  # OLLAMA_MAX_QUEUE: requests that may wait for a load; past it 503
    context_length: int | None = None  # OLLAMA_CONTEXT_LENGTH; None = unset (the era's default)
    gpu_overhead: int = 0  # bytes per GPU
    keep_alive: float = 300.0  # seconds
    token_rate: float = 50.0  # tokens per second of a model fully on GPU; 0 = instant
    cpu_token_rate: float | None = None  # tokens per second of a model fully on CPU; None = token_rate / CPU_SLOWDOWN
    gpu_token_rate: float | None = None  # tokens per second one GPU generates in all runners; None = token_rate
    prefill_rate: float | None = None  # prompt tokens per second fully on GPU; None = token_rate × PREFILL_SPEEDUP
    cpu_prefill_rate: float | None = None  # prompt tokens per second on CPU; None = prefill_rate ÷ 30
    preload: tuple[PreloadSpec, ...] = ()

    def rate(self, gpu_share: float) -> float:
        """Tokens per second of a model with `gpu_share` of its size on GPU (0 = instant).

        The time per token is the GPU's time for the layers on GPU plus the CPU's for the rest, so a partial
        copy loses speed quickly: 29 % on CPU is about 3× slower at the default 8× CPU slowdown (ollama#14258
        measured 3.3×)."""
        cpu = self.token_rate / CPU_SLOWDOWN if self.cpu_token_rate is None else self.cpu_token_rate
        return _mixed_rate(gpu_share, self.token_rate, cpu)

    def prefill(self, gpu_share: float) -> float:
        """Prompt tokens per second of a model with `gpu_share` of its size on GPU (0 = instant), mixed as
        `rate` mixes: fully on GPU `prefill_rate`, fully on CPU `cpu_prefill_rate`, partial in between."""
        gpu = self.token_rate * PREFILL_SPEEDUP if self.prefill_rate is None else self.prefill_rate
        cpu = gpu / CPU_PREFILL_SLOWDOWN if self.cpu_prefill_rate is None else self.cpu_prefill_rate
        return _mixed_rate(gpu_share, gpu, cpu)

    @property
    def gpu_capacity(self) -> float:
        """Tokens per second one GPU generates, all its runners together (0 = unbounded)."""
        return self.token_rate if self.gpu_token_rate is None else self.gpu_token_rate

    @property
    def max_loaded(self) -> int:
        return self.max_loaded_models or 3 * max(1, len(self.gpus))

    @property
    def default_context(self) -> int:
        """The context a model gets when neither the request nor its Modelfile sets one: OLLAMA_CONTEXT_LENGTH,
        else (v0.15.5+) the tier of the GPUs' total memory less OLLAMA_GPU_OVERHEAD each, else 4096."""
        total = sum(max(0, g.vram - self.gpu_overhead) for g in self.gpus)
        return eras.default_context(self.version, self.context_length, total)


def _mixed_rate(gpu_share: float, gpu: float, cpu: float) -> float:
    """Per-token time = the GPU's for its share + the CPU's for the rest; 0 (instant) when both are 0."""
    share = min(1.0, max(0.0, gpu_share))
    seconds = (share / gpu if gpu and share else 0.0) + ((1.0 - share) / cpu if cpu and share < 1 else 0.0)
    return 1.0 / seconds if seconds else 0.0


@dataclass(frozen=True)
class FleetSpec:
    nodes: tuple[NodeSpec, ...]
    control_port: int = 0
    source: str = "<fleet>"


class _Errors:
    """Raises ValueError as "SOURCE: PATH: message"."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> NoReturn:
        raise ValueError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def keys(self, data: object, allowed: tuple[str, ...], path: str) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            self.fail(path, f"expected a mapping, got {show(data)}")
        for key in data:  # type: ignore[union-attr]
            if key not in allowed:
                close = closest(key, allowed)
                hint = f" (did you mean {close!r}?)" if close else f" (known keys: {', '.join(allowed)})"
                shown = show_key(key)
                self.fail(f"{path}.{shown}" if path else shown, f"unknown key{hint}")
        return data  # type: ignore[return-value]

    def integer(self, value: object, path: str, minimum: int = 0, maximum: int = MAX_INTEGER) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(path, f"expected an integer ≥ {minimum}, got {show(value)}")
        if value > maximum:  # type: ignore[operator]
            self.fail(path, f"expected an integer ≤ {maximum}, got {show(value)}")
        return value  # type: ignore[return-value]

    def number(self, value: object, path: str, maximum: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= maximum:
            self.fail(path, f"expected a number from 0 to {maximum:g}, got {show(value)}")
        return float(value)  # type: ignore[arg-type]

    def size(self, value: object, path: str, plain_unit: str = "MiB") -> int:
        """A size; plain numbers are MiB (like the configuration) or bytes where `plain_unit` says so."""
        if plain_unit == "B" and isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE:
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(path, str(exc))

    def text(self, value: object, path: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        """A name: a non-empty string of printable characters (matching `pattern` where given)."""
        if not isinstance(value, str) or not value or (pattern is not None and not pattern.match(value)):
            self.fail(path, f"expected {what or 'a non-empty string'}, got {show(value)}")
        if problem := name_problem(value):
            self.fail(path, f"{problem}, got {show(value)}")
        return value

    def items(self, value: object, path: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {show(value)}")
        return value  # type: ignore[return-value]


def display_name(name: str) -> str:
    """The /api/tags form of a model name: lower case, ":latest" when no tag is given."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _models(err: _Errors, value: object, path: str) -> tuple[str, ...]:
    names: list[str] = []
    for i, item in enumerate(err.items(value, path)):
        where = f"{path}[{i}]"
        name = err.text(item, where, what="a model name")
        if catalog.find(name) is None:
            known = [spec.name for spec in catalog.CATALOG]
            close = closest(display_name(name), known)
            hint = f" (did you mean {close!r}?)" if close else f"; known: {', '.join(known)}"
            err.fail(where, f"unknown model {show(name)}{hint}")
        if display_name(name) in names:
            err.fail(where, f"model {show(name)} is listed twice")
        names.append(display_name(name))
    return tuple(names)


def _gpus(err: _Errors, value: object, path: str) -> tuple[GpuSpec, ...]:
    gpus = []
    for i, item in enumerate(err.items(value, path)):
        where = f"{path}[{i}]"
        gpu = err.keys(item, _GPU_KEYS, where)
        if "vram" not in gpu:
            err.fail(f"{where}.vram", "missing (a size like 8GiB)")
        vram = err.size(gpu["vram"], f"{where}.vram")
        if vram <= 0:
            err.fail(f"{where}.vram", f"expected a size > 0, got {show(gpu['vram'])}")
        gpus.append(GpuSpec(err.text(gpu.get("name", "NVIDIA GPU"), f"{where}.name"), vram))
    return tuple(gpus)


def _keep_alive(err: _Errors, value: object, path: str) -> float:
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= FOREVER:
            raise ValueError(value)  # NaN and infinities included
        return parse_keep_alive(value)
    except ValueError:
        err.fail(path, f"expected a duration like 5m, -1 or 300, got {show(value)}")


def _preload(err: _Errors, value: object, path: str, models: tuple[str, ...]) -> tuple[PreloadSpec, ...]:
    loads = []
    for i, item in enumerate(err.items(value, path)):
        where = f"{path}[{i}]"
        entry = err.keys(item, ("model", "keep_alive", *PRELOAD_OPTIONS), where)
        model = err.text(entry.get("model"), f"{where}.model", what="a model name")
        spec = catalog.find(model)
        if spec is None or all(catalog.find(m) is not spec for m in models):
            err.fail(f"{where}.model", f"{show(model)} is not among this node's models")
        options: dict[str, Any] = {}
        for key in PRELOAD_OPTIONS:
            if key in entry:
                if key == "use_mmap":
                    if not isinstance(entry[key], bool):
                        err.fail(f"{where}.{key}", f"expected true or false, got {show(entry[key])}")
                    options[key] = entry[key]
                else:
                    options[key] = err.integer(entry[key], f"{where}.{key}", minimum=-1 if key == "num_gpu" else 0)
        keep_alive = _keep_alive(err, entry["keep_alive"], f"{where}.keep_alive") if "keep_alive" in entry else None
        loads.append(PreloadSpec(display_name(model), options, keep_alive))
    return tuple(loads)


def _rate(err: _Errors, node: Mapping[str, Any], key: str, path: str) -> float | None:
    """An optional rate (tokens per second, 0 = instant); None when unset."""
    return None if node.get(key) is None else err.number(node[key], f"{path}.{key}", maximum=1e9)


def _node(err: _Errors, item: object, path: str) -> NodeSpec:
    node = err.keys(item, _NODE_KEYS, path)
    if "name" not in node:
        err.fail(f"{path}.name", "missing")
    name = err.text(node["name"], f"{path}.name", _NAME, "a name of letters, digits, '.', '_' or '-'")
    models = _models(err, node.get("models"), f"{path}.models")
    defaults = NodeSpec(name=name, port=0)
    return NodeSpec(
        name=name,
        port=err.integer(node.get("port", 0), f"{path}.port", maximum=65535),
        gpus=_gpus(err, node.get("gpus"), f"{path}.gpus"),
        ram=err.size(node["ram"], f"{path}.ram") if "ram" in node else defaults.ram,
        models=models,
        version=err.text(node.get("version", defaults.version), f"{path}.version", _VERSION, 'a version like "0.12.6"'),
        latency_ms=err.integer(node.get("latency_ms", 0), f"{path}.latency_ms", maximum=600_000),
        load_speed=err.size(node.get("load_speed", 0), f"{path}.load_speed", plain_unit="B"),
        max_loaded_models=err.integer(node.get("max_loaded_models", 0), f"{path}.max_loaded_models"),
        num_parallel=err.integer(node.get("num_parallel", 1), f"{path}.num_parallel", minimum=1),
        max_queue=err.integer(node.get("max_queue", defaults.max_queue), f"{path}.max_queue", minimum=1),
        context_length=(
            err.integer(node["context_length"], f"{path}.context_length", minimum=1)
            if node.get("context_length") is not None
            else None
        ),
        gpu_overhead=err.size(node.get("gpu_overhead", 0), f"{path}.gpu_overhead", plain_unit="B"),
        keep_alive=_keep_alive(err, node.get("keep_alive", "5m"), f"{path}.keep_alive"),
        token_rate=err.number(node.get("token_rate", defaults.token_rate), f"{path}.token_rate", maximum=1e9),
        cpu_token_rate=_rate(err, node, "cpu_token_rate", path),
        gpu_token_rate=_rate(err, node, "gpu_token_rate", path),
        prefill_rate=_rate(err, node, "prefill_rate", path),
        cpu_prefill_rate=_rate(err, node, "cpu_prefill_rate", path),
        preload=_preload(err, node.get("preload"), f"{path}.preload", models),
    )


def fleet_from_dict(data: object, source: str = "<fleet>") -> FleetSpec:
    """A `FleetSpec` from parsed YAML; ValueError "SOURCE: nodes[1].gpus[0].vram: expected ..." otherwise."""
    err = _Errors(source)
    top = err.keys(data, ("control_port", "nodes"), "")
    raw_port = top.get("control_port")
    control_port = 0 if raw_port is None else err.integer(raw_port, "control_port", maximum=65535)
    raw_nodes = err.items(top.get("nodes"), "nodes")
    if not raw_nodes:
        err.fail("nodes", "expected a non-empty list of nodes")
    nodes: list[NodeSpec] = []
    names: dict[str, int] = {}
    ports: dict[int, str] = {control_port: "control_port"} if control_port else {}
    for i, item in enumerate(raw_nodes):
        node = _node(err, item, f"nodes[{i}]")
        if node.name in names:
            err.fail(f"nodes[{i}].name", f"duplicate node name {show(node.name)} (also nodes[{names[node.name]}])")
        if node.port and node.port in ports:
            err.fail(f"nodes[{i}].port", f"port {node.port} is already used by {ports[node.port]}")
        names[node.name] = i
        if node.port:
            ports[node.port] = f"nodes[{i}]"
        nodes.append(node)
    return FleetSpec(tuple(nodes), control_port, source)


def load_fleet(path: str | Path) -> FleetSpec:
    """Read and check a fleet file; ValueError naming the file (and key path) on any problem."""
    source = str(path)
    data = read_yaml(path, source)
    if data is None:
        raise ValueError(f"{source}: empty file: expected a mapping with 'nodes'")
    return fleet_from_dict(data, source)
