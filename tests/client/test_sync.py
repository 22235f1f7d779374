"""Blocking use from scripts and from inside a running loop (Jupyter)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from audiostream.audio import AudioFormat
from audiostream.client import Audio, AudioStreamClient, Summary, stream_sync
from audiostream.gateway import GatewaySettings
from audiostream.testing import ThreadedServer, sample_wav

FMT = AudioFormat.pcm16(16000)


@pytest.fixture(scope="module")
def threaded() -> Iterator[ThreadedServer]:
    with ThreadedServer(processing=("passthrough",), gateway_settings=GatewaySettings()) as s:
        yield s


def test_stream_sync_from_a_plain_script(threaded: ThreadedServer) -> None:
    result = stream_sync(threaded.server.url, sample_wav(), api_key=threaded.server.api_key,
                         pipeline=["passthrough"], rate=None)
    assert result.chunks == 432 and result.close_code == 1000 and not result.dropped


async def test_stream_sync_while_a_loop_runs_like_jupyter(threaded: ThreadedServer) -> None:
    asyncio.get_running_loop()  # a loop is running in this thread, as in a notebook cell
    client = AudioStreamClient(threaded.server.url, api_key=threaded.server.api_key,
                               pipeline=["passthrough"], format=FMT)
    threads: list[str] = []
    client.on_audio(lambda _seq, _pcm: threads.append(threading.current_thread().name))
    x = (np.arange(3200) % 100).astype(np.int16)
    result = client.stream_sync(x, rate=None)
    assert result.audio == x.tobytes()
    assert threads and all(t != threading.current_thread().name for t in threads)


async def test_sync_session_while_a_loop_runs(threaded: ThreadedServer) -> None:
    asyncio.get_running_loop()
    client = AudioStreamClient(threaded.server.url, api_key=threaded.server.api_key)
    with client.session_sync(["passthrough"], format=FMT) as s:
        s.send(b"\x01\x00" * 320)
        s.send(b"\x02\x00" * 320)
        summary = s.finish()
        items = list(s)
    assert [i.seq for i in items if isinstance(i, Audio)] == [0, 1]
    assert isinstance(items[-1], Summary) and items[-1] == summary and summary.chunks_out == 2


def test_sync_session_from_a_script(threaded: ThreadedServer) -> None:
    client = AudioStreamClient(threaded.server.url, api_key=threaded.server.api_key)
    with client.session_sync(["passthrough"], format=FMT) as s:
        s.send(np.zeros(320, np.int16))
        assert s.finish().chunks_out == 1
