"""The gateway-wide load budget: a coalescing floor every session follows.

Pure (no I/O, no asyncio), clock injected, like ``worker/batcher.py``. The gateway
counts the chunks it accepts (``note_chunk``) and, a few times a second, hands the
budget the time and its event loop's lag (``sample``); every session's coalescer
reads ``floor``: the fewest chunks its next message waits for (within the
coalescer's own hold limit).

Why gateway-wide: each work message costs the gateway, the broker and the worker a
fixed amount of CPU whatever it carries, so the machine's message rate is what must
stay in budget. A session's own reply times rise only once that budget is already
spent, which is when the tail explodes; the total chunk rate says it in advance. So:

* **Idle or light load** (chunk rate at most ``coalesce_above``, no loop lag): the
  floor is 1, every chunk goes out at once, no latency is added.
* **Above it**: the floor is the chunks per message that bring the message rate back
  to about ``coalesce_above`` per second.
* **Loop lag** over ``lag_high_s`` (the gateway itself is behind, whatever the rate)
  raises the floor one step per sample, up to ``max_floor``.
* **Hysteresis**: the floor falls only once the rate would fit a lower floor with
  ``HYSTERESIS`` of headroom and the lag is below half its threshold, and then one
  step per sample, so it does not flap between two sizes around the threshold.

It also keeps the quickest reply seen per pipeline (``reply_floor``), which every
session's coalescer measures its own reply times against.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from audiostream.gateway.coalescer import ReplyFloor

#: Weight of the newest sample in the moving average of the chunk rate.
RATE_WEIGHT = 0.5
#: The floor falls only when the rate fits a lower one with this much headroom.
HYSTERESIS = 0.8
#: Pipelines whose reply floor is shared; a session of any further one keeps its own
#: (clients choose pipelines and parameters: the map must not grow with them).
MAX_REPLY_FLOORS = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetPolicy:
    coalesce_above: float = 1500.0
    """Gateway-wide chunks per second above which sessions coalesce (0: never)."""
    lag_high_s: float = 0.025
    """Event-loop lag above which the floor rises one step per sample (0: ignore lag)."""
    max_floor: int = 4
    """Highest floor (each session's coalescer also caps it by its hold limit)."""

    def __post_init__(self) -> None:
        if self.coalesce_above < 0 or self.lag_high_s < 0:
            raise ValueError("coalesce_above and lag_high_s must be >= 0")
        if self.max_floor < 1:
            raise ValueError("max_floor must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.coalesce_above > 0


class LoadBudget:
    def __init__(self, policy: BudgetPolicy | None = None) -> None:
        self.policy = policy or BudgetPolicy()
        self.floor = 1
        """Fewest chunks a session's next message waits for (1: send at once)."""
        self.rate = 0.0
        """Moving average of accepted chunks per second."""
        self.lag = 0.0
        """The event-loop lag of the last sample, in seconds."""
        self._chunks = 0
        self._last_at: float | None = None
        self._floors: dict[Hashable, ReplyFloor] = {}

    def reply_floor(self, key: Hashable) -> ReplyFloor:
        """The quickest reply seen by this gateway's sessions of one pipeline ``key``."""
        floor = self._floors.get(key)
        if floor is None:
            floor = ReplyFloor()
            if len(self._floors) < MAX_REPLY_FLOORS:
                self._floors[key] = floor
        return floor

    def note_chunk(self) -> None:
        """One chunk accepted (called per chunk: a counter, nothing more)."""
        self._chunks += 1

    def sample(self, now: float, lag_s: float = 0.0) -> int:
        """Fold the chunks counted since the previous sample and the loop lag into the
        floor; returns it. The first sample only starts the clock."""
        p = self.policy
        self.lag = max(0.0, lag_s)
        last, self._last_at = self._last_at, now
        count, self._chunks = self._chunks, 0
        if last is None or now <= last:
            return self.floor
        rate = count / (now - last)
        self.rate += RATE_WEIGHT * (rate - self.rate)
        if not p.enabled:
            self.floor = 1
            return 1
        want = self._want(self.rate)
        lagging = p.lag_high_s > 0 and self.lag > p.lag_high_s
        if lagging:
            want = max(want, self.floor + 1)
        if want < self.floor:
            calm = p.lag_high_s <= 0 or self.lag < p.lag_high_s / 2
            # Fall one step per sample, only as far as the rate allows with headroom,
            # and not while the loop is lagging.
            want = max(self.floor - 1, self._want(self.rate / HYSTERESIS)) if calm else self.floor
        self.floor = max(1, min(p.max_floor, want))
        return self.floor

    def _want(self, rate: float) -> int:
        above = self.policy.coalesce_above
        if rate <= above:
            return 1
        return math.ceil(rate / above)
