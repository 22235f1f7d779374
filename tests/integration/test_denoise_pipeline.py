"""Streamed ``denoise`` through gateway + RabbitMQ + workers equals ``run_offline`` on the file.

The offline reference is ``audiostream.worker.offline.run_offline``: the same step
code on the whole recording as one message with fresh state. Streaming splits the
recording into many messages whose NSNet2 / resampler state travels in the
messages, so equality shows that the state is complete and applied in order,
whichever worker, message boundaries and batch neighbours a chunk gets.

Audio is sent as ``pcm_f32le`` so that the comparison is in float (int16 would hide
differences below 3e-5). The contract is max |streamed - offline| <= 1e-4; on
CPU with the fp32 graph the result is in fact bit-equal (asserted separately, so a
platform where it is not shows up as exactly that failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from audiostream import audio
from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient, StreamResult
from audiostream.gateway import GatewaySettings
from audiostream.models import nsnet2, prepare
from audiostream.processors import ProcessorContext, ProcessorRegistry, registry
from audiostream.processors.base import ProcessorSpec
from audiostream.testing import Embedded, default_topology, embedded_server
from audiostream.topology import Topology
from audiostream.worker import WorkerSettings
from audiostream.worker.offline import run_offline
from tests.conftest import delete_prefixed, unique_prefix

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
SPEECH = ROOT / "tests" / "data" / "speech_16k.wav"  # 0.5 s silence, 2.8 s speech, 0.5 s
TOLERANCE = 1e-4
#: Irregular chunk sizes in frames: not multiples of the 10 ms hop, some tiny.
IRREGULAR = (1, 7, 160, 333, 999, 2, 480)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("denoise-models")
    prepare.prepare(directory, optimized=False)
    return directory


def noisy_speech(rate: int, snr_db: float = 5.0, seed: int = 0, seconds: float | None = None
                 ) -> np.ndarray:
    """espeak-ng speech (checked in) at ``rate`` plus seeded white noise at ``snr_db``."""
    clean, sr = sf.read(SPEECH, dtype="float32")
    if rate != sr:
        clean = soxr.resample(clean, sr, rate, quality="HQ").astype(np.float32)
    if seconds is not None:
        clean = clean[: round(seconds * rate)]
    noise = np.random.default_rng(seed).standard_normal(clean.size).astype(np.float32)
    gain = np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return np.clip(clean + gain * noise, -1, 1).astype(np.float32)


def f32(rate: int) -> AudioFormat:
    return AudioFormat(Encoding.PCM_F32LE, rate, 1)


def offline(x: np.ndarray, fmt: AudioFormat, pipeline: list[Any], model_dir: Path) -> np.ndarray:
    out = run_offline(audio.encode(fmt, x[:, None]), fmt, pipeline,
                      context=ProcessorContext(model_dir=model_dir))
    return audio.decode(fmt, out)[:, 0]


def chunks_of(x: np.ndarray, fmt: AudioFormat, sizes: Sequence[int]) -> list[bytes]:
    data = audio.encode(fmt, x[:, None])
    out, pos, k = [], 0, 0
    while pos < len(data):
        n = sizes[k % len(sizes)] * fmt.frame_bytes
        out.append(data[pos : pos + n])
        pos += n
        k += 1
    return out


@dataclass
class Compared:
    streamed: np.ndarray
    reference: np.ndarray

    @property
    def max_abs_diff(self) -> float:
        return float(np.max(np.abs(self.streamed - self.reference)))

    @property
    def bit_equal(self) -> bool:
        return bool(np.array_equal(self.streamed, self.reference))


def compare(result: StreamResult, fmt: AudioFormat, reference: np.ndarray) -> Compared:
    assert not result.dropped, result.dropped[:3]
    assert not result.errors, result.errors[:3]
    assert result.close_code == 1000
    streamed = audio.decode(fmt, result.audio)[:, 0]
    assert streamed.size == reference.size
    return Compared(streamed, reference)


def check_equal(cmp: Compared, what: str = "") -> None:
    diff = cmp.max_abs_diff
    assert diff <= TOLERANCE, f"{what}max |streamed - offline| = {diff:.3g}"
    assert cmp.bit_equal, f"{what}within tolerance but not bit-equal ({diff:.3g})"


def noise_reduction_db(x: np.ndarray, y: np.ndarray, rate: int) -> float:
    """Energy removed from the speech-free lead-in (0.1-0.45 s; output is ~20 ms late)."""
    a, b = round(0.1 * rate), round(0.45 * rate)
    return float(10 * np.log10(np.sum(x[a:b] ** 2) / np.sum(y[a:b] ** 2)))


def published(srv: Embedded) -> float:
    value = srv.gateway.metrics_registry.get_sample_value(
        "audiostream_gateway_messages_published_total")
    return float(value or 0.0)


@contextlib.asynccontextmanager
async def server(url: str, model_dir: Path, **worker: Any) -> AsyncIterator[Embedded]:
    topology = default_topology(prefix=unique_prefix())
    settings = WorkerSettings(processing=("denoise", "resample"), model_dir=model_dir, **worker)
    try:
        async with embedded_server(
            broker_url=url, topology=topology, worker_settings=settings,
            # Tests stream faster than real time: no per-connection chunk rate limit.
            gateway_settings=GatewaySettings(chunk_rate=None),
        ) as srv:
            yield srv
    finally:
        await delete_prefixed(url, topology)


def client(srv: Embedded, fmt: AudioFormat, pipeline: list[Any]) -> AudioStreamClient:
    return AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=pipeline, format=fmt,
                             deadline_ms=10_000)


# --- one session, every rate, 10 ms / 20 ms / irregular chunks --------------------------------


@pytest.mark.parametrize(
    ("rate", "chunking"),
    [
        (16000, 10), (16000, 20), (16000, "irregular"),
        (48000, 10), (48000, 20),
        (8000, 10), (8000, 20),  # resampled 8 -> 16 -> 8 kHz
        (44100, 10), (44100, 20), (44100, "irregular"),  # resampled 44.1 -> 48 -> 44.1 kHz
    ],
)
async def test_streamed_denoise_equals_offline(
    rabbitmq_url: str, model_dir: Path, rate: int, chunking: int | str
) -> None:
    fmt = f32(rate)
    x = noisy_speech(rate)
    reference = offline(x, fmt, ["denoise"], model_dir)
    async with server(rabbitmq_url, model_dir) as srv:
        c = client(srv, fmt, ["denoise"])
        if chunking == "irregular":
            sent = chunks_of(x, fmt, IRREGULAR)
            result = await c.stream(sent, chunk_ms=20, rate=2.0)  # paced as 20 ms chunks
        else:
            sent = chunks_of(x, fmt, [rate * int(chunking) // 1000])
            result = await c.stream(x, chunk_ms=float(chunking), rate=2.0)
        messages = published(srv)
    cmp = compare(result, fmt, reference)
    assert len(result.outcomes) == len(sent)
    if rate in (16000, 48000):  # no resampling: every chunk comes back with its own length
        assert [len(o) for o in result.outcomes if isinstance(o, bytes)] == [len(s) for s in sent]
    # The state crossed many messages (fewer when the machine is slow: chunks coalesce),
    # so equality says something about it.
    assert messages >= 8, messages
    check_equal(cmp)
    # ... and denoise did something: the noise-only lead-in lost at least 10 dB.
    assert noise_reduction_db(x, cmp.streamed, rate) >= 10.0


# --- a worker SIGKILLed while it holds one of the session's batches ---------------------------


def traced_registry() -> ProcessorRegistry:
    """The gateway here only needs to know ``denoise_traced`` (the workers import the real
    one with --import): a private registry keeps the global one free of test steps."""
    reg = ProcessorRegistry()
    for name in registry.names():
        reg.add(registry.get(name))
    reg.add(ProcessorSpec(name="denoise_traced", factory=lambda _ctx: lambda _batch: [],
                          sample_rates=frozenset(nsnet2.RATES), stateful=True))
    return reg


async def start_worker(url: str, prefix: str, model_dir: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiostream", "worker", "--broker", url, "--prefix", prefix,
        "--processing", "denoise_traced", "--import", "tests.integration.traced_denoise",
        "--model-dir", str(model_dir),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT), "AUDIOSTREAM_TEST_HOLD_S": "0.1"},
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert b"consuming denoise_traced" in line, line
    return proc


async def read_lines(proc: asyncio.subprocess.Process, into: list[list[str]]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        into.append(line.decode().split())


async def test_worker_killed_mid_batch_another_finishes_the_session(
    rabbitmq_url: str, model_dir: Path
) -> None:
    """Two worker processes share the session's queue (round robin). Once the victim
    has finished >= 3 of the session's messages (so the session's state is its work),
    it is SIGKILLed between 'start' and 'end' of the next one: it holds that message
    unacked and has published nothing for it. The survivor must then process the very
    same message (same incoming state hash) and the rest of the session, and the
    client must get exactly the offline result, with no drop and no duplicate."""
    fmt = f32(16000)
    x = noisy_speech(16000)
    reference = offline(x, fmt, ["denoise"], model_dir)
    prefix = unique_prefix()
    topology = Topology(processing_types=(*registry.names(), "denoise_traced"), prefix=prefix)
    victim = survivor = None
    survivor_lines: list[list[str]] = []
    reader = None
    try:
        async with embedded_server(broker_url=rabbitmq_url, topology=topology, workers=0,
                                   gateway_settings=GatewaySettings(chunk_rate=None),
                                   processors=traced_registry()) as srv:
            victim = await start_worker(rabbitmq_url, prefix, model_dir)
            survivor = await start_worker(rabbitmq_url, prefix, model_dir)
            reader = asyncio.create_task(read_lines(survivor, survivor_lines))
            stream = asyncio.create_task(
                client(srv, fmt, ["denoise_traced"]).stream(x, chunk_ms=20, rate=1.0))
            assert victim.stdout is not None
            victim_done: list[str] = []
            killed: list[str] | None = None
            while killed is None:
                line = await asyncio.wait_for(victim.stdout.readline(), 30)
                assert line, "the victim exited on its own"
                words = line.decode().split()
                if words[0] == "end":
                    victim_done.append(words[2])
                elif words[0] == "start" and len(victim_done) >= 3:
                    victim.send_signal(signal.SIGKILL)
                    killed = words
                    assert not stream.done()
            result = await asyncio.wait_for(stream, 60)
            assert await victim.wait() == -signal.SIGKILL
    finally:
        for proc in (victim, survivor):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        if reader is not None:
            await asyncio.wait_for(reader, 10)
        await delete_prefixed(rabbitmq_url, topology)

    _, session, tag, _frames = killed
    assert session == result.session_id
    assert tag != "none"  # the killed message carried state from earlier messages
    starts = [w for w in survivor_lines if w[0] == "start"]
    assert all(w[1] == session for w in starts)
    redone = [i for i, w in enumerate(starts) if w[2] == tag]
    assert redone, f"the survivor never processed the killed message (state {tag})"
    assert ["end", session, tag] in survivor_lines
    assert len(starts) > redone[0] + 1, "nothing was left of the session after the kill"
    cmp = compare(result, fmt, reference)
    assert len(result.outcomes) == len(chunks_of(x, fmt, [320]))
    assert result.summary["chunks_out"] == len(result.outcomes)
    check_equal(cmp)


# --- sessions of different lengths, rates and chunk sizes share batches ------------------------


def batch_histogram(srv: Embedded, processing: str) -> dict[str, float]:
    reg = srv.gateway.metrics_registry  # embedded workers export into the gateway's registry

    def value(name: str, **labels: str) -> float:
        return float(reg.get_sample_value(name, {"processing": processing, **labels}) or 0.0)

    return {
        "batches": value("audiostream_worker_batch_size_count"),
        "messages": value("audiostream_worker_batch_size_sum"),
        "size_1": value("audiostream_worker_batch_size_bucket", le="1.0"),
        "size_le_2": value("audiostream_worker_batch_size_bucket", le="2.0"),
    }


SESSIONS = [  # (sample rate, chunk ms, seconds of audio, noise seed)
    (16000, 10, None, 1),
    (16000, 20, 2.0, 2),
    (16000, 20, 1.0, 3),
    (16000, 10, 2.7, 4),
    (16000, 20, 0.6, 5),
    (48000, 20, 2.5, 6),
    (48000, 10, 1.2, 7),
    (8000, 10, 1.5, 8),
    (44100, 20, 3.0, 9),
]


@pytest.mark.parametrize("variant", ["fp32", "int8"])
async def test_sessions_of_different_lengths_share_batches(
    rabbitmq_url: str, model_dir: Path, variant: str
) -> None:
    """Also int8: its activations are quantised per row (per session), so a session's
    result cannot depend on its batch neighbours either."""
    step: list[Any] = [{"name": "denoise", "params": {"variant": variant}}]
    inputs = [noisy_speech(rate, seed=seed, seconds=secs) for rate, _, secs, seed in SESSIONS]
    refs = [offline(x, f32(rate), step, model_dir)
            for x, (rate, *_) in zip(inputs, SESSIONS, strict=True)]
    async with server(rabbitmq_url, model_dir, max_batch=16, max_wait_ms=20) as srv:
        results = await asyncio.gather(*(
            client(srv, f32(rate), step).stream(x, chunk_ms=ms, rate=2.0)
            for x, (rate, ms, _, _) in zip(inputs, SESSIONS, strict=True)
        ))
        hist = batch_histogram(srv, "denoise")
    for result, ref, (rate, *_) in zip(results, refs, SESSIONS, strict=True):
        check_equal(compare(result, f32(rate), ref), f"{rate} Hz: ")
    # Sessions really shared batches: most denoise messages went through calls with
    # other sessions' messages, and some calls held three or more.
    assert hist["messages"] >= 2 * len(SESSIONS), hist
    assert hist["messages"] - hist["size_1"] >= 0.5 * hist["messages"], hist
    assert hist["batches"] - hist["size_le_2"] >= 3, hist
