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


class Encoding(StrEnum):
    PCM_S16LE = "pcm_s16le"
    PCM_F32LE = "pcm_f32le"
    MULAW = "mulaw"
    ALAW = "alaw"


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
        try:
            encoding = Encoding(data.get("encoding", Encoding.PCM_S16LE))
        except ValueError:
            raise ConfigError(
                f"unknown encoding {data.get('encoding')!r}; use one of "
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
