"""Broker stall detection: a connection that is up but moves no bytes (issue #13, hole 13).

A TCP connection to RabbitMQ can stay open while nothing crosses it (a hung
broker, a stuck proxy or NAT, a full socket buffer). aio-pika then reports
itself connected, ``/readyz`` stayed 200, every chunk expired and a new
session's ``start`` waited on its reply-queue declaration with neither
``ready`` nor an error.

The watchdog sends a cheap broker round trip (a passive queue declare) every
``interval_s``, so there is always something the broker owes us, and judges a
stall by the broker's *progress*, never by how late our own event loop is: the
broker is *stalled* when, while a probe is outstanding, it has answered nothing
at all (no probe answer, publish confirm or delivery: the transport's
``progress`` counter stands still) for ``stall_after_s`` seconds of **lag-free
time**. Lag-free time advances by at most one ``tick_s`` per turn of the
watchdog's ticker, however late that turn comes: an event loop starved of CPU
(a saturated gateway on a shared machine) ticks late, and its lateness is not
broker silence; an overloaded gateway keeps seeing confirms and deliveries, so a
probe queued behind them is not silence either. (The first version timed the probe
alone by the wall clock and, at three times the load a gateway holds, refused
healthy sessions with ``broker_unavailable``; docs/benchmarks.md, overload.)

A stall turns ``healthy`` false (``/readyz`` answers 503) and new sessions are
refused with ``broker_unavailable`` (4091) at once; any progress marks it healthy
again. With a timely loop a stall is noticed within ``interval_s + stall_after_s``
(3 s with the defaults); a late loop stretches that by its lateness.

``bounded`` guards the broker work of a ``start`` or resume: it ends with
``broker_unavailable`` when a stall is detected meanwhile, or (for a ``start``)
after ``start_timeout_s`` of lag-free time whatever the probes say; while the broker
keeps answering (an overloaded gateway, not a sick broker) a start may take up to
three times that before it is given up. The abandoned
work is *not* cancelled: cancelling an AMQP request half way makes aiormq close
its channel, and for a consume that is a reply channel many sessions share.
It runs to its end (each broker operation has its own timeout) in a task the
watchdog owns, then its clean-up runs. A client that sends ``start`` during a
stall therefore gets 4091 within ``min(interval_s + stall_after_s,
start_timeout_s)`` seconds of a timely loop.
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

#: A probe still unanswered after this many ``stall_after_s`` is cancelled and sent
#: afresh (the transport's own operation timeout normally ends it first).
_PROBE_GIVE_UP = 15

#: A start that reaches ``start_timeout_s`` while the broker keeps answering (the
#: gateway is busy, not the broker) waits on, up to this many ``start_timeout_s``.
_BUSY_START_FACTOR = 3

#: Ticks per ``stall_after_s`` at most: a stall needs at least this many turns of the
#: ticker without any broker progress.
_TICKS_PER_STALL = 20


class Silence:
    """Lag-free seconds the broker has been silent while it owes us an answer.

    Pure (no asyncio, the clock is passed in). ``observe`` is called once per tick
    with the time and the broker's progress counter; each call credits the time
    since the previous one, but never more than ``tick_s``: a tick that comes late
    because our loop was busy counts as one tick, not as its lateness.
    """

    __slots__ = ("_last", "_seen", "clock", "quiet", "seconds", "tick_s")

    def __init__(self, tick_s: float) -> None:
        if tick_s <= 0:
            raise ValueError("tick_s must be > 0")
        self.tick_s = tick_s
        self.seconds = 0.0
        """Lag-free seconds without progress while owed an answer."""
        self.clock = 0.0
        """Lag-free seconds observed so far: each tick's time, at most ``tick_s``."""
        self.quiet = 0.0
        """Lag-free seconds since the progress counter last moved, owed or not."""
        self._last: float | None = None
        self._seen: int | None = None

    def credit(self, now: float) -> float:
        """Advance the lag-free clock to ``now``; return the seconds credited."""
        last, self._last = self._last, now
        credit = 0.0 if last is None else min(max(now - last, 0.0), self.tick_s)
        self.clock += credit
        return credit

    def observe(self, now: float, progress: int, owed: bool) -> float:
        """One tick: ``progress`` is the broker's answer counter, ``owed`` whether a
        request is outstanding. Returns the silent seconds so far."""
        credit = self.credit(now)
        if progress != self._seen:
            self._seen = progress
            self.seconds = self.quiet = 0.0
            return 0.0
        self.quiet += credit
        if owed:
            self.seconds += credit
        else:
            self.seconds = 0.0  # nothing asked, nothing expected
        return self.seconds


