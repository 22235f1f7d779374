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

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiostream.audio import AudioFormat, Codec, check_opus_chunk, frame_opus_packets
from audiostream.audiofile import OpusPacketDecoder, OpusPacketEncoder, resample
from audiostream.client import Audio, AudioStreamClient, Notice
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.testing import Embedded, embedded_server
from audiostream.topology import Topology
from tests.conftest import delete_prefixed, unique_prefix

ROOT = Path(__file__).resolve().parents[2]
SPEECH = ROOT / "tests" / "data" / "speech_16k.wav"
PACKETS_PER_CHUNK = 10  # 200 ms chunks of 20 ms packets
#: A code-3 CBR packet whose payload (3 bytes) cannot split into its 2 frames: the TOC
#: is well formed, so only libopus (at the gateway) can refuse it.
UNDECODABLE = bytes([0x0B, 0x02, 1, 2, 3])


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
