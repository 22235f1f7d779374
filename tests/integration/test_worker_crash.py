"""A worker SIGKILLed mid-batch loses no chunk, and no duplicate reaches the client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient, StreamResult
from audiostream.processors import ProcessorRegistry, StepInput, StepOutput, registry
from audiostream.testing import Embedded, embedded_server
from audiostream.topology import Topology
from tests.conftest import delete_prefixed, unique_prefix

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]
ROOT = Path(__file__).resolve().parents[2]
FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


async def start_worker(url: str, prefix: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiostream", "worker", "--broker", url, "--prefix", prefix,
        "--processing", "slowpass", "--import", "tests.integration.slow_processors",
        "--max-batch", "4",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert b"consuming slowpass" in line, line
    return proc


@contextlib.asynccontextmanager
async def slowpass_cluster(url: str) -> AsyncIterator[tuple[Embedded, list[Process]]]:
    """A gateway here and two slowpass worker processes, cleaned up afterwards."""
    prefix = unique_prefix()
    # The worker subprocesses register slowpass (--import); the gateway only needs the
    # name, so it gets a private registry and the global one stays clean.
    gateway_registry = ProcessorRegistry()

    @gateway_registry.per_item("slowpass")
    def slowpass(item: StepInput) -> StepOutput:
        return StepOutput(item.audio)

    topology = Topology(processing_types=(*registry.names(), "slowpass"), prefix=prefix)
    workers: list[Process] = []
    try:
        async with embedded_server(broker_url=url, topology=topology, workers=0,
                                   processors=gateway_registry) as srv:
            workers.append(await start_worker(url, prefix))
            workers.append(await start_worker(url, prefix))
            yield srv, workers
    finally:
        for proc in workers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await delete_prefixed(url, topology)


async def signal_mid_batch(proc: Process, sig: signal.Signals) -> None:
    """Send ``sig`` while the worker holds a message: after 'start', before 'end'."""
    assert proc.stdout is not None
    while not (await asyncio.wait_for(proc.stdout.readline(), 30)).startswith(b"start"):
        pass
    proc.send_signal(sig)


def stream_of(srv: Embedded, seed: int) -> tuple[np.ndarray, asyncio.Task[StreamResult]]:
    x = (np.random.default_rng(seed).standard_normal(16000 * 2) * 3000).astype(np.int16)
    c = AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["slowpass"], format=FMT,
                          deadline_ms=8000)
    return x, asyncio.create_task(c.stream(x, rate=1.0))


async def test_sigkill_mid_batch_loses_nothing(rabbitmq_url: str) -> None:
    async with slowpass_cluster(rabbitmq_url) as (srv, (victim, _survivor)):
        x, stream = stream_of(srv, 11)
        await signal_mid_batch(victim, signal.SIGKILL)
        result = await asyncio.wait_for(stream, 60)
        assert await victim.wait() == -signal.SIGKILL
        assert not result.dropped, result.dropped[:3]
        assert len(result.outcomes) == x.size // 320
        assert result.audio == x.tobytes()
        assert result.summary["chunks_out"] == len(result.outcomes)


async def test_sigterm_finishes_the_batch_then_exits(rabbitmq_url: str) -> None:
    async with slowpass_cluster(rabbitmq_url) as (srv, (leaving, _staying)):
        x, stream = stream_of(srv, 12)
        await signal_mid_batch(leaving, signal.SIGTERM)
        assert leaving.stdout is not None
        rest = await asyncio.wait_for(leaving.stdout.read(), 30)
        assert await leaving.wait() == 0  # a clean exit ...
        assert rest.startswith(b"end")  # ... after finishing the batch it held
        result = await asyncio.wait_for(stream, 60)
        assert not result.dropped and result.audio == x.tobytes()
