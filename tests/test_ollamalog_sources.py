"""`gpu_source: ollama_log` against sources that block, never end or flood: a FIFO or device for a file, a
command that outlives the poll or leaves children behind, an endless or huge output, a line of hundreds of MB,
a NUL in the configuration. Only that node's capacity is unknown, with the reason; memory and processes stay
bounded."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import run_cli
from test_ollamalog import LONG, gpu, node, start

from cli.localstack import wait_for
from gpurouter.cluster import ollamalog
from gpurouter.cluster.capacity import CapacityReader
from gpurouter.cluster.config import ConfigError, parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.ollamalog import LogFile, command_capacity, file_capacity
from gpurouter.units import GIB, MIB
from simulator.run import Fleet, fleet_from_dict

T = TypeVar("T")
LOG = "\n".join(start(gpu(0, "RTX 3070", "8.0 GiB", "7.4 GiB"))) + "\n"


def within(seconds: float, call: Callable[[], T]) -> T:
    """`call()`'s answer, failing (not hanging) when it takes longer than `seconds`."""
    answer: list[T] = []
    thread = threading.Thread(target=lambda: answer.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert answer, f"no answer within {seconds} s"
    return answer[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO nobody writes to (released at the end, so a reader stuck on it ends)."""
    path = tmp_path / "ollama.fifo"
    os.mkfifo(path)
    yield path
    with contextlib.suppress(OSError):  # no reader left
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_or_a_directory_is_refused_at_once(fifo: Path, tmp_path: Path) -> None:
    capacity = within(5, lambda: file_capacity(LogFile(fifo)))
    assert not capacity.known
    assert capacity.reason.startswith(f"ollama_log: {fifo} is not a regular file (a FIFO or device blocks")
    directory = within(5, lambda: file_capacity(LogFile(tmp_path)))
    assert not directory.known and str(tmp_path) in directory.reason


def test_a_device_is_refused_at_once() -> None:
    capacity = within(5, lambda: file_capacity(LogFile("/dev/zero")))
    assert capacity.reason.startswith("ollama_log: /dev/zero is not a regular file")


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    nodes = [{"name": n, "gpus": [{"name": "RTX 3070", "vram": "8GiB"}], "models": ["llama3.2:1b"]} for n in "abc"]
    with Fleet(fleet_from_dict({"nodes": nodes})) as running:
        yield running


def test_a_blocking_source_makes_only_its_own_node_unknown_poll_after_poll(
    fleet: Fleet, fifo: Path, tmp_path: Path
) -> None:
    """A FIFO and a command that never ends, polled again and again: every node stays up, the good log is read every
    time, the two others are unknown with their reason, and no thread or process piles up."""
    good = tmp_path / "good.log"
    good.write_text(LOG)
    config = parse_config(
        {
            "nodes": [
                node("a", fleet.urls["a"], file=str(fifo)),
                node("b", fleet.urls["b"], command=f"{sys.executable} -c 'import time; time.sleep(60)'"),
                node("c", fleet.urls["c"], file=str(good)),
            ],
            "request_timeout": 1.0,
        }
    )
    with Observer(config) as observer:
        for _ in range(8):
            state = observer.poll()
            by_name = {n.name: n for n in state.nodes}
            assert all(n.up for n in state.nodes), [n.error for n in state.nodes]
            assert by_name["c"].capacity.total == 8 * GIB
            assert by_name["a"].capacity.reason.startswith(f"ollama_log: {fifo} is not a regular file")
            late = by_name["b"].capacity.reason  # killed at its deadline, or (on a busy machine) not yet
            assert "did not finish within" in late or late.startswith("ollama_log: b: no answer within 1 s")
            assert sum(t.name == "capacity" for t in threading.enumerate()) <= 3  # at most one read per node


def alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting for its parent to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no pidfd"])
def test_a_commands_background_children_are_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    log, pids = tmp_path / "ollama.log", tmp_path / "pids"
    log.write_text(LOG)
    script = f"sleep 300 >/dev/null 2>&1 & echo $! > {pids}; cat {log}"
    assert command_capacity(("sh", "-c", script), LONG).total == 8 * GIB
    child = int(pids.read_text())
    wait_for(lambda: not alive(child), 10, f"the background child {child} to end")
    slow = f"sleep 300 & echo $! > {pids}; exec sleep 300"  # the pipes stay open: killed at the deadline
    assert "did not finish within 0.5 s" in command_capacity(("sh", "-c", slow), 0.5).reason
    child = int(pids.read_text())
    wait_for(lambda: not alive(child), 10, f"the background child {child} to end")


def test_command_output_is_read_within_the_deadline_and_bounded() -> None:
    tracemalloc.start()
    try:
        began = time.monotonic()
        endless = command_capacity(("yes",), 0.5)
        took = time.monotonic() - began
        _, peak = tracemalloc.get_traced_memory()
        assert not endless.known and endless.reason == "ollama_log: `yes` did not finish within 0.5 s"
        assert took < 5 and peak < 64 * MIB, (took, peak)
        tracemalloc.reset_peak()
        flood = f"import sys\nw = sys.stdout.write\nfor _ in range(48 * 1024): w('y' * 1023 + '\\n')\nw({LOG!r})"
        capacity = command_capacity((sys.executable, "-c", flood), LONG)
        _, peak = tracemalloc.get_traced_memory()
        assert capacity.total == 8 * GIB  # the start is in the tail kept
        assert peak < 64 * MIB, peak
    finally:
        tracemalloc.stop()


def test_a_huge_line_is_skipped_and_not_read_again(tmp_path: Path) -> None:
    path = tmp_path / "ollama.log"
    path.write_text(LOG + "z" * (3 * MIB))  # a line without its end yet, far longer than any Ollama writes
    log = LogFile(path)
    assert file_capacity(log).total == 8 * GIB
    assert log._offset == path.stat().st_size  # skipped: the next read starts after it
    with path.open("a") as handle:
        handle.write("z" * MIB + "\n" + "\n".join(start(gpu(0, "RTX 3090", "24.0 GiB", "23.5 GiB"))) + "\n")
    assert file_capacity(log).total == 24 * GIB


def test_only_the_tail_of_a_large_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ollamalog, "TAIL", MIB)
    junk = ("x" * 99 + "\n") * (2 * MIB // 100)
    path = tmp_path / "ollama.log"
    path.write_text(LOG + junk + "\n".join(start(gpu(0, "RTX 3090", "24.0 GiB", "23.5 GiB"))) + "\n")
    assert file_capacity(LogFile(path)).total == 24 * GIB
    path.write_text(LOG + junk)
    cut = file_capacity(LogFile(path))
    assert not cut.known and cut.reason.startswith(f'ollama_log: {path} (its last 1 MiB): no "inference compute"')
    log = LogFile(tmp_path / "grown.log")
    log.path.write_text(LOG)
    assert file_capacity(log).total == 8 * GIB
    with log.path.open("a") as handle:  # grown by less than the tail: the start read before still counts
        handle.write(junk[: MIB // 2])
    assert file_capacity(log).total == 8 * GIB


@pytest.mark.parametrize("key", ["file", "command"])
def test_a_nul_in_the_setting_is_refused_when_the_configuration_is_read(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"nodes": [node("a", **{key: "journalctl\0 -u ollama"})]}, "gpu_router_config.yaml")
    assert str(caught.value) == (
        f"gpu_router_config.yaml: nodes[0].ollama_log.{key}: holds a NUL character (\\0): 'journalctl\\x00 -u ollama'"
    )


def test_a_nul_in_the_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text(
        "nodes:\n  - {url: 'http://127.0.0.1:1', gpu_source: ollama_log, ollama_log: {command: \"journalctl\\0\"}}\n"
    )
    done = run_cli("status", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpu-router: {path}: nodes[0].ollama_log.command: holds a NUL character (\\0): 'journalctl\\x00'"
    ]


def test_the_reader_answers_for_every_node_within_the_timeout(fifo: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.log"
    good.write_text(LOG)
    config = parse_config(
        {
            "nodes": [
                node("slow", "http://127.0.0.1:1", command=f"{sys.executable} -c 'import time; time.sleep(60)'"),
                node("fifo", "http://127.0.0.1:2", file=str(fifo)),
                node("good", "http://127.0.0.1:3", file=str(good)),
            ]
        }
    )
    began = time.monotonic()
    answers = within(5, lambda: CapacityReader(config).read(config.nodes, 1.0))
    assert time.monotonic() - began < 1.0 + 0.5  # its timeout, and room for a busy machine
    assert answers["good"].total == 8 * GIB
    assert not answers["slow"].known and not answers["fifo"].known
