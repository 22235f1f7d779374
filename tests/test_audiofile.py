"""audiofile: compressed and container input at any rate, WAV/FLAC/Opus output.

Speech comes from espeak-ng (installed by scripts/ensure-system-deps.sh) and is
encoded here with PyAV, so the tests need no stored media.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from audiostream.audiofile import (
    decode,
    mp3_gapless_length,
    open_reader,
    read_audio,
    wire_rate,
    write_audio,
)
from audiostream.audiofile import resample as read_resampled
from audiostream.cli import main
from audiostream.errors import ConfigError

SPEECH16 = Path(__file__).resolve().parent / "data" / "speech_16k.wav"


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """espeak-ng's own output: 22.05 kHz mono 16-bit WAV (a rate the wire refuses)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is required (scripts/ensure-system-deps.sh installs it)")
    out = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run([exe, "-w", str(out), "Streaming compressed audio files through the "
                    "gateway, at any sample rate."], check=True, timeout=60)
    return out


def encode(src: Path, dst: Path, codec: str, fmt: str | None = None) -> None:
    data, rate = soundfile.read(str(src), dtype="int16", always_2d=True)
    with av.open(str(dst), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=48000 if codec == "libopus" else rate)
        s.layout = "mono"  # type: ignore[union-attr]
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.mark.parametrize(("suffix", "codec", "fmt"), [
    (".opus", "libopus", "ogg"), (".flac", "flac", None), (".mp3", "libmp3lame", None)])
def test_compressed_speech_decodes_to_the_encoded_length(
        speech: Path, tmp_path: Path, suffix: str, codec: str, fmt: str | None) -> None:
    ref, ref_rate = soundfile.read(str(speech), dtype="int16", always_2d=True)
    path = tmp_path / f"speech{suffix}"
    encode(speech, path, codec, fmt)
    data, rate = decode(path)
    seconds, ref_seconds = data.shape[0] / rate, ref.shape[0] / ref_rate
    # Encoder delay and padding are trimmed: within one sample at the decoded rate.
    assert abs(seconds - ref_seconds) <= 1.5 / rate, (seconds, ref_seconds)
    assert np.sqrt(np.mean(data.astype(np.float64) ** 2)) > 300  # speech, not silence
    wired, wrate = read_audio(path)
    assert wrate in (24000, 48000)
    assert abs(wired.shape[0] / wrate - ref_seconds) < 2 / wrate
    if suffix == ".flac":  # lossless: the same samples back
        np.testing.assert_array_equal(data, ref)


def test_22k_wav_is_resampled_client_side(speech: Path) -> None:
    assert soundfile.info(str(speech)).samplerate == 22050
    data, rate = read_audio(speech)
    assert rate == 24000
    ref, _ = soundfile.read(str(speech), dtype="float64")
    assert data.shape == (round(len(ref) * 24000 / 22050), 1)
    # Same signal: energy preserved within 2 %.
    e_ref, e_out = np.mean(ref**2), np.mean((data[:, 0] / 32768.0) ** 2)
    assert abs(e_out / e_ref - 1) < 0.02


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_24", "PCM_32", "FLOAT", "ULAW"])
def test_wav_variants(tmp_path: Path, subtype: str) -> None:
    t = np.arange(16000) / 16000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / f"tone-{subtype}.wav"
    soundfile.write(str(path), np.stack([tone, -tone], axis=1), 16000, subtype=subtype)
    data, rate = read_audio(path)
    assert rate == 16000 and data.shape == (16000, 2)
    np.testing.assert_allclose(data[:, 0] / 32768.0, tone, atol=0.02)


