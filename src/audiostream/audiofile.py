"""Reading and writing audio files: WAV variants, FLAC, Opus/Ogg, MP3, at any rate.

Files arrive in whatever the user has; the wire takes PCM at a few rates
(``audio.SUPPORTED_RATES``). This module is the one boundary between the two:

- ``open_reader`` decodes **incrementally** through libsndfile (``soundfile``) for the
  formats it reads exactly (WAV in all its sample formats, FLAC, AIFF, ...) and through
  FFmpeg (PyAV) for the lossy containers (Opus/Ogg, MP3, M4A, WebM), whose encoder
  delay and padding FFmpeg trims from the stream's own metadata, so a decoded file has
  the length of what was encoded. A ten-minute file is never held decoded in memory.
  PyAV and libsndfile ship inside their wheels, so no system codec is needed.
- ``Resampled`` converts a reader to another rate with soxr's HQ *streaming*
  resampler, which gives the same samples as the one-shot call and
  ``round(frames * to / from)`` frames in total: the server never sees an odd rate,
  and the way back restores the input's rate and length.
- ``open_writer`` writes WAV (16-bit), FLAC or Opus (Ogg, libopus), chosen by suffix,
  incrementally; ``-`` is stdin/stdout (through ``pcmio``: a WAV stream or raw PCM).

No asyncio here: callers decide on which thread decoding runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from audiostream.audio import (
    MAX_CHANNELS,
    OPUS_CLOCK,
    OPUS_RATES,
    SUPPORTED_RATES,
    AudioFormat,
    Encoding,
    opus_packet_samples,
    split_opus_frame,
)
from audiostream.audio import decode as decode_pcm
from audiostream.errors import ConfigError, ErrorCode, ProtocolError

Int16Audio = npt.NDArray[np.int16]

#: Suffixes decoded by FFmpeg: libsndfile's MP3/Opus readers do not trim encoder delay.
_FFMPEG_SUFFIXES = frozenset({".opus", ".ogg", ".oga", ".mp3", ".m4a", ".aac", ".webm", ".mka"})
#: Opus encodes at 48 kHz only (RFC 7845); other rates are resampled by the encoder side.
OPUS_RATE = 48000
STDIO = "-"


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
                "(or '-' for a WAV stream on stdout)", ErrorCode.UNSUPPORTED_FORMAT)
        return aliases[suffix]


def wire_rate(rate: int, accepted: Sequence[int] = SUPPORTED_RATES) -> int:
    """The rate to send a ``rate`` Hz file at: itself when accepted, else the lowest
    accepted rate above it (keeps the whole band), else the highest accepted."""
    if rate in accepted:
        return rate
    above = [r for r in sorted(accepted) if r > rate]
    return above[0] if above else max(accepted)


def _to_int16(f: npt.NDArray[np.float32]) -> Int16Audio:
    return np.clip(np.round(f * 32768.0), -32768, 32767).astype(np.int16)


def resample(samples: npt.NDArray[Any], src: int, dst: int) -> Int16Audio:
    """Whole-array sample-rate conversion (soxr HQ), int16 in and out."""
    import soxr

    if src == dst:
        return np.ascontiguousarray(samples, dtype=np.int16)
    out = soxr.resample(np.asarray(samples, dtype=np.float32) / 32768.0, src, dst,
                        quality="HQ")
    return _to_int16(np.asarray(out, dtype=np.float32).reshape(-1, samples.shape[1]))


class StreamResampler:
    """soxr's HQ streaming resampler on int16 blocks: the same samples as ``resample``
    on the whole signal, whatever the block sizes (soxr keeps its delay line)."""

    def __init__(self, src: int, dst: int, channels: int) -> None:
        import soxr

        self.src, self.dst, self.channels = src, dst, channels
        self._rs = soxr.ResampleStream(src, dst, channels, dtype="float32", quality="HQ")

    def push(self, block: npt.NDArray[Any], *, last: bool = False) -> Int16Audio:
        x = np.asarray(block, dtype=np.float32).reshape(-1, self.channels) / 32768.0
        out = self._rs.resample_chunk(x, last=last)
        return _to_int16(np.asarray(out, dtype=np.float32).reshape(-1, self.channels))

    def flush(self) -> Int16Audio:
        return self.push(np.zeros((0, self.channels), np.float32), last=True)


# --- readers ---------------------------------------------------------------------------------


class AudioReader:
    """An open audio input: ``read(n)`` gives up to ``n`` frames (``frames x channels``
    int16; fewer only at the end, empty after it)."""

    name: str = ""
    rate: int = 0
    channels: int = 0
    frames: int | None = None
    """Length in frames when the container says so exactly (WAV, FLAC), else None."""
    codec: str = ""
    pcm: Any = None
    """For a WAV stream or raw PCM: the underlying ``pcmio.AudioInput`` (its own format)."""
    position: int = 0
    """Frames returned by ``read`` so far."""

    def read(self, n: int) -> Int16Audio:
        block = self._read(n)
        self.position += len(block)
        return block

    def _read(self, n: int) -> Int16Audio:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (a no-op by default)."""

    def read_all(self) -> Int16Audio:
        pieces = list(self.blocks(1 << 16))
        return (np.concatenate(pieces) if pieces
                else np.zeros((0, self.channels), np.int16))

    def blocks(self, n: int) -> Iterator[Int16Audio]:
        while len(block := self.read(n)):
            yield block

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class _SndReader(AudioReader):
    def __init__(self, name: str, f: Any) -> None:
        self.name, self._f = name, f
        self.rate, self.channels = int(f.samplerate), int(f.channels)
        self.frames = int(f.frames)
        self.codec = str(f.subtype).lower()
        self._int = f.subtype == "PCM_16"

    def _read(self, n: int) -> Int16Audio:
        if self._int:
            return np.asarray(self._f.read(n, dtype="int16", always_2d=True), np.int16)
        # float32 then scale: libsndfile's own float->int read does not scale float WAVs
        # (they come back as zeros); int -> f32 -> int16 is exact for 8/16-bit sources.
        return _to_int16(self._f.read(n, dtype="float32", always_2d=True))

    def close(self) -> None:
        self._f.close()


