"""RabbitMQ-only behaviour of the transport: declarations, wire format, connection loss."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
import subprocess
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import pytest

from audiostream.errors import ConfigError, ErrorCode, TransportError
from audiostream.topology import Topology
from audiostream.transport import Delivery, Subscription
from audiostream.transport.rabbitmq import RabbitTransport, _Subscription, declare_topology
from tests.conftest import delete_prefixed
from tests.policy.conftest import StallingProxy
from tests.transport.helpers import Inbox, eventually

pytestmark = pytest.mark.rabbitmq

A = "passthrough"
RabbitFactory = Callable[..., Awaitable[RabbitTransport]]


@pytest.fixture
async def rabbit(rabbitmq_url: str, topology: Topology) -> AsyncIterator[RabbitFactory]:
    """Connected RabbitTransports (``rabbit(view=None, **options)``), closed and cleaned up."""
    made: list[RabbitTransport] = []

    async def make(view: Topology | None = None, **options: Any) -> RabbitTransport:
        t = RabbitTransport(rabbitmq_url, view or topology, **options)
        await t.connect()
        made.append(t)
        return t

    yield make
    for t in made:
        await t.close()
    await delete_prefixed(rabbitmq_url, topology)


# -- declarations ----------------------------------------------------------------------


async def test_redeclare_with_other_arguments_raises_config_error(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    first = await rabbit()
    await first.declare()
    other = await rabbit(replace(topology, delivery_limit=topology.delivery_limit + 2))
    with pytest.raises(ConfigError) as caught:
        await other.declare()
    message = str(caught.value)
    assert caught.value.code is ErrorCode.CONFIG_ERROR
    assert repr(topology.work_queue(topology.processing_types[0], 0)) in message
    assert "x-delivery-limit" in message and "delete" in message
    # Only a throwaway channel died: the transport still publishes and probes.
    assert other.is_connected
    await other.publish_work(A, 0, b"x", ttl=5)
    assert await other.work_queue_depth(A) == 1


async def test_reply_queue_with_other_expiry_raises_config_error(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    gateway = await rabbit()
    name = topology.reply_queue(uuid.uuid4().hex)
    await gateway.declare_reply_queue(name)
    other = await rabbit(replace(topology, reply_expires_ms=topology.reply_expires_ms + 1))
    with pytest.raises(ConfigError, match=name):
        await other.declare_reply_queue(name)


async def test_declare_topology_twice_is_idempotent(rabbitmq_url: str, topology: Topology) -> None:
    try:
        await declare_topology(rabbitmq_url, topology)
        await declare_topology(rabbitmq_url, topology)
        conn = await aio_pika.connect(rabbitmq_url)
        try:
            for ptype in topology.processing_types:
                for name in topology.work_queues(ptype):
                    # Redeclaring with the topology's arguments passes only if they match.
                    ch = await conn.channel()
                    await ch.declare_queue(
                        name, durable=True, arguments=topology.work_queue_arguments()
                    )
                    await ch.close()
                ch = await conn.channel()
                with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                    await ch.declare_queue(
                        topology.work_queue(ptype, 0),
                        durable=True,
                        arguments={"x-queue-type": "classic"},
                    )
            # The dead-letter exchange routes any key to the dead-letter queue.
            ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
            dlx = await ch.get_exchange(topology.dead_letter_exchange, ensure=False)
            await dlx.publish(aio_pika.Message(b"dead"), routing_key="any.key", mandatory=True)
            dlq = await ch.declare_queue(
                topology.dead_letter_queue,
                durable=True,
                arguments=topology.dead_letter_queue_arguments(),
            )
            assert dlq.declaration_result.message_count == 1
        finally:
            await conn.close()
    finally:
        await delete_prefixed(rabbitmq_url, topology)


async def test_work_messages_are_transient_with_a_per_message_ttl(
    rabbit: RabbitFactory, rabbitmq_url: str, topology: Topology
) -> None:
    t = await rabbit()
    await t.declare()
    await t.publish_work(A, 1, b"audio", ttl=2.5)
    conn = await aio_pika.connect(rabbitmq_url)
    try:
        ch = await conn.channel()
        queue = await ch.get_queue(topology.work_queue(A, 1), ensure=False)
        msg = await queue.get(no_ack=True, timeout=5)
        assert msg is not None
        assert msg.body == b"audio"
        assert msg.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
        assert msg.expiration == pytest.approx(2.5)  # "2500" ms on the wire
    finally:
        await conn.close()


async def test_batched_replies_split_large_bodies_and_leave_no_confirm_bookkeeping(
    rabbit: RabbitFactory, rabbitmq_url: str, topology: Topology
) -> None:
    t = await rabbit()
    name = topology.reply_queue(uuid.uuid4().hex)
    await t.declare_reply_queue(name)
    big = bytes(range(256)) * 1200  # 300 KB: several frames at RabbitMQ's 128 KiB frame_max
    too_long = "q" * 300  # over AMQP's 255 bytes: refused alone, never put on the wire
    outcomes = await t.publish_replies(
        [(name, b"small"), (too_long, b"x"), (name, big), ("gone." + name, b"y")]
    )
    assert outcomes[0] is True and outcomes[2] is True and outcomes[3] is False
    assert isinstance(outcomes[1], TransportError) and "invalid reply queue" in str(outcomes[1])
    conn = await aio_pika.connect(rabbitmq_url)
    try:
        ch = await conn.channel()
        queue = await ch.get_queue(name, ensure=False)
        got = [await queue.get(no_ack=True, timeout=5) for _ in range(2)]
        assert [m.body for m in got if m is not None] == [b"small", big]
        assert all(m is not None and m.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
                   for m in got)
    finally:
        await conn.close()
    channel = await (await t._publish_channel()).get_underlay_channel()
    assert isinstance(channel, aiormq.Channel)
    assert channel.message_id_delivery_tag == {}

    async def all_settled() -> bool:
        return not channel.confirmations

    await eventually(all_settled, within=5)
    assert t.is_connected  # the overlong name did not cost the connection


async def test_a_reply_queue_declared_moments_ago_is_consumed_without_a_probe(
    rabbit: RabbitFactory, rabbitmq_url: str, topology: Topology,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new session's start declared its reply queue and then probed it again (a
    channel opened, a passive declare, the channel closed) before consuming: three of
    its seven broker round trips. A queue we declared or found moments ago is consumed
    at once; one seen longer ago is probed, and a missing one still leaves the shared
    channel open."""
    t = await rabbit()
    for slot in range(len(t._replies)):
        await t._reply_channel(slot)
    await t._publish_channel()
    opened: list[int] = []
    real_open = t._open_channel

    async def counting(*args: Any, **kw: Any) -> Any:
        opened.append(1)
        return await real_open(*args, **kw)

    monkeypatch.setattr(t, "_open_channel", counting)
    fresh = topology.reply_queue(uuid.uuid4().hex)
    await t.declare_reply_queue(fresh)
    assert len(opened) == 1  # the declare's channel
    inbox = Inbox()
    await t.consume_replies(fresh, inbox)
    assert len(opened) == 1  # no probe
    assert await t.publish_reply(fresh, b"served")
    assert (await inbox.wait_for(1))[0].body == b"served"

    gone = topology.reply_queue(uuid.uuid4().hex)
    await t.declare_reply_queue(gone)
    t._seen[gone] -= 60  # seen a minute ago: deleted since, by another connection
    conn = await aio_pika.connect(rabbitmq_url)
    try:
        await (await conn.channel()).queue_delete(gone)
    finally:
        await conn.close()
    with pytest.raises(TransportError, match="does not exist"):
        await t.consume_replies(gone, Inbox())
    assert len(opened) == 3  # declare, probe
    assert await t.publish_reply(fresh, b"still served")  # the shared channel is open
    assert (await inbox.wait_for(2))[1].body == b"still served"


