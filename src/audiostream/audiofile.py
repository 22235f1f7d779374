"""Reading and writing audio files: WAV variants, FLAC, Opus/Ogg, MP3, at any rate.

Files arrive in whatever the user has; the wire takes PCM at a few rates
(``audio.SUPPORTED_RATES``). This module is the one boundary between the two:

- ``read_audio`` decodes through libsndfile (``soundfile``) for the formats it reads
  exactly (WAV in all its sample formats, FLAC, AIFF, ...) and through FFmpeg (PyAV)
  for the lossy containers (Opus/Ogg, MP3, M4A, WebM), whose encoder delay and
  padding FFmpeg trims from the stream's own metadata, so a decoded file has the
  length of what was encoded. PyAV and libsndfile ship inside their wheels, so no
  system codec is needed.
- A rate the wire does not take (22.05 kHz, 32 kHz, ...) is resampled here, on the
  client, with soxr's HQ one-shot resampler: the server never sees an odd rate.
- ``write_audio`` writes WAV (16-bit), FLAC or Opus (Ogg, libopus), chosen by suffix.

No asyncio here: callers decide on which thread a whole-file decode runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from audiostream.audio import MAX_CHANNELS, SUPPORTED_RATES
from audiostream.errors import ConfigError, ErrorCode

Int16Audio = npt.NDArray[np.int16]

#: Suffixes decoded by FFmpeg: libsndfile's MP3/Opus readers do not trim encoder delay.
_FFMPEG_SUFFIXES = frozenset({".opus", ".ogg", ".oga", ".mp3", ".m4a", ".aac", ".webm", ".mka"})
#: Opus encodes at 48 kHz only (RFC 7845); other rates are resampled by the encoder side.
OPUS_RATE = 48000


class FileFormat(StrEnum):
    WAV = "wav"
    FLAC = "flac"
    OPUS = "opus"

    @classmethod
    def from_path(cls, path: Path) -> FileFormat:
        suffix = path.suffix.lower().lstrip(".")
        aliases = {"wav": cls.WAV, "wave": cls.WAV, "flac": cls.FLAC,
                   "opus": cls.OPUS, "ogg": cls.OPUS}
        if suffix not in aliases:
            raise ConfigError(
                f"cannot write {path.name}: use a .wav, .flac or .opus file name "
                "(or give the format)", ErrorCode.UNSUPPORTED_FORMAT)
        return aliases[suffix]


def wire_rate(rate: int, accepted: Sequence[int] = SUPPORTED_RATES) -> int:
    """The rate to send a ``rate`` Hz file at: itself when accepted, else the lowest
    accepted rate above it (keeps the whole band), else the highest accepted."""
    if rate in accepted:
        return rate
    above = [r for r in sorted(accepted) if r > rate]
    return above[0] if above else max(accepted)


def resample(samples: npt.NDArray[Any], src: int, dst: int) -> Int16Audio:
    """Whole-file sample-rate conversion (soxr HQ), int16 in and out."""
    import soxr

    if src == dst:
        return np.ascontiguousarray(samples, dtype=np.int16)
    out = soxr.resample(np.asarray(samples, dtype=np.float32) / 32768.0, src, dst,
                        quality="HQ")
    return _to_int16(np.asarray(out, dtype=np.float32).reshape(-1, samples.shape[1]))


def _to_int16(f: npt.NDArray[np.float32]) -> Int16Audio:
    return np.clip(np.round(f * 32768.0), -32768, 32767).astype(np.int16)


def decode(path: str | Path) -> tuple[Int16Audio, int]:
    """Decode a file at its own rate: ``(frames x channels int16, rate)``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such audio file: {p}", ErrorCode.CONFIG_ERROR)
    if p.suffix.lower() not in _FFMPEG_SUFFIXES:
        import soundfile

        try:
            # float32 then scale: libsndfile's own float->int read does not scale
            # float WAVs (they come back as zeros); int16 -> f32 -> int16 is exact.
            data, rate = soundfile.read(str(p), dtype="float32", always_2d=True)
            return _to_int16(data), int(rate)
        except soundfile.LibsndfileError:
            pass  # not a libsndfile format after all: let FFmpeg try
    return _decode_ffmpeg(p)