class _AvReader(AudioReader):
    def __init__(self, name: str, source: str | BinaryIO, *, limit: int | None = None) -> None:
        import av

        self.name = name
        self._limit = limit
        """Frames there are in all, when FFmpeg cannot know (MP3 on a pipe: its end
        padding is trimmed from the LAME header, ``mp3_gapless_length``)."""
        try:
            self._c = av.open(source, "r")
        except av.FFmpegError as exc:
            raise _unreadable(name, exc) from exc
        if not self._c.streams.audio:
            self._c.close()
            raise ConfigError(f"{name} has no audio stream", ErrorCode.UNSUPPORTED_FORMAT)
        stream = self._c.streams.audio[0]
        self.rate = int(stream.codec_context.sample_rate)
        channels = int(stream.codec_context.channels)
        self.channels = min(channels, MAX_CHANNELS)  # more are downmixed to stereo
        self.codec = str(stream.codec_context.name)
        # Interleaved s16 at the stream's own rate: no resampling inside FFmpeg.
        self._resampler = av.AudioResampler(
            format="s16", layout="mono" if self.channels == 1 else "stereo", rate=self.rate)
        self._frames = self._c.decode(stream)
        self._buf: list[Int16Audio] = []
        self._have = 0
        self._eof = False

    def _more(self) -> None:
        import av

        try:
            frame = next(self._frames, None)
            outs = self._resampler.resample(frame)
        except av.FFmpegError as exc:
            raise _unreadable(self.name, exc) from exc
        if frame is None:
            self._eof = True
        for out in outs:
            block = np.asarray(out.to_ndarray(), np.int16).reshape(-1, self.channels)
            self._buf.append(block)
            self._have += len(block)

    def _read(self, n: int) -> Int16Audio:
        if self._limit is not None:
            n = max(0, min(n, self._limit - self.position))
            if n == 0:
                return np.zeros((0, self.channels), np.int16)
        while self._have < n and not self._eof:
            self._more()
        if not self._buf:
            return np.zeros((0, self.channels), np.int16)
        data = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        out, rest = data[:n], data[n:]
        self._buf = [rest] if len(rest) else []
        self._have = len(rest)
        return np.ascontiguousarray(out)

    def close(self) -> None:
        self._c.close()


