"""Hole 3 (noisy neighbours), the cheap-refusal half: attacks whose cost to the gateway
is per frame or per connection are refused before that cost is paid. A frame too large
for a socket that has not started is closed from its header, unread; a client address
opening connections faster than its rate gets 429 before its request is read (without
TLS; with TLS it is closed before its handshake: tests/security/test_gate_tls.py); a
persistent chunk flooder is closed with 4025 after a bounded number of excess chunks.
Real sockets; a victim session streams beside each attack and keeps all its audio."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from audiostream.cli import _gateway_settings, build_parser
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.gateway.edge import EdgeSettings
from audiostream.protocol import MAX_PRE_START_TEXT, start_json
from audiostream.testing import eventually
from tests.gateway.conftest import TLS
from tests.security.conftest import (
    FMT,
    EdgeServer,
    client_frame,
    closed_by_server,
    host_port,
    raw_connect,
    read_head,
    read_server_frame,
    start_victim,
    upgrade_request,
)

pytestmark = pytest.mark.integration

OP_TEXT, OP_BINARY, OP_CLOSE = 0x1, 0x2, 0x8


async def _upgraded(srv, tls):  # type: ignore[no-untyped-def]
    reader, writer = await raw_connect(srv, tls)
    writer.write(upgrade_request())
    await writer.drain()
    status, _ = await read_head(reader)
    assert status == 101
    return reader, writer


async def _close_code(reader: asyncio.StreamReader) -> int:
    async with asyncio.timeout(10):
        while True:
            opcode, payload = await read_server_frame(reader)
            if opcode == OP_CLOSE:
                return int.from_bytes(payload[:2], "big")


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
async def test_a_large_frame_before_start_is_refused_from_its_header(
    edge_server: EdgeServer, tls: TLS, opcode: int
) -> None:
    """Only the header of a 400 KB frame is sent: the gateway closes with 4004 without
    waiting for (buffering, then parsing) the payload. Before, aiohttp buffered up to
    512 KiB per socket and the core refused it only once it was whole."""
    async with edge_server(GatewaySettings(chunk_rate=None), broker=True) as srv:
        victim = start_victim(srv, tls)
        frame = client_frame(opcode, b"{" + b" " * 400_000)
        head = frame[:14]  # 2 bytes + 8-byte length + 4-byte mask
        sockets = [await _upgraded(srv, tls) for _ in range(12)]
        for _reader, writer in sockets:
            writer.write(head + frame[14:100])
            await writer.drain()
        codes = await asyncio.gather(*(_close_code(r) for r, _ in sockets))
        assert codes == [ErrorCode.FRAME_TOO_LARGE] * 12
        for reader, writer in sockets:
            assert await closed_by_server(reader)
            writer.close()
        # A frame at the cap is still read and handed to the core.
        reader, writer = await _upgraded(srv, tls)
        pad = MAX_PRE_START_TEXT - len('{"type":"keepalive","pad":""}')
        writer.write(client_frame(OP_TEXT, b'{"type":"keepalive","pad":"' + b"x" * pad + b'"}'))
        opcode_, payload = await read_server_frame(reader)
        assert opcode_ == OP_TEXT and json.loads(payload)["type"] == "keepalive"
        # After ready, audio frames up to the format's size pass (the cap is lifted).
        assert srv.api_key is not None
        writer.write(client_frame(OP_TEXT, start_json(srv.api_key, FMT, ["passthrough"])
                                  .encode()))
        opcode_, payload = await read_server_frame(reader)
        assert json.loads(payload)["type"] == "ready"
        chunk = b"\x01\x00" * 16000  # 1 s of 16 kHz s16le: 32,000 bytes > the pre-start cap
        writer.write(client_frame(OP_BINARY, chunk))
        opcode_, payload = await read_server_frame(reader)
        assert opcode_ == OP_BINARY and payload == chunk
        writer.close()
        await victim.assert_intact()
        refused = srv.gateway.metrics_registry.get_sample_value(
            "audiostream_gateway_edge_refused_total", {"reason": "frame_too_big"})
        assert refused == 12


async def _connect_from(srv, source: str):  # type: ignore[no-untyped-def]
    host, port = host_port(srv)
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def test_a_reconnect_loop_from_one_address_gets_429_at_accept(
    edge_server: EdgeServer,
) -> None:
    """60 plain-TCP connections from 127.0.0.2 against a rate of 0.01/s, burst 5: five
    are served, the rest get a canned 429 before their request is read; a client on
    another address (127.0.0.1) is unaffected and a victim session keeps its audio."""
    settings = GatewaySettings(chunk_rate=None, edge=EdgeSettings(
        conn_rate_per_ip=0.01, conn_burst_per_ip=5))
    async with edge_server(settings, broker=True, use_tls=False) as srv:
        victim = start_victim(srv, None)
        statuses: list[int] = []
        for _ in range(60):
            reader, writer = await _connect_from(srv, "127.0.0.2")
            try:
                # Nothing is sent first: a refused socket is answered at once.
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
            except TimeoutError:
                writer.write(upgrade_request())
                status, _ = await read_head(reader)
            else:
                status = int(head.split(b" ", 2)[1])
                body = await reader.read()
                assert b"too many connections" in body
            statuses.append(status)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        served = statuses.count(101)
        assert 5 <= served <= 6  # the burst, plus at most one token refilled meanwhile
        assert statuses.count(429) == 60 - served
        # Another address has its own bucket.
        reader, writer = await _connect_from(srv, "127.0.0.1")
        writer.write(upgrade_request())
        status, _ = await read_head(reader)
        assert status == 101
        writer.close()
        await victim.assert_intact()
        refused = srv.gateway.metrics_registry.get_sample_value(
            "audiostream_gateway_edge_refused_total", {"reason": "connection_rate"})
        assert refused == 60 - served


async def test_a_persistent_chunk_flooder_is_closed_within_300_excess_chunks(
    edge_server: EdgeServer, tls: TLS
) -> None:
    """A v1 client at the default rate (120/s, burst 60) writes 3,000 chunks at once:
    it is closed with 4025 after at most ~300 chunks over the rate (before: 1,000, each
    one numbered, timed and answered with a notice on the event loop), and the rest it
    sent is not decoded."""
    async with edge_server(GatewaySettings(), broker=True) as srv:
        assert srv.api_key is not None
        victim = start_victim(srv, tls)
        reader, writer = await _upgraded(srv, tls)
        writer.write(client_frame(OP_TEXT, start_json(srv.api_key, FMT, ["passthrough"])
                                  .encode()))
        _op, payload = await read_server_frame(reader)
        assert json.loads(payload)["type"] == "ready"
        registry = srv.gateway.metrics_registry
        before = registry.get_sample_value("audiostream_chunks_in_total") or 0
        writer.write(client_frame(OP_BINARY, b"\x01\x00" * 320) * 3000)
        code = None
        with contextlib.suppress(ConnectionError):
            code = await _close_code(reader)
        assert code == ErrorCode.FLOODING
        # What it had sent after our close frame (~1.7 MB) is dropped unparsed (reported
        # once past 1 MiB); the edge keeps reading, so the close completes without a reset.
        assert await closed_by_server(reader, 15)
        writer.close()
        assert await eventually(lambda: registry.get_sample_value(
            "audiostream_gateway_edge_refused_total", {"reason": "data_after_close"}) == 1)
        flooder = (registry.get_sample_value("audiostream_chunks_in_total") or 0) - before
        # The victim's own chunks count too (at most 50/s for the few seconds this takes).
        assert flooder <= 60 + 300 + 150, flooder
        await victim.assert_intact()


def test_the_cli_limits_connection_rate_per_address_by_default() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve"])
    edge = _gateway_settings(args).edge
    assert edge.conn_rate_per_ip == 50 and edge.conn_burst_per_ip == 200
    args = parser.parse_args(["serve", "--max-conn-rate-per-ip", "0"])
    assert _gateway_settings(args).edge.conn_rate_per_ip is None
