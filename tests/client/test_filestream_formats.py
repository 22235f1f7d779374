"""`audiostream stream` with real files: Opus, FLAC, MP3 and odd-rate WAV in, WAV, FLAC and
Opus out, stdin/stdout, at the input's rate and exact length; the gateway's advertised
delay (`ready.delay_frames`) is the one compensated.

Speech comes from tests/data/speech_16k.wav, encoded here with PyAV (the project's
declared codec library), so no media is stored.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from audiostream.audiofile import decode, open_reader, resample
from audiostream.cli import main
from audiostream.client import AudioStreamClient
from audiostream.filestream import FileStreamOptions, choose_wire_rate, stream_file
from audiostream.gateway import GatewaySettings
from audiostream.processors import ProcessorRegistry, StepInput, StepOutput
from audiostream.processors import registry as builtin
from audiostream.testing import ThreadedServer
from audiostream.topology import Topology

ROOT = Path(__file__).resolve().parents[2]
SPEECH = ROOT / "tests" / "data" / "speech_16k.wav"
SHIFT = 100  # the "delayed" step's declared delay, known to the server only


def server_registry() -> ProcessorRegistry:
    reg = ProcessorRegistry()
    for name in ("passthrough", "denoise", "resample"):
        reg.add(builtin.get(name))

    @reg.per_item("delayed", stateful=True, delay_frames=lambda _rate, _p: SHIFT)
    def delayed(item: StepInput) -> StepOutput:
        """A pure delay line of SHIFT frames (its state: the last SHIFT frames)."""
        held = (np.zeros((SHIFT, item.audio.shape[1]), np.float32) if item.state is None
                else np.frombuffer(item.state, np.float32).reshape(SHIFT, -1))
        both = np.concatenate([held, item.audio])
        return StepOutput(both[: len(item.audio)].copy(), state=both[-SHIFT:].tobytes())

    return reg


@pytest.fixture(scope="module")
def srv() -> Iterator[ThreadedServer]:
    topo = Topology(processing_types=("passthrough", "denoise", "delayed", "resample"))
    with ThreadedServer(topology=topo, processors=server_registry(),
                        gateway_settings=GatewaySettings()) as s:
        yield s



def encode(dst: Path, codec: str, rate: int, fmt: str | None = None) -> None:
    """tests/data speech, resampled to ``rate``, encoded with PyAV."""
    data, src_rate = soundfile.read(str(SPEECH), dtype="int16", always_2d=True)
    data = resample(data, src_rate, rate)
    with av.open(str(dst), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def stream(srv: ThreadedServer, *args: str) -> tuple[int, dict[str, object]]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["stream", *args, "--url", srv.server.url, "--api-key",
                     srv.server.api_key, "--json", "--quiet", "--log-level", "warning"])
    text = buf.getvalue().strip()
    return code, (json.loads(text.splitlines()[-1]) if text else {})


@pytest.mark.parametrize(("suffix", "codec", "rate", "fmt"), [
    (".opus", "libopus", 48000, "ogg"),
    (".flac", "flac", 44100, None),
    (".mp3", "libmp3lame", 22050, None),
])
def test_compressed_speech_streams_at_the_decoded_length(
    srv: ThreadedServer, tmp_path: Path, suffix: str, codec: str, rate: int, fmt: str | None
) -> None:
    src, out = tmp_path / f"speech{suffix}", tmp_path / "out.wav"
    encode(src, codec, rate, fmt)
    decoded, decoded_rate = decode(src)
    code, report = stream(srv, str(src), str(out), "--pipeline", "passthrough",
                          "--rate", "max")
    assert code == 0 and report["dropped"] == 0
    back, back_rate = soundfile.read(str(out), dtype="int16", always_2d=True)
    assert back_rate == decoded_rate == report["input_rate"]
    assert back.shape == decoded.shape  # the decoded input's exact length
    assert report["frames_out"] == report["frames_in"] == decoded.shape[0]
    if report["wire_rate"] == decoded_rate:  # no conversion: passthrough is bit-exact
        assert np.array_equal(back, decoded)
    else:  # 22.05 kHz MP3: sent at 24 kHz and converted back, the same speech
        assert report["wire_rate"] == 24000
        err = back.astype(np.float64) - decoded
        assert np.sqrt(np.mean(err**2)) < 0.02 * np.sqrt(np.mean(decoded.astype(float) ** 2))


def test_22k_wav_through_denoise_goes_at_16k_without_drops(
    srv: ThreadedServer, tmp_path: Path
) -> None:
    """The weak spot of an earlier attempt: at 24 kHz most chunks expired. The wire rate
    is now the pipeline's native one, and the output is the input's rate and length."""
    src = tmp_path / "tts-22k.wav"
    data, rate = soundfile.read(str(SPEECH), dtype="int16", always_2d=True)
    x = resample(data, rate, 22050)
    soundfile.write(str(src), x, 22050, subtype="PCM_16")
    assert choose_wire_rate(22050, ["denoise"]) == 16000
    outs = {}
    for server_rate in ("auto", "24000"):
        out = tmp_path / f"out-{server_rate}.wav"
        code, report = stream(srv, str(src), str(out), "--pipeline", "denoise",
                              "--rate", "max", "--server-rate", server_rate)
        assert code == 0 and report["dropped"] == 0, report
        assert report["wire_rate"] == (16000 if server_rate == "auto" else 24000)
        y, y_rate = soundfile.read(str(out), dtype="int16", always_2d=True)
        assert y_rate == 22050 and y.shape == x.shape
        outs[server_rate] = y[:, 0].astype(np.float64)
    # Both wire rates give the same denoised speech (delay compensated in each),
    # apart from the conversions: strongly correlated, not merely similar in level.
    a, b = outs["auto"], outs["24000"]
    assert np.corrcoef(a, b)[0, 1] > 0.95


@pytest.mark.parametrize("suffix", [".flac", ".opus"])
def test_output_flac_and_opus_are_readable_at_the_input_length(
    srv: ThreadedServer, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"out{suffix}"
    code, report = stream(srv, str(SPEECH), str(out), "--pipeline", "passthrough",
                          "--rate", "max")
    assert code == 0 and report["dropped"] == 0
    x, rate = soundfile.read(str(SPEECH), dtype="int16", always_2d=True)
    back, back_rate = decode(out)
    if suffix == ".flac":
        assert back_rate == rate and np.array_equal(back, x)
    else:  # Opus is 48 kHz inside: the same duration, to the sample at 48 kHz
        assert back_rate == 48000
        assert back.shape[0] == round(x.shape[0] * 48000 / rate)
        assert out.stat().st_size < x.nbytes / 4


def _cli(*argv: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOSTREAM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return subprocess.run([sys.executable, "-m", "audiostream", *argv], input=stdin,
                          capture_output=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize("kind", ["mp3", "mp3-44k", "opus", "flac", "wav-22k"])
def test_stdin_and_stdout(srv: ThreadedServer, tmp_path: Path, kind: str) -> None:
    """`cat speech.mp3 | audiostream stream - - > out.wav`: a compressed stream (decoded
    as it arrives) or a WAV stream at a rate the wire refuses, in; a WAV stream out, the
    report on stderr; the output exactly as long as the file decodes."""
    src = tmp_path / ("speech.wav" if kind == "wav-22k" else f"speech.{kind.split('-')[0]}")
    if kind == "mp3":
        encode(src, "libmp3lame", 16000)
    elif kind == "mp3-44k":
        encode(src, "libmp3lame", 44100)
    elif kind == "opus":
        encode(src, "libopus", 48000, "ogg")
    elif kind == "flac":
        encode(src, "flac", 24000)
    else:
        data, rate = soundfile.read(str(SPEECH), dtype="int16", always_2d=True)
        soundfile.write(str(src), resample(data, rate, 22050), 22050, subtype="PCM_16")
    decoded, rate = decode(src)
    proc = _cli("stream", "-", "-", "--url", srv.server.url, "--api-key",
                srv.server.api_key, "--pipeline", "passthrough", "--rate", "max", "--quiet",
                "--json", stdin=src.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    back, back_rate = soundfile.read(io.BytesIO(proc.stdout), dtype="int16", always_2d=True)
    assert back_rate == rate and back.shape == decoded.shape
    if kind != "wav-22k":  # at a wire rate: bit-exact through passthrough
        assert np.array_equal(back, decoded)
    assert json.loads(proc.stderr.decode().strip().splitlines()[-1])["frames_out"] == len(back)


def test_offline_reads_a_compressed_stream_on_stdin(tmp_path: Path) -> None:
    """The README's `cat call.mp3 | audiostream offline - - --pipeline denoise > clean.wav`."""
    mp3 = tmp_path / "speech.mp3"
    encode(mp3, "libmp3lame", 22050)
    decoded, rate = decode(mp3)
    proc = _cli("offline", "-", "-", "--pipeline", "denoise", "--log-level", "warning",
                stdin=mp3.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    back, back_rate = soundfile.read(io.BytesIO(proc.stdout), dtype="int16", always_2d=True)
    assert back_rate == rate == 22050 and back.shape == decoded.shape


def test_the_gateways_advertised_delay_is_compensated(srv: ThreadedServer,
                                                      tmp_path: Path) -> None:
    """"delayed" is unknown to the client's registry: only `ready.delay_frames` can say
    it delays by SHIFT frames; with it the output is the input, sample for sample."""
    x, rate = soundfile.read(str(SPEECH), dtype="int16", always_2d=True)
    out = tmp_path / "out.wav"

    async def run() -> tuple[int | None, object]:
        client = AudioStreamClient(srv.server.url, api_key=srv.server.api_key)
        async with client.session(["denoise"], format=_fmt(rate)) as s:
            advertised = s.delay_frames
        report = await stream_file(client, SPEECH, out, ["delayed"],
                                   FileStreamOptions(chunk_ms=100))
        return advertised, report

    advertised, report = srv.run(run())
    assert advertised == 319  # NSNet2 at 16 kHz, from the gateway
    assert report.delay_frames == SHIFT  # type: ignore[attr-defined]
    y, _ = soundfile.read(str(out), dtype="int16", always_2d=True)
    assert np.array_equal(y, x)


def test_reader_is_incremental(tmp_path: Path) -> None:
    """A long file is decoded in pieces: reading 20 ms returns 20 ms, not the file."""
    mp3 = tmp_path / "speech.mp3"
    encode(mp3, "libmp3lame", 16000)
    with open_reader(mp3) as r:
        first = r.read(320)
        assert first.shape == (320, 1) and r.position == 320
        rest = r.read_all()
    assert np.array_equal(np.concatenate([first, rest]), decode(mp3)[0])


def _fmt(rate: int) -> object:
    from audiostream.audio import AudioFormat

    return AudioFormat.pcm16(rate)


def test_22k_denoise_streamed_equals_offline_sample_for_sample(
    srv: ThreadedServer, tmp_path: Path
) -> None:
    """`offline` converts to and from the same wire rate as `stream`, so the two agree
    exactly even for a file the wire does not take (soxr streaming = one-shot)."""
    src = tmp_path / "tts-22k.wav"
    data, rate = soundfile.read(str(SPEECH), dtype="int16", always_2d=True)
    soundfile.write(str(src), resample(data, rate, 22050), 22050, subtype="PCM_16")
    ref, streamed = tmp_path / "offline.wav", tmp_path / "streamed.wav"
    assert main(["offline", str(src), str(ref), "--pipeline", "denoise"]) == 0
    code, report = stream(srv, str(src), str(streamed), "--pipeline", "denoise",
                          "--rate", "max", "--no-compensate-delay")
    assert code == 0 and report["wire_rate"] == 16000
    a, a_rate = soundfile.read(str(ref), dtype="int16")
    b, b_rate = soundfile.read(str(streamed), dtype="int16")
    assert a_rate == b_rate == 22050
    assert np.array_equal(a, b)


@pytest.mark.parametrize(("suffix", "codec", "rate", "wire"), [
    (".flac", "flac", 16000, 16000),
    (".mp3", "libmp3lame", 22050, 24000),   # a rate neither the wire nor libopus takes
    (".flac", "flac", 44100, 48000),        # the wire takes 44.1 kHz, libopus does not
])
def test_encoding_opus_uploads_a_tenth_and_keeps_the_length(
    srv: ThreadedServer, tmp_path: Path, suffix: str, codec: str, rate: int, wire: int
) -> None:
    """`audiostream stream --encoding opus`: Opus packets on the wire, PCM back, the
    output at the decoded input's rate and exact length, and still the same speech."""
    src = tmp_path / f"speech{suffix}"
    encode(src, codec, rate)
    decoded, decoded_rate = decode(src)
    outs: dict[str, np.ndarray] = {}
    reports: dict[str, dict[str, object]] = {}
    for enc in ("pcm", "opus"):
        out = tmp_path / f"out-{enc}.wav"
        code, reports[enc] = stream(srv, str(src), str(out), "--pipeline", "passthrough",
                                    "--rate", "max", "--chunk-ms", "200", "--encoding", enc)
        assert code == 0 and reports[enc]["dropped"] == 0, reports[enc]
        back, back_rate = soundfile.read(str(out), dtype="int16", always_2d=True)
        assert back_rate == decoded_rate and back.shape == decoded.shape
        outs[enc] = back[:, 0].astype(np.float64)
    opus = reports["opus"]
    assert opus["encoding"] == "opus" and opus["wire_rate"] == wire
    assert opus["codec_delay_frames"] == 312 * wire // 48000  # libopus's look-ahead
    pcm_at_wire_rate = decoded.shape[0] / decoded_rate * wire * 2  # 16-bit mono
    assert isinstance(opus["wire_bytes"], int)
    assert 0 < opus["wire_bytes"] <= 0.15 * pcm_at_wire_rate
    ref = outs["pcm"]  # the decoded input, through the same rate conversions
    assert np.corrcoef(ref, outs["opus"])[0, 1] > 0.9  # aligned: the look-ahead is cut
    err = ref - outs["opus"]
    assert 10 * np.log10(np.sum(ref**2) / np.sum(err**2)) > 6.0


def test_encoding_opus_refuses_fill_input(srv: ThreadedServer, tmp_path: Path) -> None:
    code = main(["stream", str(SPEECH), str(tmp_path / "o.wav"), "--pipeline",
                 "passthrough", "--encoding", "opus", "--fill", "input", "--url",
                 srv.server.url, "--api-key", srv.server.api_key, "--quiet"])
    assert code != 0 and not (tmp_path / "o.wav").exists()