def test_wire_rate() -> None:
    assert wire_rate(16000) == 16000
    assert wire_rate(22050) == 24000
    assert wire_rate(32000) == 44100
    assert wire_rate(11025) == 16000
    assert wire_rate(96000) == 48000


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".opus"])
def test_write_round_trip(speech: Path, tmp_path: Path, suffix: str) -> None:
    data, rate = read_audio(speech)
    out = tmp_path / f"out{suffix}"
    write_audio(out, data, rate)
    back, back_rate = decode(out)
    assert abs(back.shape[0] / back_rate - data.shape[0] / rate) < 2 / back_rate
    if suffix != ".opus":
        np.testing.assert_array_equal(back, data)
    else:
        assert back_rate == 48000
        assert out.stat().st_size < data.nbytes / 5  # ~32 kbit/s vs 384 kbit/s PCM


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_opus_output_is_aligned_and_as_long_as_the_input(tmp_path: Path, rate: int) -> None:
    """An .opus output decodes (48 kHz, as Opus always does) to the input's duration to
    the sample at 48 kHz, and in time with it: the Ogg muxer's pre-skip is the encoder's
    look-ahead, so the decoded speech sits at lag 0 (a wrong pre-skip shifts it by the
    look-ahead, 312 samples at 48 kHz)."""
    data, src = soundfile.read(str(SPEECH16), dtype="int16", always_2d=True)
    x = read_resampled(data, src, rate)
    out = tmp_path / "out.opus"
    write_audio(out, x, rate)
    back, back_rate = decode(out)
    assert back_rate == 48000 and back.shape[0] == round(len(x) * 48000 / rate)
    y = read_resampled(back, 48000, rate)[:, 0].astype(np.float64)
    a = x[:, 0].astype(np.float64)
    assert len(y) == len(a)
    n, lags = len(a), range(-200 * rate // 16000, 200 * rate // 16000 + 1)
    corr = [float(np.dot(a[max(0, -k):n - max(0, k)], y[max(0, k):n - max(0, -k)]))
            for k in lags]
    assert lags[int(np.argmax(corr))] == 0
    assert np.corrcoef(a, y)[0, 1] > 0.95


def test_offline_cli_writes_opus(tmp_path: Path) -> None:
    """`audiostream offline IN.wav OUT.opus`: the same duration, the same speech."""
    out = tmp_path / "out.opus"
    assert main(["offline", str(SPEECH16), str(out), "--pipeline", "passthrough"]) == 0
    x, rate = soundfile.read(str(SPEECH16), dtype="int16", always_2d=True)
    back, back_rate = decode(out)
    assert back_rate == 48000 and back.shape[0] == round(len(x) * 48000 / rate)
    y = read_resampled(back, 48000, rate)[:, 0].astype(np.float64)
    assert np.corrcoef(x[:, 0].astype(np.float64), y)[0, 1] > 0.95


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"not audio at all" * 10)
    with pytest.raises(ConfigError, match=r"cannot read junk\.mp3 as audio"):
        decode(junk)
    with pytest.raises(ConfigError, match="no such audio file"):
        decode(tmp_path / "missing.wav")
    with pytest.raises(ConfigError, match=r"use a \.wav, \.flac or \.opus"):
        write_audio(tmp_path / "x.aiff", np.zeros(10, np.int16), 16000)


