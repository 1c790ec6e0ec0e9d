"""Issue 12, operator-grade behaviour: every message true, every flag real, one log format, one answer.

Each test asserts one point of the issue against the simulated demo cluster (or the code that says it)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from conftest import gpu_router
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from cli import demo
from cli.localstack import wait_for
from cli.main import main
from gpurouter import logfmt, render
from gpurouter.act.execute import Outcome
from gpurouter.cluster.config import ConfigError, load_config
from gpurouter.cluster.observe import Observer
from gpurouter.decide.placement import Step
from gpurouter.render import status_json
from optimizer import statuspage
from optimizer.app import create_app
from simulator.faults import check_fault
from simulator.fleet import FleetSpec
from simulator.run import DEMO_FLEET, Fleet, load_fleet

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = {Path(f).stem: json.loads(Path(f).read_text()) for f in glob.glob(str(ROOT / "docs" / "schemas" / "*.json"))}
REGISTRY = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in SCHEMAS.values())


def demo_fleet_spec() -> FleetSpec:
    """The built-in demo cluster on ephemeral ports, loads instant."""
    spec = load_fleet(DEMO_FLEET)
    nodes = tuple(dataclasses.replace(n, port=0, load_speed=0) for n in spec.nodes)
    return dataclasses.replace(spec, control_port=0, nodes=nodes)


@contextlib.contextmanager
def demo_cluster(tmp_path: Path, priority: list[str] | None = None) -> Iterator[tuple[Fleet, str]]:
    """The demo cluster and the router configuration `gpu-router simulate` writes for it."""
    with Fleet(demo_fleet_spec()) as fleet:
        config = fleet.router_config()
        if priority is not None:
            config["priority_models"] = priority
        path = tmp_path / "gpu_router_config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        yield fleet, str(path)


def schema_errors(name: str, document: dict) -> list[str]:
    validator = Draft202012Validator(SCHEMAS[name], registry=REGISTRY)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


# ------------------------------------------------------------------------------------------ untrue (2–8)


def test_2_the_fit_matrix_says_a_node_is_down_not_that_models_are_not_installed(tmp_path):
    with demo_cluster(tmp_path) as (fleet, path):
        fleet.node("gpu-small").inject("down")
        with Observer(load_config(path)) as observer:
            state = observer.poll()
        page = statuspage.render(status_json(state, state.taken_at), [])
    matrix = page.split("Where each model fits", 1)[1]
    rows = re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", matrix)
    assert rows
    for _, cells in rows:
        small = re.findall(r"<td[^>]*>.*?</td>", cells)[0]  # gpu-small's column comes first
        assert "node down" in small and "not installed" not in small, small
    # every cell the same shape: a mark, the verdict in words, its reason
    for _, cells in rows:
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", cells):
            assert re.fullmatch(r"[✓✗] [a-zA-Z ]+<br><small>.+</small>", cell), cell


def test_3_did_you_mean_offers_installed_models_first(tmp_path, capsys):
    with demo_cluster(tmp_path) as (_, path):
        code, out, err = gpu_router(path, "route", "llama9", capsys=capsys)
    assert code == 2 and out == ""
    assert "llama3.2:1b" in err and "llama3.2:latest" not in err  # installed on gpu-small; the catalog alias not


def test_4_a_misspelt_priority_model_is_called_not_installed_and_flagged(tmp_path, capsys):
    with demo_cluster(tmp_path, ["mxbai-embed-larg", "llama3.1:latest"]) as (_, path):
        for command in ("status", "report"):
            code, out, _ = gpu_router(path, command, capsys=capsys)
            assert code == 2, command
            assert (
                "❌ Priority model mxbai-embed-larg:latest: not installed on any node "
                "(did you mean mxbai-embed-large:latest?)" in out
            )
            assert "set model_sizes" not in out
        code, out, _ = gpu_router(path, "--json", "status", capsys=capsys)
        assert code == 2 and json.loads(out)["priority_models"][0]["installed"] is False
        code, _, err = gpu_router(path, "check", "mxbai-embed-larg", capsys=capsys)
        assert code == 2 and "did you mean mxbai-embed-large:latest" in err


def test_4_a_priority_model_installed_nowhere_is_exit_2_and_named_in_every_subcommand(tmp_path, capsys):
    with demo_cluster(tmp_path, ["nosuchmodel", "llama3.1:latest"]) as (fleet, path):
        said = "priority model nosuchmodel:latest: not installed on any node"
        for command in (["models"], ["route", "llama3.1"], ["check", "llama3.1"], ["--json", "models"]):
            code, out, err = gpu_router(path, *command, capsys=capsys)
            assert code == 2 and said in err, command
        for command in (["route", "nosuchmodel"], ["check", "nosuchmodel"]):
            code, out, err = gpu_router(path, *command, capsys=capsys)
            assert code == 2 and err.count(said) == 1 and "not in the catalog" not in err, command
        code, out, _ = gpu_router(path, "models", capsys=capsys)
        assert re.search(
            r"nosuchmodel:latest +\? MB  VRAM need unknown: not installed on any node.*; priority #1\n", out
        )
        app = create_app(load_config(path), state_max_age=0)
        try:
            answer = app.test_client().get("/api/v1/check?model=nosuchmodel")
            assert answer.status_code == 404 and said in answer.get_json()["error"]
        finally:
            app.extensions["gpu_router"].queue.stop()
        fleet.node("gpu-small").inject("down")  # it may be installed there: incomplete, not misconfigured
        code, _, err = gpu_router(path, "models", capsys=capsys)
        assert code == 1 and said not in err


def test_4_every_subcommand_names_the_node_that_did_not_answer(tmp_path, capsys):
    with demo_cluster(tmp_path) as (fleet, path):
        fleet.node("gpu-small").inject("down")
        commands = (["status"], ["models"], ["report"], ["optimize", "--dry-run"], ["route", "llama3.1"])
        for command in (*commands, ["check", "llama3.1"]):
            for form in ([], ["--json"]):
                code, out, err = gpu_router(path, *form, *command, capsys=capsys)
                assert code == 1 and "gpu-small" in out + err, (form, command)
        code, out, _ = gpu_router(path, "--json", "models", capsys=capsys)
        assert json.loads(out)["nodes_down"] == ["gpu-small"]
        code, out, _ = gpu_router(path, "models", capsys=capsys)
        assert out.splitlines()[-1].startswith("Nodes that did not answer: gpu-small (")


def test_7_where_a_model_is_loaded_is_unknown_on_a_node_that_did_not_answer(tmp_path, capsys):
    with demo_cluster(tmp_path) as (fleet, path):
        fleet.node("gpu-small").inject("down")
        code, out, _ = gpu_router(path, "report", capsys=capsys)
        assert code == 1 and "not loaded anywhere" not in out
        assert "Where: not loaded on any node that answered; unknown on gpu-small (did not answer)" in out


def test_6_a_slow_node_changes_no_other_nodes_figures_and_a_missing_show_is_an_incomplete_answer(tmp_path, capsys):
    with demo_cluster(tmp_path) as (fleet, path):
        code, out, _ = gpu_router(path, "--json", "check", "codellama:7b", capsys=capsys)
        before = json.loads(out)["needs"]
        assert code == 0 and {n["source"] for n in before} == {"estimated"}
        fleet.node("cpu-node").inject("slow", latency_ms=1500)
        code, out, err = gpu_router(path, "--json", "check", "codellama:7b", capsys=capsys)
        assert (code, json.loads(out)["needs"], err) == (0, before, "")
        fleet.node("gpu-large").inject("slow", latency_ms=1500)  # every holder slow: /api/show comes too late
        code, out, err = gpu_router(path, "check", "codellama:7b", capsys=capsys)
        assert code == 1 and "gpu-router: incomplete answer: /api/show codellama:7b on " in err


def test_5_check_names_the_node_that_is_down_instead_of_saying_cpu(tmp_path, capsys):
    with demo_cluster(tmp_path) as (fleet, path):
        fleet.node("gpu-large").inject("down")
        code, out, _ = gpu_router(path, "check", "llama3.1:latest", capsys=capsys)
    assert code == 1
    result = out.rsplit("Result: ", 1)[1]
    assert "Model must run on CPU" not in result and "gpu-large did not answer" in result


def test_6_the_same_verdict_gets_the_same_exit_status(tmp_path, capsys):
    with demo_cluster(tmp_path) as (fleet, path):
        # installed only on a node that is in no state to run it: no node can run it, for route and check alike
        fleet.node("cpu-node").inject("down")
        route_code = gpu_router(path, "route", "codellama:7b", capsys=capsys)[0]
        check_code = gpu_router(path, "check", "codellama:7b", capsys=capsys)[0]
        assert route_code == check_code == 1
        for command in (["status"], ["models"], ["report"], ["optimize", "--dry-run"]):
            assert gpu_router(path, *command, capsys=capsys)[0] == 1, command  # a node did not answer
        fleet.node("cpu-node").clear()
        for command in (["status"], ["models"], ["report"], ["optimize", "--dry-run"], ["check", "codellama:7b"]):
            assert gpu_router(path, *command, capsys=capsys)[0] == 0, command
    help_text = subprocess.run(
        [sys.executable, "-m", "cli.main", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    assert "exit status:" in help_text and "    1  the job failed" in help_text


def test_7_route_and_optimize_both_say_when_the_plan_places_a_model_elsewhere(tmp_path, capsys):
    with demo_cluster(tmp_path) as (_, path):
        code, out, _ = gpu_router(path, "route", "mxbai-embed-large", capsys=capsys)
        assert code == 0 and "Best choice: gpu-large (GPU)" in out
        note = "optimize places it on gpu-small, while routing it alone picks gpu-large (GPU): the plan for all"
        assert note in out and "keeps gpu-large for llama3.1:latest" in out
        code, out, _ = gpu_router(path, "optimize", "--dry-run", capsys=capsys)
        assert code == 0 and note in out
        code, out, _ = gpu_router(path, "--json", "route", "mxbai-embed-large", capsys=capsys)
        differs = json.loads(out)["plan_differs"]
        assert (differs["route_node"], differs["plan_node"]) == ("gpu-large", "gpu-small")


# --------------------------------------------------------------------------------------- flags (9–14)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["exporter", "--json"], "unrecognized arguments: --json"),
        (["--json", "optimizer"], "`gpu-router optimizer` prints no JSON document"),
        (["--json", "simulate"], "`gpu-router simulate` prints no JSON document"),
        (["demo", "--json"], "unrecognized arguments: --json"),
        (["simulate", "--config", "/nonexistent.yaml"], "unrecognized arguments: --config"),
        (["--config", "/nonexistent.yaml", "simulate"], "reads no router configuration"),
        (["--config", "x.yaml", "demo", "--once"], "reads no router configuration"),
    ],
)
def test_9_flags_that_would_do_nothing_are_refused(argv, words, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["optimize", "--a"], "usage: gpu-router optimize "),
        (["optimize", "--dry"], "usage: gpu-router optimize "),
        (["status", "--js"], "usage: gpu-router status "),
        (["--conf", "x.yaml", "status"], "usage: gpu-router "),
        (["report", "--conf", "x.yaml"], "usage: gpu-router report "),
        (["exporter", "--list", "127.0.0.1:0"], "usage: gpu-router exporter "),
        (["status", "--bogus"], "usage: gpu-router status "),
    ],
)
def test_9_no_flag_may_be_abbreviated_and_refusals_show_the_subcommand_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(usage), err


def test_9_every_argument_parser_in_the_project_refuses_abbreviations():
    sources = [p for p in ROOT.rglob("*.py") if "tests" not in p.parts and ".venv" not in p.parts]
    makers = [(p, m) for p in sources for m in re.findall(r"ArgumentParser\((?:[^()]|\([^()]*\))*\)", p.read_text())]
    assert makers and [str(p) for p, m in makers if "allow_abbrev=False" not in m] == []
    assert "allow_abbrev=False" in Path(ROOT / "cli" / "main.py").read_text().split("add_parser(")[1].split(")")[0]


def test_11_a_reader_that_stops_early_gets_no_traceback_and_the_answer_keeps_its_status(tmp_path):
    with demo_cluster(tmp_path) as (fleet, path):
        fleet.node("gpu-small").inject("down")
        for args, expected in ((["report", "--json"], 1), (["models"], 1), (["route", "nope-model"], 2)):
            process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "--config", path, *args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert process.stdout is not None and process.stderr is not None
            process.stdout.close()  # `| true`: the reader is gone before the first line
            err = process.stderr.read()
            assert process.wait(timeout=60) == expected, err
            assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_12_simulate_prints_a_router_configuration_and_the_next_command(tmp_path):
    fleet_file = tmp_path / "fleet.yaml"
    raw = yaml.safe_load(DEMO_FLEET.read_text())
    raw["control_port"] = 0
    for node in raw["nodes"]:
        node["port"] = 0
    fleet_file.write_text(yaml.safe_dump(raw))
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "simulate", "--fleet", str(fleet_file)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    errors: list[str] = []
    for stream, into in ((process.stdout, lines), (process.stderr, errors)):
        threading.Thread(target=lambda s=stream, i=into: i.extend(line.strip() for line in s), daemon=True).start()
    config = ""
    try:
        wait_for(lambda: len(lines) >= 5 and errors, 30, f"the fleet's lines (got {lines} {errors})")
        assert [line.split(" ", 1)[0] for line in lines] == ["gpu-small", "cpu-node", "gpu-large", "control", "config"]
        config = lines[4].split(" ", 1)[1]
        assert f"gpu-router --config {config} status" in errors[0]
        status = subprocess.run(
            [sys.executable, "-m", "cli.main", "--config", config, "status"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "Nodes: 3/3 up" in status.stdout
        # every event of the simulator is one logfmt line: loads, unloads, out-of-memory answers, faults
        control, small = lines[3].split(" ", 1)[1], lines[0].split(" ", 1)[1]
        fault = {"fault": "vram_hog", "bytes": 3900 * 2**20}
        assert requests.post(f"{control}/nodes/gpu-small/fault", json=fault, timeout=10).ok
        ask = {"model": "llama3.2:3b", "prompt": "hi", "stream": False, "keep_alive": 0, "options": {"num_gpu": 99}}
        assert requests.post(f"{small}/api/generate", json=ask, timeout=30).status_code == 500
        assert requests.delete(f"{control}/nodes/gpu-small/fault", timeout=10).ok
        assert requests.post(f"{small}/api/generate", json=ask, timeout=30).ok
        wanted = [
            "level=WARNING event=simulator.fault node=gpu-small fault=vram_hog outcome=set bytes=4089446400",
            "level=WARNING event=simulator.oom node=gpu-small model=llama3.2:3b error=",
            "level=INFO event=simulator.fault node=gpu-small fault=vram_hog outcome=cleared",
            "level=INFO event=simulator.load node=gpu-small model=llama3.2:3b size=",
            "level=INFO event=simulator.unload node=gpu-small model=llama3.2:3b reason=keep_alive",
        ]
        wait_for(lambda: len(errors) > len(wanted), 10, "the simulator's event lines")
        found = [next((i for i, e in enumerate(errors) if w in e), None) for w in wanted]
        assert None not in found and found == sorted(found), errors
        assert all(re.match(r"time=\S+ level=[A-Z]+ event=", e) for e in errors[1:]), errors
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    assert not Path(config).exists()


def test_14_a_port_clash_names_the_port_and_the_server(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        fleet_file = tmp_path / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump({"control_port": 0, "nodes": [{"name": "a", "port": port}]}))
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "simulate", "--fleet", str(fleet_file)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    said = f"cannot listen on 127.0.0.1:{port}: address already in use"
    assert f"node a: {said}" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.parametrize("server", ["exporter", "optimizer", "proxy"])
def test_14_every_server_says_a_taken_port_the_same_way(server, tmp_path):
    config = tmp_path / "gpu_router_config.yaml"
    config.write_text("nodes: [http://127.0.0.1:9]\n")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", server, "--config", str(config), "--listen", f"127.0.0.1:{port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"gpu-router {server}: cannot listen on 127.0.0.1:{port}: address already in use\n" in done.stderr


def test_12_messages_cut_a_long_name_cleanly_and_name_what_is_accepted(tmp_path):
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"url": "http://127.0.0.1:9", "y" * 300: 1}]}))
    with pytest.raises(ConfigError) as refused:
        load_config(str(path))
    assert f"nodes[0].{'y' * 60}…: unknown key (known keys: " in str(refused.value)
    with pytest.raises(ValueError, match=r"fault 'slow' takes no parameter 'delay' \(its parameters: latency_ms\)"):
        check_fault("slow", {"delay": 5})


def test_14_the_demo_port_probe_counts_a_port_in_time_wait_as_free():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server side closes first: its port is left in TIME_WAIT
    wait_for(lambda: client.recv(1) == b"", what="the close to reach the client")
    client.close()
    listener.close()
    assert demo._port(port) == port


# ------------------------------------------------------------------------------------- one voice (15–18)


def test_15_log_lines_are_logfmt_with_normalised_model_names():
    line = logfmt.event_line("job.start", model="mxbai-embed-large", models="llama3.1,mxbai-embed-large", note="a b")
    assert (
        line
        == 'event=job.start model=mxbai-embed-large:latest models=llama3.1:latest,mxbai-embed-large:latest note="a b"'
    )
    assert logfmt.event_line("listening", auto_optimize=True, check_interval=300.0, took=0.0125, n=3) == (
        "event=listening auto_optimize=true check_interval=300 took=0.013 n=3"
    )
    record = logging.LogRecord("waitress", logging.WARNING, __file__, 1, "Task queue depth is %d", (3,), None)
    formatted = logfmt.Formatter().format(record)
    assert re.fullmatch(r'time=\S+ level=WARNING event=log logger=waitress msg="Task queue depth is 3"', formatted)


def test_16_one_unit_style_and_words_not_codes_for_people(tmp_path, capsys):
    with demo_cluster(tmp_path) as (_, path):
        assert gpu_router(path, "optimize", capsys=capsys)[0] == 0
        texts = [
            gpu_router(path, *c, capsys=capsys)[1]
            for c in (["status"], ["route", "codellama:7b"], ["check", "llama3.2:3b"])
        ]
        with Observer(load_config(path)) as observer:
            state = observer.poll()
        page = statuspage.render(status_json(state, state.taken_at), [])
    for text in texts:
        assert not re.search(r"\d(MB|GB|MiB|GiB)\b", text), re.search(r".*\d(MB|GB|MiB|GiB)\b.*", text)
    visible = re.sub(r"<[^>]+>", " ", page)
    assert " GB" not in visible and "(GPU)" not in visible and "100% GPU" in visible
    for code in ("fits_free", "not_enough_free", "loaded_on_gpu", "fits_after_eviction", "not_installed"):
        assert code not in visible
    assert "fits now" in visible or "no room now" in visible


def test_17_nothing_is_said_twice(tmp_path, capsys):
    with demo_cluster(tmp_path) as (_, path):
        _, out, _ = gpu_router(path, "route", "mxbai-embed-large", capsys=capsys)
        assert out.count("ROUTING DECISION FOR") == 1 and "Routing decision for" not in out
        _, out, _ = gpu_router(path, "optimize", "--dry-run", capsys=capsys)
        for line in (line.strip() for line in out.splitlines() if line.strip().startswith("- ")):
            assert out.count(line) == 1, line
    assert demo.alert_line({"labels": {"alertname": "GPURouterPriorityModelNotOnGPU"}, "state": "firing"}) == (
        "GPURouterPriorityModelNotOnGPU firing"
    )


def test_13_no_bracket_inside_a_bracket_in_any_text_answer(tmp_path, capsys):
    commands = (["status"], ["route", "mxbai-embed-large"], ["check", "llama3.1"], ["models"], ["report"])
    with demo_cluster(tmp_path) as (fleet, path):
        for down in (False, True):
            if down:
                fleet.node("gpu-small").inject("down")
            for command in (*commands, ["optimize", "--dry-run"], ["route", "codellama:7b"]):
                _, out, err = gpu_router(path, *command, capsys=capsys)
                nested = [line for line in (out + err).splitlines() if re.search(r"\([^()]*\(", line)]
                assert nested == [], (command, nested)


def test_18_every_answer_matches_its_schema_in_the_command_line_and_the_http_api(tmp_path, capsys):
    with demo_cluster(tmp_path) as (fleet, path):
        fleet.node("gpu-small").inject("down")
        commands = {
            "status": ["status"],
            "route": ["route", "mxbai-embed-large"],
            "check": ["check", "llama3.1:latest"],
            "models": ["models"],
            "report": ["report"],
            "optimize": ["optimize", "--dry-run"],
        }
        documents = {}
        for name, argv in commands.items():
            _, out, _ = gpu_router(path, "--json", *argv, capsys=capsys)
            documents[name] = json.loads(out)
            assert schema_errors(name, documents[name]) == [], name
            assert not re.search(r"[\u2190-\u2bff\U0001f300-\U0001faff]", out), name  # no emoji or arrows
        app = create_app(load_config(path), state_max_age=0)
        client = app.test_client()
        try:
            for name, url in (
                ("status", "/api/v1/status"),
                ("route", "/api/v1/route?model=mxbai-embed-large"),
                ("check", "/api/v1/check?model=llama3.1:latest"),
                ("models", "/api/v1/models"),
                ("report", "/api/v1/report"),
                ("error", "/api/v1/route?model=llama9"),
            ):
                answer = client.get(url).get_json()
                assert schema_errors(name, answer) == [], name
                if name not in ("error", "status"):
                    assert answer.keys() == documents[name].keys(), name
            assert "did you mean" in client.get("/api/v1/route?model=llama9").get_json()["error"]
            planned = client.post("/api/v1/optimize", json={"dry_run": True}).get_json()
            assert schema_errors("optimize", planned) == [] and planned.keys() == documents["optimize"].keys()
            assert planned["plan"] == documents["optimize"]["plan"] and planned["nodes_down"] == ["gpu-small"]
            assert planned["mode"] == documents["optimize"]["mode"] == "dry_run"
            queued = client.post("/api/v1/optimize", json={})
            assert queued.status_code == 202 and schema_errors("queued", queued.get_json()) == []
            assert app.extensions["gpu_router"].queue.wait_idle(30)
            history = client.get("/api/v1/actions").get_json()
            assert history["actions"] and schema_errors("actions", history) == []
            # one name for one fact: the actions history and optimize's outcomes
            shared = {"action", "model", "node", "detail", "duration_seconds"}
            assert shared <= history["actions"][0].keys()
            outcome = Outcome(Step("load", "m:latest", "gpu-large", "why"), True, "on GPU", 0.0, 1.5)
            assert shared <= render.outcome_json(outcome).keys()
        finally:
            app.extensions["gpu_router"].queue.stop()
    # the need is one object everywhere: the same keys in route, check, models and report
    shapes = {
        tuple(documents["route"]["needs"][0]),
        tuple(documents["check"]["needs"][0]),
        tuple(documents["models"]["models"][-1]["needs"][0]),
        tuple(documents["report"]["priority_models"][0]["needs"][0]),
        tuple(documents["route"]["verdicts"][-1]["need"]),
    }
    assert len(shapes) == 1 and "bytes" in shapes.pop()
    # one rule for which nodes `needs` covers: every node with (or maybe with) a GPU, installed there or not
    rows = {r["model"]: r for r in documents["models"]["models"]}
    for name in ("route", "check"):
        model = documents[name]["model"]
        assert [n["node"] for n in documents[name]["needs"]] == [n["node"] for n in rows[model]["needs"]], name
    # codes in JSON, words for people
    assert re.fullmatch(r"[a-z_]+", documents["check"]["result"]) and " " in documents["check"]["reason"]
    assert re.fullmatch(r"[a-z_]+", documents["optimize"]["mode"])


def test_18_a_shape_that_drifts_fails_its_schema(tmp_path, capsys):
    with demo_cluster(tmp_path) as (_, path):
        _, out, _ = gpu_router(path, "--json", "route", "mxbai-embed-large", capsys=capsys)
    document = json.loads(out)
    document["needs"][0]["mb"] = 606  # the old duplicate of bytes
    assert schema_errors("route", document)


def test_a_suggestion_installed_nowhere_says_so(tmp_path, capsys):
    """Installed names first; a catalog name is offered only as what it is (following it finds no node: see
    test_decide.py)."""
    with demo_cluster(tmp_path) as (_, path):
        code, _, err = gpu_router(path, "route", "nope", capsys=capsys)  # alike nothing but in ":latest"
        assert code == 2 and "did you mean" not in err and "(see `gpu-router models`)" in err
        code, _, err = gpu_router(path, "route", "llama3.2:1", capsys=capsys)
        assert code == 2 and "(did you mean llama3.2:1b" in err and "installed on no node" not in err, err
