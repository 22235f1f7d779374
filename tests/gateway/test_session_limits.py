"""Holes 1, 2, 3, 5 and 11 of issue #13, reproduced against a live gateway over TLS.

Each test runs the attack and asserts the documented refusal: its close code and, where
the issue asks for one, a (generous) time bound; in those of holes 1, 2, 3 and 5 a victim
session of another key streams real-time audio beside the attack and must get all of it
back.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings, create_key
from audiostream.protocol import MAX_PRE_START_TEXT, ResumeRequest, start_json
from tests.gateway.conftest import TLS, ServerFactory, expect_close, read_json
from tests.security.conftest import start_victim

pytestmark = pytest.mark.integration

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
CHUNK = b"\x01\x00" * 320




async def closed_with(ws: aiohttp.ClientWebSocketResponse, within: float) -> int | None:
    """Read (and discard) until the server closes; its close code."""
    async with asyncio.timeout(within):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data)
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return ws.close_code


@pytest.mark.parametrize("attack", ["pings", "keepalives"])
async def test_the_auth_deadline_cannot_be_extended(
    make_server: ServerFactory, tls: TLS, attack: str
) -> None:
    """Hole 1: pings (aiohttp restarts its receive timer on each) and keepalives before
    start used to keep a keyless socket open forever."""
    settings = GatewaySettings(chunk_rate=None, auth_timeout_s=1.0)
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        victim = start_victim(srv, tls)
        ws = await http.ws_connect(srv.url, ssl=tls.client, autoping=True, autoclose=False)
        started = time.monotonic()
        code: int | None = None

        async def pester() -> None:
            while not ws.closed:
                if attack == "pings":
                    await ws.ping()
                else:
                    await ws.send_str('{"type":"keepalive"}')
                await asyncio.sleep(0.05)  # the attack's pace, not synchronisation

        task = asyncio.create_task(pester())
        try:
            code = await closed_with(ws, 15)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ws.close()
        elapsed = time.monotonic() - started
        assert code == ErrorCode.AUTH_TIMEOUT
        assert elapsed < 8, f"closed after {elapsed:.1f} s; the deadline is 1 s"
        await victim.assert_intact()
        assert not srv.gateway.connections or await _gone(srv)


async def _gone(srv: object) -> bool:
    from audiostream.testing import eventually
    return await eventually(lambda: not srv.gateway.connections)  # type: ignore[attr-defined]


async def test_large_pre_auth_text_frames_are_refused_unparsed(
    make_server: ServerFactory, tls: TLS
) -> None:
    """Hole 3: 12 keyless sockets each send a 400 KB text frame; each is closed with
    frame_too_large (4004) before any JSON parsing, and one over the WebSocket cap
    (512 KiB) with 1009."""
    async with make_server() as srv, aiohttp.ClientSession() as http:
        victim = start_victim(srv, tls)

        async def attack(size: int) -> int | None:
            async with http.ws_connect(srv.url, ssl=tls.client) as ws:
                await ws.send_str('{"type":"keepalive","pad":"' + "x" * size + '"}')
                return await closed_with(ws, 15)

        codes = await asyncio.gather(*(attack(400_000) for _ in range(12)))
        assert codes == [ErrorCode.FRAME_TOO_LARGE] * 12
        assert await attack(600_000) == 1009
        assert await attack(MAX_PRE_START_TEXT + 1) == ErrorCode.FRAME_TOO_LARGE
        await victim.assert_intact()
        # A legitimate start still works afterwards.
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
            assert (await read_json(ws))["type"] == "ready"


async def test_50_concurrent_starts_on_a_key_capped_at_2_give_exactly_2(
    make_server: ServerFactory, tls: TLS, tmp_path: Path
) -> None:
    """Hole 2: the cap used to be checked before an await and counted after it."""
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "capped", max_sessions=2)
    victim_key, _ = create_key(keys, "victim")
    # Fifty TLS handshakes and starts at once can keep the victim's chunk waiting past
    # the shedding threshold on a loaded machine, and the gateway then (rightly) refuses
    # some starts as overloaded (4031; seen in CI): this test is about the key's cap.
    settings = GatewaySettings(chunk_rate=None, shed_above_ms=0)
    async with make_server(keys_file=keys, gateway_settings=settings) as srv, \
            aiohttp.ClientSession() as http:
        victim = start_victim(srv, tls, key=victim_key)
        sockets = [await http.ws_connect(srv.url, ssl=tls.client) for _ in range(50)]
        try:
            await asyncio.gather(*(ws.send_str(start_json(key, FMT, ["passthrough"]))
                                   for ws in sockets))
            replies = await asyncio.gather(*(read_json(ws) for ws in sockets))
            kinds = [r["type"] for r in replies]
            assert kinds.count("ready") == 2
            refused = [r for r in replies if r["type"] == "error"]
            assert len(refused) == 48
            assert {r["code"] for r in refused} == {ErrorCode.TOO_MANY_SESSIONS}
            await victim.assert_intact()
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))


async def test_detached_sessions_count_until_resumed_or_expired(
    make_server: ServerFactory, tls: TLS, tmp_path: Path
) -> None:
    """Hole 5: a session whose connection dropped stays resumable, so it keeps its slot."""
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "capped", max_sessions=1)
    victim_key, _ = create_key(keys, "victim")
    settings = GatewaySettings(chunk_rate=None, resume_window_s=60)
    async with make_server(keys_file=keys, gateway_settings=settings) as srv, \
            aiohttp.ClientSession() as http:
        victim = start_victim(srv, tls, key=victim_key)
        ws = await http.ws_connect(srv.url, ssl=tls.client)
        await ws.send_str(start_json(key, FMT, ["passthrough"]))
        ready = await read_json(ws)
        token = str(ready["token"])
        await ws.send_bytes(CHUNK)
        assert (await ws.receive(timeout=10)).data == CHUNK
        await ws.close()  # no stop: the session is detached, not finished
        from audiostream.testing import eventually
        capped = str(ready["session_id"])
        assert await eventually(lambda: all(
            c.grant is None or c.grant.session_id != capped for c in srv.gateway.connections))
        async with http.ws_connect(srv.url, ssl=tls.client) as other:
            await other.send_str(start_json(key, FMT, ["passthrough"]))
            err = await read_json(other)
            assert err["code"] == ErrorCode.TOO_MANY_SESSIONS
        # Its owner can still resume it (the detached slot is handed over).
        async with http.ws_connect(srv.url, ssl=tls.client) as again:
            await again.send_str(start_json(key, FMT, ["passthrough"],
                                            resume=ResumeRequest(token, 1)))
            resumed = await read_json(again)
            assert resumed["type"] == "ready" and resumed["resumed"] is True, resumed
            await again.send_str('{"type":"stop"}')
            assert (await read_json(again))["type"] == "summary"
            await expect_close(again, 1000)
        await victim.assert_intact()
        # Finished cleanly: the slot is free again.
        assert await eventually(lambda: not srv.gateway.sessions_per_key)


async def test_session_starts_per_key_per_minute_are_capped(
    make_server: ServerFactory, tls: TLS
) -> None:
    settings = GatewaySettings(chunk_rate=None, session_starts_per_minute=3)
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        for i in range(4):
            async with http.ws_connect(srv.url, ssl=tls.client) as ws:
                await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
                reply = await read_json(ws)
                if i < 3:
                    assert reply["type"] == "ready"
                    await ws.send_str('{"type":"stop"}')
                    assert (await read_json(ws))["type"] == "summary"
                else:
                    assert reply["code"] == ErrorCode.TOO_MANY_SESSIONS
                    await expect_close(ws, ErrorCode.TOO_MANY_SESSIONS)


@pytest.mark.parametrize("received", ["1e9", "1000000000"])
async def test_resume_claiming_more_than_was_answered_fails_4040(
    make_server: ServerFactory, tls: TLS, received: str
) -> None:
    """Hole 11: ``received: 1e9`` used to give a summary of 1,000,000,001 chunks."""
    async with make_server() as srv, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url, ssl=tls.client)
        await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
        token = str((await read_json(ws))["token"])
        for _ in range(3):
            await ws.send_bytes(CHUNK)
        for _ in range(3):
            assert (await ws.receive(timeout=10)).type is aiohttp.WSMsgType.BINARY
        await ws.close()
        async with http.ws_connect(srv.url, ssl=tls.client) as again:
            start = json.loads(start_json(srv.api_key, FMT, ["passthrough"],
                                          resume=ResumeRequest(token, 0)))
            text = json.dumps(start).replace('"received": 0', f'"received": {received}')
            await again.send_str(text)
            err = await read_json(again)
            assert err["code"] == ErrorCode.RESUME_FAILED
            await expect_close(again, ErrorCode.RESUME_FAILED)
        # The honest claim still works.
        async with http.ws_connect(srv.url, ssl=tls.client) as honest:
            await honest.send_str(start_json(srv.api_key, FMT, ["passthrough"],
                                             resume=ResumeRequest(token, 3)))
            ready = await read_json(honest)
            assert ready["type"] == "ready" and ready["resume_from"] == 3
            await honest.send_str('{"type":"stop"}')
            summary = await read_json(honest)
            assert summary["type"] == "summary" and summary["chunks_in"] == 3


async def test_an_older_token_cannot_displace_the_holder_of_a_newer_one(
    make_server: ServerFactory, tls: TLS
) -> None:
    async with make_server() as srv, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url, ssl=tls.client)
        await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
        old_token = str((await read_json(ws))["token"])
        await ws.close()
        holder = await http.ws_connect(srv.url, ssl=tls.client)
        await holder.send_str(start_json(srv.api_key, FMT, ["passthrough"],
                                         resume=ResumeRequest(old_token, 0)))
        assert (await read_json(holder))["type"] == "ready"  # generation 1 now holds it
        async with http.ws_connect(srv.url, ssl=tls.client) as stale:
            await stale.send_str(start_json(srv.api_key, FMT, ["passthrough"],
                                            resume=ResumeRequest(old_token, 0)))
            err = await read_json(stale)
            assert err["code"] == ErrorCode.RESUME_FAILED
        # The holder is untouched.
        await holder.send_bytes(CHUNK)
        assert (await holder.receive(timeout=10)).data == CHUNK
        await holder.close()


async def test_a_failed_resume_leaves_the_detached_session_counted_once(
    make_server: ServerFactory, tls: TLS, tmp_path: Path
) -> None:
    """Hole 5 through a resume: a resume of a detached session takes over its count
    (``claim_detached``) and gives it back when it fails. Before, the count went with
    the failed resume, so a key capped at one session could start another beside a
    session that was still resumable."""
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "capped", max_sessions=1)
    async with make_server(keys_file=keys) as srv, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url, ssl=tls.client)
        await ws.send_str(start_json(key, FMT, ["passthrough"]))
        token = str((await read_json(ws))["token"])
        await ws.send_bytes(CHUNK)
        assert (await ws.receive(timeout=10)).data == CHUNK
        await ws.close()  # detached: resumable, and counted
        from audiostream.testing import eventually
        assert await eventually(lambda: not srv.gateway.holders)
        async with http.ws_connect(srv.url, ssl=tls.client) as liar:  # claims too much
            await liar.send_str(start_json(key, FMT, ["passthrough"],
                                           resume=ResumeRequest(token, 5)))
            assert (await read_json(liar))["code"] == ErrorCode.RESUME_FAILED
            await expect_close(liar, ErrorCode.RESUME_FAILED)
        assert list(srv.gateway.sessions_per_key.values()) == [1]  # counted once, still
        async with http.ws_connect(srv.url, ssl=tls.client) as other:
            await other.send_str(start_json(key, FMT, ["passthrough"]))
            err = await read_json(other)
            assert err["code"] == ErrorCode.TOO_MANY_SESSIONS, err
        async with http.ws_connect(srv.url, ssl=tls.client) as honest:  # still resumable
            await honest.send_str(start_json(key, FMT, ["passthrough"],
                                             resume=ResumeRequest(token, 1)))
            ready = await read_json(honest)
            assert ready["type"] == "ready" and ready["resume_from"] == 1, ready
            await honest.send_str('{"type":"stop"}')
            assert (await read_json(honest))["type"] == "summary"
            await expect_close(honest, 1000)
        assert await eventually(lambda: not srv.gateway.sessions_per_key)
