"""A gateway's shutdown is bounded: a second stop signal, or a shutdown that outlives
its grace, ends the process (real processes, real signals)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from audiostream.gateway import create_key
from audiostream.processors import registry
from audiostream.topology import Topology
from tests.conftest import delete_prefixed, unique_prefix

ROOT = Path(__file__).resolve().parents[2]
# A shutdown that never finishes, as a hung drain would be.
HUNG = """
import asyncio, logging, sys
from audiostream.cli import _exit_if_stuck
logging.basicConfig(level=logging.INFO)
async def main() -> None:
    _exit_if_stuck(float(sys.argv[1]))
    print("draining", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def hung(after_s: float) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HUNG, str(after_s), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"draining\n"
    return proc


async def test_a_second_stop_signal_ends_a_shutdown_at_once() -> None:
    proc = await hung(3600)
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 60)  # not the hour
    assert proc.returncode == 1
    assert b"SIGTERM received again; exiting without finishing the shutdown" in err


async def test_a_shutdown_past_its_grace_ends_the_process() -> None:
    proc = await hung(2)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert b"the shutdown did not finish within 2 s; exiting" in err


@pytest.mark.rabbitmq
@pytest.mark.parametrize("attempt", range(3))
async def test_a_stop_signal_sent_on_the_ready_line_drains(
        rabbitmq_url: str, tmp_path: Path, attempt: int) -> None:
    """Whoever sees a gateway's or worker's ready line may stop it at once (a
    supervisor, an orchestrator, a test): the handlers are in place before the line, so
    the signal drains and exits 0, not Python's default death by SIGTERM. The gap
    between the two was what a ``--processes`` pool occasionally exited 1 on."""
    prefix = unique_prefix()
    keys = tmp_path / "keys.json"
    create_key(keys, "shutdown")
    commands = {
        b"metrics and probes on": ["gateway", "--broker", rabbitmq_url, "--prefix", prefix,
                                   "--keys-file", str(keys), "--port", "0",
                                   "--ops-port", "0", "--drain-grace-s", "1"],
        b"audiostream worker consuming": ["worker", "--broker", rabbitmq_url, "--prefix",
                                          prefix, "--processing", "passthrough"],
    }
    try:
        for ready, args in commands.items():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "audiostream", *args, cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            assert proc.stdout is not None
            while ready not in (line := await asyncio.wait_for(proc.stdout.readline(), 120)):
                assert line, "exited before it was ready"
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
            assert b"SIGTERM received" in err
    finally:
        await delete_prefixed(rabbitmq_url, Topology(processing_types=tuple(registry.names()),
                                                     prefix=prefix))
