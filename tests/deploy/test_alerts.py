"""helm/audiostream/files/alerts.yaml: the observability issue's thresholds, real metrics,
one-line runbooks."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from audiostream.metrics import GatewayMetrics, WorkerMetrics
from tests.deploy.chart import CHART

ALERTS = CHART / "files" / "alerts.yaml"

#: alert -> (severity, threshold at the end of its expression)
EXPECTED = {
    "AudiostreamQueueDepthHigh": ("warning", "500"),
    "AudiostreamQueueDepthCritical": ("critical", "1000"),
    "AudiostreamGatewayConnectionsHigh": ("warning", "0.6"),
    "AudiostreamGatewayConnectionsCritical": ("critical", "0.8"),
    "AudiostreamWorkerErrorRateHigh": ("warning", "0.05"),
    "AudiostreamRoundTripSlow": ("warning", "0.1"),
    "AudiostreamChunksDropped": ("warning", "0.01"),
    # issue 14: autoscaling and utilisation that see the real load
    "AudiostreamQueueAgeHigh": ("warning", "0.25"),
    "AudiostreamQueueAgeCritical": ("critical", "0.5"),
    "AudiostreamDeadLettersGrowing": ("warning", "100"),
    "AudiostreamWorkerUtilisationLow": ("warning", "< 0.2"),
    "AudiostreamGpuWorkerOnCpu": ("critical", "0"),
    "AudiostreamScrapeFailing": ("warning", "== 0"),
    "AudiostreamGatewayShedding": ("warning", "0"),
}
#: Series Prometheus itself writes for every target.
PROMETHEUS_SERIES = {"up"}


def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    out = {}
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert rule["alert"] not in out
            out[rule["alert"]] = rule
    return out


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    WorkerMetrics(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
    # Histograms and counters expose suffixed series even before the first observation.
    for family in registry.collect():
        if family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_sum", "_count", "_bucket"))
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


def test_the_alerts_the_issue_asks_for() -> None:
    found = rules()
    assert set(found) == set(EXPECTED)
    for name, (severity, threshold) in EXPECTED.items():
        rule = found[name]
        assert rule["labels"]["severity"] == severity
        expr = " ".join(rule["expr"].split())
        tail = threshold if threshold[0] in "<=" else f"> {threshold}"
        assert expr.endswith(tail) or f"{tail} and " in expr, (name, expr)
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_alert_has_a_one_line_runbook(name: str) -> None:
    ann = rules()[name]["annotations"]
    assert ann["runbook"].strip() and "\n" not in ann["runbook"].strip()
    assert len(ann["runbook"]) < 300
    assert ann["summary"].strip()


def test_alerts_use_only_metrics_the_code_exports() -> None:
    exported = exported_metric_names()
    for name, rule in rules().items():
        used = set(re.findall(r"\baudiostream_[a-z_]+", rule["expr"]))
        assert used or PROMETHEUS_SERIES & set(re.findall(r"\b[a-z_]+(?=\{)", rule["expr"])), name
        assert used <= exported, (name, used - exported)
        assert rule["expr"].count("(") == rule["expr"].count(")"), name


def test_the_metrics_the_chart_autoscales_on_are_exported() -> None:
    exported = exported_metric_names()
    assert "audiostream_gateway_connections_active" in exported  # gateway HPA
    assert "audiostream_gateway_connections_active" in exported
    assert "audiostream_chunks_in_total" in exported  # gateway HPA: streaming sessions
    assert "audiostream_queue_oldest_age_seconds" in exported  # worker KEDA / HPA
    assert "audiostream_worker_executor_busy_seconds_total" in exported  # utilisation
    assert "audiostream_worker_loop_busy_seconds_total" in exported


def test_utilisation_and_fallback_alerts_read_what_they_claim() -> None:
    r = rules()
    util = r["AudiostreamWorkerUtilisationLow"]["expr"]
    assert "rate(audiostream_worker_executor_busy_seconds_total" in util
    gpu = r["AudiostreamGpuWorkerOnCpu"]["expr"]
    assert "audiostream_worker_provider_info" in gpu and "unless" in gpu
    assert "CUDAExecutionProvider" in gpu
    # Both gateways export the age: max, never sum; smoothed like the KEDA query.
    for name in ("AudiostreamQueueAgeHigh", "AudiostreamQueueAgeCritical"):
        assert r[name]["expr"].startswith("max by (namespace, processing) (avg_over_time(")


def test_specific_expressions() -> None:
    r = rules()
    ratio = " ".join(r["AudiostreamGatewayConnectionsHigh"]["expr"].split())
    assert ratio.startswith(
        "audiostream_gateway_connections_active / audiostream_gateway_connections_capacity")
    # Gateways and workers both export the depth gauge: take the max, never the sum.
    assert r["AudiostreamQueueDepthHigh"]["expr"].startswith("max by")
    errors = r["AudiostreamWorkerErrorRateHigh"]["expr"]
    assert 'status="failed"' in errors and "audiostream_worker_messages_total[5m]" in errors
    rtt = r["AudiostreamRoundTripSlow"]["expr"]
    assert "audiostream_round_trip_seconds_sum" in rtt and "_count" in rtt  # the mean
    drops = r["AudiostreamChunksDropped"]["expr"]
    assert "audiostream_chunks_dropped_total" in drops and "audiostream_chunks_in_total" in drops
