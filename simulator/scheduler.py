"""One node's model scheduler, after Ollama's server/sched.go.

Where a model goes is the era's `Placer` (simulator.placer: classic, layout or llama-server); decisions
are pure functions (`free_per_gpu`, `pick_victim`); `Scheduler` keeps the runners under one lock: loads are
serialized, a placer that needs room gets idle runners evicted (shortest keep_alive first), keep_alive expires
lazily on every call (an expired idle runner is never reported), and in-flight requests hold a runner by
refcount. In the llama-server era an out-of-memory start is retried as Ollama does (§2.5): with a smaller
context when the context was automatic, else after evicting every other runner, else it fails with 500.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from gpurouter.logfmt import log_event
from gpurouter.units import MIB
from simulator import eras
from simulator.catalog import ModelSpec, effective_ctx
from simulator.fleet import GpuSpec
from simulator.gotypes import human_bytes2
from simulator.options import RunnerOptions
from simulator.placer import Choice, ClassicPlacer, OutOfMemory, Placer
from simulator.slots import PromptCounters, Slots

log = logging.getLogger("gpu_router.simulator")

Clock = Callable[[], float]
_TICK = 0.05  # seconds between re-checks while waiting (expiry is lazy, so waits poll)


class SchedulerError(Exception):
    """A request the scheduler cannot serve, with the HTTP status Ollama answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LoadRequest:
    name: str  # the name /api/ps shows for the runner
    spec: ModelSpec
    options: RunnerOptions
    keep_alive: float | None  # seconds; None = not given (sticky, or the node default at load)


MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"  # ErrMaxQueue (two spaces, sic)
SERIAL_FAMILIES = frozenset(
    ("mllama", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen3next", "lfm2", "lfm2moe", "nemotron_h",
     "nemotron_h_moe", "nemotron_h_omni")
)  # fmt: skip  # architectures Ollama loads with one slot (server/sched.go, ollama#4165)


def parallel_for(spec: ModelSpec, num_parallel: int) -> int:
    """The slots a runner of `spec` gets: OLLAMA_NUM_PARALLEL, but 1 for a model without completion (an
    embedding model) and for the families Ollama forces to 1."""
    if "completion" not in spec.capabilities or spec.family in SERIAL_FAMILIES:
        return 1
    return max(1, num_parallel)


OOM_STARTUP = (
    "llama-server process has terminated: exit status 1: ggml_backend_cuda_buffer_type_alloc_buffer: "
    "allocating {mib:.2f} MiB on device 0: cudaMalloc failed: out of memory"
)


class Runner:
    """A loaded (or loading) model. Mutable; every field is guarded by the scheduler's lock."""

    def __init__(
        self, request: LoadRequest, choice: Choice, session: float, counters: PromptCounters | None = None
    ) -> None:
        self.name = request.name
        self.spec = request.spec
        self.options = request.options
        self.size = choice.size
        self.size_vram = choice.size_vram
        self.per_gpu = dict(choice.per_gpu)
        self.layers = (choice.layers, choice.total_layers)
        self.context_length = effective_ctx(request.spec.arch, request.options.num_ctx)
        self.session = session
        self.expires_at: float | None = None  # set when the last request finishes
        self.refcount = 0
        self.loading = True
        self.alive = True
        self.evicting = False
        self.slots = Slots(choice.parallel, counters)  # a reload makes a new runner: the cache is lost


@dataclass(frozen=True)
class RunnerView:
    """A runner as /api/ps and the control server report it."""

    name: str
    spec: ModelSpec
    size: int
    size_vram: int
    context_length: int
    expires_at: float
    busy: int
    loading: bool
    slots: dict  # Slots.state(): each slot's cached tokens, the queue for a slot, the prompt token counters


@dataclass(frozen=True)
class GpuUsage:
    index: int
    name: str
    total: int
    used: int  # runners' VRAM plus memory held by other processes
    free: int


def used_per_gpu(count: int, runners: Sequence[Runner], hog: int = 0) -> list[int]:
    """Bytes in use per GPU: Σ VRAM of the runners on it, plus other processes' memory on GPU 0."""
    used = [0] * count
    for runner in runners:
        for g, size in runner.per_gpu.items():
            used[g] += size
    if used:
        used[0] += hog
    return used


