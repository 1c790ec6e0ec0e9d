"""The `gpu-router` command line: one console script, one subcommand per job.

Exit status: 0 done, 1 the job failed (a load that did not land, a node that did not answer), 2 bad usage
or configuration.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from exporter.config import ConfigError

# subcommand → (module, help). Each module has `main(args) -> int` and, except the decision commands (whose
# few arguments are declared here and whose shared `main` dispatches on `args.command`), `add_arguments`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "status": ("optimizer.commands", "per node VRAM total/usable/free, loaded models, what fits"),
    "route": ("optimizer.commands", "where a model should run, and why"),
    "check": ("optimizer.commands", "which nodes can hold a model"),
    "models": ("optimizer.commands", "every known model with the VRAM it needs"),
    "optimize": ("optimizer.commands", "put the priority models on GPU (the plan, then each step)"),
    "report": (
        "optimizer.commands",
        "status plus, per priority model, where it is and what optimize would do",
    ),
    "exporter": ("exporter.server", "serve Prometheus metrics for the cluster"),
    "optimizer": ("optimizer.service", "serve the Alertmanager webhook, the JSON API and the reconcile loop"),
    "proxy": ("proxy.service", "one Ollama endpoint for the cluster: each request to a node where its model is on GPU"),
    "simulate": ("simulator.run", "run a simulated Ollama fleet (the built-in demo cluster by default)"),
    "demo": ("optimizer.demo", "the whole story on the demo cluster: CPU fallback detected and fixed"),
}


def _common(defaults: bool) -> argparse.ArgumentParser:
    """--config and --json, accepted before or after the subcommand (the later one wins)."""
    common = argparse.ArgumentParser(add_help=False)
    unset = {} if defaults else {"default": argparse.SUPPRESS}
    common.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default ./gpu_router_config.yaml, then /etc/gpu-router/config.yaml)",
        **unset,
    )
    common.add_argument("--json", action="store_true", help="print one JSON document instead of text", **unset)
    return common


def _decision_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name in ("route", "check"):
        parser.add_argument("model", metavar="MODEL", help="model name, e.g. llama3.1:latest")
    if name == "optimize":
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
        mode.add_argument("--apply", action="store_true", help="act even when the config says auto_optimize: false")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (all of them when none is chosen)."""
    parser = argparse.ArgumentParser(
        prog="gpu-router",
        description="Keep priority Ollama models on GPU across a cluster.",
        parents=[_common(defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=text, description=text, parents=[_common(defaults=False)])
        if module == "optimizer.commands":
            _decision_arguments(name, sub_parser)
        elif chosen in (None, name):
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    args = build_parser(chosen).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.main(args))
    except ConfigError as exc:
        print(f"gpu-router: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
