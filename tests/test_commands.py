"""The decision subcommands against simulated fleets: the guide's examples 1–5 and use cases 1–3, optimize's
moves, dry runs and failures, JSON output and exit statuses."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import gpu_router

from gpurouter.units import MIB
from simulator.run import Fleet, fleet_from_dict

ROOT = Path(__file__).resolve().parent.parent
GTX = [{"name": "GTX 1050 Ti", "vram": "4GiB"}]
RTX = [{"name": "RTX 3070", "vram": "8GiB"}]


@contextlib.contextmanager
def cluster(tmp_path: Path, nodes: list[dict], priority: list, **settings) -> Iterator[tuple[Fleet, str]]:
    """A running fleet and a config file for it; a node's `vram` goes to the config (static capacity)."""
    fleet_nodes = [{"port": 0, "load_speed": 0, **{k: v for k, v in n.items() if k != "vram"}} for n in nodes]
    with Fleet(fleet_from_dict({"nodes": fleet_nodes})) as fleet:
        config = {
            "nodes": [{"name": n["name"], "url": fleet.urls[n["name"]], "vram": n["vram"]} for n in nodes],
            "priority_models": priority,
            "vram_safety_margin": 0.8,  # the guide's configuration states it
            "request_timeout": 5,
            "optimizer": {"load_timeout": 10},
            **settings,
        }
        path = tmp_path / "gpu_router_config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        yield fleet, str(path)


def counts(fleet: Fleet) -> dict[str, dict[str, dict[str, int]]]:
    return {name: fleet.node(name).counts() for name in fleet.urls}


def loaded(fleet: Fleet, node: str) -> dict[str, float]:
    """Model → GPU share on a node."""
    return {m["model"]: m["size_vram"] / m["size"] for m in fleet.node(node).state()["loaded"]}


# The guide's cluster: a 4 GiB GPU node with mxbai-embed-large loaded, a CPU node.
GUIDE = [
    {
        "name": "gpu",
        "vram": "4GiB",
        "gpus": GTX,
        "models": ["mxbai-embed-large", "nomic-embed-text", "llama3.2:3b", "llama3.1:latest"],
        "preload": [{"model": "mxbai-embed-large", "keep_alive": -1}],
    },
    {"name": "cpu", "vram": 0, "gpus": [], "models": ["mxbai-embed-large", "llama3.1:latest"]},
]


def test_example_1_status(tmp_path, capsys):
    with cluster(tmp_path, GUIDE, ["mxbai-embed-large", "llama3.2:3b", "llama3.1:latest"]) as (_, config):
        code, out, _ = gpu_router(config, "status", capsys=capsys)
    assert code == 0
    assert out.startswith("INTELLIGENT GPU ROUTING STATUS\n" + "=" * 70)
    assert "GPU Node: gpu (" in out and "CPU Node: cpu (" in out
    assert "Judged as: llama-server era; default context 4096 tokens (vram tier)" in out
    assert "   Total VRAM: 4096 MB\n   Usable VRAM: 3277 MB (80% safety)\n   Free VRAM: 2677 MB" in out
    assert "✅ mxbai-embed-large:latest (600 MB) - Already loaded fully on GPU" in out
    assert "✅ llama3.2:3b (2439 MB) - Fits in 3277 MB VRAM (2677 MB free)" in out  # 11.7 MiB more than it needs
    assert "❌ llama3.1:latest (5024 MB) - Model too large (5024 MB > 3277 MB usable VRAM)" in out


def test_example_2_route(tmp_path, capsys):
    with cluster(tmp_path, GUIDE, []) as (_, config):
        code, out, _ = gpu_router(config, "route", "mxbai-embed-large", capsys=capsys)
    assert code == 0
    assert "ROUTING DECISION FOR: mxbai-embed-large:latest" in out
    assert "Model size: 600 MB at 512 tokens (llama-server, observed)" in out
    assert "✅ gpu (GPU): Already loaded fully on GPU (600 MB)" in out
    assert "❌ cpu (CPU): Node has no GPU" in out
    assert "Best choice: gpu (GPU)\n      Reason: Already loaded fully on GPU (600 MB)" in out


def test_example_2_route_to_free_vram(tmp_path, capsys):
    nodes = [{**GUIDE[0], "preload": []}, GUIDE[1]]
    with cluster(tmp_path, nodes, []) as (_, config):
        code, out, _ = gpu_router(config, "route", "mxbai-embed-large", capsys=capsys)
    assert code == 0 and "Best choice: gpu (GPU)\n      Reason: Fits in 3277 MB VRAM (3277 MB free)" in out


