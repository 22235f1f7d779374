"""In-memory transport: the embedded single-process default.

Not a mock: it keeps the semantics the RabbitMQ adapter has (routing by type and
shard, per-message TTL, confirms, redelivery of a dead connection's unacked
messages, delivery limit and dead-lettering, expiring reply queues), and runs
the same conformance suite. A ``MemoryBroker`` is the shared server; each
``MemoryTransport`` is one connection to it, so closing one behaves like a
process dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from audiostream.errors import TransportError
from audiostream.topology import Topology
from audiostream.transport.base import Handler, LockToken, Subscription

log = logging.getLogger(__name__)

#: Unacked replies one reply consumer may hold (RabbitMQ's reply channel uses the same
#: default); the gateway's journal cap must stay below it.
REPLY_PREFETCH = 1000


@dataclass(slots=True)
class _Message:
    body: bytes
    expires_at: float | None
    delivery_count: int = 0


class _Queue:
    __slots__ = ("consumers", "delivery_limit", "expires_ms", "expiry_handle", "messages", "name")

    def __init__(self, name: str, *, delivery_limit: int | None, expires_ms: int | None) -> None:
        self.name = name
        self.messages: deque[_Message] = deque()
        self.consumers: list[_Consumer] = []
        self.delivery_limit = delivery_limit
        self.expires_ms = expires_ms
        self.expiry_handle: asyncio.TimerHandle | None = None


@dataclass(eq=False, slots=True)
class _Consumer:
    queue: _Queue
    handler: Handler
    prefetch: int
    owner: MemoryTransport
    unacked: dict[int, _Message] = field(default_factory=dict)
    active: bool = True
    cancelled: bool = False
    """No new deliveries (cancelled, or its queue was deleted); forgotten by its owner
    once its last delivery is settled."""


class _MemoryDelivery:
    __slots__ = ("_consumer", "_message", "_settled", "_tag")

    def __init__(self, consumer: _Consumer, tag: int, message: _Message) -> None:
        self._consumer = consumer
        self._tag = tag
        self._message = message
        self._settled = False

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def redelivered(self) -> bool:
        return self._message.delivery_count > 1

    def _settle(self) -> _Message | None:
        if self._settled:
            raise TransportError("delivery already settled")
        self._settled = True
        consumer = self._consumer
        msg = consumer.unacked.pop(self._tag, None)
        if consumer.cancelled and not consumer.unacked:
            consumer.owner._forget(consumer)
        return msg

    def ack(self) -> asyncio.Future[None]:
        """Settled at once (there is no wire to wait for): a done future."""
        if self._settle() is not None:
            self._consumer.owner.broker._dispatch(self._consumer.queue)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def reject(self) -> None:
        msg = self._settle()
        if msg is not None:
            self._consumer.owner.broker._dead_letter(msg, "rejected")
            self._consumer.owner.broker._dispatch(self._consumer.queue)

    async def release(self) -> None:
        msg = self._settle()
        if msg is not None:
            self._consumer.owner.broker._requeue(self._consumer.queue, msg)
            self._consumer.owner.broker._dispatch(self._consumer.queue)


async def _cancelled_handler(delivery: object) -> None:
    """Stands in for the handler of a cancelled consumer, which gets no more deliveries."""


def _retire(c: _Consumer) -> None:
    """Mark ``c`` cancelled and let go of its handler at once.

    The handler is usually a bound method of the session that also holds the
    subscription: that cycle would otherwise keep every finished session alive until
    the cyclic GC runs (in the embedded server, for a long while)."""
    c.cancelled = True
    c.handler = _cancelled_handler


class _MemorySubscription:
    def __init__(self, owner: MemoryTransport, consumers: list[_Consumer]) -> None:
        self._owner = owner
        self._consumers = consumers

    async def cancel(self) -> None:
        # As basic.cancel: no new deliveries; handed-out ones stay settleable and go
        # back to their queue if still unsettled when the transport closes.
        consumers, self._consumers = self._consumers, []
        for c in consumers:
            self._owner.broker._detach_consumer(c)
            _retire(c)
            if not c.unacked:
                self._owner._forget(c)


class MemoryBroker:
    """The shared in-process 'server'."""

    _default: MemoryBroker | None = None

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._bindings: dict[tuple[str, str], str] = {}  # (exchange, routing key) -> queue
        self._tags = itertools.count(1)
        self._locks: dict[str, tuple[MemoryTransport, LockToken]] = {}
        """Lock name -> the connection holding it and its holding (``try_lock``)."""
        self.dead_letters: deque[tuple[str, bytes]] = deque(maxlen=10_000)

    @classmethod
    def default(cls) -> MemoryBroker:
        """The process-wide broker used by ``serve`` without ``--broker``."""
        if cls._default is None:
            cls._default = cls()
        return cls._default

    @property
    def queue_count(self) -> int:
        return len(self._queues)

    def unacked(self, name: str) -> int:
        """Messages of queue ``name`` delivered and not yet settled (``rabbitmqctl
        list_queues messages_unacknowledged``)."""
        q = self._queues.get(name)
        return 0 if q is None else sum(len(c.unacked) for c in q.consumers)

    # -- topology ----------------------------------------------------------------
    def _declare_queue(
        self, name: str, *, delivery_limit: int | None = None, expires_ms: int | None = None
    ) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(
                name, delivery_limit=delivery_limit, expires_ms=expires_ms
            )
            self._arm_expiry(q)
        elif expires_ms is not None:
            self._arm_expiry(q)  # a declare renews the lease, as in RabbitMQ
        return q

    def _arm_expiry(self, q: _Queue) -> None:
        if q.expires_ms is None:
            return
        if q.expiry_handle is not None:
            q.expiry_handle.cancel()
            q.expiry_handle = None
        if not q.consumers:
            loop = asyncio.get_running_loop()
            q.expiry_handle = loop.call_later(q.expires_ms / 1000, self._expire_queue, q)

    def _expire_queue(self, q: _Queue) -> None:
        if not q.consumers and self._queues.get(q.name) is q:
            del self._queues[q.name]

    def _delete_queue(self, name: str) -> None:
        q = self._queues.pop(name, None)
        if q is None:
            return
        if q.expiry_handle is not None:
            q.expiry_handle.cancel()
        for c in list(q.consumers):
            c.active = False
            _retire(c)
            if not c.unacked:
                c.owner._forget(c)
        q.consumers.clear()

    # -- messages ----------------------------------------------------------------
    def _enqueue(self, q: _Queue, msg: _Message) -> None:
        q.messages.append(msg)
        self._dispatch(q)

    def _requeue(self, q: _Queue, msg: _Message) -> None:
        """Return a message to the head of its queue, or, as a quorum queue does once
        it was returned more than delivery_limit times (so delivered delivery_limit + 1
        times), dead-letter it."""
        if q.delivery_limit is not None and msg.delivery_count > q.delivery_limit:
            self._dead_letter(msg, "delivery_limit")
        else:
            q.messages.appendleft(msg)

    def _dead_letter(self, msg: _Message, reason: str) -> None:
        self.dead_letters.append((reason, msg.body))

    def _purge_expired(self, q: _Queue) -> None:
        now = time.monotonic()
        if any(m.expires_at is not None and m.expires_at <= now for m in q.messages):
            keep: deque[_Message] = deque()
            for m in q.messages:
                if m.expires_at is not None and m.expires_at <= now:
                    self._dead_letter(m, "expired")
                else:
                    keep.append(m)
            q.messages = keep

    def _dispatch(self, q: _Queue) -> None:
        """Hand ready messages to consumers with free prefetch, round robin."""
        if not q.consumers:
            return
        self._purge_expired(q)
        while q.messages:
            ready = [c for c in q.consumers if len(c.unacked) < c.prefetch]
            if not ready:
                return
            consumer = min(ready, key=lambda c: len(c.unacked))
            msg = q.messages.popleft()
            msg.delivery_count += 1
            tag = next(self._tags)
            consumer.unacked[tag] = msg
            consumer.owner.progress += 1
            # As RabbitMQ's dispatch: the handler runs inline, in a later turn.
            asyncio.get_running_loop().call_soon(
                consumer.owner._deliver, consumer, _MemoryDelivery(consumer, tag, msg))
            # Rotate so equal-load consumers take turns.
            q.consumers.remove(consumer)
            q.consumers.append(consumer)

    def _add_consumer(self, c: _Consumer) -> None:
        c.queue.consumers.append(c)
        if c.queue.expiry_handle is not None:
            c.queue.expiry_handle.cancel()
            c.queue.expiry_handle = None
        self._dispatch(c.queue)

    def _detach_consumer(self, c: _Consumer) -> None:
        """Stop dispatching to ``c``; its unacked messages stay with it."""
        q = c.queue
        if c in q.consumers:
            q.consumers.remove(c)
            if self._queues.get(q.name) is q:
                self._arm_expiry(q)

    def _remove_consumer(self, c: _Consumer, *, requeue: bool) -> None:
        if not c.active:
            return
        c.active = False
        q = c.queue
        if c in q.consumers:
            q.consumers.remove(c)
        if requeue and c.unacked:
            # Unacked messages go back to the head, in their original order.
            for msg in reversed(list(c.unacked.values())):
                self._requeue(q, msg)
        c.unacked.clear()
        if self._queues.get(q.name) is q:
            self._arm_expiry(q)
            self._dispatch(q)


class MemoryTransport:
    """One connection to a ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker, topology: Topology) -> None:
        self.broker = broker
        self.topology = topology
        self._connected = False
        self._consumers: set[_Consumer] = set()
        """Consumers that may still deliver or hold unsettled deliveries."""
        self._tasks: set[asyncio.Future[None]] = set()
        self.progress = 0
        """Broker answers so far (publishes taken, deliveries, queue statistics)."""

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def consumer_count(self) -> int:
        """Consumers this connection still holds: cancelled ones whose deliveries are all
        settled are forgotten, so this returns to its baseline when sessions end."""
        return len(self._consumers)

    def _forget(self, c: _Consumer) -> None:
        self._consumers.discard(c)

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        self._connected = False
        locks = self.broker._locks
        for name in [n for n, (owner, _) in locks.items() if owner is self]:
            del locks[name]  # as RabbitMQ deletes a dead connection's exclusive queues
        for c in self._consumers:
            self.broker._remove_consumer(c, requeue=True)
        self._consumers.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _check(self) -> None:
        if not self._connected:
            raise TransportError("memory transport is not connected")

    def _deliver(self, consumer: _Consumer, delivery: _MemoryDelivery) -> None:
        if not consumer.active:
            return  # the connection closed meanwhile: the message went back already
        if consumer.cancelled:
            # Cancelled after this delivery was scheduled (its handler is retired): back
            # to its queue, as the RabbitMQ transport nacks one that races basic.cancel.
            msg = delivery._settle()
            if msg is not None:
                self.broker._requeue(consumer.queue, msg)
                self.broker._dispatch(consumer.queue)
            return
        try:
            result = consumer.handler(delivery)
        except Exception:
            log.exception("handler for %s failed; its delivery stays unsettled",
                          consumer.queue.name)
            return
        if result is not None:
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a delivery handler failed; its delivery stays unsettled", exc_info=exc)

    async def declare(self) -> None:
        self._check()
        t = self.topology
        for ptype in t.processing_types:
            for shard in range(t.shards):
                name = t.work_queue(ptype, shard)
                self.broker._declare_queue(name, delivery_limit=t.delivery_limit)
                self.broker._bindings[(t.exchange(ptype), t.routing_key(ptype, shard))] = name

    async def publish_work(self, processing: str, shard: int, body: bytes, *, ttl: float) -> None:
        self._check()
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        key = (self.topology.exchange(processing), self.topology.routing_key(processing, shard))
        name = self.broker._bindings.get(key)
        q = self.broker._queues.get(name) if name else None
        if q is None:
            raise TransportError(f"no queue bound for {processing!r} shard {shard}")
        self.broker._enqueue(q, _Message(body, time.monotonic() + ttl))
        self.progress += 1

    async def consume_work(
        self, processing: str, handler: Handler, *, prefetch: int
    ) -> Subscription:
        self._check()
        consumers = []
        for name in self.topology.work_queues(processing):
            q = self.broker._queues.get(name)
            if q is None:
                raise TransportError(f"work queue {name!r} is not declared")
            consumers.append(self._consume(q, handler, prefetch))
        return _MemorySubscription(self, consumers)

    def _consume(self, q: _Queue, handler: Handler, prefetch: int) -> _Consumer:
        c = _Consumer(q, handler, prefetch, self)
        self._consumers.add(c)
        self.broker._add_consumer(c)
        return c

    async def declare_reply_queue(self, name: str) -> None:
        self._check()
        self.broker._declare_queue(name, expires_ms=self.topology.reply_expires_ms)

    async def consume_replies(
        self, name: str, handler: Handler, *, lock: LockToken | None = None
    ) -> Subscription:
        # No reconnect here: a lost lock means a closed transport, whose consumers end.
        del lock
        self._check()
        q = self.broker._queues.get(name)
        if q is None:
            raise TransportError(f"reply queue {name!r} does not exist")
        return _MemorySubscription(self, [self._consume(q, handler, REPLY_PREFETCH)])

    async def publish_reply(self, queue: str, body: bytes) -> bool:
        self._check()
        q = self.broker._queues.get(queue)
        if q is None:
            return False
        self.broker._enqueue(q, _Message(body, None))
        self.progress += 1
        return True

    async def publish_replies(
        self, replies: Sequence[tuple[str, bytes]]
    ) -> list[bool | TransportError]:
        return [await self.publish_reply(queue, body) for queue, body in replies]

    async def delete_reply_queue(self, name: str) -> None:
        self._check()
        self.broker._delete_queue(name)

    async def reply_queue_stats(self, name: str) -> tuple[int, int] | None:
        self._check()
        q = self.broker._queues.get(name)
        if q is None:
            return None
        self.broker._arm_expiry(q)
        return len(q.messages), len(q.consumers)

    async def reply_queue_exists(self, name: str) -> bool:
        self._check()
        q = self.broker._queues.get(name)
        if q is None:
            return False
        self.broker._arm_expiry(q)  # a passive declare renews the lease, as in RabbitMQ
        return True

    async def work_queue_depth(self, processing: str) -> int:
        self._check()
        total = 0
        for name in self.topology.work_queues(processing):
            q = self.broker._queues.get(name)
            if q is not None:
                self.broker._purge_expired(q)
                total += len(q.messages)
        self.progress += 1
        return total

    async def try_lock(self, name: str) -> LockToken | None:
        self._check()
        self.progress += 1
        if name in self.broker._locks:
            return None
        token = LockToken(name)
        self.broker._locks[name] = (self, token)
        return token

    def holds_lock(self, token: LockToken) -> bool:
        """A connection here only ends by ``close()`` (which lets its locks go): this
        transport has no drop that outlives it, unlike RabbitMQ's robust connection."""
        held = self.broker._locks.get(token.name)
        return held is not None and held[0] is self and held[1] is token

    async def unlock(self, token: LockToken) -> None:
        if self.holds_lock(token):
            del self.broker._locks[token.name]
