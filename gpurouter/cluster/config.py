"""The configuration file: loaded once, validated up front, returned as one immutable `Config`.

The original guide's `gpu_router_config.yaml` loads unchanged. Every error names the file, the key path and
what was expected, e.g. ``gpu_router_config.yaml: nodes[1].vram: expected a size like 8GiB, got 'eight'``.
"""

from __future__ import annotations

import functools
import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from gpurouter.cluster.goduration import FOREVER, parse_keep_alive
from gpurouter.cluster.yamlfile import closest, read_yaml, show, show_key
from gpurouter.units import parse_size
from gpurouter.urls import identity

DEFAULT_PATHS = (Path("gpu_router_config.yaml"), Path("/etc/gpu-router/config.yaml"))
GPU_SOURCES = ("auto", "nvml", "amd", "static", "prometheus", "ollama_log", "none")
PROMETHEUS_TEMPLATES = ("dcgm", "nvidia_gpu_exporter", "gpu_router", "custom")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
HOUR, DAY = 3600.0, 86400.0  # upper limits of the settings in seconds (request_timeout; the others)
MAX_CONTEXT = 1 << 24  # tokens: num_ctx, context_length
MAX_PARALLEL = 256  # num_parallel
MAX_LOADS = 64  # optimizer.max_loads_per_node
MAX_RETRIES = 16  # proxy.retries


class ConfigError(ValueError):
    """A configuration problem, as one line that names the file and the key path."""


@dataclass(frozen=True)
class GpuSpec:
    """One GPU given in the configuration."""

    name: str
    vram: int


@dataclass(frozen=True)
class OllamaLogSource:
    """Where `gpu_source: ollama_log` reads Ollama's server log: a file, or the output of a command."""

    file: str | None = None
    command: tuple[str, ...] = ()  # the words of the command (split like a shell would), run without a shell


@dataclass(frozen=True)
class NodeConfig:
    """One Ollama node."""

    name: str
    url: str
    vram: int | None = None  # total GPU bytes; 0 = no GPU; None = detect
    gpus: tuple[GpuSpec, ...] = ()
    gpu_source: str = "auto"
    maintenance: bool = False
    context_length: int | None = None  # the node's OLLAMA_CONTEXT_LENGTH; None = not set (the era's default)
    num_parallel: int = 1  # the node's OLLAMA_NUM_PARALLEL
    prometheus_match: str | None = None  # PromQL label matcher for gpu_source: prometheus
    ollama_log: OllamaLogSource | None = None  # for gpu_source: ollama_log
    max_loaded_models: int | None = None  # the node's OLLAMA_MAX_LOADED_MODELS; None = Ollama's 3 × GPUs

    @property
    def static_gpus(self) -> tuple[GpuSpec, ...] | None:
        """The GPUs the configuration states, or None when it states none."""
        if self.gpus:
            return self.gpus
        if self.vram is None:
            return None
        return () if self.vram == 0 else (GpuSpec(name="GPU", vram=self.vram),)


@dataclass(frozen=True)
class PriorityModel:
    """A model to keep on GPU; the first in the list matters most."""

    name: str
    num_ctx: int | None = None
    keep_alive: int | float | str = -1


@dataclass(frozen=True)
class Secret:
    """A credential given inline, through an environment variable or in a file; resolved when read."""

    value: str | None = None
    env: str | None = None
    file: str | None = None
    origin: str = ""  # "FILE: KEY" of the setting that gives it, for the messages of `resolve`

    def resolve(self) -> str:
        """The credential's text; raises ConfigError (naming the file and the key) when its source is missing or
        empty."""
        where = f"{self.origin}: " if self.origin else ""
        if self.value is not None:
            text = self.value
        elif self.env is not None:
            text = os.environ.get(self.env, "")
            if not text:
                raise ConfigError(f"{where}environment variable {self.env} is not set or empty")
        else:
            try:
                text = Path(str(self.file)).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{where}cannot read credentials file {self.file}: {exc.strerror}") from None
            if not text:
                raise ConfigError(f"{where}credentials file {self.file} is empty")
        return text


@dataclass(frozen=True)
class WebhookAuth:
    """Credentials the optimizer demands on /webhook and POST /api/v1/optimize."""

    bearer_token: Secret | None = None
    username: str | None = None
    password: Secret | None = None

    @property
    def enabled(self) -> bool:
        return self.bearer_token is not None or self.username is not None


