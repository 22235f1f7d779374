"""Every item type, from the embedded server and from a scripted v1.1 gateway; callbacks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest

from audiostream.audio import AudioFormat
from audiostream.client import (
    Audio,
    AudioStreamClient,
    CallbackFailed,
    ErrorReport,
    Event,
    Item,
    Notice,
    Reconnected,
    SpeechEnd,
    SpeechProbability,
    SpeechStart,
    Summary,
    read_wav,
)
from audiostream.client_errors import CallbackError, SessionClosed
from audiostream.errors import ErrorCode
from audiostream.testing import Embedded, eventually, sample_wav
from tests.client.conftest import Scripted

FMT = AudioFormat.pcm16(16000)


def tone(n: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 2000).astype(np.int16)


async def test_session_send_finish_iterate_gives_audio_then_summary(server: Embedded) -> None:
    x = tone(16000)
    async with AudioStreamClient(server.url, api_key=server.api_key) as client, \
            client.session(pipeline=["passthrough"], format=FMT, chunk_ms=20) as s:
        await s.send(x)                         # an array: encoded and cut into 20 ms
        summary = await s.finish()
        items = [item async for item in s]
    audio = [i for i in items if isinstance(i, Audio)]
    assert [a.seq for a in audio] == list(range(50))
    assert b"".join(a.data for a in audio) == x.tobytes()
    assert items[-1] == summary == s.summary
    assert isinstance(summary, Summary) and summary.chunks_out == 50 and summary.dropped == 0
    assert all(a.latency_ms is not None and a.latency_ms >= 0 for a in audio)
    with pytest.raises(SessionClosed):
        await s.send(b"\x00\x00")


async def test_a_bad_chunk_becomes_a_typed_notice(server: Embedded) -> None:
    client = AudioStreamClient(server.url, api_key=server.api_key)
    async with client.session(["passthrough"], format=FMT) as s:
        for chunk in (b"\x00\x00" * 10, b"\x00\x00\x00", b"\x01\x00"):
            await s.send(chunk)
        await s.finish()
        items = [i async for i in s]
    notices = [i for i in items if isinstance(i, Notice)]
    assert [(n.seq, n.code, n.reason, n.count) for n in notices] == [
        (1, ErrorCode.INVALID_AUDIO, "invalid_audio", 1)]
    assert [i.seq for i in items if isinstance(i, Audio)] == [0, 2]


async def test_vad_events_are_typed(server: Embedded) -> None:
    samples, _ = read_wav(sample_wav())
    client = AudioStreamClient(server.url, api_key=server.api_key)
    items: list[Item] = []
    async with client.session(["vad"], format=FMT, chunk_ms=32) as s:

        async def read() -> None:
            async for item in s:              # iterate while sending: bounded memory
                items.append(item)

        reader = asyncio.create_task(read())
        await s.send(samples)
        await s.finish()
        await reader
    probs = [i for i in items if isinstance(i, SpeechProbability)]
    assert probs and all(0.0 <= p.probability <= 1.0 and p.name == "vad" for p in probs)
    assert any(isinstance(i, SpeechStart) for i in items)
    assert any(isinstance(i, SpeechEnd) for i in items)
    assert all(isinstance(i, Event) for i in items if isinstance(i, SpeechStart | SpeechEnd))


async def test_scripted_v11_gateway_gives_every_item_and_credit_is_respected(
    scripted: Scripted,
) -> None:
    client = AudioStreamClient(scripted.url, api_key="as_x_y")
    async with client.session(["passthrough"], format=FMT) as s:
        items: list[Item] = []

        async def read() -> None:
            async for item in s:
                items.append(item)

        reader = asyncio.create_task(read())
        for i in range(20):
            await s.send(tone(320, i).tobytes())
        await s.finish()
        await reader
    assert scripted.starts[0]["version"] == 1.1 and s.version == 1.1
    assert scripted.chunks == 20 and scripted.beyond_credit == 0
    assert scripted.max_outstanding <= scripted.window
    kinds = {type(i) for i in items}
    assert {Audio, Notice, ErrorReport, SpeechProbability, SpeechStart, SpeechEnd, Event,
            Summary} <= kinds
    notices = [i for i in items if isinstance(i, Notice)]
    assert notices[0].seq == 3 and notices[0].count == 2 and list(notices[0].seqs) == [3, 4]
    assert notices[0].code == ErrorCode.EXPIRED
    answered = sum(n.count for n in notices) + sum(isinstance(i, Audio) for i in items)
    assert answered == 20
    err = next(i for i in items if isinstance(i, ErrorReport))
    assert err.message == "just a warning" and not err.retryable
    custom = next(i for i in items if type(i) is Event)
    assert custom.name == "custom" and custom.data["value"] == 1


async def test_reconnected_item_after_a_network_blip(server: Embedded) -> None:
    from tests.gateway.conftest import TcpProxy

    port = int(server.url.split(":")[2].split("/")[0])
    proxy = TcpProxy(port)
    await proxy.start()
    from audiostream.client import ReconnectPolicy

    client = AudioStreamClient(f"ws://127.0.0.1:{proxy.port}/v1/stream",
                               api_key=server.api_key,
                               reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.2))
    resumed: list[Reconnected] = []
    client.on_resume(resumed.append)
    x = tone(16000 * 2)
    items: list[Item] = []
    try:
        async with client.session(["passthrough"], format=FMT, chunk_ms=20) as s:

            async def read() -> None:
                async for item in s:
                    items.append(item)
                    if isinstance(item, Audio) and item.seq == 30:
                        proxy.cut()  # the network drops mid-session

            reader = asyncio.create_task(read())
            await s.send(x)
            await s.finish()
            await reader
    finally:
        await proxy.close()
    rec = [i for i in items if isinstance(i, Reconnected)]
    assert rec and rec == resumed and rec[0].session_id == s.session_id
    audio = [i for i in items if isinstance(i, Audio)]
    assert [a.seq for a in audio] == list(range(100))
    assert b"".join(a.data for a in audio) == x.tobytes()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_callbacks_sync_and_async_all_run_in_order(server: Embedded, kind: str) -> None:
    client = AudioStreamClient(server.url, api_key=server.api_key, pipeline=["passthrough"],
                               format=FMT)
    seen: list[int] = []
    closed: list[Any] = []
    connected: list[Any] = []
    if kind == "sync":
        client.on_audio(lambda seq, _pcm: seen.append(seq))
        client.on_close(closed.append)
        client.on_connect(connected.append)
    else:
        async def on_audio(seq: int, _pcm: bytes) -> None:
            await asyncio.sleep(0)
            seen.append(seq)

        async def on_close(info: Any) -> None:
            closed.append(info)

        async def on_connect(info: Any) -> None:
            connected.append(info)

        client.on_audio(on_audio)
        client.on_close(on_close)
        client.on_connect(on_connect)
    result = await client.stream(tone(3200), rate=None)
    assert seen == list(range(10)) and result.chunks == 10
    assert len(closed) == 1 and closed[0].code == 1000
    assert len(connected) == 1 and connected[0].session_id == result.session_id


async def test_a_raising_callback_is_reported_not_fatal(
    server: Embedded, caplog: pytest.LogCaptureFixture
) -> None:
    client = AudioStreamClient(server.url, api_key=server.api_key)

    def boom(seq: int, _pcm: bytes) -> None:
        if seq == 2:
            raise ValueError("user bug")

    client.on_audio(boom)
    with caplog.at_level(logging.ERROR, logger="audiostream.client"):
        async with client.session(["passthrough"], format=FMT) as s:
            for i in range(5):
                await s.send(tone(320, i).tobytes())
            await s.finish()
            items = [i async for i in s]
    failed = [i for i in items if isinstance(i, CallbackFailed)]
    assert len(failed) == 1 and isinstance(failed[0].error, ValueError)
    assert isinstance(failed[0].item, Audio) and failed[0].item.seq == 2
    assert sum(isinstance(i, Audio) for i in items) == 5  # the session went on
    assert any("raised" in r.message for r in caplog.records)


async def test_a_raising_callback_ends_the_session_when_asked(server: Embedded) -> None:
    client = AudioStreamClient(server.url, api_key=server.api_key, pipeline=["passthrough"],
                               format=FMT, raise_callback_errors=True)

    async def boom(_item: Any) -> None:
        raise RuntimeError("stop here")

    client.on_notice(boom)
    with pytest.raises(CallbackError, match="stop here"):
        await client.stream([b"\x00\x00" * 10, b"\x00"], rate=None)


async def test_logging_is_silent_by_default() -> None:
    lg = logging.getLogger("audiostream.client")
    assert any(isinstance(h, logging.NullHandler) for h in lg.handlers)


async def test_leaving_the_client_closes_its_open_sessions(server: Embedded) -> None:
    closed: list[Any] = []
    async with AudioStreamClient(server.url, api_key=server.api_key) as client:
        client.on_close(closed.append)
        s = client.session(["passthrough"], format=FMT)
        await s.open()
        await s.send(tone(320).tobytes())
    assert len(closed) == 1 and closed[0].reason == "closed"
    assert await eventually(lambda: not server.gateway.connections)  # the socket is closed
    with pytest.raises(SessionClosed):
        await s.send(tone(320).tobytes())
