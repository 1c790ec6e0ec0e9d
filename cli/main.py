"""The `gpu-router` command line: one console script, one subcommand per job.

Exit statuses: `cli.exitcodes` (shown by `gpu-router --help`). A reader that stops early
(`gpu-router status | head -1`) changes nothing: the rest of the output is dropped and the status is still the
answer's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from cli import exitcodes
from gpurouter.cluster.config import ConfigError, name_problem

# subcommand → (module, help). Each module has `main(args) -> int` and, except the decision commands (whose
# few arguments are declared here and whose shared `main` dispatches on `args.command`), `add_arguments`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "status": ("cli.commands", "per node VRAM total/usable/free, loaded models, what fits"),
    "route": ("cli.commands", "where a model should run, and why"),
    "check": ("cli.commands", "which nodes can hold a model"),
    "models": ("cli.commands", "every known model with the VRAM it needs"),
    "optimize": ("cli.commands", "put the priority models on GPU (the plan, then each step)"),
    "report": (
        "cli.commands",
        "status plus, per priority model, where it is and what optimize would do",
    ),
    "exporter": ("exporter.server", "serve Prometheus metrics for the cluster"),
    "optimizer": ("optimizer.service", "serve the Alertmanager webhook, the JSON API and the reconcile loop"),
    "proxy": ("proxy.service", "one Ollama endpoint for the cluster: each request to a node where its model is on GPU"),
    "simulate": ("simulator.run", "run a simulated Ollama fleet (the built-in demo cluster by default)"),
    "demo": ("cli.demo", "the whole story on the demo cluster: CPU fallback detected and fixed"),
}
# Which subcommands read the router configuration (--config) and which print JSON (--json): only flags that act.
TAKES_CONFIG = frozenset(("status", "route", "check", "models", "optimize", "report", "exporter", "optimizer", "proxy"))
TAKES_JSON = frozenset(("status", "route", "check", "models", "optimize", "report"))


def _config_flag(parser: argparse.ArgumentParser, default: bool) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default ./gpu_router_config.yaml, then /etc/gpu-router/config.yaml)",
        **({} if default else {"default": argparse.SUPPRESS}),
    )


def _json_flag(parser: argparse.ArgumentParser, default: bool) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document instead of text",
        **({} if default else {"default": argparse.SUPPRESS}),
    )


def _model_name(text: str) -> str:
    """A MODEL argument: printable text (bytes that are not UTF-8 arrive as lone surrogates)."""
    if problem := name_problem(text):
        raise argparse.ArgumentTypeError(f"invalid model name: {problem}")
    return text


def _decision_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name in ("route", "check"):
        parser.add_argument("model", metavar="MODEL", type=_model_name, help="model name, e.g. llama3.1:latest")
    if name == "route":
        parser.add_argument(
            "--explain",
            action="store_true",
            help="show the proxy's request pipeline for it: every node's scores (no traffic: as a quiet proxy)",
        )
        parser.add_argument("--prompt", default="", help="with --explain: the request's prompt")
    if name == "optimize":
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
        mode.add_argument("--apply", action="store_true", help="act even when the config says auto_optimize: false")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (all of them when none is chosen).

    --config and --json are accepted before the subcommand too (the later one wins), and only where they act.
    No flag may be abbreviated (`--a` is not `--apply`). Each subcommand's parser is in `subcommand_parsers`.
    """
    parser = argparse.ArgumentParser(
        prog="gpu-router",
        allow_abbrev=False,
        description="Keep priority Ollama models on GPU across a cluster.",
        epilog="exit status:\n" + exitcodes.table_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_flag(parser, default=True)
    _json_flag(parser, default=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        if name in TAKES_CONFIG:
            _config_flag(sub_parser, default=False)
        if name in TAKES_JSON:
            _json_flag(sub_parser, default=False)
        if module == "cli.commands":
            _decision_arguments(name, sub_parser)
        elif chosen in (None, name):
            importlib.import_module(module).add_arguments(sub_parser)
    parser.set_defaults(subcommand_parsers=sub.choices)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments; a flag given before a subcommand that does not use it is a usage error (exit 2).

    Usage errors print the subcommand's usage line, not the top-level one.
    """
    argv = list(argv)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(chosen)
    args, unknown = parser.parse_known_args(argv)
    command_parser = args.subcommand_parsers[args.command]
    del args.subcommand_parsers
    if unknown:
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.json and args.command not in TAKES_JSON:
        command_parser.error(f"--json: `gpu-router {args.command}` prints no JSON document")
    if args.config is not None and args.command not in TAKES_CONFIG:
        what = "--fleet FILE" if args.command == "simulate" else "the built-in demo cluster"
        command_parser.error(f"--config: `gpu-router {args.command}` reads no router configuration (it runs {what})")
    return args


class QuietPipe:
    """A text stream that, once its reader has gone (EPIPE), drops what is written instead of raising.

    The file descriptor is then pointed at /dev/null, so the interpreter's last flush does not fail either.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def _gone(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._gone()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def quiet_pipes() -> Iterator[None]:
    """stdout and stderr as `QuietPipe`s for the duration (restored after)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = QuietPipe(sys.stdout), QuietPipe(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stdout, sys.stderr = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit status."""
    with quiet_pipes():
        args = parse(sys.argv[1:] if argv is None else argv)
        module = importlib.import_module(SUBCOMMANDS[args.command][0])
        try:
            return int(module.main(args))
        except ConfigError as exc:
            print(f"gpu-router: {exc}", file=sys.stderr)
            return exitcodes.USAGE
        except KeyboardInterrupt:
            return exitcodes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
