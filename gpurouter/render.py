"""The command line's output: the same facts as text that reads like the guide, or as JSON-ready dicts.

Pure functions over a `ClusterState` and the decisions; sizes in MB as the guide prints them (MiB).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from gpurouter.act.execute import Execution, Outcome
from gpurouter.cluster.config import DemandSettings, model_key
from gpurouter.cluster.demandfeed import Reading
from gpurouter.cluster.ollama import LoadedModel
from gpurouter.cluster.state import ClusterState, ModelNeed, NodeState
from gpurouter.decide.demand import Desired
from gpurouter.decide.placement import (
    CheckResult,
    Divergence,
    Plan,
    Route,
    Step,
    Verdict,
    check,
    close_models,
    divergences,
    installed_models,
    is_busy,
    model_needs,
    need_of,
    plan,
    route,
    sizing_text,
    uninstalled_priority,
)
from gpurouter.decide.route.pipeline import Choice
from gpurouter.sizing import catalog, eras
from gpurouter.units import GIB, mb, size_text
from gpurouter.urls import redact

RULE = "=" * 70
FOREVER = 20 * 365 * 86400  # `ollama ps` shows "Forever" past this


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def _until(model: LoadedModel, now: float) -> str:
    if model.expires_at is None:
        return "expiry unknown"
    if is_busy(model, now):
        return "busy (requests in flight)"
    left = model.expires_at.timestamp() - now
    if left > FOREVER:
        return "kept forever"
    return f"unloads in {int(left // 60)}m{int(left % 60):02d}s"


def where_text(ratio: float) -> str:
    """Where a copy runs, from size_vram / size."""
    return "100% GPU" if ratio >= 1 else ("CPU" if ratio == 0 else f"{ratio:.0%} GPU / {1 - ratio:.0%} CPU")


def _processor(node: NodeState) -> str:
    if not node.up:
        return "down"
    if not node.capacity.known:
        return "GPU?"
    return "CPU" if node.capacity.source == "none" or not node.vram_total else "GPU"


# -------------------------------------------------------------------------------------------------- JSON


def need_json(need: ModelNeed | None) -> dict[str, Any] | None:
    """What a model takes fully on GPU on one node, and what that figure rests on."""
    if need is None:
        return None
    return {
        "node": need.node,
        "bytes": need.bytes,
        "source": need.source,
        "num_ctx": need.num_ctx,
        "context_source": need.context_source,
        "parallel": need.parallel,
        "era": need.era,
        "predicted_bytes": need.admission.predicted() if need.admission is not None else None,
    }


def needs_json(needs: dict[str, ModelNeed]) -> list[dict[str, Any]]:
    """The needs in the order of the nodes in the configuration (the order of every other per-node list)."""
    return [need_json(n) for n in needs.values()]  # type: ignore[misc]


def need_groups(needs: dict[str, ModelNeed]) -> list[tuple[ModelNeed, list[str]]]:
    """Nodes that give the model the same figure, at the same context and by the same era, grouped."""
    groups: dict[tuple[int, int, str, str], tuple[ModelNeed, list[str]]] = {}
    for node, need in sorted(needs.items()):
        groups.setdefault((need.bytes, need.num_ctx, need.era, need.source), (need, []))[1].append(node)
    return sorted(groups.values(), key=lambda g: (g[0].bytes, g[1]))


def not_installed_text(state: ClusterState, model: str) -> str:
    """`not installed on any node (did you mean mxbai-embed-large:latest?)`; where it is installed is unknown
    when no node answered (and no other name is offered for it)."""
    down = [n.name for n in state.nodes if not n.up]
    if len(down) == len(state.nodes):
        return "unknown whether it is installed: no node answered"
    where = "any node that answered" if down else "any node"
    close = close_models(state, model)
    return f"not installed on {where}" + (f" (did you mean {', '.join(close)}?)" if close else "")


def unknown_model_text(state: ClusterState, model: str, fallback: str = "") -> str:
    """Why a model name is refused: a configured priority model in the words status uses for it, else
    `unknown model 'x': …` with the closest names (or `fallback` when none is close)."""
    if state.config.priority(model) is not None:
        return f"priority model {model_key(model)}: {not_installed_text(state, model)}"
    close = close_models(state, model)
    hint = fallback
    if close:
        where = "" if close[0] in installed_models(state) else ", known but installed on no node"
        hint = f" (did you mean {', '.join(close)}{where}?)"
    return f"unknown model {model!r}: not installed on any node, not in the catalog{hint}"


def needs_text(needs: dict[str, ModelNeed], state: ClusterState, model: str) -> str:
    """`5024 MB at 4096 tokens (llama-server, estimated) on gpu-small; 8636 MB at 32768 ... on gpu-24`."""
    if not needs:
        if model_key(model) in uninstalled_priority(state) or state.config.priority(model) is None:
            return f"VRAM need unknown: {not_installed_text(state, model)}"
        return "VRAM need unknown: set model_sizes for it"
    groups = need_groups(needs)
    if len(groups) == 1:
        return sizing_text(groups[0][0])
    return "; ".join(f"{sizing_text(need)} on {', '.join(nodes)}" for need, nodes in groups)


def verdict_json(v: Verdict) -> dict[str, Any]:
    return {
        "node": v.node,
        "fits": v.fits,
        "kind": v.kind,
        "reason": v.reason,
        "need": need_json(v.sizing),
        "takes_bytes": v.need,
        "usable_bytes": v.usable,
        "free_bytes": v.free,
        "evict": list(v.evict),
        "in_place": v.in_place,
    }


def loaded_json(m: LoadedModel, now: float) -> dict[str, Any]:
    return {
        "model": m.name,
        "size_bytes": m.size,
        "size_vram_bytes": m.size_vram,
        "gpu_ratio": round(m.gpu_ratio, 4),
        "context_length": m.context_length,
        "expires_at": m.expires_at.isoformat() if isinstance(m.expires_at, datetime) else None,
        "busy": is_busy(m, now),
    }


def step_json(s: Step) -> dict[str, Any]:
    return {
        "action": s.action,
        "model": s.model,
        "node": s.node,
        "reason": s.reason,
        "num_ctx": s.num_ctx,
        "keep_alive": s.keep_alive,
        "for_model": s.serves,
    }


def divergence_json(d: Divergence | None) -> dict[str, Any] | None:
    """Where the plan for every priority model puts a model, when routing it alone picks another node."""
    if d is None:
        return None
    return {"model": d.model, "route_node": d.route_node, "plan_node": d.plan_node, "reason": d.reason}


def plan_json(p: Plan, differs: Iterable[Divergence]) -> dict[str, Any]:
    """The plan; `differs`: its loads that `route` would place elsewhere (placement.divergences)."""
    return {
        "steps": [step_json(s) for s in p.steps],
        "unplaced": [{"model": m, "reason": why} for m, why in p.unplaced],
        "already": [{"model": m, "node": n} for m, n in p.already],
        "differs_from_route": [divergence_json(d) for d in differs],
    }


def outcome_json(o: Outcome) -> dict[str, Any]:
    return {
        **step_json(o.step),
        "ok": o.ok,
        "detail": o.detail,
        "duration_seconds": round(o.duration, 3),
        "skipped": o.skipped,
    }


def node_json(node: NodeState, now: float, fits: Iterable[tuple[str, Verdict]]) -> dict[str, Any]:
    return {
        "name": node.name,
        "url": redact(node.config.url),
        "up": node.up,
        "error": node.error,
        "version": node.version,
        "era": node.era,
        "default_context": node.default_context[0],
        "default_context_source": node.default_context[1],
        "num_parallel": node.config.num_parallel,
        "maintenance": node.config.maintenance,
        "gpu_source": node.capacity.source,
        "capacity_reason": node.capacity.reason or None,
        "gpus": [{"index": g.index, "name": g.name, "total_bytes": g.total} for g in node.capacity.gpus],
        "vram_total_bytes": node.vram_total,
        "vram_usable_bytes": node.vram_usable,
        "vram_used_bytes": node.vram_used if node.up else None,
        "vram_free_bytes": node.vram_free if node.up else None,
        "hidden_bytes": node.hidden,
        "hidden_reason": node.hidden_why or None,
        "safety_margin": node.margin,
        "loaded": [loaded_json(m, now) for m in node.loaded],
        "installed": [m.name for m in node.installed],
        "fits": [{"model": model, **verdict_json(v)} for model, v in fits],
    }


def route_json(r: Route, differs: Divergence | None = None) -> dict[str, Any]:
    return {
        "model": r.model,
        "needs": needs_json(r.needs),
        "node": r.node,
        "processor": r.processor,
        "reason": r.reason,
        "verdicts": [verdict_json(v) for v in r.verdicts],
        "plan_differs": divergence_json(differs),
    }


def route_document(state: ClusterState, model: str, now: float) -> dict[str, Any]:
    """`route`'s answer (command line and HTTP API alike): for a priority model, also where the plan differs."""
    result = route(state, model, now)
    return route_json(result, route_divergence(state, result, now))