class _PcmReader(AudioReader):
    """``-`` or a headerless file, through pcmio (a WAV stream, or raw with --format)."""

    def __init__(self, source: Any) -> None:
        self._in = self.pcm = source
        self.name = source.name
        self.rate, self.channels = source.format.sample_rate, source.format.channels
        self.codec = str(source.format.encoding)

    def _read(self, n: int) -> Int16Audio:
        fmt: AudioFormat = self._in.format
        data = self._in.read(n * fmt.frame_bytes)
        if fmt.encoding is Encoding.PCM_S16LE:
            return np.frombuffer(data, "<i2").astype(np.int16).reshape(-1, self.channels)
        return _to_int16(decode_pcm(fmt, data))


def _unreadable(name: str, exc: Exception) -> ConfigError:
    # FFmpeg's text without its errno and path: "Invalid data found when processing input".
    what = getattr(exc, "strerror", None) or type(exc).__name__
    return ConfigError(f"cannot read {name} as audio ({what})", ErrorCode.UNSUPPORTED_FORMAT)


def open_reader(source: str | Path, *, raw_format: AudioFormat | None = None,
                stdin: BinaryIO | None = None) -> AudioReader:
    """Open a file, or ``-`` for stdin, for incremental decoding at its own rate.

    stdin: a WAV stream is read as it arrives; raw PCM needs ``raw_format``; anything
    else (Ogg, MP3, FLAC, ...) is decoded by FFmpeg as it arrives too, so memory stays
    bounded however long the pipe. FFmpeg trims Ogg/Opus pre-skip and end granule and
    an MP3's encoder delay on a pipe as on a file; an MP3's end padding it trims only on
    a seekable input, so here it comes from the LAME header (``mp3_gapless_length``).
    """
    from audiostream import pcmio

    if str(source) == STDIO:
        stream = stdin if stdin is not None else sys.stdin.buffer
        head = _read_up_to(stream, 28)  # RIFF header, fmt chunk up to its sample rate
        if head[:4] == b"RIFF" and raw_format is None and head[12:16] == b"fmt " and len(
                head) == 28 and int.from_bytes(head[24:28], "little") not in SUPPORTED_RATES:
            # A WAV stream at a rate pcmio's (the wire's) formats do not take: FFmpeg
            # reads WAV incrementally from a pipe (no delay or padding to trim).
            return _checked(_AvReader("stdin", _Prefixed(head, stream)))  # type: ignore[arg-type]
        if raw_format is not None or head[:4] == b"RIFF":
            return _checked(_PcmReader(pcmio.open_input(
                STDIO, raw_format, stdin=_Prefixed(head, stream))))  # type: ignore[arg-type]
        if not head:
            raise ConfigError("stdin is empty", ErrorCode.UNSUPPORTED_FORMAT)
        head += _read_up_to(stream, _mp3_head_bytes(head) - len(head))
        try:
            # Only read(): FFmpeg then treats stdin as the pipe it is (never seeks).
            return _checked(_AvReader("stdin", _Prefixed(head, stream),  # type: ignore[arg-type]
                                      limit=mp3_gapless_length(head)))
        except ConfigError as err:
            raise ConfigError(f"{err.message}; raw PCM needs --format ENCODING:RATE"
                              "[:CHANNELS], e.g. --format s16le:16000", err.code) from None
    p = Path(source)
    if not p.is_file():
        raise ConfigError(f"no such audio file: {p}", ErrorCode.CONFIG_ERROR)
    if raw_format is not None:
        return _checked(_PcmReader(pcmio.AudioInput(str(p), raw_format, "raw", p.open("rb"))))
    if p.suffix.lower() not in _FFMPEG_SUFFIXES:
        import soundfile

        try:
            return _checked(_SndReader(p.name, soundfile.SoundFile(str(p))))
        except soundfile.LibsndfileError:
            pass  # not a libsndfile format after all: let FFmpeg try
    return _checked(_AvReader(p.name, str(p)))


