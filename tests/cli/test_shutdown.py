"""A gateway's shutdown is bounded: a second stop signal, or a shutdown that outlives
its grace, ends the process (real processes, real signals)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

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
