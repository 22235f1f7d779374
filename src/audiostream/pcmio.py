"""Audio in and out of the command line: files, and ``-`` for stdin/stdout.

Why its own module: a pipe has no name and cannot seek, so neither libsndfile nor a
file suffix can say what flows through it. The rules, kept in one place:

* **Input ``-``**: a WAV header is detected (``RIFF``/``WAVE``) and read incrementally,
  so ``arecord -t wav | audiostream ... -`` works while audio arrives; anything else is
  raw PCM and needs ``--format ENCODING:RATE[:CHANNELS]`` (e.g. ``s16le:16000``).
* **Input file**: anything libsndfile reads (WAV, FLAC, OGG, ...), decoded to 16-bit
  PCM; a headerless file is raw PCM when ``--format`` is given.
* **Output ``-``**: raw PCM when ``--format`` is given, else a WAV stream (its size
  fields say "unknown", as ``arecord`` writes them). **Output file**: always WAV.

Errors are ``ConfigError`` with a message naming the input and what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, Protocol

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ConfigError, ErrorCode

__all__ = [
    "STDIO",
    "AudioInput",
    "AudioOutput",
    "add_format_argument",
    "is_stdio",
    "open_input",
    "open_output",
    "parse_format",
]

STDIO: Final = "-"

#: Short names accepted by ``--format`` besides the ``Encoding`` values.
_ALIASES: Final = {
    "s16le": Encoding.PCM_S16LE, "s16": Encoding.PCM_S16LE, "pcm16": Encoding.PCM_S16LE,
    "f32le": Encoding.PCM_F32LE, "f32": Encoding.PCM_F32LE, "float": Encoding.PCM_F32LE,
    "ulaw": Encoding.MULAW, "mulaw": Encoding.MULAW, "u-law": Encoding.MULAW,
    "alaw": Encoding.ALAW, "a-law": Encoding.ALAW,
}
#: WAV format tags; 0xFFFE (WAVE_FORMAT_EXTENSIBLE) carries the tag in its sub-format.
_WAV_TAGS: Final = {
    (1, 16): Encoding.PCM_S16LE, (3, 32): Encoding.PCM_F32LE,
    (7, 8): Encoding.MULAW, (6, 8): Encoding.ALAW,
}
_TAG_OF: Final = {enc: tag for (tag, _bits), enc in _WAV_TAGS.items()}
_UNKNOWN_SIZE: Final = 0xFFFFFFFF
FORMAT_HELP: Final = (
    "raw PCM on '-' (stdin/stdout): ENCODING:RATE[:CHANNELS], ENCODING one of s16le, "
    "f32le, mulaw, alaw (e.g. s16le:16000 or mulaw:8000); without it stdin must be WAV "
    "and stdout is WAV"
)


def is_stdio(path: str | Path) -> bool:
    return str(path) == STDIO


def parse_format(text: str) -> AudioFormat:
    """``s16le:16000`` or ``pcm_f32le:48000:2`` -> ``AudioFormat``; ``ConfigError`` if bad."""
    parts = text.strip().lower().split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(f"--format {text!r}: expected ENCODING:RATE[:CHANNELS], "
                          "e.g. s16le:16000", ErrorCode.UNSUPPORTED_FORMAT)
    name = parts[0]
    encoding = _ALIASES.get(name)
    if encoding is None:
        try:
            encoding = Encoding(name)
        except ValueError:
            raise ConfigError(
                f"--format {text!r}: unknown encoding {name!r}; use s16le, f32le, mulaw or alaw",
                ErrorCode.UNSUPPORTED_FORMAT) from None
    try:
        rate = int(parts[1])
        channels = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise ConfigError(f"--format {text!r}: RATE and CHANNELS must be integers",
                          ErrorCode.UNSUPPORTED_FORMAT) from None
    return AudioFormat(encoding, rate, channels)


def _format_type(text: str) -> AudioFormat:
    """argparse ``type=``: a bad value becomes a usage error naming the option."""
    try:
        return parse_format(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def add_format_argument(p: argparse.ArgumentParser) -> None:
    """``--format`` for commands that read or write ``-``."""
    p.add_argument("--format", dest="raw_format", type=_format_type, default=None,
                   metavar="ENC:RATE[:CH]", help=FORMAT_HELP)


# --- input ---------------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass
class AudioInput:
    """An opened input: its format, and bytes read in whole sample frames."""

    name: str
    format: AudioFormat
    container: str
    """``"wav"``, ``"raw"`` or libsndfile's name of the file's format."""
    _stream: _Readable
    _remaining: int | None = None
    """Bytes of the data chunk left to read; None: until end of stream."""
    _carry: bytes = field(default=b"", repr=False)

    def read(self, nbytes: int) -> bytes:
        """Up to ``nbytes`` (rounded down to whole frames; at least one frame); b"" at the end."""
        frame = self.format.frame_bytes
        want = max(frame, nbytes - nbytes % frame)
        data = self._carry
        while len(data) < want:
            ask = want - len(data)
            if self._remaining is not None:
                ask = min(ask, self._remaining)
                if ask == 0:
                    break
            got = self._stream.read(ask)
            if not got:
                break
            if self._remaining is not None:
                self._remaining -= len(got)
            data += got
        whole = len(data) - len(data) % frame
        if whole == 0 and data and len(data) < want:
            # The stream ended inside a frame: a truncated last sample is dropped.
            self._carry = b""
            return b""
        self._carry = data[whole:]
        return data[:whole]

    def read_all(self) -> bytes:
        chunks = []
        while block := self.read(1 << 20):
            chunks.append(block)
        return b"".join(chunks)

    def blocks(self, ms: float) -> Iterator[bytes]:
        """Successive blocks of ``ms`` of audio (the last may be shorter)."""
        size = self.format.bytes_for_ms(ms)
        while block := self.read(size):
            yield block

    async def ablocks(self, ms: float) -> AsyncIterator[bytes]:
        """``blocks`` without blocking the event loop: a pipe may wait for its writer."""
        size = self.format.bytes_for_ms(ms)
        while block := await asyncio.to_thread(self.read, size):
            yield block


def _read_exact(stream: _Readable, n: int, name: str) -> bytes:
    data = b""
    while len(data) < n:
        got = stream.read(n - len(data))
        if not got:
            raise ConfigError(f"{name}: the WAV header ends early", ErrorCode.INVALID_AUDIO)
        data += got
    return data


def _read_wav_header(stream: _Readable, name: str) -> tuple[AudioFormat, int | None]:
    """Parse RIFF chunks up to ``data``; the stream is then at the first sample."""
    fmt: AudioFormat | None = None
    while True:
        chunk_id, size = struct.unpack("<4sI", _read_exact(stream, 8, name))
        if chunk_id == b"data":
            if fmt is None:
                raise ConfigError(f"{name}: WAV data before its fmt chunk",
                                  ErrorCode.INVALID_AUDIO)
            return fmt, None if size in (0, _UNKNOWN_SIZE) else size
        body = _read_exact(stream, size + (size & 1), name)
        if chunk_id == b"fmt ":
            if size < 16:
                raise ConfigError(f"{name}: WAV fmt chunk too short", ErrorCode.INVALID_AUDIO)
            tag, channels, rate, _brate, _align, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == 0xFFFE and size >= 26:
                tag = struct.unpack("<H", body[24:26])[0]
            encoding = _WAV_TAGS.get((tag, bits))
            if encoding is None:
                raise ConfigError(
                    f"{name}: WAV with format tag {tag} and {bits}-bit samples is not "
                    "supported on a pipe; use 16-bit PCM, 32-bit float, mu-law or A-law, "
                    "or give a file name",
                    ErrorCode.UNSUPPORTED_FORMAT,
                )
            fmt = AudioFormat(encoding, rate, channels)


def open_input(path: str | Path, raw_format: AudioFormat | None = None, *,
               stdin: BinaryIO | None = None) -> AudioInput:
    """Open a file or ``-`` (``stdin``, default ``sys.stdin.buffer``) as described above."""
    if is_stdio(path):
        stream = stdin if stdin is not None else sys.stdin.buffer
        head = _read_up_to(stream, 12)
        if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            fmt, size = _read_wav_header(stream, "stdin")
            return AudioInput("stdin", fmt, "wav", stream, size)
        if raw_format is None:
            what = "is empty" if not head else "is not a WAV stream"
            raise ConfigError(f"stdin {what}: raw PCM needs --format ENCODING:RATE[:CHANNELS], "
                              "e.g. --format s16le:16000", ErrorCode.UNSUPPORTED_FORMAT)
        return AudioInput("stdin", raw_format, "raw", _Prefixed(head, stream))
    return _open_file(Path(path), raw_format)


def _read_up_to(stream: _Readable, n: int) -> bytes:
    data = b""
    while len(data) < n and (got := stream.read(n - len(data))):
        data += got
    return data


def _open_file(path: Path, raw_format: AudioFormat | None) -> AudioInput:
    import soundfile

    if not path.exists():
        raise ConfigError(f"input file {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"input {str(path)!r} is a directory, not an audio file")
    try:
        with soundfile.SoundFile(str(path)) as f:
            info_format = f.format
            data = f.read(dtype="int16", always_2d=True)
            rate, channels = int(f.samplerate), int(f.channels)
    except soundfile.LibsndfileError as exc:
        if raw_format is not None:
            return AudioInput(str(path), raw_format, "raw", path.open("rb"))
        raise ConfigError(
            f"cannot read {str(path)!r} as audio ({exc.error_string}); for raw PCM "
            "give --format ENCODING:RATE[:CHANNELS]", ErrorCode.UNSUPPORTED_FORMAT
        ) from None
    fmt = AudioFormat(Encoding.PCM_S16LE, rate, channels)
    return AudioInput(str(path), fmt, str(info_format).lower(), io.BytesIO(data.tobytes()))


class _Prefixed:
    """A stream with bytes already read (the sniffed header) put back in front."""

    def __init__(self, head: bytes, rest: _Readable) -> None:
        self._head = head
        self._rest = rest

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            out = self._head if size < 0 else self._head[:size]
            self._head = self._head[len(out):]
            return out
        return self._rest.read(size)


# --- output --------------------------------------------------------------------------------


def wav_header(fmt: AudioFormat, data_bytes: int | None) -> bytes:
    """A RIFF/WAVE header for ``fmt``; ``None`` writes the "unknown length" sizes."""
    tag = _TAG_OF[fmt.encoding]
    bits = fmt.sample_bytes * 8
    extra = b"" if tag == 1 else struct.pack("<H", 0)  # cbSize for non-PCM tags
    fmt_body = struct.pack("<HHIIHH", tag, fmt.channels, fmt.sample_rate,
                           fmt.sample_rate * fmt.frame_bytes, fmt.frame_bytes, bits) + extra
    if data_bytes is None:
        riff, data = _UNKNOWN_SIZE, _UNKNOWN_SIZE
    else:
        riff, data = 4 + 8 + len(fmt_body) + 8 + data_bytes, data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body
            + b"data" + struct.pack("<I", data))


@dataclass
class AudioOutput:
    """A sink for bytes in ``format``: WAV or raw, to a file or stdout."""

    name: str
    format: AudioFormat
    container: str
    _stream: BinaryIO
    _owns: bool
    _written: int = 0

    def write(self, data: bytes) -> None:
        if len(data) % self.format.frame_bytes:
            raise ValueError("audio must be written in whole sample frames")
        self._stream.write(data)
        self._written += len(data)

    def close(self) -> None:
        """Flush; a WAV file gets its real sizes (a pipe keeps "unknown")."""
        if self._owns:
            if self.container == "wav":
                self._stream.seek(0)
                self._stream.write(wav_header(self.format, self._written))
            self._stream.close()
        else:
            self._stream.flush()

    def __enter__(self) -> AudioOutput:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_output(path: str | Path, fmt: AudioFormat, *, raw: bool = False,
                stdout: BinaryIO | None = None) -> AudioOutput:
    """``-`` writes to ``stdout`` (default ``sys.stdout.buffer``), raw if ``raw`` else WAV."""
    if is_stdio(path):
        stream = stdout if stdout is not None else sys.stdout.buffer
        if raw:
            return AudioOutput("stdout", fmt, "raw", stream, _owns=False)
        stream.write(wav_header(fmt, None))
        return AudioOutput("stdout", fmt, "wav", stream, _owns=False)
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"output {str(target)!r} is a directory")
    if not target.parent.exists():
        raise ConfigError(f"output directory {str(target.parent)!r} does not exist")
    stream = target.open("wb")
    stream.write(wav_header(fmt, 0))
    return AudioOutput(str(target), fmt, "wav", stream, _owns=True)
