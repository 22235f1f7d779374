"""Load the autoscalers can see: how long the oldest unanswered chunk has waited.

Queue depth is blind with one message in flight per session and bundles of 64: ten
sessions on a type with no worker expire every chunk while depth stays near ten. The age
of each session's oldest unanswered chunk does grow, so the gateway samples it on a
timer and exports, per processing type (the pipeline's first step), the oldest age and
how many session-messages are waiting.

The same samples decide admission (``GatewaySettings.shed_above_ms``): the *typical*
waiting session's oldest chunk (the lower median over sessions with one waiting) says
whether the pipeline for a type is late for most sessions, where the oldest age may be
one session's chunk waiting for a redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from audiostream.envelope import Step
from audiostream.metrics import GatewayMetrics


class PendingSession(Protocol):
    @property
    def pipeline(self) -> tuple[Step, ...]: ...

    @property
    def oldest_pending_at(self) -> float | None: ...


class LoadMonitor:
    """Samples the sessions every ``interval_s`` and sets two gauges per processing type.

    A type with no waiting session reads 0, so the gauge falls as soon as load is served.
    """

    def __init__(
        self,
        metrics: GatewayMetrics,
        sessions: Callable[[], Iterable[PendingSession]],
        processing_types: Iterable[str],
        *,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sessions = sessions
        self.processing_types = tuple(processing_types)
        self.interval_s = interval_s
        self.clock = clock
        self.oldest_age = metrics.oldest_age
        self.waiting = metrics.session_messages_waiting
        self.typical_age = metrics.session_lateness
        self.lateness: dict[str, float] = {}
        """Per type, the lower median over waiting sessions of their oldest chunk's age."""
        self.sampled_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.sample()

    def sample(self) -> dict[str, float]:
        """Refresh the gauges now; returns the oldest age per processing type."""
        now = self.sampled_at = self.clock()
        ages: dict[str, list[float]] = {name: [] for name in self.processing_types}
        for s in self.sessions():
            at = s.oldest_pending_at
            if at is None or not s.pipeline:
                continue
            ages.setdefault(s.pipeline[0].name, []).append(max(0.0, now - at))
        oldest = {name: max(a, default=0.0) for name, a in ages.items()}
        self.lateness = {name: statistics.median_low(a) if a else 0.0
                         for name, a in ages.items()}
        for name, a in ages.items():
            self.oldest_age.labels(processing=name).set(oldest[name])
            self.waiting.labels(processing=name).set(len(a))
            self.typical_age.labels(processing=name).set(self.lateness[name])
        return oldest

    def lateness_of(self, processing: str, *, fresh_s: float) -> float:
        """The typical waiting session's oldest chunk age for ``processing``, from a
        sample at most ``fresh_s`` old: the gauges' period (a second) is long next to a
        burst of starts."""
        if self.clock() - self.sampled_at > fresh_s:
            self.sample()
        return self.lateness.get(processing, 0.0)

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="load")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)
