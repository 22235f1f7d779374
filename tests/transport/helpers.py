"""Helpers shared by the transport tests: waiting for conditions, never for time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from audiostream.transport import Delivery


class Inbox:
    """A handler that records deliveries and lets a test wait for a count."""

    def __init__(self, *, ack: bool = True) -> None:
        self.deliveries: list[Delivery] = []
        self._ack = ack
        self._changed = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        if self._ack:
            await delivery.ack()
        self.deliveries.append(delivery)
        self._changed.set()

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]

    async def wait_for(self, count: int, within: float = 5.0) -> list[Delivery]:
        """Wait until at least ``count`` deliveries arrived."""
        try:
            async with asyncio.timeout(within):
                while len(self.deliveries) < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"got {len(self.deliveries)} deliveries, wanted {count}: {self.bodies}")
        return self.deliveries


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 5.0, interval: float = 0.02
) -> None:
    """Poll ``check`` until it is true, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(interval)
