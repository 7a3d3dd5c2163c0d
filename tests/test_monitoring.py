"""k8s/monitoring: alert rules and the dashboard parse and name only metrics the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics

MONITORING = Path(__file__).resolve().parent.parent / "k8s" / "monitoring"
PROMQL_KEYWORDS = {"by", "without", "and", "or", "unless", "bool", "on", "ignoring",
                   "group_left", "group_right", "offset"}


def exported_names() -> set[str]:
    metrics = Metrics()
    metrics.crypto_failures.labels("r", "open", "malformed").inc()
    metrics.requests.labels("r", "inbound", "200").inc()
    for histogram in (metrics.request_duration.labels("r", "inbound"),
                      metrics.upstream_duration.labels("r"),
                      metrics.crypto_duration.labels("r", "open")):
        histogram.observe(0.1)
    metrics.key_uses.labels("k", "id", "sign").inc()
    metrics.key_expiry.labels("k", "id").set(1)
    metrics.key_info.labels("k", "id", "active", "F").set(1)
    text = metrics.render().decode()
    # With workers > 1, a worker also exports gateway_worker_reloads_total.
    text += Metrics(role="worker").render().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or numbers)."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?\b", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end():].lstrip()
        if not following.startswith("(") and match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def test_alert_rules_parse_and_use_exported_metrics() -> None:
    rules: dict[str, Any] = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exported = exported_names()
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {"GatewayKeyExpiresWithin30Days", "GatewayKeyExpiresWithin7Days",
            "GatewayReloadFailing", "GatewayCryptoFailureRatioHigh", "GatewayUpstreamErrors",
            "GatewayNoTraffic"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert rule["annotations"]["summary"], name
        used = metric_names(rule["expr"])
        assert used, name
        assert used <= exported, f"{name} uses {used - exported}"


def test_dashboard_parses_and_uses_exported_metrics() -> None:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    exported = exported_names()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 9
    used = set().union(*(metric_names(e) for e in exprs))
    assert used <= exported, used - exported
    contract = {"gateway_requests_total", "gateway_request_duration_seconds_bucket",
                "gateway_crypto_duration_seconds_bucket", "gateway_crypto_failures_total",
                "gateway_key_uses_total", "gateway_key_expiry_timestamp_seconds",
                "gateway_key_info", "gateway_config_reloads_total", "gateway_config_generation",
                "gateway_upstream_duration_seconds_bucket"}
    assert contract <= used


def test_metric_name_extraction_catches_unknown_names() -> None:
    assert metric_names('sum by (route) (rate(gateway_nope_total{code="5"}[5m])) > 1e-9') == {
        "gateway_nope_total"}
