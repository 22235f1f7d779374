"""Hole 13: the TCP connection to RabbitMQ is up but no bytes move.

A TCP hop between the gateway and the real broker stops forwarding (both ways, nothing
closed). ``/readyz`` must turn 503 and a new session must get ``broker_unavailable``
(4091) within the documented bound (``broker_probe_s + broker_stall_s`` = 3 s by
default), instead of hanging with neither ``ready`` nor an error. When bytes move
again, readiness and sessions come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from typing import Any

import aiohttp
import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ErrorCode, TransportError
from audiostream.gateway import GatewaySettings
from audiostream.gateway.watchdog import BrokerWatchdog, Silence
from audiostream.protocol import start_json
from audiostream.testing import Embedded, embedded_server, eventually
from audiostream.topology import Topology
from audiostream.transport.rabbitmq import RabbitTransport
from tests.conftest import delete_prefixed, unique_prefix
from tests.gateway.conftest import TLS
from tests.policy.conftest import StallingProxy

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
DEFAULTS = GatewaySettings()
#: The documented bound: a stall is noticed one probe period plus the stall threshold
#: after it begins; the receive timeouts below allow generous slack over it.
BOUND_S = DEFAULTS.broker_probe_s + DEFAULTS.broker_stall_s


async def readyz(http: aiohttp.ClientSession, srv: Embedded, tls: TLS) -> tuple[int, Any]:
    async with http.get(f"{srv.ops_url}/readyz") as r:
        return r.status, await r.json()


async def try_start(http: aiohttp.ClientSession, srv: Embedded, tls: TLS,
                    within: float) -> tuple[dict[str, Any], int | None, float]:
    """Send ``start``; return the first message, the close code (if closed) and the
    seconds from ``start`` to that message."""
    async with http.ws_connect(srv.url, ssl=tls.client) as ws:
        sent = time.monotonic()
        await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
        msg = await ws.receive(timeout=within)
        took = time.monotonic() - sent
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        first = json.loads(msg.data)
        if first["type"] == "ready":
            await ws.send_bytes(np.ones(320, np.int16).tobytes())
            echo = await ws.receive(timeout=within)
            assert echo.type is aiohttp.WSMsgType.BINARY, echo
            return first, None, took
        closing = await ws.receive(timeout=within)
        code = int(closing.data) if closing.type is aiohttp.WSMsgType.CLOSE else ws.close_code
        return first, code, took


@pytest.mark.integration
@pytest.mark.rabbitmq
async def test_a_stalled_broker_fails_readiness_and_refuses_starts(
    rabbitmq_url: str, stalling_proxy: StallingProxy, tls: TLS,
    caplog: pytest.LogCaptureFixture
) -> None:
    topo = Topology(processing_types=("passthrough",), prefix=unique_prefix())
    settings = GatewaySettings(chunk_rate=None)  # watchdog defaults
    try:
        async with embedded_server(broker_url=stalling_proxy.url(rabbitmq_url), topology=topo,
                                   gateway_settings=settings, ssl_context=tls.server) as srv, \
                aiohttp.ClientSession() as http:
            assert (await readyz(http, srv, tls))[0] == 200
            first, _, _ = await try_start(http, srv, tls, within=20)
            assert first["type"] == "ready"

            stalling_proxy.pause()
            paused_at = time.monotonic()
            # A start sent the moment the broker hangs: refused once the stall is seen.
            err, code, took = await try_start(http, srv, tls, within=BOUND_S + 10)
            assert err["code"] == ErrorCode.BROKER_UNAVAILABLE and err["retryable"], err
            assert code == ErrorCode.BROKER_UNAVAILABLE
            print(f"start during the stall: 4091 after {took:.2f} s")

            async def unready() -> bool:
                return (await readyz(http, srv, tls))[0] == 503

            assert await eventually(unready, within=BOUND_S + 10)
            print(f"/readyz 503 {time.monotonic() - paused_at:.2f} s after the stall began")
            status, body = await readyz(http, srv, tls)
            assert status == 503 and body["broker_connected"] and not body["broker_responsive"]
            # Once the stall is known, starts are refused without touching the broker.
            err, code, took = await try_start(http, srv, tls, within=BOUND_S + 10)
            assert err["code"] == ErrorCode.BROKER_UNAVAILABLE and code == err["code"]
            print(f"start after detection: 4091 after {took:.3f} s")
            assert srv.gateway.watchdog.stalls == 1

            stalling_proxy.resume()

            async def ready() -> bool:
                return (await readyz(http, srv, tls))[0] == 200

            assert await eventually(ready, within=40)
            first, _, _ = await try_start(http, srv, tls, within=20)
            assert first["type"] == "ready"
            # The refusals are in the log too, throttled (two within 10 s: one line).
            refused = [r.getMessage() for r in caplog.records
                       if "refused a start with broker_unavailable" in r.getMessage()]
            assert 1 <= len(refused) <= 2 and "not responding" in refused[0], refused
    finally:
        await delete_prefixed(rabbitmq_url, topo)


# -- the watchdog on its own, with a probe the test controls ---------------------------

async def test_watchdog_marks_a_hanging_probe_and_recovers() -> None:
    answer = asyncio.Event()
    answer.set()
    calls = 0

    async def probe() -> None:
        nonlocal calls
        calls += 1
        await answer.wait()

    dog = BrokerWatchdog(probe, interval_s=0.01, stall_after_s=0.1, start_timeout_s=30)
    dog.start()
    try:
        assert await eventually(lambda: calls >= 3) and dog.healthy
        answer.clear()  # the broker hangs
        hang = asyncio.Event()
        cleaned = asyncio.Event()
        ended: list[str] = []

        async def cleanup() -> None:
            cleaned.set()

        async def in_flight() -> None:
            try:
                await hang.wait()
                ended.append("finished")
            except asyncio.CancelledError:
                ended.append("cancelled")
                raise

        # Work in progress when the stall is detected is abandoned: the client gets its
        # answer at once, the work runs to its end (a broker request is never cancelled
        # half way) and is cleaned up after.
        with pytest.raises(TransportError) as info:
            await dog.bounded(in_flight(), cleanup=cleanup)
        assert info.value.code is ErrorCode.BROKER_UNAVAILABLE and not dog.healthy
        assert not cleaned.is_set() and ended == []
        hang.set()
        await asyncio.wait_for(cleaned.wait(), 10)
        assert ended == ["finished"]
        # Known stall: refused at once, the work never runs.
        ran = False

        async def work() -> None:
            nonlocal ran
            ran = True

        with pytest.raises(TransportError):
            await dog.bounded(work())
        assert not ran
        answer.set()  # bytes move again
        assert await eventually(lambda: dog.healthy)
        assert await dog.bounded(asyncio.sleep(0, "done")) == "done"
        assert dog.stalls == 1
    finally:
        await dog.close()


async def test_start_timeout_bounds_slow_work_without_a_stall() -> None:
    async def probe() -> None:
        return None

    dog = BrokerWatchdog(probe, interval_s=0, stall_after_s=1, start_timeout_s=0.05)
    never = asyncio.Event()
    with pytest.raises(TransportError, match=r"no answer within 0\.05 s"):
        await dog.bounded(never.wait())
    assert dog.healthy and dog.refused == 1
    # A failing start's clean-up runs too; the error is the work's own.
    cleaned = asyncio.Event()

    async def cleanup() -> None:
        cleaned.set()

    async def fails() -> None:
        raise TransportError("declare refused")

    with pytest.raises(TransportError, match="declare refused"):
        await dog.bounded(fails(), cleanup=cleanup)
    await asyncio.wait_for(cleaned.wait(), 10)
    await dog.close()


# -- lateness of our own loop is not broker silence ----------------------------------------

def test_silence_counts_a_late_tick_as_one_tick() -> None:
    s = Silence(tick_s=0.1)
    assert s.observe(100.0, progress=7, owed=True) == 0.0
    # A loop 5 s late: the tick is credited 0.1 s, not 5 s.
    assert s.observe(105.0, progress=7, owed=True) == pytest.approx(0.1)
    assert s.observe(111.0, progress=7, owed=True) == pytest.approx(0.2)
    assert s.clock == pytest.approx(0.2)
    # Timely ticks add up in full (up to tick_s each).
    now = 111.0
    for _ in range(8):
        now += 0.1
        s.observe(now, progress=7, owed=True)
    assert s.seconds == pytest.approx(1.0)
    # Any answer from the broker ends the silence; so does owing nothing.
    assert s.observe(now + 0.1, progress=8, owed=True) == 0.0
    assert s.observe(now + 0.2, progress=8, owed=True) == pytest.approx(0.1)
    assert s.observe(now + 0.3, progress=8, owed=False) == 0.0
    # A clock going backwards credits nothing.
    assert s.observe(now, progress=8, owed=True) == 0.0


async def test_a_late_loop_with_a_silent_broker_needs_many_ticks() -> None:
    """Injected clock: every tick comes 3 s late, the broker never answers. The stall is
    declared after ``stall_after_s / tick_s`` ticks, not at the first late one."""
    now = 0.0

    def late() -> float:
        nonlocal now
        now += 3.0
        return now

    async def probe() -> None:
        await asyncio.Event().wait()

    dog = BrokerWatchdog(probe, progress=lambda: 0, stall_after_s=1.0, tick_s=0.1, clock=late)
    dog._owed = True  # a probe is outstanding (as while ``_probe_once`` waits)
    ticks = 0
    while dog.healthy:
        dog.tick()
        ticks += 1
    # The first tick only starts the clock; then ten late ticks of 0.1 s each.
    assert ticks == 11 and dog.stalls == 1
    assert "no answer from the broker" in dog.reason


async def test_an_answering_broker_is_never_stalled_however_slow_the_probe() -> None:
    """An overloaded gateway reads the probe's answer late, behind a backlog of
    deliveries and confirms: those are answers too, so there is no stall, and when
    they stop while the probe is still owed, there is."""
    answers = itertools.count()
    flowing = True

    def progress() -> int:
        return next(answers) if flowing else -1

    async def probe() -> None:
        await asyncio.Event().wait()  # the probe's answer never gets read

    dog = BrokerWatchdog(probe, progress=progress, interval_s=0.01, stall_after_s=0.1,
                         tick_s=0.005)
    dog.start()
    try:
        assert await eventually(lambda: dog.silence.clock > 1.0)  # ten stall periods
        assert dog.healthy and dog.stalls == 0
        flowing = False
        assert await eventually(lambda: not dog.healthy)
        assert dog.stalls == 1
        flowing = True
        assert await eventually(lambda: dog.healthy)  # any answer ends the stall
    finally:
        await dog.close()


@pytest.mark.integration
@pytest.mark.rabbitmq
async def test_a_starved_loop_with_a_healthy_broker_refuses_nothing(rabbitmq_url: str) -> None:
    """The event loop is blocked for twice ``stall_after_s`` (a gateway starved of CPU)
    while a start's broker work and a probe are under way on a healthy broker: the start
    completes and no stall is declared. (The first watchdog timed the probe by the wall
    clock: it declared a stall and refused the start with broker_unavailable.)"""
    topo = Topology(processing_types=("passthrough",), prefix=unique_prefix())
    transport = RabbitTransport(rabbitmq_url, topo)
    await transport.connect()
    loop = asyncio.get_running_loop()
    probes = 0
    starved = asyncio.Event()

    def starve() -> None:
        time.sleep(2.0)  # the whole loop stops: nothing is read, no timer fires
        starved.set()

    async def probe() -> int:
        nonlocal probes
        probes += 1
        if probes == 3:
            loop.call_soon(starve)  # once the probe's first request is on its way
        return await transport.work_queue_depth("passthrough")

    dog = BrokerWatchdog(probe, interval_s=0.05, stall_after_s=1.0, start_timeout_s=30)
    try:
        await transport.declare()
        dog.start()
        queue = f"{topo.prefix}.reply.starved"

        async def start_work() -> bool:
            """A start's broker work: the loop starves half way through it."""
            await transport.declare_reply_queue(queue)
            await starved.wait()
            return await transport.reply_queue_exists(queue)

        assert await dog.bounded(start_work())
        assert await eventually(lambda: probes >= 6)  # probes answered after the starving
        assert dog.healthy and dog.stalls == 0 and dog.refused == 0
    finally:
        await dog.close()
        with contextlib.suppress(TransportError):
            await transport.delete_reply_queue(f"{topo.prefix}.reply.starved")
        await transport.close()
        await delete_prefixed(rabbitmq_url, topo)


async def test_a_start_past_its_timeout_waits_on_while_the_broker_answers() -> None:
    """A start still running at ``start_timeout_s`` while the broker keeps answering
    is held up by our own busy gateway, not by the broker: it is not refused. With a
    silent broker it is refused at ``start_timeout_s``."""
    flowing = True
    answers = itertools.count()

    def progress() -> int:
        return next(answers) if flowing else -1

    async def probe() -> None:
        await asyncio.Event().wait()

    dog = BrokerWatchdog(probe, progress=progress, interval_s=0.01, stall_after_s=1.0,
                         start_timeout_s=0.1, tick_s=0.005)
    dog.start()
    try:
        async def slow_start() -> str:
            began = dog.silence.clock
            assert await eventually(lambda: dog.silence.clock > began + 0.2)
            return "ready"

        assert await dog.bounded(slow_start()) == "ready"
        assert dog.refused == 0
        flowing = False
        assert await eventually(lambda: dog.silence.quiet >= 1.0)
        with pytest.raises(TransportError, match=r"no answer within 0\.1 s|no answer from"):
            await dog.bounded(asyncio.Event().wait())
        assert dog.refused == 1
    finally:
        await dog.close()
