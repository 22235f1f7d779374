"""Dynamic batcher: pure, no I/O, clock injected.

Collects items until ``max_size`` are waiting or the oldest has waited
``max_wait`` seconds, whichever comes first.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, max_size: int, max_wait: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self.max_size = max_size
        self.max_wait = max_wait
        self._items: list[T] = []
        self._first_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, now: float) -> None:
        if not self._items:
            self._first_at = now
        self._items.append(item)

    def due_at(self) -> float | None:
        """When the waiting items must be flushed, or None if nothing waits."""
        if self._first_at is None:
            return None
        return self._first_at + self.max_wait

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
