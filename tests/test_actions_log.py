"""The status page shows every process's actions (through `actions_log`), when the next reconcile pass runs,
and a node that is down with its era and context unknown."""

from __future__ import annotations

import time
from pathlib import Path

import requests
import yaml
from conftest import gpu_router

from cli.localstack import wait_for
from gpurouter.act import journal
from gpurouter.act.jobs import ActionRecord, JobQueue, JobResult
from gpurouter.cluster.config import load_config, parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.ollama import OllamaClient
from optimizer.service import start_optimizer
from optimizer.statuspage import render
from proxy.heal import Healer
from simulator.run import Fleet, fleet_from_dict

GPU = [{"name": "RTX 3070", "vram": "8GiB"}]
MODELS = ["mxbai-embed-large", "all-minilm"]


def _config(tmp_path: Path, fleet: Fleet, **settings: object) -> Path:
    path = tmp_path / "gpu_router_config.yaml"
    raw = {
        "nodes": [{"name": "gpu", "url": fleet.urls["gpu"], "vram": "8GiB"}],
        "priority_models": MODELS,
        "auto_optimize": False,  # no reconcile loop acts: every action below is the CLI's or the proxy's
        "request_timeout": 5,
        "actions_log": str(tmp_path / "actions.jsonl"),
        **settings,
    }
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_the_page_shows_the_clis_and_the_proxys_actions_from_the_shared_log(tmp_path: Path, capsys) -> None:
    with Fleet(fleet_from_dict({"nodes": [{"name": "gpu", "gpus": GPU, "models": MODELS}]})) as fleet:
        path = _config(tmp_path, fleet)
        code, _, _ = gpu_router(str(path), "optimize", "--apply", capsys=capsys)
        assert code == 0
        client = OllamaClient(fleet.urls["gpu"])
        client.unload("all-minilm:latest", embedding=True)
        client.close()
        healing = load_config(_config(tmp_path, fleet, auto_optimize=True))  # the proxy heals in-process
        with Observer(healing) as observer:
            healer = Healer(healing, observer)
            try:
                assert healer.ask("all-minilm")
                wait_for(lambda: any(r["by"] == "proxy" for r in journal.read(healing.actions_log, 10)), 30, "the heal")
            finally:
                healer.close()
        optimizer = start_optimizer(load_config(path), reconcile=False)
        try:
            actions = requests.get(f"{optimizer.url}/api/v1/actions", timeout=10).json()["actions"]
            page = requests.get(f"{optimizer.url}/", timeout=10).text
        finally:
            optimizer.stop()
    by = {(a["by"], a["model"], a["action"], a["outcome"]) for a in actions}
    assert ("cli", "mxbai-embed-large:latest", "load", "success") in by
    assert ("cli", "all-minilm:latest", "load", "success") in by
    assert ("proxy", "all-minilm:latest", "load", "success") in by
    assert "<td>cli</td>" in page and "<td>proxy</td>" in page and "No actions yet." not in page


def test_a_dry_run_writes_nothing_to_the_log(tmp_path: Path, capsys) -> None:
    with Fleet(fleet_from_dict({"nodes": [{"name": "gpu", "gpus": GPU, "models": MODELS}]})) as fleet:
        path = _config(tmp_path, fleet)
        assert gpu_router(str(path), "optimize", "--dry-run", capsys=capsys)[0] == 0
    assert not (tmp_path / "actions.jsonl").exists()


def test_the_log_is_read_back_bounded_and_rotated(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "actions.jsonl"
    row = {"time": 1.0, "model": "m:latest", "node": None, "action": "load", "outcome": "success", "by": "cli"}
    journal.append(log, [row, {**row, "time": 0.5}])
    with log.open("a") as file:
        file.write('{"cut by a rotation\nnot json\n{"time": "x"}\n')
    assert [r["time"] for r in journal.read(log, 10)] == [0.5, 1.0]  # oldest first, broken lines left out
    monkeypatch.setattr(journal, "MAX_BYTES", 10)
    journal.append(log, [{**row, "time": 2.0}])
    assert [r["time"] for r in journal.read(log, 10)] == [2.0] and (tmp_path / "actions.jsonl.1").exists()


def test_the_page_says_when_the_next_pass_runs(tmp_path: Path) -> None:
    with Fleet(fleet_from_dict({"nodes": [{"name": "gpu", "gpus": GPU, "models": MODELS}]})) as fleet:
        config = load_config(_config(tmp_path, fleet, check_interval=300))
        optimizer = start_optimizer(config)
        try:
            page = ""

            def shown() -> bool:
                nonlocal page
                page = requests.get(f"{optimizer.url}/", timeout=10).text
                return "next pass in" in page

            wait_for(shown, 30, "the first pass to end")
        finally:
            optimizer.stop()
    seconds = int(page.split("next pass in ", 1)[1].split(" s", 1)[0])
    assert 250 < seconds <= 300 and "(monitor only)" in page


def test_a_node_that_is_down_shows_its_era_and_context_as_unknown() -> None:
    node = {
        "name": "gpu-large",
        "url": "http://127.0.0.1:1",
        "up": False,
        "version": None,
        "era": "llama_server",  # what the status document guesses for a node whose version is not known
        "default_context": 4096,
        "default_context_source": "the era's default",
        "error": "connection refused",
    }
    html = render({"taken_at": time.time(), "nodes": [node], "priority_models": []}, [])
    assert "era unknown · default context unknown" in html
    assert 'data-era=""' in html and 'data-context=""' in html and "4096 tokens" not in html


def test_a_log_that_cannot_be_written_still_shows_the_optimizers_own_actions(tmp_path: Path) -> None:
    config = parse_config({"nodes": ["http://127.0.0.1:1"], "actions_log": str(tmp_path / "no-such-dir" / "a.jsonl")})
    record = ActionRecord(1.0, "m:latest", "n", "load", "success", 0.5)
    queue = JobQueue(config, lambda job: JobResult(ok=True, actions=(record,))).start()
    try:
        queue.submit("m")
        assert queue.wait_idle(10)
        assert queue.actions() == [record]  # and a warning was logged
    finally:
        queue.stop()
