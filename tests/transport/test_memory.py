"""What the in-memory transport owes the embedded server beyond the shared contract."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator, Iterator

import pytest

from audiostream.topology import Topology
from audiostream.transport import Delivery, MemoryBroker, MemoryTransport, Subscription


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """Only reference counting frees objects while the test runs."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Subscriber:
    """Owns its subscription and is its handler: the cycle a gateway session forms."""

    def __init__(self) -> None:
        self.subscription: Subscription | None = None
        self.held: list[Delivery] = []
        self.got = asyncio.Event()

    async def handle(self, delivery: Delivery) -> None:
        self.held.append(delivery)
        self.got.set()


@contextlib.asynccontextmanager
async def _subscribed(topology: Topology, session: str
                      ) -> AsyncIterator[tuple[MemoryTransport, str, _Subscriber]]:
    """A connected transport, a reply queue, and a subscriber consuming it (held by
    nothing here, so the tests see what else keeps it alive)."""
    transport = MemoryTransport(MemoryBroker(), topology)
    await transport.connect()
    try:
        name = topology.reply_queue(session)
        await transport.declare_reply_queue(name)
        yield transport, name, await _subscribe(transport, name)
    finally:
        await transport.close()


async def _subscribe(transport: MemoryTransport, name: str) -> _Subscriber:
    subscriber = _Subscriber()
    subscriber.subscription = await transport.consume_replies(name, subscriber.handle)
    return subscriber


async def test_cancelled_consumer_frees_its_subscriber_without_the_cyclic_gc(
    topology: Topology, no_cyclic_gc: None
) -> None:
    async with _subscribed(topology, "churn") as (transport, _, subscriber):
        alive = weakref.ref(subscriber)
        assert subscriber.subscription is not None
        await subscriber.subscription.cancel()
        del subscriber

        assert alive() is None, "the cancelled consumer still holds its handler's owner"
        assert transport.consumer_count == 0


async def test_cancelled_consumer_with_unsettled_deliveries_drops_its_handler(
    topology: Topology, no_cyclic_gc: None
) -> None:
    """A delivery still unsettled keeps the consumer (to requeue it on close), not the
    handler that no longer gets anything."""
    async with _subscribed(topology, "held") as (transport, name, subscriber):
        await transport.publish_reply(name, b"one")
        async with asyncio.timeout(5):
            await subscriber.got.wait()
        delivery = subscriber.held.pop()
        alive = weakref.ref(subscriber)
        assert subscriber.subscription is not None
        await subscriber.subscription.cancel()
        del subscriber

        assert alive() is None
        assert transport.consumer_count == 1
        await delivery.ack()
        assert transport.consumer_count == 0
