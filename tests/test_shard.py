"""Shards of the fleet: N exporters split the nodes with no overlap and no gap, the same way everywhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests
import yaml

from gpurouter.cluster.config import parse_config
from gpurouter.cluster.shard import parse_shard, shard, shard_of

ROOT = Path(__file__).resolve().parent.parent
NAMES = [f"gpu-{i:05d}" for i in range(2000)]


def test_every_node_is_in_exactly_one_shard_and_the_shards_are_even() -> None:
    config = parse_config({"nodes": [{"name": n, "url": f"http://10.0.0.1:{11434 + i}"} for i, n in enumerate(NAMES)]})
    shards = [shard(config, i, 4) for i in range(1, 5)]
    names = [n.name for part in shards for n in part.nodes]
    assert sorted(names) == sorted(NAMES)  # no gap, no overlap
    assert all(400 <= len(part.nodes) <= 600 for part in shards), [len(p.nodes) for p in shards]
    assert shard(config, 1, 1) is config
    assert shards[0].priority_models == config.priority_models and shards[0].request_timeout == config.request_timeout


def test_one_more_shard_moves_few_nodes() -> None:
    moved = sum(shard_of(name, 4) != shard_of(name, 5) for name in NAMES)
    assert moved < 0.3 * len(NAMES)  # about 1/5 move (all of them to the new shard), not most of them
    assert all(shard_of(name, 5) == 5 for name in NAMES if shard_of(name, 4) != shard_of(name, 5))


def test_the_assignment_is_the_same_in_every_process() -> None:
    code = "from gpurouter.cluster.shard import shard_of; print([shard_of(f'gpu-{i:05d}', 7) for i in range(50)])"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([shard_of(name, 7) for name in NAMES[:50]])
    assert Counter(shard_of(name, 7) for name in NAMES).keys() == set(range(1, 8))


@pytest.mark.parametrize("text", ["", "1", "0/4", "5/4", "a/b", "1/0", "-1/2"])
def test_a_bad_shard_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


def cli(*args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, stderr=subprocess.PIPE)


def test_the_exporter_observes_only_its_shard(tmp_path: Path) -> None:
    nodes = [{"name": f"n{i}", "url": f"http://127.0.0.1:{1 + i}", "vram": "8GiB"} for i in range(12)]
    config = tmp_path / "gpu_router_config.yaml"
    config.write_text(yaml.safe_dump({"nodes": nodes, "request_timeout": 0.2}))
    mine = sorted(n["name"] for n in nodes if shard_of(n["name"], 3) == 2)
    process = cli("exporter", "--config", str(config), "--listen", "127.0.0.1:0", "--shard", "2/3")
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.search(rf"url=(http://127\.0\.0\.1:\d+)/metrics nodes={len(mine)} config=\S+ shard=2/3", line)
        assert match, line
        text = requests.get(f"{match.group(1)}/metrics", timeout=10).text
        assert sorted(re.findall(r'gpu_router_node_up\{node="(\w+)"\}', text)) == mine
    finally:
        process.kill()
        process.wait()
    process = cli("exporter", "--config", str(config), "--shard", "4/3")
    _, err = process.communicate(timeout=30)
    assert (
        process.returncode == 2 and err.strip() == "gpu-router exporter: --shard: I must be between 1 and N, got '4/3'"
    )