#: Bytes after an ID3v2 tag that hold an MP3's first frame (and its Xing/LAME header).
_MP3_FIRST_FRAME = 4096
#: Most bytes read ahead to find that frame (an ID3v2 tag with cover art can be large).
_MP3_MAX_HEAD = 16 << 20


def _mp3_head_bytes(head: bytes) -> int:
    """How much of stdin to hold before decoding, so ``mp3_gapless_length`` sees the
    first frame: past an ID3v2 tag when there is one (bounded)."""
    size = 0
    if head[:3] == b"ID3" and len(head) >= 10:
        for b in head[6:10]:
            size = size << 7 | (b & 0x7F)
        size += 10 + (10 if head[5] & 0x10 else 0)
    return min(size + _MP3_FIRST_FRAME, _MP3_MAX_HEAD)


def mp3_gapless_length(head: bytes) -> int | None:
    """An MP3's decoded length in frames from the start of its bytes: the Xing/Info
    header's frame count times samples per frame, less the LAME header's encoder delay
    and padding (what FFmpeg trims on a seekable file). None when ``head`` is not an MP3
    with both headers (FFmpeg's own length is then all there is)."""
    pos = 0
    if head[:3] == b"ID3" and len(head) >= 10:
        pos = _mp3_head_bytes(head) - _MP3_FIRST_FRAME
    end = min(len(head), pos + _MP3_FIRST_FRAME)
    while pos + 4 <= end and not (head[pos] == 0xFF and head[pos + 1] & 0xE0 == 0xE0):
        pos += 1
    if pos + 4 > end or (head[pos + 1] >> 1) & 3 != 1:  # not a frame of MPEG layer III
        return None
    per_frame = 1152 if (head[pos + 1] >> 3) & 3 == 3 else 576  # MPEG-1, else 2 / 2.5
    side = head[pos + 4:pos + 4 + 40]  # the header sits after the side information
    at = max(side.find(b"Xing"), side.find(b"Info"))
    if at < 0:
        return None
    x = pos + 4 + at
    flags = int.from_bytes(head[x + 4:x + 8], "big")
    if not flags & 1:
        return None  # no frame count
    frames = int.from_bytes(head[x + 8:x + 12], "big")
    lame = x + 12 + (4 if flags & 2 else 0) + (100 if flags & 4 else 0) + (
        4 if flags & 8 else 0)
    if len(head) < lame + 24 or head[lame:lame + 4] not in (b"LAME", b"Lavf", b"Lavc"):
        return None
    delay = head[lame + 21] << 4 | head[lame + 22] >> 4
    padding = (head[lame + 22] & 0x0F) << 8 | head[lame + 23]
    total = frames * per_frame - delay - padding
    return total if total > 0 else None


