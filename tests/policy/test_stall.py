"""Hole 13: the TCP connection to RabbitMQ is up but no bytes move.

A TCP hop between the gateway and the real broker stops forwarding (both ways, nothing
closed). ``/readyz`` must turn 503 and a new session must get ``broker_unavailable``
(4091) within the documented bound (``broker_probe_s + broker_stall_s`` = 3 s by
default), instead of hanging with neither ``ready`` nor an error. When bytes move
again, readiness and sessions come back.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ErrorCode, TransportError
from audiostream.gateway import GatewaySettings
from audiostream.gateway.watchdog import BrokerWatchdog
from audiostream.protocol import start_json
from audiostream.testing import Embedded, embedded_server, eventually
from audiostream.topology import Topology
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
    rabbitmq_url: str, stalling_proxy: StallingProxy, tls: TLS
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

        async def cleanup() -> None:
            cleaned.set()

        # Work in progress when the stall is detected is abandoned and cleaned up.
        with pytest.raises(TransportError) as info:
            await dog.bounded(hang.wait(), cleanup=cleanup)
        assert info.value.code is ErrorCode.BROKER_UNAVAILABLE and not dog.healthy
        await asyncio.wait_for(cleaned.wait(), 10)
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