def test_example_3_check_large_model(tmp_path, capsys):
    with cluster(tmp_path, GUIDE, []) as (_, config):
        code, out, _ = gpu_router(config, "check", "llama3.1:latest", capsys=capsys)
    assert code == 0
    assert "CHECKING FIT FOR: llama3.1:latest" in out
    assert "Model size: 5024 MB at 4096 tokens (llama-server, estimated)" in out
    assert "❌ gpu: Model too large (5024 MB > 3277 MB usable VRAM)" in out
    assert "❌ cpu: Node has no GPU" in out
    assert out.rstrip().endswith("Result: Model must run on CPU")


def test_example_4_optimize(tmp_path, capsys):
    nodes = [{**GUIDE[0], "preload": []}, GUIDE[1]]
    with cluster(tmp_path, nodes, ["mxbai-embed-large", "nomic-embed-text"]) as (fleet, config):
        code, out, _ = gpu_router(config, "optimize", capsys=capsys)
        on_gpu = loaded(fleet, "gpu")
    assert code == 0, out
    assert "OPTIMIZING 2 PRIORITY MODELS" in out and "✅ Best choice: gpu (GPU)" in out
    assert "Executing Routing Plan" in out
    assert "Loading mxbai-embed-large:latest on GPU at gpu..." in out
    assert "✅ mxbai-embed-large:latest now on GPU on gpu" in out
    assert on_gpu == {"mxbai-embed-large:latest": 1.0, "nomic-embed-text:latest": 1.0}


def test_example_5_models(tmp_path, capsys):
    with cluster(tmp_path, GUIDE, ["mxbai-embed-large"], model_sizes={"my-custom-model": 2500}) as (_, config):
        code, out, _ = gpu_router(config, "models", capsys=capsys)
    assert code == 0 and out.startswith("KNOWN MODELS DATABASE")
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    for name in ("all-minilm:latest", "mxbai-embed-large:latest", "llama3.1:latest", "codellama:13b"):
        assert name in rows
    assert "my-custom-model:latest" in rows
    by_name = {line.split()[0]: line for line in out.splitlines()[3:]}
    assert "2500 MB (2.44 GB)  llama-server, 4096 tokens, configured" in by_name["my-custom-model:latest"]
    assert "600 MB (0.59 GB)  llama-server, 512 tokens, observed; priority #1" in by_name["mxbai-embed-large:latest"]
    sizes = [int(line.split()[1]) for line in out.splitlines()[3:]]
    assert sizes == sorted(sizes)  # smallest first, like the guide's table


def test_use_case_1_mixed_cluster(tmp_path, capsys):
    cpu = {"gpus": [], "vram": 0, "models": ["llama3.1:latest", "mxbai-embed-large"]}
    nodes = [
        {"name": "node1", **cpu},
        {"name": "node2", "vram": "4GiB", "gpus": GTX, "models": ["mxbai-embed-large", "llama3.1:latest"]},
        {"name": "node3", **cpu},
    ]
    with cluster(tmp_path, nodes, ["mxbai-embed-large"]) as (fleet, config):
        code, out, _ = gpu_router(config, "route", "mxbai-embed-large", capsys=capsys)
        assert code == 0 and "Best choice: node2 (GPU)" in out
        code, out, _ = gpu_router(config, "--json", "route", "llama3.1:latest", capsys=capsys)
        decision = json.loads(out)
        assert code == 0 and decision["processor"] == "CPU" and decision["node"] in ("node1", "node3")
        assert "has no GPU" in decision["reason"]
        assert gpu_router(config, "optimize", capsys=capsys)[0] == 0
        assert loaded(fleet, "node2") == {"mxbai-embed-large:latest": 1.0}


def test_use_case_2_development_workstation_after_restart(tmp_path, capsys):
    nodes = [{"name": "localhost", "vram": "8GiB", "gpus": RTX, "models": ["mxbai-embed-large", "llama3.2:3b"]}]
    with cluster(tmp_path, nodes, ["mxbai-embed-large", "llama3.2:3b"], check_interval=60) as (fleet, config):
        assert gpu_router(config, "optimize", capsys=capsys)[0] == 0
        assert loaded(fleet, "localhost") == {"mxbai-embed-large:latest": 1.0, "llama3.2:3b": 1.0}
        fleet.node("localhost").inject("restart")
        assert loaded(fleet, "localhost") == {}
        code, out, _ = gpu_router(config, "optimize", capsys=capsys)
        assert code == 0 and "2 model(s) put on GPU" in out
        assert loaded(fleet, "localhost") == {"mxbai-embed-large:latest": 1.0, "llama3.2:3b": 1.0}
        assert counts(fleet)["localhost"]["llama3.2:3b"] == {"loads": 2, "unloads": 1}


