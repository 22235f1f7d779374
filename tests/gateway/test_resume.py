"""Session resumption, displacement and graceful drain, on both transports over TLS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient, ReconnectPolicy
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings, create_key
from audiostream.protocol import ResumeRequest, State, start_json
from audiostream.testing import Embedded, eventually
from audiostream.transport import MemoryBroker
from audiostream.worker.offline import run_offline
from tests.gateway.conftest import TLS, ServerFactory, TcpProxy, expect_close

pytestmark = pytest.mark.integration

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
SECRET = b"shared-by-all-gateways"
FAST_RECONNECT = ReconnectPolicy(initial_s=0.05, max_s=0.5, max_attempts=20)


def noise(seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 3000).astype(np.int16)


def chunks(x: np.ndarray) -> list[bytes]:
    return [x[i:i + 320].tobytes() for i in range(0, x.size, 320)]


@pytest.fixture
def keys_file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "keys.json"
    key, _ = create_key(path, "resume-tests")
    return path, key


@pytest.fixture
async def two_gateways(
    make_server: ServerFactory, keys_file: tuple[Path, str], transport_kind: str
) -> AsyncIterator[tuple[Embedded, Embedded]]:
    """Two gateways on one broker sharing the token secret; one worker behind them."""
    memory = MemoryBroker() if transport_kind == "memory" else None
    kw: dict[str, Any] = {"keys_file": keys_file[0], "token_secret": SECRET,
                          "memory_broker": memory}
    async with make_server(**kw) as a, make_server(workers=0, **kw) as b:
        yield a, b


async def raw(url: str, tls: TLS) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    http = aiohttp.ClientSession()
    return http, await http.ws_connect(url, ssl=tls.client)


async def recv(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    return await ws.receive(timeout=10)


async def test_resume_on_another_gateway_replays_missed_outcomes(
    two_gateways: tuple[Embedded, Embedded], keys_file: tuple[Path, str], tls: TLS
) -> None:
    a, b = two_gateways
    key = keys_file[1]
    x = noise(1, 0.2)
    parts = chunks(x)  # 10 chunks
    http, ws = await raw(a.url, tls)
    await ws.send_str(start_json(key, FMT, ["highpass"]))
    ready = json.loads((await recv(ws)).data)
    token = ready["token"]
    for p in parts[:6]:
        await ws.send_bytes(p)
    got = [(await recv(ws)).data for _ in range(2)]  # the client "reads" only 2 outcomes
    # Wait until the gateway has the other 4 replies too, then vanish without a stop.
    assert await eventually(lambda: next(iter(a.gateway.connections)).proto.next_out == 6)
    await ws.close()
    await http.close()

    http, ws = await raw(b.url, tls)
    try:
        await ws.send_str(start_json(key, FMT, ["highpass"],
                                     resume=ResumeRequest(token, received=2)))
        ready2 = json.loads((await recv(ws)).data)
        assert ready2["type"] == "ready" and ready2["resumed"] is True
        assert ready2["session_id"] == ready["session_id"]
        assert ready2["resume_from"] == 6
        for _ in range(4):  # replayed: seq 2..5
            msg = await recv(ws)
            assert msg.type is aiohttp.WSMsgType.BINARY
            got.append(msg.data)
        for p in parts[6:]:
            await ws.send_bytes(p)
        for _ in parts[6:]:
            got.append((await recv(ws)).data)
        await ws.send_str('{"type":"stop"}')
        summary = json.loads((await recv(ws)).data)
        assert summary["type"] == "summary" and summary["dropped"] == 0
    finally:
        await ws.close()
        await http.close()
    # Highpass is stateful: equality with the one-shot reference proves the state moved.
    assert b"".join(got) == run_offline(x.tobytes(), FMT, ["highpass"])


async def test_a_newer_connection_displaces_the_older(
    two_gateways: tuple[Embedded, Embedded], keys_file: tuple[Path, str], tls: TLS
) -> None:
    a, b = two_gateways
    key = keys_file[1]
    http1, ws1 = await raw(a.url, tls)
    http2 = ws2 = None
    try:
        await ws1.send_str(start_json(key, FMT, ["passthrough"]))
        token = json.loads((await recv(ws1)).data)["token"]
        http2, ws2 = await raw(b.url, tls)
        await ws2.send_str(start_json(key, FMT, ["passthrough"],
                                      resume=ResumeRequest(token, received=0)))
        ready = json.loads((await recv(ws2)).data)
        assert ready["resumed"] is True and ready["resume_from"] == 0
        err = json.loads((await recv(ws1)).data)
        assert err["code"] == ErrorCode.DISPLACED
        await expect_close(ws1, ErrorCode.DISPLACED)
        await ws2.send_bytes(b"\x01\x00" * 160)
        assert (await recv(ws2)).data == b"\x01\x00" * 160
    finally:
        for w, h in ((ws1, http1), (ws2, http2)):
            if w is not None:
                await w.close()
            if h is not None:
                await h.close()


@pytest.mark.parametrize("tamper", ["expired", "tampered", "other_secret"])
async def test_bad_tokens_are_refused(
    make_server: ServerFactory, keys_file: tuple[Path, str], tls: TLS, tamper: str
) -> None:
    from audiostream.gateway.tokens import TokenSigner

    settings = GatewaySettings(chunk_rate=None, resume_window_s=0.001 if tamper == "expired"
                               else 60)
    async with make_server(keys_file=keys_file[0], token_secret=SECRET,
                           gateway_settings=settings) as srv:
        http, ws = await raw(srv.url, tls)
        try:
            await ws.send_str(start_json(keys_file[1], FMT, ["passthrough"]))
            token = json.loads((await recv(ws)).data)["token"]
            if tamper == "tampered":
                body, sig = token.split(".")
                token = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + sig
            elif tamper == "other_secret":
                token = TokenSigner(b"not the secret").issue(
                    TokenSigner(SECRET).verify(token))
            elif tamper == "expired":
                await asyncio.sleep(0.01)  # outlive the 1 ms window
        finally:
            await ws.close()
            await http.close()
        http, ws = await raw(srv.url, tls)
        try:
            await ws.send_str(start_json(keys_file[1], FMT, ["passthrough"],
                                         resume=ResumeRequest(token, 0)))
            err = json.loads((await recv(ws)).data)
            assert err["code"] == ErrorCode.RESUME_FAILED, err
            await expect_close(ws, ErrorCode.RESUME_FAILED)
        finally:
            await ws.close()
            await http.close()


async def test_sdk_resumes_through_a_network_blip(
    make_server: ServerFactory, keys_file: tuple[Path, str], tls: TLS
) -> None:
    x = noise(2, 2.0)
    async with make_server(keys_file=keys_file[0], token_secret=SECRET) as srv:
        port = int(srv.url.rsplit(":", 1)[1].split("/")[0])
        proxy = TcpProxy(port)
        await proxy.start()
        try:
            client = AudioStreamClient(
                f"wss://127.0.0.1:{proxy.port}/v1/stream", api_key=keys_file[1],
                pipeline=["highpass"], format=FMT, ssl_context=tls.client,
                reconnect=FAST_RECONNECT, deadline_ms=5000,
            )
            received: list[int] = []
            client.on_audio(lambda seq, _pcm: received.append(seq))
            task = asyncio.create_task(client.stream(x, rate=4.0))
            assert await eventually(lambda: len(received) >= 20)
            proxy.cut()
            result = await asyncio.wait_for(task, 60)
        finally:
            await proxy.close()
    assert result.resumes >= 1
    assert not result.dropped
    assert len(result.outcomes) == len(chunks(x))
    assert result.audio == run_offline(x.tobytes(), FMT, ["highpass"])


def streaming(server: Embedded) -> int:
    return sum(c.proto.state is State.STREAMING for c in server.gateway.connections)


async def test_rolling_drain_under_live_sessions_loses_nothing(
    make_server: ServerFactory, keys_file: tuple[Path, str], tls: TLS, transport_kind: str
) -> None:
    memory = MemoryBroker() if transport_kind == "memory" else None
    kw: dict[str, Any] = {"keys_file": keys_file[0], "token_secret": SECRET,
                          "memory_broker": memory}
    # Long enough that every stream outlasts both drains and the second move: with 6 s,
    # on a slow machine the last drain ended with under 2 s of audio left and sessions
    # finished on gateway a before all 20 were streaming there.
    inputs = [noise(100 + i, 10.0) for i in range(20)]
    async with make_server(**kw) as a, make_server(workers=0, **kw) as b:
        urls = [a.url, b.url]
        clients = [
            AudioStreamClient(urls if i % 2 else urls[::-1], api_key=keys_file[1],
                              pipeline=["highpass"], format=FMT, ssl_context=tls.client,
                              reconnect=FAST_RECONNECT, deadline_ms=8000)
            for i in range(20)
        ]
        tasks = [asyncio.create_task(c.stream(x, rate=1.0)) for c, x in zip(clients, inputs,
                                                                              strict=True)]
        assert await eventually(lambda: streaming(a) + streaming(b) == 20)
        await a.gateway.drain(5.0)  # everyone on a moves to b
        assert not a.gateway.connections
        assert await eventually(lambda: streaming(b) == 20)
        a.gateway.draining = False  # a comes back (as after a rollout) ...
        await b.gateway.drain(5.0)  # ... and b drains to it
        assert await eventually(lambda: streaming(a) == 20)
        assert not any(t.done() for t in tasks)  # both drains happened mid-stream
        results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
    for x, r in zip(inputs, results, strict=True):
        assert not r.dropped
        assert len(r.outcomes) == len(chunks(x))
        assert r.audio == run_offline(x.tobytes(), FMT, ["highpass"])
    assert sum(r.resumes for r in results) >= 20
