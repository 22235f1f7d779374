"""The alert rules and the Grafana dashboard refer only to what we actually export.

``helm/audiostream/files/alerts.yaml`` is the one rule file (plain Prometheus format,
templated into the chart's PrometheusRule); ``docs/grafana-dashboard.json`` is the
dashboard. Metric names are collected from live ``GatewayMetrics``/``WorkerMetrics``
registries, so renaming a metric without updating these files fails here. Expressions
are parsed by ``promql-parser`` (the Rust PromQL parser, offline) and, independently,
checked superficially (balanced brackets, known functions).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from audiostream.envelope import ReplyStatus
from audiostream.errors import ErrorCode
from audiostream.metrics import STAGES, GatewayMetrics, WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "helm" / "audiostream" / "files" / "alerts.yaml"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"

#: Labels Prometheus attaches to every scraped series (Kubernetes service discovery).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "container", "endpoint",
                 "node"}
FUNCTIONS = {
    "abs", "absent", "avg_over_time", "ceil", "changes", "clamp_max", "clamp_min",
    "count_over_time", "delta", "deriv", "floor", "histogram_quantile", "increase",
    "irate", "label_replace", "last_over_time", "max_over_time", "min_over_time",
    "predict_linear", "quantile_over_time", "rate", "resets", "round", "scalar", "sort",
    "sort_desc", "sum_over_time", "time", "vector",
    # aggregation operators
    "avg", "bottomk", "count", "count_values", "group", "max", "min", "quantile",
    "stddev", "stdvar", "sum", "topk",
    # modifiers that take a parenthesised list
    "by", "without", "on", "ignoring", "group_left", "group_right",
}
#: The thresholds agreed for the alerts: (metric in the expr, comparison value, severity).
THRESHOLDS = [
    ("audiostream_queue_depth", 500, "warning"),
    ("audiostream_queue_depth", 1000, "critical"),
    ("audiostream_gateway_connections_capacity", 0.6, "warning"),
    ("audiostream_gateway_connections_capacity", 0.8, "critical"),
    ("audiostream_worker_messages_total", 0.05, "warning"),
    ("audiostream_round_trip_seconds_count", 0.1, "warning"),
    ("audiostream_chunks_dropped_total", 0.01, "warning"),
    ("audiostream_queue_oldest_age_seconds", 0.25, "warning"),
    ("audiostream_queue_oldest_age_seconds", 0.5, "critical"),
    ("audiostream_dead_letter_depth", 100, "warning"),
]


# --- what we export ---------------------------------------------------------------------------


def exported() -> dict[str, set[str]]:
    """Every series name the gateway and worker export -> its label names."""
    registry = CollectorRegistry()
    holders = [GatewayMetrics(registry), WorkerMetrics(registry)]
    labels: dict[str, set[str]] = {}
    for holder in holders:
        for metric in vars(holder).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            [family] = metric.describe()
            names = set(metric._labelnames)  # no public accessor in prometheus_client
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""],
                "summary": ["_sum", "_count"],
            }[family.type]
            for suffix in suffixes:
                labels[family.name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    # Custom collectors (the loop-busy counter reads a thread's CPU clock at scrape time).
    for family in registry.collect():
        if family.type == "counter" and family.name + "_total" not in labels:
            labels[family.name + "_total"] = set()
    labels["up"] = set()  # written by Prometheus for every target (failed scrapes)
    return labels


EXPORTED = exported()
#: Values a label can take, where the set is closed.
LABEL_VALUES = {
    "status": {str(s) for s in ReplyStatus},
    "stage": set(STAGES),
    "reason": {c.name.lower() for c in ErrorCode},
    "code": {c.name.lower() for c in ErrorCode},
}


def test_exported_names_cover_the_issue_list() -> None:
    for name in [
        "audiostream_gateway_connections_active", "audiostream_gateway_connections_capacity",
        "audiostream_gateway_connections_total", "audiostream_session_duration_seconds_count",
        "audiostream_chunks_in_total", "audiostream_chunks_out_total",
        "audiostream_bytes_in_total", "audiostream_bytes_out_total",
        "audiostream_chunks_dropped_total", "audiostream_stage_seconds_bucket",
        "audiostream_round_trip_seconds_bucket", "audiostream_worker_batch_size_bucket",
        "audiostream_worker_inference_seconds_bucket", "audiostream_worker_errors_total",
        "audiostream_queue_depth", "audiostream_worker_provider_info",
        "audiostream_queue_oldest_age_seconds", "audiostream_gateway_session_messages_waiting",
        "audiostream_worker_executor_busy_seconds_total",
        "audiostream_worker_loop_busy_seconds_total", "audiostream_dead_letter_depth",
    ]:
        assert name in EXPORTED, name


# --- helpers --------------------------------------------------------------------------------


def promql() -> Any:
    """The PromQL parser (PyPI ``promql-parser``, a binding of the Rust parser; offline)."""
    try:
        import promql_parser
    except ImportError:
        pytest.fail("promql-parser is needed to parse alert and dashboard queries: it belongs "
                    "in the dev extras (pip install promql-parser)")
    return promql_parser


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def superficial_problems(expr: str) -> list[str]:
    """Balanced brackets, known functions, exported metric names: no parser needed."""
    problems = []
    bare = strip_strings(expr)
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in bare:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            problems.append(f"unbalanced {ch!r}")
            break
    if stack:
        problems.append(f"unclosed {''.join(stack)!r}")
    for fn in re.findall(r"\b([a-zA-Z_][a-zA-Z0-9_]*)\s*\(", bare):
        if fn not in FUNCTIONS:
            problems.append(f"unknown function {fn}")
    for name in re.findall(r"\baudiostream_[a-z0-9_]+", bare):
        if name not in EXPORTED:
            problems.append(f"metric {name} is not exported")
    return problems


def selectors(node: Any) -> list[Any]:
    promql_parser = promql()
    found: list[Any] = []

    def visit(n: Any) -> None:
        if isinstance(n, promql_parser.VectorSelector):
            found.append(n)

    promql_parser.walk(node, pre_visit=visit)
    return found


def output_labels(node: Any) -> set[str] | None:
    """Labels an expression keeps; None means "whatever the series had"."""
    pp = promql()
    if isinstance(node, pp.AggregateExpr):
        if node.modifier is None:
            return set()
        if node.modifier.type == pp.AggModifierType.By:
            return set(node.modifier.labels)
        return None
    if isinstance(node, pp.BinaryExpr):
        if isinstance(node.rhs, pp.NumberLiteral):
            return output_labels(node.lhs)
        if isinstance(node.lhs, pp.NumberLiteral):
            return output_labels(node.rhs)
        return output_labels(node.lhs)
    if isinstance(node, pp.ParenExpr):
        return output_labels(node.expr)
    if isinstance(node, pp.Call):
        vectors = [a for a in node.args if not isinstance(a, pp.NumberLiteral | pp.StringLiteral)]
        return output_labels(vectors[0]) if vectors else set()
    return None


def selector_problems(expr: str) -> list[str]:
    """Full parse; every selector names an exported series with labels it has."""
    promql_parser = promql()
    problems = []
    try:
        tree = promql_parser.parse(expr)
    except ValueError as exc:
        return [f"does not parse: {exc}"]
    for vs in selectors(tree):
        if vs.name is None:
            problems.append(f"selector without a metric name: {vs}")
            continue
        if vs.name not in EXPORTED:
            problems.append(f"metric {vs.name} is not exported")
            continue
        for m in vs.matchers.matchers:
            if m.name not in EXPORTED[vs.name] | TARGET_LABELS:
                problems.append(f"{vs.name} has no label {m.name!r}")
            closed = LABEL_VALUES.get(m.name)
            if (closed is not None and str(m.op) == "MatchOp.Equal"
                    and m.value not in closed):
                problems.append(f"{vs.name}{{{m.name}={m.value!r}}} never exists")
    return problems


# --- the rule file ------------------------------------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    assert ALERTS.exists(), f"{ALERTS.relative_to(ROOT)} is missing: the alert rules live there"
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("groups"), list) and doc["groups"]
    rules = []
    group_names = [g.get("name") for g in doc["groups"]]
    assert all(group_names) and len(set(group_names)) == len(group_names)
    for group in doc["groups"]:
        assert isinstance(group.get("rules"), list) and group["rules"], group.get("name")
        rules.extend(group["rules"])
    return rules


def rule_ids() -> Iterator[Any]:
    try:
        rules = load_rules()
    except (AssertionError, OSError, yaml.YAMLError):
        yield pytest.param(None, id="alerts.yaml-unreadable")
        return
    for r in rules:
        yield pytest.param(r, id=str(r.get("alert") or r.get("record")))


def test_rule_file_is_valid_yaml_with_unique_alert_names() -> None:
    rules = load_rules()
    names = [r.get("alert") for r in rules]
    assert all(names), "every rule in this file is an alert"
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("rule", list(rule_ids()))
def test_rule_is_complete_and_refers_to_exported_metrics(rule: dict[str, Any] | None) -> None:
    assert rule is not None, "alerts.yaml could not be read"
    expr = rule.get("expr")
    assert isinstance(expr, str) and expr.strip()
    assert rule.get("labels", {}).get("severity") in {"warning", "critical"}
    ann = rule.get("annotations", {})
    assert ann.get("runbook") or ann.get("summary")
    if "for" in rule:
        assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(rule["for"])), rule["for"]
    assert superficial_problems(expr) == []
    assert selector_problems(expr) == []


@pytest.mark.parametrize("rule", list(rule_ids()))
def test_annotation_labels_survive_the_expression(rule: dict[str, Any] | None) -> None:
    assert rule is not None, "alerts.yaml could not be read"
    kept = output_labels(promql().parse(rule["expr"]))
    text = " ".join(str(v) for v in rule.get("annotations", {}).values())
    for label in re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", text):
        assert kept is None or label in kept, f"$labels.{label} is aggregated away"


@pytest.mark.parametrize(("metric", "threshold", "severity"), THRESHOLDS)
def test_agreed_thresholds_are_in_place(metric: str, threshold: float, severity: str) -> None:
    found = []
    for r in load_rules():
        m = re.search(r">\s*([0-9.]+)\s*$", r["expr"].strip())
        if metric in r["expr"] and m:
            found.append((float(m.group(1)), r["labels"]["severity"]))
    assert (threshold, severity) in found, found


def test_superficial_checker_catches_mistakes() -> None:
    assert superficial_problems("sum(rate(audiostream_chunks_in_total[5m])") != []
    assert superficial_problems("rat(audiostream_chunks_in_total[5m])") != []
    assert superficial_problems("audiostream_chunks_in") != []  # counter without _total
    assert superficial_problems('sum by (reason) (rate(audiostream_chunks_dropped_total'
                                '{reason="a)"}[5m]))') == []
    assert selector_problems('audiostream_worker_messages_total{status="error"}') != []
    assert selector_problems('audiostream_chunks_in_total{processing="x"}') != []


# --- the dashboard ------------------------------------------------------------------------------


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    """Grafana's interval variables become durations; other variables sit inside strings."""
    expr = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
    return expr


def test_dashboard_is_grafana_json_with_unique_panels() -> None:
    doc = json.loads(DASHBOARD.read_text())
    for key in ("title", "uid", "panels", "schemaVersion"):
        assert key in doc, key
    ids = [p["id"] for p in doc["panels"]]
    assert len(set(ids)) == len(ids)
    for p in doc["panels"]:
        assert p["type"] and p["title"] and {"h", "w", "x", "y"} <= set(p["gridPos"])
        if p["type"] != "row":
            assert p["targets"], p["title"]
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            assert not superficial_problems(str(var["query"]).replace("label_values", "abs"))


def test_dashboard_queries_use_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    problems = []
    for title, expr in exprs:
        promql = grafana_to_promql(expr)
        problems += [f"{title}: {p}" for p in superficial_problems(promql)]
        problems += [f"{title}: {p}" for p in selector_problems(promql)]
    assert problems == []


def test_dashboard_shows_every_family() -> None:
    text = DASHBOARD.read_text()
    # The interpreter's own families (python_gc_*) are any Python dashboard's, not ours.
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in EXPORTED
                if not n.startswith("python_")}
    missing = sorted(f for f in families if f not in text)
    assert missing == []
