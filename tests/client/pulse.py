"""A private PulseAudio daemon with null devices: a sound system for PortAudio without a
sound card.

``micsink`` is a null sink whose monitor is the default source (the "microphone": what
``paplay`` plays into it is captured at the device's pace); ``speaker`` is the default
sink, recorded from its monitor by ``parec``. Everything lives in a temporary directory
and the daemon is our child process, stopped on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

RATE = 16000

CONFIG = """\
load-module module-native-protocol-unix auth-anonymous=1 socket={socket}
load-module module-null-sink sink_name=speaker rate={rate} channels=1
load-module module-null-sink sink_name=micsink rate={rate} channels=1
set-default-sink speaker
set-default-source micsink.monitor
"""


@dataclass(frozen=True)
class Pulse:
    env: dict[str, str]  # what a client process needs to reach this daemon

    async def run(self, *argv: str, timeout_s: float = 60.0) -> int:
        """Its exit code; killed, and the test failed, if it runs past ``timeout_s``."""
        proc = await asyncio.create_subprocess_exec(
            *argv, env=self.env, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            return await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise AssertionError(f"{argv[0]} did not finish within {timeout_s:g} s") from None

    async def start(self, *argv: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*argv, env=self.env)


async def stop(proc: asyncio.subprocess.Process, sig: int, grace_s: float = 15.0) -> bool:
    """Signal ``proc`` and reap it; killed if it outlives ``grace_s``. True: it exited by
    itself. A PortAudio or PulseAudio client can block for seconds in its teardown
    (docs/sdk.md), and an unbounded wait here hung a CI run until pytest's timeout."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
        return True
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is missing: run `make install` (scripts/ensure-system-deps.sh)"
    return path


@contextlib.asynccontextmanager
async def pulse_daemon(root: Path) -> AsyncIterator[Pulse]:
    (root / "run").mkdir(parents=True)
    socket = root / "run" / "native"
    config = root / "default.pa"
    config.write_text(CONFIG.format(socket=socket, rate=RATE))
    env = {**os.environ, "HOME": str(root), "XDG_RUNTIME_DIR": str(root / "run"),
           "PULSE_SERVER": f"unix:{socket}"}
    daemon = await asyncio.create_subprocess_exec(
        need("pulseaudio"), "-n", "-F", str(config), "--daemonize=no",
        "--exit-idle-time=-1", "--log-target=stderr", env=env,
        stderr=asyncio.subprocess.DEVNULL)
    pulse = Pulse(env)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while await pulse.run(need("pactl"), "info", timeout_s=20) != 0:  # ready: it answers
            assert daemon.returncode is None, "pulseaudio exited at start-up"
            assert loop.time() < deadline, "pulseaudio did not answer within 20 s"
            await asyncio.sleep(0.05)  # poll interval of a readiness check
        yield pulse
    finally:
        await stop(daemon, signal.SIGTERM)