def test_use_case_3_production_cluster(tmp_path, capsys):
    models = ["mxbai-embed-large", "nomic-embed-text", "llama3.2:3b", "codellama:13b"]
    nodes = [
        {"name": "node1", "vram": "8GiB", "gpus": RTX, "models": models},
        {"name": "node2", "vram": "8GiB", "gpus": RTX, "models": models},
        {"name": "node3", "vram": "4GiB", "gpus": GTX, "models": models},
    ]
    priority = ["mxbai-embed-large", "nomic-embed-text", "llama3.2:3b"]
    with cluster(tmp_path, nodes, priority) as (fleet, config):
        code, out, _ = gpu_router(config, "--json", "optimize", capsys=capsys)
        result = json.loads(out)
        assert code == 0 and result["ok"] and not result["dry_run"]
        assert {o["model"] for o in result["outcomes"] if o["action"] == "load" and o["ok"]} == {
            "mxbai-embed-large:latest",
            "nomic-embed-text:latest",
            "llama3.2:3b",
        }
        on_gpu = {m for n in fleet.urls for m, share in loaded(fleet, n).items() if share == 1.0}
        assert on_gpu == {"mxbai-embed-large:latest", "nomic-embed-text:latest", "llama3.2:3b"}
        code, out, _ = gpu_router(config, "--json", "route", "codellama:13b", capsys=capsys)
        assert code == 0 and json.loads(out)["processor"] == "CPU"  # large models use CPU


# ------------------------------------------------------------------------------------------ optimize


CPU_COPY = [
    {
        "name": "gpu-small",
        "vram": "4GiB",
        "gpus": GTX,
        "models": ["mxbai-embed-large"],
        "preload": [{"model": "mxbai-embed-large", "num_gpu": 0, "keep_alive": -1}],
    },
    {"name": "gpu-large", "vram": "8GiB", "gpus": RTX, "models": ["mxbai-embed-large", "llama3.1:latest"]},
]


def test_optimize_moves_a_cpu_copy_to_gpu_then_removes_it_and_a_second_run_does_nothing(tmp_path, capsys):
    with cluster(tmp_path, CPU_COPY, ["mxbai-embed-large"]) as (fleet, config):
        assert loaded(fleet, "gpu-small") == {"mxbai-embed-large:latest": 0.0}
        code, out, _ = gpu_router(config, "optimize", capsys=capsys)
        assert code == 0, out
        lines = out.splitlines()
        load = lines.index("Loading mxbai-embed-large:latest on GPU at gpu-large...")
        removal = lines.index("Removing the CPU copy of mxbai-embed-large:latest from gpu-small...")
        verified = next(i for i, line in enumerate(lines) if "now on GPU on gpu-large" in line)
        assert load < verified < removal
        assert loaded(fleet, "gpu-large") == {"mxbai-embed-large:latest": 1.0} and loaded(fleet, "gpu-small") == {}
        before = counts(fleet)
        code, out, _ = gpu_router(config, "optimize", capsys=capsys)
        assert code == 0 and "Already on GPU: gpu-large" in out and "Nothing to do." in out
        assert counts(fleet) == before


def test_optimize_dry_run_changes_nothing(tmp_path, capsys):
    with cluster(tmp_path, CPU_COPY, ["mxbai-embed-large"]) as (fleet, config):
        before = counts(fleet)
        code, out, _ = gpu_router(config, "optimize", "--dry-run", capsys=capsys)
        assert code == 0 and "dry run: --dry-run" in out
        assert "- load mxbai-embed-large:latest on GPU at gpu-large" in out
        assert out.count("load mxbai-embed-large:latest on GPU at gpu-large") == 1  # each step said once
        assert "Nothing changed: 2 step(s) above would run." in out
        assert "- unload mxbai-embed-large:latest from gpu-small" in out
        assert counts(fleet) == before


def test_auto_optimize_false_is_a_dry_run_unless_apply(tmp_path, capsys):
    with cluster(tmp_path, CPU_COPY, ["mxbai-embed-large"], auto_optimize=False) as (fleet, config):
        before = counts(fleet)
        code, out, _ = gpu_router(config, "--json", "optimize", capsys=capsys)
        result = json.loads(out)
        assert code == 0 and result["dry_run"] and result["mode"] == "monitor_only"
        assert result["outcomes"] == [] and len(result["plan"]["steps"]) == 2
        assert counts(fleet) == before
        assert gpu_router(config, "optimize", "--apply", capsys=capsys)[0] == 0
        assert loaded(fleet, "gpu-large") == {"mxbai-embed-large:latest": 1.0}


def test_a_load_that_cannot_land_on_gpu_fails_leaves_the_model_serving_and_exits_1(tmp_path, capsys):
    with cluster(tmp_path, CPU_COPY, ["mxbai-embed-large"]) as (fleet, config):
        fleet.node("gpu-large").inject("vram_hog", bytes=8 * 1024 * MIB)  # static capacity cannot see it
        code, out, _ = gpu_router(config, "optimize", capsys=capsys)
        assert code == 1
        assert "❌ landed 0% on GPU" in out and "still served on gpu-small" in out
        assert "skipped: load of mxbai-embed-large:latest on gpu-large failed" in out
        assert "1 step(s) failed" in out
        assert loaded(fleet, "gpu-small") == {"mxbai-embed-large:latest": 0.0}
        assert loaded(fleet, "gpu-large") == {}


