"""`gpu-router demo`: the whole story on the built-in demo cluster, in one process.

The guide's three nodes (a 4096 MB GPU node, a node without GPU, an 8192 MB GPU node) are simulated; the exporter
and the optimizer run against them. The optimizer first puts the priority models on GPU; then Ollama on one
node restarts and a client's request loads a priority model on CPU; the optimizer notices (its reconcile loop,
or with `--with-prometheus` the real alert rule → Alertmanager → webhook), reloads the model onto a GPU,
verifies it and removes the CPU copy. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import requests

from cli.localstack import REPO, Alertmanager, Prometheus, fast_alertmanager, fast_rules, free_port
from exporter.server import start_exporter
from gpurouter import logfmt, render
from gpurouter.act.jobs import ActionRecord
from gpurouter.cluster.config import Config, parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.ollama import OllamaClient
from gpurouter.cluster.state import ClusterState
from optimizer.service import OptimizerHandle, start_optimizer
from proxy.service import ProxyHandle, start_proxy
from simulator.run import DEMO_FLEET, DEMO_PRIORITY, Fleet, load_fleet

PRIORITY = list(DEMO_PRIORITY)
VICTIM = "mxbai-embed-large:latest"  # the priority model the story knocks onto CPU
SPOKEN = "llama3.1:latest"  # the model the proxy's part of the story asks for (a GPU node and the CPU node have it)
STORY_TIMEOUT = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="exit after the story instead of serving until Ctrl-C")
    parser.add_argument(
        "--with-prometheus",
        action="store_true",
        help="detect and notify through a real Prometheus and Alertmanager (they must be installed)",
    )
    parser.add_argument(
        "--check-interval", type=float, default=2.0, metavar="SECONDS", help="the optimizer's reconcile interval"
    )


def _port(preferred: int) -> int:
    """The preferred port when it is free, else any free one (the demo never fails for a busy port).

    The probe sets SO_REUSEADDR as the servers do, so a port that recent connections left in TIME_WAIT counts
    as free (the servers can bind it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def demo_config(fleet: Fleet, check_interval: float) -> Config:
    """The router configuration for the running demo fleet: static capacity as its nodes declare it."""
    return parse_config(
        {
            "nodes": fleet.router_config()["nodes"],
            "priority_models": PRIORITY,
            "check_interval": check_interval,
            "request_timeout": 2,
            "optimizer": {"cooldown_seconds": 2, "cooldown_max_seconds": 10, "load_timeout": 60},
        },
        "demo",
    )


class Story:
    """Prints what happens, step by step, to `out`."""

    def __init__(self, out: TextIO, observer: Observer, optimizer: OptimizerHandle) -> None:
        self.out = out
        self.observer = observer
        self.optimizer = optimizer
        self._shown = 0

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def heading(self, text: str) -> None:
        self.say()
        self.say(text)
        self.say("=" * 70)

    def report(self) -> ClusterState:
        state = self.observer.poll()
        for line in render.status_text(state, time.time()):
            self.say(line)
        return state

    def new_actions(self) -> None:
        records: list[ActionRecord] = self.optimizer.queue.actions()
        for record in records[self._shown :]:
            where = f" on {record.node}" if record.node else ""
            detail = f": {record.detail}" if record.detail else ""
            took = f"{record.duration_seconds:.1f}s"
            self.say(f"   [optimizer] {record.action} {record.model}{where} → {record.outcome} ({took}){detail}")
        self._shown = len(records)

    def wait(self, done: Callable[[ClusterState], bool], what: str, extra: Callable[[], None] | None = None) -> bool:
        """Show progress until `done(state)` holds; False after STORY_TIMEOUT."""
        deadline = time.monotonic() + STORY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            state = self.observer.poll()
            self.new_actions()
            if extra is not None:
                extra()
            line = _where(state, VICTIM)
            if line != last:
                self.say(f"   {time.strftime('%H:%M:%S')} {line}")
                last = line
            if done(state) and self.optimizer.queue.depth == 0:  # and no job still loading or verifying
                self.new_actions()
                return True
            time.sleep(0.25)
        self.say(f"   gave up after {STORY_TIMEOUT:g}s waiting for {what}")
        return False


def _where(state: ClusterState, model: str) -> str:
    copies = [f"{n.name} {render.where_text(m.gpu_ratio)}" for n, m in state.placements(model)]
    return f"{model}: " + (", ".join(copies) if copies else "not loaded")


def _settled(state: ClusterState) -> bool:
    """Every priority model fully on GPU and no CPU or partial copy of one left anywhere."""
    for p in state.config.priority_models:
        copies = state.placements(p.name)
        if not copies or not all(m.fully_on_gpu for _, m in copies):
            return False
    return True


def main(args: argparse.Namespace) -> int:
    if args.with_prometheus and not (shutil.which("prometheus") and shutil.which("prometheus-alertmanager")):
        print(
            "gpu-router demo: --with-prometheus needs prometheus and prometheus-alertmanager "
            "(apt-get install prometheus prometheus-alertmanager)",
            file=sys.stderr,
        )
        return 2
    logfmt.setup(logging.WARNING)  # a warning among the story's lines is a whole log line, time= and level= first
    spec = load_fleet(DEMO_FLEET)
    spec = dataclasses.replace(spec, control_port=0, nodes=tuple(dataclasses.replace(n, port=0) for n in spec.nodes))
    stop = threading.Event()
    if not args.once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    with Fleet(spec) as fleet, tempfile.TemporaryDirectory(prefix="gpu-router-demo-") as tmp:
        interval = 3600.0 if args.with_prometheus else args.check_interval
        config = demo_config(fleet, interval)
        exporter, exporter_thread = start_exporter(config, port=_port(9877))
        optimizer = start_optimizer(config, port=_port(9878))
        proxy = start_proxy(config, port=_port(11435), heal=False)  # the optimizer's own loop heals
        stack: list[Any] = []
        observer = Observer(config)
        story = Story(sys.stdout, observer, optimizer)
        try:
            if args.with_prometheus:
                stack = _start_prometheus(Path(tmp), exporter.url, optimizer.url, story)
            ok = _tell(story, fleet, config, stack) and _route(story, fleet, proxy)
            if args.once:  # everything stops now: no address to visit
                story.say("\nEverything is stopped (--once). Run `gpu-router demo` without --once to keep it serving.")
            else:
                _urls(story, fleet, exporter.url, optimizer.url, stack, proxy.url)
                story.say("\nServing until Ctrl-C.")
                stop.wait()
        finally:
            for process in reversed(stack):
                process.stop()
            observer.close()
            proxy.stop()
            optimizer.stop()
            exporter.stop()
            exporter_thread.join(5)
    return 0 if ok else 1


def _tell(story: Story, fleet: Fleet, config: Config, stack: list[Any]) -> bool:
    story.heading("GPU ROUTER DEMO: the guide's cluster (4096 MB GPU, no GPU, 8192 MB GPU), simulated")
    story.say(f"Priority models: {', '.join(PRIORITY)}. The optimizer puts them on GPU first:")
    if not story.wait(_settled, "the priority models on GPU"):
        return False
    story.heading("1. STATUS")
    state = story.report()
    holder = next((n.name for n, m in state.placements(VICTIM) if m.fully_on_gpu), "gpu-small")

    story.heading(f"2. TROUBLE: Ollama on {holder} restarts; a client loads {VICTIM} with num_gpu 0")
    fleet.node(holder).inject("restart")
    client = OllamaClient(fleet.urls[holder], read_timeout=60)
    client.load(VICTIM, num_gpu=0, keep_alive=-1, embedding=True)
    client.close()
    story.say(f"   {_where(story.observer.poll(), VICTIM)} ← on CPU: 5–10× slower, and nobody would notice")

    how = "Prometheus rule → Alertmanager → webhook" if stack else "its reconcile loop"
    story.heading(f"3. THE OPTIMIZER NOTICES ({how}) AND MOVES IT BACK")
    prometheus = stack[-1] if stack else None
    seen: set[str] = set()

    def alerts() -> None:
        if prometheus is None:
            return
        for alert in prometheus.alerts():
            key = alert_line(alert)
            if alert["labels"].get("model") == VICTIM and key not in seen:
                seen.add(key)
                story.say(f"   [prometheus] {key}")

    fixed = story.wait(_settled, f"{VICTIM} back on GPU", extra=alerts)
    story.heading("4. FINAL STATUS")
    story.report()
    story.say()
    story.say(f"Result: {VICTIM} {'is back fully on GPU ✅' if fixed else 'is NOT back on GPU ❌'}")
    return fixed


def alert_line(alert: dict[str, Any]) -> str:
    """`GPURouterPriorityModelOnCPU node=gpu-small firing`: the alert's name, its node when it has one, its state."""
    node = alert["labels"].get("node")
    return " ".join(p for p in (alert["labels"]["alertname"], f"node={node}" if node else "", alert["state"]) if p)


def _route(story: Story, fleet: Fleet, proxy: ProxyHandle) -> bool:
    """One request through the proxy (it picks the GPU node) beside the same request straight to the CPU node."""
    story.heading(f"5. ONE ENDPOINT FOR YOUR APPLICATIONS: gpu-router proxy ({proxy.url})")
    body = {"model": SPOKEN, "prompt": "Why is the sky blue?", "stream": False, "options": {"num_predict": 24}}
    speeds = {}
    for label, url in (("through the proxy", proxy.url), ("straight to cpu-node", fleet.urls["cpu-node"])):
        reply = requests.post(f"{url}/api/generate", json=body, timeout=60)
        if reply.status_code != 200:
            story.say(f"   {label}: HTTP {reply.status_code} {reply.text[:200]}")
            return False
        data = reply.json()
        speeds[label] = data["eval_count"] / (data["eval_duration"] / 1e9)
        story.say(f"   {label:<22} {data['eval_count']} tokens at {speeds[label]:5.1f} tokens/s")
    metrics = requests.get(f"{proxy.url}/metrics", timeout=5).text.splitlines()
    served = [line for line in metrics if 'placement="gpu"' in line and SPOKEN in line]
    node = served[0].split('node="', 1)[1].split('"', 1)[0] if served else "?"
    ratio = speeds["through the proxy"] / speeds["straight to cpu-node"]
    story.say(f"   The proxy sent {SPOKEN} to {node}, where it is fully on GPU: {ratio:.1f}× the CPU node's speed.")
    story.say(f"   Point applications at it: OLLAMA_HOST={proxy.url}, or the OpenAI base URL {proxy.url}/v1")
    return bool(served)


def _start_prometheus(workdir: Path, exporter_url: str, optimizer_url: str, story: Story) -> list[Any]:
    story.say("Starting Prometheus and Alertmanager (1 s scrape and evaluation, the shipped rules with for: 0s)...")
    am_config = fast_alertmanager(REPO / "alerts" / "alertmanager.yml", f"{optimizer_url}/webhook", None)
    alertmanager = Alertmanager(workdir / "alertmanager", am_config)
    processes: list[Any] = [alertmanager]
    try:
        alertmanager.wait_ready()
        prometheus = Prometheus(
            workdir / "prometheus",
            {"gpu-router-exporter": [exporter_url[7:]], "gpu-router-optimizer": [optimizer_url[7:]]},
            rule_files=[fast_rules(REPO / "alerts" / "rules.yml", workdir / "rules.yml")],
            alertmanager=alertmanager.url,
        )
        processes.append(prometheus)
        prometheus.wait_up(["gpu-router-exporter"])
    except BaseException:
        for process in reversed(processes):
            process.stop()
        raise
    return processes


def _urls(story: Story, fleet: Fleet, exporter: str, optimizer: str, stack: list[Any], proxy: str) -> None:
    story.heading("WHERE TO LOOK")
    story.say(f"   Proxy (OLLAMA_HOST)    {proxy}   OpenAI base URL {proxy}/v1   metrics {proxy}/metrics")
    story.say(f"   Optimizer status page  {optimizer}/")
    story.say(f"   Optimizer JSON API     {optimizer}/api/v1/status   {optimizer}/api/v1/actions")
    story.say(f"   Exporter metrics       {exporter}/metrics")
    for name, url in fleet.urls.items():
        story.say(f"   Ollama node {name:<10} {url}/api/ps")
    story.say(f"   Simulator control      {fleet.control_url}/nodes")
    if stack:
        story.say(f"   Prometheus             {stack[-1].url}/classic/alerts")
        story.say(f"   Alertmanager           {stack[0].url}/")
