"""``audiostream gateway --processes N``: real processes sharing one port on RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient, ReconnectPolicy
from audiostream.gateway import create_key
from audiostream.processors import registry
from audiostream.topology import Topology
from tests.conftest import delete_prefixed, unique_prefix

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]
ROOT = Path(__file__).resolve().parents[2]
FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
OPS = re.compile(r"metrics and probes on (\S+) \(process (\d+), pid (\d+)\)")


@dataclass
class Pool:
    proc: asyncio.subprocess.Process
    url: str
    key: str
    children: dict[int, tuple[str, int]]  # index: (ops url, pid)
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    async def next_child_line(self) -> tuple[int, str, int]:
        assert self.proc.stdout is not None
        while True:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), 120)).decode()
            assert line, "the supervisor exited"
            if m := OPS.search(line):
                index, ops, pid = int(m.group(2)), m.group(1), int(m.group(3))
                self.children[index] = (ops, pid)
                return index, ops, pid


async def spawn(*args: str, stderr: int = asyncio.subprocess.DEVNULL
                ) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiostream", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


async def wait_line(proc: asyncio.subprocess.Process, text: bytes) -> bytes:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line, "process exited before it was ready"
        if text in line:
            return line


@pytest.fixture
async def pool(rabbitmq_url: str, tmp_path: Path) -> AsyncIterator[Pool]:
    prefix = unique_prefix()
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "processes")
    worker = await spawn("worker", "--broker", rabbitmq_url, "--prefix", prefix,
                         "--processing", "passthrough")
    log = tmp_path / "gateway.log"  # the supervisor's and its children's (inherited)
    with log.open("wb") as stderr:
        sup = await spawn("gateway", "--broker", rabbitmq_url, "--prefix", prefix,
                          "--keys-file", str(keys), "--port", "0", "--ops-port", "0",
                          "--processes", "2", stderr=stderr.fileno())
    try:
        await wait_line(worker, b"consuming")
        m = re.search(rb"(ws://\S+) \(2 processes\)",
                      await wait_line(sup, b"audiostream gateway on"))
        assert m is not None
        p = Pool(sup, m.group(1).decode(), key, {}, log)
        for _ in range(2):
            await p.next_child_line()
        assert sorted(p.children) == [0, 1]
        yield p
    finally:
        for proc in (sup, worker):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await delete_prefixed(rabbitmq_url, topology(prefix))


def topology(prefix: str) -> Topology:
    return Topology(processing_types=tuple(registry.names()), prefix=prefix)


async def metric(ops: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(
            f"{ops}/metrics", params={"name[]": name}) as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def client(p: Pool, **kw: object) -> AudioStreamClient:
    return AudioStreamClient(p.url, api_key=p.key, pipeline=["passthrough"], format=FMT,
                             deadline_ms=8000, **kw)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ours(prefix: str) -> list[int]:
    """Processes whose command line holds this test's private prefix."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and prefix.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


async def test_the_processes_share_one_port_and_each_serves_sessions(pool: Pool) -> None:
    x = (np.random.default_rng(1).standard_normal(3200) * 3000).astype(np.int16)
    results = await asyncio.gather(*(client(pool).stream(x) for _ in range(24)))
    for r in results:
        assert r.audio == x.tobytes() and not r.dropped
    # The kernel spreads connections by address hash: with 24 connections the chance
    # that one process got none is 2 in 2**24.
    served = [await metric(ops, "audiostream_chunks_out_total")
              for ops, _ in pool.children.values()]
    assert all(n > 0 for n in served), served
    assert sum(served) == 24 * 10


async def test_a_killed_process_is_replaced_and_its_session_resumes_on_another(
        pool: Pool) -> None:
    x = (np.random.default_rng(2).standard_normal(16000 * 2) * 3000).astype(np.int16)
    c = client(pool, reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.5, max_attempts=20))
    answered: list[int] = []
    c.on_audio(lambda seq, _pcm: answered.append(seq))
    task = asyncio.create_task(c.stream(x, rate=1.0))
    while len(answered) < 20:  # polling the client's progress
        assert not task.done()
        await asyncio.sleep(0.02)
    active = {i: await metric(ops, "audiostream_gateway_connections_active")
              for i, (ops, _) in pool.children.items()}
    victim = max(active, key=lambda i: active[i])
    assert active[victim] == 1, active
    old_pid = pool.children[victim][1]
    os.kill(old_pid, signal.SIGKILL)
    result = await asyncio.wait_for(task, 60)
    # The survivor accepted the resume token: both processes hold the same secret.
    assert result.resumes >= 1 and not result.dropped
    assert result.audio == x.tobytes()
    index, ops, pid = await pool.next_child_line()
    assert index == victim and pid != old_pid and alive(pid)
    async with aiohttp.ClientSession() as http, http.get(f"{ops}/healthz") as r:
        assert r.status == 200


async def test_sigterm_drains_every_process_and_exits_0(pool: Pool) -> None:
    pids = [pid for _, pid in pool.children.values()]
    pool.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(pool.proc.wait(), 60) == 0, pool.log_tail()
    assert not any(alive(pid) for pid in pids)


async def test_a_process_that_cannot_start_stops_the_others(
        rabbitmq_url: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    create_key(keys, "processes")
    prefix = unique_prefix()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        # Process 0 serves its operations port on busy - 1, process 1 on busy: taken.
        sup = await spawn("gateway", "--broker", rabbitmq_url, "--prefix", prefix,
                          "--keys-file", str(keys), "--port", "0",
                          "--ops-port", str(busy - 1), "--processes", "2",
                          stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(sup.communicate(), 120)
    assert sup.returncode not in (0, None)
    assert b"cannot serve operations endpoints" in err
    assert re.search(rb"gateway process \d exited with code \d+ before it was ready", err)
    assert not [pid for pid in ours(prefix) if alive(pid)]
    await delete_prefixed(rabbitmq_url, topology(prefix))


async def test_the_processes_die_with_a_sigkilled_supervisor(pool: Pool) -> None:
    pids = [pid for _, pid in pool.children.values()]
    pool.proc.kill()
    await pool.proc.wait()
    deadline = asyncio.get_running_loop().time() + 60
    while any(alive(pid) for pid in pids):  # polling: they are no longer our children
        assert asyncio.get_running_loop().time() < deadline, "orphaned gateway processes"
        await asyncio.sleep(0.05)
