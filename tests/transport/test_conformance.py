"""One suite, two transports: what the gateway and workers may rely on.

Every test runs against the in-memory transport and the real RabbitMQ (the
``transport_factory`` fixture is parametrised). Waiting is always for a
condition with a deadline; the only plain sleeps are where the passing of time
is itself the behaviour under test (TTLs and queue expiry).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

import pytest

from audiostream.errors import TransportError
from audiostream.topology import Topology
from audiostream.transport import Delivery, Transport
from tests.conftest import DeadLetters, TransportFactory
from tests.transport.helpers import Inbox, eventually

A, B, C = "passthrough", "gain", "highpass"
LONG_TTL = 30.0


async def declared(make: TransportFactory) -> Transport:
    t = await make()
    await t.declare()
    return t


def reply_name(topology: Topology) -> str:
    return topology.reply_queue(uuid.uuid4().hex[:12])


# -- routing ---------------------------------------------------------------------------


async def test_messages_reach_only_consumers_of_their_processing_type(
    transport_factory: TransportFactory,
) -> None:
    pub = await declared(transport_factory)
    worker = await transport_factory()
    got_a, got_b = Inbox(), Inbox()
    await worker.consume_work(A, got_a, prefetch=20)
    await worker.consume_work(B, got_b, prefetch=20)

    want_a = {f"a{s}-{i}".encode() for s in (0, 1) for i in range(3)}
    want_b = {f"b{s}-{i}".encode() for s in (0, 1) for i in range(3)}
    for body in sorted(want_a):
        await pub.publish_work(A, int(body[1:2]), body, ttl=LONG_TTL)
    for body in sorted(want_b):
        await pub.publish_work(B, int(body[1:2]), body, ttl=LONG_TTL)
    await pub.publish_work(C, 0, b"c0", ttl=LONG_TTL)
    await pub.publish_work(C, 1, b"c1", ttl=LONG_TTL)

    await got_a.wait_for(6)
    await got_b.wait_for(6)
    # Type C has no consumer: its messages wait in its own queues, nowhere else.
    assert await pub.work_queue_depth(C) == 2
    assert set(got_a.bodies) == want_a and len(got_a.bodies) == 6
    assert set(got_b.bodies) == want_b and len(got_b.bodies) == 6


async def test_each_shard_has_its_own_queue(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    pub = await declared(transport_factory)
    for shard in (0, 1):
        for i in range(3):
            await pub.publish_work(A, shard, f"{shard}:{i}".encode(), ttl=LONG_TTL)
    # A view of the same broker objects that knows only shard 0's queue.
    shard0_only = await transport_factory(replace(topology, shards=1))
    inbox = Inbox()
    await shard0_only.consume_work(A, inbox, prefetch=20)

    await inbox.wait_for(3)
    assert await pub.work_queue_depth(A) == 3  # shard 1's messages, untouched
    assert sorted(inbox.bodies) == [b"0:0", b"0:1", b"0:2"]


async def test_unroutable_work_raises_and_the_transport_stays_usable(
    transport_factory: TransportFactory,
) -> None:
    pub = await declared(transport_factory)
    with pytest.raises(TransportError):
        await pub.publish_work(A, 7, b"no such shard", ttl=LONG_TTL)
    with pytest.raises(TransportError):
        await pub.publish_work("no-such-type", 0, b"no such type", ttl=LONG_TTL)
    with pytest.raises(ValueError):
        await pub.publish_work(A, 0, b"no ttl", ttl=0)
    await pub.publish_work(A, 0, b"fine", ttl=LONG_TTL)
    assert await pub.work_queue_depth(A) == 1


async def test_consuming_an_undeclared_type_raises(transport_factory: TransportFactory) -> None:
    t = await transport_factory()
    with pytest.raises(TransportError):
        await t.consume_work(A, Inbox(), prefetch=1)


# -- confirms --------------------------------------------------------------------------


async def test_publish_returns_once_the_broker_holds_the_message(
    transport_factory: TransportFactory,
) -> None:
    pub = await declared(transport_factory)
    observer = await transport_factory()  # another connection sees what the broker has
    for i in range(10):
        await pub.publish_work(B, i % 2, b"one at a time", ttl=LONG_TTL)
        assert await observer.work_queue_depth(B) == i + 1
    # Concurrent publishers overlap, and each returns only after its own confirm.
    await asyncio.gather(
        *(pub.publish_work(B, i % 2, f"c{i}".encode(), ttl=LONG_TTL) for i in range(50))
    )
    assert await observer.work_queue_depth(B) == 60

    inbox = Inbox()
    await observer.consume_work(B, inbox, prefetch=100)
    await inbox.wait_for(60)
    assert sorted(b for b in inbox.bodies if b.startswith(b"c")) == sorted(
        f"c{i}".encode() for i in range(50)
    )


# -- TTL -------------------------------------------------------------------------------


async def test_expired_message_is_never_delivered(
    transport_factory: TransportFactory, dead_letters: DeadLetters
) -> None:
    pub = await declared(transport_factory)
    await pub.publish_work(A, 0, b"stale", ttl=0.2)
    # Nobody consumes: the TTL passes (this is the behaviour under test).
    await eventually(lambda: _depth_is(pub, A, 0))

    worker = await transport_factory()
    inbox = Inbox()
    await worker.consume_work(A, inbox, prefetch=10)
    await pub.publish_work(A, 0, b"fresh", ttl=LONG_TTL)  # same queue, behind "stale"
    await inbox.wait_for(1)
    assert inbox.bodies == [b"fresh"]
    assert await dead_letters() == [("expired", b"stale")]


def _runs_our_code(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    filename = code.co_filename if code is not None else ""
    return "audiostream" in filename or filename == __file__


async def _depth_is(t: Transport, processing: str, depth: int) -> bool:
    return await t.work_queue_depth(processing) == depth


# -- redelivery, delivery limit, reject ------------------------------------------------


async def test_unacked_deliveries_go_to_another_connection_when_one_dies(
    transport_factory: TransportFactory,
) -> None:
    pub = await declared(transport_factory)
    crashing = await transport_factory()
    held = Inbox(ack=False)
    await crashing.consume_work(B, held, prefetch=10)
    bodies = sorted(f"m{s}{i}".encode() for s in (0, 1) for i in range(3))
    for body in bodies:
        await pub.publish_work(B, int(body[1:2]), body, ttl=LONG_TTL)
    await held.wait_for(6)
    assert not any(d.redelivered for d in held.deliveries)

    survivor = await transport_factory()
    inbox = Inbox()
    await survivor.consume_work(B, inbox, prefetch=10)
    assert await pub.work_queue_depth(B) == 0  # everything is held by the first

    await crashing.close()
    await inbox.wait_for(6)
    assert sorted(inbox.bodies) == bodies  # nothing lost, nothing doubled
    assert all(d.redelivered for d in inbox.deliveries)
    assert await pub.work_queue_depth(B) == 0


async def test_message_is_dead_lettered_after_delivery_limit_redeliveries(
    transport_factory: TransportFactory, topology: Topology, dead_letters: DeadLetters
) -> None:
    pub = await declared(transport_factory)
    await pub.publish_work(C, 0, b"poison", ttl=LONG_TTL)
    for attempt in range(topology.delivery_limit + 1):
        worker = await transport_factory()
        inbox = Inbox(ack=False)
        await worker.consume_work(C, inbox, prefetch=1)
        (delivery,) = await inbox.wait_for(1)
        assert delivery.body == b"poison"
        assert delivery.redelivered == (attempt > 0)
        await worker.close()  # crash: the message goes back, or to the dead letters

    async def poison_dead() -> bool:
        found = await dead_letters()
        assert found in ([], [("delivery_limit", b"poison")])
        return bool(found)

    await eventually(poison_dead)
    worker = await transport_factory()
    inbox = Inbox(ack=False)
    await worker.consume_work(C, inbox, prefetch=1)
    await pub.publish_work(C, 0, b"next", ttl=LONG_TTL)
    await inbox.wait_for(1)
    assert inbox.bodies == [b"next"]
    assert await pub.work_queue_depth(C) == 0


async def test_rejected_message_is_dead_lettered_not_redelivered(
    transport_factory: TransportFactory, dead_letters: DeadLetters
) -> None:
    pub = await declared(transport_factory)
    seen: list[bytes] = []
    arrived = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.body)
        if delivery.body == b"bad":
            await delivery.reject()
        arrived.set()  # anything else is held unacked: prefetch 1 keeps the queue still

    worker = await transport_factory()
    await worker.consume_work(A, handler, prefetch=1)
    await pub.publish_work(A, 1, b"bad", ttl=LONG_TTL)
    dead: list[tuple[str, bytes]] = []

    async def rejected() -> bool:
        dead.extend(await dead_letters())
        return bool(dead)

    await eventually(rejected)
    assert dead == [("rejected", b"bad")]
    arrived.clear()
    await pub.publish_work(A, 1, b"good", ttl=LONG_TTL)
    async with asyncio.timeout(5):
        await arrived.wait()
    assert seen == [b"bad", b"good"]
    assert await pub.work_queue_depth(A) == 0


async def test_release_returns_to_the_head_and_counts_against_the_delivery_limit(
    transport_factory: TransportFactory, topology: Topology, dead_letters: DeadLetters
) -> None:
    pub = await declared(transport_factory)
    seen: list[tuple[bytes, bool]] = []

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.body, delivery.redelivered))
        if delivery.body == b"hot potato":
            await delivery.release()
        else:
            await delivery.ack()

    await pub.publish_work(B, 0, b"hot potato", ttl=LONG_TTL)
    await pub.publish_work(B, 0, b"behind", ttl=LONG_TTL)
    worker = await transport_factory()
    await worker.consume_work(B, handler, prefetch=1)
    tries = topology.delivery_limit + 1

    async def all_seen() -> bool:
        return len(seen) >= tries + 1

    await eventually(all_seen)
    # Back at the head each time (before "behind"), until the limit dead-letters it.
    assert seen == [(b"hot potato", i > 0) for i in range(tries)] + [(b"behind", False)]
    assert await dead_letters() == [("delivery_limit", b"hot potato")]


async def test_settling_twice_raises(transport_factory: TransportFactory) -> None:
    pub = await declared(transport_factory)
    inbox = Inbox(ack=False)
    await pub.consume_work(A, inbox, prefetch=1)
    await pub.publish_work(A, 0, b"x", ttl=LONG_TTL)
    (delivery,) = await inbox.wait_for(1)
    await delivery.ack()
    with pytest.raises(TransportError):
        await delivery.ack()
    with pytest.raises(TransportError):
        await delivery.reject()


# -- cancel ----------------------------------------------------------------------------


async def test_cancel_stops_new_deliveries_and_handed_out_ones_stay_settleable(
    transport_factory: TransportFactory,
) -> None:
    pub = await declared(transport_factory)
    draining = await transport_factory()
    held = Inbox(ack=False)
    sub = await draining.consume_work(B, held, prefetch=1)
    for i in range(3):
        await pub.publish_work(B, 0, f"m{i}".encode(), ttl=LONG_TTL)
    (first,) = await held.wait_for(1)
    assert first.body == b"m0"

    await sub.cancel()
    await first.ack()  # a draining worker finishes what it has
    other = await transport_factory()
    inbox = Inbox()
    await other.consume_work(B, inbox, prefetch=10)
    await inbox.wait_for(2)
    assert inbox.bodies == [b"m1", b"m2"]

    await draining.close()  # m0 was acked: nothing comes back
    await pub.publish_work(B, 0, b"m3", ttl=LONG_TTL)
    await inbox.wait_for(3)
    assert inbox.bodies == [b"m1", b"m2", b"m3"]
    assert held.bodies == [b"m0"]


async def test_unsettled_deliveries_of_a_cancelled_subscription_return_on_close(
    transport_factory: TransportFactory,
) -> None:
    pub = await declared(transport_factory)
    draining = await transport_factory()
    held = Inbox(ack=False)
    sub = await draining.consume_work(B, held, prefetch=5)
    await pub.publish_work(B, 0, b"x", ttl=LONG_TTL)
    await pub.publish_work(B, 1, b"y", ttl=LONG_TTL)
    await held.wait_for(2)
    await sub.cancel()
    await draining.close()

    other = await transport_factory()
    inbox = Inbox()
    await other.consume_work(B, inbox, prefetch=5)
    await inbox.wait_for(2)
    assert sorted(inbox.bodies) == [b"x", b"y"]
    assert all(d.redelivered for d in inbox.deliveries)


# -- depth and prefetch ----------------------------------------------------------------


async def test_work_queue_depth_counts_ready_messages_only(
    transport_factory: TransportFactory,
) -> None:
    pub = await declared(transport_factory)
    assert await pub.work_queue_depth(A) == 0
    for i in range(3):
        await pub.publish_work(A, 0, f"0:{i}".encode(), ttl=LONG_TTL)
    for i in range(2):
        await pub.publish_work(A, 1, f"1:{i}".encode(), ttl=LONG_TTL)
    assert await pub.work_queue_depth(A) == 5
    assert await pub.work_queue_depth(B) == 0

    worker = await transport_factory()
    held = Inbox(ack=False)
    await worker.consume_work(A, held, prefetch=1)
    await held.wait_for(2)  # one per shard
    assert await pub.work_queue_depth(A) == 3  # the two unacked ones are not ready
    for d in list(held.deliveries):
        await d.ack()
    await held.wait_for(4)
    assert await pub.work_queue_depth(A) == 1


async def test_progress_counts_every_answer_of_the_broker(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    """The stall watchdog's evidence: confirms, deliveries and probe answers each move
    ``progress`` (gateway/watchdog.py)."""
    pub = await declared(transport_factory)
    before = pub.progress
    await pub.publish_work(A, 0, b"w", ttl=LONG_TTL)
    after_confirm = pub.progress
    assert after_confirm > before
    await pub.work_queue_depth(A)
    after_probe = pub.progress
    assert after_probe > after_confirm
    name = reply_name(topology)
    await pub.declare_reply_queue(name)
    inbox = Inbox()
    await pub.consume_replies(name, inbox)
    counted = pub.progress
    worker = await transport_factory()
    for i in range(3):
        assert await worker.publish_reply(name, f"r{i}".encode()) is True
    await inbox.wait_for(3)
    assert pub.progress >= counted + 3  # one per delivery at least


async def test_prefetch_bounds_unacked_deliveries_per_shard_queue(
    transport_factory: TransportFactory,
) -> None:
    pub = await declared(transport_factory)
    for shard in (0, 1):
        for i in range(5):
            await pub.publish_work(C, shard, f"{shard}:{i}".encode(), ttl=LONG_TTL)
    worker = await transport_factory()
    held = Inbox(ack=False)
    await worker.consume_work(C, held, prefetch=2)

    await held.wait_for(4)
    # The broker holds back the rest: 2 unacked per shard queue, 6 still ready.
    assert await pub.work_queue_depth(C) == 6
    per_shard = sorted(b[:1] for b in held.bodies)
    assert per_shard == [b"0", b"0", b"1", b"1"]

    first_of_shard0 = next(d for d in held.deliveries if d.body.startswith(b"0"))
    await first_of_shard0.ack()
    await held.wait_for(5)
    assert held.deliveries[4].body.startswith(b"0")
    assert await pub.work_queue_depth(C) == 5


async def test_a_synchronous_handler_gets_deliveries_in_order_within_prefetch(
    transport_factory: TransportFactory,
) -> None:
    """A handler may be a plain function (no task per delivery): it is called in order,
    and an ack it asks for without awaiting is still written."""
    pub = await declared(transport_factory)
    bodies = [f"m{i:02d}".encode() for i in range(8)]
    for body in bodies:
        await pub.publish_work(C, 0, body, ttl=LONG_TTL)
    worker = await transport_factory()
    got: list[Delivery] = []
    arrived = asyncio.Event()

    def handler(delivery: Delivery) -> None:
        got.append(delivery)
        arrived.set()

    await worker.consume_work(C, handler, prefetch=2)
    for seen in range(0, len(bodies), 2):
        async with asyncio.timeout(5):
            while len(got) < seen + 2:
                arrived.clear()
                await arrived.wait()
        # Two unacked: the broker holds the rest back.
        assert await pub.work_queue_depth(C) == len(bodies) - seen - 2
        assert len(got) == seen + 2
        for delivery in got[seen:]:
            delivery.ack()  # not awaited: asked for, the transport writes it
    assert [d.body for d in got] == bodies


async def test_acks_asked_for_just_before_close_are_not_lost(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    gateway = await transport_factory()
    name = reply_name(topology)
    await gateway.declare_reply_queue(name)
    held = Inbox(ack=False)
    await gateway.consume_replies(name, held)
    worker = await transport_factory()
    replies = [(name, f"r{i}".encode()) for i in range(10)]
    assert await worker.publish_replies(replies) == [True] * 10
    deliveries = await held.wait_for(10)

    acks = [d.ack() for d in deliveries]  # asked for now, awaited only after the close
    await gateway.close()
    await asyncio.gather(*acks)

    # Nothing comes back: the marker published after the close is the first delivery.
    other = await transport_factory()
    again = Inbox(ack=False)
    await other.consume_replies(name, again)
    assert await worker.publish_reply(name, b"marker")
    await again.wait_for(1)
    assert again.bodies[0] == b"marker"


# -- reply queues ----------------------------------------------------------------------


async def test_reply_round_trip_keeps_order(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    gateway = await transport_factory()
    worker = await transport_factory()
    name = reply_name(topology)
    await gateway.declare_reply_queue(name)
    inbox = Inbox()
    await gateway.consume_replies(name, inbox)
    for i in range(5):
        assert await worker.publish_reply(name, f"r{i}".encode()) is True
    await inbox.wait_for(5)
    assert inbox.bodies == [f"r{i}".encode() for i in range(5)]
    assert not any(d.redelivered for d in inbox.deliveries)


async def test_publish_replies_confirms_each_in_order_and_reports_a_missing_queue(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    gateway = await transport_factory()
    worker = await transport_factory()
    first, second = reply_name(topology), reply_name(topology)
    inboxes = {}
    for name in (first, second):
        await gateway.declare_reply_queue(name)
        inboxes[name] = Inbox()
        await gateway.consume_replies(name, inboxes[name])
    gone = reply_name(topology)
    batch = [(first, b"a0"), (gone, b"lost"), (second, b"b0"), (first, b"a1"), (second, b"")]

    assert await worker.publish_replies(batch) == [True, False, True, True, True]
    assert await worker.publish_replies([]) == []
    await inboxes[first].wait_for(2)
    await inboxes[second].wait_for(2)
    assert inboxes[first].bodies == [b"a0", b"a1"]
    assert inboxes[second].bodies == [b"b0", b""]
    # Single and batched publishes share the channel without confusing confirms.
    outcomes = await asyncio.gather(
        worker.publish_reply(first, b"single"),
        worker.publish_replies([(gone, b"x"), (first, b"batched")]),
    )
    assert outcomes == [True, [False, True]]
    await inboxes[first].wait_for(4)
    assert sorted(inboxes[first].bodies[2:]) == [b"batched", b"single"]


async def test_publish_reply_to_a_missing_queue_returns_false(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    worker = await transport_factory()
    assert await worker.publish_reply(reply_name(topology), b"lost") is False
    # The refused publish leaves the transport usable.
    name = reply_name(topology)
    await worker.declare_reply_queue(name)
    assert await worker.publish_reply(name, b"kept") is True
    assert await worker.publish_reply(reply_name(topology), b"lost again") is False


async def test_consuming_a_missing_reply_queue_raises(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    gateway = await transport_factory()
    with pytest.raises(TransportError):
        await gateway.consume_replies(reply_name(topology), Inbox())
    # The shared reply consumers keep working.
    name = reply_name(topology)
    await gateway.declare_reply_queue(name)
    inbox = Inbox()
    await gateway.consume_replies(name, inbox)
    assert await gateway.publish_reply(name, b"ok")
    await inbox.wait_for(1)


async def test_a_delivery_racing_a_cancel_is_handled_or_goes_back(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    """A reply already on its way when its consumer is cancelled is either handed to
    that consumer's handler or returned to the queue for the next one: never held."""
    gateway = await transport_factory()
    name = reply_name(topology)
    await gateway.declare_reply_queue(name)
    got: list[tuple[str, bytes]] = []
    arrived = asyncio.Event()

    def handler(who: str) -> Callable[[Delivery], None]:
        def handle(delivery: Delivery) -> None:
            delivery.ack()
            got.append((who, delivery.body))
            arrived.set()
        return handle

    sub = await gateway.consume_replies(name, handler("first"))
    assert await gateway.publish_reply(name, b"r")
    await sub.cancel()  # in the turn of the publish: the delivery is not handled yet
    await gateway.consume_replies(name, handler("second"))
    async with asyncio.timeout(5):
        await arrived.wait()
    assert [body for _, body in got] == [b"r"]
    assert await gateway.reply_queue_stats(name) == (0, 1)


