"""The decision subcommands of `gpu-router`: status, route, check, models, optimize, report.

Each reads the configuration, polls the cluster once and prints text like the original guide, or with
`--json` one JSON document with the same facts. Exit status:

- 0: done (a model that fits nowhere on GPU is an answer, not a failure);
- 1: the job failed: no node answered at all; `route` found no node that can run the model; `optimize`
  had a step fail (a load that did not land on GPU, an eviction that did not happen), or left a priority
  model off GPU while a node was down (the node that did not answer might have been its home);
- 2: bad usage or configuration; an unknown model (not installed or loaded anywhere, not in the catalog,
  not configured) gets a one-line error with close matches.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from exporter import catalog
from exporter.config import Config, find_config, load_config, model_key
from exporter.observe import Observer
from exporter.state import ClusterState
from optimizer import render
from optimizer.decide import Step, check, plan, route
from optimizer.execute import execute


def main(args: argparse.Namespace) -> int:
    """Run `args.command`; ConfigError propagates (the CLI prints it and exits 2)."""
    config = load_config(find_config(getattr(args, "config", None)))
    handler = _COMMANDS[args.command]
    with Observer(config) as observer:
        state = observer.poll()
        now = time.time()
        if not any(n.up for n in state.nodes):
            reasons = "; ".join(f"{n.name}: {n.error or n.error_kind}" for n in state.nodes)
            print(f"gpu-router: no node answered ({reasons})", file=sys.stderr)
        return handler(args, state, now, observer)


def _emit(args: argparse.Namespace, document: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(document, indent=2, default=str))
    else:
        print("\n".join(lines))


def _readable(state: ClusterState) -> bool:
    return any(n.up for n in state.nodes)


def _known(state: ClusterState, model: str) -> bool:
    key = model_key(model)
    return key in state.known_models() or catalog.find(key) is not None


def _unknown_model(state: ClusterState, model: str) -> int:
    names = set(state.known_models()) | {n for spec in catalog.CATALOG for n in (spec.name, *spec.aliases)}
    close = difflib.get_close_matches(model_key(model), sorted(names), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see `gpu-router models`)"
    print(f"gpu-router: unknown model {model!r}: not installed on any node, not in the catalog{hint}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------- subcommands


def _status(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    _emit(args, {"command": "status", **render.status_json(state, now)}, render.status_text(state, now))
    return 0 if _readable(state) else 1


def _route(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    if _readable(state) and not _known(state, args.model):
        return _unknown_model(state, args.model)
    result = route(state, args.model, now)
    document = {"command": "route", **render.route_json(result)}
    _emit(args, document, render.route_text(result, state))
    return 0 if result.node is not None else 1


def _check(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    if _readable(state) and not _known(state, args.model):
        return _unknown_model(state, args.model)
    result = check(state, args.model, now)
    _emit(args, {"command": "check", **render.check_json(result)}, render.check_text(result))
    return 0 if _readable(state) else 1


def _models(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    rows = render.model_rows(state)
    _emit(args, {"command": "models", "models": rows}, render.models_text(state, rows))
    return 0 if _readable(state) else 1


def _report(args: argparse.Namespace, state: ClusterState, now: float, _: Observer) -> int:
    result = plan(state, now=now)
    document = {
        "command": "report",
        "status": render.status_json(state, now),
        "priority_models": render.report_models(state, result, now),
        "plan": render.plan_json(result),
    }
    _emit(args, document, render.report_text(state, result, now))
    return 0 if _readable(state) else 1


def _optimize(args: argparse.Namespace, state: ClusterState, now: float, observer: Observer) -> int:
    config = state.config
    result = plan(state, now=now)
    dry_run, why = _mode(args, config)
    as_json = getattr(args, "json", False)
    if not as_json:
        print("\n".join(render.plan_text(result, state)))
        print()
        print("Executing Routing Plan" if not dry_run else f"Routing Plan (dry run: {why})")
        print(render.RULE)
        if dry_run or not result.steps:
            lines = [render.step_line(s) for s in result.steps] or ["Nothing to do."]
            print("\n".join(f"Would {line}" if dry_run and result.steps else line for line in lines))
    execution = execute(
        result,
        state,
        observer.clients,
        load_timeout=config.optimizer.load_timeout,
        dry_run=dry_run,
        on_event=None if as_json else _printer(),
    )
    down = [n.name for n in state.nodes if not n.up]
    code = 1 if not _readable(state) or not execution.ok or (result.unplaced and down) else 0
    if as_json:
        document = {
            "command": "optimize",
            "dry_run": dry_run,
            "mode": why,
            "plan": render.plan_json(result),
            **render.execution_json(execution),
            "nodes_down": down,
            "exit_status": code,
        }
        print(json.dumps(document, indent=2, default=str))
        return code
    print()
    if not dry_run:
        print(render.execution_summary(execution, result))
    if result.unplaced and down:
        print(f"Nodes that did not answer: {', '.join(down)} (a priority model is left off GPU)")
    return code


def _mode(args: argparse.Namespace, config: Config) -> tuple[bool, str]:
    """(dry run?, why): --dry-run, else --apply, else the configuration's auto_optimize."""
    if getattr(args, "dry_run", False):
        return True, "--dry-run, nothing changed"
    if getattr(args, "apply", False):
        return False, "--apply"
    if not config.auto_optimize:
        return True, "auto_optimize: false in the configuration, nothing changed; give --apply to act"
    return False, "auto_optimize: true"


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