def test_offline_cli_takes_mp3_and_writes_flac(speech: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    mp3 = tmp_path / "speech.mp3"
    encode(speech, mp3, "libmp3lame")
    out = tmp_path / "processed.flac"
    assert main(["offline", str(mp3), str(out), "--pipeline", "highpass"]) == 0
    info = soundfile.info(str(out))
    decoded, rate = decode(mp3)
    # Processed at 24 kHz (a wire rate), written back at the input's rate and length.
    assert (info.samplerate, info.frames) == (rate, decoded.shape[0]) == (22050, info.frames)
    assert "processed" in capsys.readouterr().out


@pytest.mark.parametrize(("suffix", "codec", "fmt"), [
    (".opus", "libopus", "ogg"), (".flac", "flac", None), (".mp3", "libmp3lame", None)])
async def test_compressed_speech_streams_through_a_gateway_at_full_length(
        speech: Path, tmp_path: Path, suffix: str, codec: str, fmt: str | None) -> None:
    """What ``audiostream stream`` does with a file: read_audio, then the SDK streams
    the samples; the processed audio has exactly the decoded input's length."""
    from audiostream.audio import AudioFormat, Encoding
    from audiostream.client import AudioStreamClient
    from audiostream.gateway import GatewaySettings
    from audiostream.testing import embedded_server

    path = tmp_path / f"speech{suffix}"
    encode(speech, path, codec, fmt)
    samples, rate = read_audio(path)
    async with embedded_server(gateway_settings=GatewaySettings(chunk_rate=None),
                               processing=("highpass",)) as server:
        client = AudioStreamClient(server.url, api_key=server.api_key, pipeline=["highpass"],
                                   format=AudioFormat(Encoding.PCM_S16LE, rate, 1))
        result = await client.stream(samples, chunk_ms=20, rate=None)
    assert not result.dropped
    out = np.concatenate([np.frombuffer(o, "<i2") for o in result.outcomes
                          if isinstance(o, bytes)])
    assert out.shape[0] == samples.shape[0]
    written = tmp_path / f"out{suffix if suffix != '.mp3' else '.wav'}"
    write_audio(written, out, rate)
    back, back_rate = decode(written)
    assert abs(back.shape[0] / back_rate - samples.shape[0] / rate) < 2 / back_rate


class _Gate:
    """stdin as a pipe that has delivered only its first ``open_at`` bytes so far: a
    read past them before ``release()`` fails, as a reader that waits for the end of a
    live pipe would hang. Only ``read``, like a pipe (no seek)."""

    def __init__(self, data: bytes, open_at: int) -> None:
        self.data, self.limit, self.pos = data, open_at, 0
        self.high = 0

    def release(self) -> None:
        self.limit = len(self.data)

    def read(self, n: int = -1, /) -> bytes:
        end = len(self.data) if n < 0 else min(self.pos + n, self.limit)
        if end > self.limit or (end == self.pos and self.pos < len(self.data)):
            raise AssertionError(f"read past byte {self.limit} before any audio came out")
        out = self.data[self.pos:end]
        self.pos = end
        self.high = max(self.high, end)
        return out


@pytest.mark.parametrize(("rate", "suffix", "codec", "fmt"), [
    (16000, ".mp3", "libmp3lame", None),    # MPEG-2 layer III, 576 samples per frame
    (44100, ".mp3", "libmp3lame", None),    # MPEG-1, 1152
    (8000, ".mp3", "libmp3lame", None),     # MPEG-2.5
    (48000, ".opus", "libopus", "ogg"),
    (16000, ".flac", "flac", None),
])
def test_compressed_stdin_decodes_as_it_arrives_at_the_files_length(
        tmp_path: Path, rate: int, suffix: str, codec: str, fmt: str | None) -> None:
    """`cat long.mp3 | audiostream stream - ...`: audio comes out of the first part of
    the pipe before the rest has arrived (memory does not grow with the input), and the
    whole comes out exactly as long as the file decodes (MP3: the end padding trimmed
    from the LAME header, which FFmpeg uses only on a seekable file)."""
    x, src_rate = soundfile.read(str(SPEECH16), dtype="int16", always_2d=True)
    x = np.tile(read_resampled(x, src_rate, rate), (8, 1))  # 30 s
    wav, path = tmp_path / "long.wav", tmp_path / f"long{suffix}"
    soundfile.write(str(wav), x, rate, subtype="PCM_16")
    encode(wav, path, codec, fmt)
    ref, ref_rate = decode(path)
    data = path.read_bytes()
    gate = _Gate(data, len(data) // 3)
    with open_reader("-", stdin=gate) as r:  # type: ignore[arg-type]
        assert r.rate == ref_rate
        first = r.read(ref_rate)  # the first second
        assert gate.high <= len(data) // 3
        gate.release()
        rest = r.read_all()
    got = np.concatenate([first, rest])
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def test_mp3_gapless_length_needs_both_headers(tmp_path: Path) -> None:
    x, rate = soundfile.read(str(SPEECH16), dtype="int16", always_2d=True)
    wav, mp3 = tmp_path / "s.wav", tmp_path / "s.mp3"
    soundfile.write(str(wav), x, rate, subtype="PCM_16")
    encode(wav, mp3, "libmp3lame")
    head = mp3.read_bytes()[:8192]
    assert mp3_gapless_length(head) == decode(mp3)[0].shape[0] == x.shape[0]
    at = head.find(b"Info") if b"Info" in head else head.find(b"Xing")
    assert mp3_gapless_length(head[:at] + b"Nope" + head[at + 4:]) is None
    assert mp3_gapless_length(b"OggS" + bytes(100)) is None