async def test_unsettled_replies_of_a_cancelled_subscription_return_on_close(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    old_gateway = await transport_factory()
    name = reply_name(topology)
    await old_gateway.declare_reply_queue(name)
    held = Inbox(ack=False)
    sub = await old_gateway.consume_replies(name, held)
    assert await old_gateway.publish_reply(name, b"r0")
    await held.wait_for(1)
    await sub.cancel()
    await old_gateway.close()

    new_gateway = await transport_factory()  # the client resumed elsewhere
    assert await new_gateway.reply_queue_exists(name)
    inbox = Inbox()
    await new_gateway.consume_replies(name, inbox)
    await inbox.wait_for(1)
    assert inbox.bodies == [b"r0"]
    assert inbox.deliveries[0].redelivered


async def test_reply_queue_stats_and_released_replies(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    gateway = await transport_factory()
    name = reply_name(topology)
    assert await gateway.reply_queue_stats(name) is None
    await gateway.declare_reply_queue(name)
    assert await gateway.reply_queue_stats(name) == (0, 0)
    held = Inbox(ack=False)
    sub = await gateway.consume_replies(name, held)
    assert await gateway.reply_queue_stats(name) == (0, 1)
    for i in range(3):
        assert await gateway.publish_reply(name, f"r{i}".encode())
    await held.wait_for(3)
    assert await gateway.reply_queue_stats(name) == (0, 1)  # handed out: not ready

    await sub.cancel()
    await held.deliveries[0].release()
    await held.deliveries[1].release()
    await held.deliveries[2].ack()

    async def two_ready_no_consumer() -> bool:
        return await gateway.reply_queue_stats(name) == (2, 0)

    await eventually(two_ready_no_consumer)
    successor = await transport_factory()
    inbox = Inbox()
    await successor.consume_replies(name, inbox)
    await inbox.wait_for(2)
    assert sorted(inbox.bodies) == [b"r0", b"r1"]
    assert all(d.redelivered for d in inbox.deliveries)


async def test_reply_queue_expires_after_its_last_consumer_leaves(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    gateway = await transport_factory()
    worker = await transport_factory()
    name = reply_name(topology)
    await gateway.declare_reply_queue(name)
    sub = await gateway.consume_replies(name, Inbox())
    await sub.cancel()
    left = time.monotonic()
    expires = topology.reply_expires_ms / 1000

    # Time passing is the behaviour under test. Publishing (unlike a passive
    # declare) does not renew the lease, so it probes without disturbing it.
    await asyncio.sleep(expires * 2 / 3)
    assert await worker.publish_reply(name, b"still there") is True

    async def gone() -> bool:
        return not await worker.publish_reply(name, b"probe")

    await eventually(gone, within=expires + 3.0, interval=0.05)
    assert time.monotonic() - left >= expires * 0.9
    assert await gateway.reply_queue_exists(name) is False


async def test_reply_queue_exists_renews_the_lease(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    gateway = await transport_factory()
    name = reply_name(topology)
    await gateway.declare_reply_queue(name)  # never consumed: expiry runs from here
    expires = topology.reply_expires_ms / 1000

    await asyncio.sleep(expires * 2 / 3)
    assert await gateway.reply_queue_exists(name) is True  # renews
    renewed = time.monotonic()
    await asyncio.sleep(expires * 2 / 3)  # past the first lease, inside the second
    assert await gateway.publish_reply(name, b"still there") is True

    async def gone() -> bool:
        return not await gateway.publish_reply(name, b"probe")

    await eventually(gone, within=expires + 3.0, interval=0.05)
    assert time.monotonic() - renewed >= expires * 0.9


async def test_delete_reply_queue(transport_factory: TransportFactory, topology: Topology) -> None:
    gateway = await transport_factory()
    name = reply_name(topology)
    await gateway.declare_reply_queue(name)
    await gateway.declare_reply_queue(name)  # idempotent
    assert await gateway.reply_queue_exists(name) is True
    await gateway.delete_reply_queue(name)
    assert await gateway.reply_queue_exists(name) is False
    assert await gateway.publish_reply(name, b"late") is False
    await gateway.delete_reply_queue(name)  # deleting a missing queue is a no-op


# -- locks -----------------------------------------------------------------------------


async def test_a_lock_is_held_by_one_connection_at_a_time(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    """One taker of a session at a time, across gateways and within one: of two
    attempts at once exactly one wins, and the lock is refused while held, to other
    connections and to the holder's own."""
    a, b = await transport_factory(), await transport_factory()
    name = reply_name(topology) + ".lock"
    got = await asyncio.gather(a.try_lock(name), b.try_lock(name))
    assert sorted(t is not None for t in got) == [False, True]
    holder, other = (a, b) if got[0] is not None else (b, a)
    held = got[0] or got[1]
    assert held is not None and holder.holds_lock(held) and not other.holds_lock(held)
    assert await holder.try_lock(name) is None  # not twice within one connection either
    assert await other.try_lock(name) is None
    await other.unlock(held)  # not its holding: nothing happens
    assert holder.holds_lock(held)
    assert await other.try_lock(name) is None
    await holder.unlock(held)
    assert not holder.holds_lock(held)
    again = await other.try_lock(name)
    assert again is not None and other.holds_lock(again)
    assert await holder.try_lock(name) is None
    await holder.unlock(held)  # an old holding of a lock another took since: a no-op
    assert other.holds_lock(again)
    await other.unlock(again)
    await other.unlock(again)  # twice: a no-op
    assert await holder.try_lock(name) is not None
    assert await a.try_lock(name + "2") is not None  # locks are independent


async def test_a_lock_dies_with_its_connection(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    """A gateway that dies while taking a session over leaves no lock behind."""
    dying, other = await transport_factory(), await transport_factory()
    name = reply_name(topology) + ".lock"
    assert await dying.try_lock(name) is not None
    assert await other.try_lock(name) is None
    await dying.close()
    assert await other.try_lock(name) is not None


async def test_a_lock_lost_with_its_connection_stays_lost_after_a_reconnect(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    """The holder learns that its lock went with its connection (``holds_lock``), also
    once connected again; its own stale record refuses no new holding, and the lost
    holding's ``unlock`` cannot let go of a holding taken since, its own or another's."""
    holder, other = await transport_factory(), await transport_factory()
    name = reply_name(topology) + ".lock"
    lost = await holder.try_lock(name)
    assert lost is not None and holder.holds_lock(lost)
    await holder.close()
    await holder.connect()
    assert not holder.holds_lock(lost)
    again = await holder.try_lock(name)
    assert again is not None and again is not lost
    await holder.unlock(lost)
    assert holder.holds_lock(again) and not holder.holds_lock(lost)
    assert await other.try_lock(name) is None  # still held: the old unlock left it be
    await holder.unlock(again)
    theirs = await other.try_lock(name)
    assert theirs is not None
    await holder.unlock(lost)
    await holder.unlock(again)
    assert other.holds_lock(theirs)
    assert await holder.try_lock(name) is None


async def test_a_refused_lock_disturbs_nothing_else_on_the_connection(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    """The refusal (RabbitMQ: RESOURCE_LOCKED, a channel error) closes nothing the
    connection's sessions use: a reply consumer keeps its unacked deliveries and gets
    the next reply."""
    holder, gateway = await transport_factory(), await transport_factory()
    lock = reply_name(topology) + ".lock"
    name = reply_name(topology)
    await gateway.declare_reply_queue(name)
    inbox = Inbox(ack=False)
    await gateway.consume_replies(name, inbox)
    assert await gateway.publish_reply(name, b"r0")
    await inbox.wait_for(1)
    assert await holder.try_lock(lock) is not None
    for _ in range(3):
        assert await gateway.try_lock(lock) is None
    assert await gateway.publish_reply(name, b"r1")
    await inbox.wait_for(2)
    assert inbox.bodies == [b"r0", b"r1"]
    assert not any(d.redelivered for d in inbox.deliveries)  # nothing went back
    await asyncio.gather(*(d.ack() for d in inbox.deliveries))
    assert await gateway.reply_queue_stats(name) == (0, 1)


# -- lifecycle -------------------------------------------------------------------------


async def test_declare_is_idempotent(transport_factory: TransportFactory) -> None:
    t = await declared(transport_factory)
    await t.declare()
    await t.publish_work(A, 1, b"x", ttl=LONG_TTL)
    assert await t.work_queue_depth(A) == 1


async def test_close_cancels_everything_the_transport_owns(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    before = asyncio.all_tasks()
    t = await declared(transport_factory)
    assert t.is_connected
    started: list[bytes] = []
    cancelled: list[bytes] = []
    changed = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        started.append(delivery.body)
        changed.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(delivery.body)
            raise

    await t.consume_work(A, stuck, prefetch=5)
    name = reply_name(topology)
    await t.declare_reply_queue(name)
    await t.consume_replies(name, stuck)
    await t.publish_work(A, 0, b"work", ttl=LONG_TTL)
    assert await t.publish_reply(name, b"reply")
    async with asyncio.timeout(5):
        while len(started) < 2:
            changed.clear()
            await changed.wait()

    await t.close()
    assert not t.is_connected
    assert sorted(cancelled) == [b"reply", b"work"]

    def running_tasks() -> list[asyncio.Task[object]]:
        return [
            task
            for task in asyncio.all_tasks() - before
            if task is not asyncio.current_task() and not task.done()
        ]

    # Nothing running our code survives close() ...
    assert [task for task in running_tasks() if _runs_our_code(task)] == []

    # ... and what the client library started for the connection winds down too
    # (aiormq finishes closing its socket writer in a task of its own).
    async def quiet() -> bool:
        return running_tasks() == []

    await eventually(quiet, within=2)
    with pytest.raises(TransportError):
        await t.publish_work(A, 0, b"after close", ttl=LONG_TTL)


async def test_cancelled_reply_consumers_are_forgotten(
    transport_factory: TransportFactory, topology: Topology
) -> None:
    """A gateway consumes and cancels a reply queue per session for as long as it runs:
    once cancelled and settled, nothing of a subscription (its handler and all the
    session state the handler reaches) may stay referenced by the transport."""
    import gc
    import weakref

    from audiostream.transport import MemoryTransport

    gateway = await transport_factory()
    handlers: list[weakref.ref[Inbox]] = []
    for i in range(50):
        name = reply_name(topology)
        await gateway.declare_reply_queue(name)
        inbox = Inbox(ack=i % 2 == 0)  # half settle after the cancel
        sub = await gateway.consume_replies(name, inbox)
        assert await gateway.publish_reply(name, b"r")
        await inbox.wait_for(1)
        await sub.cancel()
        if i % 2:
            await inbox.deliveries[0].ack()
        await gateway.delete_reply_queue(name)
        handlers.append(weakref.ref(inbox))
        del inbox, sub
    gc.collect()
    assert [h for h in handlers if h() is not None] == []
    if isinstance(gateway, MemoryTransport):
        assert gateway.consumer_count == 0
