"""Hole 4: revoking a key ends its live sessions with ``key_revoked`` (4014) within a few
seconds, and no resume token is issued to it afterwards, while another key's session
keeps all its audio. Real gateway, real TLS WebSockets, on both transports."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings, KeyStore
from audiostream.gateway.keys import create_key, revoke_key, save_records
from audiostream.gateway.revocation import KeyRevocation
from audiostream.protocol import ResumeRequest, ServerProtocol, State, start_json
from tests.gateway.conftest import TLS, ServerFactory

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
CHUNK = np.zeros(320, np.int16).tobytes()  # 20 ms


def revoke(path: Path, key_id: str) -> None:
    """``audiostream keys revoke``, with an mtime that surely moves on coarse clocks."""
    revoke_key(path, key_id)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


async def start(http: aiohttp.ClientSession, url: str, key: str, tls: TLS,
                **kw: Any) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await http.ws_connect(url, ssl=tls.client)
    await ws.send_str(start_json(key, FMT, ["passthrough"], **kw))
    msg = await ws.receive(timeout=20)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return ws, json.loads(msg.data)


async def until_closed(ws: aiohttp.ClientWebSocketResponse,
                       within: float) -> tuple[list[dict[str, Any]], int | None]:
    """Every text message until the server closes, and the close code."""
    texts: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive(timeout=within)
        if msg.type is aiohttp.WSMsgType.TEXT:
            texts.append(json.loads(msg.data))
        elif msg.type is aiohttp.WSMsgType.CLOSE:
            return texts, int(msg.data)
        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return texts, ws.close_code


async def feed(ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
    """Real-time audio until told to stop or the server goes away."""
    while not stop.is_set() and not ws.closed:
        try:
            await ws.send_bytes(CHUNK)
        except (ConnectionError, aiohttp.ClientError):
            return
        await asyncio.sleep(0.02)  # pacing a real-time stream


async def test_revoking_a_key_ends_its_live_sessions_not_others(
    make_server: ServerFactory, tls: TLS, tmp_path: Path
) -> None:
    path = tmp_path / "keys.json"
    bad_key, bad = create_key(path, "leaked")
    good_key, _ = create_key(path, "victim")
    settings = GatewaySettings(chunk_rate=None)  # default key_recheck_s
    x = (np.random.default_rng(4).standard_normal(16000 * 5) * 3000).astype(np.int16)
    async with make_server(keys_file=path, gateway_settings=settings,
                           processing=("passthrough",)) as srv, \
            aiohttp.ClientSession() as http:
        victim = AudioStreamClient(srv.url, api_key=good_key, pipeline=["passthrough"],
                                   format=FMT, ssl_context=tls.client, deadline_ms=10_000)
        victim_task = asyncio.create_task(victim.stream(x, rate=1.0))
        sessions = [await start(http, srv.url, bad_key, tls) for _ in range(2)]
        assert all(ready["type"] == "ready" for _, ready in sessions)
        stop = asyncio.Event()
        feeders = [asyncio.create_task(feed(ws, stop)) for ws, _ in sessions]
        try:
            await asyncio.sleep(0.5)  # both stream for a while before the revocation
            revoked_at = time.monotonic()
            revoke(path, bad.id)
            for ws, _ in sessions:
                texts, code = await until_closed(ws, within=15)
                took = time.monotonic() - revoked_at
                assert code == ErrorCode.KEY_REVOKED
                errors = [t for t in texts if t.get("type") == "error"]
                assert errors and errors[-1]["code"] == ErrorCode.KEY_REVOKED, texts
                print(f"revoked session closed {took:.2f} s after the revocation")
            assert srv.gateway.revocation.ended == 2
            # The key is refused for new sessions and for resuming its old one.
            ws, err = await start(http, srv.url, bad_key, tls)
            assert err["code"] == ErrorCode.FORBIDDEN
            await ws.close()
            token = sessions[0][1]["token"]
            ws, err = await start(http, srv.url, bad_key, tls,
                                  resume=ResumeRequest(token, 0))
            assert err["code"] == ErrorCode.FORBIDDEN
            await ws.close()
        finally:
            stop.set()
            await asyncio.gather(*feeders)
            for ws, _ in sessions:
                await ws.close()
        result = await asyncio.wait_for(victim_task, 60)
    assert result.audio == x.tobytes() and not result.dropped


async def test_token_refresh_rechecks_the_key(
    make_server: ServerFactory, tls: TLS, tmp_path: Path
) -> None:
    """With the periodic sweep off, the refresh alone must notice the revocation."""
    path = tmp_path / "keys.json"
    key, rec = create_key(path, "leaked")
    settings = GatewaySettings(chunk_rate=None, key_recheck_s=0, resume_window_s=1.5)
    async with make_server(keys_file=path, gateway_settings=settings,
                           processing=("passthrough",)) as srv, \
            aiohttp.ClientSession() as http:
        ws, ready = await start(http, srv.url, key, tls)
        assert ready["type"] == "ready"
        first = await ws.receive(timeout=10)  # refreshes work while the key is good
        assert first.type is aiohttp.WSMsgType.TEXT and json.loads(first.data)["type"] == "token"
        revoke(path, rec.id)
        texts, code = await until_closed(ws, within=10)
        assert [t for t in texts if t.get("type") == "token"] == []
        assert code == ErrorCode.KEY_REVOKED
        assert texts[-1]["code"] == ErrorCode.KEY_REVOKED, texts
        await ws.close()


class _Session:
    def __init__(self, key: Any) -> None:
        self.key = key
        self.proto = ServerProtocol()
        self.proto.receive_text(start_json("as_x_y", FMT, ["passthrough"]))
        self.proto.accept("s", FMT)
        self.kicked = 0

    def kick(self) -> None:
        self.kicked += 1


def test_sweep_rules(tmp_path: Path) -> None:
    """Removed and revoked keys end sessions; an unreadable or missing file does not."""
    path = tmp_path / "keys.json"
    _, a = create_key(path, "a")
    _, b = create_key(path, "b")
    _, c = create_key(path, "c")
    store = KeyStore(path)
    sessions = [_Session(r) for r in (a, b, c)]
    watcher = KeyRevocation(store, lambda: sessions, interval_s=0)
    assert watcher.sweep() == 0
    records = [r for r in store.records() if r.id != b.id]
    save_records(path, records)  # b removed from the file
    revoke(path, a.id)
    assert watcher.sweep() == 2
    assert [s.proto.state for s in sessions] == [State.CLOSED, State.CLOSED, State.STREAMING]
    assert sessions[0].proto.close_code == ErrorCode.KEY_REVOKED and sessions[0].kicked
    for broken in ("{", None):
        if broken is None:
            path.unlink()
        else:
            path.write_text(broken)
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000))
        assert watcher.sweep() == 0 and sessions[2].proto.state is State.STREAMING