def route_divergence(state: ClusterState, result: Route, now: float) -> Divergence | None:
    if state.config.priority(result.model) is None:
        return None
    return next((d for d in divergences(state, plan(state, now=now), now) if d.model == result.model), None)


def check_json(c: CheckResult) -> dict[str, Any]:
    return {
        "model": c.model,
        "needs": needs_json(c.needs),
        "verdicts": [verdict_json(v) for v in c.verdicts],
        "result": c.code,
        "reason": c.result,
    }


def execution_json(e: Execution) -> dict[str, Any]:
    return {"dry_run": e.dry_run, "ok": e.ok, "outcomes": [outcome_json(o) for o in e.outcomes]}


# why optimize acted or only planned: the code in JSON → the words for people
MODE_TEXT = {
    "dry_run": "--dry-run, nothing changed",
    "apply": "--apply",
    "monitor_only": "auto_optimize: false in the configuration, nothing changed; give --apply to act",
    "auto_optimize": "auto_optimize: true",
}


def optimize_document(e: Execution, mode: str, state: ClusterState, now: float) -> dict[str, Any]:
    """`gpu-router optimize --json` and POST /api/v1/optimize with dry_run: the plan, each step's outcome."""
    return {
        "command": "optimize",
        "mode": mode,
        "plan": plan_json(e.plan, divergences(state, e.plan, now)),
        **execution_json(e),
        "nodes_down": [n.name for n in state.nodes if not n.up],
    }


