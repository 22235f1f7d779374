"""Opus decoding at the gateway, within a CPU budget.

An Opus session's chunks are decoded into PCM on the gateway's event loop (libopus
through PyAV: a chunk is a millisecond or two, cheaper than a thread hop). What a
client may make the gateway spend is bounded twice, by token buckets of *CPU seconds*
(measured with ``time.thread_time`` around each decode, so a loaded machine does not
inflate it):

- per session, ``opus_cpu_share`` CPU-seconds per second: an upload far faster than
  real time still fits (decoding costs well under 1 % of real time), a client sending
  maximal frames as fast as credit allows does not take the loop;
- per gateway, ``opus_cpu_share_total``: many Opus sessions together leave the rest
  of the loop to the PCM sessions.

A session over either budget is not refused: the gateway stops *reading* its socket
until the bucket is positive again (TCP back-pressure, as for ``max_queued_bytes``),
so an honest client only slows and every chunk still gets its outcome. The cost of a
decode is known only afterwards, so a bucket may go negative by one chunk's cost.

Pure policy (``CpuBucket``) plus the per-session object the adapter calls; no asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from audiostream.audiofile import OpusPacketDecoder
from audiostream.errors import ConfigError


@dataclass(slots=True)
class CpuBucket:
    """CPU seconds that refill at ``rate`` per wall-clock second up to ``burst``.

    ``charge`` takes what a decode cost (it may leave the level negative);
    ``wait_s`` is how long until the level is back at zero."""

    rate: float
    burst: float
    level: float = field(default=0.0)
    at: float | None = None

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst <= 0:
            raise ConfigError(f"a CPU budget needs a rate and a burst > 0, not "
                              f"{self.rate:g} and {self.burst:g}")
        self.level = self.burst

    def _refill(self, now: float) -> None:
        if self.at is not None and now > self.at:
            self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        if self.at is None or now > self.at:
            self.at = now

    def charge(self, cost_s: float, now: float) -> None:
        self._refill(now)
        self.level -= max(0.0, cost_s)

    def wait_s(self, now: float) -> float:
        self._refill(now)
        return 0.0 if self.level >= 0 else -self.level / self.rate


class BudgetedDecoder:
    """One session's Opus decoder and its CPU budget (and the gateway's, shared)."""

    def __init__(self, rate: int, channels: int, *, session: CpuBucket, shared: CpuBucket,
                 clock: Callable[[], float], cpu_clock: Callable[[], float] = time.thread_time
                 ) -> None:
        self.decoder = OpusPacketDecoder(rate, channels)
        self.session, self.shared = session, shared
        self._clock, self._cpu = clock, cpu_clock
        self.cpu_s = 0.0
        """CPU seconds this session's decoding has cost so far."""

    def decode(self, data: bytes) -> bytes:
        """PCM for one chunk; what decoding it cost is charged to both budgets (also
        when the chunk turned out corrupt: the work was done) and added to ``cpu_s``."""
        t0 = self._cpu()
        try:
            return self.decoder.decode(data)
        finally:
            cost = max(0.0, self._cpu() - t0)
            now = self._clock()
            self.session.charge(cost, now)
            self.shared.charge(cost, now)
            self.cpu_s += cost

    def wait_s(self) -> float:
        """How long to leave the socket unread before the next chunk (0: read now)."""
        now = self._clock()
        return max(self.session.wait_s(now), self.shared.wait_s(now))
