"""The production edge: each refusal with its documented code, over real TLS."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from pathlib import Path

import aiohttp
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings, create_key, revoke_key
from audiostream.protocol import start_json
from tests.gateway.conftest import TLS, ServerFactory, expect_close, read_json

pytestmark = pytest.mark.integration

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
CHUNK = b"\x01\x00" * 320




async def test_tls_12_client_is_refused_and_13_accepted(
    make_server: ServerFactory, tls: TLS
) -> None:
    async with make_server() as srv:
        old = ssl.create_default_context(cafile=str(tls.ca_file))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await http.ws_connect(srv.url, ssl=old)
            # The server aborts the handshake (protocol_version alert, then reset).
            assert isinstance(info.value.os_error, ssl.SSLError | ConnectionResetError)
            async with http.ws_connect(srv.url, ssl=tls.client) as ws:
                transport = ws.get_extra_info("ssl_object")
                assert transport is not None and transport.version() == "TLSv1.3"


async def test_origin_allowlist(make_server: ServerFactory, tls: TLS) -> None:
    settings = GatewaySettings(chunk_rate=None, allowed_origins=("https://app.example.com",))
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(srv.url, ssl=tls.client, origin="https://evil.example.com")
        assert info.value.status == 403
        async with http.ws_connect(srv.url, ssl=tls.client,
                                   origin="https://app.example.com") as ws:
            await ws.send_str('{"type":"keepalive"}')
            assert (await read_json(ws))["type"] == "keepalive"
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:  # no Origin: an SDK
            await ws.send_str('{"type":"keepalive"}')
            assert (await read_json(ws))["type"] == "keepalive"


async def test_revoked_key_is_refused_without_restart(
    make_server: ServerFactory, tls: TLS, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    key, rec = create_key(keys, "soon-revoked")
    async with make_server(keys_file=keys) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(key, FMT, ["passthrough"]))
            assert (await read_json(ws))["type"] == "ready"
        revoke_key(keys, rec.id)
        st = keys.stat()
        os.utime(keys, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(key, FMT, ["passthrough"]))
            err = await read_json(ws)
            assert err["code"] == ErrorCode.FORBIDDEN and "revoked" in str(err["message"])
            await expect_close(ws, ErrorCode.FORBIDDEN)


async def test_a_flood_beyond_the_bucket_gets_rate_limited_notices(
    make_server: ServerFactory, tls: TLS
) -> None:
    settings = GatewaySettings(chunk_rate=50, chunk_burst=10)
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
            assert (await read_json(ws))["type"] == "ready"
            for _ in range(40):  # all at once: far above 50/s with a burst of 10
                await ws.send_bytes(CHUNK)
            await ws.send_str('{"type":"stop"}')
            audio, limited = 0, []
            while True:
                msg = await ws.receive(timeout=10)
                if msg.type is aiohttp.WSMsgType.BINARY:
                    audio += 1
                    continue
                data = json.loads(msg.data)
                if data["type"] == "notice":
                    assert data["code"] == ErrorCode.RATE_LIMITED
                    limited.append(data["seq"])
                elif data["type"] == "summary":
                    break
            assert audio + len(limited) == 40  # every chunk still has exactly one outcome
            assert 10 <= audio < 20 and limited
            assert data["dropped_by_reason"] == {"rate_limited": len(limited)}


async def test_the_n_plus_first_session_of_a_key_capped_at_n_is_refused(
    make_server: ServerFactory, tls: TLS, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "capped", max_sessions=2)
    async with make_server(keys_file=keys) as srv, aiohttp.ClientSession() as http:
        held = []
        for _ in range(2):
            ws = await http.ws_connect(srv.url, ssl=tls.client)
            await ws.send_str(start_json(key, FMT, ["passthrough"]))
            assert (await read_json(ws))["type"] == "ready"
            held.append(ws)
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(key, FMT, ["passthrough"]))
            err = await read_json(ws)
            assert err["code"] == ErrorCode.TOO_MANY_SESSIONS and err["retryable"] is True
            await expect_close(ws, ErrorCode.TOO_MANY_SESSIONS)
        # A session that ends cleanly frees its slot (one that only disconnects stays
        # resumable and keeps counting: see test_session_limits.py).
        await held[0].send_str('{"type":"stop"}')
        assert (await read_json(held[0]))["type"] == "summary"
        await expect_close(held[0], 1000)
        async with asyncio.timeout(10):
            while True:
                ws = await http.ws_connect(srv.url, ssl=tls.client)
                await ws.send_str(start_json(key, FMT, ["passthrough"]))
                reply = await read_json(ws)
                await ws.close()
                if reply["type"] == "ready":
                    break
        await held[1].close()


async def test_a_key_may_be_limited_to_some_steps(
    make_server: ServerFactory, tls: TLS, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "gain-only", pipelines=["gain"])
    async with make_server(keys_file=keys) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(key, FMT, ["highpass"]))
            assert (await read_json(ws))["code"] == ErrorCode.FORBIDDEN


async def test_gateway_connection_cap_refuses_before_upgrade(
    make_server: ServerFactory, tls: TLS
) -> None:
    settings = GatewaySettings(chunk_rate=None, max_connections=1)
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(srv.url, ssl=tls.client):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(srv.url, ssl=tls.client)
            assert info.value.status == 503


@pytest.mark.parametrize(
    ("settings", "send_start", "code"),
    [
        (GatewaySettings(auth_timeout_s=0.3), False, ErrorCode.AUTH_TIMEOUT),
        (GatewaySettings(idle_timeout_s=0.3), True, ErrorCode.IDLE_TIMEOUT),
    ],
)
async def test_timeouts_close_with_their_codes(
    make_server: ServerFactory, tls: TLS, settings: GatewaySettings, send_start: bool,
    code: ErrorCode
) -> None:
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(srv.url, ssl=tls.client, autoping=True) as ws:
            if send_start:
                await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
                assert (await read_json(ws))["type"] == "ready"
            err = await read_json(ws)
            assert err["code"] == code
            await expect_close(ws, code)


async def test_json_keepalive_answers_and_counts_as_activity(
    make_server: ServerFactory, tls: TLS
) -> None:
    settings = GatewaySettings(idle_timeout_s=0.5)
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
            assert (await read_json(ws))["type"] == "ready"
            for _ in range(4):  # 4 x 0.2 s > the idle timeout, but never idle that long
                await asyncio.sleep(0.2)  # the pause is the behaviour under test
                await ws.send_str('{"type":"keepalive"}')
                assert (await read_json(ws))["type"] == "keepalive"
            await ws.send_bytes(CHUNK)
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.BINARY
