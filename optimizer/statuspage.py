"""The optimizer's status page: one self-contained HTML document (no scripts, no external assets).

It is rendered from the same documents the JSON API serves (`/api/v1/status`, `/api/v1/actions`), so its
figures are the API's; every figure also sits in a `data-*` attribute in bytes, for tests and scrapers.
The page reloads itself with a `<meta http-equiv="refresh">`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from html import escape
from typing import Any

from gpurouter.decide.placement import KIND_WORDS, NOT_INSTALLED
from gpurouter.render import DEMAND_STATES, where_text
from gpurouter.sizing.eras import LABELS as ERA_LABELS
from gpurouter.units import size_text

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.muted{color:#777}.ok{color:#1a7f37}.bad{color:#c62828}.warn{color:#b26a00}
.nodes{display:flex;flex-wrap:wrap;gap:1em}
.node{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em;min-width:18em;flex:1}
.node.down{border-color:#c62828}
.bar{position:relative;height:1.1em;background:#e8e8e8;border-radius:3px;overflow:hidden;margin:.3em 0}
.bar .used{position:absolute;left:0;top:0;bottom:0;background:#4a7bd0}
.bar .usable{position:absolute;top:0;bottom:0;border-left:2px dashed #333}
table{border-collapse:collapse;background:#fff;margin-top:.3em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
"""


def _mb(num_bytes: int | None) -> str:
    return "–" if num_bytes is None else size_text(num_bytes)


def _attr(value: Any) -> str:
    return "" if value is None else escape(str(value), quote=True)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _node(node: Mapping[str, Any]) -> str:
    total, usable = node.get("vram_total_bytes"), node.get("vram_usable_bytes")
    used, free = node.get("vram_used_bytes"), node.get("vram_free_bytes")
    state = "up" if node["up"] else "down"
    if node.get("maintenance"):
        state += ", maintenance"
    title = f'<h3>{escape(node["name"])} <span class="{"ok" if node["up"] else "bad"}">{state}</span></h3>'
    lines = [f'<div class="muted">{escape(node["url"])} · Ollama {escape(node.get("version") or "?")}</div>']
    if not node["up"]:  # its version decides both: not known until it answers
        lines.append('<div class="muted">era unknown · default context unknown (the node did not answer)</div>')
    elif node.get("era"):
        lines.append(
            f'<div class="muted">{escape(ERA_LABELS.get(node["era"], node["era"]))} era · default context '
            f"{node.get('default_context')} tokens ({escape(str(node.get('default_context_source') or ''))})</div>"
        )
    source = node.get("gpu_source", "unknown")
    if total:
        used_pct = min(100.0, 100.0 * (used or 0) / total)
        usable_pct = 100.0 * (usable or 0) / total
        lines.append(
            f'<div class="bar" title="used {_mb(used)} of {_mb(total)}">'
            f'<div class="used" style="width:{used_pct:.1f}%"></div>'
            f'<div class="usable" style="left:{usable_pct:.1f}%"></div></div>'
        )
        lines.append(
            f"<div>VRAM total <b>{_mb(total)}</b> · usable {_mb(usable)} · used {_mb(used)} · "
            f'free <b>{_mb(free)}</b> <span class="muted">({escape(source)})</span></div>'
        )
    elif source == "none":
        lines.append('<div>No GPU <span class="muted">(none)</span></div>')
    else:
        reason = node.get("capacity_reason") or "GPU capacity unknown"
        lines.append(f'<div class="warn">GPU capacity unknown: {escape(reason)}</div>')
    if node.get("error"):
        lines.append(f'<div class="bad">{escape(node["error"])}</div>')
    attrs = " ".join(
        f'data-{key}="{_attr(value)}"'
        for key, value in (
            ("node", node["name"]),
            ("up", int(bool(node["up"]))),
            ("source", source),
            ("era", node.get("era") if node["up"] else None),
            ("context", node.get("default_context") if node["up"] else None),
            ("total", total),
            ("usable", usable),
            ("used", used),
            ("free", free),
        )
    )
    return f'<section class="node {"" if node["up"] else "down"}" {attrs}>{title}{"".join(lines)}</section>'


