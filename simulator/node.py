"""One simulated Ollama node: its installed models, scheduler, faults and HTTP server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpurouter.logfmt import log_event
from simulator import catalog, eras, serverlog
from simulator.catalog import ModelSpec
from simulator.faults import FAULTS, ONE_SHOT, check_fault
from simulator.fleet import NodeSpec, display_name
from simulator.gotypes import go_time
from simulator.httpserver import App, HttpServer
from simulator.options import merge_options
from simulator.placer import placer_for
from simulator.scheduler import Clock, LoadRequest, Scheduler, SchedulerError, log

SHORT_WAIT = 0.1  # seconds: waits up to this long are plain sleeps (see SimNode.sleep)


@dataclass(frozen=True)
class Installed:
    """A model in the node's store, as /api/tags lists it."""

    name: str
    spec: ModelSpec
    modified_at: float  # epoch seconds


class Traffic:
    """Generation requests of a node: how many are in progress (queued for a slot or streaming) and how each
    ended: served (final chunk sent), failed (an error), cancelled (the client went away first)."""

    OUTCOMES = ("served", "failed", "cancelled")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._ended = dict.fromkeys(self.OUTCOMES, 0)

    def begin(self) -> None:
        with self._lock:
            self._active += 1

    def end(self, outcome: str) -> None:
        with self._lock:
            self._active -= 1
            self._ended[outcome] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"active": self._active, **self._ended}


class SimNode:
    """A node of the fleet. Thread-safe; `state()` is what the control server reports for it."""

    def __init__(
        self,
        spec: NodeSpec,
        api: Callable[[SimNode], App],
        clock: Clock = time.time,
        log_path: Path | None = None,
    ) -> None:
        """`api` builds the HTTP API that serves this node (simulator.api.OllamaApi)."""
        self.spec = spec
        self.log_path = log_path  # the server log it appends to at every start, if any
        self.clock = clock
        self.version = eras.version_tuple(spec.version)
        self.era = eras.era_of(spec.version)
        self.scheduler = Scheduler(
            spec.gpus,
            spec.ram,
            max_loaded=spec.max_loaded,
            num_parallel=spec.num_parallel,
            max_queue=spec.max_queue,
            queue_all=self.version < (0, 11, 5),
            gpu_overhead=spec.gpu_overhead,
            load_speed=spec.load_speed,
            keep_alive=spec.keep_alive,
            placer=placer_for(spec.version, spec.gpu_overhead),
            clock=clock,
            node=spec.name,
        )
        pulled = clock() - 86400.0
        self.installed = tuple(
            Installed(name, catalog.find(name), pulled - 3600.0 * i - 0.123456 * (i + 1))  # type: ignore[arg-type]
            for i, name in enumerate(spec.models)
        )  # listed first = pulled last = newest
        self._faults: dict[str, dict[str, int]] = {}
        self.traffic = Traffic()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = HttpServer(api(self), spec.port, name=f"ollama-{spec.name}")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> None:
        """Serve, then load the preloaded models (instantly). OSError if the port is taken; ValueError on a
        preload that cannot load."""
        self._server.open()
        self._log_start()
        for preload in self.spec.preload:
            installed = self.resolve(preload.model)
            assert installed is not None  # checked with the fleet file
            options = merge_options(
                self.spec.default_context,
                installed.spec.default_num_ctx,
                preload.options,
                node_ctx_set=self.spec.context_length is not None,
            )
            request = LoadRequest(installed.name, installed.spec, options, preload.keep_alive)
            try:
                runner = self.scheduler.acquire(request, instant=True)
            except SchedulerError as exc:
                raise ValueError(f"node {self.name}: preload {preload.model}: {exc}") from None
            self.scheduler.release(runner)

    def stop(self) -> None:
        """Wake every waiting request, close the server and its connections."""
        self._stopping.set()
        self.scheduler.close()
        self._server.close()

    def sleep(self, seconds: float) -> bool:
        """Wait, unless the node stops first (then False). A short wait (a token's time) is a plain sleep, half
        the CPU of an event's timed wait when a thousand requests generate at once; a stop then shows at its end."""
        if seconds <= SHORT_WAIT:
            time.sleep(max(0.0, seconds))
            return not self._stopping.is_set()
        return not self._stopping.wait(seconds)

    def resolve(self, name: str) -> Installed | None:
        """The installed model a request names (its tag defaults to `latest`), as Ollama resolves it: a tag
        that is not installed is not found, even when another tag of the same model is."""
        wanted = display_name(name)
        return next((m for m in self.installed if m.name == wanted), None)

    def _log_start(self) -> None:
        if self.log_path is not None:
            lines = serverlog.start_lines(self.spec, self.version, self.scheduler.gpu_usage(), self.url, self.clock())
            serverlog.append_lines(self.log_path, lines)

    # -- faults

    def faults(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {name: dict(params) for name, params in self._faults.items()}

    def inject(self, fault: str, **params: object) -> dict[str, dict[str, int]]:
        """Start a fault (ValueError if unknown or its parameters are wrong); returns the node's faults."""
        fault, checked = check_fault(fault, params)
        log_event(log, logging.WARNING, "simulator.fault", node=self.spec.name, fault=fault, outcome="set", **checked)
        if fault not in ONE_SHOT:
            with self._lock:
                self._faults[fault] = checked
        if fault == "restart":
            self.scheduler.unload_all()
            self._log_start()
        elif fault == "down":
            self._server.close()
        elif fault == "gpu_lost":
            self.scheduler.set_gpu_lost(True)
        elif fault == "vram_hog":
            self.scheduler.set_hog(checked["bytes"])
        return self.faults()

    def clear(self, fault: str | None = None) -> dict[str, dict[str, int]]:
        """End one fault, or all; a down node listens again on the same port. Returns the node's faults."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of: {', '.join(FAULTS)}")
        with self._lock:
            names = list(self._faults) if fault is None else [fault]
            ended = [name for name in names if self._faults.pop(name, None) is not None]
        for name in ended:
            log_event(log, logging.INFO, "simulator.fault", node=self.spec.name, fault=name, outcome="cleared")
        if "down" in names and not self._stopping.is_set():
            self._server.open()
        if "gpu_lost" in names:
            self.scheduler.set_gpu_lost(False)
        if "vram_hog" in names:
            self.scheduler.set_hog(0)
        return self.faults()

    # -- views

    def counts(self) -> dict[str, dict[str, int]]:
        return self.scheduler.counts()

    def state(self) -> dict:
        """Name, URL, faults, GPUs (bytes), loaded models (with their slots, queue and prompt tokens), load/unload
        counts, generation requests, requests waiting for a load, and prompt tokens cached and computed."""
        return {
            "name": self.name,
            "url": self.url,
            "faults": self.faults(),
            "gpus": [
                {"index": g.index, "name": g.name, "total": g.total, "used": g.used, "free": g.free}
                for g in self.scheduler.gpu_usage()
            ],
            "loaded": [
                {
                    "model": v.name,
                    "size": v.size,
                    "size_vram": v.size_vram,
                    "context_length": v.context_length,
                    "expires_at": go_time(v.expires_at),
                    "busy": v.busy,
                    "loading": v.loading,
                    **v.slots,
                }
                for v in self.scheduler.snapshot()
            ],
            "counts": self.counts(),
            "requests": self.traffic.counts(),
            "pending_loads": self.scheduler.pending(),
            "prompt_tokens": self.scheduler.prompt_counters.as_dict(),
        }
