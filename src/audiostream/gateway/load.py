"""Load the autoscalers can see: how long the oldest unanswered chunk has waited.

Queue depth is blind with one message in flight per session and bundles of 64: ten
sessions on a type with no worker expire every chunk while depth stays near ten. The age
of each session's oldest unanswered chunk does grow, so the gateway samples it on a
timer and exports, per processing type (the pipeline's first step), the oldest age and
how many session-messages are waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self._task: asyncio.Task[None] | None = None
        self.sample()

    def sample(self) -> dict[str, float]:
        """Refresh the gauges now; returns the oldest age per processing type."""
        now = self.clock()
        oldest = dict.fromkeys(self.processing_types, 0.0)
        waiting = dict.fromkeys(self.processing_types, 0)
        for s in self.sessions():
            at = s.oldest_pending_at
            if at is None or not s.pipeline:
                continue
            name = s.pipeline[0].name
            oldest[name] = max(oldest.get(name, 0.0), now - at)
            waiting[name] = waiting.get(name, 0) + 1
        for name, age in oldest.items():
            self.oldest_age.labels(processing=name).set(max(0.0, age))
            self.waiting.labels(processing=name).set(waiting[name])
        return oldest

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