def _loaded_rows(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    rows = []
    for node in nodes:
        for m in node.get("loaded", []):
            ratio = m["gpu_ratio"]
            css = "ok" if ratio >= 1 else "bad"
            rows.append(
                f'<tr class="loaded" data-node="{_attr(node["name"])}" data-model="{_attr(m["model"])}" '
                f'data-ratio="{ratio}" data-size="{m["size_bytes"]}" data-vram="{m["size_vram_bytes"]}">'
                f"<td>{escape(node['name'])}</td><td>{escape(m['model'])}</td>"
                f'<td class="num">{_mb(m["size_bytes"])}</td><td class="num">{_mb(m["size_vram_bytes"])}</td>'
                f'<td class="{css}">{where_text(ratio)}</td>'
                f"<td>{escape(str(m.get('context_length') or '–'))}</td></tr>"
            )
    return rows


def _fit_matrix(nodes: list[Mapping[str, Any]]) -> str:
    models: list[str] = []
    cells: dict[tuple[str, str], Mapping[str, Any]] = {}
    for node in nodes:
        for fit in node.get("fits", []):
            if fit["model"] not in models:
                models.append(fit["model"])
            cells[(node["name"], fit["model"])] = fit
    head = "".join(f"<th>{escape(n['name'])}</th>" for n in nodes)
    rows = []
    for model in models:
        tds = []
        for node in nodes:
            fit = cells.get((node["name"], model))
            if fit is None:  # a node that is down lists nothing: its installed models are not known now
                kind, reason = (
                    ("not_installed", NOT_INSTALLED) if node["up"] else ("down", "its models are not known now")
                )
                tds.append(f'<td class="bad">✗ {escape(KIND_WORDS[kind])}<br><small>{escape(reason)}</small></td>')
                continue
            mark, css = ("✓", "ok") if fit["fits"] else ("✗", "bad")
            need = fit.get("need") or {}
            sizing = f" · {_mb(need['bytes'])} at {need['num_ctx']} tokens" if need else ""
            tds.append(
                f'<td class="fit {css}" data-node="{_attr(node["name"])}" data-model="{_attr(model)}" '
                f'data-fits="{int(bool(fit["fits"]))}" data-need="{_attr(need.get("bytes"))}" '
                f'data-ctx="{_attr(need.get("num_ctx"))}" data-kind="{_attr(fit["kind"])}">'
                f"{mark} {escape(KIND_WORDS.get(fit['kind'], fit['kind']))}<br><small>{escape(fit['reason'])}"
                f"{sizing}</small></td>"
            )
        rows.append(f"<tr><td>{escape(model)}</td>{''.join(tds)}</tr>")
    return f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def _next_pass(seconds: float | None, monitor_only: bool) -> str:
    """`next pass in 12 s`, `a pass is running`, or that no reconcile loop runs."""
    if seconds is None:
        return "no reconcile loop"
    when = f"next pass in {seconds:.0f} s" if seconds > 0 else "a pass is running"
    return when + (" (monitor only)" if monitor_only else "")


def _actions(actions: Iterable[Mapping[str, Any]], limit: int) -> str:
    rows = []
    for a in list(actions)[-limit:][::-1]:
        outcome = str(a.get("outcome", ""))
        css = "ok" if outcome == "success" else ("bad" if outcome == "failure" else "muted")
        rows.append(
            f'<tr class="action" data-model="{_attr(a.get("model"))}" data-outcome="{_attr(outcome)}">'
            f"<td>{_when(float(a['time']))}</td><td>{escape(str(a.get('model') or ''))}</td>"
            f"<td>{escape(str(a.get('node') or '–'))}</td><td>{escape(str(a.get('action') or ''))}</td>"
            f"<td>{escape(str(a.get('by') or ''))}</td>"
            f'<td class="{css}">{escape(outcome)}</td>'
            f'<td class="num">{float(a.get("duration_seconds") or 0):.2f} s</td>'
            f"<td>{escape(str(a.get('detail') or ''))}</td></tr>"
        )
    if not rows:
        return '<p class="muted">No actions yet.</p>'
    head = (
        "<tr><th>time</th><th>model</th><th>node</th><th>step</th><th>by</th><th>outcome</th><th>took</th>"
        "<th>detail</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _demand(demand: Mapping[str, Any] | None) -> str:
    """Placement from demand (the `demand` object of /api/v1/placement), when a proxy is configured to read."""
    if demand is None or demand.get("state") == "no_proxy":
        return ""
    rows = "".join(
        f'<tr class="demand" data-model="{_attr(m["model"])}" data-copies="{int(m["copies"])}">'
        f'<td>{escape(m["model"])}</td><td class="num">{float(m["requests_per_minute"]):.1f}</td>'
        f'<td class="num">{float(m["score"]):.1f}</td>'
        f'<td class="{"ok" if m["copies"] else "muted"}">{int(m["copies"])}</td><td>{escape(m["why"])}</td></tr>'
        for m in demand.get("models", [])
    )
    state = str(demand.get("state"))
    if state != "on" or not rows:
        said = DEMAND_STATES.get(state, "") if state != "on" else "No requests in the window."
        said += f" ({demand['error']})" if demand.get("error") else ""
        return f'<h2>Placement from demand</h2><p class="muted">{escape(said[:1].upper() + said[1:])}</p>'
    head = "<tr><th>model</th><th>requests/min</th><th>score</th><th>copies</th><th>why</th></tr>"
    return f"<h2>Placement from demand</h2><table>{head}{rows}</table>"


def render(
    status: Mapping[str, Any],
    actions: Iterable[Mapping[str, Any]],
    *,
    refresh: int = 5,
    limit: int = 20,
    next_pass: float | None = None,
    monitor_only: bool = False,
    demand: Mapping[str, Any] | None = None,
) -> str:
    """The whole page from a `/api/v1/status` document and the `/api/v1/actions` list (oldest first);
    `next_pass`: seconds until the reconcile loop's next pass (0 = one is running; None = no loop); `demand`:
    the `demand` object of /api/v1/placement."""
    nodes = list(status.get("nodes", []))
    priority_rows = "".join(
        f'<tr class="priority" data-model="{_attr(p["model"])}" data-on-gpu="{int(bool(p["on_gpu"]))}">'
        f'<td class="num">{p["rank"]}</td><td>{escape(p["model"])}</td>'
        + ('<td class="ok">✓ on GPU</td></tr>' if p["on_gpu"] else '<td class="bad">✗ not fully on GPU</td></tr>')
        for p in status.get("priority_models", [])
    )
    loaded = _loaded_rows(nodes)
    loaded_table = (
        "<table><tr><th>node</th><th>model</th><th>size</th><th>on GPU</th><th>share</th><th>context</th></tr>"
        + "".join(loaded)
        + "</table>"
        if loaded
        else '<p class="muted">No model is loaded.</p>'
    )
    up = sum(1 for n in nodes if n["up"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{int(refresh)}">'
        "<title>GPU Router</title>"
        f"<style>{_STYLE}</style></head><body>"
        f'<h1>GPU Router</h1><div class="muted">Cluster read {_when(float(status.get("taken_at", 0)))} · '
        f'{up}/{len(nodes)} nodes up · <span class="next-pass">{_next_pass(next_pass, monitor_only)}</span> · '
        f"refreshes every {int(refresh)} s · "
        '<a href="/api/v1/status">JSON</a> · <a href="/metrics">metrics</a></div>'
        f'<h2>Nodes</h2><div class="nodes">{"".join(_node(n) for n in nodes)}</div>'
        f"<h2>Priority models</h2><table><tr><th>#</th><th>model</th><th>state</th></tr>{priority_rows}</table>"
        f"<h2>Loaded models</h2>{loaded_table}"
        f"{_demand(demand)}"
        f"<h2>Where each model fits</h2>{_fit_matrix(nodes)}"
        f"<h2>Last actions</h2>{_actions(actions, limit)}"
        "</body></html>\n"
    )
