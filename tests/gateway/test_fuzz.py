"""Hypothesis against a live gateway: random control and binary frames over real
WebSockets. The gateway must never crash or leak tasks, and a healthy session streaming
beside the fuzzing must get exactly its own audio back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import aiohttp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient, StreamResult
from audiostream.gateway import GatewaySettings
from audiostream.protocol import start_json
from audiostream.testing import ThreadedServer

pytestmark = pytest.mark.integration

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


@pytest.fixture(scope="module")
def live() -> Iterator[ThreadedServer]:
    settings = GatewaySettings(chunk_rate=200, chunk_burst=20, auth_timeout_s=2)
    with ThreadedServer(processing=("passthrough", "gain"), gateway_settings=settings) as srv:
        yield srv


def text_frames(key: str) -> st.SearchStrategy[str]:
    values = st.one_of(st.none(), st.integers(), st.text(max_size=10), st.booleans(),
                       st.lists(st.integers(), max_size=3))
    return st.one_of(
        st.just(start_json(key, FMT, ["passthrough"])),
        st.just(start_json(key, FMT, [{"name": "gain", "params": {"db": -3}}])),
        st.just(start_json("as_000000000000_bad", FMT, ["passthrough"])),
        st.sampled_from(['{"type":"stop"}', '{"type":"keepalive"}', '{"type":"ack","received":0}',
                         '{"type":"ack","received":99}', "{", "[]", "null", '"start"']),
        st.dictionaries(st.sampled_from(["type", "api_key", "format", "pipeline", "options",
                                         "resume"]), values, max_size=5).map(json.dumps),
        st.text(max_size=60),
    )


frames_for = {
    "bin": st.one_of(st.binary(max_size=1000), st.integers(1, 20).map(lambda n: b"\0\0" * n)),
}


async def poke(url: str, frames: list[tuple[str, Any]]) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for kind, data in frames:
            if ws.closed:
                break
            try:
                if kind == "text":
                    await ws.send_str(data)
                else:
                    await ws.send_bytes(data)
            except (ConnectionError, aiohttp.ClientError):
                break
        # Read whatever comes back for a moment, then leave without a goodbye.
        while True:
            try:
                msg = await ws.receive(timeout=0.05)
            except TimeoutError:
                break
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                break


def test_fuzzing_never_hurts_the_gateway_or_other_sessions(live: ThreadedServer) -> None:
    srv = live.server
    x = (np.random.default_rng(5).standard_normal(16000 * 4) * 3000).astype(np.int16)

    async def tasks_now() -> int:
        return len(asyncio.all_tasks())

    baseline = live.run(tasks_now())  # before anything of this test runs
    healthy = AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["passthrough"],
                                format=FMT, deadline_ms=10_000)
    victim: Future[StreamResult] = asyncio.run_coroutine_threadsafe(
        healthy.stream(x, rate=1.0), live.loop)
    frame = st.one_of(text_frames(srv.api_key).map(lambda t: ("text", t)),
                      frames_for["bin"].map(lambda b: ("bin", b)))

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(frame, max_size=12))
    def one_client(frames: list[tuple[str, Any]]) -> None:
        live.run(poke(srv.url, frames))

    one_client()
    result = victim.result(timeout=60)
    assert not result.dropped, result.dropped
    assert result.audio == x.tobytes()

    async def settled() -> tuple[int, int]:
        for _ in range(200):
            if not srv.gateway.connections:
                break
            await asyncio.sleep(0.02)  # connections wind down after their clients left
        return len(srv.gateway.connections), len(asyncio.all_tasks())

    connections, tasks = live.run(settled())
    assert connections == 0
    # Every task a connection, a session or the victim started is gone again.
    assert tasks <= baseline

    async def health() -> int:
        async with aiohttp.ClientSession() as http, http.get(srv.ops_url + "/healthz") as r:
            return r.status

    assert live.run(health()) == 200
