"""Shared helpers for the benchmark scripts: processes, keys, CPU/RSS accounting, cleanup.

Everything here talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BROKER = os.environ.get("AUDIOSTREAM_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def emit(obj: dict[str, Any], out: Any = None) -> None:
    """One JSON object per line on stdout (and appended to ``out`` if given)."""
    line = json.dumps(obj, sort_keys=False)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        m = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        mem_kb = int(m.group(1)) if m else 0
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# --- per-process CPU and memory --------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def find_pid(comm: str) -> int | None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == comm:
                    return int(d.name)
    return None


def thread_waits(pid: int) -> dict[int, tuple[int, int, int]]:
    """Per thread of ``pid``: nanoseconds spent runnable but waiting for a CPU and times
    it got one (fields 2 and 3 of ``/proc/PID/task/TID/schedstat``, there even without
    CONFIG_SCHEDSTATS), and involuntary context switches (preempted while it still had
    work). Empty off Linux."""
    out = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                _, delay, runs = (task / "schedstat").read_text().split()[:3]
                status = (task / "status").read_text()
                m = re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", status)
                out[int(task.name)] = (int(delay), int(runs), int(m.group(1)) if m else 0)
    return out


@dataclass
class CpuMeter:
    """CPU use of named processes over an interval, in cores (1.0 = one core busy), and
    (``waits``) how long they were runnable without a CPU: the cost of running more busy
    processes than there are cores, which CPU time and idle time do not show."""

    pids: dict[str, int]
    start: dict[str, float] = field(default_factory=dict)
    t0: float = 0.0
    stat0: list[int] = field(default_factory=list)
    waits0: dict[str, dict[int, tuple[int, int, int]]] = field(default_factory=dict)

    def __enter__(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.start = {k: self._cpu(p) for k, p in self.pids.items()}
        self.stat0 = _proc_stat()
        self.waits0 = {k: thread_waits(p) for k, p in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @staticmethod
    def _cpu(pid: int) -> float:
        """A process's CPU with its live children's (``gateway --processes N`` is a
        supervisor whose children do the work)."""
        if pid == os.getpid():
            t = os.times()
            return t.user + t.system
        total = 0.0
        for p in (pid, *children(pid)):
            with contextlib.suppress(OSError):
                total += cpu_seconds(p)
        return total

    def read(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        return {k: round((self._cpu(p) - self.start[k]) / wall, 3)
                for k, p in self.pids.items()}

    def waits(self) -> dict[str, dict[str, float]]:
        """Per process over the interval: ``runqueue_wait_ms_per_s``, milliseconds its
        threads together spent runnable but not running per second of wall time (1000 =
        one thread always waiting); ``runqueue_wait_per_run_us``, that wait per time a
        thread got a CPU; ``involuntary_switches_per_s``. Summed over the threads alive
        at the end: a thread that exited during the interval is missing (its wait is
        lost with it), one started during it counts from its start."""
        wall = time.monotonic() - self.t0
        delay: dict[str, float] = {}
        per_run: dict[str, float] = {}
        switches: dict[str, float] = {}
        for k, p in self.pids.items():
            before = self.waits0.get(k, {})
            d = [tuple(a - b for a, b in zip(v, before.get(t, (0, 0, 0)), strict=True))
                 for t, v in thread_waits(p).items()]
            ns, runs, inv = (sum(x[i] for x in d) for i in range(3))
            delay[k] = round(ns / 1e6 / wall, 1)
            per_run[k] = round(ns / 1e3 / runs, 1) if runs else 0.0
            switches[k] = round(inv / wall, 1)
        return {"runqueue_wait_ms_per_s": delay, "runqueue_wait_per_run_us": per_run,
                "involuntary_switches_per_s": switches}

    def machine(self) -> dict[str, float]:
        """The whole machine over the same interval, in cores (``/proc/stat``): says
        whether a trial was CPU-bound (idle near 0) and how much went to the kernel's
        network processing (softirq), which no process is charged for."""
        now = _proc_stat()
        if not now or not self.stat0:
            return {}
        delta = [b - a for a, b in zip(self.stat0, now, strict=False)]
        total = sum(delta[:8])
        cores = os.cpu_count() or 1
        names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
        out = {n: round(cores * d / total, 3) for n, d in zip(names, delta, strict=False)
               if total}
        out["busy"] = round(cores - out.get("idle", 0.0) - out.get("iowait", 0.0), 3)
        return out


def _proc_stat() -> list[int]:
    """The aggregate CPU line of ``/proc/stat`` in clock ticks (empty off Linux)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


