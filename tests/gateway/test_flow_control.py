"""Protocol v1.1 credit, slow consumers, flooding and clean stop against a live gateway.

The raw clients here use the SDK's sans-I/O ``ClientProtocol`` to track credit, the same
API client.py builds on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import replace

import aiohttp
import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.processors import ProcessorRegistry, StepInput, StepOutput
from audiostream.processors import registry as builtin
from audiostream.protocol import (
    LARGEST_CHUNK_BYTES,
    V1_1,
    ClientProtocol,
    Credit,
    DropNotice,
    ResumeRequest,
    Summary,
    start_json,
)
from audiostream.testing import Embedded, eventually
from audiostream.topology import Topology
from audiostream.transport import MemoryBroker
from tests.conftest import unique_prefix
from tests.gateway.conftest import TLS, ServerFactory, rabbit_unacked, read_json

pytestmark = pytest.mark.integration

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


def chunks(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(320) * 3000).astype(np.int16).tobytes() for _ in range(n)]




class Run:
    """What a raw client saw: outcomes in order, notices, summary, close code."""

    def __init__(self) -> None:
        self.audio: list[bytes] = []
        self.notices: list[DropNotice] = []
        self.summary: Summary | None = None
        self.close_code: int | None = None
        self.credits = 0


async def read_all(ws: aiohttp.ClientWebSocketResponse, proto: ClientProtocol, run: Run,
                   credit: asyncio.Event | None = None) -> None:
    while True:
        msg = await ws.receive(timeout=60)
        if msg.type is aiohttp.WSMsgType.BINARY:
            run.audio.append(proto.receive_bytes(msg.data).data)
        elif msg.type is aiohttp.WSMsgType.TEXT:
            ev = proto.receive_text(msg.data)
            if isinstance(ev, DropNotice):
                run.notices.append(ev)
            elif isinstance(ev, Summary):
                run.summary = ev
            elif isinstance(ev, Credit):
                run.credits += 1
                if credit is not None:
                    credit.set()
        else:
            run.close_code = int(msg.data) if msg.type is aiohttp.WSMsgType.CLOSE else (
                ws.close_code)
            return


async def test_a_v11_client_streams_faster_than_real_time_within_credit(
    make_server: ServerFactory, tls: TLS
) -> None:
    """File mode: 3,000 chunks (60 s of audio) with the default v1 rate limit of 120/s in
    force; a v1.1 client that respects credit gets every chunk back, no notice."""
    n = 3000
    data = chunks(n)
    async with make_server(gateway_settings=GatewaySettings()) as srv, \
            aiohttp.ClientSession() as http:
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            proto = ClientProtocol()
            await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"], version=V1_1))
            proto.receive_text(json.dumps(await read_json(ws)))
            assert proto.ready is not None and proto.ready.version == V1_1
            assert proto.credit == 64 and proto.ready.rate is None
            run, credit = Run(), asyncio.Event()
            reader = asyncio.create_task(read_all(ws, proto, run, credit))
            started = time.monotonic()
            for chunk in data:
                while not proto.may_send():
                    credit.clear()
                    await credit.wait()
                proto.next_seq()
                await ws.send_bytes(chunk)
            await ws.send_str('{"type":"stop"}')
            await asyncio.wait_for(reader, 120)
            elapsed = time.monotonic() - started
    assert run.notices == []
    assert run.audio == data  # passthrough: bit-exact, in order
    assert run.summary is not None and run.summary.chunks_in == n and run.summary.dropped == 0
    assert run.close_code == 1000
    assert run.credits > 0
    assert elapsed < n * 0.020, f"{elapsed:.1f} s for {n * 0.02:.0f} s of audio"


async def test_chunks_beyond_credit_get_4024_and_a_persistent_flooder_4025(
    make_server: ServerFactory, tls: TLS
) -> None:
    settings = GatewaySettings(chunk_rate=None, credit_window=8, flood_burst=40, flood_rate=1)
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        # 20 chunks at once with a credit of 8: 12 are answered credit_exceeded.
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            proto = ClientProtocol()
            await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"], version=V1_1))
            proto.receive_text(json.dumps(await read_json(ws)))
            assert proto.credit == 8
            for chunk in chunks(20):
                proto.next_seq()
                await ws.send_bytes(chunk)
            await ws.send_str('{"type":"stop"}')
            run = Run()
            await read_all(ws, proto, run)
            assert len(run.audio) == 8
            assert sum(n.count for n in run.notices) == 12
            assert {n.code for n in run.notices} == {ErrorCode.CREDIT_EXCEEDED}
            assert len(run.notices) < 12  # aggregated (v1.1)
            assert run.close_code == 1000
        # 500 at once: far beyond credit plus the flood allowance -> closed 4025.
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            proto = ClientProtocol()
            await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"], version=V1_1))
            proto.receive_text(json.dumps(await read_json(ws)))
            with_close: list[int | None] = []

            async def flood() -> None:
                for chunk in chunks(500):
                    if ws.closed:
                        return
                    proto.next_seq()
                    await ws.send_bytes(chunk)

            sender = asyncio.create_task(flood())
            run = Run()
            await read_all(ws, proto, run)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            with_close.append(run.close_code)
            assert with_close == [ErrorCode.FLOODING]


async def test_a_client_that_stops_reading_is_closed_4023_and_can_resume(
    make_server: ServerFactory, tls: TLS, topology: Topology
) -> None:
    fmt = AudioFormat(Encoding.PCM_F32LE, 48000, 2)
    big = np.zeros(fmt.bytes_for_ms(100) // 4, dtype=np.float32).tobytes()  # 38,400 B
    settings = GatewaySettings(chunk_rate=None, max_outbound_bytes=256 * 1024,
                               slow_consumer_grace_s=1.0)
    # The reply queue must outlive the time the test takes to read the backlog.
    kept = replace(topology, reply_expires_ms=60_000)
    async with make_server(gateway_settings=settings, topology=kept) as srv, \
            aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url, ssl=tls.client)
        await ws.send_str(start_json(srv.api_key, fmt, ["passthrough"]))
        ready = await read_json(ws)
        token = str(ready["token"])
        [conn] = list(srv.gateway.connections)

        async def push() -> None:
            while conn.proto.close_code is None and not ws.closed:
                await ws.send_bytes(big)

        sender = asyncio.create_task(push())
        assert await eventually(lambda: conn.proto.close_code is not None, within=60)
        assert conn.proto.close_code == ErrorCode.SLOW_CONSUMER
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        assert await eventually(lambda: conn not in srv.gateway.connections, within=30)
        # The client reads again: what was written, then the error and close 4023.
        received, error, code = 0, None, None
        async with asyncio.timeout(60):
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.BINARY:
                    received += 1
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    error = json.loads(msg.data)
                else:
                    code = msg.data if msg.type is aiohttp.WSMsgType.CLOSE else ws.close_code
                    break
        await ws.close()
        assert error is not None and error["code"] == ErrorCode.SLOW_CONSUMER, (received, code)
        assert error["retryable"] is True
        assert code == ErrorCode.SLOW_CONSUMER
        # The session stays resumable.
        async with http.ws_connect(srv.url, ssl=tls.client) as again:
            await again.send_str(start_json(srv.api_key, fmt, ["passthrough"],
                                            resume=ResumeRequest(token, received)))
            resumed = await read_json(again)
            assert resumed["type"] == "ready" and resumed["resumed"] is True, resumed


async def stop_race(srv: Embedded, tls: TLS, http: aiohttp.ClientSession, n: int) -> Run:
    """Send ``n`` chunks and stop at once, then read slowly."""
    data = chunks(n, seed=n)
    run = Run()
    async with http.ws_connect(srv.url, ssl=tls.client) as ws:
        proto = ClientProtocol()
        await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"], deadline_ms=30_000))
        proto.receive_text(json.dumps(await read_json(ws)))
        for chunk in data:
            proto.next_seq()
            await ws.send_bytes(chunk)
        await ws.send_str('{"type":"stop"}')
        while True:
            msg = await ws.receive(timeout=60)
            if msg.type is aiohttp.WSMsgType.BINARY:
                run.audio.append(proto.receive_bytes(msg.data).data)
                if len(run.audio) % 50 == 0:
                    await asyncio.sleep(0.01)  # a slow reader (its pace, not a sync)
            elif msg.type is aiohttp.WSMsgType.TEXT:
                ev = proto.receive_text(msg.data)
                if isinstance(ev, DropNotice):
                    run.notices.append(ev)
                elif isinstance(ev, Summary):
                    run.summary = ev
            else:
                run.close_code = int(msg.data) if msg.type is aiohttp.WSMsgType.CLOSE else (
                    ws.close_code)
                break
    # Every chunk has its outcome (a notice only if the loaded machine blew the deadline).
    assert len(run.audio) + sum(n.count for n in run.notices) == n
    if not run.notices:
        assert run.audio == data
    return run


async def test_stop_delivers_every_outcome_and_the_summary_then_1000(
    make_server: ServerFactory, tls: TLS
) -> None:
    """Issue #12 (observed 4): 500 chunks + stop at once, slow reader; 50 runs on each
    transport, 5 at a time. Every run gets all outcomes, the summary and close 1000."""
    runs = 50
    settings = GatewaySettings(chunk_rate=None)
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        for _ in range(runs // 5):
            results = await asyncio.gather(*(stop_race(srv, tls, http, 500) for _ in range(5)))
            for r in results:
                assert r.summary is not None and r.summary.chunks_in == 500
                assert r.summary.chunks_out == len(r.audio)
                assert r.close_code == 1000
        assert await eventually(lambda: not srv.gateway.connections)
        assert not srv.gateway.sessions_per_key  # every session finished, none detached


async def test_a_non_reader_at_the_largest_chunk_size_is_bounded_and_others_go_on(
    make_server: ServerFactory, tls: TLS
) -> None:
    """1 s chunks of 48 kHz stereo float32 (384,000 bytes, the largest legal chunk) from a
    client that never reads: the gateway's unwritten bytes for it never exceed the hard
    cap plus one chunk, it is closed 4023, and a concurrent session keeps its audio."""
    fmt = AudioFormat(Encoding.PCM_F32LE, 48000, 2)
    big = np.zeros(fmt.bytes_for_ms(1000) // 4, dtype=np.float32).tobytes()
    cap = 2 * 1024 * 1024
    settings = GatewaySettings(chunk_rate=None, max_outbound_bytes=cap,
                               slow_consumer_grace_s=2.0)
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url, ssl=tls.client, max_msg_size=1 << 20)
        # A long deadline: expired notices are small and would keep it under the cap.
        await ws.send_str(start_json(srv.api_key, fmt, ["passthrough"], deadline_ms=30_000))
        await read_json(ws)
        [conn] = list(srv.gateway.connections)
        peak = 0

        def closed() -> bool:
            nonlocal peak
            peak = max(peak, conn.proto.unwritten_bytes)
            return conn.proto.close_code is not None

        async def push() -> None:
            while conn.proto.close_code is None and not ws.closed:
                await ws.send_bytes(big)

        sender = asyncio.create_task(push())
        victim = asyncio.create_task(stop_race(srv, tls, http, 200))
        assert await eventually(closed, within=60, interval=0.005)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        assert conn.proto.close_code == ErrorCode.SLOW_CONSUMER
        assert peak <= 4 * cap + len(big) + 4096, peak
        print(f"peak unwritten bytes {peak} (cap {cap}, hard cap {4 * cap})")
        run = await asyncio.wait_for(victim, 60)
        assert run.close_code == 1000 and run.summary is not None
        await ws.close()


@pytest.mark.parametrize("window", [2, 8, 64])
async def test_a_v11_client_at_full_speed_never_waits_for_a_grant_left_in_the_outbox(
    make_server: ServerFactory, tls: TLS, window: int
) -> None:
    """The grant that the last outcome's write produces must go out with it: a client
    that sent all its credit and has every outcome would otherwise wait for some later
    event (a token refresh, 20 s on) to learn it may go on. Each wait is bounded well
    below that refresh, so a grant left in the outbox fails the test instead of hanging."""
    n = 600
    data = chunks(n, seed=window)
    settings = GatewaySettings(credit_window=window)
    async with make_server(gateway_settings=settings) as srv, \
            aiohttp.ClientSession() as http:
        async with http.ws_connect(srv.url, ssl=tls.client) as ws:
            proto = ClientProtocol()
            await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"], version=V1_1))
            proto.receive_text(json.dumps(await read_json(ws)))
            assert proto.credit == window
            run, credit = Run(), asyncio.Event()
            reader = asyncio.create_task(read_all(ws, proto, run, credit))
            waits = 0
            for seq, chunk in enumerate(data):
                while not proto.may_send():
                    credit.clear()
                    waits += 1
                    try:
                        await asyncio.wait_for(credit.wait(), 8)
                    except TimeoutError:
                        [conn] = list(srv.gateway.connections)
                        pytest.fail(f"stalled at seq {seq}: the client holds credit "
                                    f"{proto.credit} and {len(run.audio)} outcomes; the "
                                    f"server granted {conn.proto.credit}")
                proto.next_seq()
                await ws.send_bytes(chunk)
            await ws.send_str('{"type":"stop"}')
            await asyncio.wait_for(reader, 60)
    assert waits > 0  # the client really ran into its credit
    assert run.notices == []
    assert run.audio == data
    assert run.close_code == 1000


async def test_a_non_reader_closed_4023_at_the_largest_chunk_resumes_and_finishes(
    make_server: ServerFactory, tls: TLS, topology: Topology
) -> None:
    """At 1 s of 48 kHz stereo float32 per chunk the journal a non-reader leaves behind
    holds more than the outbound hard cap. Its replay must not count against that cap,
    or the resumed connection is closed 4023 at once and the session can never finish.
    The client resumes from 0 (it kept nothing), so the replay is the whole journal."""
    fmt = AudioFormat(Encoding.PCM_F32LE, 48000, 2)
    rng = np.random.default_rng(7)
    frames = fmt.bytes_for_ms(1000) // 4
    cap = 1024 * 1024  # hard cap 4 MiB: about 11 chunks
    settings = GatewaySettings(chunk_rate=None, max_outbound_bytes=cap,
                               close_timeout_s=30.0, slow_consumer_grace_s=1.0)
    kept = replace(topology, reply_expires_ms=60_000)
    sent: list[bytes] = []
    async with make_server(gateway_settings=settings, topology=kept) as srv, \
            aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url, ssl=tls.client, max_msg_size=1 << 20)
        # A long deadline: expired notices are small and would keep it under the cap.
        await ws.send_str(start_json(srv.api_key, fmt, ["passthrough"], deadline_ms=30_000))
        token = str((await read_json(ws))["token"])
        [conn] = list(srv.gateway.connections)

        async def push() -> None:
            while conn.proto.close_code is None and not ws.closed:
                chunk = rng.standard_normal(frames).astype(np.float32).tobytes()
                sent.append(chunk)
                await ws.send_bytes(chunk)

        sender = asyncio.create_task(push())
        assert await eventually(lambda: conn.proto.close_code is not None, within=60)
        assert conn.proto.close_code == ErrorCode.SLOW_CONSUMER
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        accepted = conn.proto.next_in
        _audio, _error, code = await read_to_close(ws)
        assert code == ErrorCode.SLOW_CONSUMER  # the client's own view: the close frame
        await ws.close()
        async with http.ws_connect(srv.url, ssl=tls.client, max_msg_size=1 << 20) as again:
            proto = ClientProtocol()
            await again.send_str(start_json(srv.api_key, fmt, ["passthrough"],
                                            resume=ResumeRequest(token, 0)))
            proto.receive_text(json.dumps(await read_json(again)))
            assert proto.ready is not None and proto.ready.resumed
            resume_from = proto.ready.resume_from
            assert resume_from is not None and 0 < resume_from <= accepted
            await again.send_str('{"type":"stop"}')
            run = Run()
            await read_all(again, proto, run)
    assert run.close_code == 1000, run.close_code
    assert run.summary is not None
    assert len(run.audio) + sum(n.count for n in run.notices) == resume_from
    assert len(run.audio) * frames * 4 > 4 * cap, "the replay must exceed the hard cap"
    assert set(run.audio) <= set(sent[:resume_from])  # bit-exact (expired ones are notices)


#: The gateway's default byte budget per session (``GatewaySettings.max_queued_bytes``).
QUEUED_BUDGET = 16 * 1024 * 1024


def gated_registry() -> tuple[ProcessorRegistry, threading.Event]:
    """Passthrough plus ``gated``: passthrough that holds every call until the gate opens
    (a pipeline that has fallen behind, on demand)."""
    reg = ProcessorRegistry()
    reg.add(builtin.get("passthrough"))
    gate = threading.Event()

    @reg.per_item("gated")
    def gated(item: StepInput) -> StepOutput:
        """Passthrough once the test opens the gate."""
        gate.wait(timeout=120)
        return StepOutput(item.audio)

    return reg, gate


async def read_to_close(ws: aiohttp.ClientWebSocketResponse
                        ) -> tuple[int, dict[str, object] | None, int | None]:
    """Read what the server wrote until its close: (audio frames, last error, close code
    as the client saw it: the close frame's code, else aiohttp's, 1006 for a reset)."""
    audio, error = 0, None
    async with asyncio.timeout(60):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                audio += 1
            elif msg.type is aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if data["type"] == "error":
                    error = data
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                return audio, error, int(msg.data)
            else:
                return audio, error, ws.close_code


async def test_a_non_reader_flooding_the_largest_chunks_is_held_to_the_byte_budget(
    make_server: ServerFactory, tls: TLS
) -> None:
    """Issue #12: 384,000-byte chunks (the largest legal) as fast as the client can send,
    never reading, while the pipeline is stuck. The session's bytes at the gateway
    (chunks waiting and in flight, outcomes unwritten) never pass the 16 MiB budget by
    more than one chunk: the gateway stops reading the socket instead (before: up to
    1,000 chunks, 384 MB, answered ``overloaded``, and the connection never closed).
    Once the pipeline moves, the unread outcomes close it 4023, and the close frame
    itself reaches the client."""
    reg, gate = gated_registry()
    topo = Topology(processing_types=("passthrough", "gated"), prefix=unique_prefix())
    fmt = AudioFormat(Encoding.PCM_F32LE, 48000, 2)
    big = np.ones(fmt.bytes_for_ms(1000) // 4, dtype=np.float32).tobytes()
    limit = QUEUED_BUDGET + len(big)
    settings = GatewaySettings(chunk_rate=None, max_outbound_bytes=1024 * 1024,
                               close_timeout_s=30.0, slow_consumer_grace_s=1.0)
    async with make_server(gateway_settings=settings, topology=topo, processors=reg) as srv, \
            aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(srv.url, ssl=tls.client, max_msg_size=1 << 20)
            await ws.send_str(start_json(srv.api_key, fmt, ["gated"], deadline_ms=30_000))
            assert (await read_json(ws))["type"] == "ready"
            [conn] = list(srv.gateway.connections)
            peak = sent = 0

            def held() -> int:
                nonlocal peak
                pl = conn.pipeline
                n = conn.proto.unwritten_bytes + (pl.outstanding * len(big) if pl else 0)
                peak = max(peak, n)
                return n

            async def push() -> None:
                nonlocal sent
                while conn.proto.close_code is None and not ws.closed:
                    await ws.send_bytes(big)
                    sent += 1

            sender = asyncio.create_task(push())
            # Either the gateway pauses its reads at the budget, or (the old code) the
            # session keeps taking chunks past it.
            assert await eventually(
                lambda: held() > limit or getattr(conn, "reading_paused", False),
                within=60, interval=0.002)
            assert peak <= limit, f"{peak} bytes held; budget {QUEUED_BUDGET}"
            assert conn.reading_paused and conn.proto.close_code is None
            accepted = conn.proto.next_in
            assert accepted * len(big) <= limit
            gate.set()  # the pipeline moves: outcomes pile up unread
            assert await eventually(lambda: held() > limit or conn.proto.close_code is not None,
                                    within=60, interval=0.002)
            assert peak <= limit, f"{peak} bytes held; budget {QUEUED_BUDGET}"
            assert conn.proto.close_code == ErrorCode.SLOW_CONSUMER
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            _audio, error, code = await read_to_close(ws)
            assert error is not None and error["code"] == ErrorCode.SLOW_CONSUMER
            assert code == ErrorCode.SLOW_CONSUMER
            assert srv.gateway.metrics_registry.get_sample_value(
                "audiostream_gateway_reads_paused_total") >= 1
            print(f"sent {sent} chunks, {accepted} read before the pause, peak {peak} B")
            await ws.close()
        finally:
            gate.set()


async def non_reader_close(srv: Embedded, tls: TLS, http: aiohttp.ClientSession,
                           fmt: AudioFormat, big: bytes, extra: int) -> int | None:
    """A client sends ``big`` chunks without reading, and ``extra`` more once the server
    closed it (as a client learning of the close late does), then reads: the close code
    it sees, or None when the error message did not come before it."""
    ws = await http.ws_connect(srv.url, ssl=tls.client, max_msg_size=1 << 20)
    await ws.send_str(start_json(srv.api_key, fmt, ["passthrough"], deadline_ms=30_000))
    assert (await read_json(ws))["type"] == "ready"
    [conn] = [c for c in srv.gateway.connections if c.proto.close_code is None]
    after = 0

    async def push() -> None:
        nonlocal after
        while after < extra and not ws.closed:
            await ws.send_bytes(big)
            if conn.proto.close_code is not None:
                after += 1

    sender = asyncio.create_task(push())
    assert await eventually(lambda: conn.proto.close_code is not None, within=60)
    assert conn.proto.close_code == ErrorCode.SLOW_CONSUMER
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(sender, 30)
    _audio, error, code = await read_to_close(ws)
    await ws.close()
    # the code the client read, counted only with the error message before it
    return code if error is not None and error["code"] == ErrorCode.SLOW_CONSUMER else None


async def test_non_readers_at_the_largest_chunk_read_the_4023_close_frame(
    make_server: ServerFactory, tls: TLS
) -> None:
    """The client's own view of a slow-consumer close, 10 times on each transport: a
    client that sent 384,000-byte chunks without reading, then reads, gets the
    ``slow_consumer`` error and the close frame 4023, not a reset (1006). It goes on
    sending 8 chunks (3 MB) after the close, as a client learning of it late does;
    before, the gateway stopped reading such a socket and closed it with that input
    unread, the kernel answered with a reset and the client lost our last frames."""
    fmt = AudioFormat(Encoding.PCM_F32LE, 48000, 2)
    big = np.zeros(fmt.bytes_for_ms(1000) // 4, dtype=np.float32).tobytes()
    # A client that keeps sending past the close timeout is reset by design; the wide
    # timeout keeps a loaded machine's slow TLS from reaching it.
    settings = GatewaySettings(chunk_rate=None, max_outbound_bytes=1024 * 1024,
                               close_timeout_s=30.0, slow_consumer_grace_s=0.5)
    codes: list[int | None] = []
    async with make_server(gateway_settings=settings) as srv, aiohttp.ClientSession() as http:
        for _ in range(10):
            codes.append(await non_reader_close(srv, tls, http, fmt, big, extra=8))
    # Every one of them: a forced close that ends in a reset (1006) is a lost close code.
    assert codes == [ErrorCode.SLOW_CONSUMER] * 10, codes


#: Reply audio a non-acking client's journal keeps (docs/protocol.md; the gateway's
#: ``journal.MAX_JOURNAL_BYTES``).
JOURNAL_BYTES = 8 * 1024 * 1024


async def test_a_reader_that_never_acks_the_largest_chunks_keeps_its_audio_in_8_mib(
    make_server: ServerFactory, tls: TLS, transport_kind: str, memory_broker: MemoryBroker
) -> None:
    """Issue #12 (acks and the journal): a raw v1 client that reads everything but never
    acks, streaming 1 s chunks of 48 kHz stereo float32 (384,000 B, the largest legal),
    gets every chunk back as audio, bit-exact and in order, while the gateway's journal
    keeps at most ``JOURNAL_BYTES`` of replies already written to the socket (and
    at most the client's window more that are not) and the reply queue's unacked count
    follows the journal, far from the prefetch. Before the byte cap the journal kept
    every one of these replies (up to 256 of them, ~98 MB) unacked at the broker."""
    n, window = 80, 4  # 30.7 MB each way; four times the byte cap
    fmt = AudioFormat(Encoding.PCM_F32LE, 48000, 2)
    assert fmt.bytes_for_ms(1000) == LARGEST_CHUNK_BYTES
    rng = np.random.default_rng(12)
    data = [rng.standard_normal(LARGEST_CHUNK_BYTES // 4).astype(np.float32).tobytes()
            for _ in range(n)]
    kw: dict[str, object] = {"memory_broker": memory_broker} if transport_kind == "memory" else {}
    async with make_server(**kw) as srv, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url, ssl=tls.client, max_msg_size=1 << 20)
        # v1, no ack; a long deadline, so a loaded machine cannot pass for a stall.
        await ws.send_str(start_json(srv.api_key, fmt, ["passthrough"], deadline_ms=30_000))
        assert (await read_json(ws))["type"] == "ready"
        [conn] = list(srv.gateway.connections)
        pipe = conn.pipeline
        assert pipe is not None
        peak_written = peak_total = longest = 0

        def sample() -> None:
            """Journal bytes: replies already written, and all of them."""
            nonlocal peak_written, peak_total, longest
            journal = pipe.journal
            held = [(e.end <= journal.written, len(e.reply.audio)) for e in journal]
            peak_written = max(peak_written, sum(b for w, b in held if w))
            peak_total = max(peak_total, sum(b for _, b in held))
            longest = max(longest, len(held))

        got: list[bytes] = []
        others: list[object] = []
        sent = 0
        while len(got) < n:
            while sent < n and sent - len(got) < window:
                await ws.send_bytes(data[sent])
                sent += 1
                sample()
            msg = await ws.receive(timeout=60)
            if msg.type is aiohttp.WSMsgType.BINARY:
                got.append(msg.data)  # v1: the audio itself
            elif msg.type is aiohttp.WSMsgType.TEXT:
                kind = json.loads(msg.data)["type"]
                if kind != "token":  # a refreshed resume token is expected; nothing else
                    others.append(json.loads(msg.data))
            else:
                pytest.fail(f"closed after {len(got)} chunks: {msg}")
            sample()
        if transport_kind == "memory":
            unacked = memory_broker.unacked(pipe.reply_queue)
        else:
            unacked = await asyncio.to_thread(rabbit_unacked, pipe.reply_queue)
        in_journal = len(pipe.journal)
        await ws.send_str('{"type":"stop"}')
        summary = await read_json(ws)
        assert (await ws.receive(timeout=30)).type is aiohttp.WSMsgType.CLOSE
        await ws.close()
    print(f"journal peak: {peak_written} B written + unwritten = {peak_total} B, "
          f"{longest} replies; reply queue unacked {unacked} at the end")
    assert others == []  # no notice: nothing expired, nothing dropped
    assert got == data  # bit-exact passthrough, in order
    assert summary["type"] == "summary" and summary["dropped"] == 0, summary
    assert peak_written <= JOURNAL_BYTES, peak_written
    assert peak_total <= JOURNAL_BYTES + window * LARGEST_CHUNK_BYTES, peak_total
    assert unacked <= in_journal + window, (unacked, in_journal)
