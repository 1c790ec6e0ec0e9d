"""Alertmanager webhook payloads (version "4"): validation, then which models to queue and what to ignore.

Pure: no I/O. A payload only ever names things; a `node` label selects one of the configured nodes and is
never used to reach anything. Every message names the offending field (``alerts[2].labels.model: expected a
string, got a number``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpurouter.cluster.config import Config, model_key, name_problem
from gpurouter.units import body_too_large

MAX_BODY = 2 * 1024 * 1024  # bytes; a large group of alerts is a few hundred KiB
ACTIONABLE = (
    "GPURouterPriorityModelOnCPU",
    "GPURouterPriorityModelPartiallyOffloaded",
    "GPURouterPriorityModelNotOnGPU",
)
STATUSES = ("firing", "resolved")
_NAMES = ("model", "node")  # the labels that name a model or a node: names of printable characters
_ECHO = 120  # characters of a payload value echoed back in an answer or a log line

# Optional fields of the payload and of an alert, with the type each must have when present.
_PAYLOAD_TYPES: dict[str, tuple[type, str]] = {
    "receiver": (str, "a string"),
    "groupKey": (str, "a string"),
    "externalURL": (str, "a string"),
    "truncatedAlerts": (int, "a whole number"),
}
_PAYLOAD_LABELS = ("groupLabels", "commonLabels", "commonAnnotations")
_ALERT_TYPES: dict[str, tuple[type, str]] = {
    "startsAt": (str, "a string"),
    "endsAt": (str, "a string"),
    "generatorURL": (str, "a string"),
    "fingerprint": (str, "a string"),
}


class PayloadError(ValueError):
    """A body that is not a valid version-4 webhook payload; the message names the problem."""

    status = 400


class BodyTooLarge(PayloadError):
    """A body over MAX_BODY (HTTP 413, like every other size limit of the router)."""

    status = 413


@dataclass(frozen=True)
class Alert:
    """One alert of a notification."""

    status: str
    labels: Mapping[str, str]
    fingerprint: str = ""
    starts_at: str = ""

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")


@dataclass(frozen=True)
class Payload:
    """A validated notification."""

    status: str
    alerts: tuple[Alert, ...]
    receiver: str = ""
    group_key: str = ""
    truncated: int = 0


@dataclass(frozen=True)
class Wanted:
    """A model to queue a job for: `model` is the configured priority model's name, `node` a configured node."""

    alertname: str
    model: str
    node: str | None


@dataclass(frozen=True)
class Ignored:
    """An alert that causes no work, and why."""

    alertname: str
    model: str | None
    node: str | None
    reason: str


@dataclass(frozen=True)
class Triage:
    """What one notification asks for."""

    wanted: tuple[Wanted, ...]
    ignored: tuple[Ignored, ...]
    truncated: int = 0


def parse(body: bytes) -> Payload:
    """Decode and validate a request body; raises PayloadError."""
    if len(body) > MAX_BODY:
        raise BodyTooLarge(body_too_large(len(body), MAX_BODY))
    if not body.strip():
        raise PayloadError("empty body: expected an Alertmanager webhook payload (JSON)")
    try:
        data = json.loads(body)
    except RecursionError:
        raise PayloadError("invalid JSON: nested too deeply") from None
    except UnicodeDecodeError:
        raise PayloadError("invalid JSON: the body is not UTF-8 text") from None
    except ValueError as exc:
        raise PayloadError(f"invalid JSON: {clip(str(exc))}") from None
    return validate(data)