# --- audiostream processes ---------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "audiostream", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def create_key(keys_file: Path) -> str:
    import subprocess

    out = subprocess.run(cli("keys", "create", "bench", "--keys-file", str(keys_file)),
                         check=True, capture_output=True, text=True, env=env())
    return out.stdout.strip().splitlines()[-1]


@dataclass
class Proc:
    name: str
    proc: asyncio.subprocess.Process
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, grace_s: float = 30) -> int | None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


async def start(name: str, argv: Sequence[str], ready: str, within_s: float = 120) -> Proc:
    """Start a process and wait for a stdout line containing ``ready``.

    Its stderr (the logs) is discarded, or kept in ``$BENCH_LOG_DIR/NAME.log``."""
    logs = os.environ.get("BENCH_LOG_DIR")
    with contextlib.ExitStack() as files:
        stderr: Any = asyncio.subprocess.DEVNULL
        if logs:
            stderr = files.enter_context((Path(logs) / f"{name}.log").open("ab"))
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env=env(), stdout=asyncio.subprocess.PIPE,
            stderr=stderr, stdin=asyncio.subprocess.DEVNULL,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + within_s
    while True:
        left = deadline - time.monotonic()
        line = await asyncio.wait_for(proc.stdout.readline(), max(left, 0.1))
        if not line:
            raise RuntimeError(f"{name} exited ({await proc.wait()}) before it was ready")
        if ready in line.decode():
            p = Proc(name, proc, {"line": line.decode().strip()})
            asyncio.get_running_loop().create_task(_drain(proc))
            return p


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """A gateway and a worker process on RabbitMQ under a private prefix."""

    prefix: str
    key: str
    gateway: Proc
    worker: Proc | None
    ws_url: str
    gateway_metrics: str
    worker_metrics: str | None


@contextlib.asynccontextmanager
async def stack(processing: Sequence[str], *, broker: str = BROKER, workers: bool = True,
                gateway_args: Sequence[str] = (), worker_args: Sequence[str] = (),
                nice: int = 0) -> AsyncIterator[Stack]:
    """``nice``: the gateway's and worker's niceness (negative needs root), to see what
    their latency owes to waiting for a core behind the broker and the load generator."""
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    niced = ["nice", "-n", str(nice)] if nice else []
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        key = create_key(keys)
        procs: list[Proc] = []
        try:
            worker = None
            wport = free_port()
            if workers:
                worker = await start("worker", niced + cli(
                    "worker", "--broker", broker, "--prefix", prefix,
                    "--processing", ",".join(processing), "--metrics-port", str(wport),
                    "--metrics-host", "127.0.0.1", *worker_args), "consuming")
                procs.append(worker)
            oport = free_port()
            gateway = await start("gateway", niced + cli(
                "gateway", "--broker", broker, "--prefix", prefix, "--keys-file", str(keys),
                "--host", "127.0.0.1", "--port", "0", "--drain-grace-s", "1",
                "--ops-port", str(oport),
                # Every load client is 127.0.0.1: the per-address cap is not measured here.
                "--max-pending-per-ip", "0",
                *gateway_args), "audiostream gateway on")
            procs.append(gateway)
            m = re.search(r"(ws://\S+)", gateway.info["line"])
            assert m, gateway.info
            url = m.group(1)
            yield Stack(prefix, key, gateway, worker, url,
                        f"http://127.0.0.1:{oport}/metrics",
                        f"http://127.0.0.1:{wport}/metrics" if worker else None)
        finally:
            for p in reversed(procs):
                await p.stop()
            await delete_prefix(broker, prefix)


async def delete_prefix(broker: str, prefix: str) -> None:
    """Delete the work queues and exchanges a benchmark declared under ``prefix``."""
    from audiostream.embedded import default_topology
    from audiostream.transport.rabbitmq import delete_topology

    await delete_topology(broker, default_topology(prefix=prefix))


def percentiles(values: Sequence[float]) -> dict[str, float]:
    from audiostream.protocol import latency_summary

    out = dict(latency_summary(list(values)))
    out["count"] = len(values)
    return out


# --- pinning, per-thread CPU, and the session-count search ------------------------------------


