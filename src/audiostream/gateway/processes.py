"""Several gateway processes on one port (``audiostream gateway --processes N``).

One gateway process is one event loop, so it uses one core. A pod or VM with more
cores runs N processes that bind the same port with ``SO_REUSEPORT``; the kernel spreads
new connections across them. Each process is a whole, ordinary gateway (its own broker
connection, its own operations port ``--ops-port + i``), so nothing is shared between
them but the port and the token secret, and a session dropped by one resumes on
another through the journal, as across pods.

The supervisor is a plain parent that starts no event loop of its own work: it starts
the children, prints one address line once all are ready, forwards SIGTERM/SIGINT
(each child drains as a lone gateway does) and restarts a child that dies, unless
children keep dying (a crash loop is an error, not something to hide).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

log = logging.getLogger("audiostream.gateway")

READY_LINE = "audiostream gateway on "
OPS_LINE = "metrics and probes on "
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProcessPlan:
    """What the supervisor runs: ``argv`` is the user's own command line (the options
    that differ per child are appended, and argparse keeps the last of each)."""

    argv: tuple[str, ...]
    processes: int
    host: str
    port: int
    ops_port: int  # 0: each child picks a free one; otherwise child i serves ops_port + i
    secret_given: bool
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 60.0  # then a child still running is killed
    restart_limit: int = 5  # children that may die within restart_window_s
    restart_window_s: float = 60.0

    def child_argv(self, index: int, port: int) -> list[str]:
        ops = 0 if self.ops_port == 0 else self.ops_port + index
        return [sys.executable, "-m", "audiostream", *self.argv, "--processes", "1",
                "--reuse-port", "--port", str(port), "--ops-port", str(ops)]


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process
    ops_url: str = ""
    relay: asyncio.Task[None] | None = field(default=None, repr=False)


class ChildFailed(Exception):
    """A child exited before it was ready; carries its exit code."""

    def __init__(self, index: int, code: int) -> None:
        super().__init__(f"gateway process {index} exited with code {code} before it was "
                         "ready (its error is above)")
        self.index = index
        self.code = code


def reserve_port(host: str) -> socket.socket:
    """A bound, never-listening ``SO_REUSEPORT`` socket that holds a free port for the
    children to share until they all listen (the kernel balances only between
    listening sockets, so it never receives a connection)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def _die_with_parent() -> None:
    """Runs in the child before exec: a SIGKILLed supervisor must not leave gateways
    serving on behind it (Linux only; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Owns the children: every task it starts is cancelled in ``run``'s finally."""

    def __init__(self, plan: ProcessPlan, out: TextIO | None = None) -> None:
        self.plan = plan
        self.out = out or sys.stdout
        self.children: dict[int, _Child] = {}
        self.port = plan.port
        self._env = dict(os.environ)
        if not plan.secret_given:
            # Without a shared secret a resume token from one child would be refused by
            # the next, and the kernel picks the child, not the client.
            self._env["AUDIOSTREAM_TOKEN_SECRET"] = secrets.token_hex(32)
        self._deaths: list[float] = []

    async def _spawn(self, index: int) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            *self.plan.child_argv(index, self.port), env=self._env,
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards it once (a second signal makes a gateway exit without draining).
            start_new_session=True, preexec_fn=_die_with_parent)
        child = _Child(index, proc)
        try:
            await asyncio.wait_for(self._until_ready(child), self.plan.start_timeout_s)
        except BaseException:
            await _stop(proc, signal.SIGKILL)
            raise
        child.relay = asyncio.get_running_loop().create_task(self._relay(proc))
        return child

    async def _until_ready(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        seen_ready = False
        while True:
            raw = await child.proc.stdout.readline()
            if not raw:
                raise ChildFailed(child.index, await child.proc.wait())
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(READY_LINE):
                seen_ready = True
            elif line.startswith(OPS_LINE):
                child.ops_url = line[len(OPS_LINE):].strip()
                if seen_ready:
                    return
            else:
                self._print(line)

    async def _relay(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while raw := await proc.stdout.readline():
            self._print(raw.decode(errors="replace").rstrip("\n"))

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _announce(self, child: _Child) -> None:
        self._print(f"{OPS_LINE}{child.ops_url} (process {child.index}, pid {child.proc.pid})")

    async def start(self) -> None:
        """Start every child; all or none (a child that fails stops the others)."""
        reservation = reserve_port(self.plan.host) if self.plan.port == 0 else None
        try:
            if reservation is not None:
                self.port = int(reservation.getsockname()[1])
            spawned = await asyncio.gather(
                *(self._spawn(i) for i in range(self.plan.processes)),
                return_exceptions=True)
        finally:
            if reservation is not None:
                reservation.close()
        for result in spawned:
            if isinstance(result, _Child):
                self.children[result.index] = result
        failures = [r for r in spawned if isinstance(r, BaseException)]
        if failures:
            await self.stop(signal.SIGTERM)
            raise failures[0]

    def url(self, tls: bool) -> str:
        host = f"[{self.plan.host}]" if ":" in self.plan.host else self.plan.host
        return f"{'wss' if tls else 'ws'}://{host}:{self.port}/v1/stream"

    async def watch(self, stop: asyncio.Future[str]) -> str:
        """Restart children that die until ``stop`` resolves (a signal's name) or they
        die too often; returns why it stopped."""
        while True:
            waits = {asyncio.ensure_future(c.proc.wait()): c for c in self.children.values()}
            watched: list[asyncio.Future[Any]] = [stop, *waits]
            try:
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if stop in done:
                return stop.result()
            for w, child in waits.items():
                if w not in done:
                    continue
                code = w.result()
                await _cancel(child.relay)
                while True:
                    if self._too_many_deaths():
                        return (f"{len(self._deaths)} gateway processes died within "
                                f"{self.plan.restart_window_s:.0f} s (the last, process "
                                f"{child.index}, with code {code})")
                    log.warning("gateway process %d (pid %d) exited with code %s; "
                                "restarting it", child.index, child.proc.pid, code)
                    try:
                        fresh = await self._spawn(child.index)
                    except ChildFailed as exc:
                        code = exc.code
                        continue
                    self.children[child.index] = fresh
                    self._announce(fresh)
                    break

    def _too_many_deaths(self) -> bool:
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < self.plan.restart_window_s]
        self._deaths.append(now)
        return len(self._deaths) > self.plan.restart_limit

    async def stop(self, sig: signal.Signals) -> list[int]:
        """Signal every child and wait for each (each drains as a lone gateway does)."""
        children = list(self.children.values())
        codes = await asyncio.gather(*(_stop(c.proc, sig, self.plan.stop_timeout_s)
                                       for c in children))
        for c in children:
            await _cancel(c.relay)
        return list(codes)


async def _stop(proc: asyncio.subprocess.Process, sig: signal.Signals,
                timeout_s: float | None = None) -> int:
    """Signal and reap; a child that outlives ``timeout_s`` is killed (a child's own
    shutdown is bounded too, so this is the backstop's backstop)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        return await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        log.error("gateway process (pid %d) still running %.0f s after %s; killing it",
                  proc.pid, timeout_s or 0, sig.name)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return await proc.wait()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run(plan: ProcessPlan, *, tls: bool, out: TextIO | None = None) -> int:
    """Run the children until SIGTERM/SIGINT; the exit code is 0 when all drained
    cleanly, otherwise the first child's failure."""
    sup = Supervisor(plan, out)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if not stop.done():
            stop.set_result(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        try:
            await sup.start()
        except ChildFailed as exc:
            log.error("%s", exc)
            return exc.code if exc.code > 0 else 1
        sup._print(f"{READY_LINE}{sup.url(tls)} ({plan.processes} processes)")
        for child in sorted(sup.children.values(), key=lambda c: c.index):
            sup._announce(child)
        why = await sup.watch(stop)
        if received:
            log.info("%s received; draining %d gateway processes", why, len(sup.children))
            codes = await sup.stop(received[0])
            return 0 if all(c == 0 for c in codes) else 1
        log.error("%s; stopping", why)
        await sup.stop(signal.SIGTERM)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await sup.stop(signal.SIGKILL)
