"""SDK pacing against the real RabbitMQ transport: a backlog (after a late start or a
reconnect) goes out within credit or at the advertised rate, never as a burst that the
gateway's rate limiter (default 120 chunks/s, burst 60) answers with ``rate_limited``."""

from __future__ import annotations

import asyncio
import itertools
import signal
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from audiostream.audio import AudioFormat
from audiostream.client import Audio, AudioStreamClient, Item, Notice, ReconnectPolicy
from audiostream.client import _Pacer as Pacer
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings, create_key
from audiostream.processors import registry
from audiostream.testing import embedded_server, eventually
from audiostream.topology import Topology
from tests.client.conftest import ScriptedV1
from tests.conftest import delete_prefixed, unique_prefix
from tests.gateway.conftest import TcpProxy
from tests.integration.test_gateway_crash import gateway, spawn

FMT = AudioFormat.pcm16(16000)
CHUNK = 320 * 2


def test_v1_pacer_never_saves_up_a_burst() -> None:
    pacer = Pacer(100.0)
    waits = [pacer.delay() for _ in range(50)]
    # Called back to back, each chunk waits one interval more than the last: evenly spaced.
    assert waits[0] == 0.0
    assert all(b - a == pytest.approx(0.01, abs=2e-3) for a, b in itertools.pairwise(waits))


def signal_of(n: int) -> np.ndarray:
    return (np.random.default_rng(n).standard_normal(320 * n) * 3000).astype(np.int16)


@pytest.mark.integration
@pytest.mark.rabbitmq
@pytest.mark.timeout(180)
async def test_session_started_during_a_broker_outage_gets_no_rate_limited(
    rabbitmq_url: str,
) -> None:
    parts = urlsplit(rabbitmq_url)
    proxy = TcpProxy(parts.port or 5672, parts.hostname or "127.0.0.1")
    await proxy.start()
    broker = rabbitmq_url.replace(f":{parts.port or 5672}", f":{proxy.port}", 1)
    topology = Topology(processing_types=("passthrough",), prefix=unique_prefix())
    outage_chunks = 500  # 10 s of real-time audio captured while the broker is away
    total = outage_chunks + 100
    x = signal_of(total)
    try:
        async with embedded_server(broker_url=broker, topology=topology,
                                   processing=("passthrough",),
                                   gateway_settings=GatewaySettings()) as srv:
            proxy.refuse = True  # the broker goes away before the session starts
            proxy.cut()
            assert await eventually(lambda: not srv.gateway.transport.is_connected, within=20)

            captured: asyncio.Queue[bytes | None] = asyncio.Queue()
            produced = 0

            async def microphone() -> None:  # real-time capture, independent of the session
                nonlocal produced
                loop = asyncio.get_running_loop()
                start = loop.time()
                for i in range(total):
                    await asyncio.sleep(max(0.0, start + i * 0.02 - loop.time()))  # pacing
                    captured.put_nowait(x[i * 320:(i + 1) * 320].tobytes())
                    produced += 1
                captured.put_nowait(None)

            mic = asyncio.create_task(microphone())
            client = AudioStreamClient(
                srv.url, api_key=srv.api_key,
                reconnect=ReconnectPolicy(initial_s=0.5, max_s=1.0, max_attempts=60))
            session = client.session(["passthrough"], format=FMT)
            opening = asyncio.create_task(session.open())
            assert await eventually(lambda: produced >= outage_chunks, within=60)
            assert not opening.done()  # still refused: the broker is down
            proxy.refuse = False       # the broker is back
            await asyncio.wait_for(opening, 60)
            assert captured.qsize() >= outage_chunks  # a real backlog waits to be sent
            items: list[Item] = []

            async def read() -> None:
                async for item in session:
                    items.append(item)

            reader = asyncio.create_task(read())
            while (chunk := await captured.get()) is not None:
                await session.send(chunk)
            await session.finish()
            await reader
            await mic
            await session.close()
    finally:
        await proxy.close()
        await delete_prefixed(rabbitmq_url, topology)
    notices = [i for i in items if isinstance(i, Notice)]
    assert not [n for n in notices if n.code == ErrorCode.RATE_LIMITED]
    audio = [i for i in items if isinstance(i, Audio)]
    assert not notices and len(audio) == total
    assert b"".join(a.data for a in audio) == x.tobytes()


@pytest.mark.integration
@pytest.mark.rabbitmq
@pytest.mark.timeout(180)
async def test_sdk_whose_gateway_is_killed_gets_no_rate_limited(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    topology = Topology(processing_types=tuple(registry.names()), prefix=prefix)
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "pacing-test")
    procs: list[asyncio.subprocess.Process] = []
    try:
        worker, _ = await spawn("worker", "--broker", rabbitmq_url, "--prefix", prefix,
                                "--processing", "passthrough", ready=b"consuming")
        procs.append(worker)
        gw1, url1 = await gateway(rabbitmq_url, prefix, keys)  # default --chunk-rate 120
        gw2, url2 = await gateway(rabbitmq_url, prefix, keys)
        procs += [gw1, gw2]
        x = signal_of(250)  # 5 s
        # A slow first reconnect (1-1.5 s): a second of audio piles up meanwhile.
        client = AudioStreamClient(
            [url1, url2], api_key=key, pipeline=["passthrough"], format=FMT,
            deadline_ms=8000,
            reconnect=ReconnectPolicy(initial_s=1.25, max_s=2.0, max_attempts=20))
        answered: list[int] = []
        notices: list[Notice] = []
        client.on_audio(lambda seq, _pcm: answered.append(seq))
        client.on_notice(notices.append)
        task = asyncio.create_task(client.stream(x, rate=1.0))
        assert await eventually(lambda: len(answered) >= 40, within=30)
        gw1.send_signal(signal.SIGKILL)
        result = await asyncio.wait_for(task, 90)
        assert await gw1.wait() == -signal.SIGKILL
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await delete_prefixed(rabbitmq_url, topology)
    assert result.resumes >= 1
    assert not [n for n in notices if n.code == ErrorCode.RATE_LIMITED]
    assert not result.dropped and result.audio == x.tobytes()


async def test_v1_gateway_gets_the_sdk_at_its_advertised_rate(scripted_v1: ScriptedV1) -> None:
    client = AudioStreamClient(scripted_v1.url, api_key="as_x_y")
    async with client.session(["passthrough"], format=FMT) as s:
        for i in range(60):                 # all at once: 1.2 s of audio, a backlog
            await s.send(signal_of(1)[:320].tobytes() if i else bytes(CHUNK))
        summary = await s.finish()
    # It asked for v1.1, fell back once, and never went over 50 chunks/s (burst 10).
    assert [st.get("version") for st in scripted_v1.starts] == [1.1, 1]
    assert s.version == 1.0 and summary.chunks_in == 60 == scripted_v1.chunks
    assert scripted_v1.over_rate == 0
