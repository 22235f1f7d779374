"""Silero VAD streaming: probabilities equal one-window-at-a-time offline runs."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soxr

from audiostream.errors import ConfigError, ErrorCode, ProcessingError
from audiostream.models import files, silero
from tests.models.signals import load_speech


def offline_probabilities(x: np.ndarray, rate: int) -> np.ndarray:
    """Upstream ``OnnxWrapper`` semantics over a whole file, one window per call."""
    session = ort.InferenceSession(
        str(files.source_path("silero-vad")), providers=["CPUExecutionProvider"]
    )
    win, ctx = silero.WINDOW[rate], silero.CONTEXT[rate]
    context = np.zeros(ctx, np.float32)
    state = np.zeros((2, 1, 128), np.float32)
    probs = []
    for start in range(0, len(x) - win + 1, win):
        chunk = np.concatenate([context, x[start : start + win]])[None]
        out, state = session.run(
            None, {"input": chunk, "state": state, "sr": np.array(rate, np.int64)}
        )
        probs.append(float(out[0, 0]))
        context = chunk[0, -ctx:]
    return np.array(probs, np.float32)


def speech(rate: int) -> np.ndarray:
    x = load_speech(16000)
    return x if rate == 16000 else soxr.resample(x, 16000, rate).astype(np.float32)


@pytest.fixture(scope="module")
def det(model_dir: Path) -> silero.Detector:
    return silero.detector(model_dir=model_dir)


def run_stream(
    det: silero.Detector, x: np.ndarray, rate: int, sizes: list[int]
) -> tuple[list[float], list[tuple[str, int]]]:
    state = None
    probs: list[float] = []
    events: list[tuple[str, int]] = []
    pos = k = 0
    while pos < len(x):
        chunk = x[pos : pos + sizes[k % len(sizes)]]
        (res,) = det.process([(chunk[:, None], state, silero.Hysteresis())], rate)
        assert all(0 < w.end <= len(chunk) for w in res.windows)
        probs += [w.probability for w in res.windows]
        events += [(e.name, pos + e.end) for e in res.events]
        state = res.state
        pos += len(chunk)
        k += 1
    return probs, events


@pytest.mark.parametrize("rate", [16000, 8000])
@pytest.mark.parametrize("chunk_ms", [20, 32, 7])
def test_streaming_equals_offline(det: silero.Detector, rate: int, chunk_ms: int) -> None:
    x = speech(rate)
    probs, events = run_stream(det, x, rate, [rate * chunk_ms // 1000])
    assert np.array_equal(np.array(probs, np.float32), offline_probabilities(x, rate))
    # speech is 0.5 s .. 3.34 s; start within a window, end after >=100 ms of silence
    assert [name for name, _ in events] == ["speech_start", "speech_end"]
    assert 0.5 <= events[0][1] / rate <= 0.6
    assert 3.3 <= events[1][1] / rate <= 3.6


def test_batches_of_mixed_sessions_equal_offline(det: silero.Detector) -> None:
    signals = [speech(16000)[i * 4000 :] for i in range(3)]
    refs = [offline_probabilities(s, 16000) for s in signals]
    rng = np.random.default_rng(5)
    pos = [0, 0, 0]
    states: list[bytes | None] = [None] * 3
    got: list[list[float]] = [[], [], []]
    while any(p < len(s) for p, s in zip(pos, signals, strict=True)):
        members = [i for i in range(3) if pos[i] < len(signals[i]) and rng.random() < 0.7]
        items = []
        for i in members:
            n = int(rng.choice([160, 320, 512, 1500]))
            items.append((signals[i][pos[i] : pos[i] + n, None], states[i], silero.Hysteresis()))
            pos[i] += n
        for i, res in zip(members, det.process(items, 16000), strict=True):
            got[i] += [w.probability for w in res.windows]
            states[i] = res.state
    for g, ref in zip(got, refs, strict=True):
        assert np.array_equal(np.array(g, np.float32), ref)


class ScriptedModel:
    """Stands in for the ONNX model to test the hysteresis alone."""

    def __init__(self, probs: list[float]) -> None:
        self.probs = iter(probs)
        self.lock = threading.Lock()
        self.providers = ["scripted"]

    def run(self, x: np.ndarray, state: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array([next(self.probs) for _ in range(len(x))], np.float32), state


def test_hysteresis_start_end_and_cancelled_silence() -> None:
    probs = [0.1, 0.6, 0.4, 0.2, 0.2, 0.7, 0.3, 0.3, 0.3, 0.3, 0.3, 0.9]
    det = silero.Detector(ScriptedModel(probs))
    (res,) = det.process(
        [(np.zeros((512 * len(probs), 1), np.float32), None, silero.Hysteresis())], 16000
    )
    windows = {w.end // 512 - 1: w.probability for w in res.windows}
    assert len(windows) == len(probs)
    # start at window 1; 0.4 is between thresholds (no silence); silence from window 3 is
    # cancelled by 0.7 at window 5; silence from window 6 lasts >= 100 ms (1600 samples)
    # at window 6 + 4 = 10 (4 * 512 = 2048 >= 1600); restart at window 11.
    assert [(e.name, e.end // 512 - 1) for e in res.events] == [
        ("speech_start", 1),
        ("speech_end", 10),
        ("speech_start", 11),
    ]


def test_hysteresis_state_survives_message_boundaries() -> None:
    probs = [0.9, 0.1, 0.1, 0.1, 0.1, 0.1]
    det = silero.Detector(ScriptedModel(probs))
    state = None
    events = []
    for k in range(len(probs)):
        (res,) = det.process(
            [(np.zeros((512, 1), np.float32), state, silero.Hysteresis(min_silence_ms=60))],
            16000,
        )
        events += [(e.name, k) for e in res.events]
        state = res.state
    # silence starts at window 1 (temp_end=1024); 1024 + 960 -> ends at window 3 (2048 >= 1984)
    assert events == [("speech_start", 0), ("speech_end", 3)]


def test_params() -> None:
    h = silero.Hysteresis.from_params({"threshold": 0.6})
    assert h.neg_threshold == pytest.approx(0.45)
    for bad in (
        {"threshold": 0.3, "neg_threshold": 0.4},
        {"threshold": "x"},
        {"min_silence_ms": -1},
    ):
        with pytest.raises(ConfigError) as err:
            silero.Hysteresis.from_params(bad)
        assert err.value.code is ErrorCode.INVALID_OPTION


def test_bad_state_and_rate(det: silero.Detector) -> None:
    (res,) = det.process([(np.zeros((700, 1), np.float32), None, silero.Hysteresis())], 16000)
    state = res.state
    hyst = silero.Hysteresis()
    audio = np.zeros((256, 1), np.float32)
    with pytest.raises(ProcessingError, match="made at 16000 Hz"):
        det.process([(audio, state, hyst)], 8000)
    with pytest.raises(ProcessingError, match="version 2"):
        det.process([(audio, state[:4] + b"\x02\x00" + state[6:], hyst)], 16000)
    with pytest.raises(ProcessingError, match="expected"):
        det.process([(audio, state[:-8], hyst)], 16000)
    with pytest.raises(ProcessingError, match="not a Silero"):
        det.process([(audio, b"NSN2" + state[4:], hyst)], 16000)
    with pytest.raises(ConfigError) as err:
        det.process([(audio, None, hyst)], 48000)
    assert err.value.code is ErrorCode.UNSUPPORTED_FORMAT