def validate(data: Any) -> Payload:
    """Check an already-decoded payload: version "4", the required fields and the type of every field."""
    if not isinstance(data, dict):
        raise PayloadError(f"expected a JSON object, got {_kind(data)}")
    for key in ("version", "status", "alerts"):
        if key not in data:
            raise PayloadError(f"{key}: missing (not an Alertmanager webhook payload?)")
    if data["version"] != "4":
        raise PayloadError(f'version: expected "4", got {_show(data["version"])}')
    status = _status(data["status"], "status")
    for key, (kind, name) in _PAYLOAD_TYPES.items():
        if key in data:
            _typed(data[key], kind, name, key)
    if data.get("truncatedAlerts", 0) < 0:
        raise PayloadError("truncatedAlerts: expected a whole number ≥ 0")
    for key in _PAYLOAD_LABELS:
        if key in data:
            _labels(data[key], key)
    alerts = data["alerts"]
    if not isinstance(alerts, list):
        raise PayloadError(f"alerts: expected a list, got {_kind(alerts)}")
    return Payload(
        status=status,
        alerts=tuple(_alert(item, f"alerts[{i}]") for i, item in enumerate(alerts)),
        receiver=data.get("receiver", ""),
        group_key=data.get("groupKey", ""),
        truncated=data.get("truncatedAlerts", 0),
    )


def triage(payload: Payload, config: Config) -> Triage:
    """Split a notification into models to queue (firing actionable alerts for configured priority models
    and nodes) and ignored alerts with their reasons. Each (alert, model, node) is listed once."""
    wanted: dict[Wanted, None] = {}
    ignored: list[Ignored] = []
    for alert in payload.alerts:
        verdict = _verdict(alert, config)
        if isinstance(verdict, Wanted):
            wanted[verdict] = None
            continue
        model, node = alert.labels.get("model"), alert.labels.get("node")
        ignored.append(
            Ignored(
                alertname=clip(alert.alertname),
                model=clip(model) if model is not None else None,
                node=clip(node) if node is not None else None,
                reason=verdict,
            )
        )
    return Triage(wanted=tuple(wanted), ignored=tuple(ignored), truncated=payload.truncated)


def clip(text: str) -> str:
    """A payload string made safe to echo: at most `_ECHO` characters, unencodable characters escaped."""
    short = text if len(text) <= _ECHO else text[: _ECHO - 1] + "…"
    return short.encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------------------------------------- helpers


def _verdict(alert: Alert, config: Config) -> Wanted | str:
    """The work an alert asks for, or why it asks for none."""
    if alert.alertname not in ACTIONABLE:
        return "not an alert the optimizer acts on"
    if alert.status != "firing":
        return "resolved"
    model = alert.labels.get("model", "").strip()
    if not model:
        return "no model label"
    priority = config.priority(model)
    if priority is None:
        return "not a configured priority model"
    node = alert.labels.get("node")
    if node is not None and config.node(node) is None:
        return "node is not in the configuration"
    return Wanted(alertname=alert.alertname, model=model_key(priority.name), node=node)


def _alert(item: Any, path: str) -> Alert:
    if not isinstance(item, dict):
        raise PayloadError(f"{path}: expected an object, got {_kind(item)}")
    for key in ("status", "labels"):
        if key not in item:
            raise PayloadError(f"{path}.{key}: missing")
    status = _status(item["status"], f"{path}.status")
    labels = _labels(item["labels"], f"{path}.labels")
    if "alertname" not in labels:
        raise PayloadError(f"{path}.labels.alertname: missing")
    if "annotations" in item:
        _labels(item["annotations"], f"{path}.annotations")
    for key, (kind, name) in _ALERT_TYPES.items():
        if key in item:
            _typed(item[key], kind, name, f"{path}.{key}")
    return Alert(
        status=status,
        labels=labels,
        fingerprint=item.get("fingerprint", ""),
        starts_at=item.get("startsAt", ""),
    )


def _status(value: Any, path: str) -> str:
    if not isinstance(value, str) or value not in STATUSES:
        raise PayloadError(f'{path}: expected "firing" or "resolved", got {_show(value)}')
    return value


def _labels(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise PayloadError(f"{path}: expected an object of strings, got {_kind(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise PayloadError(f"{path}.{clip(key)}: expected a string, got {_kind(item)}")
        if key in _NAMES and (problem := name_problem(item)):
            raise PayloadError(f"{path}.{key}: {problem}")
    return value


def _typed(value: Any, kind: type, name: str, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PayloadError(f"{path}: expected {name}, got {_kind(value)}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _show(value: Any) -> str:
    return repr(clip(value)) if isinstance(value, str) else _kind(value)
