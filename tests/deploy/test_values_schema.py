"""values.schema.json (and the template's cross-value checks) refuse bad values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import helm_python
import pytest

from tests.deploy.chart import CHART, VALUE_SETS


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(str(CHART)) as c:
        yield c


@pytest.mark.parametrize("set_name", sorted(VALUE_SETS))
def test_value_sets_are_accepted(chart: helm_python.Chart, set_name: str) -> None:
    chart.validate_schema(VALUE_SETS[set_name])


def test_schema_is_draft_07_and_closed_at_the_top() -> None:
    """Draft 07: understood by Helm 3's validator as well as Helm 4's."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("typo at the top", {"gatway": {"replicas": 3}}, "additional properties 'gatway'"),
    ("typo inside", {"gateway": {"autoscalling": {}}}, "additional properties 'autoscalling'"),
    ("zero shards", {"topology": {"shards": 0}}, "/topology/shards"),
    ("unknown processing type", {"workers": {"cpu": {"processing": ["denoize"]}}},
     "/workers/cpu/processing/0"),
    ("duplicate processing type", {"workers": {"cpu": {"processing": ["vad", "vad"]}}},
     "/workers/cpu/processing"),
    ("one gateway only", {"gateway": {"autoscaling": {"minReplicas": 1}}},
     "/gateway/autoscaling/minReplicas"),
    ("external broker without URL", {"rabbitmq": {"mode": "external"}}, "/rabbitmq"),
    ("not an AMQP URL", {"rabbitmq": {"mode": "external", "external": {"url": "http://x"}}},
     "/rabbitmq/external/url"),
    ("unknown broker mode", {"rabbitmq": {"mode": "embedded"}}, "/rabbitmq/mode"),
    ("plain ws:// without saying so", {"gateway": {"tls": {"enabled": False}}},
     "/gateway/tls"),
    ("unknown issuer kind", {"gateway": {"tls": {"certManager": {"issuerRef": {
        "name": "x", "kind": "Vault"}}}}}, "/gateway/tls/certManager/issuerRef/kind"),
    ("unknown autoscaling engine", {"workers": {"autoscaling": {"engine": "vpa"}}},
     "/workers/autoscaling/engine"),
    ("negative drain", {"gateway": {"drain": {"graceSeconds": -1}}},
     "/gateway/drain/graceSeconds"),
    ("no margin after the drain", {"gateway": {"drain": {"extraSeconds": 2}}},
     "/gateway/drain/extraSeconds"),
    ("string where a number goes", {"gateway": {"maxConnections": "10k"}},
     "/gateway/maxConnections"),
    ("empty bundles", {"gateway": {"bundleMax": 0}}, "/gateway/bundleMax"),
    ("negative session start cap", {"gateway": {"sessionStartsPerMinute": -1}},
     "/gateway/sessionStartsPerMinute"),
    ("negative shedding threshold", {"gateway": {"shedAboveMs": -1}},
     "/gateway/shedAboveMs"),
    ("negative linger", {"gateway": {"lingerMs": -5}}, "/gateway/lingerMs"),
    ("even broker cluster", {"rabbitmq": {"cluster": {"replicas": 2}}},
     "/rabbitmq/cluster/replicas"),
    ("password that breaks the URL", {"rabbitmq": {"user": {"password": "p@ss/word"}}},
     "/rabbitmq/user/password"),
    ("key record with a plain key", {"auth": {"keys": [{"id": "a", "name": "n",
                                                       "sha256": "as_a_secret"}]}},
     "/auth/keys/0/sha256"),
    ("short token secret", {"auth": {"tokenSecret": "short"}}, "/auth/tokenSecret"),
    ("no GPUs on a GPU worker", {"workers": {"gpu": {"enabled": True, "gpusPerPod": 0}}},
     "/workers/gpu/gpusPerPod"),
    ("bad service type", {"gateway": {"service": {"type": "Ingress"}}},
     "/gateway/service/type"),
    ("origin with a path", {"gateway": {"allowedOrigins": ["https://app.example/x"]}},
     "/gateway/allowedOrigins/0"),
    ("annotation that is not a string", {"gateway": {"service": {"annotations": {"a": 1}}}},
     "/gateway/service/annotations/a"),
]


@pytest.mark.parametrize(("case", "values", "where"), BAD, ids=[b[0] for b in BAD])
def test_schema_rejects(chart: helm_python.Chart, case: str, values: dict[str, Any],
                        where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart.validate_schema(values)
    assert where in str(err.value), f"{case}: {err.value}"
    # An install uses the same schema: rendering refuses too.
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values, name="rel", namespace="audio")


CROSS: list[tuple[str, dict[str, Any], str]] = [
    ("inverted gateway band", {"gateway": {"autoscaling": {"scaleDownBelow": 30}}},
     "gateway.autoscaling.scaleDownBelow must be lower than scaleUpAbove"),
    ("min above max", {"workers": {"cpu": {"minReplicas": 30}}},
     "workers.cpu.minReplicas must not exceed maxReplicas"),
    ("worker type the topology lacks",
     {"topology": {"processingTypes": ["passthrough"]}},
     "workers.cpu.processing: \"gain\" is not in topology.processingTypes"),
    ("no workers at all", {"workers": {"cpu": {"enabled": False}}},
     "enable at least one of workers.cpu and workers.gpu"),
]


@pytest.mark.parametrize(("case", "values", "message"), CROSS, ids=[c[0] for c in CROSS])
def test_template_rejects_inconsistent_values(chart: helm_python.Chart, case: str,
                                              values: dict[str, Any], message: str) -> None:
    chart.validate_schema(values)  # each value is fine alone ...
    with pytest.raises(helm_python.HelmRenderError) as err:  # ... but not together
        chart.render(values, name="rel", namespace="audio")
    assert message in str(err.value), case
