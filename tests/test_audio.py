"""Audio formats and conversions, checked against Python's own G.711 (``audioop``)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from audiostream.audio import (
    AudioFormat,
    Codec,
    Encoding,
    check_chunk,
    check_opus_chunk,
    decode,
    encode,
    frame_opus_packets,
    opus_packet_samples,
    parse_wire_format,
    split_opus_frame,
    wire_format_dict,
)
from audiostream.errors import ConfigError, ErrorCode, ProtocolError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # removed in 3.13; fine as a reference
    import audioop

S16 = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
S16_STEREO = AudioFormat(Encoding.PCM_S16LE, 48000, 2)
F32 = AudioFormat(Encoding.PCM_F32LE, 16000, 1)
MULAW = AudioFormat(Encoding.MULAW, 8000, 1)
ALAW = AudioFormat(Encoding.ALAW, 8000, 1)
ALL_INT16 = np.arange(-32768, 32768, dtype="<i2")
ALL_CODES = bytes(range(256))


# -- formats ---------------------------------------------------------------------------


def test_sizes() -> None:
    assert S16.sample_bytes == 2 and S16.frame_bytes == 2
    assert S16_STEREO.frame_bytes == 4
    assert F32.frame_bytes == 4
    assert MULAW.frame_bytes == 1
    assert S16.bytes_for_ms(20) == 640
    assert S16_STEREO.bytes_for_ms(10) == 1920
    assert AudioFormat(Encoding.PCM_S16LE, 44100).bytes_for_ms(10) == 882
    assert S16.duration_s(640) == pytest.approx(0.02)


@pytest.mark.parametrize(
    "args",
    [
        (Encoding.PCM_S16LE, 12345, 1),
        (Encoding.PCM_S16LE, 16000, 0),
        (Encoding.PCM_S16LE, 16000, 3),
        (Encoding.MULAW, 16000, 1),
        (Encoding.ALAW, 48000, 1),
    ],
)
def test_unsupported_formats_raise_config_error(args: tuple[Encoding, int, int]) -> None:
    with pytest.raises(ConfigError) as caught:
        AudioFormat(*args)
    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT


@pytest.mark.parametrize(
    "data",
    [
        {"encoding": "pcm_s24le", "sample_rate": 16000},
        {"encoding": "pcm_s16le", "sample_rate": "16000"},
        {"encoding": "pcm_s16le", "sample_rate": True},
        {"encoding": "pcm_s16le"},
        {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1.0},
        {"encoding": "mulaw", "sample_rate": 16000},
    ],
)
def test_bad_format_dicts_raise_config_error(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        AudioFormat.from_dict(data)
    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT


def test_a_format_that_is_not_an_object_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as caught:
        AudioFormat.from_dict(["pcm_s16le", 16000])
    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT


def test_format_dict_round_trip_and_defaults() -> None:
    for fmt in (S16, S16_STEREO, F32, MULAW, ALAW):
        assert AudioFormat.from_dict(fmt.to_dict()) == fmt
    assert AudioFormat.from_dict({"sample_rate": 16000}) == S16


def test_check_chunk_refuses_empty_and_partial_frames() -> None:
    check_chunk(S16_STEREO, b"\x00" * 8)
    for data in (b"", b"\x00" * 6):
        with pytest.raises(ProtocolError) as caught:
            check_chunk(S16_STEREO, data)
        assert caught.value.code is ErrorCode.INVALID_AUDIO
    with pytest.raises(ProtocolError):
        decode(S16, b"\x00\x00\x00")


# -- PCM -------------------------------------------------------------------------------


def test_s16_round_trip_is_exact_for_every_value() -> None:
    data = ALL_INT16.tobytes()
    audio = decode(S16, data)
    assert audio.dtype == np.float32 and audio.shape == (65536, 1)
    assert encode(S16, audio) == data


def test_s16_stereo_keeps_interleaving() -> None:
    data = ALL_INT16.tobytes()
    audio = decode(S16_STEREO, data)
    assert audio.shape == (32768, 2)
    assert audio[0, 0] == -1.0 and audio[0, 1] == np.float32(-32767 / 32768)
    assert encode(S16_STEREO, audio) == data


def test_s16_scale_and_clipping() -> None:
    assert decode(S16, ALL_INT16[[0, -1]].tobytes()).ravel().tolist() == [-1.0, 32767 / 32768]
    loud = np.array([[2.0], [-2.0], [1.0], [-1.0], [0.0]], dtype=np.float32)
    assert np.frombuffer(encode(S16, loud), "<i2").tolist() == [32767, -32768, 32767, -32768, 0]


def test_f32_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    audio = rng.uniform(-1, 1, (1000, 1)).astype(np.float32)
    assert np.array_equal(decode(F32, encode(F32, audio)), audio)


# -- G.711 against audioop -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "reference"),
    [(MULAW, audioop.ulaw2lin), (ALAW, audioop.alaw2lin)],
)
def test_g711_decoding_matches_audioop_for_all_256_codes(fmt: AudioFormat, reference: Any) -> None:
    want = np.frombuffer(reference(ALL_CODES, 2), "<i2")
    got = decode(fmt, ALL_CODES).ravel() * 32768
    assert np.array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize(
    ("fmt", "reference"),
    [(MULAW, audioop.lin2ulaw), (ALAW, audioop.lin2alaw)],
)
def test_g711_encoding_matches_audioop_for_every_int16(fmt: AudioFormat, reference: Any) -> None:
    want = reference(ALL_INT16.tobytes(), 2)
    got = encode(fmt, (ALL_INT16.astype(np.float32) / np.float32(32768)).reshape(-1, 1))
    assert got == want


def test_g711_codes_survive_decode_then_encode() -> None:
    assert encode(ALAW, decode(ALAW, ALL_CODES)) == ALL_CODES
    # mu-law has two zeros: 0x7F (-0) comes back as 0xFF (+0), as in audioop.
    back = encode(MULAW, decode(MULAW, ALL_CODES))
    assert [i for i in range(256) if back[i] != i] == [0x7F]
    assert back[0x7F] == 0xFF


# --- Opus packets on the wire: durations from the TOC byte, framing -------------------


@pytest.mark.parametrize(("config", "ms"), [
    (0, 10), (1, 20), (2, 40), (3, 60), (11, 60),   # SILK
    (12, 10), (15, 20),                              # hybrid
    (16, 2.5), (17, 5), (18, 10), (31, 20),          # CELT
])
def test_opus_packet_duration_from_its_toc(config: int, ms: float) -> None:
    one = bytes([config << 3, 0])
    assert opus_packet_samples(one) == ms * 48
    two_cbr = bytes([config << 3 | 1, 0, 0])
    assert opus_packet_samples(two_cbr) == 2 * ms * 48
    if ms <= 40:
        three = bytes([config << 3 | 3, 3, 0])
        assert opus_packet_samples(three) == 3 * ms * 48


@pytest.mark.parametrize("packet", [
    b"",
    bytes([1 << 3 | 1, 0]),           # code 1: two equal frames need an even payload
    bytes([1 << 3 | 2, 200, 0]),      # code 2: the first frame runs past the end
    bytes([1 << 3 | 3]),              # code 3 without its frame count
    bytes([1 << 3 | 3, 0]),           # code 3 with zero frames
    bytes([3 << 3 | 3, 3, 0]),        # 3 x 60 ms: over 120 ms
])
def test_what_cannot_be_an_opus_packet_is_invalid_audio(packet: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        opus_packet_samples(packet)
    assert err.value.code is ErrorCode.INVALID_AUDIO


def test_opus_framing_round_trip_and_its_errors() -> None:
    packets = [bytes([31 << 3]) + bytes(79), bytes([1 << 3]) + bytes(300)]
    frame = frame_opus_packets(packets)
    assert len(frame) == 2 * 2 + 80 + 301
    assert split_opus_frame(frame) == packets
    assert check_opus_chunk(AudioFormat.pcm16(16000), frame) == 320 + 320
    assert check_opus_chunk(AudioFormat.pcm16(8000), frame) == 160 + 160
    for bad in (b"", b"\x00", b"\x00\x00", frame + b"\x00", frame[:-1]):
        with pytest.raises(ProtocolError) as err:
            split_opus_frame(bad)
        assert err.value.code is ErrorCode.INVALID_AUDIO


def test_opus_wire_format() -> None:
    fmt, codec = parse_wire_format({"encoding": "opus", "sample_rate": 24000, "channels": 2})
    assert codec is Codec.OPUS and fmt == AudioFormat.pcm16(24000, 2)
    assert wire_format_dict(fmt, codec)["encoding"] == "opus"
    assert parse_wire_format({"sample_rate": 16000}) == (AudioFormat.pcm16(16000), Codec.PCM)
    with pytest.raises(ConfigError) as err:
        parse_wire_format({"encoding": "opus", "sample_rate": 44100})
    assert err.value.code is ErrorCode.UNSUPPORTED_FORMAT
