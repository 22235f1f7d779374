"""Shared fixtures: the real RabbitMQ (never skipped), both transports, and a logging guard."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Protocol

import aio_pika
import pytest

from audiostream.topology import Topology
from audiostream.transport import MemoryBroker, MemoryTransport, Transport

BROKER_URL = os.environ.get("AUDIOSTREAM_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
TEST_TYPES = ("passthrough", "gain", "highpass")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``main()`` points the root logger at the sys.stderr of the moment (capsys's): left in
    place, later tests' log records would go to a closed stream ("Logging error")."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("aiormq", "aio_pika")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The broker URL; fails (never skips) the test when RabbitMQ is unreachable."""

    async def probe() -> None:
        conn = await aio_pika.connect(BROKER_URL, timeout=10)
        await conn.close()

    try:
        # A thread of its own: the fixture may be first requested inside a running loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, probe()).result()
    except Exception as exc:
        pytest.fail(f"RabbitMQ at {BROKER_URL} is required and unreachable: {exc!r}")
    return BROKER_URL


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def delete_prefixed(url: str, topology: Topology) -> None:
    """Remove everything a test declared under its own prefix."""
    from audiostream.transport.rabbitmq import delete_topology

    await delete_topology(url, topology)


class TransportFactory(Protocol):
    """``await make()``: a new connected transport (its own connection) to the test's broker.

    ``view`` defaults to the ``topology`` fixture; pass a variant with the same
    prefix (e.g. fewer shards) to see the same broker objects differently.
    """

    def __call__(self, view: Topology | None = None) -> Awaitable[Transport]: ...


DeadLetters = Callable[[], Awaitable[list[tuple[str, bytes]]]]


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def topology() -> Topology:
    return Topology(processing_types=TEST_TYPES, prefix=unique_prefix(), reply_expires_ms=1500)


@pytest.fixture
def memory_broker() -> MemoryBroker:
    """The in-memory 'server' shared by every memory transport of one test."""
    return MemoryBroker()


@pytest.fixture
async def transport_factory(
    transport_kind: str,
    topology: Topology,
    memory_broker: MemoryBroker,
    request: pytest.FixtureRequest,
) -> AsyncIterator[TransportFactory]:
    """Makes connected transports (separate connections) to one broker for the test."""
    made: list[Transport] = []
    url = request.getfixturevalue("rabbitmq_url") if transport_kind == "rabbitmq" else None

    async def make(view: Topology | None = None) -> Transport:
        topo = topology if view is None else view
        t: Transport
        if url is None:
            t = MemoryTransport(memory_broker, topo)
        else:
            from audiostream.transport.rabbitmq import RabbitTransport

            t = RabbitTransport(url, topo)
        await t.connect()
        made.append(t)
        return t

    yield make
    for t in made:
        await t.close()
    if url is not None:
        await delete_prefixed(url, topology)


@pytest.fixture
def dead_letters(
    transport_kind: str,
    topology: Topology,
    memory_broker: MemoryBroker,
    request: pytest.FixtureRequest,
) -> DeadLetters:
    """Drains the dead-letter queue: ``[(reason, body), ...]`` with the broker's reason
    (``expired``, ``rejected``, ``delivery_limit``)."""
    if transport_kind == "memory":

        async def drain_memory() -> list[tuple[str, bytes]]:
            out = list(memory_broker.dead_letters)
            memory_broker.dead_letters.clear()
            return out

        return drain_memory

    url: str = request.getfixturevalue("rabbitmq_url")

    async def drain_rabbitmq() -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        conn = await aio_pika.connect(url)
        try:
            ch = await conn.channel()
            queue = await ch.get_queue(topology.dead_letter_queue, ensure=False)
            while (msg := await queue.get(no_ack=True, fail=False)) is not None:
                reason = (msg.headers or {}).get("x-first-death-reason")
                out.append((str(reason), msg.body))
        finally:
            await conn.close()
        return out

    return drain_rabbitmq
