"""A walk through the README: every `gpu-router` command it shows, with and without `--json`, piped to `head -1`,
against the simulated demo cluster with one node down. No traceback anywhere, and each exit status is the one
the documented table gives (cli/exitcodes.py, shown by `gpu-router --help` and the README)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli import exitcodes
from simulator.run import DEMO_FLEET, Fleet, load_fleet

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DECISIONS = {"status", "route", "check", "models", "optimize", "report"}
PLACEHOLDERS = {"MODEL": "mxbai-embed-large", "PATH": "gpu_router_config.yaml", "F": "gpu_router_config.yaml"}


def readme_commands() -> list[str]:
    """Every `gpu-router …` the README shows: lines of its code blocks and its inline code spans."""
    found: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            found += [m.strip() for m in re.findall(r"gpu-router(?: .*?)?(?= \| | && |$)", line)]
    for span in re.findall(r"`(gpu-router[^`]*)`", README):
        found.append(re.split(r" \| | && ", span)[0].strip())
    return list(dict.fromkeys(c for c in found if c))


def variants(command: str) -> list[list[str]]:
    """The command's words with placeholders filled and each `[a|b]` left out or given as each alternative."""
    words = command.replace("| head -1", "").split()[1:]
    text = " ".join(PLACEHOLDERS.get(w, w) for w in words)
    groups = re.findall(r"\[([^\[\]]+)\]", text)
    skeleton = re.sub(r"\[[^\[\]]+\]", "{}", text)
    choices = [["", *g.split("|")] for g in groups]
    out = []
    for picked in itertools.product(*choices):
        args = shlex.split(skeleton.format(*picked))
        args = [PLACEHOLDERS.get(a, a) for a in args]
        if "…" not in args and "..." not in args:
            out.append(args)
    return out


def expected(args: list[str], json_flag: bool) -> int:
    """The table's status for this command on the demo cluster with gpu-small down."""
    command = next((a for a in args if not a.startswith("-") and a not in PLACEHOLDERS.values()), None)
    if "--help" in args or "-h" in args:
        return exitcodes.OK
    if command in ("route", "check") and not [a for a in args[args.index(command) + 1 :] if not a.startswith("-")]:
        return exitcodes.USAGE  # no MODEL given
    if command in DECISIONS:
        return exitcodes.FAILED  # a node did not answer: the answer covers only the others
    return exitcodes.USAGE  # a service or the demo with --json: a flag it would ignore is refused


def test_the_readme_shows_the_exit_status_table_that_help_prints():
    assert exitcodes.table_text() in README
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and exitcodes.table_text() in done.stdout


def test_walk_through_the_readme_with_a_node_down(tmp_path):
    spec = load_fleet(DEMO_FLEET)
    nodes = tuple(dataclasses.replace(n, port=0, load_speed=0) for n in spec.nodes)
    spec = dataclasses.replace(spec, control_port=0, nodes=nodes)
    commands = readme_commands()
    assert {"gpu-router status", "gpu-router route MODEL", "gpu-router demo --once"} <= set(commands), commands
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    walked = abbreviated = 0
    with Fleet(spec) as fleet:
        (tmp_path / "gpu_router_config.yaml").write_text(yaml.safe_dump(fleet.router_config()), encoding="utf-8")
        fleet.node("gpu-small").inject("down")
        for command in commands:
            for args in variants(command):
                if args[:1] != ["--help"] and not any(a in DECISIONS for a in args):
                    runs = [[*args, "--json"], [*args, "--help"]]  # services serve until stopped: their flags only
                else:
                    runs = [args, [*args, "--json"]]
                for argv in runs:
                    if argv[:1] in (["--json"], ["--help"]) and len(argv) > 1 and argv[-1] == "--json":
                        continue
                    line = shlex.join([sys.executable, "-m", "cli.main", *argv])
                    done = subprocess.run(
                        ["bash", "-c", f"set -o pipefail; {line} | head -1"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                    )  # fmt: skip
                    where = f"gpu-router {' '.join(argv)} | head -1: {done.stderr[-600:]}"
                    assert "Traceback" not in done.stderr and "Error:" not in done.stderr, where
                    assert done.returncode == expected(argv, "--json" in argv), where
                    assert done.stdout.count("\n") <= 1, where
                    walked += 1
                    if "--json" in argv and argv[0] in DECISIONS:  # no flag may be abbreviated, in any subcommand
                        short = [a if a != "--json" else "--js" for a in argv]
                        refused = subprocess.run(
                            [sys.executable, "-m", "cli.main", *short],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                        )  # fmt: skip
                        assert refused.returncode == exitcodes.USAGE, short
                        assert refused.stderr.startswith(f"usage: gpu-router {argv[0]} "), refused.stderr
                        abbreviated += 1
    assert walked >= 30 and abbreviated >= 6


@pytest.mark.parametrize("command", ["gpu-router optimize [--dry-run|--apply]", "gpu-router check MODEL"])
def test_variants_fill_placeholders_and_expand_choices(command):
    got = variants(command)
    assert all("MODEL" not in a and not any("[" in w for w in a) for a in got)
    assert len(got) == (3 if "optimize" in command else 1)
