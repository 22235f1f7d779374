"""The recipes in docs/sdk.md run as written, against the embedded server with denoise.

Each recipe's code block is read from the doc and executed unchanged; only the
environment differs: ``URL``/``KEY`` point at the test server, and the telephony bridge
is driven by the Twilio Media Streams simulator. The microphone recipe runs twice: with a
stand-in ``sounddevice`` that calls back from its own thread the way PortAudio does
(exact block accounting), and in a subprocess with the real ``sounddevice`` and PortAudio
through ALSA into a private PulseAudio daemon whose null devices stand in for the sound
card (tests/client/pulse.py).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import re
import shutil
import signal
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from aiohttp import web

from audiostream.gateway import GatewaySettings, start_site
from audiostream.testing import Embedded, embedded_server, sample_wav
from audiostream.worker import WorkerSettings
from tests.client import pulse
from tests.telephony.conftest import distinct_frames
from tests.telephony.simulator import MediaStreamSim

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"


def recipe(title: str) -> str:
    """The one Python block under ``### <title>`` in docs/sdk.md."""
    text = DOC.read_text(encoding="utf-8")
    heads = [m for m in re.finditer(r"^### (.*)$", text, re.M) if m.group(1).startswith(title)]
    assert len(heads) == 1, f"docs/sdk.md has no single recipe {title!r}"
    body = text[heads[0].end():]
    nxt = re.search(r"^#{2,3} ", body, re.M)
    section = body[: nxt.start()] if nxt else body
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"recipe {title!r} should hold one python block"
    return str(blocks[0])