# ------------------------------------------------------------------------------------------------ status


def fit_table(state: ClusterState, now: float) -> dict[str, list[tuple[str, Verdict]]]:
    """Per node: the priority models, then the models installed there, each with its verdict there."""
    models = [model_key(p.name) for p in state.config.priority_models]
    for node in state.nodes:
        models += [model_key(m.name) for m in node.installed if model_key(m.name) not in models]
    table: dict[str, list[tuple[str, Verdict]]] = {n.name: [] for n in state.nodes}
    priority = set(models[: len(state.config.priority_models)])
    for model in models:
        for node, verdict in zip(state.nodes, check(state, model, now).verdicts, strict=True):
            if model in priority or node.installed_model(model) is not None:
                table[node.name].append((model, verdict))
    return table


def status_json(state: ClusterState, now: float) -> dict[str, Any]:
    table = fit_table(state, now)
    return {
        "taken_at": state.taken_at,
        "nodes": [node_json(n, now, table[n.name]) for n in state.nodes],
        "priority_models": [priority_json(state, p.name, i) for i, p in enumerate(state.config.priority_models, 1)],
    }


def priority_json(state: ClusterState, model: str, rank: int) -> dict[str, Any]:
    """A priority model's standing: installed on some node that answered, fully on GPU somewhere."""
    key = model_key(model)
    return {
        "model": key,
        "rank": rank,
        "installed": key not in uninstalled_priority(state),
        "on_gpu": state.on_gpu(key),
    }


def status_text(state: ClusterState, now: float) -> list[str]:
    table = fit_table(state, now)
    lines = ["INTELLIGENT GPU ROUTING STATUS", RULE]
    for node in state.nodes:
        lines += [*_node_text(state, node, now, table[node.name]), ""]
    up = sum(n.up for n in state.nodes)
    on_gpu = [model_key(p.name) for p in state.config.priority_models if state.on_gpu(p.name)]
    missing = [model_key(p.name) for p in state.config.priority_models if not state.on_gpu(p.name)]
    summary = f"Nodes: {up}/{len(state.nodes)} up; priority models on GPU: {len(on_gpu)}/{len(on_gpu) + len(missing)}"
    lines.append(summary + (f" (not on GPU: {', '.join(missing)})" if missing else ""))
    for model in uninstalled_priority(state):
        lines.append(f"❌ Priority model {model}: {not_installed_text(state, model)}")
    return lines


