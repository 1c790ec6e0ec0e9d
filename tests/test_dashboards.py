"""The Grafana dashboards and provisioning files, checked offline (no Grafana server can run here)."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool
from dashboard_lint import (
    CONTRACT_METRICS,
    iter_panel_queries,
    iter_panels,
    iter_variable_queries,
    lint,
    metric_names,
    selectors,
    substitute,
    variable_selector,
)

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = {
    "gpu-router-cluster": REPO / "grafana" / "dashboards" / "gpu-router-cluster.json",
    "gpu-router-node": REPO / "grafana" / "dashboards" / "gpu-router-node.json",
}

# Like dashboard-linter's `.lint` file: the rules that do not apply to these dashboards, and why.
LINT = {
    "template-instance-rule": (
        "one exporter target covers many Ollama nodes; the exporter's own `node` label and the `node` "
        "variable (template-node-rule) take the place of `instance`"
    ),
    "target-instance-rule": (
        'queries select nodes with node=~"$node" (target-node-rule) instead of instance; model-wide and '
        "optimizer series have no node"
    ),
}

# What the cluster dashboard must show (issue: VRAM per node, loaded models' GPU share, the fit matrix,
# priority models on GPU, optimizer actions and webhooks).
CLUSTER_MUST_SHOW = {
    "gpu_router_node_vram_total_bytes",
    "gpu_router_node_vram_used_bytes",
    "gpu_router_node_vram_free_bytes",
    "gpu_router_model_gpu_ratio",
    "gpu_router_model_fits",
    "gpu_router_model_on_gpu",
    "gpu_router_model_priority",
    "gpu_router_optimizer_actions_total",
    "gpu_router_optimizer_webhooks_total",
}


def load(name: str) -> dict[str, Any]:
    return json.loads(DASHBOARDS[name].read_text())


@pytest.fixture(params=sorted(DASHBOARDS))
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_dashboards_pass_lint(dashboard: dict[str, Any]) -> None:
    assert lint(dashboard, exclude=LINT) == []


def test_dashboard_uids_are_stable() -> None:
    for name in DASHBOARDS:
        assert load(name)["uid"] == name


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in iter_panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_metrics_are_in_the_contract(dashboard: dict[str, Any]) -> None:
    queries = iter_panel_queries(dashboard) + iter_variable_queries(dashboard)
    for title, expr in queries:
        unknown = metric_names(expr) - CONTRACT_METRICS
        assert not unknown, f"{title}: metrics outside DESIGN.md: {unknown}"


def test_cluster_dashboard_shows_what_the_design_asks() -> None:
    used = set().union(*(metric_names(expr) for _, expr in iter_panel_queries(load("gpu-router-cluster"))))
    assert used >= CLUSTER_MUST_SHOW


def test_node_dashboard_has_a_single_node_selector() -> None:
    (node,) = [v for v in load("gpu-router-node")["templating"]["list"] if v["name"] == "node"]
    assert node["multi"] is False and node["includeAll"] is False


def test_every_query_parses_after_substitution(tmp_path: Path) -> None:
    expressions = []
    for name in sorted(DASHBOARDS):
        dashboard = load(name)
        expressions += [substitute(expr) for _, expr in iter_panel_queries(dashboard)]
        for variable, query in iter_variable_queries(dashboard):
            selector = variable_selector(query)
            assert selector is not None, f"{name}: variable {variable}: {query!r}"
            expressions.append(substitute(selector))
    assert all("$" not in expr for expr in expressions)
    rules = [{"record": f"dash:check_{i}", "expr": expr} for i, expr in enumerate(expressions)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_rejects_an_unsubstituted_variable(tmp_path: Path) -> None:
    """The parse check above has teeth: a raw $__rate_interval is not PromQL."""
    path = tmp_path / "bad.yml"
    rule = {"record": "dash:bad", "expr": "rate(gpu_router_optimizer_webhooks_total[$__rate_interval])"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [rule]}]}))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


def test_substitute_gives_concrete_values() -> None:
    expr = 'sum(rate(x_total{job=~"$job", node=~"${node}"}[$__rate_interval]))'
    assert substitute(expr) == 'sum(rate(x_total{job=~".+", node=~".+"}[5m]))'
    assert substitute(expr, {"node": "gpu-large"}) == 'sum(rate(x_total{job=~".+", node=~"gpu-large"}[5m]))'


def test_selectors_skip_functions_keywords_and_label_lists() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m]))) "
        'and on (model) group_left (url) max by (model) (b{x="}"}) unless c offset 5m'
    )
    found = {s.name: s for s in selectors(expr)}
    assert set(found) == {"a_bucket", "b", "c"}
    assert (found["a_bucket"].function, found["a_bucket"].range) == ("rate", "[5m]")
    assert found["b"].matcher("x") == ("=", "}")
    assert found["c"].function is None


def _first_query_panel(dashboard: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in iter_panels(dashboard) if p.get("type") != "row")


def test_lint_reports_what_dashboard_linter_would() -> None:
    broken = copy.deepcopy(load("gpu-router-cluster"))
    broken["__inputs"] = [{"name": "DS_PROMETHEUS"}]
    panel = _first_query_panel(broken)
    panel["fieldConfig"]["defaults"].pop("unit")
    panel["description"] = ""
    panel["targets"][0]["expr"] = "sum(rate(gpu_router_optimizer_webhooks_total[5m]))"
    panel["datasource"] = {"type": "prometheus", "uid": "prometheus"}
    rules = {problem.split(":", 1)[0] for problem in lint(broken, exclude=LINT)}
    assert rules >= {
        "dashboard-inputs-rule",
        "panel-units-rule",
        "panel-title-description-rule",
        "panel-datasource-rule",
        "target-rate-interval-rule",
        "target-job-rule",
    }


def test_lint_flags_a_bare_counter_and_a_missing_node_matcher() -> None:
    broken = copy.deepcopy(load("gpu-router-node"))
    panel = _first_query_panel(broken)
    panel["targets"][0]["expr"] = 'gpu_router_optimizer_actions_total{job=~"$optimizer_job"}'
    panel["targets"].append({**panel["targets"][0], "refId": "Z", "expr": 'gpu_router_node_up{job=~"$job"}'})
    rules = {problem.split(":", 1)[0] for problem in lint(broken, exclude=LINT)}
    assert rules == {"target-counter-agg-rule", "target-node-rule"}


def test_lint_without_exclusions_reports_the_instance_rules() -> None:
    rules = {problem.split(":", 1)[0] for problem in lint(load("gpu-router-node"))}
    assert rules == set(LINT)


def test_datasource_provisioning() -> None:
    data = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = data["datasources"]
    assert (source["type"], source["uid"]) == ("prometheus", "prometheus")
    assert source["url"] == "http://127.0.0.1:9090"
    compose = yaml.safe_load((REPO / "deploy/compose/grafana-datasource.yml").read_text())["datasources"][0]
    assert {**compose, "url": source["url"]} == source


def test_dashboard_provisioning_points_at_the_dashboards() -> None:
    data = yaml.safe_load((REPO / "grafana/provisioning/dashboards/gpu-router.yml").read_text())
    (provider,) = data["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/gpu-router"


def test_datasource_variable_defaults_to_the_provisioned_uid(dashboard: dict[str, Any]) -> None:
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert variable["current"]["value"] == "prometheus"
