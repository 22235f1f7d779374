"""The chart's security defaults (issue #13, hole 9): TLS unless plain ws:// is asked for
explicitly, operations ports kept off the public Service and behind a NetworkPolicy, a
ServiceAccount without a token."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

from tests.deploy.chart import CHART, FULLNAME, NAMESPACE, VALUE_SETS, container, render

SETS = sorted(VALUE_SETS)
PLAIN = {"gateway": {"tls": {"enabled": False, "insecure": True}}}


def notes(values: dict[str, Any]) -> str:
    return render(values).files["audiostream/templates/NOTES.txt"]


def test_default_is_wss_with_a_cert_manager_certificate() -> None:
    r = render({})
    c = container(r.get("Deployment", f"{FULLNAME}-gateway"))
    assert "--tls-cert=/etc/audiostream/tls/tls.crt" in c["args"]
    assert "--behind-proxy" not in c["args"]
    cert = r.get("Certificate", f"{FULLNAME}-gateway-tls")
    assert cert["spec"]["secretName"] == f"{FULLNAME}-gateway-tls"
    assert f"{FULLNAME}-gateway.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    # No issuer given: the chart's own self-signed Issuer, and NOTES says so loudly.
    assert cert["spec"]["issuerRef"] == {"name": f"{FULLNAME}-selfsigned", "kind": "Issuer",
                                         "group": "cert-manager.io"}
    assert r.get("Issuer", f"{FULLNAME}-selfsigned")["spec"] == {"selfSigned": {}}
    vols = {v["name"]: v for v in
            r.get("Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == cert["spec"]["secretName"]
    assert r.get("Service", f"{FULLNAME}-gateway")["spec"]["ports"][0]["port"] == 443
    assert "SELF-SIGNED" in notes({})


def test_a_given_issuer_is_used_and_no_issuer_is_made() -> None:
    values = {"gateway": {"tls": {"certManager": {
        "issuerRef": {"name": "letsencrypt"}, "dnsNames": ["audio.example.com"]}}}}
    r = render(values)
    cert = r.get("Certificate", f"{FULLNAME}-gateway-tls")
    assert cert["spec"]["issuerRef"] == {"name": "letsencrypt", "kind": "ClusterIssuer",
                                         "group": "cert-manager.io"}
    assert "audio.example.com" in cert["spec"]["dnsNames"]
    assert not r.of_kind("Issuer")
    assert "SELF-SIGNED" not in notes(values)


def test_plain_ws_must_be_asked_for_and_is_warned_about() -> None:
    with helm_python.Chart.load(str(CHART)) as chart, \
            pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError)):
        chart.render({"gateway": {"tls": {"enabled": False}}}, name="rel", namespace="audio")
    r = render(PLAIN)
    assert "--behind-proxy" in container(r.get("Deployment", f"{FULLNAME}-gateway"))["args"]
    assert not r.of_kind("Certificate") and not r.of_kind("Issuer")
    assert "WARNING: gateway.tls.insecure=true" in notes(PLAIN)
    assert "WARNING" not in notes({})


@pytest.mark.parametrize("set_name", SETS)
def test_operations_ports_are_not_on_the_public_service(set_name: str) -> None:
    r = render(VALUE_SETS[set_name])
    public = r.get("Service", f"{FULLNAME}-gateway")
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["ws"]
    ops = r.get("Service", f"{FULLNAME}-gateway-ops")
    assert ops["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in ops["spec"]["ports"]] == ["ops"]
    for d in r.of_kind("Deployment"):
        if "worker" in d["metadata"]["name"]:
            assert "--metrics-host=0.0.0.0" in container(d)["args"]


@pytest.mark.parametrize("set_name", SETS)
def test_network_policies_fence_the_operations_ports(set_name: str) -> None:
    r = render(VALUE_SETS[set_name])
    gw = r.get("NetworkPolicy", f"{FULLNAME}-gateway")["spec"]
    assert gw["policyTypes"] == ["Ingress", "Egress"]
    assert gw["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    by_port = {rule["ports"][0]["port"]: rule for rule in gw["ingress"]}
    assert set(by_port) == {"ws", "ops"}
    assert "from" not in by_port["ws"]  # the public edge
    assert by_port["ops"]["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    egress_ports = {(p["port"], p["protocol"]) for rule in gw["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (5672, "TCP"), (5671, "TCP")}
    wk = r.get("NetworkPolicy", f"{FULLNAME}-worker")["spec"]
    assert [rule["ports"][0]["port"] for rule in wk["ingress"]] == ["metrics"]
    # The selectors really select the pods they fence.
    for d in r.of_kind("Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        pol = gw if d["metadata"]["name"].endswith("-gateway") else wk
        assert all(labels.get(k) == v for k, v in pol["podSelector"]["matchLabels"].items())


def test_network_policies_can_be_turned_off_and_scoped() -> None:
    assert not render({"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy")
    lb = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    gw = render({"networkPolicy": {"wsFrom": lb}}).get(
        "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]
    assert gw["ingress"][0]["from"] == lb


@pytest.mark.parametrize("set_name", SETS)
def test_pods_run_as_the_release_service_account_without_a_token(set_name: str) -> None:
    r = render(VALUE_SETS[set_name])
    sa = r.get("ServiceAccount", FULLNAME)
    assert sa["automountServiceAccountToken"] is False
    for d in r.of_kind("Deployment"):
        spec = d["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == FULLNAME
        assert spec["automountServiceAccountToken"] is False
    named = render({"serviceAccount": {"create": False, "name": "existing"}})
    assert not named.of_kind("ServiceAccount")
    assert {d["spec"]["template"]["spec"]["serviceAccountName"]
            for d in named.of_kind("Deployment")} == {"existing"}


def test_token_secret_comes_from_the_environment_not_the_command_line() -> None:
    c = container(render({}).get("Deployment", f"{FULLNAME}-gateway"))
    assert not [a for a in c["args"] if a.startswith("--token-secret")]
    assert "AUDIOSTREAM_TOKEN_SECRET" in {e["name"] for e in c["env"]}
