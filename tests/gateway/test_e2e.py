"""End to end over real TLS WebSockets: client -> gateway -> transport -> worker -> client.

Every test runs on both transports (in-memory and the real RabbitMQ).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient, read_wav
from audiostream.errors import AudioStreamError, ErrorCode
from audiostream.processors import ProcessorRegistry, StepInput, StepOutput
from audiostream.processors import registry as builtin
from audiostream.protocol import start_json
from audiostream.testing import Embedded, eventually, sample_wav
from audiostream.topology import Topology
from tests.conftest import unique_prefix
from tests.gateway.conftest import TLS, ServerFactory, expect_close

pytestmark = pytest.mark.integration

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
CHUNK = 320  # 20 ms at 16 kHz


def noise(seed: int, seconds: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 4000).astype(np.int16)


def client(server: Embedded, tls: TLS, pipeline: Sequence[Any], **kw: Any) -> AudioStreamClient:
    kw.setdefault("deadline_ms", 10_000)
    return AudioStreamClient(server.url, api_key=server.api_key, pipeline=list(pipeline),
                             format=FMT, ssl_context=tls.client, **kw)


async def test_passthrough_returns_the_sample_bit_identical(server: Embedded, tls: TLS) -> None:
    samples, _ = read_wav(sample_wav())
    result = await client(server, tls, ["passthrough"]).stream(sample_wav(), rate=None)
    assert result.audio == samples.tobytes()
    assert len(result.outcomes) == -(-samples.shape[0] // CHUNK)
    assert result.summary["chunks_in"] == result.summary["chunks_out"] == len(result.outcomes)
    assert result.close_code == 1000


async def test_many_concurrent_sessions_each_get_their_own_audio(
    server: Embedded, tls: TLS
) -> None:
    inputs = [noise(seed) for seed in range(16)]

    async def one(x: np.ndarray) -> bytes:
        r = await client(server, tls, ["passthrough"]).stream(x, rate=3.0)
        assert len(r.outcomes) == -(-x.size // CHUNK)
        assert not r.dropped
        return r.audio

    outputs = await asyncio.gather(*(one(x) for x in inputs))
    for x, y in zip(inputs, outputs, strict=True):
        assert y == x.tobytes()


async def test_two_step_chain_matches_offline(server: Embedded, tls: TLS) -> None:
    from audiostream.worker.offline import run_offline

    x = noise(7, 1.0)
    pipeline = ["highpass", {"name": "gain", "params": {"db": -6}}]
    result = await client(server, tls, pipeline).stream(x, rate=None, chunk_ms=10)
    reference = run_offline(x.tobytes(), FMT, pipeline)
    assert not result.dropped
    assert result.audio == reference
    assert result.audio != x.tobytes()


async def test_linger_trades_latency_for_fewer_larger_messages(
    make_server: ServerFactory, tls: TLS
) -> None:
    from audiostream.gateway import GatewaySettings
    from audiostream.worker.offline import run_offline

    x = noise(11, 0.6)  # 30 chunks of 20 ms, streamed in real time
    settings = GatewaySettings(chunk_rate=None, linger_ms=60)
    async with make_server(gateway_settings=settings) as server:
        result = await client(server, tls, ["highpass"]).stream(x, rate=1.0)
        published = server.gateway.metrics_registry.get_sample_value(
            "audiostream_gateway_messages_published_total")
    chunks = -(-x.shape[0] // CHUNK)
    assert not result.dropped
    assert result.audio == run_offline(x.tobytes(), FMT, ["highpass"])  # same audio, stateful
    # A message leaves once its oldest chunk is 60 ms old: >= 3 chunks each, but the last.
    assert published is not None and published <= chunks // 3 + 1


async def test_chunks_may_have_any_whole_sample_size(server: Embedded, tls: TLS) -> None:
    x = noise(3, 0.3)
    sizes = [1, 7, 160, 333, 320, 999]
    pieces, pos = [], 0
    for n in sizes * 3:
        if pos >= x.size:
            break
        pieces.append(x[pos:pos + n].tobytes())
        pos += n
    result = await client(server, tls, ["passthrough"]).stream(pieces, rate=None)
    assert [len(o) for o in result.outcomes if isinstance(o, bytes)] == [len(p) for p in pieces]
    assert result.audio == b"".join(pieces)


# --- bad input: documented codes, the session survives where it can, others unaffected ----


async def raw_session(server: Embedded, tls: TLS) -> tuple[aiohttp.ClientSession,
                                                           aiohttp.ClientWebSocketResponse]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(server.url, ssl=tls.client)
    return http, ws


async def receive_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=10)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
    data: dict[str, Any] = json.loads(msg.data)
    return data


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (b"\x00\x01", ErrorCode.UNEXPECTED_MESSAGE),
        ("{not json", ErrorCode.INVALID_JSON),
        (start_json("as_000000000000_wrong", FMT, ["passthrough"]), ErrorCode.AUTH_FAILED),
        ("UNKNOWN_STEP", ErrorCode.UNKNOWN_STEP),
        ("BAD_RATE", ErrorCode.UNSUPPORTED_FORMAT),
    ],
)
async def test_refused_starts(
    server: Embedded, tls: TLS, first: str | bytes, code: ErrorCode
) -> None:
    healthy = asyncio.create_task(
        client(server, tls, ["passthrough"]).stream(noise(1), rate=2.0)
    )
    if first == "UNKNOWN_STEP":
        first = start_json(server.api_key, FMT, ["teleport"])
    elif first == "BAD_RATE":
        first = json.dumps({"type": "start", "api_key": server.api_key,
                            "format": {"encoding": "pcm_s16le", "sample_rate": 22050},
                            "pipeline": ["passthrough"]})
    http, ws = await raw_session(server, tls)
    try:
        if isinstance(first, bytes):
            await ws.send_bytes(first)
        else:
            await ws.send_str(first)
        err = await receive_json(ws)
        assert err["type"] == "error" and err["code"] == code and err["message"]
        await expect_close(ws, code)
    finally:
        await ws.close()
        await http.close()
    result = await healthy
    assert result.audio == noise(1).tobytes() and not result.dropped


async def test_in_session_errors_do_not_end_the_session(server: Embedded, tls: TLS) -> None:
    http, ws = await raw_session(server, tls)
    try:
        await ws.send_str(start_json(server.api_key, FMT, ["passthrough"]))
        ready = await receive_json(ws)
        assert ready["type"] == "ready"
        await ws.send_bytes(b"\x01\x02\x03")  # odd byte count: seq 0
        notice = await receive_json(ws)
        assert (notice["type"], notice["seq"], notice["code"]) == (
            "notice", 0, ErrorCode.INVALID_AUDIO)
        await ws.send_bytes(b"\x00" * 40_000)  # over 1000 ms at 16 kHz: seq 1
        notice = await receive_json(ws)
        assert (notice["seq"], notice["code"]) == (1, ErrorCode.FRAME_TOO_LARGE)
        await ws.send_str("{oops")
        assert (await receive_json(ws))["code"] == ErrorCode.INVALID_JSON
        await ws.send_str(start_json(server.api_key, FMT, ["passthrough"]))
        assert (await receive_json(ws))["code"] == ErrorCode.UNEXPECTED_MESSAGE
        good = noise(5, 0.02).tobytes()
        await ws.send_bytes(good)  # seq 2
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == good
        await ws.send_str('{"type":"stop"}')
        summary = await receive_json(ws)
        assert summary["type"] == "summary"
        assert (summary["chunks_in"], summary["chunks_out"], summary["dropped"]) == (3, 1, 2)
        await expect_close(ws, 1000)
    finally:
        await ws.close()
        await http.close()


async def test_credentials_in_the_url_are_refused_before_upgrade(
    server: Embedded, tls: TLS
) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(server.url + "?api_key=" + server.api_key, ssl=tls.client)
        assert info.value.status == 400


async def test_sdk_raises_the_refusal_code(server: Embedded, tls: TLS) -> None:
    bad = AudioStreamClient(server.url, api_key="as_000000000000_nope", pipeline=["gain"],
                            format=FMT, ssl_context=tls.client)
    with pytest.raises(AudioStreamError) as info:
        await bad.stream(noise(0, 0.04))
    assert info.value.code == ErrorCode.AUTH_FAILED


# --- deadlines: stale audio becomes a drop notice, never late audio ------------------------


def stall_registry() -> tuple[ProcessorRegistry, threading.Event, threading.Event]:
    reg = ProcessorRegistry()
    for name in ("passthrough",):
        reg.add(builtin.get(name))
    entered, release = threading.Event(), threading.Event()

    @reg.per_item("stall")
    def stall(item: StepInput) -> StepOutput:
        """Blocks the first call until the test releases it."""
        if not entered.is_set():
            entered.set()
            release.wait(timeout=30)
        return StepOutput(item.audio)

    return reg, entered, release


async def test_a_chunk_past_its_deadline_gets_a_notice_not_late_audio(
    make_server: ServerFactory, tls: TLS
) -> None:
    reg, entered, release = stall_registry()
    topo = Topology(processing_types=("passthrough", "stall"), prefix=unique_prefix())
    async with make_server(topology=topo, processors=reg) as srv:
        c = AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["stall"], format=FMT,
                              ssl_context=tls.client, deadline_ms=150)
        task = asyncio.create_task(c.stream([noise(2, 0.02).tobytes()], rate=None))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        result = await task  # the gateway's deadline answers while the worker is stuck
        release.set()
        [notice] = result.outcomes
        assert not isinstance(notice, bytes)
        assert notice.code == ErrorCode.EXPIRED and notice.seq == 0
        # The late reply the worker sends after release must not reach anyone; the next
        # session on the same server works normally.
        again = await c.stream([noise(3, 0.02).tobytes()], rate=None)
        assert again.audio == noise(3, 0.02).tobytes()


async def test_without_workers_chunks_expire_in_the_queue(
    make_server: ServerFactory, tls: TLS
) -> None:
    async with make_server(workers=0) as srv:
        c = client(srv, tls, ["passthrough"], deadline_ms=100)
        result = await c.stream(noise(4, 0.1), rate=None)
        assert len(result.outcomes) == 5
        assert all(not isinstance(o, bytes) and o.code == ErrorCode.EXPIRED
                   for o in result.outcomes)
        transport = srv.gateway.transport

        async def empty() -> bool:
            return await transport.work_queue_depth("passthrough") == 0

        assert await eventually(empty)


# --- reply queues -------------------------------------------------------------------------


async def test_reply_queue_outlives_a_drop_then_expires(server: Embedded, tls: TLS) -> None:
    http, ws = await raw_session(server, tls)
    await ws.send_str(start_json(server.api_key, FMT, ["passthrough"]))
    ready = await receive_json(ws)
    queue = server.gateway.transport.topology.reply_queue(ready["session_id"])
    await ws.close()  # no stop: the client vanished and may come back
    await http.close()
    transport = server.gateway.transport
    assert await eventually(lambda: not server.gateway.connections)
    assert await transport.reply_queue_exists(queue)  # still there for a resume
    # Let the expiry pass untouched: on RabbitMQ a passive declare (the existence
    # probe) renews the x-expires lease, so polling would keep the queue alive.
    await asyncio.sleep(transport.topology.reply_expires_ms / 1000 + 1.5)
    assert not await transport.reply_queue_exists(queue)


async def test_reply_queue_is_deleted_when_the_session_ends_cleanly(
    server: Embedded, tls: TLS
) -> None:
    result = await client(server, tls, ["passthrough"]).stream(noise(9, 0.04), rate=None)
    queue = server.gateway.transport.topology.reply_queue(result.session_id)
    assert await eventually(lambda: not server.gateway.connections)
    # Deleted at once, well before the 1.5 s expiry could have removed it.
    assert not await server.gateway.transport.reply_queue_exists(queue)


async def test_health_and_readiness(server: Embedded, tls: TLS) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.ops_url + "/healthz") as r:
            assert r.status == 200
        async with http.get(server.ops_url + "/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        server.gateway.draining = True
        async with http.get(server.ops_url + "/readyz") as r:
            assert r.status == 503


async def test_a_reply_reaches_the_socket_without_waking_the_writer(
    server: Embedded, tls: TLS
) -> None:
    """A lone session's reply is written in the turn it arrives (one task switch less
    on every round trip); the writer task is woken only for what is not plain audio."""
    data = noise(7, 0.4).tobytes()
    chunks = [data[i:i + 2 * CHUNK] for i in range(0, len(data), 2 * CHUNK)]
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(server.url, ssl=tls.client) as ws:
        await ws.send_str(start_json(server.api_key, FMT, ["passthrough"]))
        ready = json.loads((await ws.receive(timeout=30)).data)
        assert ready["type"] == "ready"
        (conn,) = server.gateway.connections
        wakes = 0
        wake_set = conn._wake.set

        def counted() -> None:
            nonlocal wakes
            wakes += 1
            wake_set()

        conn._wake.set = counted  # type: ignore[method-assign]
        echoed = []
        for chunk in chunks:  # one at a time: each reply finds the writer parked
            await ws.send_bytes(chunk)
            msg = await ws.receive(timeout=30)
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            echoed.append(msg.data)
        assert echoed == chunks
        assert wakes == 0
        await ws.send_str('{"type":"stop"}')
        summary = json.loads((await ws.receive(timeout=30)).data)
        assert summary["type"] == "summary" and summary["chunks_out"] == len(chunks)
    assert wakes >= 1  # the summary (text) went through the writer
