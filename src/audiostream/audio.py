"""Audio formats and PCM conversion; no I/O.

Inside workers audio is float32 shaped ``(frames, channels)`` in [-1, 1]; on the
wire it is whatever encoding the client chose. Conversions here are exact for
``pcm_s16le`` round trips (s16 -> f32 -> s16 gives back the same bytes), which
is what makes ``passthrough`` bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from audiostream.errors import ConfigError, ErrorCode, ProtocolError

FloatAudio = npt.NDArray[np.float32]

SUPPORTED_RATES = (8000, 16000, 24000, 44100, 48000)
MAX_CHANNELS = 2
#: Session rates an Opus stream may have: libopus's own rates (44.1 kHz is not one).
OPUS_RATES = (8000, 16000, 24000, 48000)
#: Longest binary frame of Opus packets: a second at libopus's highest bit rate
#: (510 kbit/s = 63,750 B) plus the length prefixes of its packets.
OPUS_MAX_FRAME_BYTES = 65_536
#: Most packets in one binary frame (a second of 20 ms packets): the gateway decodes on
#: its event loop, and libopus's cost is per packet as much as per second of audio (a
#: second of 2.5 ms packets costs about four times a second of 20 ms ones).
OPUS_MAX_PACKETS = 50
#: Opus's own clock: packet durations are multiples of 2.5 ms at 48 kHz.
OPUS_CLOCK = 48_000
#: RFC 6716: no packet holds more than 120 ms.
_OPUS_MAX_PACKET_SAMPLES = 5760


class Encoding(StrEnum):
    PCM_S16LE = "pcm_s16le"
    PCM_F32LE = "pcm_f32le"
    MULAW = "mulaw"
    ALAW = "alaw"


class Codec(StrEnum):
    """How audio travels on the WebSocket; the pipeline always sees PCM.

    ``PCM`` sends the format's encoding as it is. ``OPUS`` (``format.encoding: "opus"``
    in ``start``) sends binary frames of Opus packets (``frame_opus_packets``) that the
    gateway decodes into ``pcm_s16le`` at the format's rate and channels: uploads of a
    tenth of PCM's size, for files rather than live audio (decoding at the gateway costs
    it CPU, and the codec's delay is the client's to trim)."""

    PCM = "pcm"
    OPUS = "opus"


_SAMPLE_BYTES = {
    Encoding.PCM_S16LE: 2,
    Encoding.PCM_F32LE: 4,
    Encoding.MULAW: 1,
    Encoding.ALAW: 1,
}

#: Telephony encodings are only defined at 8 kHz.
_TELEPHONY = (Encoding.MULAW, Encoding.ALAW)


@dataclass(frozen=True, slots=True)
class AudioFormat:
    encoding: Encoding
    sample_rate: int
    channels: int = 1

    def __post_init__(self) -> None:
        if self.sample_rate not in SUPPORTED_RATES:
            raise ConfigError(
                f"sample_rate {self.sample_rate} is not supported; use one of "
                f"{', '.join(map(str, SUPPORTED_RATES))}",
                ErrorCode.UNSUPPORTED_FORMAT,
            )
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ConfigError(
                f"channels must be 1..{MAX_CHANNELS}, got {self.channels}",
                ErrorCode.UNSUPPORTED_FORMAT,
            )
        if self.encoding in _TELEPHONY and self.sample_rate != 8000:
            raise ConfigError(
                f"{self.encoding} is only supported at 8000 Hz", ErrorCode.UNSUPPORTED_FORMAT
            )

    @classmethod
    def pcm16(cls, sample_rate: int, channels: int = 1) -> AudioFormat:
        """16-bit little-endian PCM, the usual choice: ``AudioFormat.pcm16(16000)``."""
        return cls(Encoding.PCM_S16LE, sample_rate, channels)

    @property
    def sample_bytes(self) -> int:
        return _SAMPLE_BYTES[self.encoding]

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample frame (all channels)."""
        return self.sample_bytes * self.channels

    def bytes_for_ms(self, ms: float) -> int:
        return round(self.sample_rate * ms / 1000.0) * self.frame_bytes

    def duration_s(self, nbytes: int) -> float:
        return nbytes / self.frame_bytes / self.sample_rate


    def to_dict(self) -> dict[str, Any]:
        return {
            "encoding": str(self.encoding),
            "sample_rate": self.sample_rate,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, data: Any) -> AudioFormat:
        """Parse a client- or broker-supplied format, raising coded errors."""
        if not isinstance(data, dict):
            raise ProtocolError("format must be an object", ErrorCode.UNSUPPORTED_FORMAT)
        raw = data.get("encoding", Encoding.PCM_S16LE)
        try:
            encoding = Encoding(raw)
        except ValueError:
            # Client input is quoted only as a short string (no Python reprs of others).
            shown = repr(raw[:32]) if isinstance(raw, str) else "of another JSON type"
            raise ConfigError(
                f"unknown encoding {shown}; use one of "
                f"{', '.join(e.value for e in Encoding)}",
                ErrorCode.UNSUPPORTED_FORMAT,
            ) from None
        rate = data.get("sample_rate")
        channels = data.get("channels", 1)
        if not isinstance(rate, int) or isinstance(rate, bool):
            raise ConfigError("sample_rate must be an integer", ErrorCode.UNSUPPORTED_FORMAT)
        if not isinstance(channels, int) or isinstance(channels, bool):
            raise ConfigError("channels must be an integer", ErrorCode.UNSUPPORTED_FORMAT)
        return cls(encoding, rate, channels)