def _read_up_to(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n and (got := stream.read(n - len(data))):
        data += got
    return data


def _checked(reader: AudioReader) -> AudioReader:
    if reader.channels > MAX_CHANNELS:
        reader.close()
        raise ConfigError(f"{reader.name} has {reader.channels} channels; at most "
                          f"{MAX_CHANNELS} are supported", ErrorCode.UNSUPPORTED_FORMAT)
    if reader.rate <= 0:
        reader.close()
        raise ConfigError(f"{reader.name} has no sample rate", ErrorCode.UNSUPPORTED_FORMAT)
    return reader


class _Prefixed:
    """A stream with bytes already read (the sniffed header) put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            out = self._head if size < 0 else self._head[:size]
            self._head = self._head[len(out):]
            if size < 0:
                out += self._rest.read()
            return out
        return self._rest.read(size)


class Resampled(AudioReader):
    """``reader`` at ``rate``: soxr streaming, ``round(frames * rate / reader.rate)``
    frames in all; the reader itself when the rates agree is better (bit-exact)."""

    def __init__(self, reader: AudioReader, rate: int) -> None:
        self.inner = reader
        self.name, self.channels, self.codec = reader.name, reader.channels, reader.codec
        self.rate = rate
        self.frames = (None if reader.frames is None
                       else round(reader.frames * rate / reader.rate))
        self._rs = StreamResampler(reader.rate, rate, reader.channels)
        self._buf = np.zeros((0, reader.channels), np.int16)
        self._eof = False

    def _read(self, n: int) -> Int16Audio:
        want = max(1, -(-n * self.inner.rate // self.rate))
        while len(self._buf) < n and not self._eof:
            block = self.inner.read(want)
            if len(block):
                out = self._rs.push(block)
            else:
                self._eof = True
                out = self._rs.flush()
            self._buf = np.concatenate([self._buf, out]) if len(self._buf) else out
        out, self._buf = self._buf[:n], self._buf[n:]
        return np.ascontiguousarray(out)

    def close(self) -> None:
        self.inner.close()


def decode(path: str | Path) -> tuple[Int16Audio, int]:
    """Decode a whole file at its own rate: ``(frames x channels int16, rate)``."""
    with open_reader(path) as r:
        return r.read_all(), r.rate


def read_audio(
    path: str | Path, *, accepted: Sequence[int] = SUPPORTED_RATES
) -> tuple[Int16Audio, int]:
    """Decode ``path`` whole and resample it to a rate the wire takes.

    Returns ``(frames x channels int16, rate)`` with ``rate in accepted``; a file
    already at an accepted rate is returned untouched (bit-exact for WAV/FLAC).
    """
    data, rate = decode(path)
    target = wire_rate(rate, accepted)
    return resample(data, rate, target), target


# --- writers ---------------------------------------------------------------------------------


class AudioWriter:
    """An open output: ``write`` int16 ``frames x channels`` at ``rate``; ``close`` ends
    the file (an Opus file gets its final page, a WAV file its sizes)."""

    name: str = ""
    rate: int = 0
    channels: int = 0
    frames: int = 0
    """Frames written so far (at ``rate``)."""

    def write(self, samples: npt.NDArray[Any]) -> None:
        data = np.asarray(samples, dtype=np.int16).reshape(-1, self.channels)
        if len(data):
            self._write(data)
            self.frames += len(data)

    def _write(self, data: Int16Audio) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> AudioWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class _SndWriter(AudioWriter):
    def __init__(self, p: Path, rate: int, channels: int, kind: FileFormat) -> None:
        import soundfile

        self.name, self.rate, self.channels = str(p), rate, channels
        self._f = soundfile.SoundFile(str(p), "w", samplerate=rate, channels=channels,
                                      subtype="PCM_16",
                                      format="WAV" if kind is FileFormat.WAV else "FLAC")

    def _write(self, data: Int16Audio) -> None:
        self._f.write(data)

    def close(self) -> None:
        self._f.close()


class _PcmWriter(AudioWriter):
    def __init__(self, out: Any) -> None:
        self._out = out
        self.name, self.rate = out.name, out.format.sample_rate
        self.channels = out.format.channels

    def _write(self, data: Int16Audio) -> None:
        fmt: AudioFormat = self._out.format
        if fmt.encoding is Encoding.PCM_S16LE:
            self._out.write(data.astype("<i2", copy=False).tobytes())
        else:
            from audiostream.audio import encode

            self._out.write(encode(fmt, data.astype(np.float32) / 32768.0))

    def close(self) -> None:
        self._out.close()


class _WavStreamWriter(AudioWriter):
    """16-bit WAV on a pipe at any rate (pcmio's formats are the wire's): the header's
    sizes say "unknown", as ``arecord`` writes them."""

    def __init__(self, stream: BinaryIO, rate: int, channels: int) -> None:
        import struct

        self.name, self.rate, self.channels, self._s = "stdout", rate, channels, stream
        unknown = 0xFFFFFFFF
        fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * 2 * channels, 2 * channels, 16)
        stream.write(b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt "
                     + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", unknown))

    def _write(self, data: Int16Audio) -> None:
        self._s.write(data.astype("<i2", copy=False).tobytes())

    def close(self) -> None:
        self._s.flush()


class _OpusWriter(AudioWriter):
    """Ogg/Opus through libopus: resampled to 48 kHz (streaming) and fed in 20 ms
    frames; the muxer writes pre-skip and the end granule so readers trim exactly."""

    def __init__(self, target: str | BinaryIO, name: str, rate: int, channels: int,
                 bitrate: int) -> None:
        import av

        self.name, self.rate, self.channels = name, rate, channels
        self._layout = "mono" if channels == 1 else "stereo"
        self._c = av.open(target, "w", format="ogg")
        self._s = self._c.add_stream("libopus", rate=OPUS_RATE)
        self._s.bit_rate = bitrate
        self._s.layout = self._layout
        self._rs = None if rate == OPUS_RATE else StreamResampler(rate, OPUS_RATE, channels)
        self._pending = np.zeros((0, channels), np.int16)
        self._pts = 0

    def _encode(self, data: Int16Audio, *, final: bool = False) -> None:
        import av

        buf = np.concatenate([self._pending, data]) if len(self._pending) else data
        step = OPUS_RATE // 50  # libopus takes 20 ms frames
        end = len(buf) if final else len(buf) - len(buf) % step
        for start in range(0, end, step):
            block = np.ascontiguousarray(buf[start:min(start + step, end)]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout=self._layout)
            frame.sample_rate = OPUS_RATE
            frame.pts = self._pts
            self._pts += block.shape[1] // self.channels
            for packet in self._s.encode(frame):
                self._c.mux(packet)
        self._pending = buf[end:]

    def _write(self, data: Int16Audio) -> None:
        self._encode(data if self._rs is None else self._rs.push(data))

    def close(self) -> None:
        tail = (np.zeros((0, self.channels), np.int16) if self._rs is None
                else self._rs.flush())
        self._encode(tail, final=True)
        for packet in self._s.encode(None):
            self._c.mux(packet)
        self._c.close()


def open_writer(
    target: str | Path,
    rate: int,
    channels: int,
    fmt: FileFormat | str | None = None,
    *,
    bitrate: int = 32000,
    raw_format: AudioFormat | None = None,
    stdout: BinaryIO | None = None,
) -> AudioWriter:
    """Open ``target`` for incremental writing: ``.wav`` (16-bit), ``.flac`` or
    ``.opus``/``.ogg`` by suffix (or ``fmt``); ``-`` is a WAV stream on stdout, or
    raw PCM in ``raw_format``. ``bitrate`` applies to Opus only."""
    from audiostream import pcmio

    if str(target) == STDIO and fmt is None:
        if raw_format is not None and (raw_format.sample_rate, raw_format.channels) != (
                rate, channels):
            raise ConfigError(
                f"--format {raw_format.encoding}:{raw_format.sample_rate}:"
                f"{raw_format.channels} does not match the audio ({rate} Hz, {channels} ch)",
                ErrorCode.UNSUPPORTED_FORMAT)
        if raw_format is not None:
            return _PcmWriter(pcmio.open_output(STDIO, raw_format, raw=True, stdout=stdout))
        return _WavStreamWriter(stdout or sys.stdout.buffer, rate, channels)
    p = Path(target)
    kind = FileFormat(fmt) if fmt is not None else FileFormat.from_path(p)
    if str(target) != STDIO and not p.parent.is_dir():
        raise ConfigError(f"output directory {str(p.parent)!r} does not exist")
    if kind is FileFormat.OPUS:
        out: str | BinaryIO = (stdout or sys.stdout.buffer) if str(target) == STDIO else str(p)
        return _OpusWriter(out, p.name, rate, channels, bitrate)
    return _SndWriter(p, rate, channels, kind)


def write_audio(
    path: str | Path,
    samples: npt.NDArray[Any],
    rate: int,
    fmt: FileFormat | str | None = None,
    *,
    bitrate: int = 32000,
) -> None:
    """Write int16 ``frames x channels`` (or 1-D mono) audio as WAV, FLAC or Opus.

    Opus is always 48 kHz inside; a reader gets 48 kHz back.
    """
    data = np.asarray(samples, dtype=np.int16)
    if data.ndim == 1:
        data = data.reshape(-1, 1)
    with open_writer(path, rate, data.shape[1], fmt, bitrate=bitrate) as w:
        w.write(data)


# --- Opus packets for the WebSocket (``format.encoding: "opus"``) ---------------------------

#: Opus frame durations libopus encodes, in ms.
OPUS_FRAME_MS = (10, 20, 40, 60)


class OpusPacketEncoder:
    """PCM at one of ``OPUS_RATES`` -> raw Opus packets (no Ogg), ``frame_ms`` each.

    libopus takes the session's rate itself, so the coded band ends at rate/2 (what lets
    the gateway decode by decimation). The decoded stream is late by ``pre_skip`` frames
    (the encoder's look-ahead) and ``flush`` pads the last packet: a client keeps frames
    ``pre_skip .. pre_skip + n`` of what comes back for ``n`` frames sent.
    """

    def __init__(self, rate: int, channels: int, *, bitrate: int = 32000,
                 frame_ms: int = 20) -> None:
        import av

        if rate not in OPUS_RATES:
            raise ConfigError(f"opus needs a rate of {', '.join(map(str, OPUS_RATES))}, "
                              f"not {rate}", ErrorCode.UNSUPPORTED_FORMAT)
        if frame_ms not in OPUS_FRAME_MS:
            raise ConfigError(f"Opus frames are {', '.join(map(str, OPUS_FRAME_MS))} ms, "
                              f"not {frame_ms:g}", ErrorCode.INVALID_OPTION)
        if not 6000 <= bitrate <= 510_000:
            raise ConfigError(f"Opus bit rate {bitrate} is outside 6000..510000",
                              ErrorCode.INVALID_OPTION)
        self.rate, self.channels = rate, channels
        self._layout = "mono" if channels == 1 else "stereo"
        self.frame_size = rate * frame_ms // 1000
        ctx = av.CodecContext.create("libopus", "w")
        ctx.sample_rate = rate
        ctx.layout = self._layout
        ctx.format = "s16"
        ctx.bit_rate = bitrate
        ctx.options = {"frame_duration": str(frame_ms)}
        ctx.open()
        self._ctx: Any = ctx
        # OpusHead (RFC 7845 5.1): pre-skip, a little-endian uint16 at byte 10, at 48 kHz.
        head = bytes(ctx.extradata or b"")
        pre_skip_48k = int.from_bytes(head[10:12], "little") if len(head) >= 12 else 312
        self.pre_skip = pre_skip_48k * rate // OPUS_CLOCK
        self._pending = np.zeros((0, channels), np.int16)
        self._pts = 0

    def _frames(self, buf: Int16Audio) -> list[bytes]:
        import av

        out: list[bytes] = []
        for start in range(0, len(buf), self.frame_size):
            block = np.ascontiguousarray(buf[start:start + self.frame_size]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout=self._layout)
            frame.sample_rate = self.rate
            frame.pts = self._pts
            self._pts += self.frame_size
            out += [bytes(p) for p in self._ctx.encode(frame)]
        return out

    def encode(self, samples: npt.NDArray[Any]) -> list[bytes]:
        """Packets for whole frames of ``samples`` (int16 ``frames x channels``); the rest
        waits for the next call or ``flush``."""
        data = np.asarray(samples, dtype=np.int16).reshape(-1, self.channels)
        buf = np.concatenate([self._pending, data]) if len(self._pending) else data
        whole = len(buf) - len(buf) % self.frame_size
        self._pending = buf[whole:]
        return self._frames(buf[:whole])

    def flush(self) -> list[bytes]:
        """The last packets: the partial frame padded with silence, then the encoder's
        look-ahead."""
        out: list[bytes] = []
        if len(self._pending):
            pad = np.zeros((self.frame_size - len(self._pending), self.channels), np.int16)
            out += self._frames(np.concatenate([self._pending, pad]))
            self._pending = np.zeros((0, self.channels), np.int16)
        return out + [bytes(p) for p in self._ctx.encode(None)]


class OpusPacketDecoder:
    """The gateway's side: a binary frame of Opus packets -> ``pcm_s16le`` bytes at
    ``rate`` (one of ``OPUS_RATES``), exactly the packets' duration long.

    FFmpeg's libopus decoder always gives 48 kHz; keeping every (48000/rate)-th sample is
    what libopus's own CELT decoder does at lower rates, and is alias-free because an
    encoder fed ``rate`` Hz audio codes nothing above rate/2 (``OpusPacketEncoder``
    does). Its state carries across frames, as an Opus stream's must. A frame that
    cannot be decoded raises ``ProtocolError`` (INVALID_AUDIO); the state is then that
    of the packets before the bad one, so the stream goes on."""

    def __init__(self, rate: int, channels: int) -> None:
        import av

        if rate not in OPUS_RATES:
            raise ConfigError(f"opus needs a rate of {', '.join(map(str, OPUS_RATES))}",
                              ErrorCode.UNSUPPORTED_FORMAT)
        self.rate, self.channels = rate, channels
        self._step = OPUS_CLOCK // rate
        self._layout = "mono" if channels == 1 else "stereo"
        ctx = av.CodecContext.create("libopus", "r")
        ctx.layout = self._layout
        ctx.sample_rate = OPUS_CLOCK
        self._ctx: Any = ctx

    def decode(self, data: bytes) -> bytes:
        import av

        packets = split_opus_frame(data)
        want = [opus_packet_samples(p) for p in packets]  # validates every TOC first
        pieces: list[Int16Audio] = []
        for i, (packet, samples) in enumerate(zip(packets, want, strict=True)):
            try:
                frames = list(self._ctx.decode(av.Packet(packet)))
            except av.FFmpegError as exc:
                # libopus refuses the packet before touching its state: the stream goes
                # on as if the packet had not been sent (packets before it in this frame
                # were decoded, and stay in the state, as they were sent).
                raise ProtocolError(f"Opus packet {i} of this frame could not be decoded "
                                    f"({getattr(exc, 'strerror', None) or 'invalid data'})",
                                    ErrorCode.INVALID_AUDIO) from None
            got = [np.asarray(self._as_s16(f), np.int16).reshape(-1, self.channels)
                   for f in frames]
            block = np.concatenate(got) if got else np.zeros((0, self.channels), np.int16)
            if len(block) != samples:
                raise ProtocolError(f"Opus packet {i} decoded to {len(block)} samples, its "
                                    f"header says {samples}", ErrorCode.INVALID_AUDIO)
            pieces.append(block[::self._step])
        return np.concatenate(pieces).astype("<i2", copy=False).tobytes()

    @staticmethod
    def _as_s16(frame: Any) -> Any:
        arr = frame.to_ndarray()
        if frame.format.name == "s16":
            return arr
        # float output (another FFmpeg build): planar or packed, to interleaved int16.
        flat = arr.T.reshape(-1) if frame.format.is_planar else arr.reshape(-1)
        return _to_int16(np.asarray(flat, np.float32))
