"""Hole 12 at the WebSocket layer: unmasked client frames close with 1002, pings are
rate-limited (1008) and do not count as activity, NaN/Inf float audio gets an
``invalid_audio`` notice, no ``Server: Python/aiohttp`` header, and the token secret can
come from a file. Raw frames on real sockets; a victim session keeps its audio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.cli import _secret, build_parser
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.gateway.edge import EdgeSettings
from audiostream.protocol import start_json
from tests.gateway.conftest import TLS
from tests.security.conftest import (
    FMT,
    EdgeServer,
    client_frame,
    closed_by_server,
    raw_connect,
    read_head,
    read_server_frame,
    start_victim,
)

pytestmark = pytest.mark.integration

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


async def upgraded(srv, tls):  # type: ignore[no-untyped-def]
    from tests.security.conftest import upgrade_request

    reader, writer = await raw_connect(srv, tls)
    writer.write(upgrade_request())
    await writer.drain()
    status, headers = await read_head(reader)
    assert status == 101
    return reader, writer, headers


async def test_upgrade_names_no_server_software(edge_server: EdgeServer, tls: TLS) -> None:
    async with edge_server(GatewaySettings(chunk_rate=None)) as srv:
        _reader, writer, headers = await upgraded(srv, tls)
        assert headers["server"] == "audiostream"
        writer.close()


async def test_unmasked_client_frame_is_closed_with_1002(
    edge_server: EdgeServer, tls: TLS
) -> None:
    async with edge_server(GatewaySettings(chunk_rate=None), broker=True) as srv:
        victim = start_victim(srv, tls)
        reader, writer, _ = await upgraded(srv, tls)
        writer.write(client_frame(OP_TEXT, b'{"type":"keepalive"}'))  # masked: fine
        opcode, payload = await read_server_frame(reader)
        assert opcode == OP_TEXT and json.loads(payload)["type"] == "keepalive"
        writer.write(client_frame(OP_TEXT, b'{"type":"keepalive"}', masked=False))
        await writer.drain()
        opcode, payload = await read_server_frame(reader)
        assert opcode == OP_CLOSE and int.from_bytes(payload[:2], "big") == 1002
        assert await closed_by_server(reader)
        await victim.assert_intact()
        refused = srv.gateway.metrics_registry.get_sample_value(
            "audiostream_gateway_edge_refused_total", {"reason": "unmasked_frame"})
        assert refused == 1


async def test_pings_are_answered_limited_and_no_activity(
    edge_server: EdgeServer, tls: TLS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "audiostream.gateway.edge")
    settings = GatewaySettings(chunk_rate=None, idle_timeout_s=2.0,
                               edge=EdgeSettings(control_rate=5, control_burst=10))
    async with edge_server(settings, broker=True) as srv:
        victim = start_victim(srv, tls)
        assert srv.api_key is not None
        # 1. Pings within the limit are answered, but a session kept busy only by pings
        #    still reaches its idle timeout.
        reader, writer, _ = await upgraded(srv, tls)
        writer.write(client_frame(OP_TEXT, start_json(srv.api_key, FMT, ["passthrough"])
                                  .encode()))
        opcode, payload = await read_server_frame(reader)
        assert json.loads(payload)["type"] == "ready"
        frames: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()

        async def read_all() -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    frames.put_nowait(await read_server_frame(reader))

        pump = asyncio.create_task(read_all())
        pongs, idle = 0, None
        async with asyncio.timeout(15):
            while idle is None:
                writer.write(client_frame(OP_PING, b"hi"))  # every 0.3 s: < the limit
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.3):
                        while True:
                            opcode, payload = await frames.get()
                            if opcode == OP_PONG:
                                assert payload == b"hi"
                                pongs += 1
                            elif opcode == OP_TEXT and json.loads(payload).get("code"):
                                idle = json.loads(payload)["code"]
                                break
                await asyncio.sleep(0.3 if idle is None else 0)
        pump.cancel()
        assert idle == ErrorCode.IDLE_TIMEOUT and pongs >= 2
        writer.close()
        # 2. A ping flood is closed with 1008.
        reader, writer, _ = await upgraded(srv, tls)
        writer.write(b"".join(client_frame(OP_PING, b"x") for _ in range(500)))
        await writer.drain()
        codes = []
        async with asyncio.timeout(10):
            while True:
                opcode, payload = await read_server_frame(reader)
                if opcode == OP_CLOSE:
                    codes.append(int.from_bytes(payload[:2], "big"))
                    break
        assert codes == [1008]
        assert await closed_by_server(reader)
        await victim.assert_intact()
    assert any("control_flood" in r.getMessage() for r in caplog.records)


async def test_non_finite_float_audio_gets_an_invalid_audio_notice(
    edge_server: EdgeServer, tls: TLS
) -> None:
    fmt = AudioFormat(Encoding.PCM_F32LE, 16000, 1)
    async with edge_server(GatewaySettings(chunk_rate=None)) as srv, \
            aiohttp.ClientSession() as http:
        assert srv.api_key is not None
        victim = start_victim(srv, tls)
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(srv.api_key, fmt, ["passthrough"]))
            assert (await ws.receive_json(timeout=10))["type"] == "ready"
            good = np.full(320, 0.25, dtype="<f4")
            for bad in (np.nan, np.inf, -np.inf):
                chunk = good.copy()
                chunk[17] = bad
                await ws.send_bytes(chunk.tobytes())
            await ws.send_bytes(good.tobytes())
            await ws.send_str('{"type":"stop"}')
            notices, audio = [], []
            while True:
                msg = await ws.receive(timeout=10)
                if msg.type is aiohttp.WSMsgType.BINARY:
                    audio.append(msg.data)
                    continue
                data = json.loads(msg.data)
                if data["type"] == "notice":
                    notices.append((data["seq"], data["code"]))
                elif data["type"] == "summary":
                    break
            assert notices == [(0, ErrorCode.INVALID_AUDIO), (1, ErrorCode.INVALID_AUDIO),
                               (2, ErrorCode.INVALID_AUDIO)]
            assert audio == [good.tobytes()]
        await victim.assert_intact()


def test_token_secret_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "secret"
    f.write_text("s3cret-from-file\n")
    args = build_parser().parse_args(["gateway", "--broker", "amqp://x", "--keys-file", "k",
                                      "--token-secret-file", str(f)])
    assert _secret(args) == b"s3cret-from-file"
    monkeypatch.setenv("AUDIOSTREAM_TOKEN_SECRET", "from-env")
    args = build_parser().parse_args(["gateway", "--broker", "amqp://x", "--keys-file", "k"])
    assert _secret(args) == b"from-env"
