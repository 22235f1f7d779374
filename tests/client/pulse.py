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

    async def run(self, *argv: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=self.env, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        return await proc.wait()

    async def start(self, *argv: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*argv, env=self.env)


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
        while await pulse.run(need("pactl"), "info") != 0:  # ready when it answers
            assert daemon.returncode is None, "pulseaudio exited at start-up"
            assert loop.time() < deadline, "pulseaudio did not answer within 20 s"
            await asyncio.sleep(0.05)  # poll interval of a readiness check
        yield pulse
    finally:
        if daemon.returncode is None:
            daemon.terminate()
        await daemon.wait()
