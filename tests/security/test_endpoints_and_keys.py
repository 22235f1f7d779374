"""Hole 8 (development key) and hole 9 (operational endpoints): probes and metrics are
only on the operations site (loopback by default), never on the public port; a gateway
given a keys file has no development key."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

import audiostream
from audiostream.cli import build_parser
from audiostream.gateway import GatewaySettings, create_key
from audiostream.protocol import start_json
from tests.gateway.conftest import TLS
from tests.security.conftest import FMT, EdgeServer, start_victim

pytestmark = pytest.mark.integration


async def test_probes_and_metrics_are_not_on_the_public_port(
    edge_server: EdgeServer, tls: TLS
) -> None:
    async with edge_server(GatewaySettings(chunk_rate=None), broker=True) as srv, \
            aiohttp.ClientSession() as http:
        victim = start_victim(srv, tls)
        for path in ("/metrics", "/healthz", "/readyz"):
            async with http.get(srv.http_url + path, ssl=tls.client) as r:
                assert r.status == 404, path
                assert r.headers["Server"] == "audiostream"
        assert srv.ops_url is not None and srv.ops_url.startswith("http://127.0.0.1:")
        async with http.get(srv.ops_url + "/metrics") as r:
            assert r.status == 200 and "audiostream_gateway_edge_refused_total" in await r.text()
        async with http.get(srv.ops_url + "/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with http.get(srv.ops_url + "/healthz") as r:
            assert r.status == 200 and r.headers["Server"] == "audiostream"
        await victim.assert_intact()


def test_operations_addresses_default_to_loopback() -> None:
    p = build_parser()
    gw = p.parse_args(["gateway", "--broker", "amqp://x", "--keys-file", "k.json"])
    assert (gw.ops_host, gw.ops_port) == ("127.0.0.1", 9090)
    worker = p.parse_args(["worker", "--broker", "amqp://x", "--processing", "gain"])
    assert worker.metrics_host == "127.0.0.1"


async def test_no_development_key_when_a_keys_file_is_given(
    edge_server: EdgeServer, tls: TLS, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "real")
    async with edge_server(GatewaySettings(chunk_rate=None), keys_file=keys) as srv:
        assert srv.api_key is None
        assert [r.name for r in srv.gateway.keys.records()] == ["real"]
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(key, FMT, ["passthrough"]))
            msg = await ws.receive_json(timeout=10)
            assert msg["type"] == "ready"
    async with edge_server(GatewaySettings(chunk_rate=None)) as srv:
        assert srv.api_key is not None  # no keys file: a development key, as before


async def test_serve_with_a_keys_file_prints_no_key(tmp_path: Path) -> None:
    """The real command: with --keys-file it says so and prints no key; its operations
    site is where it says."""
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "real")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiostream", "serve", "--port", "0", "--ops-port", "0",
        "--keys-file", str(keys), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(audiostream.__file__).parents[1])})
    assert proc.stdout is not None
    out = []
    try:
        async with asyncio.timeout(120):
            while not (line := (await proc.stdout.readline()).decode()).startswith("metrics"):
                assert line, out
                out.append(line)
        ops = line.split()[-1]
        async with aiohttp.ClientSession() as http, http.get(ops + "/healthz") as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    text = "".join(out)
    assert f"API keys from {keys}; no development key" in text
    assert "as_" not in text and key not in text
