"""Offline rendering of helm/audiostream with helm-python-sdk, shared by the deploy tests."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "audiostream"
CI_VALUES = CHART / "ci"
RELEASE = "rel"
NAMESPACE = "audio"
FULLNAME = "rel-audiostream"
KUBE_VERSIONS = ("1.29", "1.33")


def ci_values(name: str) -> dict[str, Any]:
    data = yaml.safe_load((CI_VALUES / f"{name}-values.yaml").read_text())
    assert isinstance(data, dict)
    return data


#: The value sets the issue asks for, by name.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "existing-broker": ci_values("existing-broker"),
    "gpu": ci_values("gpu"),
    "keda-off": ci_values("hpa"),
    "tls": ci_values("tls"),
}


@dataclass(frozen=True)
class Rendered:
    files: dict[str, str]
    items: tuple[tuple[str, dict[str, Any]], ...]
    """(template path, object) for every rendered Kubernetes object."""

    @property
    def objects(self) -> list[dict[str, Any]]:
        return [obj for _, obj in self.items]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def secret_data(self, name: str) -> dict[str, str]:
        return dict(self.get("Secret", name).get("stringData", {}))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


@functools.lru_cache(maxsize=64)
def _render(values_json: str) -> Rendered:
    with helm_python.Chart.load(str(CHART)) as chart:
        files = chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE)
    items: list[tuple[str, dict[str, Any]]] = []
    for path, text in sorted(files.items()):
        if path.endswith(".txt"):
            continue
        items.extend((path, doc) for doc in yaml.safe_load_all(text) if doc)
    return Rendered(files=files, items=tuple(items))


def render(values: dict[str, Any] | None = None) -> Rendered:
    """Render the chart offline (cached per value set; treat the result as read-only)."""
    return _render(json.dumps(values or {}, sort_keys=True))


def container(deployment: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(containers) == 1
        return dict(containers[0])
    return dict(next(c for c in containers if c["name"] == name))