def parse_wire_format(data: Any) -> tuple[AudioFormat, Codec]:
    """``start.format`` -> (the PCM format the pipeline sees, the wire codec).

    ``{"encoding": "opus", "sample_rate": R, "channels": C}`` is Opus packets on the wire
    and ``pcm_s16le`` at R Hz, C channels in the pipeline and in the answers."""
    if isinstance(data, dict) and data.get("encoding") == Codec.OPUS.value:
        fmt = AudioFormat.from_dict({**data, "encoding": Encoding.PCM_S16LE.value})
        if fmt.sample_rate not in OPUS_RATES:
            raise ConfigError(
                f"opus needs a sample_rate of {', '.join(map(str, OPUS_RATES))}, "
                f"not {fmt.sample_rate}", ErrorCode.UNSUPPORTED_FORMAT)
        return fmt, Codec.OPUS
    return AudioFormat.from_dict(data), Codec.PCM


def wire_format_dict(fmt: AudioFormat, codec: Codec = Codec.PCM) -> dict[str, Any]:
    """``start.format`` for ``fmt`` sent as ``codec``."""
    out = fmt.to_dict()
    if codec is Codec.OPUS:
        out["encoding"] = Codec.OPUS.value
    return out


# --- Opus packets on the wire (pure: framing and durations; decoding is audiofile's) -------

#: TOC configuration -> frame duration in samples at 48 kHz (RFC 6716, section 3.1):
#: SILK 10/20/40/60 ms, hybrid 10/20 ms, CELT 2.5/5/10/20 ms.
_OPUS_FRAME_SAMPLES = (
    [480, 960, 1920, 2880] * 3 + [480, 960] * 2 + [120, 240, 480, 960] * 4)


def opus_packet_samples(packet: bytes) -> int:
    """Duration of one Opus packet in samples at 48 kHz, from its TOC byte (RFC 6716,
    3.1-3.2); raises ``ProtocolError`` (INVALID_AUDIO) for what cannot be a packet."""
    if not packet:
        raise ProtocolError("empty Opus packet", ErrorCode.INVALID_AUDIO)
    toc = packet[0]
    size = _OPUS_FRAME_SAMPLES[toc >> 3]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code == 1:
        if (len(packet) - 1) % 2:
            raise ProtocolError("Opus packet (code 1) has an odd payload length",
                                ErrorCode.INVALID_AUDIO)
        frames = 2
    elif code == 2:
        frames = 2
        if len(packet) < 2 or (packet[1] >= 252 and len(packet) < 3):
            raise ProtocolError("Opus packet (code 2) is truncated", ErrorCode.INVALID_AUDIO)
        first = packet[1] if packet[1] < 252 else packet[1] + 4 * packet[2]
        if first > len(packet) - (2 if packet[1] < 252 else 3):
            raise ProtocolError("Opus packet (code 2): first frame runs past the end",
                                ErrorCode.INVALID_AUDIO)
    else:
        if len(packet) < 2:
            raise ProtocolError("Opus packet (code 3) has no frame count",
                                ErrorCode.INVALID_AUDIO)
        frames = packet[1] & 0x3F
        if frames == 0:
            raise ProtocolError("Opus packet (code 3) has zero frames", ErrorCode.INVALID_AUDIO)
    if frames * size > _OPUS_MAX_PACKET_SAMPLES:
        raise ProtocolError(f"Opus packet of {frames * size / 48:g} ms (at most 120 ms)",
                            ErrorCode.INVALID_AUDIO)
    return frames * size


def frame_opus_packets(packets: list[bytes]) -> bytes:
    """One binary frame (one chunk, one seq) of Opus packets: each packet preceded by its
    length as a 16-bit big-endian unsigned integer."""
    return b"".join(len(p).to_bytes(2, "big") + p for p in packets)


def split_opus_frame(data: bytes) -> list[bytes]:
    """The packets of a binary frame; raises ``ProtocolError`` (INVALID_AUDIO)."""
    packets: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        if len(packets) == OPUS_MAX_PACKETS:
            raise ProtocolError(f"more than {OPUS_MAX_PACKETS} Opus packets in one frame",
                                ErrorCode.FRAME_TOO_LARGE)
        if pos + 2 > end:
            raise ProtocolError("Opus frame ends inside a length prefix",
                                ErrorCode.INVALID_AUDIO)
        n = int.from_bytes(data[pos:pos + 2], "big")
        pos += 2
        if n == 0 or pos + n > end:
            raise ProtocolError(
                f"Opus packet {len(packets)} has a length prefix of {n} bytes"
                f"{'' if n == 0 else f' but {end - pos} remain'}", ErrorCode.INVALID_AUDIO)
        packets.append(data[pos:pos + n])
        pos += n
    if not packets:
        raise ProtocolError("empty audio frame", ErrorCode.INVALID_AUDIO)
    return packets