class BrokerWatchdog:
    def __init__(
        self,
        probe: Probe,
        *,
        progress: Callable[[], int] | None = None,
        interval_s: float = 1.0,
        stall_after_s: float = 2.0,
        start_timeout_s: float = 5.0,
        tick_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe
        self.progress = progress
        """The transport's count of broker answers (confirms, deliveries, replies to
        requests); None: only the probe's own answers count."""
        self.interval_s = interval_s
        self.stall_after_s = stall_after_s
        self.start_timeout_s = start_timeout_s
        self.tick_s = tick_s if tick_s is not None else min(
            0.1, max(stall_after_s, 1e-3) / _TICKS_PER_STALL)
        self.clock = clock
        """Read once per tick; injected by tests that play a late loop."""
        self.reason = ""
        """Why the broker is considered stalled; empty while healthy."""
        self.stalls = 0
        """Stalls detected so far."""
        self.refused = 0
        """Starts refused or abandoned because of a stall or the start timeout."""
        self.silence = Silence(self.tick_s)
        self._answered = 0  # probes answered: progress of their own
        self._owed = False  # a probe is outstanding
        self._stalled = asyncio.Event()
        self._stalled_since = 0.0
        self._stalled_at = 0  # progress when the stall was marked
        self._failed = False  # stalled by a failed probe: only a probe answer ends it
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
    def _progress(self) -> int:
        theirs = self.progress() if self.progress is not None else 0
        return theirs + self._answered

    def tick(self) -> None:
        """One turn of the ticker: credit lag-free time, judge the broker's silence.
        (Called by the probe loop every ``tick_s``; tests call it with their clock.)"""
        progress = self._progress()
        silent = self.silence.observe(self.clock(), progress, self._owed)
        if silent >= self.stall_after_s - 1e-9:  # ten 0.1 s ticks make 1 s
            self._mark_stalled(f"no answer from the broker for {self.stall_after_s:g} s "
                               "while a probe was outstanding", progress)
        elif not self._failed and progress != self._stalled_at:
            self._mark_healthy()

    async def _run(self) -> None:
        self.silence.credit(self.clock())
        while True:
            await self._probe_once()
            sleep = asyncio.ensure_future(asyncio.sleep(self.interval_s))  # a poll period
            try:
                while not sleep.done():
                    await asyncio.wait({sleep}, timeout=self.tick_s)
                    self.tick()
            finally:
                sleep.cancel()

    async def _probe_once(self) -> None:
        started = self.silence.clock
        self._owed = True
        probe = asyncio.ensure_future(self.probe())
        try:
            while not probe.done():
                await asyncio.wait({probe}, timeout=self.tick_s)
                self.tick()
                if self.silence.clock - started > self.stall_after_s * _PROBE_GIVE_UP:
                    return  # still unanswered; the next probe starts afresh
            err = probe.exception()
        finally:
            self._owed = False
            if not probe.done():
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await probe
        if err is None:
            self._answered += 1
            self._failed = False
            self._mark_healthy()
        elif not _timed_out(err):
            # The broker (or the connection) said no: that is an answer, not silence.
            self._failed = True
            self._mark_stalled(f"broker probe failed: {err}", self._progress())
        # A probe that timed out by the wall clock is no verdict: silence decides.

    def _mark_stalled(self, reason: str, progress: int) -> None:
        self.reason = reason
        if self._stalled.is_set():
            return
        self._stalled_at = progress
        self._stalled_since = time.monotonic()
        self._stalled.set()
        self.stalls += 1
        log.warning("stage=broker: %s; readiness is false and new sessions are refused "
                    "with broker_unavailable until it answers", reason)

    def _mark_healthy(self) -> None:
        if not self._stalled.is_set():
            return
        self._stalled.clear()
        self.reason = ""
        log.warning("stage=broker: the broker answers again after %.1f s unavailable",
                    time.monotonic() - self._stalled_since)

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
        longer than ``start_timeout_s`` of lag-free time (wall time while the watchdog
        is not running): then ``TransportError(BROKER_UNAVAILABLE)``. While the broker
        keeps answering, a start past ``start_timeout_s`` is waiting on our own busy
        loop, not on the broker: it may wait on up to ``_BUSY_START_FACTOR`` times that
        (each broker request has its own timeout too). (A resume's takeover has
        deadlines of its own and waits on a previous holder, so it is raced against
        stalls only.)

        If ``work`` fails, is abandoned or the caller is cancelled, ``cleanup()`` runs in
        an owned task once ``work`` has ended (it is never cancelled half way), so the
        client gets its answer without waiting on the broker.
        """
        if self._stalled.is_set():
            work.close()
            raise self._refusal(self.reason)
        task = asyncio.ensure_future(work)
        stalled = asyncio.ensure_future(self._stalled.wait())
        lag_free = self._task is not None
        began = self.silence.clock if lag_free else time.monotonic()
        try:
            while True:
                left = None
                if timed:
                    spent = (self.silence.clock if lag_free else time.monotonic()) - began
                    left = self.start_timeout_s - spent
                    if left <= 0 and lag_free and self._answering():
                        left = min(self.stall_after_s,
                                   self.start_timeout_s * _BUSY_START_FACTOR - spent)
                    if left <= 0:
                        break
                    if lag_free:
                        left = max(left, self.tick_s)
                done, _ = await asyncio.wait({task, stalled}, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if done:
                    break
        except asyncio.CancelledError:
            self._abandon(task, cleanup)
            raise
        finally:
            stalled.cancel()
        if task.done():
            if task.exception() is not None and cleanup is not None:
                self.spawn(cleanup())
            return task.result()
        self._abandon(task, cleanup)
        why = self.reason if self._stalled.is_set() else (
            f"no answer within {self.start_timeout_s:g} s")
        raise self._refusal(why)

    def _answering(self) -> bool:
        """Whether the broker answered anything within the last ``stall_after_s``."""
        return self.healthy and self.silence.quiet < self.stall_after_s

    def _abandon(self, task: asyncio.Future[Any], cleanup: Cleanup | None) -> None:
        """Let ``task`` finish (a broker request cancelled half way closes its channel,
        for a consume the shared reply channel), then clean up after it."""
        task.add_done_callback(_retrieve)

        async def settle() -> None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # only ``close`` cancels this, and the work with it
            if cleanup is not None:
                await cleanup()

        self.spawn(settle())


def _timed_out(err: BaseException) -> bool:
    """Whether a probe failed only because our own clock ran out on it."""
    return isinstance(err, TimeoutError) or isinstance(err.__cause__, TimeoutError)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background task's exception as seen: it was logged where it mattered."""
    if not task.cancelled():
        task.exception()