def run_block(code: str, namespace: dict[str, Any]) -> Any:
    """Execute a block that may use top-level ``await``; returns its coroutine, if any."""
    compiled = compile(code, str(DOC), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return eval(compiled, namespace)  # the doc's own code, on purpose


@pytest.fixture
async def denoise_server() -> AsyncIterator[Embedded]:
    async with embedded_server(
        worker_settings=WorkerSettings(processing=("denoise", "resample", "passthrough")),
        gateway_settings=GatewaySettings(),
    ) as srv:
        yield srv


async def test_file_recipe(denoise_server: Embedded, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    from audiostream.client import AudioStreamClient

    monkeypatch.chdir(tmp_path)
    shutil.copy(sample_wav(), tmp_path / "noisy.wav")
    client = AudioStreamClient(denoise_server.url, api_key=denoise_server.api_key)
    namespace: dict[str, Any] = {"client": client}
    await run_block(recipe("A file"), namespace)  # the block asserts report.complete
    noisy, rate_in = sf.read(tmp_path / "noisy.wav", dtype="float32")
    clean, rate_out = sf.read(tmp_path / "clean.wav", dtype="float32")
    assert rate_out == rate_in and clean.shape == noisy.shape
    assert namespace["report"].complete
    assert float(np.sum(clean**2)) < float(np.sum(noisy**2))  # the noise went somewhere


class FakeSoundDevice:
    """Stands in for ``sounddevice``: the input stream calls ``callback`` from its own
    thread with 20 ms blocks of a WAV file at the device's pace, as PortAudio would;
    the output stream keeps what was written."""

    START_UP = 2 * 640
    """Up to two blocks of the denoiser's first output may be exact silence (its delay)."""

    def __init__(self, pcm: bytes) -> None:
        self.pcm = pcm
        self.played = bytearray()
        self.blocks_captured = 0
        self.all_played = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("sounddevice")
        mod.RawInputStream = self._input  # type: ignore[attr-defined]
        mod.RawOutputStream = self._output  # type: ignore[attr-defined]
        return mod

    def _device(self, samplerate: int, blocksize: int,
                tick: Callable[[int], bool]) -> contextlib.AbstractContextManager[None]:
        """A thread that calls ``tick(i)`` every block on the device's clock, until
        ``tick`` says stop or the stream is closed."""
        stop = threading.Event()

        def run() -> None:
            t0 = time.monotonic()
            i = 0
            while not stop.wait(max(0.0, t0 + i * blocksize / samplerate - time.monotonic())):
                if not tick(i):  # the wait above is the device clock, not synchronisation
                    return
                i += 1

        @contextlib.contextmanager
        def stream() -> Any:
            thread = threading.Thread(target=run, name="portaudio", daemon=True)
            thread.start()
            try:
                yield None
            finally:
                stop.set()
                thread.join()

        return stream()

    def _input(self, *, samplerate: int, channels: int, dtype: str, blocksize: int,
               callback: Callable[..., None]) -> contextlib.AbstractContextManager[None]:
        assert (samplerate, channels, dtype) == (16000, 1, "int16")
        block = blocksize * 2

        def tick(i: int) -> bool:
            if (i + 1) * block > len(self.pcm):
                return False
            callback(memoryview(self.pcm[i * block : (i + 1) * block]), blocksize, None, None)
            self.blocks_captured += 1
            return True

        return self._device(samplerate, blocksize, tick)

    def _output(self, *, samplerate: int, channels: int, dtype: str, blocksize: int,
                callback: Callable[..., None]) -> contextlib.AbstractContextManager[None]:
        assert (samplerate, channels, dtype) == (16000, 1, "int16")

        def tick(i: int) -> bool:
            buf = bytearray(blocksize * 2)
            callback(buf, blocksize, None, None)
            if any(buf):  # an all-zero block is the recipe's silence on underrun
                self.played += buf
                if len(self.played) >= len(self.pcm) - self.START_UP:
                    self._loop.call_soon_threadsafe(self.all_played.set)
            return True

        return self._device(samplerate, blocksize, tick)


async def test_microphone_recipe(denoise_server: Embedded,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    x, rate = sf.read(sample_wav(), dtype="int16")
    assert rate == 16000
    pcm = x[: 50 * 320].tobytes()  # one second of the microphone
    fake = FakeSoundDevice(pcm)
    monkeypatch.setitem(sys.modules, "sounddevice", fake.module())
    code = recipe("A microphone")
    assert code.rstrip().endswith("asyncio.run(main())")
    namespace: dict[str, Any] = {"URL": denoise_server.url, "KEY": denoise_server.api_key}
    run_block(code.rstrip().removesuffix("asyncio.run(main())"), namespace)
    sent_before = chunks(denoise_server, "out")
    task = asyncio.create_task(namespace["main"]())
    done, _ = await asyncio.wait({task, asyncio.ensure_future(fake.all_played.wait())},
                                 timeout=60, return_when=asyncio.FIRST_COMPLETED)
    assert task not in done, f"the recipe ended early: {task.exception()!r}"
    deadline = asyncio.get_running_loop().time() + 30
    while chunks(denoise_server, "out") - sent_before < 50:  # the last may still be in flight
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)  # poll interval of a condition
    task.cancel()  # Ctrl-C
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert fake.blocks_captured == 50
    assert chunks(denoise_server, "out") - sent_before == 50  # every block came back, once
    assert len(fake.played) >= len(pcm) - fake.START_UP  # ... and was played
    assert bytes(fake.played) != pcm  # processed, not echoed


def envelope(pcm: np.ndarray) -> np.ndarray:
    """Log energy of 20 ms frames at 16 kHz."""
    n = len(pcm) // 320
    frames = pcm[: n * 320].astype(np.float64).reshape(n, 320)
    return np.log10(np.mean(frames**2, axis=1) + 1.0)


def without_underruns(pcm: np.ndarray, shortest: int = 32) -> np.ndarray:
    """``pcm`` without its runs of digital silence: the recipe plays exact zeros when
    nothing has come back yet (an underrun of a busy machine), which shifts the rest of
    the speech later; the content is what is compared, not the playback's timing."""
    zero = np.concatenate([[False], pcm == 0, [False]])
    edges = np.flatnonzero(np.diff(zero.astype(np.int8)))
    keep = np.ones(len(pcm), bool)
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        if end - start >= shortest:
            keep[start:end] = False
    return pcm[keep]


def best_alignment(probe: np.ndarray, heard: np.ndarray) -> float:
    """Highest correlation of ``probe``'s envelope with any stretch of ``heard``'s."""
    best = -1.0
    for lag in range(len(heard) - len(probe) + 1):
        best = max(best, float(np.corrcoef(probe, heard[lag : lag + len(probe)])[0, 1]))
    return best


def chunks(srv: Embedded, direction: str) -> float:
    """The gateway's count of chunks accepted from (``in``) or sent to (``out``) clients."""
    counter = srv.gateway.metrics.chunks_in if direction == "in" else srv.gateway.metrics.chunks_out
    return float(counter._value.get())


async def test_microphone_recipe_through_portaudio(denoise_server: Embedded,
                                                   tmp_path: Path) -> None:
    """The same recipe with the real ``sounddevice`` and PortAudio, through ALSA into a
    private PulseAudio daemon: speech played into the "microphone" sink is captured at the
    device's pace, denoised by the server and played to the "speaker", which is recorded."""
    x, rate = sf.read(sample_wav(), dtype="int16")
    assert rate == pulse.RATE
    speech = x[: 3 * rate]
    mic = tmp_path / "mic.wav"
    sf.write(mic, speech, rate)
    heard = tmp_path / "speaker.raw"
    script = tmp_path / "mic_recipe.py"
    script.write_text(f"URL = {denoise_server.url!r}\nKEY = {denoise_server.api_key!r}\n"
                      + recipe("A microphone"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    def sounding() -> np.ndarray:  # 20 ms frames the speaker played that were not silence
        got = np.frombuffer(heard.read_bytes(), dtype="<i2") if heard.exists() else []
        return np.flatnonzero(envelope(np.asarray(got, dtype="<i2")) > 0.5)

    async with pulse.pulse_daemon(tmp_path / "pulse") as pa:
        parec = await pa.start(pulse.need("parec"), "--device=speaker.monitor", "--raw",
                               f"--rate={rate}", "--channels=1", "--format=s16le", str(heard))
        start_in = chunks(denoise_server, "in")
        app = await pa.start(sys.executable, str(script))
        try:
            # the microphone is live once its (silent) blocks reach the server
            while chunks(denoise_server, "in") < start_in + 10:
                assert app.returncode is None, "the recipe ended before capturing"
                assert loop.time() < deadline, "no microphone block reached the server"
                await asyncio.sleep(0.05)  # poll interval of a condition
            before = chunks(denoise_server, "out")
            assert await pa.run(pulse.need("paplay"), "--device=micsink", str(mic)) == 0
            spoken = len(speech) // 320
            while len(sounding()) < spoken:  # until the speaker played all that was said
                assert app.returncode is None, "the recipe ended early"
                assert loop.time() < deadline, f"the speaker played {len(sounding())} frames"
                await asyncio.sleep(0.05)  # poll interval of a condition
            assert app.returncode is None  # still streaming: the recipe runs until Ctrl-C
            answered = chunks(denoise_server, "out") - before
        finally:
            await pulse.stop(app, signal.SIGINT)  # Ctrl-C
            await pulse.stop(parec, signal.SIGTERM)
    assert answered >= spoken  # what the speaker played came through the server
    played = envelope(without_underruns(np.frombuffer(heard.read_bytes(), dtype="<i2")))
    # it is the speech that came back: other 3 s stretches of the sample score 0.2-0.35
    assert best_alignment(envelope(speech), played) > 0.6


async def test_telephony_bridge_recipe(denoise_server: Embedded) -> None:
    namespace: dict[str, Any] = {"URL": denoise_server.url, "KEY": denoise_server.api_key}
    run_block(recipe("A telephony bridge"), namespace)
    app = web.Application()
    app.router.add_get("/twilio", namespace["twilio"])
    runner, port = await start_site(app, "127.0.0.1", 0, None)
    frames = distinct_frames(50)
    try:
        async with MediaStreamSim(f"ws://127.0.0.1:{port}/twilio") as call:
            await call.start()
            await call.play_call(frames)
            assert await call.wait_until(lambda: len(call.media()) >= len(frames))
            await call.stop()
            assert call.closed is not None
            await asyncio.wait_for(call.closed, 30)
    finally:
        await runner.cleanup()
    media = [h for h in call.heard if h.kind == "media"]
    assert len(media) == len(frames)
    assert all(h.stream == call.stream_sid and len(h.payload) == 160 for h in media)


async def test_jupyter_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from audiostream.audio import AudioFormat
    from audiostream.client import AudioStreamClient, SpeechStart
    from audiostream.testing import ThreadedServer

    asyncio.get_running_loop()  # a cell runs inside the notebook's loop
    monkeypatch.chdir(tmp_path)
    shutil.copy(sample_wav(), tmp_path / "a.wav")
    x, _ = sf.read(sample_wav(), dtype="int16")
    with ThreadedServer(processing=("denoise", "vad"), gateway_settings=GatewaySettings()) as t:
        client = AudioStreamClient(t.server.url, api_key=t.server.api_key)
        namespace: dict[str, Any] = {"client": client, "AudioFormat": AudioFormat,
                                     "SpeechStart": SpeechStart, "samples": x}
        assert run_block(recipe("Jupyter"), namespace) is None  # blocking, no await
    assert namespace["result"].close_code == 1000 and not namespace["result"].dropped
    assert namespace["speech"], "the sample holds speech; vad reported none"
