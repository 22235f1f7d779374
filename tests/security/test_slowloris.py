"""Hole 6, slowloris: silent and slow sockets are closed at the handshake timeout, the
sockets still in their handshake are counted and capped, and a victim keeps its audio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import pytest

from audiostream.gateway import GatewaySettings
from audiostream.gateway.edge import EdgeSettings
from audiostream.testing import Embedded
from tests.gateway.conftest import TLS
from tests.security.conftest import (
    EdgeServer,
    closed_by_server,
    host_port,
    raw_connect,
    start_victim,
)

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0


def refused(srv: Embedded, reason: str) -> float:
    value = srv.gateway.metrics_registry.get_sample_value(
        "audiostream_gateway_edge_refused_total", {"reason": reason})
    return value or 0.0


async def test_silent_and_slow_sockets_are_closed_at_the_handshake_timeout(
    edge_server: EdgeServer, tls: TLS, caplog: pytest.LogCaptureFixture
) -> None:
    settings = GatewaySettings(chunk_rate=None, edge=EdgeSettings(handshake_timeout_s=TIMEOUT_S))
    caplog.set_level(logging.WARNING, "audiostream.gateway.edge")
    async with edge_server(settings, broker=True) as srv:
        victim = start_victim(srv, tls)
        host, port = host_port(srv)
        began = time.monotonic()
        # Silent before TLS (no ClientHello), silent after TLS, and headers one byte at a
        # time, never finished.
        silent_tcp = [await asyncio.open_connection(host, port) for _ in range(10)]
        silent_tls = [await raw_connect(srv, tls) for _ in range(10)]
        slow = [await raw_connect(srv, tls) for _ in range(10)]

        async def dribble(writer: asyncio.StreamWriter) -> None:
            with_error = (ConnectionError, RuntimeError)
            for byte in b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except with_error:
                    return
                await asyncio.sleep(0.05)  # the slowness is the attack

        dribblers = [asyncio.create_task(dribble(w)) for _, w in slow]
        closed = await asyncio.gather(*(closed_by_server(r, within=30)
                                        for r, _ in silent_tcp + silent_tls + slow))
        took = time.monotonic() - began
        for t in dribblers:
            t.cancel()
        assert all(closed)
        # Closed at the timeout, not at aiohttp's hour-long keep-alive or asyncio's 60 s
        # TLS handshake limit (generous margin for a loaded machine).
        assert took < TIMEOUT_S + 15
        assert refused(srv, "handshake_timeout") >= 20  # the TLS-phase ones are asyncio's
        await victim.assert_intact()
        # Logged, but not once per socket.
        lines = [r for r in caplog.records if "no complete request" in r.getMessage()]
        assert 1 <= len(lines) <= 3
        for _, w in silent_tcp + silent_tls + slow:
            w.close()


async def test_pending_sockets_are_capped_and_the_oldest_goes_first(
    edge_server: EdgeServer, tls: TLS, caplog: pytest.LogCaptureFixture
) -> None:
    cap = 8
    settings = GatewaySettings(chunk_rate=None,
                               edge=EdgeSettings(handshake_timeout_s=60, max_pending=cap))
    caplog.set_level(logging.WARNING, "audiostream.gateway.edge")
    async with edge_server(settings) as srv:
        victim = start_victim(srv, tls)
        held = [await raw_connect(srv, tls) for _ in range(3 * cap)]
        for _, w in held:  # a request line, never the end of the headers
            with contextlib.suppress(ConnectionError):  # the oldest go while we connect
                w.write(b"GET /v1/stream HTTP/1.1\r\n")
                await w.drain()
        first = held[: 2 * cap]
        closed = await asyncio.gather(*(closed_by_server(r, within=10) for r, _ in first))
        assert all(closed)  # the oldest were closed to make room
        pending = srv.gateway.metrics_registry.get_sample_value(
            "audiostream_gateway_pending_sockets")
        assert pending is not None and pending <= cap
        assert refused(srv, "pending_cap") >= 2 * cap
        assert any("the cap" in r.getMessage() for r in caplog.records)
        # A real client still gets in while the attacker holds the cap.
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str('{"type":"keepalive"}')
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.TEXT and "keepalive" in msg.data
        await victim.assert_intact()
        for _, w in held:
            w.close()


async def test_one_request_per_connection_before_the_upgrade(
    edge_server: EdgeServer, tls: TLS
) -> None:
    async with edge_server(GatewaySettings(chunk_rate=None)) as srv:
        reader, writer = await raw_connect(srv, tls)
        # Two pipelined requests: only the first is answered, then the socket closes.
        writer.write(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        data = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
        assert data.count(b"HTTP/1.1 404") == 1
        assert b"connection: close" in data.lower()
        writer.close()


async def test_sockets_per_address_are_capped_from_accept_before_tls(
    edge_server: EdgeServer, tls: TLS, caplog: pytest.LogCaptureFixture
) -> None:
    """One address may hold ``max_pending_per_ip`` sockets without a complete request,
    counted from accept: three silent TCP sockets from 127.0.0.2 (not even a TLS
    ClientHello) fill its share, and a fourth is closed at accept with a log line, while
    sessions from another address run (the gate does their TLS handshake). When one of
    the three leaves, 127.0.0.2 gets a place back and completes a whole session."""
    from audiostream.gateway.edge import EDGE_KEY
    from audiostream.protocol import start_json
    from audiostream.testing import eventually
    from tests.gateway.conftest import read_json
    from tests.security.conftest import FMT

    settings = GatewaySettings(chunk_rate=None, edge=EdgeSettings(
        max_pending_per_ip=3, handshake_timeout_s=60.0))
    async with edge_server(settings) as srv:
        guard = srv.runner.app[EDGE_KEY]
        victim = start_victim(srv, tls)
        host, port = host_port(srv)
        silent = [await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
                  for _ in range(3)]
        assert await eventually(lambda: guard.per_address.get("127.0.0.2") == 3)
        reader, writer = await asyncio.open_connection(host, port,
                                                       local_addr=("127.0.0.2", 0))
        assert await closed_by_server(reader)
        writer.close()
        assert refused(srv, "address_pending_cap") == 1
        assert "the cap per address" in caplog.text
        silent[0][1].close()
        assert await eventually(lambda: guard.per_address.get("127.0.0.2") == 2)
        assert srv.api_key is not None
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                local_addr=("127.0.0.2", 0))) as http, \
                http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
            assert (await read_json(ws))["type"] == "ready"
            assert guard.per_address.get("127.0.0.2") == 2  # upgraded: no longer counted
            await ws.send_bytes(b"\x01\x00" * 320)
            assert (await ws.receive(timeout=10)).data == b"\x01\x00" * 320
        await victim.assert_intact()
        for _, w in silent[1:]:
            w.close()
        assert await eventually(lambda: not guard.per_address)