def _decode_ffmpeg(p: Path) -> tuple[Int16Audio, int]:
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.audio:
                raise ConfigError(f"{p.name} has no audio stream",
                                  ErrorCode.UNSUPPORTED_FORMAT)
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate)
            channels = int(stream.codec_context.channels)
            if channels > MAX_CHANNELS:
                layout = "stereo"
                channels = MAX_CHANNELS
            else:
                layout = "mono" if channels == 1 else "stereo"
            # Interleaved s16 at the stream's own rate: no resampling inside FFmpeg.
            resampler = av.AudioResampler(format="s16", layout=layout, rate=rate)
            pieces: list[Int16Audio] = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(np.asarray(out.to_ndarray(), np.int16).reshape(-1, channels))
            for out in resampler.resample(None):
                pieces.append(np.asarray(out.to_ndarray(), np.int16).reshape(-1, channels))
    except av.FFmpegError as exc:
        # FFmpeg's text without its errno and path: "Invalid data found when processing input".
        what = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"cannot read {p.name} as audio ({what})",
                          ErrorCode.UNSUPPORTED_FORMAT) from exc
    data = np.concatenate(pieces) if pieces else np.zeros((0, channels), np.int16)
    return np.ascontiguousarray(data, dtype=np.int16), rate


def read_audio(
    path: str | Path, *, accepted: Sequence[int] = SUPPORTED_RATES
) -> tuple[Int16Audio, int]:
    """Decode ``path`` and resample it to a rate the wire takes.

    Returns ``(frames x channels int16, rate)`` with ``rate in accepted``; a file
    already at an accepted rate is returned untouched (bit-exact for WAV/FLAC).
    More than two channels are refused (the wire carries at most two).
    """
    data, rate = decode(path)
    if data.shape[1] > MAX_CHANNELS:
        raise ConfigError(f"{Path(path).name} has {data.shape[1]} channels; at most "
                          f"{MAX_CHANNELS} are supported", ErrorCode.UNSUPPORTED_FORMAT)
    target = wire_rate(rate, accepted)
    return resample(data, rate, target), target


def write_audio(
    path: str | Path,
    samples: npt.NDArray[Any],
    rate: int,
    fmt: FileFormat | str | None = None,
    *,
    bitrate: int = 32000,
) -> None:
    """Write int16 ``frames x channels`` (or 1-D mono) audio as WAV, FLAC or Opus.

    Opus is always 48 kHz inside; the file is resampled to 48 kHz first (soxr), and
    a reader gets 48 kHz back. ``bitrate`` applies to Opus only.
    """
    p = Path(path)
    kind = FileFormat(fmt) if fmt is not None else FileFormat.from_path(p)
    data = np.asarray(samples, dtype=np.int16)
    if data.ndim == 1:
        data = data.reshape(-1, 1)
    if kind is FileFormat.OPUS:
        _write_opus(p, resample(data, rate, OPUS_RATE), bitrate)
        return
    import soundfile

    soundfile.write(str(p), data, rate, subtype="PCM_16",
                    format="WAV" if kind is FileFormat.WAV else "FLAC")


def _write_opus(p: Path, data: Int16Audio, bitrate: int) -> None:
    import av

    channels = data.shape[1]
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(p), "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=OPUS_RATE)
        stream.bit_rate = bitrate
        stream.layout = layout
        step = OPUS_RATE // 50  # libopus takes 20 ms frames
        pts = 0
        for start in range(0, data.shape[0], step):
            block = np.ascontiguousarray(data[start:start + step]).reshape(1, -1)  # interleaved
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
            frame.sample_rate = OPUS_RATE
            frame.pts = pts
            pts += block.shape[1] // channels
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
