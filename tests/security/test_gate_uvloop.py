"""The per-address gate runs the TLS handshake itself (``_Gate``); the CLI serves on
uvloop, whose transports start reading as soon as ``connection_made`` returns, whatever
``pause_reading()`` said there. These tests run the gate on a uvloop loop of their own."""

from __future__ import annotations

import asyncio

import aiohttp
import uvloop

from audiostream.gateway import GatewaySettings
from audiostream.gateway.edge import EDGE_KEY, EdgeSettings
from audiostream.protocol import MAX_DEADLINE_MS, start_json
from audiostream.testing import embedded_server, eventually
from tests.gateway.conftest import TLS, read_json
from tests.security.conftest import FMT, closed_by_server, host_port

CLIENTS = 50
CAP = 2
#: Bound on the whole wave of sessions (the old gate left every handshake hanging).
WAVE_S = 30.0


async def _session(url: str, key: str, tls: TLS, address: str) -> None:
    """One TLS WebSocket session from ``address``: ready, and one chunk echoed."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            local_addr=(address, 0))) as http, http.ws_connect(url, ssl=tls.client) as ws:
        # The longest deadline: clients, gateway and worker share this one loop with up to
        # 100 handshakes in flight, and this test is about the handshakes, not deadlines
        # (at the default, a chunk sent during the wave could expire: seen once in CI).
        await ws.send_str(start_json(key, FMT, ["passthrough"], deadline_ms=MAX_DEADLINE_MS))
        assert (await read_json(ws))["type"] == "ready"
        await ws.send_bytes(b"\x01\x00" * 320)
        assert (await ws.receive(timeout=WAVE_S)).data == b"\x01\x00" * 320


async def _gate_with_tls(tls: TLS) -> None:
    settings = GatewaySettings(chunk_rate=None, edge=EdgeSettings(
        ops_port=None, max_pending_per_ip=CAP, handshake_timeout_s=60.0))
    async with embedded_server(processing=("passthrough",), ssl_context=tls.server,
                               gateway_settings=settings) as srv:
        guard = srv.runner.app[EDGE_KEY]
        assert srv.api_key is not None
        # Sessions at once, each from its own address (127.0.1.x) so the cap is no limit.
        tasks = [asyncio.create_task(_session(srv.url, srv.api_key, tls, f"127.0.1.{i + 1}"))
                 for i in range(CLIENTS)]
        done, pending = await asyncio.wait(tasks, timeout=WAVE_S)
        for task in pending:
            task.cancel()
        failed = [t.exception() for t in done if t.exception() is not None]
        assert not pending and not failed, (
            f"{len(done) - len(failed)}/{CLIENTS} TLS sessions through the gate completed;"
            f" {len(pending)} hung, failures: {failed[:3]}")
        # Over the cap, a socket from one address is still closed at accept.
        host, port = host_port(srv)
        silent = [await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
                  for _ in range(CAP)]
        assert await eventually(lambda: guard.per_address.get("127.0.0.2") == CAP)
        reader, writer = await asyncio.open_connection(host, port,
                                                       local_addr=("127.0.0.2", 0))
        assert await closed_by_server(reader)
        writer.close()
        for _, w in silent:
            w.close()
        assert await eventually(lambda: not guard.per_address)


def test_tls_sessions_complete_through_the_gate_on_uvloop(tls: TLS) -> None:
    """50 TLS WebSocket sessions complete through the gate on uvloop (before the fix all
    hung: the ClientHello reached the gate, not the SSL protocol), and the cap per
    address still closes a socket over it at accept."""
    uvloop.run(_gate_with_tls(tls))
