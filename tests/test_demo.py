"""`gpu-router demo --once`: the README's first command tells the whole story and exits 0."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import require_tool

from cli.localstack import REPO


def run_demo(*extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--once", *extra],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        check=False,
    )
    return done, time.monotonic() - started


def test_demo_tells_the_story_and_exits_0() -> None:
    done, took = run_demo()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    order = ["1. STATUS", "2. TROUBLE", " CPU ← on CPU", "3. THE OPTIMIZER NOTICES", "4. FINAL STATUS"]
    positions = [out.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert "[optimizer] load mxbai-embed-large:latest on gpu-large → success" in out  # room beside llama3.1
    assert "Result: mxbai-embed-large:latest is back fully on GPU ✅" in out
    assert "WHERE TO LOOK" not in out and "Optimizer status page" not in out  # --once: everything has stopped
    assert "Everything is stopped (--once)" in out
    assert "  ←" not in out
    assert "GiB" not in out and "% on GPU" not in out  # sizes and placements in the words status uses
    assert "The proxy sent llama3.1:latest to gpu-large, where it is fully on GPU" in out  # beside the CPU node
    assert took < 60
    # the restart the story injects is logged like every other service's line, never a bare `event=…`
    assert "event=simulator.fault node=gpu-small fault=restart" in done.stderr
    assert all(line.startswith("time=") and " level=" in line for line in done.stderr.splitlines()), done.stderr


@pytest.mark.e2e
def test_demo_through_prometheus_and_alertmanager() -> None:
    require_tool("prometheus")
    require_tool("prometheus-alertmanager")
    done, _ = run_demo("--with-prometheus")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "(Prometheus rule → Alertmanager → webhook)" in done.stdout
    assert "[prometheus] GPURouterPriorityModelOnCPU node=gpu-small firing" in done.stdout
    assert "Result: mxbai-embed-large:latest is back fully on GPU ✅" in done.stdout
