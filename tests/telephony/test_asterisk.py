"""A simulated Asterisk chan_websocket call: order, XOFF/XON, the 65,500-byte limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import pytest
from pesq import pesq

from audiostream.gateway.telephony import TELEPHONY_KEY, TelephonySettings
from audiostream.testing import Embedded, embedded_server
from tests.telephony.conftest import distinct_frames, from_mulaw, mulaw_frames, noisy
from tests.telephony.simulator import ASTERISK_LIMIT, AsteriskSim

pytestmark = pytest.mark.integration


@pytest.fixture
async def srv() -> AsyncIterator[Embedded]:
    async with embedded_server() as s:
        s.runner.app[TELEPHONY_KEY].settings = TelephonySettings(
            default_pipeline=("passthrough",))
        yield s


def url(srv: Embedded) -> str:
    return srv.url.replace("/v1/stream", "/v1/telephony/asterisk")


@pytest.mark.parametrize("json_control", [False, True])
async def test_every_frame_back_in_order(srv: Embedded, json_control: bool) -> None:
    frames = distinct_frames(50, seed=21)
    async with AsteriskSim(url(srv), srv.api_key, json_control=json_control) as sim:
        await sim.start()
        for f in frames:
            await sim.send_audio(f)
        assert await sim.wait_until(lambda: len(sim.received) >= len(frames))
    assert sim.received == frames
    assert sim.oversized == 0


async def test_xoff_holds_output_until_xon(srv: Embedded) -> None:
    frames = distinct_frames(80, seed=22)
    async with AsteriskSim(url(srv), srv.api_key, xoff_at=20, xon_at=10) as sim:
        sim.playing = False  # the channel stalls: its queue fills
        await sim.start()
        for f in frames:
            await sim.send_audio(f)
        assert await sim.wait_until(lambda: sim.xoff_sent == 1)
        held_at = len(sim.received)
        # Nothing more comes while XOFF is in force, however long we wait for the rest
        # of the call to be processed (the gateway holds it).
        assert not await sim.wait_until(lambda: len(sim.received) >= len(frames),
                                    within=1.5)
        # At most what was in flight: the 200 ms lead (10 frames) after a stall, on a busy
        # machine; without XOFF handling the other ~60 would follow.
        assert sim.after_xoff <= 10, sim.after_xoff
        sim.playing = True
        assert await sim.wait_until(lambda: len(sim.received) >= len(frames))
    assert held_at < len(frames)
    assert sim.xon_sent >= 1
    assert sim.received == frames
    assert sim.max_queue_frames <= 20 + 10


async def test_no_message_over_65500_bytes(srv: Embedded) -> None:
    x = (np.random.default_rng(23).standard_normal(50_000) * 2000).astype("<i2")
    big = x.tobytes()  # 100,000 bytes in one message (6.25 s of slin)
    async with AsteriskSim(url(srv), srv.api_key, codec="slin", frame_bytes=320,
                           xoff_at=10_000, xon_at=9_000) as sim:
        await sim.start()
        await sim.send_audio(big)
        assert await sim.wait_until(lambda: len(sim.audio()) >= len(big))
    assert sim.oversized == 0
    assert max(len(m) for m in sim.received) <= ASTERISK_LIMIT
    assert len(sim.received) == 2
    assert sim.audio() == big


async def test_refused_without_credentials(srv: Embedded) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await http.ws_connect(url(srv))
        assert exc.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await http.ws_connect(url(srv), headers={
                "Authorization": aiohttp.encode_basic_auth("asterisk", "as_x_y")})
        assert exc.value.status == 401


async def test_denoise_improves_pesq(srv: Embedded, speech_8k: np.ndarray) -> None:
    # a quality test: a deadline no stall of this shared machine can reach
    srv.runner.app[TELEPHONY_KEY].settings = TelephonySettings(default_pipeline=("denoise",),
                                                               deadline_ms=30_000)
    frames = mulaw_frames(noisy(speech_8k, 5.0))
    async with AsteriskSim(url(srv), srv.api_key) as sim:
        await sim.start()
        await sim.play_call(frames)
        assert await sim.wait_until(lambda: len(sim.received) >= len(frames), within=60)
    assert len(sim.received) == len(frames)
    before = pesq(8000, speech_8k, from_mulaw(b"".join(frames)), "nb")
    after = pesq(8000, speech_8k, from_mulaw(sim.audio()), "nb")
    print(f"PESQ-NB noisy {before:.2f} -> denoised {after:.2f}")
    assert after > before + 0.2, (before, after)
