"""Dynamic batcher: pure, no I/O, clock injected.

Collects items until ``max_size`` are waiting or the oldest has waited
``max_wait`` seconds, whichever comes first.

With ``adaptive`` it waits only when waiting can pay: if, at the recent arrival
rate, not even one more item is due within ``max_wait``, the batch is ready at
once. A lone real-time session (one message every 20 ms) then gets no added
latency from a 10 ms wait, while a loaded lane still fills its batches.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")

#: Weight of the newest gap in the moving average of the time between arrivals.
GAP_WEIGHT = 0.2


class Batcher(Generic[T]):
    def __init__(self, max_size: int, max_wait: float, *, adaptive: bool = False) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self.max_size = max_size
        self.max_wait = max_wait
        self.adaptive = adaptive
        self._items: list[T] = []
        self._first_at: float | None = None
        self._last_at: float | None = None
        self._gap: float | None = None
        """Moving average of the time between arrivals; None before the second one."""

    def __len__(self) -> int:
        return len(self._items)

    @property
    def mean_gap(self) -> float | None:
        return self._gap

    def add(self, item: T, now: float) -> None:
        if self._last_at is not None:
            gap = max(0.0, now - self._last_at)
            self._gap = gap if self._gap is None else self._gap + GAP_WEIGHT * (gap - self._gap)
        self._last_at = now
        if not self._items:
            self._first_at = now
        self._items.append(item)

    def wait(self) -> float:
        """How long the current batch may wait for more items."""
        if not self.adaptive:
            return self.max_wait
        if self._gap is None or self._gap > self.max_wait:
            return 0.0  # fewer than one more item expected within max_wait
        return self.max_wait

    def due_at(self) -> float | None:
        """When the waiting items must be flushed, or None if nothing waits."""
        if self._first_at is None:
            return None
        return self._first_at + self.wait()

    def ready(self, now: float) -> bool:
        if not self._items:
            return False
        due = self.due_at()
        return len(self._items) >= self.max_size or (due is not None and now >= due)

    def take(self, now: float) -> list[T]:
        """Remove and return up to ``max_size`` items (the oldest first)."""
        batch, self._items = self._items[: self.max_size], self._items[self.max_size :]
        self._first_at = now if self._items else None
        return batch