def _margin_text(state: ClusterState, node: NodeState) -> str:
    if state.config.vram_safety_margin is None:
        return "no margin beyond Ollama's own"
    return f"{node.margin:.0%} safety"


def _node_text(state: ClusterState, node: NodeState, now: float, fits: list[tuple[str, Verdict]]) -> list[str]:
    where = f"{node.name} ({redact(node.config.url)})"
    if not node.up:
        return [f"Node: {where} - DOWN: {node.error or node.error_kind}"]
    kind = {"GPU": "GPU Node", "CPU": "CPU Node"}.get(_processor(node), "Node")
    head = f"{kind}: {where}, Ollama {node.version}" + (" [MAINTENANCE]" if node.config.maintenance else "")
    ctx, ctx_source = node.default_context
    lines = [head, f"   Judged as: {eras.LABELS[node.era]} era; default context {ctx} tokens ({ctx_source})"]
    if _processor(node) == "GPU?":
        lines.append(f"   GPU capacity unknown: {node.capacity.reason}")
    elif _processor(node) == "CPU":
        lines.append("   No GPU: models here run on CPU")
    else:
        gpus = ", ".join(f"{g.name} {size_text(g.total)}" for g in node.capacity.gpus)
        lines += [
            f"   GPUs: {gpus} (from {node.capacity.source})",
            f"   Total VRAM: {size_text(node.vram_total)}",
            f"   Usable VRAM: {size_text(node.vram_usable)} ({_margin_text(state, node)})",
            f"   Free VRAM: {size_text(node.vram_free)}",
        ]
        if node.hidden:
            lines.append(
                f"   Also in use: ~{size_text(node.hidden)} held outside Ollama, inferred because {node.hidden_why}"
                " (the capacity source cannot see other processes; it counts until a poll shows otherwise)"
            )
    if node.loaded:
        lines.append("   Loaded models:")
        width = max(len(m.name) for m in node.loaded)
        for m in node.loaded:
            lines.append(
                f"      {m.name:<{width}}  {size_text(m.size):>8}, {where_text(m.gpu_ratio)}, {_until(m, now)}"
            )
    else:
        lines.append("   Loaded models: none")
    if _processor(node) == "GPU" and fits:
        lines.append("   Can fit these models:")
        for model, v in fits:
            sizing = v.sizing or need_of(state, model, node)
            need = v.need if v.need is not None else getattr(sizing, "bytes", None)
            lines.append(f"      {_mark(v.fits)} {model} ({size_text(need)}) - {v.reason}")
    return lines


# ----------------------------------------------------------------------------------------- route / check


def route_text(r: Route, state: ClusterState, differs: Divergence | None = None) -> list[str]:
    lines = [f"ROUTING DECISION FOR: {r.model}", RULE]
    lines.append(f"   Model size: {needs_text(r.needs, state, r.model)}")
    lines.append("")
    for v in r.verdicts:
        node = state.node(v.node)
        lines.append(f"   {_mark(v.fits)} {v.node} ({_processor(node) if node else '?'}): {v.reason}")
    lines.append("")
    if r.node is None:
        lines.append(f"   {r.reason}")
    else:
        lines.append(f"   Best choice: {r.node} ({r.processor})")
        lines.append(f"      Reason: {r.reason}")
    if differs is not None:
        lines.append(f"   Note: {differs.reason}")
    return lines


def check_text(c: CheckResult, state: ClusterState) -> list[str]:
    size = needs_text(c.needs, state, c.model)
    lines = [f"CHECKING FIT FOR: {c.model}", RULE, f"Model size: {size}", "", "Node compatibility:"]
    lines += [f"   {_mark(v.fits)} {v.node}: {v.reason}" for v in c.verdicts]
    return [*lines, "", f"Result: {c.result}"]


# ------------------------------------------------------------------------------------------------ models


def model_rows(state: ClusterState) -> list[dict[str, Any]]:
    """Every known model (catalog, installed, loaded, configured) with what it needs per node, smallest first."""
    names = set(state.known_models()) | {spec.name for spec in catalog.CATALOG}
    rows = []
    for name in names:
        needs = model_needs(state, name)
        rows.append(
            {
                "model": name,
                "needs": needs_json(needs),
                "in_catalog": catalog.find(name) is not None,
                "priority_rank": state.config.priority_rank(name),
                "configured_size_bytes": state.config.model_sizes.get(name),
                "installed_on": [n.name for n in state.nodes if n.installed_model(name)],
                "loaded_on": [n.name for n in state.nodes if n.loaded_model(name)],
            }
        )
    rows.sort(key=lambda r: (not r["needs"], max((n["bytes"] for n in r["needs"]), default=0), r["model"]))
    return rows


