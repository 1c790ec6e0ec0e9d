"""Webhook payload validation and triage (optimizer/webhook.py): pure, over real-shaped version-4 payloads."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import alert, payload

from gpurouter.cluster.config import parse_config
from optimizer import webhook
from optimizer.webhook import Ignored, PayloadError, Wanted

CONFIG = parse_config(
    {
        "nodes": [
            {"name": "gpu-small", "url": "http://127.0.0.1:11501", "vram": "4GiB"},
            {"name": "cpu-node", "url": "http://127.0.0.1:11502", "vram": 0},
            {"name": "gpu-large", "url": "http://127.0.0.1:11503", "vram": "8GiB"},
        ],
        "priority_models": ["mxbai-embed-large", "llama3.1:latest"],
    }
)


def body(data: object) -> bytes:
    return json.dumps(data).encode()


def test_firing_alert_for_priority_model_on_configured_node_is_wanted():
    parsed = webhook.parse(body(payload(alert(model="llama3.1", node="gpu-large"))))
    result = webhook.triage(parsed, CONFIG)
    assert result.wanted == (Wanted("GPURouterPriorityModelOnCPU", "llama3.1:latest", "gpu-large"),)
    assert result.ignored == ()


@pytest.mark.parametrize("name", webhook.ACTIONABLE)
def test_each_actionable_alert_queues_work(name):
    result = webhook.triage(webhook.validate(payload(alert(name, model="mxbai-embed-large:latest"))), CONFIG)
    assert [(w.model, w.node) for w in result.wanted] == [("mxbai-embed-large:latest", None)]


def test_model_label_with_or_without_latest_tag_names_the_same_model():
    both = payload(alert(model="llama3.1", node="gpu-large"), alert(model="llama3.1:latest", node="gpu-large"))
    result = webhook.triage(webhook.validate(both), CONFIG)
    assert len(result.wanted) == 1  # the duplicate is listed once


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (alert(status="resolved", model="llama3.1", node="gpu-large"), "resolved"),
        (alert("GPURouterNodeDown", node="gpu-large"), "not an alert the optimizer acts on"),
        (alert(model="qwen2:7b", node="gpu-large"), "not a configured priority model"),
        (alert(model="llama3.1", node="http://evil.example:11434"), "node is not in the configuration"),
        (alert(model="llama3.1", node="gpu-huge"), "node is not in the configuration"),
        (alert(node="gpu-large"), "no model label"),
        (alert(model="  ", node="gpu-large"), "no model label"),
    ],
)
def test_ignored_alerts_carry_their_reason(item, reason):
    result = webhook.triage(webhook.validate(payload(item)), CONFIG)
    assert result.wanted == ()
    (ignored,) = result.ignored
    assert ignored.reason == reason
    assert ignored.alertname == item["labels"]["alertname"]


def test_mixed_post_splits_firing_from_resolved_and_reports_truncation():
    data = payload(
        alert(model="llama3.1", node="gpu-large"),
        alert(status="resolved", model="mxbai-embed-large", node="gpu-small"),
        alert("GPURouterNodeVRAMPressure", node="gpu-small"),
    )
    data["truncatedAlerts"] = 3
    result = webhook.triage(webhook.validate(data), CONFIG)
    assert [w.model for w in result.wanted] == ["llama3.1:latest"]
    assert [i.reason for i in result.ignored] == ["resolved", "not an alert the optimizer acts on"]
    assert result.ignored[0] == Ignored("GPURouterPriorityModelOnCPU", "mxbai-embed-large", "gpu-small", "resolved")
    assert result.truncated == 3


def test_empty_alert_list_is_valid_and_asks_for_nothing():
    result = webhook.triage(webhook.validate(payload()), CONFIG)
    assert result.wanted == () and result.ignored == ()


def _broken(mutate) -> dict:
    data = copy.deepcopy(payload(alert(model="llama3.1", node="gpu-large")))
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("version"), "version: missing"),
        (lambda d: d.update(version=4), 'version: expected "4", got a number'),
        (lambda d: d.update(version="3"), "version: expected \"4\", got '3'"),
        (lambda d: d.pop("alerts"), "alerts: missing"),
        (lambda d: d.update(alerts={}), "alerts: expected a list, got an object"),
        (lambda d: d.update(status="pending"), 'status: expected "firing" or "resolved"'),
        (lambda d: d.update(status=["firing"]), 'status: expected "firing" or "resolved", got a list'),
        (lambda d: d.update(truncatedAlerts="0"), "truncatedAlerts: expected a whole number, got a string"),
        (lambda d: d.update(truncatedAlerts=1.5), "truncatedAlerts: expected a whole number, got a number"),
        (lambda d: d.update(truncatedAlerts=True), "truncatedAlerts: expected a whole number, got a boolean"),
        (lambda d: d.update(truncatedAlerts=-1), "truncatedAlerts: expected a whole number ≥ 0"),
        (lambda d: d.update(receiver=None), "receiver: expected a string, got null"),
        (lambda d: d.update(commonLabels={"a": 1}), "commonLabels.a: expected a string, got a number"),
        (lambda d: d["alerts"].append("x"), "alerts[1]: expected an object, got a string"),
        (lambda d: d["alerts"][0].pop("labels"), "alerts[0].labels: missing"),
        (lambda d: d["alerts"][0].pop("status"), "alerts[0].status: missing"),
        (lambda d: d["alerts"][0]["labels"].pop("alertname"), "alerts[0].labels.alertname: missing"),
        (lambda d: d["alerts"][0]["labels"].update(model=7), "alerts[0].labels.model: expected a string"),
        (lambda d: d["alerts"][0].update(labels=[]), "alerts[0].labels: expected an object of strings"),
        (lambda d: d["alerts"][0].update(fingerprint=5), "alerts[0].fingerprint: expected a string"),
        (lambda d: d["alerts"][0].update(annotations=None), "alerts[0].annotations: expected an object"),
    ],
)
def test_invalid_payloads_name_the_problem(mutate, message):
    with pytest.raises(PayloadError) as caught:
        webhook.validate(_broken(mutate))
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty body"),
        (b"   ", "empty body"),
        (b"{", "invalid JSON"),
        (b"\xff\xfe\x00garbage", "invalid JSON"),
        (b"[" * 100_000, "invalid JSON"),
        (b"[]", "expected a JSON object, got a list"),
        (b"null", "expected a JSON object, got null"),
        (b'"4"', "expected a JSON object, got a string"),
        (b" " * (webhook.MAX_BODY + 1), "body too large"),
    ],
)
def test_bodies_that_are_not_json_objects_are_rejected(raw, message):
    with pytest.raises(PayloadError) as caught:
        webhook.parse(raw)
    assert str(caught.value).startswith(message)


def test_echoed_values_are_clipped_and_escaped():
    # a lone surrogate in a model or node label is refused (test_names.py); in another label it is echoed escaped
    result = webhook.triage(webhook.validate(payload(alert("x" * 10_000 + "\ud800", model="x" * 10_000))), CONFIG)
    (ignored,) = result.ignored
    assert ignored.model is not None and len(ignored.model) <= 120 and len(ignored.alertname) <= 120
    ignored.alertname.encode("utf-8")  # no lone surrogate left
    assert webhook.clip("a\ud800b") == "a\\ud800b"