@dataclass(frozen=True)
class PrometheusSource:
    """Where `gpu_source: prometheus` reads GPU memory from."""

    url: str | None = None
    template: str = "dcgm"
    total_query: str | None = None  # custom: PromQL with {match}, bytes per GPU
    used_query: str | None = None
    max_age: float = 120.0  # samples older than this make the capacity unknown


@dataclass(frozen=True)
class OptimizerSettings:
    """How the optimizer acts."""

    cooldown_seconds: float = 30.0  # first wait after a failed attempt; doubles each time
    cooldown_max_seconds: float = 900.0
    max_loads_per_node: int = 1
    load_timeout: float = 300.0
    webhook_auth: WebhookAuth = field(default_factory=WebhookAuth)
    protect_reads: bool = False  # the read endpoints (GET /, /api/v1/*) demand webhook_auth's credentials too


@dataclass(frozen=True)
class RouteWeights:
    """How much each scorer of the proxy's request pipeline counts (`proxy.weights`); 0 turns one off."""

    residency: float = 10.0  # fully on GPU > loads fully on GPU > loading > partial by GPU share > CPU
    queue: float = 1.0  # requests in flight against the runner's slots
    latency: float = 2.0  # expected time to first token (slot wait + uncached prefill + load), against the best
    affinity: float = 1.0  # share of the prompt cached on the node, while the node is not saturated (τ)
    speed: float = 0.0  # observed decode tokens/s of the model on the node, against the best candidate's


@dataclass(frozen=True)
class ProxySettings:
    """How `gpu-router proxy` routes and forwards requests."""

    refresh_interval: float = 2.0  # seconds between background polls of the cluster
    wait_for_gpu: float = 30.0  # seconds a request for a priority model off GPU may wait for the heal; 0 = never
    retries: int = 2  # further nodes tried when one fails before the first byte
    max_body: int = 32 * 1024 * 1024  # bytes; a larger request body gets 413
    read_timeout: float = 300.0  # seconds a node may take to send the next bytes (a model load included)
    optimizer_url: str | None = None  # heal through this optimizer's API; None = in-process (auto_optimize)
    auth: WebhookAuth = field(default_factory=WebhookAuth)  # bearer token demanded from clients
    weights: RouteWeights = field(default_factory=RouteWeights)  # the request pipeline's scorers
    max_queue: int = 64  # requests waiting in the proxy per (node, model) past its slots; more get 503
    max_queue_seconds: float = 4.0  # prefill a node may have queued before prompt-cache affinity spreads


@dataclass(frozen=True)
class DemandSettings:
    """Placement from demand (`demand`): the optimizer keeps on GPU, after the priority models, the models the
    proxy is asked for most (`gpurouter.decide.demand`)."""

    placement: bool = True  # false: the priority list only
    proxy_url: str | None = None  # the proxy whose GET /api/v1/demand is read; None = no demand (priority only)
    window: float = 600.0  # seconds the proxy counts demand over
    interval: float = 15.0  # seconds between the optimizer's passes over demand
    min_requests_per_minute: float = 1.0  # below it a model is not placed for its demand (and is released)
    min_gain: float = 0.5  # a model placed for its demand gives way only to one with (1 + min_gain) × its score
    keep_alive: int | float | str = "30m"  # what a model placed for its demand is loaded (and renewed) with
    prewarm_queue: float = 3.0  # requests waiting in the proxy (mean over 30 s) that pre-warm another copy


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    nodes: tuple[NodeConfig, ...]
    priority_models: tuple[PriorityModel, ...] = ()
    check_interval: float = 300.0
    vram_safety_margin: float | None = None  # None: no margin beyond the node's Ollama's own (the default)
    auto_optimize: bool = True
    log_level: str = "INFO"
    model_sizes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    request_timeout: float = 2.0
    prometheus: PrometheusSource = field(default_factory=PrometheusSource)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    demand: DemandSettings = field(default_factory=DemandSettings)
    actions_log: str | None = None  # the shared actions log (gpurouter.act.journal); None = each process its own
    source: str = "<config>"

    def node(self, name: str) -> NodeConfig | None:
        return next((n for n in self.nodes if n.name == name), None)

    @property
    def margin(self) -> float:
        """The fraction of a node's GPU memory models may use: `vram_safety_margin`, else all of it (the node's
        Ollama then judges by its own rules: the classic estimate's reserve, the layout reserve, llama.cpp's
        fit margin and the admission test, applied by `gpurouter.sizing.room` on every era)."""
        return 1.0 if self.vram_safety_margin is None else self.vram_safety_margin

    def priority(self, model: str) -> PriorityModel | None:
        key = model_key(model)
        return next((p for p in self.priority_models if model_key(p.name) == key), None)

    def priority_rank(self, model: str) -> int | None:
        """1 for the first priority model, None for a model that is not one."""
        key = model_key(model)
        for rank, p in enumerate(self.priority_models, start=1):
            if model_key(p.name) == key:
                return rank
        return None


