"""``format.encoding: "opus"`` on /v1/stream, through the in-memory broker and RabbitMQ.

The client encodes speech into 20 ms Opus packets (PyAV/libopus, the project's codec
library), frames them (2-byte length prefixes, several packets per chunk) and sends them
through the SDK; the gateway decodes each chunk into PCM at the session's rate and the
pipeline runs unchanged. Checked: bytes on the wire against PCM, one outcome per chunk,
output length = the packets' duration, passthrough output = the client's own decode of
the same packets (so the gateway adds nothing), the speech survives (SNR against the
input), and a corrupt chunk is one ``invalid_audio`` notice in a session that goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiostream.audio import AudioFormat, Codec, check_opus_chunk, frame_opus_packets
from audiostream.audiofile import OpusPacketDecoder, OpusPacketEncoder, resample
from audiostream.client import Audio, AudioStreamClient, Notice, ReconnectPolicy
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.testing import Embedded, embedded_server, eventually
from audiostream.topology import Topology
from tests.conftest import delete_prefixed, unique_prefix
from tests.gateway.conftest import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
SPEECH = ROOT / "tests" / "data" / "speech_16k.wav"
PACKETS_PER_CHUNK = 10  # 200 ms chunks of 20 ms packets
#: A code-3 CBR packet whose payload (3 bytes) cannot split into its 2 frames: the TOC
#: is well formed, so only libopus (at the gateway) can refuse it.
UNDECODABLE = bytes([0x0B, 0x02, 1, 2, 3])
FAST_RECONNECT = ReconnectPolicy(initial_s=0.05, max_s=0.5, max_attempts=20)


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def srv(request: pytest.FixtureRequest) -> AsyncIterator[Embedded]:
    topo = Topology(processing_types=("passthrough", "gain"), prefix=unique_prefix())
    url = request.getfixturevalue("rabbitmq_url") if request.param == "rabbitmq" else None
    try:
        async with embedded_server(broker_url=url, topology=topo,
                                   gateway_settings=GatewaySettings()) as s:
            yield s
    finally:
        if url is not None:
            await delete_prefixed(url, topo)


def speech(rate: int) -> np.ndarray:
    x, src = soundfile.read(str(SPEECH), dtype="int16", always_2d=True)
    return resample(x, src, rate)


def opus_chunks(x: np.ndarray, rate: int) -> tuple[list[bytes], int]:
    enc = OpusPacketEncoder(rate, 1, bitrate=32000)
    packets = enc.encode(x) + enc.flush()
    return ([frame_opus_packets(packets[i:i + PACKETS_PER_CHUNK])
             for i in range(0, len(packets), PACKETS_PER_CHUNK)], enc.pre_skip)


async def run(srv: Embedded, chunks: list[bytes], rate: int,
              pipeline: list[object]) -> tuple[list[Audio | Notice], object]:
    client = AudioStreamClient(srv.url, api_key=srv.api_key)
    items: list[Audio | Notice] = []
    async with client.session(pipeline, format=AudioFormat.pcm16(rate), codec=Codec.OPUS,
                              iterate=False) as s:
        s.on_item(lambda it: items.append(it) if isinstance(it, Audio | Notice) else None)
        for chunk in chunks:
            await s.send(chunk)
        summary = await s.finish()
    return items, summary


def snr_db(ref: np.ndarray, y: np.ndarray) -> float:
    ref, y = ref.astype(np.float64), y.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - y) ** 2)))


@pytest.mark.parametrize("rate", [16000, 48000])
async def test_opus_upload_is_small_and_comes_back_as_the_decoded_speech(
    srv: Embedded, rate: int
) -> None:
    x = speech(rate)
    chunks, pre_skip = opus_chunks(x, rate)
    wire = sum(len(c) for c in chunks)
    assert wire <= 0.15 * x.nbytes  # the point of Opus: a tenth of PCM at 16 kHz
    items, summary = await run(srv, chunks, rate, ["passthrough"])
    assert [type(i) for i in items] == [Audio] * len(chunks)  # one outcome per chunk
    assert [i.seq for i in items] == list(range(len(chunks)))
    fmt = AudioFormat.pcm16(rate)
    for item, chunk in zip(items, chunks, strict=True):
        assert isinstance(item, Audio)
        assert len(item.data) == check_opus_chunk(fmt, chunk) * 2  # the packets' duration
    y = np.frombuffer(b"".join(i.data for i in items if isinstance(i, Audio)), "<i2")
    # passthrough: exactly the client's own decode of the same packets
    local = OpusPacketDecoder(rate, 1)
    reference = np.frombuffer(b"".join(local.decode(c) for c in chunks), "<i2")
    assert np.array_equal(y, reference)
    # and that decode is the speech, once the encoder's look-ahead is cut
    assert len(y) >= pre_skip + len(x)
    aligned = y[pre_skip:pre_skip + len(x)]
    assert snr_db(x[:, 0], aligned) > 6.0
    assert np.corrcoef(x[:, 0], aligned)[0, 1] > 0.9
    assert summary.dropped == 0  # type: ignore[attr-defined]


async def test_a_step_runs_on_the_decoded_pcm(srv: Embedded) -> None:
    """gain -6 dB on Opus input is the decoded input at half the amplitude."""
    x = speech(16000)
    chunks, _ = opus_chunks(x, 16000)
    items, _ = await run(srv, chunks, 16000, [{"name": "gain", "params": {"db": -6.0206}}])
    y = np.frombuffer(b"".join(i.data for i in items if isinstance(i, Audio)), "<i2")
    local = OpusPacketDecoder(16000, 1)
    ref = np.frombuffer(b"".join(local.decode(c) for c in chunks), "<i2").astype(np.float64)
    assert len(y) == len(ref)
    assert np.max(np.abs(y - ref / 2)) <= 1.0


@pytest.mark.parametrize(("bad", "what"), [
    (b"\x00\x50" + bytes(10), "length prefix"),          # prefix says 80 bytes, 10 follow
    (frame_opus_packets([UNDECODABLE]), "could not be decoded"),  # only libopus can tell
])
async def test_a_corrupt_chunk_is_one_notice_and_the_session_goes_on(
    srv: Embedded, bad: bytes, what: str
) -> None:
    x = speech(16000)
    chunks, _ = opus_chunks(x, 16000)
    at = 8  # 1.6 s: in the speech, where the decoder's state shapes the next packets
    sent = [*chunks[:at], bad, *chunks[at:]]
    items, summary = await run(srv, sent, 16000, ["passthrough"])
    assert [i.seq for i in items] == list(range(len(sent)))
    notice = items[at]
    assert isinstance(notice, Notice) and notice.code == ErrorCode.INVALID_AUDIO
    assert what in notice.message
    assert all(isinstance(i, Audio) for k, i in enumerate(items) if k != at)
    assert summary.dropped == 1 and summary.chunks_out == len(chunks)  # type: ignore[attr-defined]
    # the good chunks after the bad one decode as if it had never been sent
    local = OpusPacketDecoder(16000, 1)
    for c in chunks[:at]:
        local.decode(c)
    after = b"".join(i.data for i in items[at + 1:] if isinstance(i, Audio))
    assert after == b"".join(local.decode(c) for c in chunks[at:])


# --- a client flooding maximal Opus frames next to a PCM session -----------------------------

#: The flood's budget in the test: small, so the bound is far below what the flood would
#: cost the loop unbounded (decoding one of its chunks is a few ms).
FLOOD_SHARE = 0.05
FLOOD_CHUNKS = 80
#: The PCM session streams alongside: up to this many 20 ms chunks per flood outcome.
VICTIM_PER_FLOOD_OUTCOME = 50


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def budgeted(request: pytest.FixtureRequest) -> AsyncIterator[Embedded]:
    topo = Topology(processing_types=("passthrough", "gain"), prefix=unique_prefix())
    url = request.getfixturevalue("rabbitmq_url") if request.param == "rabbitmq" else None
    settings = GatewaySettings(opus_cpu_share=FLOOD_SHARE, opus_cpu_share_total=FLOOD_SHARE)
    try:
        async with embedded_server(broker_url=url, topology=topo,
                                   gateway_settings=settings) as s:
            yield s
    finally:
        if url is not None:
            await delete_prefixed(url, topo)


def maximal_opus_chunks() -> list[bytes]:
    """Frames as costly as the protocol allows per byte of credit: 48 kHz stereo at
    libopus's top bit rate, 50 packets of 10 ms each (decoding is per packet as much as
    per second of audio). Ten distinct frames, sent over and over: a valid stream."""
    rng = np.random.default_rng(7)
    enc = OpusPacketEncoder(48000, 2, bitrate=510_000, frame_ms=10)
    x = (rng.standard_normal((48000 * 5, 2)) * 6000).astype(np.int16)
    packets = enc.encode(x)
    return [frame_opus_packets(packets[i:i + 50]) for i in range(0, 500, 50)]


async def test_an_opus_flood_is_held_to_its_cpu_budget_and_a_pcm_session_keeps_its_audio(
    budgeted: Embedded,
) -> None:
    """One client sends maximal Opus frames as fast as its credit allows; a PCM session
    streams beside it for as long as the flood lasts. The flood's decoding stays within
    its CPU budget (its socket is left unread meanwhile, so it only slows: every chunk
    still comes back as audio), and the PCM session gets every chunk back as its own
    audio, in order."""
    srv = budgeted
    client = AudioStreamClient(srv.url, api_key=srv.api_key)
    frames = maximal_opus_chunks()
    flood_items: list[Audio | Notice] = []
    victim_items: list[Audio | Notice] = []
    first_outcome, flood_done, progress = asyncio.Event(), asyncio.Event(), asyncio.Event()
    victim_sent: list[bytes] = []
    loop = asyncio.get_running_loop()
    cpu = "audiostream_gateway_opus_decode_cpu_seconds_total"

    def flood_item(it: object) -> None:
        if isinstance(it, Audio | Notice):
            flood_items.append(it)
            first_outcome.set()
            progress.set()

    async def flood() -> float:
        async with client.session(["passthrough"], format=AudioFormat.pcm16(48000, 2),
                                  codec=Codec.OPUS, iterate=False,
                                  deadline_ms=30_000) as s:
            s.on_item(flood_item)
            t0 = loop.time()
            for k in range(FLOOD_CHUNKS):
                await s.send(frames[k % len(frames)])
            await s.finish()
            wall = loop.time() - t0
        flood_done.set()
        progress.set()
        return wall

    async def victim() -> None:
        rng = np.random.default_rng(3)
        await first_outcome.wait()  # the flood is under way
        async with client.session(["passthrough"], format=AudioFormat.pcm16(16000),
                                  iterate=False, deadline_ms=10_000) as s:
            s.on_item(lambda it: victim_items.append(it)
                      if isinstance(it, Audio | Notice) else None)
            while not flood_done.is_set():
                if len(victim_sent) >= VICTIM_PER_FLOOD_OUTCOME * (len(flood_items) + 1):
                    progress.clear()  # ahead of the flood: wait for its next outcome
                    await progress.wait()
                    continue
                chunk = (rng.standard_normal(320) * 3000).astype("<i2").tobytes()
                victim_sent.append(chunk)
                await s.send(chunk)
            await s.finish()

    wall, _ = await asyncio.gather(flood(), victim())
    spent = srv.gateway.metrics_registry.get_sample_value(cpu)
    paused = srv.gateway.metrics_registry.get_sample_value(
        "audiostream_gateway_opus_decode_paused_total")
    per_chunk = spent / FLOOD_CHUNKS
    print(f"flood: {FLOOD_CHUNKS} chunks, {spent:.3f} CPU-s of decoding in {wall:.2f} s "
          f"({per_chunk * 1e3:.2f} ms a chunk), paused {paused:g} times; "
          f"victim: {len(victim_sent)} chunks")
    # Unbounded, the flood decodes as fast as the loop goes (a few ms a chunk, several
    # times FLOOD_SHARE of the loop); bounded, its CPU is its share of the wall time plus
    # the one-second burst plus the one chunk whose cost is known only afterwards.
    assert spent <= FLOOD_SHARE * (wall + 1.0) + 2 * per_chunk
    assert spent > 3 * FLOOD_SHARE  # the flood did cost more than the burst: it was held
    assert paused >= 1
    assert [type(i) for i in flood_items] == [Audio] * FLOOD_CHUNKS
    # the victim: every chunk back, in order, as its own audio (passthrough)
    assert len(victim_sent) >= 2
    assert [i.seq for i in victim_items] == list(range(len(victim_sent)))
    assert all(isinstance(i, Audio) for i in victim_items), [
        (i.seq, i.code) for i in victim_items if isinstance(i, Notice)]
    assert [i.data for i in victim_items if isinstance(i, Audio)] == victim_sent


# --- the resume seam ---------------------------------------------------------------------------


async def test_a_resumed_opus_session_decodes_on_with_a_fresh_decoder_and_loses_nothing(
    srv: Embedded,
) -> None:
    """The connection drops mid-upload; the SDK resumes and re-sends from the server's
    ``resume_from``. Decided behaviour (docs/protocol.md, *Opus uploads*, Resume): the
    new connection decodes with a fresh decoder from ``resume_from`` on, without the
    old one's state, so every chunk still ends as exactly one outcome of its packets'
    duration (no pre-skip or concealment is inserted at the seam); the outcomes before
    ``resume_from`` (written or replayed from the journal) are the old decoder's."""
    x = speech(16000)
    chunks, pre_skip = opus_chunks(x, 16000)
    port = int(srv.url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    await proxy.start()
    cut_after = len(chunks) // 2
    items: list[Audio | Notice] = []
    resumed: list[int] = []
    try:
        client = AudioStreamClient(f"ws://127.0.0.1:{proxy.port}/v1/stream",
                                   api_key=srv.api_key, reconnect=FAST_RECONNECT)
        client.on_resume(lambda info: resumed.append(info.resume_from))
        async with client.session(["passthrough"], format=AudioFormat.pcm16(16000),
                                  codec=Codec.OPUS, iterate=False, deadline_ms=10_000) as s:
            s.on_item(lambda it: items.append(it) if isinstance(it, Audio | Notice) else None)
            for k, chunk in enumerate(chunks):
                if k == cut_after:
                    assert await eventually(lambda: len(items) >= 2)
                    proxy.cut()
                await s.send(chunk)
            summary = await s.finish()
    finally:
        await proxy.close()
    assert len(resumed) == 1
    r = resumed[0]
    assert 2 <= r <= cut_after < len(chunks)  # the seam is inside the upload
    # every chunk: one outcome, audio, exactly its packets' duration
    assert [i.seq for i in items] == list(range(len(chunks)))
    assert all(isinstance(i, Audio) for i in items)
    fmt = AudioFormat.pcm16(16000)
    assert [len(i.data) for i in items if isinstance(i, Audio)] == [
        check_opus_chunk(fmt, c) * 2 for c in chunks]
    assert summary.dropped == 0  # type: ignore[attr-defined]
    got = [i.data for i in items if isinstance(i, Audio)]
    old = OpusPacketDecoder(16000, 1)
    assert got[:r] == [old.decode(c) for c in chunks[:r]]  # the first connection's decoder
    fresh = OpusPacketDecoder(16000, 1)
    assert got[r:] == [fresh.decode(c) for c in chunks[r:]]  # a fresh one from resume_from
    # what the seam costs: the continuous decode against the one the client got
    cont = np.frombuffer(b"".join(old.decode(c) for c in chunks[r:]), "<i2")
    seam = np.frombuffer(b"".join(got[r:]), "<i2")
    y = np.frombuffer(b"".join(got), "<i2")
    aligned = y[pre_skip:pre_skip + len(x)]
    print(f"resumed from {r}: first 200 ms after the seam {snr_db(cont[:3200], seam[:3200]):.1f}"
          f" dB against an unbroken decode; whole upload {snr_db(x[:, 0], aligned):.1f} dB "
          "against the input")
    assert np.corrcoef(x[:, 0], aligned)[0, 1] > 0.9  # still the speech, seam and all
