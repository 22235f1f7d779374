"""File mode (`audiostream stream IN OUT`): complete, same timeline, delay compensated,
drops visible in the exit code, bad chunk sizes refused before streaming."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiostream.audio import AudioFormat
from audiostream.cli import main
from audiostream.filestream import pipeline_delay
from audiostream.gateway import GatewaySettings
from audiostream.processors import ProcessorRegistry, StepInput, StepOutput
from audiostream.processors import registry as builtin
from audiostream.testing import ThreadedServer, sample_wav
from audiostream.topology import Topology
from audiostream.worker.offline import run_offline

MARK = 12345  # a chunk starting with this sample fails in the "flaky" step


def flaky_registry() -> ProcessorRegistry:
    reg = ProcessorRegistry()
    for name in ("passthrough", "denoise"):
        reg.add(builtin.get(name))

    @reg.per_item("flaky")
    def flaky(item: StepInput) -> StepOutput:
        """Fails messages holding a marked chunk (coalesced neighbours fail with it)."""
        if (np.rint(item.audio[:, 0] * 32768) == MARK).any():
            raise RuntimeError("marked chunk")
        return StepOutput(item.audio)

    return reg


@pytest.fixture(scope="module")
def srv() -> Iterator[ThreadedServer]:
    topo = Topology(processing_types=("passthrough", "denoise", "flaky"))
    with ThreadedServer(topology=topo, processors=flaky_registry(),
                        gateway_settings=GatewaySettings()) as s:
        yield s



def run(srv: ThreadedServer, *args: str) -> tuple[int, dict[str, object]]:
    out_json = Path(args[1]).with_suffix(".json")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["stream", *args, "--url", srv.server.url, "--api-key",
                     srv.server.api_key, "--json", "--quiet", "--log-level", "warning"])
    text = buf.getvalue().strip()
    out_json.write_text(text)
    return code, (json.loads(text.splitlines()[-1]) if text else {})


def read(path: Path) -> np.ndarray:
    data, _ = soundfile.read(str(path), dtype="int16", always_2d=True)
    return data


def test_ten_minutes_of_passthrough_at_rate_max_is_complete_and_bit_exact(
    srv: ThreadedServer, tmp_path: Path
) -> None:
    x = (np.random.default_rng(10).standard_normal(16000 * 600) * 3000).astype(np.int16)
    src, out = tmp_path / "in.wav", tmp_path / "out.wav"
    soundfile.write(str(src), x, 16000, subtype="PCM_16")
    code, report = run(srv, str(src), str(out), "--pipeline", "passthrough", "--rate", "max",
                       "--chunk-ms", "1000")
    assert code == 0 and report["dropped"] == 0 and report["chunks"] == 600
    assert np.array_equal(read(out)[:, 0], x)
    assert report["frames_out"] == report["frames_in"] == x.size


def test_denoise_streamed_equals_offline_with_and_without_compensation(
    srv: ThreadedServer, tmp_path: Path
) -> None:
    x, rate = soundfile.read(str(sample_wav()), dtype="int16", always_2d=True)
    fmt = AudioFormat.pcm16(rate)
    assert pipeline_delay(["denoise"], fmt) == 319
    offline = np.frombuffer(run_offline(x.tobytes(), fmt, ["denoise"]), "<i2")
    raw, comp = tmp_path / "raw.wav", tmp_path / "comp.wav"
    code, report = run(srv, str(sample_wav()), str(raw), "--pipeline", "denoise",
                       "--rate", "max", "--no-compensate-delay")
    assert code == 0 and report["delay_compensated_frames"] == 0
    assert np.array_equal(read(raw)[:, 0], offline)  # same delay as `audiostream offline`
    code, report = run(srv, str(sample_wav()), str(comp), "--pipeline", "denoise",
                       "--rate", "max", "--chunk-ms", "100")
    assert code == 0 and report["delay_compensated_frames"] == 319
    aligned = read(comp)[:, 0]
    assert aligned.size == x.shape[0]
    assert np.array_equal(aligned[: -319], offline[319:])  # the delay is gone
    # ... and the tail (which `offline` leaves in the delay line) was flushed out.
    assert np.abs(aligned[-319:].astype(np.int32)).max() > 0


@pytest.mark.parametrize("fill", ["silence", "input"])
def test_chunks_without_audio_keep_their_place_and_fail_the_exit_code(
    srv: ThreadedServer, tmp_path: Path, fill: str
) -> None:
    x = (np.random.default_rng(5).standard_normal(16000 * 3) * 3000).astype(np.int16)
    x[x == MARK] = 0
    marked = [7, 30, 31]
    for c in marked:
        x[c * 320] = MARK
    src, out = tmp_path / "in.wav", tmp_path / "out.wav"
    soundfile.write(str(src), x, 16000, subtype="PCM_16")
    code, report = run(srv, str(src), str(out), "--pipeline", "flaky", "--rate", "max",
                       "--fill", fill)
    y = read(out)[:, 0]
    assert code == 3 and report["dropped"] >= len(marked)
    assert report["dropped_by_reason"] == {"processing_failed": report["dropped"]}
    assert y.size == x.size
    if fill == "input":
        assert np.array_equal(y, x)
    else:
        for c in marked:
            assert not y[c * 320:(c + 1) * 320].any()
        kept = y != 0
        assert np.array_equal(y[kept], x[kept])


def test_bad_chunk_size_is_refused_before_streaming(
    srv: ThreadedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.wav"
    code = main(["stream", str(sample_wav()), str(out), "--url", srv.server.url,
                 "--api-key", srv.server.api_key, "--pipeline", "passthrough",
                 "--chunk-ms", "5000", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--chunk-ms 5000 is out of range" in err and "Traceback" not in err
    assert not out.exists()
