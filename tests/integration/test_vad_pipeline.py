"""``vad`` through gateway + RabbitMQ + worker: events equal Silero run offline.

The reference is the upstream model file run directly with ONNX Runtime, one
window per call over the whole recording (upstream ``OnnxWrapper`` semantics),
and upstream ``VADIterator``'s hysteresis (without padding) on those
probabilities. Streams are sent as fast as possible, so the gateway coalesces
chunks into messages of varying size: the events must not depend on that.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import soxr

from audiostream import audio
from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient, StreamResult
from audiostream.gateway import GatewaySettings
from audiostream.models import files, prepare
from audiostream.processors import resample
from audiostream.testing import Embedded, default_topology, embedded_server
from audiostream.worker import WorkerSettings
from tests.conftest import delete_prefixed, unique_prefix

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
SPEECH = ROOT / "tests" / "data" / "speech_16k.wav"  # 0.5 s silence, 2.8 s speech, 0.5 s
WINDOW = {16000: 512, 8000: 256}
CONTEXT = {16000: 64, 8000: 32}
THRESHOLD, NEG_THRESHOLD, MIN_SILENCE_MS = 0.5, 0.35, 100.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("vad-models")
    prepare.prepare(directory, optimized=False)
    return directory


def speech_signal(rate: int) -> np.ndarray:
    """Speech, a 0.6 s pause, the speech again, with light noise: two utterances."""
    clean, sr = sf.read(SPEECH, dtype="float32")
    clean = np.concatenate([clean, clean[round(0.4 * sr):]])
    if rate != sr:
        clean = soxr.resample(clean, sr, rate, quality="HQ").astype(np.float32)
    noise = np.random.default_rng(5).standard_normal(clean.size).astype(np.float32)
    return np.clip(clean + 0.003 * noise, -1, 1).astype(np.float32)


def offline_probabilities(x: np.ndarray, rate: int) -> np.ndarray:
    session = ort.InferenceSession(str(files.source_path("silero-vad")),
                                   providers=["CPUExecutionProvider"])
    win, ctx = WINDOW[rate], CONTEXT[rate]
    context = np.zeros(ctx, np.float32)
    state = np.zeros((2, 1, 128), np.float32)
    probs = []
    for start in range(0, len(x) - win + 1, win):
        chunk = np.concatenate([context, x[start : start + win]])[None]
        out, state = session.run(
            None, {"input": chunk, "state": state, "sr": np.array(rate, np.int64)})
        probs.append(float(out[0, 0]))
        context = chunk[0, -ctx:]
    return np.array(probs, np.float64)


def offline_marks(probs: np.ndarray, rate: int) -> list[tuple[str, int]]:
    """Upstream VADIterator decisions: (name, index of the deciding window)."""
    win = WINDOW[rate]
    min_silence = MIN_SILENCE_MS * rate / 1000
    triggered, temp_end = False, 0
    marks = []
    for k, p in enumerate(probs):
        current = (k + 1) * win
        if p >= THRESHOLD:
            temp_end = 0
            if not triggered:
                triggered = True
                marks.append(("speech_start", k))
        elif p < NEG_THRESHOLD and triggered:
            temp_end = temp_end or current
            if current - temp_end >= min_silence:
                temp_end, triggered = 0, False
                marks.append(("speech_end", k))
    return marks


@contextlib.asynccontextmanager
async def server(url: str, model_dir: Path) -> AsyncIterator[Embedded]:
    topology = default_topology(prefix=unique_prefix())
    try:
        async with embedded_server(
            broker_url=url, topology=topology,
            worker_settings=WorkerSettings(processing=("vad", "resample"), model_dir=model_dir),
            gateway_settings=GatewaySettings(chunk_rate=None),
        ) as srv:
            yield srv
    finally:
        await delete_prefixed(url, topology)


Log = list[tuple[str, int, dict[str, Any]]]


async def stream_vad(url: str, model_dir: Path, x: np.ndarray, rate: int, chunk_ms: int
                     ) -> tuple[StreamResult, Log, np.ndarray]:
    """Stream ``x`` as int16; returns the result, what arrived in arrival order
    (("event", seq, data) / ("audio", seq, {})), and the float audio the server saw."""
    fmt = AudioFormat(Encoding.PCM_S16LE, rate, 1)
    sent = audio.decode(fmt, audio.encode(fmt, x[:, None]))[:, 0]
    log: Log = []
    async with server(url, model_dir) as srv:
        c = AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["vad"], format=fmt,
                              deadline_ms=10_000)
        c.on_event(lambda ev: log.append(("event", ev.seq, dict(ev.data))))
        c.on_audio(lambda seq, _pcm: log.append(("audio", seq, {})))
        result = await c.stream(sent, chunk_ms=chunk_ms, rate=None)
    assert not result.dropped and not result.errors and result.close_code == 1000
    # vad passes the audio through untouched (48 kHz: through 48 -> 16 -> 48 kHz resampling)
    if rate in WINDOW:
        assert result.audio == audio.encode(fmt, sent[:, None])
    return result, log, sent


def model_input(sent: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    """What Silero sees: the audio itself, or its streaming resampling to 16 kHz."""
    if rate in WINDOW:
        return sent, rate
    return resample.one_shot(sent[:, None], rate, 16000)[:, 0], 16000


CASES = [(16000, 20), (16000, 10), (8000, 20), (48000, 20)]


@pytest.mark.parametrize(("rate", "chunk_ms"), CASES)
async def test_probabilities_and_marks_equal_offline_silero(
    rabbitmq_url: str, model_dir: Path, rate: int, chunk_ms: int
) -> None:
    result, _, sent = await stream_vad(rabbitmq_url, model_dir, speech_signal(rate), rate,
                                         chunk_ms)
    x, model_rate = model_input(sent, rate)
    ref = offline_probabilities(x, model_rate)
    events = [e.data for e in result.events]
    assert all(e["step"] == "vad" for e in events)
    probs = np.array([e["probability"] for e in events if e["name"] == "vad"])
    assert probs.size == ref.size == x.size // WINDOW[model_rate]
    # Equal to float32 precision; in fact bit-equal (both are float32 from one kernel).
    assert np.max(np.abs(probs - ref)) <= 1e-6
    assert np.array_equal(probs, ref)
    # speech_start / speech_end: the same windows as upstream's iterator decides.
    marks, windows = [], 0
    for e in events:
        if e["name"] == "vad":
            windows += 1
        else:
            marks.append((e["name"], windows - 1))  # each mark follows its deciding window
    expected = offline_marks(ref, model_rate)
    assert [m for m, _ in expected] == ["speech_start", "speech_end"] * 2
    assert marks == expected


@pytest.mark.parametrize(("rate", "chunk_ms"), CASES)
async def test_events_arrive_in_order_beside_their_chunk(
    rabbitmq_url: str, model_dir: Path, rate: int, chunk_ms: int
) -> None:
    result, log, _ = await stream_vad(rabbitmq_url, model_dir, speech_signal(rate), rate,
                                         chunk_ms)
    chunks = len(result.outcomes)
    assert [seq for kind, seq, _ in log if kind == "audio"] == list(range(chunks))
    audio_seen = 0  # audio outcomes received so far
    last_seq = 0
    last_vad_seq = -1
    previous: dict[str, Any] | None = None
    for kind, seq, data in log:
        if kind == "audio":
            audio_seen += 1
            continue
        # An event comes right before the audio of its chunk: after chunk seq-1's audio.
        assert seq == audio_seen, (seq, audio_seen, data)
        assert data["seq"] == seq and 0 <= seq < chunks
        assert seq >= last_seq
        last_seq = seq
        if data["name"] == "vad":
            assert seq >= last_vad_seq
            last_vad_seq = seq
        else:
            # speech_start/speech_end come right after the window that decided them
            assert previous is not None and previous["name"] == "vad", data
            assert previous["seq"] == seq
        previous = data
    names = [d["name"] for kind, _, d in log if kind == "event" and d["name"] != "vad"]
    assert names == ["speech_start", "speech_end"] * 2


@pytest.mark.parametrize(("rate", "chunk_ms"), [(16000, 20)])
async def test_event_seq_and_offset_place_the_window_in_its_chunk(
    rabbitmq_url: str, model_dir: Path, rate: int, chunk_ms: int
) -> None:
    """The documented ``{"seq": 40, "offset": 112}``: a window ending at stream frame
    E belongs to the chunk holding frame E-1, at ``offset = E - chunk start`` frames
    (in (0, chunk length]), whatever messages the gateway made of the chunks."""
    result, _, _ = await stream_vad(rabbitmq_url, model_dir, speech_signal(rate), rate,
                                      chunk_ms)
    frames = rate * chunk_ms // 1000
    windows = [e.data for e in result.events if e.data["name"] == "vad"]
    placed = [(w["seq"], w["offset"]) for w in windows]
    expected = []
    for k in range(len(windows)):
        end = (k + 1) * WINDOW[rate]
        seq = (end - 1) // frames
        expected.append((seq, end - seq * frames))
    assert placed == expected
