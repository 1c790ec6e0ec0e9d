"""The alert rules and the Alertmanager configurations, checked with the real promtool and amtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool
from dashboard_lint import CONTRACT_METRICS, metric_names

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "alerts" / "rules.yml"
RULE_TESTS = REPO / "alerts" / "tests.yml"
ALERTMANAGER_CONFIGS = [REPO / "alerts" / "alertmanager.yml", REPO / "deploy" / "compose" / "alertmanager.yml"]

ACTING_ALERTS = {
    "GPURouterPriorityModelOnCPU",
    "GPURouterPriorityModelPartiallyOffloaded",
    "GPURouterPriorityModelNotOnGPU",
}
OTHER_ALERTS = {
    "GPURouterPriorityModelFitsNowhere",
    "GPURouterNodeDown",
    "GPURouterNodeVRAMPressure",
    "GPURouterNodeCapacityUnknown",
    "GPURouterExporterDown",
    "GPURouterOptimizerActionsFailing",
    "GPURouterRequestsServedOffGPU",
    "GPURouterProxyQueueWaitHigh",
    "GPURouterPlacementOffDesired",
    "GPURouterDemandUnread",
}
PROMETHEUS_OWN_METRICS = {"up"}
FOR_LINE = re.compile(r"(?m)^(\s+for:\s*)(\S+)\s*$")


def run(*command: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_rules_pass_promtool_check() -> None:
    result = run(require_tool("promtool"), "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 13 rules found" in result.stdout


def test_rule_unit_tests_pass() -> None:
    result = run(require_tool("promtool"), "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    broken = RULES.read_text().replace("gpu_router_model_gpu_ratio == 0", "gpu_router_model_gpu_ratio < 1", 1)
    (tmp_path / "rules.yml").write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / "tests.yml")
    result = run(require_tool("promtool"), "test", "rules", tmp_path / "tests.yml")
    assert result.returncode != 0
    assert "GPURouterPriorityModelOnCPU" in result.stdout + result.stderr


def test_every_designed_alert_exists_with_severity_and_annotations() -> None:
    rules = alert_rules()
    assert set(rules) == ACTING_ALERTS | OTHER_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert "{{" in rule["annotations"]["description"], f"{name}: description names nothing"


def test_descriptions_name_the_model_node_and_figure() -> None:
    rules = alert_rules()
    for name in ACTING_ALERTS | {"GPURouterPriorityModelFitsNowhere"}:
        assert "$labels.model" in rules[name]["annotations"]["description"], name
    for name in (
        "GPURouterPriorityModelOnCPU",
        "GPURouterPriorityModelPartiallyOffloaded",
        "GPURouterNodeDown",
        "GPURouterNodeVRAMPressure",
    ):
        description = rules[name]["annotations"]["description"]
        assert "$labels.node" in description and "$value" in description, name


def test_reported_metric_is_left_of_and() -> None:
    """$value is the left operand's: the per-node alerts must start with the figure they print."""
    rules = alert_rules()
    for name in ("GPURouterPriorityModelOnCPU", "GPURouterPriorityModelPartiallyOffloaded"):
        assert rules[name]["expr"].lstrip().startswith("gpu_router_model_gpu_ratio"), name
    assert (
        rules["GPURouterPriorityModelFitsNowhere"]["expr"]
        .lstrip()
        .startswith("min by (model) (gpu_router_model_required_bytes)")
    )


def test_rules_use_only_contract_metrics() -> None:
    for name, rule in alert_rules().items():
        unknown = metric_names(rule["expr"]) - CONTRACT_METRICS - PROMETHEUS_OWN_METRICS
        assert not unknown, f"{name} uses metrics outside DESIGN.md: {unknown}"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for name in ACTING_ALERTS | OTHER_ALERTS:
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: tested {'firing' if True in outcomes else 'not firing'} only"


def test_for_durations_can_be_shortened_by_replacement(tmp_path: Path) -> None:
    text = RULES.read_text()
    durations = FOR_LINE.findall(text)
    assert len(durations) == len(alert_rules())
    assert all(re.fullmatch(r"\d+[smh]", value) for _, value in durations)
    fast = FOR_LINE.sub(r"\g<1>0s", text)
    (tmp_path / "rules.yml").write_text(fast)
    result = run(require_tool("promtool"), "check", "rules", tmp_path / "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {rule.get("for") for group in yaml.safe_load(fast)["groups"] for rule in group["rules"]} == {"0s"}


@pytest.mark.parametrize("config", ALERTMANAGER_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_alertmanager_config_passes_amtool(config: Path) -> None:
    result = run(require_tool("amtool"), "check-config", config)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", ALERTMANAGER_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
@pytest.mark.parametrize("alertname", sorted(ACTING_ALERTS | OTHER_ALERTS))
def test_alert_routes_to_the_right_receiver(config: Path, alertname: str) -> None:
    receiver = "gpu-router-optimizer" if alertname in ACTING_ALERTS else "default"
    result = run(
        require_tool("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={config}",
        f"--verify.receivers={receiver}",
        f"alertname={alertname}",
        "node=a",
        "model=b",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_route_test_fails_for_a_wrong_receiver() -> None:
    result = run(
        require_tool("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_CONFIGS[0]}",
        "--verify.receivers=gpu-router-optimizer",
        "alertname=GPURouterNodeDown",
        "node=a",
    )
    assert result.returncode != 0


@pytest.mark.parametrize("config", ALERTMANAGER_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_webhook_receiver_settings(config: Path) -> None:
    data = yaml.safe_load(config.read_text())
    route = data["route"]
    assert route["receiver"] == "default"
    (optimizer_route,) = [r for r in route["routes"] if r["receiver"] == "gpu-router-optimizer"]
    assert optimizer_route["group_by"] == ["alertname", "node", "model"]
    assert (optimizer_route["group_wait"], optimizer_route["group_interval"]) == ("5s", "1m")
    assert optimizer_route["repeat_interval"] == "10m"
    receivers = {r["name"]: r for r in data["receivers"]}
    assert set(receivers["default"]) == {"name"}, "the default receiver is a placeholder without integrations"
    (webhook,) = receivers["gpu-router-optimizer"]["webhook_configs"]
    assert webhook["url"].endswith(":9878/webhook")
    assert webhook["send_resolved"] is True and webhook["max_alerts"] == 0
    assert webhook["http_config"]["authorization"]["credentials_file"]
