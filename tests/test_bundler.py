"""The work bundler on both transports: fewer broker messages, every envelope exactly once."""

from __future__ import annotations

import asyncio
import time

import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.bundler import WorkBundler
from audiostream.envelope import Step, WorkEnvelope, decode_work_message
from audiostream.errors import TransportError
from audiostream.topology import Topology
from audiostream.transport import MemoryBroker, MemoryTransport, Transport
from tests.conftest import TransportFactory
from tests.transport.helpers import Inbox, eventually

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


def envelope(i: int, step: str = "passthrough") -> WorkEnvelope:
    now = time.time()
    return WorkEnvelope(
        session_id=f"s{i}", msg_id=i, seq=0, chunk_frames=(320,), received_at=now,
        deadline=now + 30, format=FMT, output_format=FMT, audio=bytes([i % 256]) * 640,
        pipeline=(Step(step),), step_index=0, reply_to=f"reply.s{i}",
    )


def carried(inbox: Inbox) -> list[list[str]]:
    """Session ids per broker message received."""
    out = []
    for body in inbox.bodies:
        good, bad = decode_work_message(body)
        assert bad == []
        out.append([e.session_id for e in good])
    return out


async def publisher_and_inbox(make: TransportFactory) -> tuple[Transport, Inbox]:
    """A declared publishing transport, and an inbox consuming ``passthrough`` on another."""
    pub = await make()
    await pub.declare()
    inbox = Inbox()
    await (await make()).consume_work("passthrough", inbox, prefetch=50)
    return pub, inbox


async def test_at_low_load_every_envelope_goes_out_alone_at_once(
    transport_factory: TransportFactory,
) -> None:
    pub, inbox = await publisher_and_inbox(transport_factory)
    bundler = WorkBundler(pub)
    for i in range(3):
        await bundler.publish(envelope(i))  # one at a time: nothing to wait for
    await inbox.wait_for(3)
    assert sorted(carried(inbox)) == [["s0"], ["s1"], ["s2"]]
    assert (bundler.bundles, bundler.envelopes) == (3, 3)
    await bundler.close()


async def test_concurrent_envelopes_share_broker_messages_and_each_arrives_once(
    transport_factory: TransportFactory,
) -> None:
    pub, inbox = await publisher_and_inbox(transport_factory)
    sizes: list[int] = []
    bundler = WorkBundler(pub, max_items=16, on_sent=sizes.append)
    await asyncio.gather(*(bundler.publish(envelope(i)) for i in range(50)))
    await inbox.wait_for(len(sizes))
    sessions = [s for message in carried(inbox) for s in message]
    assert sorted(sessions) == sorted(f"s{i}" for i in range(50))
    assert len(inbox.bodies) == len(sizes) < 50
    assert max(sizes) == 16  # never more than max_items per message
    assert sum(sizes) == bundler.envelopes == 50
    await bundler.close()


async def test_each_processing_type_gets_its_own_bundles(
    transport_factory: TransportFactory,
) -> None:
    pub = await transport_factory()
    await pub.declare()
    worker = await transport_factory()
    got_a, got_b = Inbox(), Inbox()
    await worker.consume_work("passthrough", got_a, prefetch=50)
    await worker.consume_work("gain", got_b, prefetch=50)
    bundler = WorkBundler(pub)
    await asyncio.gather(*(bundler.publish(envelope(i, ("passthrough", "gain")[i % 2]))
                           for i in range(20)))
    await bundler.close()

    def sessions(inbox: Inbox) -> list[str]:
        return sorted(s for m in carried(inbox) for s in m)

    async def all_arrived() -> bool:
        return len(sessions(got_a)) + len(sessions(got_b)) >= 20

    await eventually(all_arrived)
    assert sessions(got_a) == sorted(f"s{i}" for i in range(0, 20, 2))
    assert sessions(got_b) == sorted(f"s{i}" for i in range(1, 20, 2))


async def test_a_refused_bundle_raises_in_every_caller_it_carried(
    transport_factory: TransportFactory,
) -> None:
    pub = await transport_factory()
    await pub.declare()
    bundler = WorkBundler(pub)
    results = await asyncio.gather(
        *(bundler.publish(envelope(i, "no-such-type")) for i in range(5)),
        return_exceptions=True)
    assert all(isinstance(r, TransportError) for r in results), results
    assert bundler.bundles == 0
    await bundler.close()


class _StalledConfirms(MemoryTransport):
    """The in-memory broker with the first confirm held back until ``release`` is set;
    ``stalled`` is set once that first publish is being held."""

    def __init__(self) -> None:
        super().__init__(MemoryBroker(), Topology(processing_types=("passthrough",)))
        self.stalled = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def publish_work(self, processing: str, shard: int, body: bytes, *,
                           ttl: float) -> None:
        self.calls += 1
        if self.calls == 1:
            self.stalled.set()
            await self.release.wait()
        await super().publish_work(processing, shard, body, ttl=ttl)


async def test_a_slow_confirm_holds_the_next_bundle_only_until_max_wait() -> None:
    transport = _StalledConfirms()
    await transport.connect()
    await transport.declare()
    bundler = WorkBundler(transport, max_wait_s=0.01)
    first = asyncio.ensure_future(bundler.publish(envelope(0)))
    await transport.stalled.wait()  # the first bundle now waits for its confirm
    await asyncio.gather(*(bundler.publish(envelope(i)) for i in range(1, 4)))
    assert not first.done()  # the others went out without waiting for it
    assert transport.calls == 2  # all three in one bundle
    transport.release.set()
    await first
    assert bundler.envelopes == 4
    await bundler.close()
    await transport.close()


async def test_close_fails_what_was_not_sent_and_a_cancelled_publish_is_left_out() -> None:
    transport = _StalledConfirms()
    await transport.connect()
    await transport.declare()
    bundler = WorkBundler(transport, max_wait_s=60)
    first = asyncio.ensure_future(bundler.publish(envelope(0)))
    await transport.stalled.wait()
    waiting = asyncio.ensure_future(bundler.publish(envelope(1)))
    cancelled = asyncio.ensure_future(bundler.publish(envelope(2)))

    async def both_waiting() -> bool:
        return bundler.waiting == 2

    await eventually(both_waiting)
    cancelled.cancel()
    await bundler.close()
    for fut in (first, waiting):
        with pytest.raises(TransportError):
            await fut
    assert cancelled.cancelled()
    with pytest.raises(TransportError):
        await bundler.publish(envelope(3))
    await transport.close()
