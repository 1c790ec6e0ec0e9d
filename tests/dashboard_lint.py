"""Offline checks for the Grafana dashboards: the grafana/dashboard-linter rules that fit this project.

One exporter covers many nodes, so the exporter's own `node` label does what `instance` does in the
linter's rules: `lint(dashboard, exclude=...)` skips the rules a caller documents as not applying, the way
a `.lint` file does. PromQL is tokenised here only far enough to find vector selectors; whether an
expression parses is for promtool to say (see `substitute`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# The contract of DESIGN.md ("Metrics", "Proxy"): the exporter's names, the optimizer's and the proxy's.
NODE_METRICS = frozenset(
    {
        "gpu_router_node_up",
        "gpu_router_node_info",
        "gpu_router_node_default_context_tokens",
        "gpu_router_node_poll_duration_seconds",
        "gpu_router_node_vram_total_bytes",
        "gpu_router_node_vram_usable_bytes",
        "gpu_router_node_vram_used_bytes",
        "gpu_router_node_vram_free_bytes",
        "gpu_router_gpu_memory_total_bytes",
        "gpu_router_gpu_memory_used_bytes",
        "gpu_router_model_loaded_bytes",
        "gpu_router_model_vram_bytes",
        "gpu_router_model_gpu_ratio",
        "gpu_router_model_context_tokens",
        "gpu_router_model_expiry_timestamp_seconds",
        "gpu_router_model_installed",
        "gpu_router_model_fits",
        "gpu_router_model_fits_free",
    }
)
EXPORTER_METRICS = NODE_METRICS | {
    "gpu_router_model_required_bytes",
    "gpu_router_model_priority",
    "gpu_router_model_on_gpu",
    "gpu_router_exporter_build_info",
    "gpu_router_collect_duration_seconds",
}
OPTIMIZER_METRICS = frozenset(
    {
        "gpu_router_optimizer_webhooks_total",
        "gpu_router_optimizer_actions_total",
        "gpu_router_optimizer_remediation_seconds_bucket",
        "gpu_router_optimizer_remediation_seconds_sum",
        "gpu_router_optimizer_remediation_seconds_count",
        "gpu_router_optimizer_queue_depth",
        "gpu_router_optimizer_last_reconcile_timestamp_seconds",
        "gpu_router_optimizer_placement_desired",
        "gpu_router_optimizer_placement_actual",
        "gpu_router_optimizer_demand_up",
    }
)
PROXY_METRICS = frozenset(
    {
        "gpu_router_proxy_requests_total",
        "gpu_router_proxy_in_flight",
        *(
            f"gpu_router_proxy_{name}_seconds_{part}"
            for name in ("request_duration", "time_to_first_byte")
            for part in ("bucket", "sum", "count")
        ),
        "gpu_router_proxy_upstream_errors_total",
        "gpu_router_proxy_retries_total",
        "gpu_router_proxy_queue_depth",
        *(f"gpu_router_proxy_queue_wait_seconds_{part}" for part in ("bucket", "sum", "count")),
        "gpu_router_proxy_queue_rejected_total",
        "gpu_router_proxy_prompt_tokens_total",
        "gpu_router_proxy_generated_tokens_total",
        "gpu_router_proxy_cached_prompt_tokens_predicted_total",
        "gpu_router_proxy_cached_prompt_tokens_realised_total",
        "gpu_router_proxy_runner_options_replaced_total",
        "gpu_router_proxy_demand_requests_per_second",
        "gpu_router_proxy_demand_tokens_per_second",
    }
)
CONTRACT_METRICS = EXPORTER_METRICS | OPTIMIZER_METRICS | PROXY_METRICS

# The job variable each family of metrics must be matched on.
JOB_VARIABLES = {"exporter": "job", "optimizer": "optimizer_job", "proxy": "proxy_job"}

# What Grafana puts in place of its built-in variables when it runs a query (as the linter substitutes).
BUILTIN_VALUES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__interval_ms": "60000",
}
VALID_UNITS = frozenset(
    {"bytes", "decbytes", "percentunit", "percent", "s", "ms", "none", "short", "dateTimeFromNow", "ops"}
)
RANGE_FUNCTIONS = frozenset({"rate", "irate", "increase"})
PANEL_TYPES_WITHOUT_QUERIES = frozenset({"row", "text"})

_AGGREGATORS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk"}
    | {"quantile", "limitk", "limit_ratio"}
)
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _LABEL_LISTS | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<matchers>\{(?:"(?:\\.|[^"\\])*"|[^{}"])*\})
    |(?P<range>\[[^\]]*\])
    |(?P<number>\d[\w.]*|\.\d[\w.]*)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<paren>[()])
    |(?P<other>\S)
    """,
    re.VERBOSE,
)
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"\s*,?')
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Selector:
    """One vector selector of an expression."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)
    range: str | None  # "[5m]" text, or None for an instant selector
    function: str | None  # innermost enclosing function or aggregation, None at top level

    def matcher(self, label: str) -> tuple[str, str] | None:
        """(operator, value) of the first matcher on `label`, if any."""
        return next(((op, value) for name, op, value in self.matchers if name == label), None)


def _tokens(expr: str) -> list[tuple[str, str]]:
    return [(m.lastgroup or "other", m.group()) for m in _TOKEN.finditer(expr)]


def _parse_matchers(text: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((m[1], m[2], m[3]) for m in _MATCHER.finditer(text[1:-1]))


def selectors(expr: str) -> list[Selector]:
    """The named vector selectors of a PromQL expression, with the function each sits in."""
    tokens = _tokens(expr)
    found: list[Selector] = []
    stack: list[str] = []
    pending: str | None = None
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident":
            if text in _LABEL_LISTS and following == ("paren", "("):
                i = _skip_parenthesised(tokens, i + 1)
                continue
            if text in _AGGREGATORS or following == ("paren", "("):
                pending = text
            elif text not in _KEYWORDS:
                i = _selector_at(tokens, i, stack, found)
                continue
        elif kind == "paren":
            if text == "(":
                stack.append(pending or "")
                pending = None
            elif stack:
                stack.pop()
        i += 1
    return found


def _skip_parenthesised(tokens: list[tuple[str, str]], start: int) -> int:
    """Index after the `)` that closes the `(` at `start`."""
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i] == ("paren", "("):
            depth += 1
        elif tokens[i] == ("paren", ")"):
            depth -= 1
            if depth == 0:
                return i + 1
    return len(tokens)


def _selector_at(tokens: list[tuple[str, str]], i: int, stack: list[str], found: list[Selector]) -> int:
    name, i = tokens[i][1], i + 1
    matchers: tuple[tuple[str, str, str], ...] = ()
    if i < len(tokens) and tokens[i][0] == "matchers":
        matchers, i = _parse_matchers(tokens[i][1]), i + 1
    selector_range = None
    if i < len(tokens) and tokens[i][0] == "range":
        selector_range, i = tokens[i][1], i + 1
    function = next((f for f in reversed(stack) if f), None)
    found.append(Selector(name, matchers, selector_range, function))
    return i


def substitute(expr: str, values: Mapping[str, str] | None = None) -> str:
    """The expression Grafana would run: built-in variables get typical values, others `values[name]`.

    A dashboard variable without a given value becomes `.+` (every queried matcher on one is `=~`).
    """
    given = {**BUILTIN_VALUES, **(values or {})}

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return given.get(name, ".+")

    return _VARIABLE.sub(replace, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression (or a `label_values(...)` variable query) selects."""
    query = substitute(expr)
    label_values = _LABEL_VALUES.match(query)
    if label_values:
        query = label_values["selector"]
    return {selector.name for selector in selectors(query)}


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def iter_panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def iter_variable_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(variable name, query) for every query variable."""
    result = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else query or ""
            result.append((variable["name"], text))
    return result


def variable_selector(query: str) -> str | None:
    """The series selector inside a `label_values(selector, label)` variable query, or None."""
    match = _LABEL_VALUES.match(query)
    return match["selector"] if match else None


def lint(dashboard: Mapping[str, Any], exclude: Mapping[str, str] | None = None) -> list[str]:
    """Problems found, as `rule: where: what`; rules named in `exclude` (rule → reason) are skipped."""
    skipped = exclude or {}
    problems = [
        *_dashboard_problems(dashboard),
        *_variable_problems(dashboard),
        *_panel_problems(dashboard),
        *_target_problems(dashboard),
    ]
    return [problem for problem in problems if problem.split(":", 1)[0] not in skipped]


def _dashboard_problems(dashboard: Mapping[str, Any]) -> Iterator[str]:
    if "__inputs" in dashboard:
        yield "dashboard-inputs-rule: dashboard: `__inputs` only resolves in the UI import flow"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", str(dashboard.get("uid", ""))):
        yield "dashboard-uid-rule: dashboard: needs a stable uid of at most 40 characters"
    if not dashboard.get("title"):
        yield "dashboard-title-rule: dashboard: no title"
    if dashboard.get("editable", True):
        yield "uneditable-dashboard: dashboard: a provisioned dashboard should set editable: false"
    ids = [panel.get("id") for panel in iter_panels(dashboard)]
    duplicates = sorted({str(i) for i in ids if ids.count(i) > 1})
    if duplicates or None in ids:
        yield f"panel-id-rule: dashboard: panel ids missing or not unique: {', '.join(duplicates)}"


def _variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def _variable_problems(dashboard: Mapping[str, Any]) -> Iterator[str]:
    variables = _variables(dashboard)
    datasource = variables.get("datasource")
    if not datasource or datasource.get("type") != "datasource" or datasource.get("query") != "prometheus":
        yield "template-datasource-rule: templating: needs variable `datasource` of type datasource (prometheus)"
    for required, rule in (("job", "template-job-rule"), ("instance", "template-instance-rule")):
        if required not in variables:
            yield f"{rule}: templating: no `{required}` variable"
    if "node" not in variables:
        yield "template-node-rule: templating: no `node` variable"
    for name, variable in variables.items():
        if variable.get("type") != "query":
            continue
        if variable.get("datasource", {}).get("uid") != "${datasource}":
            yield f"template-datasource-rule: variable {name}: datasource is not ${{datasource}}"
        if variable.get("refresh") != 2:
            yield f"template-on-time-change-reload-rule: variable {name}: set refresh: 2 (on time range change)"
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else query or ""
        if variable_selector(text) is None:
            yield f"template-label-promql-rule: variable {name}: not a label_values(selector, label) query"


def _panel_problems(dashboard: Mapping[str, Any]) -> Iterator[str]:
    for panel in iter_panels(dashboard):
        if panel.get("type") in PANEL_TYPES_WITHOUT_QUERIES:
            continue
        where = f"panel {panel.get('title') or panel.get('id')!r}"
        if not panel.get("title") or not panel.get("description"):
            yield f"panel-title-description-rule: {where}: needs a title and a description"
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            yield f"panel-datasource-rule: {where}: datasource is not ${{datasource}}"
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if unit not in VALID_UNITS:
            yield f"panel-units-rule: {where}: unit {unit!r} is not one of {sorted(VALID_UNITS)}"
        targets = panel.get("targets", [])
        if not targets or not all(target.get("expr") for target in targets):
            yield f"panel-no-targets-rule: {where}: every panel needs query targets with an expr"
        ref_ids = [target.get("refId") for target in targets]
        if len(set(ref_ids)) != len(ref_ids):
            yield f"target-refid-rule: {where}: refIds are not unique"
        if any(target.get("datasource", {}).get("uid") != "${datasource}" for target in targets):
            yield f"panel-datasource-rule: {where}: a target's datasource is not ${{datasource}}"
        if "gridPos" not in panel:
            yield f"panel-gridpos-rule: {where}: no gridPos"


def _target_problems(dashboard: Mapping[str, Any]) -> Iterator[str]:
    for title, expr in iter_panel_queries(dashboard):
        for selector in selectors(expr):
            for rule, detail in _selector_problems(selector):
                yield f"{rule}: panel {title!r}: {selector.name}: {detail}"


def _selector_problems(selector: Selector) -> Iterator[tuple[str, str]]:
    family = "optimizer" if selector.name in OPTIMIZER_METRICS else "exporter"
    family = "proxy" if selector.name in PROXY_METRICS else family
    job_variable = JOB_VARIABLES[family]
    if selector.matcher("job") != ("=~", f"${job_variable}"):
        yield "target-job-rule", f'needs job=~"${job_variable}"'
    if selector.matcher("instance") != ("=~", "$instance"):
        yield "target-instance-rule", 'needs instance=~"$instance"'
    if selector.name in NODE_METRICS and selector.matcher("node") != ("=~", "$node"):
        yield "target-node-rule", 'needs node=~"$node"'
    if selector.function in RANGE_FUNCTIONS:
        allowed = ["[$__rate_interval]"] + (["[$__range]"] if selector.function == "increase" else [])
        if selector.range not in allowed:
            yield "target-rate-interval-rule", f"{selector.function} over {selector.range}, use {allowed[0]}"
    if selector.name.endswith("_total") and selector.function not in RANGE_FUNCTIONS:
        yield "target-counter-agg-rule", "a counter belongs inside rate/irate/increase"