def pin(pid: int, cpus: set[int]) -> list[int]:
    """Pin every thread of ``pid`` (threads created later inherit it); returns the CPUs."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)
    return sorted(os.sched_getaffinity(pid))


class CpuQuota:
    """A CFS bandwidth limit (``cores`` of CPU time per ``period_s``) on one process.

    This is what a Kubernetes CPU limit is, so "a worker with a 0.5-core limit holds N
    sessions" is both a direct measurement of N / 0.5 sessions per core on a machine too
    small to load a whole worker core, and the figure an operator sizes pods with. Uses
    cgroup v2 (``cpu.max``) where the cpu controller is there, else cgroup v1; needs root.
    Threads the process starts later inherit the group. ``stats()`` tells whether the
    limit bit (periods throttled, time throttled).
    """

    ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct"))

    def __init__(self, pid: int, cores: float, period_s: float = 0.01) -> None:
        if not 0.01 <= cores <= (os.cpu_count() or 1):
            raise ValueError(f"quota of {cores} cores is out of range")
        self.pid, self.cores, self.period_s = pid, cores, period_s
        self.dir: Path | None = None
        self.v2 = False

    def __enter__(self) -> CpuQuota:
        period = int(self.period_s * 1e6)
        quota = int(self.cores * period)
        for root in self.ROOTS:
            v2 = (root / "cgroup.controllers").exists()
            if v2 and "cpu" not in (root / "cgroup.subtree_control").read_text().split():
                continue
            if not v2 and not (root / "cpu.cfs_quota_us").exists():
                continue
            d = root / f"audiostream-bench-{os.getpid()}-{self.pid}"
            d.mkdir(exist_ok=True)
            self.dir, self.v2 = d, v2
            if v2:
                (d / "cpu.max").write_text(f"{quota} {period}")
            else:
                (d / "cpu.cfs_period_us").write_text(str(period))
                (d / "cpu.cfs_quota_us").write_text(str(quota))
            (d / "cgroup.procs").write_text(str(self.pid))  # every thread of the process
            return self
        raise RuntimeError("no writable cgroup cpu controller (needs root and cgroup v1 or v2)")

    def stats(self) -> dict[str, float]:
        """Cumulative throttling counters of the group (periods, throttled ones, seconds)."""
        assert self.dir is not None
        raw = dict(line.split() for line in (self.dir / "cpu.stat").read_text().splitlines())
        usec = int(raw["throttled_usec"]) if self.v2 else int(raw["throttled_time"]) // 1000
        return {"periods": int(raw["nr_periods"]), "throttled": int(raw["nr_throttled"]),
                "throttled_s": usec / 1e6}

    def __exit__(self, *exc: object) -> None:
        if self.dir is None:
            return
        parent = self.dir.parent / "cgroup.procs"
        with contextlib.suppress(OSError):  # the process may have exited already
            for pid in (self.dir / "cgroup.procs").read_text().split():
                parent.write_text(pid)
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            f = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def loop_and_other_cores(pid: int, before: dict[int, float], wall: float) -> dict[str, float]:
    """Cores used since ``before`` by the main (event-loop) thread and by all the others
    (the executor running the processing step, ONNX Runtime, aio-pika)."""
    delta = {t: (v - before.get(t, 0.0)) / wall for t, v in thread_seconds(pid).items()}
    loop = delta.pop(pid, 0.0)
    return {"event_loop": round(loop, 3), "executor_and_other": round(sum(delta.values()), 3)}


def sweep_options(ap: Any, *, start: int, step: int, maximum: int, resolution: int) -> None:
    """The options of a session-count sweep (``find_limit``), its trials and its output."""
    ap.add_argument("--start", type=int, default=start)
    ap.add_argument("--step", type=int, default=step)
    ap.add_argument("--max", type=int, default=maximum)
    ap.add_argument("--resolution", type=int, default=resolution)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per trial")
    ap.add_argument("--out", type=Path, default=None, help="also append JSON lines here")


async def find_limit(passes: Callable[[int], Awaitable[bool]], *, start: int, step: int,
                     maximum: int, resolution: int) -> tuple[int, int | None]:
    """Largest passing count (0: none) and the first failing one: grow by ``step`` from
    ``start`` until a count fails, then bisect down to ``resolution``."""
    good, bad = 0, None
    n = start
    while n <= maximum:
        if not await passes(n):
            bad = n
            break
        good = n
        n += step
    while bad is not None and bad - good > resolution:
        n = (good + bad) // 2
        if await passes(n):
            good = n
        else:
            bad = n
    return good, bad
