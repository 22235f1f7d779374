"""The recipes in docs/sdk.md run as written, against the embedded server with denoise.

Each recipe's code block is read from the doc and executed unchanged; only the
environment differs: ``URL``/``KEY`` point at the test server, the microphone recipe
gets a stand-in for the ``sounddevice`` module (no sound card here) that feeds a WAV
file from its own thread the way PortAudio does, and the telephony bridge is driven by
the Twilio Media Streams simulator.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import re
import shutil
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

    def _input(self, *, samplerate: int, channels: int, dtype: str, blocksize: int,
               callback: Callable[..., None]) -> contextlib.AbstractContextManager[None]:
        assert (samplerate, channels, dtype) == (16000, 1, "int16")
        block = blocksize * 2
        stop = threading.Event()

        def device() -> None:
            t0 = time.monotonic()
            for i, at in enumerate(range(0, len(self.pcm) - block + 1, block)):
                if stop.wait(max(0.0, t0 + i * blocksize / samplerate - time.monotonic())):
                    return  # the device clock, not synchronisation
                callback(memoryview(self.pcm[at : at + block]), blocksize, None, None)
                self.blocks_captured += 1

        @contextlib.contextmanager
        def stream() -> Any:
            thread = threading.Thread(target=device, name="portaudio", daemon=True)
            thread.start()
            try:
                yield None
            finally:
                stop.set()
                thread.join()

        return stream()

    def _output(self, *, samplerate: int, channels: int, dtype: str) -> Any:
        fake = self

        class Out:
            def __enter__(self) -> Out:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def write(self, data: bytes) -> None:
                fake.played += data
                if len(fake.played) >= len(fake.pcm):
                    fake.all_played.set()

        return Out()


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
    task = asyncio.create_task(namespace["main"]())
    done, _ = await asyncio.wait({task, asyncio.ensure_future(fake.all_played.wait())},
                                 timeout=60, return_when=asyncio.FIRST_COMPLETED)
    assert task not in done, f"the recipe ended early: {task.exception()!r}"
    task.cancel()  # Ctrl-C
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert fake.blocks_captured == 50
    assert len(fake.played) == len(pcm)  # every captured block came back and was played
    assert bytes(fake.played) != pcm  # processed, not echoed


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
