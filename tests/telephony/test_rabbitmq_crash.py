"""Calls through RabbitMQ while a worker is SIGKILLed mid-call lose no frame."""

from __future__ import annotations

import asyncio
import signal

import pytest

from audiostream.gateway.telephony import TELEPHONY_KEY, TelephonySettings
from tests.integration.test_worker_crash import signal_mid_batch, slowpass_cluster
from tests.telephony.conftest import distinct_frames
from tests.telephony.simulator import AsteriskSim, MediaStreamSim

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


async def test_worker_sigkill_mid_call(rabbitmq_url: str) -> None:
    frames = distinct_frames(100, seed=31)  # a 2 s call
    async with slowpass_cluster(rabbitmq_url) as (srv, (victim, _survivor)):
        u = srv.url.replace("/v1/stream", "/v1/telephony/twilio")
        params = {"api_key": srv.api_key, "pipeline": "slowpass", "deadline_ms": "8000"}
        async with MediaStreamSim(u, params=params) as sim:
            await sim.start()
            call = asyncio.create_task(sim.play_call(frames))
            await signal_mid_batch(victim, signal.SIGKILL)
            await call
            assert await sim.wait_until(lambda: sim.media_messages >= len(frames), within=60)
            await sim.stop()
        assert await victim.wait() == -signal.SIGKILL
    assert sim.media() == frames
    assert {h.stream for h in sim.heard} == {sim.stream_sid}
    assert not [h for h in sim.heard if h.kind == "mark"]  # no drop marks


async def test_asterisk_worker_sigkill_mid_call(rabbitmq_url: str) -> None:
    frames = distinct_frames(100, seed=32)
    async with slowpass_cluster(rabbitmq_url) as (srv, (victim, _survivor)):
        srv.runner.app[TELEPHONY_KEY].settings = TelephonySettings(
            default_pipeline=("slowpass",), deadline_ms=8000)
        u = srv.url.replace("/v1/stream", "/v1/telephony/asterisk")
        async with AsteriskSim(u, srv.api_key) as sim:
            await sim.start()
            call = asyncio.create_task(sim.play_call(frames))
            await signal_mid_batch(victim, signal.SIGKILL)
            await call
            assert await sim.wait_until(lambda: len(sim.received) >= len(frames), within=60)
        assert await victim.wait() == -signal.SIGKILL
    assert sim.received == frames