def check_opus_chunk(fmt: AudioFormat, data: bytes) -> int:
    """Validate a binary frame of Opus packets; its duration in frames at ``fmt``'s rate."""
    samples = sum(opus_packet_samples(p) for p in split_opus_frame(data))
    return samples * fmt.sample_rate // OPUS_CLOCK


def check_chunk(fmt: AudioFormat, data: bytes) -> None:
    """Reject a chunk that is not a whole number of sample frames."""
    if len(data) == 0:
        raise ProtocolError("empty audio frame", ErrorCode.INVALID_AUDIO)
    if len(data) % fmt.frame_bytes:
        raise ProtocolError(
            f"frame of {len(data)} bytes is not a multiple of {fmt.frame_bytes} "
            f"({fmt.encoding}, {fmt.channels} channel(s))",
            ErrorCode.INVALID_AUDIO,
        )
    if fmt.encoding is Encoding.PCM_F32LE and not np.isfinite(
            np.frombuffer(data, dtype="<f4")).all():
        # Rejected, not sanitised: NaN poisons recurrent model state (one NaN in the GRU
        # state of a batch lane stays there), and silently zeroing hides a client bug.
        raise ProtocolError("float audio must be finite (NaN or Inf sample)",
                            ErrorCode.INVALID_AUDIO)


# --- G.711 (mu-law / A-law), vectorised ---------------------------------------------

_MULAW_BIAS = 0x84
_MULAW_CLIP_14 = 8159  # magnitude clip on the 14-bit scale


def _mulaw_decode_table() -> npt.NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> npt.NDArray[np.int16]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    sign = a & 0x80
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    return np.where(sign != 0, magnitude, -magnitude).astype(np.int16)


_MULAW_DECODE = _mulaw_decode_table()
_ALAW_DECODE = _alaw_decode_table()


def _floor_log2(x: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    """floor(log2(x)) for x >= 1, exactly (frexp, not a rounded float log)."""
    return (np.frexp(x)[1] - 1).astype(np.int32)


def _mulaw_encode(pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.uint8]:
    # The G.711 reference (Sun g711.c, as in audioop): quantise the 14-bit value
    # (an arithmetic shift, so negatives round down), clip, bias, find the segment.
    x = pcm.astype(np.int32) >> 2
    mask = np.where(x < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(x), _MULAW_CLIP_14) + (_MULAW_BIAS >> 2)
    seg = np.maximum(_floor_log2(mag) - 5, 0)  # segment ends are 2**(seg + 6) - 1
    uval = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))
    out: npt.NDArray[np.uint8] = (uval ^ mask).astype(np.uint8)
    return out


def _alaw_encode(pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.uint8]:
    # The G.711 reference on the 13-bit value; negatives use one's complement.
    x = pcm.astype(np.int32) >> 3
    mask = np.where(x >= 0, 0xD5, 0x55)
    mag = np.where(x >= 0, x, -x - 1)  # 0..4095
    seg = np.where(mag < 32, 0, _floor_log2(np.maximum(mag, 1)) - 4)  # ends 2**(seg + 5) - 1
    mantissa = (mag >> np.maximum(seg, 1)) & 0x0F
    out: npt.NDArray[np.uint8] = (((seg << 4) | mantissa) ^ mask).astype(np.uint8)
    return out


def decode(fmt: AudioFormat, data: bytes) -> FloatAudio:
    """Wire bytes -> float32 ``(frames, channels)``."""
    check_chunk(fmt, data)
    if fmt.encoding is Encoding.PCM_S16LE:
        ints = np.frombuffer(data, dtype="<i2")
        out = ints.astype(np.float32) / np.float32(32768.0)
    elif fmt.encoding is Encoding.PCM_F32LE:
        out = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif fmt.encoding is Encoding.MULAW:
        out = _MULAW_DECODE[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / 32768.0
    else:
        out = _ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / 32768.0
    return out.astype(np.float32, copy=False).reshape(-1, fmt.channels)


def encode(fmt: AudioFormat, audio: FloatAudio) -> bytes:
    """float32 ``(frames, channels)`` -> wire bytes (clipping to the encoding's range)."""
    flat = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
    if fmt.encoding is Encoding.PCM_F32LE:
        return flat.astype("<f4").tobytes()
    ints: npt.NDArray[np.int16] = np.clip(np.rint(flat * 32768.0), -32768, 32767).astype("<i2")
    if fmt.encoding is Encoding.PCM_S16LE:
        return ints.tobytes()
    if fmt.encoding is Encoding.MULAW:
        return _mulaw_encode(ints).tobytes()
    return _alaw_encode(ints).tobytes()
