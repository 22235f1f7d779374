"""broker/ imported into the real RabbitMQ is the topology gateways and workers use unchanged.

Everything happens in a vhost and with a user made for this module (names carry a random
tag), both deleted afterwards, so other tests on the same broker are not touched.
``rabbitmqctl`` runs as root here (it reads the node's Erlang cookie).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
import aiormq
import pytest
import trustme

from audiostream.errors import AudioStreamError
from audiostream.testing import default_topology
from audiostream.topology import Topology
from audiostream.transport.rabbitmq import RabbitTransport
from tests.deploy.chart import CHART, FULLNAME, REPO, container, render

pytestmark = pytest.mark.rabbitmq

BROKER = REPO / "broker"
RABBIT_LIB = Path("/usr/lib/rabbitmq/lib")


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(["rabbitmqctl", "-q", *args], input=stdin, capture_output=True,
                          text=True, timeout=90, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
    return proc.stdout


def in_vhost(doc: dict[str, Any], vhost: str, user: str | None = None) -> dict[str, Any]:
    """The same definitions, moved to ``vhost`` (and the user renamed): a pure relabelling."""
    out: dict[str, Any] = json.loads(json.dumps(doc))
    for section, items in out.items():
        if not isinstance(items, list):
            continue
        for item in items:
            if "vhost" in item:
                item["vhost"] = vhost
            if user is not None and section == "users":
                item["name"] = user
            if user is not None and section == "permissions":
                item["user"] = user
    if "vhosts" in out:
        out["vhosts"] = [{"name": vhost}]
    return out


@dataclass(frozen=True)
class Imported:
    vhost: str
    user: str
    password: str
    topology: Topology

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:5672/{quote(self.vhost, safe='')}"


@pytest.fixture(scope="module")
def imported(rabbitmq_url: str) -> Iterator[Imported]:
    tag = uuid.uuid4().hex[:10]
    vhost = user = f"audiostream-deploy-{tag}"
    password = f"pw-{uuid.uuid4().hex}"
    topology_doc = json.loads((BROKER / "definitions.json").read_text())
    user_doc = json.loads((BROKER / "user-template.json").read_text())
    merged = in_vhost(topology_doc, vhost)
    user_part = in_vhost(user_doc, vhost, user)
    merged["users"], merged["permissions"] = user_part["users"], user_part["permissions"]
    try:
        rabbitmqctl("import_definitions", stdin=json.dumps(merged))
        # The template's user has no password (none is kept in git): set one, as the
        # README tells operators to.
        rabbitmqctl("change_password", user, password)
        yield Imported(vhost=vhost, user=user, password=password,
                       topology=file_topology(topology_doc))
    finally:
        with contextlib.suppress(AssertionError):
            rabbitmqctl("delete_vhost", vhost)
        with contextlib.suppress(AssertionError):
            rabbitmqctl("delete_user", user)


def list_queues(vhost: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(rabbitmqctl("list_queues", "-p", vhost, "name", "type", "durable",
                                  "auto_delete", "arguments", "policy", "--formatter", "json"))
    for row in rows:
        row["arguments"] = {k: v for k, _type, v in row["arguments"]}
    return {row["name"]: row for row in rows}


def file_topology(doc: dict[str, Any]) -> Topology:
    """The topology the definitions file describes (the built-in processing types);
    independent of processors that other test modules register at import time."""
    base = default_topology()
    types = sorted(
        e["name"].removeprefix(base.prefix + ".") for e in doc["exchanges"]
        if e["name"] != base.dead_letter_exchange
    )
    return Topology(processing_types=tuple(types), prefix=base.prefix, shards=base.shards)


def test_import_creates_the_topology(imported: Imported) -> None:
    topo = imported.topology
    queues = list_queues(imported.vhost)
    work = {topo.work_queue(p, s) for p in topo.processing_types for s in range(topo.shards)}
    assert set(queues) == work | {topo.dead_letter_queue}
    for name in work:
        q = queues[name]
        assert q["type"] == "quorum" and q["durable"] is True
        assert q["arguments"] == topo.work_queue_arguments()
        assert q["policy"] == f"{topo.prefix}-work"
    dead = queues[topo.dead_letter_queue]
    assert dead["arguments"] == topo.dead_letter_queue_arguments()
    assert dead["policy"] == f"{topo.prefix}-dead"
    exchanges = json.loads(rabbitmqctl("list_exchanges", "-p", imported.vhost, "name", "type",
                                       "durable", "--formatter", "json"))
    ours = {e["name"]: e for e in exchanges if e["name"].startswith(f"{topo.prefix}.")}
    assert set(ours) == {topo.exchange(p) for p in topo.processing_types} | {
        topo.dead_letter_exchange}
    assert all(e["type"] == "topic" and e["durable"] for e in ours.values())


async def test_transport_redeclares_the_imported_topology_unchanged(imported: Imported) -> None:
    before = list_queues(imported.vhost)
    transport = RabbitTransport(imported.url, imported.topology)
    await transport.connect()
    try:
        await transport.declare()  # PRECONDITION_FAILED would raise here
        name = "audiostream.reply.deploy-check"
        await transport.declare_reply_queue(name)
        assert await transport.reply_queue_exists(name)
        await transport.delete_reply_queue(name)
    finally:
        await transport.close()
    after = list_queues(imported.vhost)
    assert after == before


async def test_a_different_topology_is_refused(imported: Imported) -> None:
    """Negative control: inequivalent arguments are really refused by this broker."""
    other = Topology(processing_types=imported.topology.processing_types, delivery_limit=5)
    transport = RabbitTransport(imported.url, other)
    await transport.connect()
    try:
        with pytest.raises(AudioStreamError, match="PRECONDITION_FAILED - inequivalent arg"):
            await transport.declare()
    finally:
        await transport.close()


async def test_the_user_template_grants_only_the_prefix(imported: Imported) -> None:
    conn = await aio_pika.connect(imported.url)
    try:
        ch = await conn.channel()
        await ch.declare_queue("audiostream.reply.perm-check", auto_delete=True,
                               arguments={"x-expires": 1000})
        ch = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ch.declare_queue("someone-else.queue", auto_delete=True)
        ch = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ch.declare_exchange("someone-else", aio_pika.ExchangeType.TOPIC)
    finally:
        await conn.close()


# --- end to end: the chart's gateway/worker command lines against the imported broker ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replace_arg(args: list[str], flag: str, value: str) -> list[str]:
    out = [a for a in args if not a.startswith(f"{flag}=")]
    assert len(out) == len(args) - 1, f"{flag} not in {args}"
    return [*out, f"{flag}={value}"]


@dataclass
class Proc:
    process: asyncio.subprocess.Process
    log: Path

    async def wait_for_line(self, pattern: str, within_s: float = 60.0) -> re.Match[str]:
        assert self.process.stdout is not None
        regex = re.compile(pattern)

        async def scan() -> re.Match[str]:
            assert self.process.stdout is not None
            while line := await self.process.stdout.readline():
                if m := regex.search(line.decode()):
                    return m
            raise AssertionError(f"exited ({self.process.returncode}) before printing "
                                 f"{pattern!r}: {self.log.read_text()[-3000:]}")

        return await asyncio.wait_for(scan(), within_s)


@contextlib.asynccontextmanager
async def spawn(args: list[str], env: dict[str, str], log: Path) -> AsyncIterator[Proc]:
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "audiostream", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=err,
        )
        try:
            yield Proc(process, log)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def load_smoke_test() -> Any:
    spec = importlib.util.spec_from_file_location("smoke_test", CHART / "files" / "smoke_test.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_probe(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*command, env=env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return int(proc.returncode or 0), out.decode()


async def test_end_to_end_through_the_imported_topology(imported: Imported,
                                                        tmp_path: Path) -> None:
    """Gateway and worker started with the chart's own arguments, environment, keys file and
    probes stream the chart's `helm test` sample through the imported topology."""
    r = render({})
    gw_c = container(r.get("Deployment", f"{FULLNAME}-gateway"))
    wk_c = container(r.get("Deployment", f"{FULLNAME}-worker-cpu"))
    auth = r.secret_data(f"{FULLNAME}-auth")
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(auth["keys.json"])

    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOSTREAM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for c in (gw_c, wk_c):
        for e in c["env"]:
            if "value" in e:
                env[e["name"]] = e["value"]
    env["AUDIOSTREAM_BROKER"] = imported.url
    env["AUDIOSTREAM_TOKEN_SECRET"] = auth["token-secret"]
    assert env["AUDIOSTREAM_PREFIX"] == imported.topology.prefix

    # As rendered (0.0.0.0, wss:// ...) except for ports and file paths; the certificate
    # cert-manager would mount is a trustme one here.
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    ops_port = free_port()
    gw_args = replace_arg(gw_c["args"], "--port", "0")
    gw_args = replace_arg(gw_args, "--keys-file", str(keys_file))
    gw_args = replace_arg(gw_args, "--drain-grace-s", "2")
    gw_args = replace_arg(gw_args, "--ops-port", str(ops_port))
    gw_args = replace_arg(gw_args, "--tls-cert", str(cert_file))
    gw_args = replace_arg(gw_args, "--tls-key", str(key_file))
    metrics_port = free_port()
    wk_args = replace_arg(wk_c["args"], "--processing", "passthrough")
    wk_args = replace_arg(wk_args, "--metrics-port", str(metrics_port))

    async with spawn(wk_args, env, tmp_path / "worker.log") as worker, \
            spawn(gw_args, env, tmp_path / "gateway.log") as gateway:
        await worker.wait_for_line(r"audiostream worker consuming passthrough")
        m = await gateway.wait_for_line(r"gateway on wss://[^:/]+:(\d+)/v1/stream")
        port = int(m.group(1))

        # The worker's probe endpoint (the chart probes /healthz on the metrics port).
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{metrics_port}/healthz") as resp:
                assert resp.status == 200, await resp.text()

        # The chart's gateway readiness probe, run as the kubelet would (port substituted).
        probe = [part.replace(":8080/", f":{port}/").replace(":9090/", f":{ops_port}/")
                 for part in gw_c["readinessProbe"]["exec"]["command"]]
        code, out = await run_probe(probe, env)
        assert code == 0, out

        # The `helm test` hook's script, with the chart-generated test key.
        smoke = load_smoke_test()
        result = await smoke.run(f"wss://127.0.0.1:{port}/v1/stream",
                                 auth["helm-test-api-key"], 1000, 30.0)
        assert result.startswith("ok: 50 chunks round-tripped bit-identical"), result
        # ... and it can fail: a key the chart did not generate is refused.
        with pytest.raises(AssertionError, match="session refused"):
            await smoke.run(f"wss://127.0.0.1:{port}/v1/stream", "as_nosuchkey_wrong", 200,
                            30.0)

        # Nothing was declared beyond the imported topology (plus expiring reply queues).
        topo = imported.topology
        names = set(list_queues(imported.vhost))
        work = {topo.work_queue(p, s) for p in topo.processing_types for s in range(topo.shards)}
        assert names - work - {topo.dead_letter_queue} <= {
            n for n in names if n.startswith(topo.reply_queue(""))}

        # SIGTERM drains and exits by itself, well within the pod's grace period.
        gateway.process.send_signal(signal.SIGTERM)
        worker.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 15) == 0, (
            (tmp_path / "gateway.log").read_text()[-3000:])
        assert await asyncio.wait_for(worker.process.wait(), 15) == 0, (
            (tmp_path / "worker.log").read_text()[-3000:])



