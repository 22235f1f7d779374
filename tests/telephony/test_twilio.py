"""A simulated Twilio call (and Telnyx / Exotel variants) through the real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from pesq import pesq

from audiostream.errors import ErrorCode
from audiostream.gateway import create_key
from audiostream.gateway.keys import revoke_key
from audiostream.gateway.telephony import TELEPHONY_KEY, TelephonySettings, twilio_signature
from audiostream.testing import Embedded, embedded_server
from audiostream.topology import Topology
from tests.conftest import delete_prefixed
from tests.telephony.conftest import distinct_frames, from_mulaw, mulaw_frames, noisy
from tests.telephony.simulator import MediaStreamSim

pytestmark = pytest.mark.integration
SID = "MZ0123456789abcdef0123456789abcdef"


@pytest.fixture
async def srv() -> AsyncIterator[Embedded]:
    async with embedded_server() as s:
        yield s


def url(srv: Embedded, platform: str) -> str:
    return srv.url.replace("/v1/stream", f"/v1/telephony/{platform}")


def params(srv: Embedded, pipeline: str = "passthrough", **extra: str) -> dict[str, str]:
    return {"api_key": srv.api_key, "pipeline": pipeline, **extra}


#: For tests of order and accounting that play a call on the 20 ms clock: budgets wide
#: enough that a stall of this shared machine cannot turn into real-time drops (which
#: test_backlog_beyond_real_time_is_dropped_oldest_first covers with the defaults).
STEADY = {"deadline_ms": "10000", "max_queue_ms": "5000"}


async def test_every_frame_gets_one_frame_back_in_order(srv: Embedded) -> None:
    frames = distinct_frames(100)
    async with MediaStreamSim(url(srv, "twilio"), params=params(srv, **STEADY)) as sim:
        await sim.start()
        await sim.play_call(frames)
        assert await sim.wait_until(lambda: sim.media_messages >= len(frames))
        await sim.stop()
    media = [h for h in sim.heard if h.kind == "media"]
    assert [m.payload for m in media] == frames  # exactly one each, in order, intact
    assert {m.stream for m in sim.heard} == {SID}
    # Never faster than real time: Twilio's buffer holds at most the pacing lead.
    # Never faster than real time: the pacing lead (100 ms), plus up to 200 ms for a
    # simulator that read late and then all at once on a busy machine.
    assert sim.max_buffered_s <= 0.1 + 0.2, sim.max_buffered_s


async def test_marks_echo_after_the_audio_they_follow(srv: Embedded) -> None:
    frames = distinct_frames(30, seed=2)
    async with MediaStreamSim(url(srv, "twilio"), params=params(srv, **STEADY)) as sim:
        await sim.start()
        await sim.play_call(frames, marks_after={i: f"after-{i}" for i in (4, 17, 29)})
        assert await sim.wait_until(lambda: len(sim.played_marks) == 3)
        await sim.stop()
    order = [h.name if h.kind == "mark" else "m" for h in sim.heard]
    assert order == ["m"] * 5 + ["after-4"] + ["m"] * 13 + ["after-17"] + ["m"] * 12 \
        + ["after-29"]
    # The simulated Twilio heard them played in that order too.
    assert [m for m in sim.played_marks if m.startswith("after")] == \
        ["after-4", "after-17", "after-29"]


async def test_clear_empties_what_is_queued(srv: Embedded) -> None:
    frames = distinct_frames(40, seed=4)
    async with MediaStreamSim(url(srv, "twilio"), params=params(srv, **STEADY)) as sim:
        await sim.start()
        for frame in frames[:15]:  # a burst: 300 ms at once, paced out at 20 ms
            await sim.send_media(frame)
        await sim.send_mark("before-clear")
        assert await sim.wait_until(lambda: sim.media_messages >= 3)
        await sim.send_clear()
        assert await sim.wait_until(lambda: any(h.kind == "clear" for h in sim.heard))
        await sim.play_call(frames[15:])
        assert await sim.wait_until(lambda: sim.media() and sim.media()[-1] == frames[-1])
        await sim.stop()
    kinds = [h.kind for h in sim.heard]
    at_clear = kinds.index("clear")
    before = [h.payload for h in sim.heard[:at_clear] if h.kind == "media"]
    after = [h.payload for h in sim.heard[at_clear:] if h.kind == "media"]
    assert before == frames[: len(before)] and len(before) < 15
    assert after == frames[15:]  # nothing queued before the clear came out after it
    marks = [h.name for h in sim.heard[at_clear:] if h.kind == "mark"]
    # The cleared frames are accounted for by one drop mark, and the pending mark is echoed.
    assert marks[0] == f"audiostream:cleared:{len(before)}-14"
    assert "before-clear" in marks
    dropped = srv.gateway.metrics_registry.get_sample_value(
        "audiostream_chunks_dropped_total", {"reason": "cleared"})
    assert dropped == 15 - len(before)


async def test_telnyx_frames_out_of_order_are_put_back(srv: Embedded) -> None:
    frames = distinct_frames(40, seed=5)
    async with MediaStreamSim(url(srv, "telnyx"), platform="telnyx",
                              params=params(srv, **STEADY)) as sim:
        await sim.start()
        msgs = [sim.media_message(f) for f in frames]
        rng = random.Random(7)
        for i in range(0, len(msgs), 4):  # shuffle within windows of 4
            window = msgs[i : i + 4]
            rng.shuffle(window)
            msgs[i : i + 4] = window
        await sim.play_call(msgs)
        assert await sim.wait_until(lambda: sim.media_messages >= len(frames))
        await sim.stop()
    assert sim.media() == frames
    assert {h.stream for h in sim.heard} == {SID}


async def test_exotel_pcm_messages_are_100ms_multiples_of_320(srv: Embedded) -> None:
    x = (np.random.default_rng(8).standard_normal(8000 * 2) * 3000).astype("<i2")
    data = x.tobytes()
    frames = [data[i : i + 320] for i in range(0, len(data), 320)]
    async with MediaStreamSim(url(srv, "exotel"), platform="exotel", params=params(srv, **STEADY),
                              bytes_per_second=16000) as sim:
        await sim.start()
        await sim.play_call(frames)
        assert await sim.wait_until(lambda: sum(map(len, sim.media())) >= len(data))
        await sim.stop()
    sizes = [len(p) for p in sim.media()]
    assert all(3200 <= s <= 100_000 and s % 320 == 0 for s in sizes), sizes
    assert b"".join(sim.media()) == data
    assert sim.max_buffered_s <= 0.25 + 0.2


async def test_backlog_beyond_real_time_is_dropped_oldest_first(srv: Embedded) -> None:
    frames = distinct_frames(60, seed=6)
    async with MediaStreamSim(url(srv, "twilio"), params=params(srv)) as sim:
        await sim.start()
        for frame in frames:  # 1.2 s at once: more than can be played in time
            await sim.send_media(frame)
        await sim.send_mark("end")
        assert await sim.wait_until(lambda: "end" in sim.played_marks)
        await sim.stop()
    got = sim.media()
    drops = [h.name for h in sim.heard if h.kind == "mark" and ":behind" in h.name]
    assert drops and got[-1] == frames[-1]
    dropped = 0
    for name in drops:  # audiostream:drop:A-B:behind
        a, b = name.split(":")[2].split("-")
        dropped += int(b) - int(a) + 1
    assert len(got) + dropped == len(frames)
    assert sim.max_buffered_s <= 0.1 + 0.2  # 1.2 s came at once


async def test_denoise_improves_pesq(srv: Embedded, speech_8k: np.ndarray) -> None:
    dirty = noisy(speech_8k, 5.0)
    frames = mulaw_frames(dirty)
    # A quality test, not a pacing test: a generous deadline and queue so that a stall of
    # this shared machine cannot turn into real-time drops (the drop tests cover those).
    lenient = params(srv, "denoise", deadline_ms="30000", max_queue_ms="5000")
    async with MediaStreamSim(url(srv, "twilio"), params=lenient) as sim:
        await sim.start()
        await sim.play_call(frames)
        assert await sim.wait_until(lambda: sim.media_messages >= len(frames), within=60)
        await sim.stop()
    assert len(sim.media()) == len(frames)
    out = from_mulaw(b"".join(sim.media()))
    before = pesq(8000, speech_8k, from_mulaw(b"".join(frames)), "nb")
    after = pesq(8000, speech_8k, out, "nb")
    print(f"PESQ-NB noisy {before:.2f} -> denoised {after:.2f}")
    assert after > before + 0.2, (before, after)


async def test_call_token_single_use_and_refusals(srv: Embedded) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        r = await http.post(f"{srv.http_url}/v1/telephony/tokens",
                            headers={"Authorization": f"Bearer {srv.api_key}"},
                            json={"ttl_s": 120, "pipelines": ["passthrough"]})
        assert r.status == 200
        token = (await r.json())["token"]
        r = await http.post(f"{srv.http_url}/v1/telephony/tokens", json={"ttl_s": 120})
        assert r.status == 401
        r = await http.post(f"{srv.http_url}/v1/telephony/tokens",
                            headers={"Authorization": f"Bearer {srv.api_key}"},
                            json={"ttl_s": 3600})
        assert r.status == 400
    frames = distinct_frames(5, seed=9)
    async with MediaStreamSim(url(srv, "twilio"),
                              params={"token": token, "pipeline": "passthrough"}) as sim:
        await sim.start()
        for f in frames:
            await sim.send_media(f)
        assert await sim.wait_until(lambda: sim.media_messages >= 5)
        await sim.stop()
    assert sim.media() == frames
    for p in ({"token": token, "pipeline": "passthrough"},   # used already
              {"token": token[:-2] + "xx"},                   # tampered
              {"api_key": "as_nope_nope"},                    # unknown key
              {}):                                            # nothing
        async with MediaStreamSim(url(srv, "twilio"), params=p) as sim:
            await sim.start()
            await sim.send_media(frames[0])
            assert sim.closed is not None
            code = await asyncio.wait_for(sim.closed, 10)
            assert code == 4010, (p, code)
            assert sim.media_messages == 0


async def test_twilio_signature_checked_when_configured(srv: Embedded) -> None:
    tel = srv.runner.app[TELEPHONY_KEY]
    tel.settings = TelephonySettings(twilio_auth_token="s3cret")
    u = url(srv, "twilio")
    import aiohttp

    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await http.ws_connect(u, headers={"X-Twilio-Signature": "bogus"})
        assert exc.value.status == 403
    signed = twilio_signature("s3cret", u.replace("ws://", "wss://"))
    frames = distinct_frames(3, seed=10)
    async with MediaStreamSim(u, params=params(srv),
                              headers={"X-Twilio-Signature": signed}) as sim:
        await sim.start()
        for f in frames:
            await sim.send_media(f)
        assert await sim.wait_until(lambda: sim.media_messages >= 3)
        await sim.stop()
    assert sim.media() == frames


@pytest.mark.parametrize("first, code", [
    ({"event": "media", "media": {"payload": "AAAA"}}, 4002),  # media before start
    ("not json", 4001),
])
async def test_protocol_errors_close_with_a_code(srv: Embedded, first: object, code: int) -> None:
    async with MediaStreamSim(url(srv, "twilio"), params=params(srv)) as sim:
        if isinstance(first, dict):
            await sim.send_raw(first)
        else:
            await sim.ws.send_str(str(first))
        assert sim.closed is not None
        assert await asyncio.wait_for(sim.closed, 10) == code


@pytest.mark.parametrize("bad", ["0", "999999", "soon"])
async def test_out_of_range_deadline_is_refused(srv: Embedded, bad: str) -> None:
    async with MediaStreamSim(url(srv, "twilio"), params=params(srv, deadline_ms=bad)) as sim:
        await sim.start()
        assert sim.closed is not None
        assert await asyncio.wait_for(sim.closed, 10) == 4008


async def test_dtmf_and_unknown_events_do_not_disturb_the_call(srv: Embedded) -> None:
    frames = distinct_frames(10, seed=11)
    async with MediaStreamSim(url(srv, "twilio"), params=params(srv)) as sim:
        await sim.start()
        for i, f in enumerate(frames):
            await sim.send_media(f)
            if i == 3:
                await sim.send_dtmf("7")
                await sim.send_raw({"event": "something-new", "x": 1})
        assert await sim.wait_until(lambda: sim.media_messages >= len(frames))
        await sim.stop()
    assert sim.media() == frames


async def test_exotel_short_tail_goes_out_after_stop(srv: Embedded) -> None:
    data = (np.random.default_rng(12).standard_normal(8000) * 3000).astype("<i2").tobytes()
    frames = [data[i : i + 320] for i in range(0, 320 * 23, 320)]  # 460 ms: 2 x 200 ms + 60 ms
    async with MediaStreamSim(url(srv, "exotel"), platform="exotel", params=params(srv, **STEADY),
                              bytes_per_second=16000) as sim:
        await sim.start()
        await sim.play_call(frames)
        assert await sim.wait_until(lambda: sum(map(len, sim.media())) >= 2 * 3200)
        await sim.stop()  # the last 60 ms (960 B) are under the 3.2 KB minimum: sent at the end
        assert await sim.wait_until(lambda: sum(map(len, sim.media())) >= 23 * 320)
    assert [len(p) for p in sim.media()] == [3200] * 2 + [960]
    assert b"".join(sim.media()) == b"".join(frames)


async def test_calls_count_in_the_queue_age_gauges(srv: Embedded) -> None:
    frames = distinct_frames(5, seed=13)
    async with MediaStreamSim(url(srv, "twilio"), params=params(srv)) as sim:
        await sim.start()
        await sim.send_media(frames[0])
        tel = srv.runner.app[TELEPHONY_KEY]
        assert await sim.wait_until(lambda: any(c.pipeline for c in tel.calls))
        call = next(iter(tel.calls))
        assert call.pipeline in list(srv.gateway.load.sessions())
        await sim.stop()


async def _until_closed(sims: list[MediaStreamSim], n: int, within: float = 30) -> None:
    """Until ``n`` of the calls were closed by the gateway."""
    closed = [s.closed for s in sims if s.closed is not None]
    async with asyncio.timeout(within):
        while sum(f.done() for f in closed) < n:
            await asyncio.wait([f for f in closed if not f.done()],
                               return_when=asyncio.FIRST_COMPLETED)


async def test_concurrent_calls_on_a_capped_key_start_only_its_cap(
    tmp_path: Path, transport_kind: str, topology: Topology, request: pytest.FixtureRequest
) -> None:
    """The per-key session cap holds for calls started at once: it used to be checked
    before the pipeline opened (with RabbitMQ: a reply queue declared, a consumer
    started) and counted after, so every concurrent call passed it (the hole the
    WebSocket path closed). A call that ends gives its slot back."""
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "capped", max_sessions=2)
    frames = distinct_frames(5, seed=7)
    async with _keyed_server(keys, transport_kind, topology, request) as srv, \
            contextlib.AsyncExitStack() as stack:
        await _calls_on_a_capped_key(srv, stack, key, frames)


@contextlib.asynccontextmanager
async def _keyed_server(keys: Path, transport_kind: str, topology: Topology,
                        request: pytest.FixtureRequest) -> AsyncIterator[Embedded]:
    """An embedded server with a keys file, on the transport under test."""
    url = request.getfixturevalue("rabbitmq_url") if transport_kind == "rabbitmq" else None
    try:
        async with embedded_server(keys_file=keys, broker_url=url, topology=topology,
                                   processing=topology.processing_types) as srv:
            yield srv
    finally:
        if url is not None:
            await delete_prefixed(url, topology)


async def _calls_on_a_capped_key(srv: Embedded, stack: contextlib.AsyncExitStack, key: str,
                                 frames: list[bytes]) -> None:
    """Twelve calls on a key capped at 2: ten refused 4021, two carry audio; one ends and
    a new call fits in its slot."""
    call = {"api_key": key, "pipeline": "passthrough", **STEADY}
    sims = [await stack.enter_async_context(MediaStreamSim(url(srv, "twilio"), params=call))
            for _ in range(12)]
    await asyncio.gather(*(s.start() for s in sims))
    await _until_closed(sims, 10)
    refused = [s for s in sims if s.closed is not None and s.closed.done()]
    assert {s.closed.result() for s in refused if s.closed} == {
        ErrorCode.TOO_MANY_SESSIONS}
    live = [s for s in sims if s.closed is not None and not s.closed.done()]
    assert len(live) == 2
    for sim in live:  # the two that started carry audio
        await sim.play_call(frames)
        assert await sim.wait_until(lambda sim=sim: sim.media_messages >= len(frames))
    await live[0].stop()
    await _until_closed(sims, 11)
    async with MediaStreamSim(url(srv, "twilio"), params=call) as again:
        await again.start()
        await again.play_call(frames)
        assert await again.wait_until(lambda: again.media_messages >= len(frames))
        assert again.closed is not None and not again.closed.done()


async def test_revoking_a_key_ends_its_calls_not_others(
    tmp_path: Path, transport_kind: str, topology: Topology, request: pytest.FixtureRequest
) -> None:
    """A revoked key's calls end with key_revoked (4014) at the next re-check, as its
    WebSocket sessions do; they used to run on. Another key's call keeps its audio."""
    keys = tmp_path / "keys.json"
    leaked, record = create_key(keys, "leaked")
    good, _ = create_key(keys, "victim")
    frames = distinct_frames(10, seed=9)
    def call(key: str) -> dict[str, str]:
        return {"api_key": key, "pipeline": "passthrough", **STEADY}

    async with _keyed_server(keys, transport_kind, topology, request) as srv, \
            MediaStreamSim(url(srv, "twilio"), params=call(leaked)) as bad, \
            MediaStreamSim(url(srv, "twilio"), params=call(good)) as victim:
        for sim in (bad, victim):
            await sim.start()
            await sim.play_call(frames[:5])
            assert await sim.wait_until(lambda sim=sim: sim.media_messages >= 5)
        revoke_key(keys, record.id)
        st = keys.stat()  # an mtime that surely moves on coarse clocks
        os.utime(keys, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert srv.gateway.revocation.sweep() == 1
        assert bad.closed is not None
        assert await asyncio.wait_for(bad.closed, 10) == ErrorCode.KEY_REVOKED
        await victim.play_call(frames[5:])
        assert await victim.wait_until(lambda: victim.media_messages >= len(frames))
        assert victim.media() == frames
        assert victim.closed is not None and not victim.closed.done()
