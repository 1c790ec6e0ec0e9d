"""The decision subcommands of `gpu-router`: status, route, check, models, optimize, report.

Each reads the configuration, polls the cluster once and prints text like the original guide, or with
`--json` one JSON document with the same facts. Exit statuses (`cli.exitcodes`), the same verdict the
same status in every subcommand:

- 0: done, every node answered (a model that fits no GPU but runs on CPU is an answer, not a failure);
- 1: a node did not answer (the answer covers only the others); route/check: no node can run the model;
  optimize: a step failed (a load that did not land on GPU, an eviction that did not happen);
- 2: bad usage or configuration: an unknown model (not installed or loaded anywhere, not in the catalog, not
  configured) gets a one-line error with close matches; a priority model installed on no node (when every
  node answered), in every subcommand: status, report and optimize flag it in their answer, the others on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from cli import exitcodes
from gpurouter import render
from gpurouter.act import journal
from gpurouter.act.demandplan import desired_once
from gpurouter.act.execute import execute
from gpurouter.act.jobs import action_records
from gpurouter.cluster.config import Config, find_config, load_config, model_key
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.state import ClusterState
from gpurouter.decide.placement import Step, check, is_known, route, route_of, uninstalled_priority
from gpurouter.decide.route.ask import ask_of
from gpurouter.decide.route.pipeline import choose
from gpurouter.decide.route.traffic import Traffic


def main(args: argparse.Namespace) -> int:
    """Run `args.command`; ConfigError propagates (the CLI prints it and exits 2)."""
    config = load_config(find_config(getattr(args, "config", None)))
    handler = _COMMANDS[args.command]
    with Observer(config) as observer:
        state = observer.poll()
        now = time.time()
        if not _readable(state):  # each node's error is in the answer
            print(f"gpu-router: no node answered ({', '.join(n.name for n in state.nodes)})", file=sys.stderr)
        code = handler(args, state, now, observer)
        if code == exitcodes.USAGE and not _readable(state):
            return code
        for what in state.unread:
            print(f"gpu-router: incomplete answer: {what}", file=sys.stderr)
        down = exitcodes.FAILED if any(not n.up for n in state.nodes) or state.unread else exitcodes.OK
        missing = exitcodes.USAGE if _misconfigured(state) else exitcodes.OK
        if missing and args.command not in _SHOWS_PRIORITY:
            for model in uninstalled_priority(state):
                if model != model_key(getattr(args, "model", "")):  # already refused by name
                    print(f"gpu-router: {render.unknown_model_text(state, model)}", file=sys.stderr)
        return exitcodes.worst(code, down, missing)


def _emit(args: argparse.Namespace, document: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(document, indent=2, default=str))
    else:
        print("\n".join(lines))


def _readable(state: ClusterState) -> bool:
    return any(n.up for n in state.nodes)


def _misconfigured(state: ClusterState) -> bool:
    """A priority model installed on no node, and every node answered (so it is not on one that is down)."""
    return all(n.up for n in state.nodes) and bool(uninstalled_priority(state))


def _unknown_model(state: ClusterState, model: str) -> int:
    print(f"gpu-router: {render.unknown_model_text(state, model, ' (see `gpu-router models`)')}", file=sys.stderr)
    return exitcodes.USAGE


# ------------------------------------------------------------------------------------------- subcommands


def _status(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    _emit(args, {"command": "status", **render.status_json(state, now)}, render.status_text(state, now))
    return exitcodes.OK


def _route(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    if _readable(state) and not is_known(state, args.model):
        return _unknown_model(state, args.model)
    if args.explain:
        choice = choose(state, ask_of("/api/generate", {"prompt": args.prompt}, args.model), Traffic(), now)
        _emit(args, {"command": "route", **render.route_choice(choice)}, render.route_choice_text(choice))
        return exitcodes.OK if choice.targets else exitcodes.FAILED
    result = route(state, args.model, now)
    differs = render.route_divergence(state, result, now)
    document = {"command": "route", **render.route_json(result, differs)}
    _emit(args, document, render.route_text(result, state, differs))
    return exitcodes.OK if result.node is not None else exitcodes.FAILED


def _check(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    if _readable(state) and not is_known(state, args.model):
        return _unknown_model(state, args.model)
    result = check(state, args.model, now)
    _emit(args, {"command": "check", **render.check_json(result)}, render.check_text(result, state))
    return exitcodes.OK if route_of(state, result).node is not None else exitcodes.FAILED


def _models(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    document = render.models_document(state)
    _emit(args, document, render.models_text(state, document["models"]))
    return exitcodes.OK


def _report(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    desired, reading = desired_once(state.config, state, now)
    document = render.report_document(state, desired, reading, now)
    _emit(args, document, render.report_text(state, desired, reading, now))
    return exitcodes.OK


def _optimize(args: argparse.Namespace, state: ClusterState, now: float, observer: Observer) -> int:
    config = state.config
    desired, reading = desired_once(config, state, now)
    result = desired.plan
    mode = _mode(args, config)
    dry_run = mode in ("dry_run", "monitor_only")
    as_json = getattr(args, "json", False)
    if not as_json:
        print("\n".join(render.plan_text(result, state, now)))
        if render.demand_state(reading, config.demand) != "no_proxy":
            print()
            print("\n".join(render.demand_lines(desired, reading, config.demand) + render.demand_steps(desired, state)))
        print()
        print("Executing Routing Plan" if not dry_run else f"Routing Plan (dry run: {render.MODE_TEXT[mode]})")
        print(render.RULE)
        if not result.steps:
            print("Nothing to do.")
        elif dry_run:
            print(f"Nothing changed: {len(result.steps)} step(s) above would run.")
    execution = execute(
        result,
        state,
        observer.clients,
        load_timeout=config.optimizer.load_timeout,
        dry_run=dry_run,
        on_event=None if as_json else _printer(),
    )
    if not dry_run and config.actions_log is not None:  # the optimizer's status page shows them beside its own
        offset = time.time() - time.monotonic()
        records = action_records(execution, offset, time.time(), by="cli")
        journal.append(config.actions_log, [dataclasses.asdict(r) for r in records])
    down = [n.name for n in state.nodes if not n.up]
    code = exitcodes.OK if execution.ok else exitcodes.FAILED
    if as_json:
        document = render.optimize_document(execution, mode, state, now)
        document["demand"] = render.demand_json(desired, reading, config.demand)
        print(json.dumps(document, indent=2, default=str))
        return code
    print()
    if not dry_run:
        print(render.execution_summary(execution, result))
    if down:
        left = " (a priority model is left off GPU)" if result.unplaced else ""
        print(f"Nodes that did not answer: {', '.join(down)}{left}")
    return code


def _mode(args: argparse.Namespace, config: Config) -> str:
    """Why optimize acts or only plans (a key of render.MODE_TEXT): --dry-run, --apply, else auto_optimize."""
    if getattr(args, "dry_run", False):
        return "dry_run"
    if getattr(args, "apply", False):
        return "apply"
    return "auto_optimize" if config.auto_optimize else "monitor_only"


def _printer() -> Callable[[str, Step, str], None]:
    """An on_event callback printing whole lines (the executor's threads may call it at once)."""
    lock = threading.Lock()

    def on_event(kind: str, step: Step, detail: str) -> None:
        with lock:
            print(render.event_line(kind, step, detail), flush=True)

    return on_event


_COMMANDS: dict[str, Callable[[argparse.Namespace, ClusterState, float, Observer], int]] = {
    "status": _status,
    "route": _route,
    "check": _check,
    "models": _models,
    "optimize": _optimize,
    "report": _report,
}
_SHOWS_PRIORITY = frozenset(("status", "report", "optimize"))  # the commands whose answer judges each priority model