@functools.lru_cache(maxsize=8192)  # asked for every model of every node on every poll
def model_key(name: str) -> str:
    """A model name as Ollama lists it: the tag defaults to `latest`."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def not_text(value: str) -> str | None:
    """Why `value` is not text, or None: it holds a lone surrogate (what a "\\ud800" escape in JSON or YAML
    makes), which has no UTF-8 form, so no answer, log line or terminal could carry it."""
    bad = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    return None if bad is None else f"a lone surrogate (U+{ord(bad):04X}) is not text"


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a model or a node, or None: a lone surrogate, or another character that is not
    printable (a control character, a line break)."""
    bad = next((c for c in name if not c.isprintable()), None)
    if bad is None:
        return None
    return not_text(bad) or f"an unprintable character (U+{ord(bad):04X}) has no place in a name"


# ---------------------------------------------------------------------------------------------- parsing


class _Reader:
    """Validation helpers that know the file name, so every message can name it."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {show(value)}")
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                close = closest(key, allowed)
                hint = f" (did you mean {close!r}?)" if close else f" (known keys: {', '.join(allowed)})"
                raise self.fail(_join(path, show_key(key)), f"unknown key{hint}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"expected a non-empty string, got {show(value)}")
        if problem := not_text(value):
            raise self.fail(path, problem)
        return value.strip()

    def name(self, value: Any, path: str) -> str:
        """A model's, node's or GPU's name: a string of printable characters."""
        text = self.string(value, path)
        if problem := name_problem(text):
            raise self.fail(path, f"{problem}, got {show(text)}")
        return text

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {show(value)}")
        return value

    def number(
        self,
        value: Any,
        path: str,
        *,
        maximum: float,
        minimum: float = 0.0,
        positive: bool = False,
        integer: bool = False,
    ) -> float:
        """A finite number in [minimum, maximum] (above 0 when `positive`), whole when `integer`."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number, got {show(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(path, f"expected a finite number, got {show(value)}")
        if value < minimum or (positive and value <= 0):
            raise self.fail(path, f"expected a number {'>' if positive else '≥'} {minimum:g}, got {show(value)}")
        if value > maximum:
            raise self.fail(path, f"expected a number ≤ {maximum:.15g}, got {show(value)}")
        if integer and int(value) != value:
            raise self.fail(path, f"expected a whole number, got {show(value)}")
        return value

    def size(self, value: Any, path: str) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None

    def url(self, value: Any, path: str) -> str:
        text = self.string(value, path).rstrip("/")
        try:
            parts = urlsplit(text)
            scheme, host, port = parts.scheme, parts.hostname or "", parts.port
        except ValueError:  # "Invalid IPv6 URL" (an unclosed "["), a port that is not a number
            scheme, host, port = "", "", -1
        if scheme not in ("http", "https") or not 0 < len(host) <= 253 or port == -1:
            raise self.fail(path, f"expected an http(s) URL like http://host:11434, got {show(value)}")
        return text

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            close = closest(value, choices)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise self.fail(path, f"expected one of {', '.join(choices)}, got {show(value)}{hint}")
        return value

    def keep_alive(self, value: Any, path: str) -> int | float | str:
        """Ollama's keep_alive as its API reads it: seconds (negative = forever) or a Go duration ("5m")."""
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            if not number:
                parse_keep_alive(value if isinstance(value, str) else None)
            elif not abs(value) <= FOREVER:  # NaN compares False
                raise ValueError("out of range")
        except ValueError:
            raise self.fail(
                path, f"expected seconds (-1 = forever) or a duration like 5m or 1h30m, got {show(value)}"
            ) from None
        return value

    def secret(self, raw: dict[str, Any], key: str, path: str) -> Secret | None:
        forms = {f"{key}": "value", f"{key}_env": "env", f"{key}_file": "file"}
        given = {k: raw[k] for k in forms if raw.get(k) is not None}
        if len(given) > 1:
            raise self.fail(_join(path, key), f"give only one of {', '.join(given)}")
        if not given:
            return None
        (name, value), *_ = given.items()
        key = _join(path, name)
        return Secret(**{forms[name]: self.string(value, key)}, origin=f"{self.source}: {key}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_TOP = (
    "nodes",
    "priority_models",
    "check_interval",
    "vram_safety_margin",
    "auto_optimize",
    "log_level",
    "model_sizes",
    "request_timeout",
    "prometheus_url",
    "prometheus",
    "optimizer",
    "proxy",
    "demand",
    "actions_log",
)
_NODE = (
    "name",
    "url",
    "vram",
    "gpus",
    "gpu_source",
    "maintenance",
    "context_length",
    "num_parallel",
    "prometheus_match",
    "ollama_log",
    "max_loaded_models",
)
_GPU = ("name", "vram")
_OLLAMA_LOG = ("file", "command")
_PRIORITY = ("name", "num_ctx", "keep_alive")
_PROMETHEUS = ("url", "template", "total_query", "used_query", "max_age")
_OPTIMIZER = (
    "cooldown_seconds",
    "cooldown_max_seconds",
    "max_loads_per_node",
    "load_timeout",
    "webhook_auth",
    "protect_reads",
)
_PROXY = (
    "refresh_interval",
    "wait_for_gpu",
    "retries",
    "max_body",
    "read_timeout",
    "optimizer_url",
    "auth",
    "weights",
    "max_queue",
    "max_queue_seconds",
)
_DEMAND = (
    "placement",
    "proxy_url",
    "window",
    "interval",
    "min_requests_per_minute",
    "min_gain",
    "keep_alive",
    "prewarm_queue",
)
_WEIGHTS = ("residency", "queue", "latency", "affinity", "speed")
_BEARER = ("bearer_token", "bearer_token_env", "bearer_token_file")
_AUTH = (
    "bearer_token",
    "bearer_token_env",
    "bearer_token_file",
    "username",
    "password",
    "password_env",
    "password_file",
)


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already-parsed YAML document."""
    r = _Reader(source)
    if data is None:
        raise r.fail("", "the file is empty; it needs at least `nodes:`")
    raw = r.mapping(data, "", _TOP)
    if "nodes" not in raw:
        raise r.fail("nodes", "missing: list the Ollama nodes, e.g. `- http://localhost:11434`")
    nodes = _nodes(r, raw["nodes"])
    priorities = _priorities(r, raw.get("priority_models") or [])
    margin = raw.get("vram_safety_margin")
    if margin is not None:
        margin = r.number(margin, "vram_safety_margin", maximum=math.inf)
        if not 0 < margin <= 1:
            raise r.fail("vram_safety_margin", f"expected a fraction in (0, 1], got {show(margin)}")
    sizes_raw = raw.get("model_sizes") or {}
    if not isinstance(sizes_raw, dict):
        raise r.fail("model_sizes", f"expected a mapping of model name to size, got {show(sizes_raw)}")
    model_sizes: dict[str, int] = {}
    for name, value in sizes_raw.items():
        path = _join("model_sizes", show_key(name))
        model_sizes[model_key(r.name(name, path))] = r.size(value, path)
    prometheus = _prometheus(r, raw)
    if any(n.gpu_source == "prometheus" for n in nodes) and not prometheus.url:
        raise r.fail("prometheus_url", "required when a node has gpu_source: prometheus")
    level = raw.get("log_level", "INFO")
    actions_log = raw.get("actions_log")
    return Config(
        nodes=nodes,
        priority_models=priorities,
        check_interval=float(r.number(raw.get("check_interval", 300), "check_interval", maximum=DAY)),
        vram_safety_margin=float(margin) if margin is not None else None,
        auto_optimize=r.boolean(raw.get("auto_optimize", True), "auto_optimize"),
        log_level=r.choice(level.upper() if isinstance(level, str) else level, "log_level", LOG_LEVELS),
        model_sizes=MappingProxyType(model_sizes),
        request_timeout=_seconds(r, raw.get("request_timeout", 2.0), "request_timeout", maximum=HOUR),
        prometheus=prometheus,
        optimizer=_optimizer(r, raw.get("optimizer") or {}),
        proxy=_proxy(r, raw.get("proxy") or {}),
        demand=_demand(r, raw.get("demand") or {}),
        actions_log=os.path.expanduser(r.string(actions_log, "actions_log")) if actions_log is not None else None,
        source=source,
    )


def _seconds(r: _Reader, value: Any, path: str, maximum: float = DAY) -> float:
    return float(r.number(value, path, positive=True, maximum=maximum))


def _nodes(r: _Reader, value: Any) -> tuple[NodeConfig, ...]:
    if not isinstance(value, list) or not value:
        raise r.fail("nodes", f"expected a non-empty list of node URLs or mappings, got {show(value)}")
    nodes = tuple(_node(r, item, f"nodes[{i}]") for i, item in enumerate(value))
    for attr, same in (("name", str), ("url", identity)):
        seen: dict[str, int] = {}
        for i, node in enumerate(nodes):
            key = same(getattr(node, attr))
            if key in seen:
                shown = show(getattr(node, attr))
                raise r.fail(f"nodes[{i}].{attr}", f"duplicate {attr} {shown} (also nodes[{seen[key]}])")
            seen[key] = i
    return nodes


def _node(r: _Reader, item: Any, path: str) -> NodeConfig:
    if isinstance(item, str):
        url = r.url(item, path)
        return NodeConfig(name=_default_name(url), url=url)
    raw = r.mapping(item, path, _NODE)
    if "url" not in raw:
        raise r.fail(_join(path, "url"), "missing: every node needs its Ollama URL")
    url = r.url(raw["url"], _join(path, "url"))
    vram = r.size(raw["vram"], _join(path, "vram")) if raw.get("vram") is not None else None
    gpus = _gpus(r, raw.get("gpus"), _join(path, "gpus"))
    if gpus and vram is not None:
        raise r.fail(path, "give either vram or gpus, not both")
    source = r.choice(raw.get("gpu_source", "auto"), _join(path, "gpu_source"), GPU_SOURCES)
    if source == "static" and vram is None and not gpus:
        raise r.fail(_join(path, "gpu_source"), "static needs vram or gpus on the node")
    ctx = raw.get("context_length")
    if ctx is not None:
        ctx = int(r.number(ctx, _join(path, "context_length"), minimum=1, maximum=MAX_CONTEXT, integer=True))
    parallel = r.number(
        raw.get("num_parallel", 1), _join(path, "num_parallel"), minimum=1, maximum=MAX_PARALLEL, integer=True
    )
    match = raw.get("prometheus_match")
    most = raw.get("max_loaded_models")
    if most is not None:
        most = int(r.number(most, _join(path, "max_loaded_models"), minimum=1, maximum=MAX_PARALLEL, integer=True))
    log = _ollama_log(r, raw.get("ollama_log"), _join(path, "ollama_log"))
    if source == "ollama_log" and log is None:
        raise r.fail(_join(path, "ollama_log"), "missing: gpu_source ollama_log reads {file: PATH} or {command: …}")
    if log is not None and source != "ollama_log":
        raise r.fail(_join(path, "ollama_log"), f"only read with gpu_source: ollama_log (this node has {source})")
    return NodeConfig(
        name=r.name(raw["name"], _join(path, "name")) if "name" in raw else _default_name(url),
        url=url,
        vram=vram,
        gpus=gpus,
        gpu_source=source,
        maintenance=r.boolean(raw.get("maintenance", False), _join(path, "maintenance")),
        context_length=ctx,
        num_parallel=int(parallel),
        prometheus_match=r.string(match, _join(path, "prometheus_match")) if match is not None else None,
        ollama_log=log,
        max_loaded_models=most,
    )


def _ollama_log(r: _Reader, value: Any, path: str) -> OllamaLogSource | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise r.fail(path, f'expected {{file: PATH}} or {{command: "journalctl -u ollama …"}}, got {show(value)}')
    raw = r.mapping(value, path, _OLLAMA_LOG)
    given = [key for key in _OLLAMA_LOG if raw.get(key) is not None]
    if len(given) != 1:
        raise r.fail(path, "give exactly one of file or command")
    key = _join(path, given[0])
    text = r.string(raw[given[0]], key)
    if "\0" in text:  # no path or argument can hold one: the read would fail on every poll
        raise r.fail(key, f"holds a NUL character (\\0): {show(text)}")
    if given == ["file"]:
        return OllamaLogSource(file=os.path.expanduser(text))
    try:
        return OllamaLogSource(command=tuple(shlex.split(text)))
    except ValueError as exc:
        raise r.fail(key, f"cannot split {show(text)} into words: {exc}") from None


def _gpus(r: _Reader, value: Any, path: str) -> tuple[GpuSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise r.fail(path, f"expected a list like [{{name: RTX 3070, vram: 8GiB}}], got {show(value)}")
    specs = []
    for i, item in enumerate(value):
        raw = r.mapping(item, f"{path}[{i}]", _GPU)
        if "vram" not in raw:
            raise r.fail(f"{path}[{i}].vram", "missing: the GPU's memory, e.g. 8GiB")
        name = r.name(raw["name"], f"{path}[{i}].name") if "name" in raw else f"GPU {i}"
        specs.append(GpuSpec(name=name, vram=r.size(raw["vram"], f"{path}[{i}].vram")))
    return tuple(specs)


def _default_name(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _priorities(r: _Reader, value: Any) -> tuple[PriorityModel, ...]:
    if not isinstance(value, list):
        raise r.fail("priority_models", f"expected a list of model names or mappings, got {show(value)}")
    models = []
    for i, item in enumerate(value):
        path = f"priority_models[{i}]"
        if isinstance(item, str):
            models.append(PriorityModel(name=r.name(item, path)))
            continue
        raw = r.mapping(item, path, _PRIORITY)
        if "name" not in raw:
            raise r.fail(_join(path, "name"), "missing: the model's name, e.g. llama3.1:latest")
        ctx = raw.get("num_ctx")
        models.append(
            PriorityModel(
                name=r.name(raw["name"], _join(path, "name")),
                num_ctx=(
                    int(r.number(ctx, _join(path, "num_ctx"), minimum=1, maximum=MAX_CONTEXT, integer=True))
                    if ctx is not None
                    else None
                ),
                keep_alive=r.keep_alive(raw.get("keep_alive", -1), _join(path, "keep_alive")),
            )
        )
    seen: dict[str, int] = {}
    for i, model in enumerate(models):
        key = model_key(model.name)
        if key in seen:
            raise r.fail(f"priority_models[{i}]", f"duplicate model {show(model.name)} (also [{seen[key]}])")
        seen[key] = i
    return tuple(models)


def _prometheus(r: _Reader, raw: dict[str, Any]) -> PrometheusSource:
    section = raw.get("prometheus") or {}
    block = r.mapping(section, "prometheus", _PROMETHEUS)
    url = raw.get("prometheus_url", block.get("url"))
    if raw.get("prometheus_url") is not None and block.get("url") is not None:
        raise r.fail("prometheus.url", "give prometheus_url or prometheus.url, not both")
    template = r.choice(block.get("template", "dcgm"), "prometheus.template", PROMETHEUS_TEMPLATES)
    total = block.get("total_query")
    used = block.get("used_query")
    if template == "custom" and (total is None or used is None):
        raise r.fail("prometheus", "template custom needs total_query and used_query")
    return PrometheusSource(
        url=r.url(url, "prometheus_url") if url is not None else None,
        template=template,
        total_query=r.string(total, "prometheus.total_query") if total is not None else None,
        used_query=r.string(used, "prometheus.used_query") if used is not None else None,
        max_age=_seconds(r, block.get("max_age", 120.0), "prometheus.max_age"),
    )


def _optimizer(r: _Reader, value: Any) -> OptimizerSettings:
    raw = r.mapping(value, "optimizer", _OPTIMIZER)
    auth_raw = r.mapping(raw.get("webhook_auth") or {}, "optimizer.webhook_auth", _AUTH)
    path = "optimizer.webhook_auth"
    token = r.secret(auth_raw, "bearer_token", path)
    password = r.secret(auth_raw, "password", path)
    username = auth_raw.get("username")
    if (username is None) != (password is None):
        raise r.fail(path, "basic auth needs both username and password (or password_env/password_file)")
    if token is not None and username is not None:
        raise r.fail(path, "give a bearer token or basic-auth credentials, not both")
    cooldown = _seconds(r, raw.get("cooldown_seconds", 30.0), "optimizer.cooldown_seconds")
    cooldown_max = _seconds(r, raw.get("cooldown_max_seconds", 900.0), "optimizer.cooldown_max_seconds")
    if cooldown_max < cooldown:
        raise r.fail("optimizer.cooldown_max_seconds", f"expected ≥ cooldown_seconds ({cooldown:g})")
    loads = r.number(
        raw.get("max_loads_per_node", 1), "optimizer.max_loads_per_node", minimum=1, maximum=MAX_LOADS, integer=True
    )
    protect_reads = r.boolean(raw.get("protect_reads", False), "optimizer.protect_reads")
    if protect_reads and token is None and username is None:
        raise r.fail("optimizer.protect_reads", "needs credentials in optimizer.webhook_auth to demand")
    return OptimizerSettings(
        cooldown_seconds=cooldown,
        cooldown_max_seconds=cooldown_max,
        max_loads_per_node=int(loads),
        load_timeout=_seconds(r, raw.get("load_timeout", 300.0), "optimizer.load_timeout"),
        webhook_auth=WebhookAuth(
            bearer_token=token,
            username=r.string(username, f"{path}.username") if username is not None else None,
            password=password,
        ),
        protect_reads=protect_reads,
    )


def _proxy(r: _Reader, value: Any) -> ProxySettings:
    raw = r.mapping(value, "proxy", _PROXY)
    auth = r.mapping(raw.get("auth") or {}, "proxy.auth", _BEARER)
    weights = r.mapping(raw.get("weights") or {}, "proxy.weights", _WEIGHTS)
    url = raw.get("optimizer_url")
    body = r.size(raw["max_body"], "proxy.max_body") if raw.get("max_body") is not None else ProxySettings.max_body
    if body <= 0:
        raise r.fail("proxy.max_body", f"expected a size > 0, got {show(raw['max_body'])}")
    return ProxySettings(
        refresh_interval=_seconds(r, raw.get("refresh_interval", 2.0), "proxy.refresh_interval", maximum=HOUR),
        wait_for_gpu=float(r.number(raw.get("wait_for_gpu", 30.0), "proxy.wait_for_gpu", maximum=HOUR)),
        retries=int(r.number(raw.get("retries", 2), "proxy.retries", maximum=MAX_RETRIES, integer=True)),
        max_body=body,
        read_timeout=_seconds(r, raw.get("read_timeout", 300.0), "proxy.read_timeout"),
        optimizer_url=r.url(url, "proxy.optimizer_url") if url is not None else None,
        auth=WebhookAuth(bearer_token=r.secret(auth, "bearer_token", "proxy.auth")),
        weights=RouteWeights(**{k: float(r.number(v, f"proxy.weights.{k}", maximum=1000)) for k, v in weights.items()}),
        max_queue=int(r.number(raw.get("max_queue", 64), "proxy.max_queue", maximum=1 << 20, integer=True)),
        max_queue_seconds=_seconds(r, raw.get("max_queue_seconds", 4.0), "proxy.max_queue_seconds", maximum=HOUR),
    )


def _demand(r: _Reader, value: Any) -> DemandSettings:
    raw = r.mapping(value, "demand", _DEMAND)
    url = raw.get("proxy_url")
    d = DemandSettings()
    return DemandSettings(
        placement=r.boolean(raw.get("placement", d.placement), "demand.placement"),
        proxy_url=r.url(url, "demand.proxy_url") if url is not None else None,
        window=_seconds(r, raw.get("window", d.window), "demand.window"),
        interval=_seconds(r, raw.get("interval", d.interval), "demand.interval", maximum=HOUR),
        min_requests_per_minute=float(
            r.number(
                raw.get("min_requests_per_minute", d.min_requests_per_minute),
                "demand.min_requests_per_minute",
                maximum=1e9,
            )
        ),
        min_gain=float(r.number(raw.get("min_gain", d.min_gain), "demand.min_gain", maximum=100)),
        keep_alive=r.keep_alive(raw.get("keep_alive", d.keep_alive), "demand.keep_alive"),
        prewarm_queue=float(r.number(raw.get("prewarm_queue", d.prewarm_queue), "demand.prewarm_queue", maximum=1e6)),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file; raises ConfigError with a one-line message."""
    path = Path(path)
    source = str(path.absolute())  # the full path in every message: the operator sees which file is wrong
    try:
        data = read_yaml(path, source)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return parse_config(data, source)


def find_config(explicit: str | Path | None) -> Path:
    """The file to use: the one given, else ./gpu_router_config.yaml, else /etc/gpu-router/config.yaml."""
    if explicit is not None:
        return Path(explicit)
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    raise ConfigError(
        "no configuration: give --config PATH, or create ./gpu_router_config.yaml or /etc/gpu-router/config.yaml"
    )