# ------------------------------------------------------------------------------- errors and formats


def test_unknown_model_is_a_one_line_error_with_close_matches(tmp_path, capsys):
    with cluster(tmp_path, GUIDE, []) as (_, config):
        code, out, err = gpu_router(config, "check", "lama3.1", capsys=capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "unknown model 'lama3.1'" in err and "llama3.1:latest" in err


def test_no_node_answering_exits_1(tmp_path, capsys):
    with cluster(tmp_path, GUIDE, ["mxbai-embed-large"]) as (fleet, config):
        for name in fleet.urls:
            fleet.node(name).inject("down")
        code, out, err = gpu_router(config, "status", capsys=capsys)
        assert code == 1 and "DOWN" in out
        # each node's error once (in the answer), the node names on stderr, and no other name for a priority model
        assert err == f"gpu-router: no node answered ({', '.join(fleet.urls)})\n"
        assert "did you mean" not in out and "unknown whether it is installed: no node answered" in out
        assert gpu_router(config, "optimize", capsys=capsys)[0] == 1


def test_route_exits_1_when_no_node_can_run_the_model(tmp_path, capsys):
    with cluster(tmp_path, GUIDE, []) as (_, config):
        code, out, _ = gpu_router(config, "route", "codellama:13b", capsys=capsys)
    assert code == 1 and "No node can run it: not installed on any node" in out


def test_optimize_exits_1_when_a_priority_model_is_left_off_gpu_while_a_node_is_down(tmp_path, capsys):
    with cluster(tmp_path, CPU_COPY, ["llama3.1:latest"]) as (fleet, config):
        fleet.node("gpu-large").inject("down")
        code, out, _ = gpu_router(config, "optimize", capsys=capsys)
    assert code == 1 and "❌ Cannot put on GPU" in out and "Nodes that did not answer: gpu-large" in out


def test_bad_configuration_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("nodes: []\n", encoding="utf-8")
    code, _, err = gpu_router(str(path), "status", capsys=capsys)
    assert code == 2 and "bad.yaml: nodes" in err


def test_report_shows_where_each_priority_model_is_and_what_optimize_would_do(tmp_path, capsys):
    with cluster(tmp_path, CPU_COPY, ["mxbai-embed-large", "llama3.1:latest"]) as (fleet, config):
        before = counts(fleet)
        code, out, _ = gpu_router(config, "report", capsys=capsys)
        assert code == 0 and "INTELLIGENT GPU ROUTING STATUS" in out and "PRIORITY MODELS" in out
        assert (
            "1. mxbai-embed-large:latest: 606 MB at 512 tokens (llama-server, estimated)\n   Where: gpu-small CPU"
            in out
        )
        assert "load mxbai-embed-large:latest on GPU at gpu-large" in out  # current sizes: both fit gpu-large
        assert "2. llama3.1:latest: 5024 MB at 4096 tokens (llama-server, estimated)\n   Where: not loaded" in out
        code, out, _ = gpu_router(config, "--json", "report", capsys=capsys)
        report = json.loads(out)
        assert [m["model"] for m in report["priority_models"]] == ["mxbai-embed-large:latest", "llama3.1:latest"]
        assert report["priority_models"][0]["placements"][0]["gpu_ratio"] == 0
        assert counts(fleet) == before


@pytest.mark.parametrize("command", [["status"], ["check", "llama3.1:latest"], ["models"]])
def test_json_gives_one_document(tmp_path, capsys, command):
    with cluster(tmp_path, GUIDE, ["mxbai-embed-large"]) as (_, config):
        code, out, _ = gpu_router(config, "--json", *command, capsys=capsys)
    document = json.loads(out)
    assert code == 0 and document["command"] == command[0]
    if command[0] == "status":
        gpu = document["nodes"][0]
        assert gpu["vram_usable_bytes"] == int(4096 * MIB * 0.8) and gpu["loaded"][0]["gpu_ratio"] == 1.0
    if command[0] == "check":
        assert [v["kind"] for v in document["verdicts"]] == ["too_large", "no_gpu"]
        assert (document["result"], document["reason"]) == ("cpu", "Model must run on CPU")


def test_command_line_as_a_subprocess(tmp_path):
    with cluster(tmp_path, GUIDE, ["mxbai-embed-large"]) as (_, config):
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "--config", config, "route", "mxbai-embed-large", "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["node"] == "gpu"
