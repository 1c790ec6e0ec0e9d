"""Start and stop a simulated fleet: in-process (`Fleet`) or as `gpu-router simulate` (`serve`, `main`)."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from gpurouter import logfmt
from gpurouter.cluster.config import model_key
from simulator.api import OllamaApi
from simulator.control import ControlApi
from simulator.fleet import FleetSpec, fleet_from_dict, load_fleet
from simulator.httpserver import HttpServer
from simulator.node import SimNode
from simulator.scheduler import Clock

__all__ = ["DEMO_FLEET", "DEMO_PRIORITY", "Fleet", "add_arguments", "fleet_from_dict", "load_fleet", "main", "serve"]
DEMO_FLEET = Path(__file__).with_name("demo-fleet.yaml")
SWITCH_INTERVAL = 0.05  # seconds a busy thread keeps the GIL in the simulator's own process (bench/simulator_load.py)
DEMO_PRIORITY = ("mxbai-embed-large", "llama3.1:latest")  # the guide's priority models (the demo's too)


def router_config(spec: FleetSpec, urls: Mapping[str, str]) -> dict[str, Any]:
    """A router configuration for a running fleet: static capacity as its nodes declare it, and the guide's
    priority models that some node has installed."""
    nodes: list[dict[str, Any]] = []
    installed: set[str] = set()
    for node in spec.nodes:
        entry: dict[str, Any] = {"name": node.name, "url": urls[node.name]}
        if node.gpus:
            entry["gpus"] = [{"name": g.name, "vram": f"{g.vram}B"} for g in node.gpus]
        else:
            entry["vram"] = 0
        nodes.append(entry)
        installed.update(model_key(m) for m in node.models)
    wanted = [m for m in DEMO_PRIORITY if model_key(m) in installed]
    return {"nodes": nodes, "priority_models": wanted}


class Fleet:
    """Every node's Ollama server on 127.0.0.1 plus the control server; a context manager."""

    def __init__(
        self,
        spec: FleetSpec,
        control_port: int | None = None,
        clock: Clock = time.time,
        log_dir: str | Path | None = None,
    ) -> None:
        """`log_dir`: each node appends its server log (what Ollama logs at every start) to DIR/NAME.log."""
        self.spec = spec
        logs = Path(log_dir) if log_dir is not None else None
        self._nodes = {
            n.name: SimNode(n, OllamaApi, clock, logs / f"{n.name}.log" if logs else None) for n in spec.nodes
        }
        port = spec.control_port if control_port is None else control_port
        self._control = HttpServer(ControlApi(self._nodes), port, name="simulator-control")

    @property
    def urls(self) -> dict[str, str]:
        """Node name → "http://127.0.0.1:PORT"."""
        return {name: node.url for name, node in self._nodes.items()}

    @property
    def control_url(self) -> str:
        return self._control.url

    def node(self, name: str) -> SimNode:
        """A node by name (KeyError naming the nodes otherwise)."""
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"unknown node {name!r}; nodes: {', '.join(self._nodes)}") from None

    def start(self) -> Fleet:
        """Open every server (OSError naming the port and the server if a port is taken; ValueError if a
        preload fails); all or nothing."""
        server = ""
        try:
            for node in self._nodes.values():
                server = f"node {node.spec.name}"
                node.start()
            server = "the control server"
            self._control.open()
        except OSError as exc:
            self.stop()
            raise OSError(exc.errno, f"{server}: {exc.strerror or exc}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def router_config(self) -> dict[str, Any]:
        return router_config(self.spec, self.urls)

    def stop(self) -> None:
        """Close every socket and join the server threads."""
        self._control.close()
        for node in self._nodes.values():
            node.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    fleet_path: str, control_port: int | None = None, out: TextIO = sys.stdout, log_dir: str | None = None
) -> int:
    """Run a fleet until SIGINT/SIGTERM: one "NAME URL" line per node, then "control URL", then "config PATH":
    a router configuration for this fleet (removed when the fleet stops), and on stderr the command that uses it.

    Returns 0 after a clean stop, 2 for a bad fleet file, 1 when a server cannot start.
    """
    try:
        fleet = Fleet(load_fleet(fleet_path), control_port, log_dir=log_dir)
    except ValueError as exc:  # the message names the file
        print(f"gpu-router simulate: {exc}", file=sys.stderr)
        return 2
    try:
        fleet.start()
    except ValueError as exc:  # a preload that cannot load: the message names the node and the model
        print(f"gpu-router simulate: {fleet_path}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gpu-router simulate: {fleet_path}: cannot start the fleet: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stopping.set())
    workdir = Path(tempfile.mkdtemp(prefix="gpu-router-simulate-"))
    try:
        config = workdir / "gpu_router_config.yaml"
        config.write_text(yaml.safe_dump(fleet.router_config(), sort_keys=False), encoding="utf-8")
        for name, url in fleet.urls.items():
            print(f"{name} {url}", file=out)
        print(f"control {fleet.control_url}", file=out)
        print(f"config {config}", file=out)
        out.flush()
        print(f"gpu-router simulate: serving until Ctrl-C; try: gpu-router --config {config} status", file=sys.stderr)
        while not stopping.wait(0.5):
            pass
    finally:
        fleet.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--fleet FILE (default: the demo fleet in the package), --control-port N and --log-dir DIR."""
    parser.add_argument(
        "--fleet", default=str(DEMO_FLEET), metavar="FILE", help="fleet file (default: the built-in demo fleet)"
    )
    parser.add_argument(
        "--control-port", type=int, default=None, metavar="N", help="control server port (default: the file's)"
    )
    parser.add_argument(
        "--log-dir", default=None, metavar="DIR", help="each node appends its Ollama server log to DIR/NAME.log"
    )


def main(args: argparse.Namespace) -> int:
    """The simulator's own process: a thousand connection threads waking for their tokens spend half their CPU
    handing the GIL round at Python's default switch interval (5 ms); threads that block hand it on anyway."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    logfmt.setup(logging.INFO)
    return serve(args.fleet, args.control_port, log_dir=args.log_dir)