def models_document(state: ClusterState) -> dict[str, Any]:
    """`gpu-router models --json` and GET /api/v1/models."""
    return {"command": "models", "models": model_rows(state), "nodes_down": [n.name for n in state.nodes if not n.up]}


def down_text(state: ClusterState) -> list[str]:
    """`Nodes that did not answer: gpu-small (connection refused)`, or nothing when every node answered."""
    down = [f"{n.name} ({n.error or n.error_kind})" for n in state.nodes if not n.up]
    return [f"Nodes that did not answer: {', '.join(down)}"] if down else []


def models_text(state: ClusterState, rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "KNOWN MODELS DATABASE",
        RULE,
        "Model sizes (VRAM to run fully on GPU, per node: at the context it gets there, by that node's Ollama):",
    ]
    width = max(28, *(len(r["model"]) + 1 for r in rows))
    for r in rows:
        groups = need_groups(model_needs(state, r["model"]))
        facts = []
        if r["priority_rank"]:
            facts.append(f"priority #{r['priority_rank']}")
        if r["installed_on"]:
            facts.append(f"installed on {', '.join(r['installed_on'])}")
        if r["loaded_on"]:
            facts.append(f"loaded on {', '.join(r['loaded_on'])}")
        if not groups:
            lines.append(
                f"   {r['model']:<{width}}{'?':>6} MB  {'; '.join([needs_text({}, state, r['model']), *facts])}"
            )
        for i, (need, nodes) in enumerate(groups):
            size = f"{mb(need.bytes):>6} MB ({need.bytes / GIB:.2f} GB)"
            where = f"{eras.LABELS[need.era]}, {need.num_ctx} tokens, {need.source}"
            if len(groups) > 1:
                where += f" on {', '.join(nodes)}"
            name = r["model"] if i == 0 else ""
            lines.append(f"   {name:<{width}}{size}  {'; '.join([where, *facts] if i == 0 else [where])}")
    return lines + down_text(state)


# ---------------------------------------------------------------------------------------------- optimize


def plan_text(p: Plan, state: ClusterState, now: float) -> list[str]:
    """The guide's "OPTIMIZING N PRIORITY MODELS": per model, already on GPU / best choice / why not."""
    count = len(state.config.priority_models)
    lines = [f"OPTIMIZING {count} PRIORITY MODEL{'S' if count != 1 else ''}", RULE]
    differs = {d.model: d for d in divergences(state, p, now)}
    for pm in state.config.priority_models:
        key = model_key(pm.name)
        lines.append(f"Routing decision for: {key}")
        lines += [f"   {line}" for line in model_plan_lines(key, p, differs.get(key))]
    if not state.config.priority_models:
        lines.append("No priority models configured (priority_models in the configuration).")
    return lines


def model_plan_lines(key: str, p: Plan, differs: Divergence | None = None) -> list[str]:
    """What the plan does for one model, as the lines under its name."""
    already = dict(p.already)
    pins = [f"   - {step_line(s)}" for s in p.steps if s.serves == key and s.action == "pin"]
    if key in already:
        return [f"✅ Already on GPU: {already[key]}" + ("" if pins else " (nothing to do)"), *pins]
    unplaced = dict(p.unplaced)
    if key in unplaced:
        return [f"❌ Cannot put on GPU: {unplaced[key]}", *pins]
    steps = [s for s in p.steps if s.serves == key]
    load = next((s for s in steps if s.action == "load"), None)
    if load is None:
        return pins or ["(not in this plan)"]
    lines = [f"✅ Best choice: {load.node} (GPU)"]
    if differs is not None:
        lines.append(f"   Note: {differs.reason}")
    lines += [f"   - {step_line(s)}" for s in steps]
    return lines


