"""``-`` for stdin/stdout: WAV detected, raw PCM with --format, and the offline command piped."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ConfigError
from audiostream.pcmio import open_input, open_output, parse_format, wav_header
from audiostream.testing import sample_wav
from tests.cli.test_errors import run_cli

S16_16K = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


class Trickle(io.RawIOBase):
    """A pipe that hands out at most ``step`` bytes per read, like a slow writer."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._step = data, step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._step if size < 0 else min(size, self._step)
        out, self._data = self._data[:n], self._data[n:]
        return out


@pytest.mark.parametrize(
    ("text", "fmt"),
    [("s16le:16000", S16_16K), ("pcm_f32le:48000:2", AudioFormat(Encoding.PCM_F32LE, 48000, 2)),
     ("mulaw:8000", AudioFormat(Encoding.MULAW, 8000, 1)),
     ("ALAW:8000:1", AudioFormat(Encoding.ALAW, 8000, 1))],
)
def test_parse_format(text: str, fmt: AudioFormat) -> None:
    assert parse_format(text) == fmt


@pytest.mark.parametrize("text", ["s16le", "s16le:x", "opus:48000", "mulaw:16000", "s16le:1:2:3"])
def test_parse_format_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_format(text)


@pytest.mark.parametrize("fmt", [S16_16K, AudioFormat(Encoding.PCM_F32LE, 48000, 2),
                                 AudioFormat(Encoding.MULAW, 8000, 1),
                                 AudioFormat(Encoding.ALAW, 8000, 1)])
@pytest.mark.parametrize("known_size", [True, False])
def test_a_wav_stream_is_detected_and_read_incrementally(fmt: AudioFormat, known_size: bool
                                                         ) -> None:
    pcm = bytes(range(256)) * 40
    pcm = pcm[: len(pcm) - len(pcm) % fmt.frame_bytes]
    # A LIST chunk before data, as many writers add, must be skipped.
    header = wav_header(fmt, len(pcm) if known_size else None)
    list_chunk = b"LIST" + struct.pack("<I", 5) + b"abcde\0"
    data_at = header.index(b"data")
    riff = header[:data_at] + list_chunk + header[data_at:]
    src = open_input("-", stdin=Trickle(riff + pcm, 7))
    assert src.container == "wav" and src.format == fmt
    assert b"".join(src.blocks(10)) == pcm


def test_soundfile_reads_what_the_wav_writer_wrote(tmp_path: Path) -> None:
    tone = (np.sin(np.arange(1600) / 5) * 8000).astype("<i2")
    out = tmp_path / "o.wav"
    with open_output(out, S16_16K) as sink:
        sink.write(tone.tobytes())
    data, rate = soundfile.read(out, dtype="int16")
    assert rate == 16000 and np.array_equal(data, tone)


def test_raw_stdin_needs_format_and_drops_a_torn_last_frame() -> None:
    raw = b"\x01\x00" * 100 + b"\x07"  # a torn last sample
    with pytest.raises(ConfigError, match="--format"):
        open_input("-", stdin=io.BytesIO(raw))
    src = open_input("-", S16_16K, stdin=io.BytesIO(raw))
    assert src.container == "raw" and src.read_all() == b"\x01\x00" * 100


def test_a_24_bit_wav_on_a_pipe_is_refused_with_a_reason() -> None:
    fmt_body = struct.pack("<HHIIHH", 1, 1, 16000, 48000, 3, 24)
    wav = (b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
           + fmt_body + b"data" + struct.pack("<I", 0))
    with pytest.raises(ConfigError, match="24-bit"):
        open_input("-", stdin=io.BytesIO(wav))


def test_offline_through_pipes_matches_offline_on_files(tmp_path: Path) -> None:
    """`offline - -` with WAV and with raw PCM gives the bytes `offline IN OUT` gives."""
    reference = tmp_path / "ref.wav"
    assert run_cli(["offline", str(sample_wav()), str(reference), "--pipeline", "highpass"]
                   ).returncode == 0
    expected, _ = soundfile.read(reference, dtype="int16")
    wav_in = sample_wav().read_bytes()
    piped = run_cli(["offline", "-", "-", "--pipeline", "highpass"], stdin=wav_in)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout[:4] == b"RIFF" and b"processed" in piped.stderr
    got, rate = soundfile.read(io.BytesIO(piped.stdout[44:]), dtype="int16",
                               format="RAW", subtype="PCM_16", samplerate=16000, channels=1)
    assert rate == 16000 and np.array_equal(got, expected)
    raw_in, _ = soundfile.read(sample_wav(), dtype="int16")
    raw = run_cli(["offline", "-", "-", "--pipeline", "highpass", "--format", "s16le:16000"],
                  stdin=raw_in.astype("<i2").tobytes())
    assert raw.returncode == 0, raw.stderr
    assert np.array_equal(np.frombuffer(raw.stdout, dtype="<i2"), expected)
