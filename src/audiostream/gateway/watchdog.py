"""Broker stall detection: a connection that is up but moves no bytes (issue #13, hole 13).

A TCP connection to RabbitMQ can stay open while nothing crosses it (a hung
broker, a stuck proxy or NAT, a full socket buffer). aio-pika then reports
itself connected, ``/readyz`` stayed 200, every chunk expired and a new
session's ``start`` waited on its reply-queue declaration with neither
``ready`` nor an error.

The watchdog sends a cheap broker round trip (a passive queue declare) every
``interval_s``. A probe unanswered for ``stall_after_s`` marks the broker
*stalled*: ``healthy`` turns false (``/readyz`` answers 503) and new sessions
are refused with ``broker_unavailable`` (4091) at once. The first probe that
completes marks it healthy again. So a stall is noticed within
``interval_s + stall_after_s`` (3 s with the defaults).

``bounded`` guards the broker work of a ``start`` or resume: it ends with
``broker_unavailable`` when a stall is detected meanwhile, or (for a ``start``) after
``start_timeout_s`` whatever the probes say; the abandoned work is cancelled and
its clean-up runs in a task the watchdog owns. A client that sends ``start``
during a stall therefore gets 4091 within ``min(interval_s + stall_after_s,
start_timeout_s)`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from audiostream.errors import ErrorCode, TransportError

log = logging.getLogger(__name__)

T = TypeVar("T")
Probe = Callable[[], Awaitable[object]]
Cleanup = Callable[[], Coroutine[Any, Any, None]]

#: A probe still unanswered after this many ``stall_after_s`` is cancelled (the
#: transport's own operation timeout normally ends it first).
_PROBE_GIVE_UP = 15


class BrokerWatchdog:
    def __init__(
        self,
        probe: Probe,
        *,
        interval_s: float = 1.0,
        stall_after_s: float = 2.0,
        start_timeout_s: float = 5.0,
    ) -> None:
        self.probe = probe
        self.interval_s = interval_s
        self.stall_after_s = stall_after_s
        self.start_timeout_s = start_timeout_s
        self.reason = ""
        """Why the broker is considered stalled; empty while healthy."""
        self.stalls = 0
        """Stalls detected so far."""
        self.refused = 0
        """Starts refused or abandoned because of a stall or the start timeout."""
        self._stalled = asyncio.Event()
        self._stalled_since = 0.0
        self._task: asyncio.Task[None] | None = None
        self._owned: set[asyncio.Task[Any]] = set()

    @property
    def healthy(self) -> bool:
        return not self._stalled.is_set()

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="broker-watchdog")

    async def close(self) -> None:
        """Cancel the probe loop and every abandoned start and clean-up it owns."""
        tasks = [t for t in (self._task, *self._owned) if t is not None]
        self._task = None
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(5.0, self.stall_after_s))
        self._owned.clear()

    # -- detection ------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._probe_once()
            await asyncio.sleep(self.interval_s)  # a poll period, not a synchronisation

    async def _probe_once(self) -> None:
        started = time.monotonic()
        probe = asyncio.ensure_future(self.probe())
        try:
            done, _ = await asyncio.wait({probe}, timeout=self.stall_after_s)
            if not done:
                self._mark_stalled(f"no answer from the broker for {self.stall_after_s:g} s")
                done, _ = await asyncio.wait(
                    {probe}, timeout=self.stall_after_s * _PROBE_GIVE_UP)
                if not done:
                    return  # still stalled; the next probe starts afresh
            err = probe.exception()
        finally:
            if not probe.done():
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await probe
        if err is not None:
            self._mark_stalled(f"broker probe failed: {err}")
        else:
            self._mark_healthy(time.monotonic() - started)

    def _mark_stalled(self, reason: str) -> None:
        self.reason = reason
        if self._stalled.is_set():
            return
        self._stalled_since = time.monotonic()
        self._stalled.set()
        self.stalls += 1
        log.warning("stage=broker: %s; readiness is false and new sessions are refused "
                    "with broker_unavailable until it answers", reason)

    def _mark_healthy(self, took_s: float) -> None:
        if not self._stalled.is_set():
            return
        self._stalled.clear()
        self.reason = ""
        log.warning("stage=broker: the broker answers again (probe took %.3f s) after "
                    "%.1f s unavailable", took_s, time.monotonic() - self._stalled_since)

    # -- guarding starts ----------------------------------------------------------------
    def _refusal(self, why: str) -> TransportError:
        self.refused += 1
        return TransportError(f"the message broker is not responding ({why}); "
                              "try again shortly", ErrorCode.BROKER_UNAVAILABLE)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in a task the watchdog owns (cancelled by ``close``)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._owned.add(task)
        task.add_done_callback(self._owned.discard)
        task.add_done_callback(_retrieve)

    async def bounded(self, work: Coroutine[Any, Any, T], *,
                      cleanup: Cleanup | None = None, timed: bool = True) -> T:
        """``await work``, unless the broker is or becomes stalled or (``timed``) it takes
        longer than ``start_timeout_s``: then ``TransportError(BROKER_UNAVAILABLE)``.
        (A resume's takeover has deadlines of its own and waits on a previous holder,
        so it is raced against stalls only.)

        If ``work`` fails, is abandoned or the caller is cancelled, ``cleanup()`` runs in
        an owned task, so the client gets its answer without waiting on the broker.
        """
        if self._stalled.is_set():
            work.close()
            raise self._refusal(self.reason)
        task = asyncio.ensure_future(work)
        stalled = asyncio.ensure_future(self._stalled.wait())
        try:
            done, _ = await asyncio.wait({task, stalled},
                                         timeout=self.start_timeout_s if timed else None,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandon(task, cleanup)
            raise
        finally:
            stalled.cancel()
        if task in done:
            if task.exception() is not None and cleanup is not None:
                self.spawn(cleanup())
            return task.result()
        self._abandon(task, cleanup)
        why = self.reason if self._stalled.is_set() else (
            f"no answer within {self.start_timeout_s:g} s")
        raise self._refusal(why)

    def _abandon(self, task: asyncio.Future[Any], cleanup: Cleanup | None) -> None:
        task.cancel()
        task.add_done_callback(_retrieve)

        async def settle() -> None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if cleanup is not None:
                await cleanup()

        self.spawn(settle())


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background task's exception as seen: it was logged where it mattered."""
    if not task.cancelled():
        task.exception()