def step_line(s: Step) -> str:
    if s.action == "load":
        ctx = f"num_ctx {s.num_ctx}" if s.num_ctx else "default context"
        return f"load {s.model} on GPU at {s.node} ({ctx}, keep_alive {s.keep_alive})"
    if s.action in ("evict", "release"):
        return f"{s.action} {s.model} from {s.node}: {s.reason}"
    if s.action == "pin":
        return f"pin {s.model} on {s.node} (keep_alive {s.keep_alive}): {s.reason}"
    return f"unload {s.model} from {s.node}: {s.reason}"


def event_line(kind: str, step: Step, detail: str) -> str:
    """One progress line of `optimize` for an executor event."""
    if kind == "start":
        return detail
    if kind == "progress":
        return f"   ... {step.model} on {step.node}: {detail}"
    return f"   {_mark(kind == 'done')} {detail}"


def execution_summary(e: Execution, p: Plan) -> str:
    moved = sum(1 for o in e.outcomes if o.step.action == "load" and o.ok)
    failed = sum(1 for o in e.outcomes if not o.ok and not o.skipped)
    return (
        f"Result: {moved} model(s) put on GPU, {len(p.already)} already on GPU, "
        f"{len(p.unplaced)} cannot be placed, {failed} step(s) failed"
    )


# ------------------------------------------------------------------------------------------------ report


def plan_state(key: str, p: Plan) -> tuple[str, str | None, str | None]:
    """What the plan does for one model: (already | load | unplaced | none, node, reason)."""
    already = dict(p.already)
    if key in already:
        return "already", already[key], None
    unplaced = dict(p.unplaced)
    if key in unplaced:
        return "unplaced", None, unplaced[key]
    load = next((s for s in p.loads if s.serves == key), None)
    return ("load", load.node, load.reason) if load is not None else ("none", None, None)


def report_models(state: ClusterState, p: Plan, now: float, divergent: Iterable[Divergence]) -> list[dict[str, Any]]:
    """Per priority model: its standing, what it needs, every copy, and the plan's part for it (codes, bytes)."""
    differs = {d.model: d for d in divergent}
    rows = []
    for rank, pm in enumerate(state.config.priority_models, start=1):
        key = model_key(pm.name)
        action, node, reason = plan_state(key, p)
        rows.append(
            {
                **priority_json(state, key, rank),
                "needs": needs_json(model_needs(state, key)),
                "placements": [{"node": n.name, **loaded_json(m, now)} for n, m in state.placements(key)],
                "plan": {
                    "action": action,
                    "node": node,
                    "reason": reason,
                    "steps": [step_json(s) for s in p.steps if s.serves == key],
                    "differs_from_route": divergence_json(differs.get(key)),
                },
            }
        )
    return rows


def where_loaded_text(state: ClusterState, model: str, now: float) -> str:
    """`gpu-large on GPU, until 10:04; unknown on gpu-small (did not answer)`: every copy, and the nodes that
    may hold one unseen."""
    copies = [f"{n.name} {where_text(m.gpu_ratio)}, {_until(m, now)}" for n, m in state.placements(model)]
    down = [n.name for n in state.nodes if not n.up]
    if down:
        seen = "; ".join(copies) if copies else "not loaded on any node that answered"
        return f"{seen}; unknown on {', '.join(down)} (did not answer)"
    return "; ".join(copies) or "not loaded anywhere"


def report_document(state: ClusterState, desired: Desired, reading: Reading, now: float) -> dict[str, Any]:
    """`gpu-router report --json` and GET /api/v1/report: status, each priority model, placement from demand and
    the plan."""
    p = desired.plan
    differs = divergences(state, p, now)  # a route per load: once for the whole answer
    return {
        "command": "report",
        "status": status_json(state, now),
        "priority_models": report_models(state, p, now, differs),
        "demand": demand_json(desired, reading, state.config.demand),
        "plan": plan_json(p, differs),
    }


# what placement from demand does now: the "state" of demand_json → the words of demand_lines
DEMAND_STATES = {
    "on": "placing the models asked for most after the priority models",
    "off": "off (demand.placement: false): the priority models only",
    "no_proxy": "off: no proxy to read (demand.proxy_url is not set): the priority models only",
    "unread": "the proxy's demand could not be read: the priority models only",
}


def demand_state(reading: Reading, settings: DemandSettings) -> str:
    if not settings.placement:
        return "off"
    if settings.proxy_url is None:
        return "no_proxy"
    return "on" if reading.models is not None else "unread"