# --- configuration files are understood by RabbitMQ -----------------------------------------


def _schema_text() -> str:
    files = sorted(RABBIT_LIB.glob("rabbitmq_server-*/plugins/*/priv/schema/*.schema"))
    assert files, f"no RabbitMQ schema files under {RABBIT_LIB}"
    return "\n".join(f.read_text(errors="replace") for f in files)


def _conf_keys(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^#?\s*([a-z_][a-z0-9_.]*)\s*=\s*\S", line)
        if m and (not line.startswith("#") or m.group(1) == "load_definitions"):
            keys.append(m.group(1))
    return keys


def test_rabbitmq_conf_keys_exist_in_this_rabbitmq(rabbitmq_url: str) -> None:
    schema = _schema_text()
    conf = (BROKER / "rabbitmq.conf").read_text()
    chart_conf = render({}).get("RabbitmqCluster", f"{FULLNAME}-rabbitmq")["spec"]["rabbitmq"][
        "additionalConfig"]
    keys = _conf_keys(conf) + _conf_keys(chart_conf)
    assert "consumer_timeout" in keys and "load_definitions" in keys
    for key in keys:
        assert f'{{mapping, "{key}"' in schema, f"{key} is not a RabbitMQ setting"
    # The chart's settings are a subset of the recommended file (one set of advice).
    assert set(_conf_keys(chart_conf)) <= set(_conf_keys(conf))


def test_enabled_plugins_exist_in_this_rabbitmq(rabbitmq_url: str) -> None:
    text = (BROKER / "enabled_plugins").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("%"))
    m = re.fullmatch(r"\s*\[([a-z0-9_,\s]*)\]\.\s*", body)
    assert m, "enabled_plugins must be one Erlang list ending with '.'"
    plugins = [p.strip() for p in m.group(1).split(",") if p.strip()]
    available = {p.name.rsplit("-", 1)[0]
                 for p in RABBIT_LIB.glob("rabbitmq_server-*/plugins/*") if p.is_dir()}
    assert plugins and set(plugins) <= available, set(plugins) - available
