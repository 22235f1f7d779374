"""A gateway SIGKILLed mid-stream: the SDK resumes on a second gateway process and the
output is identical to an uninterrupted run."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient, ReconnectPolicy
from audiostream.gateway import create_key
from audiostream.processors import registry
from audiostream.topology import Topology
from tests.conftest import delete_prefixed, unique_prefix

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]
ROOT = Path(__file__).resolve().parents[2]
FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
SECRET = "a-secret-all-gateways-share"


async def spawn(*args: str, ready: bytes) -> tuple[asyncio.subprocess.Process, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiostream", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},  # this checkout, not the venv's
    )
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, "process exited before it was ready"
        if ready in line:
            return proc, line


async def gateway(url: str, prefix: str, keys: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc, line = await spawn(
        "gateway", "--broker", url, "--prefix", prefix, "--keys-file", str(keys),
        "--host", "127.0.0.1", "--port", "0", "--ops-port", "0", "--token-secret", SECRET,
        ready=b"audiostream gateway on",
    )
    match = re.search(rb"(ws://\S+)", line)
    assert match is not None
    return proc, match.group(1).decode()


async def test_sdk_resumes_on_a_second_gateway_after_sigkill(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    topology = Topology(processing_types=tuple(registry.names()), prefix=prefix)
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "crash-test")
    procs: list[asyncio.subprocess.Process] = []
    try:
        worker, _ = await spawn("worker", "--broker", rabbitmq_url, "--prefix", prefix,
                                "--processing", "highpass", ready=b"consuming")
        procs.append(worker)
        gw1, url1 = await gateway(rabbitmq_url, prefix, keys)
        gw2, url2 = await gateway(rabbitmq_url, prefix, keys)
        procs += [gw1, gw2]
        x = (np.random.default_rng(3).standard_normal(16000 * 3) * 3000).astype(np.int16)

        def make() -> AudioStreamClient:
            return AudioStreamClient(
                [url1, url2], api_key=key, pipeline=["highpass"], format=FMT,
                deadline_ms=8000,
                reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.5, max_attempts=20))

        client = make()
        outcomes: list[int] = []
        client.on_audio(lambda seq, _pcm: outcomes.append(seq))
        task = asyncio.create_task(client.stream(x, rate=1.0))
        while len(outcomes) < 40:  # about 0.8 s of audio answered by gateway 1
            assert not task.done()
            await asyncio.sleep(0.02)  # polling the client's progress
        gw1.send_signal(signal.SIGKILL)
        result = await asyncio.wait_for(task, 60)
        assert await gw1.wait() == -signal.SIGKILL
        assert result.resumes >= 1 and not result.dropped
        assert len(result.outcomes) == x.size // 320

        # The file written from the resumed stream equals an uninterrupted run's file.
        interrupted = tmp_path / "interrupted.wav"
        soundfile.write(interrupted, np.frombuffer(result.audio, "<i2"), 16000, "PCM_16")
        clean = await AudioStreamClient(url2, api_key=key, pipeline=["highpass"], format=FMT,
                                        deadline_ms=8000).stream(x, rate=2.0)
        uninterrupted = tmp_path / "uninterrupted.wav"
        soundfile.write(uninterrupted, np.frombuffer(clean.audio, "<i2"), 16000, "PCM_16")
        assert clean.resumes == 0 and not clean.dropped
        assert interrupted.read_bytes() == uninterrupted.read_bytes()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await delete_prefixed(rabbitmq_url, topology)
