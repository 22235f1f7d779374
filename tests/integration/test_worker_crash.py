"""A worker SIGKILLed mid-batch loses no chunk, and no duplicate reaches the client."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient
from audiostream.processors import ProcessorRegistry, StepInput, StepOutput, registry
from audiostream.testing import embedded_server
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


async def test_sigkill_mid_batch_loses_nothing(rabbitmq_url: str) -> None:
    prefix = unique_prefix()
    # The worker subprocess registers slowpass (--import); the gateway here only needs
    # to know the name, so it gets a private registry and the global one stays clean.
    gateway_registry = ProcessorRegistry()

    @gateway_registry.per_item("slowpass")
    def slowpass(item: StepInput) -> StepOutput:
        return StepOutput(item.audio)

    topology = Topology(processing_types=(*registry.names(), "slowpass"), prefix=prefix)
    victim = survivor = None
    try:
        async with embedded_server(broker_url=rabbitmq_url, topology=topology, workers=0,
                                   processors=gateway_registry) as srv:
            victim = await start_worker(rabbitmq_url, prefix)
            survivor = await start_worker(rabbitmq_url, prefix)
            x = (np.random.default_rng(11).standard_normal(16000 * 2) * 3000).astype(np.int16)
            c = AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["slowpass"],
                                  format=FMT, deadline_ms=8000)
            stream = asyncio.create_task(c.stream(x, rate=1.0))
            assert victim.stdout is not None
            # Kill the victim while it holds a message: after 'start', before 'end'.
            killed_mid_batch = False
            while not stream.done():
                line = await asyncio.wait_for(victim.stdout.readline(), 30)
                if line.startswith(b"start"):
                    victim.send_signal(signal.SIGKILL)
                    killed_mid_batch = True
                    break
            assert killed_mid_batch
            result = await asyncio.wait_for(stream, 60)
            assert await victim.wait() == -signal.SIGKILL
            assert not result.dropped, result.dropped[:3]
            assert len(result.outcomes) == x.size // 320
            assert result.audio == x.tobytes()
            assert result.summary["chunks_out"] == len(result.outcomes)
    finally:
        for proc in (victim, survivor):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        await delete_prefixed(rabbitmq_url, topology)


async def test_sigterm_finishes_the_batch_then_exits(rabbitmq_url: str) -> None:
    prefix = unique_prefix()
    gateway_registry = ProcessorRegistry()

    @gateway_registry.per_item("slowpass")
    def slowpass(item: StepInput) -> StepOutput:
        return StepOutput(item.audio)

    topology = Topology(processing_types=(*registry.names(), "slowpass"), prefix=prefix)
    leaving = staying = None
    try:
        async with embedded_server(broker_url=rabbitmq_url, topology=topology, workers=0,
                                   processors=gateway_registry) as srv:
            leaving = await start_worker(rabbitmq_url, prefix)
            staying = await start_worker(rabbitmq_url, prefix)
            x = (np.random.default_rng(12).standard_normal(16000 * 2) * 3000).astype(np.int16)
            c = AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["slowpass"],
                                  format=FMT, deadline_ms=8000)
            stream = asyncio.create_task(c.stream(x, rate=1.0))
            assert leaving.stdout is not None
            while True:
                line = await asyncio.wait_for(leaving.stdout.readline(), 30)
                if line.startswith(b"start"):
                    leaving.send_signal(signal.SIGTERM)
                    break
            rest = await asyncio.wait_for(leaving.stdout.read(), 30)
            assert await leaving.wait() == 0  # a clean exit ...
            assert rest.startswith(b"end")  # ... after finishing the batch it held
            result = await asyncio.wait_for(stream, 60)
            assert not result.dropped and result.audio == x.tobytes()
    finally:
        for proc in (leaving, staying):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        await delete_prefixed(rabbitmq_url, topology)