async def test_batched_replies_raise_transport_error_once_the_connection_is_gone(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    t = await rabbit()
    name = topology.reply_queue(uuid.uuid4().hex)
    await t.declare_reply_queue(name)
    assert await t.publish_replies([(name, b"before")]) == [True]
    await t.close()
    with pytest.raises(TransportError):
        await t.publish_replies([(name, b"after")])


async def _underlay(sub: Subscription) -> aiormq.Channel:
    """The AMQP channel a reply subscription consumes on."""
    assert isinstance(sub, _Subscription) and sub.channel is not None
    channel = await sub.channel.get_underlay_channel()
    assert isinstance(channel, aiormq.Channel)
    return channel


async def _held_replies(
    t: RabbitTransport, name: str, count: int
) -> tuple[list[Delivery], aiormq.Channel]:
    """``count`` replies delivered on ``name`` and not settled, and their channel."""
    await t.declare_reply_queue(name)
    held = Inbox(ack=False)
    sub = await t.consume_replies(name, held)
    outcomes = await t.publish_replies([(name, f"r{i}".encode()) for i in range(count)])
    assert outcomes == [True] * count
    deliveries = await held.wait_for(count)
    channel = await _underlay(sub)
    assert isinstance(channel, aiormq.Channel)
    return deliveries, channel


def _count_writes(channel: aiormq.Channel) -> tuple[list[bytes], Callable[[], None]]:
    """Record what is handed to the channel's writer; returns the record and an undo."""
    writes: list[bytes] = []
    queue = channel.write_queue
    put, put_nowait = queue.put, queue.put_nowait

    async def counting_put(frame: Any) -> None:
        writes.append(frame.payload)
        await put(frame)

    def counting_put_nowait(frame: Any) -> None:
        writes.append(frame.payload)
        put_nowait(frame)

    queue.put = counting_put  # type: ignore[method-assign]
    queue.put_nowait = counting_put_nowait  # type: ignore[method-assign]

    def undo() -> None:
        queue.put, queue.put_nowait = put, put_nowait  # type: ignore[method-assign]

    return writes, undo


BASIC_ACK = bytes.fromhex("003c0050")  # class 60, method 80


async def test_a_consume_does_not_wait_for_a_request_on_another_sessions_channel(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    """A channel answers one request at a time. With every session's reply consumer on
    one channel, the consumes and cancels of sessions starting and ending at three times
    the held load queued behind each other, and a start took seconds (p99 2-6 s against
    under 1 s with four channels, docs/benchmarks.md). Sessions take the reply channels
    in turn: while one is busy, the next session's consume goes through on the next."""
    t = await rabbit()
    first, second = (topology.reply_queue(uuid.uuid4().hex) for _ in range(2))
    for name in (first, second):
        await t.declare_reply_queue(name)
    busy = await _underlay(await t.consume_replies(first, Inbox()))
    inbox = Inbox()
    async with busy.lock:  # as while a consume or cancel on it awaits its answer
        consuming = asyncio.ensure_future(t.consume_replies(second, inbox))
        done, _ = await asyncio.wait({consuming}, timeout=60)  # a hang guard, not a timing
        assert done == {consuming}
        assert await _underlay(consuming.result()) is not busy
    assert await t.publish_reply(second, b"served")
    assert (await inbox.wait_for(1))[0].body == b"served"


async def test_a_reply_channel_the_broker_closes_is_restored_and_the_others_go_on(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    """A consume on a queue that vanished makes the broker close the channel it ran on.
    With one reply channel that stopped every session's replies until the restore; now
    only the sessions on that channel wait for it, and it comes back."""
    t = await rabbit(reconnect_interval=0.1)
    names = [topology.reply_queue(uuid.uuid4().hex) for _ in range(2)]
    for name in names:
        await t.declare_reply_queue(name)
    inboxes = [Inbox(), Inbox()]
    subs: list[_Subscription] = []
    for name, inbox in zip(names, inboxes, strict=True):
        sub = await t.consume_replies(name, inbox)
        assert isinstance(sub, _Subscription)
        subs.append(sub)
    hit, spared = [await _underlay(s) for s in subs]
    assert hit is not spared
    doomed = _Subscription(t, [topology.reply_queue(uuid.uuid4().hex)], Inbox(),
                           prefetch=None)
    doomed._reply_slot = subs[0]._reply_slot
    with pytest.raises(TransportError):
        await t._start(doomed, "consuming replies from a missing queue")
    assert hit.is_closed and not spared.is_closed
    assert await t.publish_reply(names[1], b"spared")
    assert (await inboxes[1].wait_for(1))[0].body == b"spared"

    async def restored() -> bool:
        return subs[0].healthy

    await eventually(restored, within=10)
    assert await t.publish_reply(names[0], b"back")
    assert (await inboxes[0].wait_for(1, within=10))[0].body == b"back"
    assert not spared.is_closed


async def test_acks_on_several_reply_channels_in_one_turn_go_out_in_one_write(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    """The reply channels share one connection, whose writer sends each queued frame on
    its own: a write per channel per turn cost the gateway about 7 % more CPU per
    session with four channels. The acks of one turn leave together."""
    t = await rabbit()
    held = [await _held_replies(t, topology.reply_queue(uuid.uuid4().hex), 3)
            for _ in range(2)]
    (first, one), (second, other) = held
    assert one is not other and one.write_queue is other.write_queue
    writes, undo = _count_writes(one)
    try:
        await asyncio.gather(*(d.ack() for d in [*first, *second]))
    finally:
        undo()
    assert len(writes) == 1
    assert writes[0].count(BASIC_ACK) == 2  # one multiple=True ack per channel


async def test_acks_asked_for_together_go_out_in_one_write_and_settle_every_delivery(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    t = await rabbit()
    name = topology.reply_queue(uuid.uuid4().hex)
    deliveries, channel = await _held_replies(t, name, 20)
    writes, undo = _count_writes(channel)
    try:
        await asyncio.gather(*(d.ack() for d in deliveries))
    finally:
        undo()
    # Every delivery of the channel is settled: one multiple=True ack, one socket write.
    assert len(writes) == 1
    assert writes[0].count(BASIC_ACK) == 1
    with pytest.raises(TransportError, match="already settled"):
        await deliveries[0].ack()
    # Closing the channel would have returned any unacked delivery to the queue.
    await t.close()
    other = await rabbit()
    assert await other.reply_queue_stats(name) == (0, 0)


async def test_acks_with_an_earlier_delivery_unsettled_go_out_tag_by_tag(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    """A multiple=True ack would also settle the delivery still held: not allowed."""
    t = await rabbit()
    name = topology.reply_queue(uuid.uuid4().hex)
    (held, *rest), channel = await _held_replies(t, name, 5)
    writes, undo = _count_writes(channel)
    try:
        await asyncio.gather(*(d.ack() for d in rest))
    finally:
        undo()
    assert len(writes) == 1
    assert writes[0].count(BASIC_ACK) == 4
    await t.close()  # the held one goes back, alone
    other = await rabbit()
    again = Inbox(ack=False)
    await other.consume_replies(name, again)
    (back,) = await again.wait_for(1)
    assert back.body == held.body


async def test_a_cancelled_ack_caller_does_not_cancel_the_acks_sent_with_it(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    t = await rabbit()
    name = topology.reply_queue(uuid.uuid4().hex)
    (first, second), _channel = await _held_replies(t, name, 2)
    cancelled = asyncio.ensure_future(first.ack())
    kept = asyncio.ensure_future(second.ack())

    cancelled.cancel()  # in the same turn as both acks were asked for
    await kept
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # Nothing comes back on another connection: both acks reached the broker.
    await t.close()
    other = await rabbit()
    again = Inbox(ack=False)
    await other.consume_replies(name, again)
    await other.publish_replies([(name, b"marker")])
    (marker,) = await again.wait_for(1)
    assert marker.body == b"marker"


class _Session:
    """Like the gateway's pipeline: holds its subscription, handles with a bound method."""

    def __init__(self) -> None:
        self.subscription: Subscription | None = None
        self.handled = asyncio.Event()

    def on_delivery(self, delivery: Delivery) -> None:
        delivery.ack()
        self.handled.set()


@pytest.mark.parametrize("kind", ["work", "replies"])
async def test_a_cancelled_subscription_does_not_keep_its_handlers_owner_alive(
    rabbit: RabbitFactory, topology: Topology, kind: str
) -> None:
    """A work subscription's closed channel (and its dispatch) can outlive the
    subscription: aiormq keeps the channel's callbacks, which reach the subscription.
    And a session holds its subscription, whose handler is the session's bound method:
    a cycle only the garbage collector could break. Once cancelled, neither may keep
    the session alive, with the collector off and the transport's per-channel
    bookkeeping kept."""
    t = await rabbit()
    await t.declare()
    session = _Session()
    if kind == "work":
        session.subscription = await t.consume_work(A, session.on_delivery, prefetch=4)
        await t.publish_work(A, 0, b"x", ttl=5)
    else:
        name = topology.reply_queue(uuid.uuid4().hex)
        await t.declare_reply_queue(name)
        session.subscription = await t.consume_replies(name, session.on_delivery)
        assert await t.publish_reply(name, b"x")
    await asyncio.wait_for(session.handled.wait(), 5)
    await session.subscription.cancel()  # closes a work subscription's channel
    bookkeeping = list(t._dispatches)  # the transport's per-channel dispatch and acks
    assert bookkeeping
    alive = weakref.ref(session)
    gc.disable()
    try:
        del session
        assert alive() is None
    finally:
        gc.enable()
    del bookkeeping


@contextlib.asynccontextmanager
async def _stallable(rabbitmq_url: str, topology: Topology, op_timeout: float
                     ) -> AsyncIterator[tuple[StallingProxy, RabbitTransport]]:
    """A connected, declared transport whose broker a ``StallingProxy`` can silence."""
    parts = urlsplit(rabbitmq_url)
    proxy = StallingProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    t = RabbitTransport(proxy.url(rabbitmq_url, "?heartbeat=0"), topology,
                        op_timeout=op_timeout)
    try:
        await t.connect()
        await t.declare()
        yield proxy, t
    finally:
        proxy.resume()
        await t.close()
        await proxy.close()
        await delete_prefixed(rabbitmq_url, topology)


async def test_a_reply_consume_answered_after_op_timeout_leaves_the_shared_channel_open(
    rabbitmq_url: str, topology: Topology
) -> None:
    """Sessions' reply consumers share a few channels. At three times the held load a
    consume's answer came after ``op_timeout`` (200 sessions' consumes and cancels queued
    for what was then the one reply channel); aiormq closed the channel for it, and the broker then
    closed the connection (504 ``expected 'channel.open'``): every session failed with
    broker_unavailable. Now that start alone fails, the request runs to its end, the
    channel and the connection stay open, and the late consumer is cancelled."""
    async with _stallable(rabbitmq_url, topology, 0.5) as (proxy, t):
        a, b = (topology.reply_queue(uuid.uuid4().hex) for _ in range(2))
        for name in (a, b):
            await t.declare_reply_queue(name)
        live = Inbox()
        underlay = await _underlay(await t.consume_replies(a, live))
        proxy.pause()  # the consume goes out; its answer comes late
        late = _Subscription(t, [b], Inbox(), prefetch=None)
        late._reply_slot = 0  # on the live session's channel (the first)
        with pytest.raises(TransportError, match="no answer within"):
            await t._start(late, "consuming replies")
        proxy.resume()

        async def settled() -> bool:  # the late consume, then its cancel, went through
            return not t._reply_calls and await t.reply_queue_stats(b) == (0, 0)

        await eventually(settled)
        assert not underlay.is_closed and t.is_connected
        assert await t.publish_reply(a, b"still served")
        assert (await live.wait_for(1))[0].body == b"still served"
        retried = Inbox()
        await t.consume_replies(b, retried)  # the client's next start
        assert await t.publish_reply(b, b"retried")
        assert (await retried.wait_for(1))[0].body == b"retried"


async def test_close_while_the_broker_withholds_a_reply_consumes_answer_returns(
    rabbitmq_url: str, topology: Topology
) -> None:
    """A consume on a shared reply channel holds the channel's lock until answered, and
    its channel's close queued behind it: a gateway shutting down while the broker was
    silent hung for as long as the silence lasted. Now the close cancels the request, and
    the start waiting on it fails with "the transport closed", not a timeout."""
    async with _stallable(rabbitmq_url, topology, 3600) as (proxy, t):
        name = topology.reply_queue(uuid.uuid4().hex)
        await t.declare_reply_queue(name)
        await t._reply_channel(t._next_reply_channel)  # the one the start below takes
        proxy.pause()
        start = asyncio.ensure_future(
            t._start(_Subscription(t, [name], Inbox(), prefetch=None), "consuming replies"))

        async def waiting() -> bool:
            return bool(t._reply_calls)

        await eventually(waiting)
        closing = asyncio.ensure_future(t.close())
        done, _ = await asyncio.wait({closing}, timeout=120)  # a hang guard, not a timing
        proxy.resume()
        await asyncio.wait({closing, start}, timeout=120)
        assert done == {closing}  # closed while the broker still said nothing
        with pytest.raises(TransportError, match="the transport closed"):
            start.result()
        assert not t._reply_calls


# -- connecting ------------------------------------------------------------------------


def _new_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    return [
        t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()
    ]


async def test_unreachable_broker_raises_transport_error_quickly(topology: Topology) -> None:
    before = asyncio.all_tasks()
    t = RabbitTransport("amqp://guest:secret@127.0.0.1:1/", topology, connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        await t.connect()
    assert time.monotonic() - started < 3
    assert caught.value.retryable
    assert "127.0.0.1:1" in str(caught.value)
    assert "secret" not in str(caught.value)
    assert not t.is_connected
    await t.close()
    assert _new_tasks(before) == []


async def test_silent_broker_times_out_at_connect_timeout(topology: Topology) -> None:
    """A peer that accepts TCP but never speaks AMQP must not hang the caller."""
    writers: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    before = asyncio.all_tasks()
    try:
        t = RabbitTransport(f"amqp://guest:guest@127.0.0.1:{port}/", topology, connect_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TransportError):
            await t.connect()
        assert time.monotonic() - started < 2.5
        assert not t.is_connected
        await t.close()

        async def quiet() -> bool:  # no reconnect loop left behind
            return _new_tasks(before) == []

        await eventually(quiet, within=2)
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_operations_before_connect_raise_transport_error(topology: Topology) -> None:
    t = RabbitTransport("amqp://guest:guest@127.0.0.1:1/", topology)
    with pytest.raises(TransportError):
        await t.publish_work(A, 0, b"x", ttl=1)
    with pytest.raises(TransportError):
        await t.work_queue_depth(A)


# -- connection loss -------------------------------------------------------------------


def _connection_pids(name: str) -> list[str]:
    out = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [line.split("\t", 1)[0] for line in out.splitlines() if f'"{name}"' in line]


async def _drop_connection(t: RabbitTransport, name: str) -> None:
    """Make the broker close ``t``'s connection (or, without rabbitmqctl, the socket)."""
    if shutil.which("rabbitmqctl") is None:
        conn = t._connection
        assert conn is not None and conn.transport is not None
        await conn.transport.connection.close(ConnectionError("dropped by the test"))
        return
    (pid,) = await asyncio.to_thread(_connection_pids, name)
    await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "close_connection", pid, "dropped by the test"],
        check=True,
        capture_output=True,
        timeout=30,
    )

    async def replaced() -> bool:
        pids = await asyncio.to_thread(_connection_pids, name)
        return bool(pids) and pid not in pids

    await eventually(replaced, within=10, interval=0.1)


async def test_consumers_and_publishing_resume_after_the_connection_drops(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    name = f"audiostream-test-{uuid.uuid4().hex[:8]}"
    t = await rabbit(connection_name=name, reconnect_interval=0.1)
    await t.declare()
    other = await rabbit()
    work, replies = Inbox(), Inbox()
    held = Inbox(ack=False)
    await t.consume_work(A, work, prefetch=10)
    await t.consume_work("gain", held, prefetch=10)
    reply_queue = topology.reply_queue(uuid.uuid4().hex)
    await t.declare_reply_queue(reply_queue)
    await t.consume_replies(reply_queue, replies)
    await other.publish_work("gain", 0, b"unacked", ttl=30)
    await held.wait_for(1)

    await _drop_connection(t, name)

    await other.publish_work(A, 0, b"work after", ttl=30)
    await work.wait_for(1, within=10)
    await held.wait_for(2, within=10)  # the unacked one came back on the new connection
    assert held.deliveries[1].body == b"unacked" and held.deliveries[1].redelivered

    async def replied() -> bool:
        return await other.publish_reply(reply_queue, b"reply after")

    await eventually(replied, within=10)
    await replies.wait_for(1, within=10)
    assert replies.bodies == [b"reply after"]

    async def publishes() -> bool:
        try:
            await t.publish_work(A, 1, b"own publish", ttl=30)
        except TransportError:
            return False
        return True

    await eventually(publishes, within=10, interval=0.05)
    await work.wait_for(2, within=10)
    assert t.is_connected
    with pytest.raises(TransportError):  # the old delivery's channel is gone
        await held.deliveries[0].ack()


async def test_a_lock_is_lost_when_the_connection_drops_though_it_comes_back(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    """The broker deletes a lock's exclusive queue with the connection that dropped; the
    robust connection comes back without it. The holder is told (``holds_lock``), its
    stale record neither refuses a new holding nor deletes another connection's."""
    name = f"audiostream-test-{uuid.uuid4().hex[:8]}"
    t = await rabbit(connection_name=name, reconnect_interval=0.1)
    other = await rabbit()
    lock = topology.reply_queue(uuid.uuid4().hex) + ".lock"
    lost = await t.try_lock(lock)
    assert lost is not None and t.holds_lock(lost)
    assert await other.try_lock(lock) is None

    await _drop_connection(t, name)

    assert not t.holds_lock(lost)
    theirs = await other.try_lock(lock)  # the broker let it go with the connection
    assert theirs is not None

    async def connected() -> bool:
        return t.is_connected

    await eventually(connected, within=10)
    await t.unlock(lost)  # deletes nothing: the queue of that name is another's now
    assert await t.try_lock(lock) is None  # refused by the broker, as other holds it
    assert other.holds_lock(theirs)
    await other.unlock(theirs)
    mine = await t.try_lock(lock)  # not refused by our own record of the lost holding
    assert mine is not None and t.holds_lock(mine)
    assert await other.try_lock(lock) is None


async def test_a_reply_consumer_under_a_lost_lock_stays_down_until_it_is_let_go(
    rabbit: RabbitFactory, topology: Topology
) -> None:
    """A takeover reads a journal under its lock. After a drop that lost the lock its
    consumer is not restored (the lock's next holder reads alone), while a consumer on
    the same connection without a lock comes back; once the holding is let go, the
    consumer is an ordinary one again and is restored."""
    name = f"audiostream-test-{uuid.uuid4().hex[:8]}"
    t = await rabbit(connection_name=name, reconnect_interval=0.1)
    other = await rabbit()
    journal, plain = (topology.reply_queue(uuid.uuid4().hex) for _ in range(2))
    for q in (journal, plain):
        await t.declare_reply_queue(q)
    lock = await t.try_lock(journal + ".lock")
    assert lock is not None
    under, free = Inbox(), Inbox()
    await t.consume_replies(journal, under, lock=lock)
    await t.consume_replies(plain, free)

    await _drop_connection(t, name)

    async def replied() -> bool:
        return await other.publish_reply(plain, b"after the drop")

    await eventually(replied, within=10)
    await free.wait_for(1, within=10)  # restored, in the same pass that skipped ``under``
    assert await other.publish_reply(journal, b"for the next holder")
    assert await other.reply_queue_stats(journal) == (1, 0)
    assert under.bodies == []
    await t.unlock(lock)
    await under.wait_for(1, within=10)
    assert under.bodies == [b"for the next holder"]


async def test_work_consumer_restarts_when_its_queue_is_deleted_and_declared_again(
    rabbit: RabbitFactory,
    rabbitmq_url: str,
    topology: Topology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = await rabbit(reconnect_interval=0.1)
    await worker.declare()
    inbox = Inbox()
    await worker.consume_work(A, inbox, prefetch=5)
    conn = await aio_pika.connect(rabbitmq_url)
    try:
        ch = await conn.channel()
        await ch.queue_delete(topology.work_queue(A, 0))  # the broker cancels our consumer
    finally:
        await conn.close()

    # Redeclare only once the worker noticed: RabbitMQ 3.10 does not cancel the
    # consumer of a quorum queue deleted and redeclared within a few milliseconds,
    # and that consumer then silently receives nothing.
    async def noticed() -> bool:
        return "the broker cancelled consuming" in caplog.text

    await eventually(noticed)
    operator = await rabbit()
    await operator.declare()
    await operator.publish_work(A, 0, b"after redeclare", ttl=30)
    await operator.publish_work(A, 1, b"other shard", ttl=30)
    await inbox.wait_for(2, within=10)
    assert sorted(inbox.bodies) == [b"after redeclare", b"other shard"]


@pytest.mark.rabbitmq
async def test_delete_topology_removes_what_declare_made(rabbitmq_url: str) -> None:
    from audiostream.transport.rabbitmq import declare_topology, delete_topology
    from tests.conftest import unique_prefix

    topo = Topology(processing_types=("gain",), prefix=unique_prefix())

    async def exists(queue: str) -> bool:
        conn = await aio_pika.connect(rabbitmq_url)
        try:
            channel = await conn.channel()
            try:
                await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return False
            return True
        finally:
            await conn.close()

    await declare_topology(rabbitmq_url, topo)
    assert await exists(topo.work_queue("gain", 0))
    await delete_topology(rabbitmq_url, topo)
    await delete_topology(rabbitmq_url, topo)  # twice: missing objects are skipped
    assert not await exists(topo.work_queue("gain", 0))
    assert not await exists(topo.dead_letter_queue)


async def test_dead_letter_depth_counts_the_dead_letter_queue(
    rabbitmq_url: str, topology: Topology
) -> None:
    t = RabbitTransport(rabbitmq_url, topology)
    await t.connect()
    try:
        assert await t.dead_letter_depth() is None  # not declared yet
        await t.declare()
        assert await t.dead_letter_depth() == 0
        conn = await aio_pika.connect(rabbitmq_url)
        try:
            ch = await conn.channel(publisher_confirms=True)
            dlx = await ch.get_exchange(topology.dead_letter_exchange, ensure=False)
            for _ in range(3):
                await dlx.publish(aio_pika.Message(b"dead"), routing_key="any.key")
        finally:
            await conn.close()
        assert await t.dead_letter_depth() == 3
    finally:
        await t.close()
        await delete_prefixed(rabbitmq_url, topology)