def demand_json(desired: Desired, reading: Reading, settings: DemandSettings) -> dict[str, Any]:
    """Placement from demand: where demand is read, each demanded model's choice, the desired GPU copies."""
    return {
        "state": demand_state(reading, settings),
        "proxy_url": redact(settings.proxy_url) if settings.proxy_url else None,
        "read_at": reading.at or None,
        "error": reading.error if reading.models is None and reading.at else None,
        "window_seconds": settings.window,
        "min_requests_per_minute": settings.min_requests_per_minute,
        "models": [
            {
                "model": c.model,
                "requests_per_minute": round(c.per_minute, 3),
                "score": round(c.score, 3),
                "copies": c.copies,
                "why": c.why,
            }
            for c in desired.choices
        ],
        "desired": [{"node": n, "model": m} for n, m in sorted(desired.targets)],
    }


def demand_lines(desired: Desired, reading: Reading, settings: DemandSettings) -> list[str]:
    """`report` and `optimize`: each demanded model, its demand and why it is (not) placed for it."""
    state = demand_state(reading, settings)
    lines = ["PLACEMENT FROM DEMAND", RULE, DEMAND_STATES[state][0].upper() + DEMAND_STATES[state][1:]]
    if state == "unread" and reading.error:
        lines[-1] += f" ({reading.error})"
    if state != "on":
        return lines
    lines[-1] = (
        f"Demand from {redact(settings.proxy_url or '')} over the last {settings.window:g}s; a model is placed for it "
        f"from {settings.min_requests_per_minute:g} requests/min"
    )
    if not desired.choices:
        lines.append("No requests in the window.")
    for c in desired.choices:
        copies = f", {c.copies} copies" if c.copies > 1 else ""
        lines.append(f"{'✅' if c.copies else '·'} {c.model} (score {c.score:.1f}{copies}): {c.why}")
    return lines


def report_text(state: ClusterState, desired: Desired, reading: Reading, now: float) -> list[str]:
    p = desired.plan
    lines = [*status_text(state, now), "", "PRIORITY MODELS", RULE]
    if not state.config.priority_models:
        lines.append("No priority models configured.")
    differs = {d.model: d for d in divergences(state, p, now)}
    for rank, pm in enumerate(state.config.priority_models, start=1):
        key = model_key(pm.name)
        lines.append(f"{rank}. {key}: {needs_text(model_needs(state, key), state, key)}")
        lines.append(f"   Where: {where_loaded_text(state, key, now)}")
        lines.append("   Optimize would:")
        lines += [f"      {line}" for line in model_plan_lines(key, p, differs.get(key))]
    return [*lines, "", *demand_lines(desired, reading, state.config.demand), *demand_steps(desired, state)]


def demand_steps(desired: Desired, state: ClusterState) -> list[str]:
    """The plan's steps for models placed for their demand (loads, copies, renewals, releases)."""
    priority = {model_key(p.name) for p in state.config.priority_models}
    steps = [s for s in desired.plan.steps if model_key(s.serves) not in priority]
    return [f"   - {step_line(s)}" for s in steps]


def route_choice(c: Choice) -> dict[str, Any]:
    """The request pipeline's choice with every node's scores (the proxy's /api/v1/route, `route --explain`)."""
    return {
        "model": c.model,
        "placement": c.placement,
        "reason": c.reason,
        "heal": c.heal,
        "targets": [
            {
                "node": t.node,
                "placement": t.placement,
                "score": round(t.score, 4),
                "scores": {k: round(v, 4) for k, v in t.parts.items()},
                "cached_tokens": t.cached_tokens,
                "slots": t.slots,
                "failing": t.failing,
                "options_set": dict(t.sets),
                "options_replaced": t.adjusted,
                "why": t.why,
            }
            for t in c.targets
        ],
        "dropped": [{"node": node, "why": why} for node, why in c.dropped],
    }


def route_choice_text(c: Choice) -> list[str]:
    lines = [f"{c.model}: {c.reason}" if c.targets else f"{c.model}: nowhere ({c.reason})"]
    for t in c.targets:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in t.parts.items())
        extra = " (failing)" if t.failing else (f" (options replaced: {t.why})" if t.adjusted else "")
        lines.append(f"  {t.node:<16} {t.placement:<8} score {t.score:5.2f}  {parts}{extra}")
    lines += [f"  {node:<16} dropped: {why}" for node, why in c.dropped]
    return lines