def free_per_gpu(totals: Sequence[int], runners: Sequence[Runner], hog: int = 0) -> list[int]:
    """Free bytes per GPU as the scheduler sees them: total − used, not below 0."""
    return [max(0, t - u) for t, u in zip(totals, used_per_gpu(len(totals), runners, hog), strict=True)]


def pick_victim(runners: Sequence[Runner]) -> Runner | None:
    """findRunnerToUnload: by keep_alive ascending (forever last), the first idle one, else the shortest."""
    ordered = sorted(runners, key=lambda r: r.session)
    idle = [r for r in ordered if r.refcount == 0 and not r.loading]
    return idle[0] if idle else (ordered[0] if ordered else None)


class Scheduler:
    """The runners of one node; thread-safe. `clock` gives epoch seconds (injectable for tests)."""

    def __init__(
        self,
        gpus: Sequence[GpuSpec],
        ram: int,
        *,
        max_loaded: int,
        num_parallel: int = 1,
        max_queue: int = 512,
        queue_all: bool = False,
        gpu_overhead: int = 0,
        load_speed: int = 0,
        keep_alive: float = 300.0,
        placer: Placer | None = None,
        clock: Clock = time.time,
        node: str = "",
    ) -> None:
        self.node = node  # the node's name in its log lines
        self._gpus = tuple(gpus)
        self.placer = placer or ClassicPlacer(gpu_overhead)
        self._ram = ram
        self._max_loaded = max_loaded
        self._num_parallel = num_parallel
        self._max_queue = max_queue
        self._queue_all = queue_all  # ≤ v0.11.4: every request passes the pending queue, not only loads
        self._pending = 0  # requests waiting for a load (or, with queue_all, for the scheduler)
        self.prompt_counters = PromptCounters()  # prompt tokens cached and computed, all runners since start
        self._load_speed = load_speed
        self._keep_alive = keep_alive
        self._clock = clock
        self._cond = threading.Condition()
        self._runners: list[Runner] = []  # in load order
        self._loading = False  # the node's one load slot: loads are serialized
        self._gpu_lost = False
        self._hog = 0
        self._closed = threading.Event()
        self._counts: dict[str, dict[str, int]] = {}

    # -- requests

    def acquire(self, request: LoadRequest, instant: bool = False) -> Runner:
        """Attach a request to a runner of its model, loading (or reloading) it first; blocks until ready.

        Raises SchedulerError (500 for memory or a runner lost while loading, 503 when shutting down or when
        more than `max_queue` requests already wait for a load).
        """
        with self._cond:
            self._check_open()
            self._reap()
            runner = self._usable(request)
            if runner is not None and not self._queue_all:
                return self._attach(runner, request.keep_alive)
            if self._pending >= self._max_queue:
                raise SchedulerError(503, MAX_QUEUE)
            self._pending += 1
            try:
                while True:
                    self._check_open()
                    self._reap()
                    runner = self._usable(request)
                    if runner is not None:
                        return self._attach(runner, request.keep_alive)
                    if not self._loading and not self._loading_same(request):
                        self._loading = True
                        break
                    self._cond.wait(_TICK)
            finally:
                self._pending -= 1
        try:
            return self._load(request, instant)
        finally:
            with self._cond:
                self._loading = False
                self._cond.notify_all()

    def release(self, runner: Runner) -> None:
        """A request finished: at refcount 0 the keep_alive starts (or the runner goes, if it is 0)."""
        with self._cond:
            runner.refcount -= 1
            if runner.refcount == 0 and runner.alive:
                if runner.session <= 0:
                    self._unload(runner, "keep_alive")
                else:
                    runner.expires_at = self._clock() + runner.session
            self._cond.notify_all()

    def serving(self, runner: Runner) -> bool:
        """Whether the runner and the server are still there (a request waiting for a slot gives up if not)."""
        return runner.alive and not self._closed.is_set()

    def expire(self, spec: ModelSpec) -> None:
        """An unload request: expires_at = now, and the runner goes as soon as no request uses it."""
        with self._cond:
            runner = self._find(spec)
            if runner is not None:
                runner.expires_at = self._clock()
                runner.session = 0
                if runner.refcount == 0 and not runner.loading:
                    self._unload(runner, "keep_alive")

    # -- faults

    def unload_all(self) -> None:
        """Every runner gone at once (a restart), loading or busy ones included."""
        with self._cond:
            for runner in list(self._runners):
                self._unload(runner, "restart")

    def set_gpu_lost(self, lost: bool) -> None:
        """GPUs vanish (runners holding VRAM die; later loads go to CPU) or come back."""
        with self._cond:
            self._gpu_lost = lost
            if lost:
                for runner in [r for r in self._runners if r.size_vram > 0]:
                    self._unload(runner, "gpu_lost")

    def set_hog(self, size: int) -> None:
        """Another process holds `size` bytes of GPU 0."""
        with self._cond:
            self._hog = size
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiting request and refuse new ones."""
        self._closed.set()
        with self._cond:
            self._cond.notify_all()

    # -- views

    def snapshot(self) -> list[RunnerView]:
        """Loaded runners as /api/ps lists them: expired idle ones reaped first, longest expiry first."""
        with self._cond:
            self._reap()
            now = self._clock()
            views = [
                RunnerView(
                    name=r.name,
                    spec=r.spec,
                    size=r.size,
                    size_vram=r.size_vram,
                    context_length=r.context_length,
                    expires_at=r.expires_at if r.expires_at is not None else now + r.session,
                    busy=r.refcount,
                    loading=r.loading,
                    slots=r.slots.state(),
                )
                for r in self._runners
            ]
        return sorted(views, key=lambda v: -int(v.expires_at))

    def gpu_usage(self) -> list[GpuUsage]:
        """Per GPU: total, used (runners + other processes), free; empty while the GPUs are lost."""
        with self._cond:
            self._reap()
            if self._gpu_lost:
                return []
            used = used_per_gpu(len(self._gpus), self._runners, self._hog)
        return [
            GpuUsage(i, g.name, g.vram, min(g.vram, u), max(0, g.vram - u))
            for i, (g, u) in enumerate(zip(self._gpus, used, strict=True))
        ]

    def pending(self) -> int:
        """Requests waiting for a load now (those OLLAMA_MAX_QUEUE bounds)."""
        with self._cond:
            return self._pending

    def counts(self) -> dict[str, dict[str, int]]:
        """Loads and unloads per model name since start."""
        with self._cond:
            return {name: dict(c) for name, c in self._counts.items()}

    # -- internals (lock held)

    def _reloads(self, runner: Runner, request: LoadRequest) -> bool:
        if self.placer.era != eras.LLAMA_SERVER:
            return runner.options.needs_reload(request.options)
        trained = request.spec.arch.context_length
        new = replace(request.options, num_ctx=min(request.options.num_ctx, trained))
        return replace(runner.options, num_ctx=runner.context_length).needs_reload(new, measured=True)

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise SchedulerError(503, "server shutting down")

    def _find(self, spec: ModelSpec) -> Runner | None:
        return next((r for r in self._runners if r.spec is spec), None)

    def _usable(self, request: LoadRequest) -> Runner | None:
        """The loaded runner of the model that serves this request as it is (no load, no reload), if any."""
        runner = self._find(request.spec)
        if runner is None or runner.evicting or runner.loading or self._reloads(runner, request):
            return None
        return runner

    def _loading_same(self, request: LoadRequest) -> bool:
        """A runner of the model is loading with the options this request needs (wait for it, load nothing)."""
        runner = self._find(request.spec)
        return runner is not None and runner.loading and not runner.evicting and not self._reloads(runner, request)

    def _attach(self, runner: Runner, keep_alive: float | None) -> Runner:
        runner.refcount += 1
        if keep_alive is not None:
            runner.session = keep_alive
        return runner

    def _count(self, name: str, what: str) -> None:
        self._counts.setdefault(name, {"loads": 0, "unloads": 0})[what] += 1

    def _unload(self, runner: Runner, why: str) -> None:
        """Remove a runner; `why`: keep_alive (expired or asked), evicted, restart or gpu_lost."""
        runner.alive = False
        self._runners.remove(runner)
        self._count(runner.name, "unloads")
        log_event(log, logging.INFO, "simulator.unload", node=self.node, model=runner.name, reason=why)
        self._cond.notify_all()

    def _reap(self) -> None:
        now = self._clock()
        for r in list(self._runners):
            expired = r.session <= 0 or (r.expires_at is not None and r.expires_at <= now)
            if r.refcount == 0 and not r.loading and expired:
                self._unload(r, "keep_alive")

    def _evict(self, victim: Runner) -> None:
        """Unload an idle victim now, or mark a busy one to go when its requests finish, and wait."""
        if victim.refcount == 0 and not victim.loading:
            self._unload(victim, "evicted")
            return
        victim.session = 0
        victim.evicting = True
        self._cond.wait(_TICK)

    def _fit(self, request: LoadRequest) -> Runner | None:
        """A new runner where the placer puts the model now, or None if something must be evicted first;
        OutOfMemory from the placer passes through."""
        gpus = () if self._gpu_lost else self._gpus
        free = free_per_gpu([g.vram for g in gpus], self._runners, self._hog)
        parallel = parallel_for(request.spec, self._num_parallel)
        choice = self.placer.place(request.spec, request.options, free, parallel, len(self._runners))
        if choice is None:
            return None
        system = choice.size - choice.size_vram
        available = self._ram - sum(r.size - r.size_vram for r in self._runners)
        if system > available:
            if self._runners:
                return None
            raise self._refused(
                request,
                f"model requires more system memory ({human_bytes2(system)}) "
                f"than is available ({human_bytes2(max(0, available))})",
            )
        session = self._keep_alive if request.keep_alive is None else request.keep_alive
        return Runner(request, choice, session, self.prompt_counters)

    def _refused(self, request: LoadRequest, message: str) -> SchedulerError:
        """The 500 out-of-memory answer to a load, logged."""
        log_event(log, logging.WARNING, "simulator.oom", node=self.node, model=request.name, error=message)
        return SchedulerError(500, message)

    def _out_of_memory(self, request: LoadRequest, failed: OutOfMemory, retried: set[str]) -> LoadRequest:
        """Ollama's answer to an out-of-memory start (§2.5): one retry — with the next smaller context when the
        context was automatic, and after evicting every other runner when any is loaded — else SchedulerError."""
        options = request.options
        smaller = 32768 if options.num_ctx > 32768 else 4096
        shrink = options.auto_ctx and smaller < min(options.num_ctx, request.spec.arch.context_length)
        if "once" in retried or not (shrink or self._runners):
            raise self._refused(request, OOM_STARTUP.format(mib=failed.needed / MIB))
        retried.add("once")
        for runner in list(self._runners):
            self._evict(runner)
        return replace(request, options=replace(options, num_ctx=smaller)) if shrink else request

    def _load(self, request: LoadRequest, instant: bool) -> Runner:
        retried: set[str] = set()
        with self._cond:
            while True:
                self._check_open()
                self._reap()
                old = self._find(request.spec)
                if old is not None:
                    self._evict(old)  # a reload: the old runner goes first
                    continue
                if len(self._runners) >= self._max_loaded:
                    self._evict(pick_victim(self._runners))  # type: ignore[arg-type]
                    continue
                if "once" in retried and self._runners:
                    self._cond.wait(_TICK)  # evicting every other runner after an out-of-memory start
                    continue
                try:
                    runner = self._fit(request)
                except OutOfMemory as failed:
                    request = self._out_of_memory(request, failed, retried)
                    continue
                if runner is not None:
                    break
                self._evict(pick_victim(self._runners))  # type: ignore[arg-type]
            self._runners.append(runner)
            self._count(runner.name, "loads")
        if not instant and self._load_speed > 0:
            self._closed.wait(runner.size / self._load_speed)
        with self._cond:
            self._check_open()
            if not runner.alive:
                raise SchedulerError(500, "llama runner process has terminated: signal: killed")
            runner.loading = False
            runner.refcount += 1
            self._cond.notify_all()
        log_event(
            log,
            logging.INFO,
            "simulator.load",
            node=self.node,
            model=runner.name,
            size=runner.size,
            size_vram=runner.size_vram,
            num_ctx=runner.context_length,
        )
        return runner
