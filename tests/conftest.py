"""Shared fixtures: the real RabbitMQ (never skipped) and both transports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import pytest

from audiostream.topology import Topology
from audiostream.transport import MemoryBroker, MemoryTransport, Transport

BROKER_URL = os.environ.get("AUDIOSTREAM_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
TEST_TYPES = ("passthrough", "gain", "highpass")


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The broker URL; fails (never skips) the test when RabbitMQ is unreachable."""

    async def probe() -> None:
        conn = await aio_pika.connect(BROKER_URL, timeout=10)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        pytest.fail(f"RabbitMQ at {BROKER_URL} is required and unreachable: {exc!r}")
    return BROKER_URL


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def delete_prefixed(url: str, topology: Topology) -> None:
    """Remove everything a test declared under its own prefix."""
    conn = await aio_pika.connect(url)

    async def attempt(action: str, name: str) -> None:
        # A missing queue or exchange closes the channel: use a fresh one each time.
        ch = await conn.channel()
        with contextlib.suppress(Exception):
            await getattr(ch, action)(name)

    try:
        for ptype in topology.processing_types:
            for q in topology.work_queues(ptype):
                await attempt("queue_delete", q)
            await attempt("exchange_delete", topology.exchange(ptype))
        await attempt("queue_delete", topology.dead_letter_queue)
        await attempt("exchange_delete", topology.dead_letter_exchange)
    finally:
        await conn.close()


TransportFactory = Callable[[], Awaitable[Transport]]


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def topology() -> Topology:
    return Topology(processing_types=TEST_TYPES, prefix=unique_prefix(), reply_expires_ms=1500)


@pytest.fixture
async def transport_factory(
    transport_kind: str, topology: Topology, request: pytest.FixtureRequest
) -> AsyncIterator[TransportFactory]:
    """Makes connected transports (separate connections) to one broker for the test."""
    made: list[Transport] = []
    memory = MemoryBroker()
    url = request.getfixturevalue("rabbitmq_url") if transport_kind == "rabbitmq" else None

    async def make() -> Transport:
        t: Transport
        if url is None:
            t = MemoryTransport(memory, topology)
        else:
            from audiostream.transport.rabbitmq import RabbitTransport

            t = RabbitTransport(url, topology)
        await t.connect()
        made.append(t)
        return t

    yield make
    for t in made:
        await t.close()
    if url is not None:
        await delete_prefixed(url, topology)
