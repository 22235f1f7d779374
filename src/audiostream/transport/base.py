"""The transport contract shared by the RabbitMQ and in-memory implementations.

Everything above this layer (gateway, worker) talks to a ``Transport`` and
never to aio-pika. Semantics both implementations guarantee, checked by one
conformance suite (``tests/transport/test_conformance.py``):

* work messages are routed by processing type and shard to durable work queues;
* a work message whose TTL passes before delivery is dropped, never delivered;
* a delivery is redelivered (``redelivered=True``) to another consumer when the
  consumer's connection dies before ``ack``; a message returned more than
  ``delivery_limit`` times (so delivered ``delivery_limit + 1`` times, as
  RabbitMQ's ``x-delivery-limit`` counts) is dead-lettered;
* publishes return only once the broker has taken responsibility (confirms);
* reply queues are per session and vanish ``reply_expires_ms`` after their last
  consumer leaves;
* ``close()`` cancels every consumer and task the transport owns, and writes the acks
  already asked for before it closes;
* handlers are called inline, one delivery after another (see ``Handler``);
* ``progress`` grows with every answer from the broker;
* a lock (``try_lock``) is held by one connection at a time, and only once within it;
  it is let go by ``unlock`` or when its connection closes or dies, and a holding lost
  with its connection stays lost (``holds_lock``) even once the transport reconnected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from audiostream.errors import TransportError
from audiostream.topology import Topology


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class LockToken:
    """One holding of a lock, as ``try_lock`` hands it out.

    Compared by identity: a holding lost with its connection is never mistaken for a
    later holding of the same name (by another session of the same gateway, say), so
    its ``unlock`` cannot let go of that one. ``lost`` is set when the transport learns
    the holding is gone, so a holder waiting on something else can stop at once."""

    name: str
    lost: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class Delivery(Protocol):
    """One delivered message; must be settled exactly once."""

    @property
    def body(self) -> bytes: ...

    @property
    def redelivered(self) -> bool: ...

    def ack(self) -> Awaitable[None]:
        """Settle the delivery; the ack is requested now (so ``close()`` right after
        does not lose it) and the awaitable resolves once it is written."""
        ...

    async def reject(self) -> None:
        """Refuse the message for good: it is dead-lettered, not requeued."""
        ...

    async def release(self) -> None:
        """Give the message back to its queue (in place) for another consumer."""
        ...


Handler = Callable[[Delivery], Awaitable[None] | None]
"""Called inline for each delivery, in order. A handler that has to wait returns an
awaitable, which the transport runs as a task it owns (cancelled on ``close()``);
one that returns None costs no task at all."""


class Subscription(Protocol):
    async def cancel(self) -> None:
        """Stop new deliveries (as ``basic.cancel``).

        Deliveries already handed to the handler stay settleable; those still
        unsettled go back to their queue when the transport closes.
        """
        ...


@runtime_checkable
class Transport(Protocol):
    topology: Topology

    @property
    def is_connected(self) -> bool: ...

    @property
    def progress(self) -> int:
        """Answers from the broker so far (publish confirms, deliveries, replies to
        requests): the stall watchdog's evidence that the broker is alive however
        late our own event loop runs (``gateway/watchdog.py``)."""
        ...

    async def connect(self) -> None: ...

    async def close(self) -> None:
        """Cancel consumers and owned tasks; unacked deliveries go back to their queue."""
        ...

    async def declare(self) -> None:
        """Declare exchanges, work queues and the dead-letter path (idempotent)."""
        ...

    async def publish_work(self, processing: str, shard: int, body: bytes, *, ttl: float) -> None:
        """Publish to ``processing``'s exchange; return when confirmed.

        ``ttl`` is in seconds (> 0): the message is dropped if not delivered by then.
        Raises ``TransportError`` when the broker refuses or is unreachable.
        """
        ...

    async def consume_work(
        self, processing: str, handler: Handler, *, prefetch: int
    ) -> Subscription:
        """Consume every shard of ``processing``; at most ``prefetch`` unacked per shard."""
        ...

    async def declare_reply_queue(self, name: str) -> None: ...

    async def consume_replies(
        self, name: str, handler: Handler, *, lock: LockToken | None = None
    ) -> Subscription:
        """Consume a reply queue. ``lock``: the holding this consumer reads under (a
        takeover's); after a reconnect that lost it the consumer is not restored, so it
        never reads beside the lock's next holder. Without, it is restored like any."""
        ...

    async def publish_reply(self, queue: str, body: bytes) -> bool:
        """Publish to a reply queue; False when the queue no longer exists."""
        ...

    async def publish_replies(
        self, replies: Sequence[tuple[str, bytes]]
    ) -> list[bool | TransportError]:
        """Publish many ``(queue, body)`` replies at once, each confirmed, in order.

        Per reply: True when confirmed, False when its queue no longer exists, or the
        ``TransportError`` that refused it. Raises ``TransportError`` when none could
        be sent (broker unreachable, no confirms in time).
        """
        ...

    async def delete_reply_queue(self, name: str) -> None: ...

    async def reply_queue_exists(self, name: str) -> bool:
        """Whether the queue exists; like a passive declare, it renews its expiry lease."""
        ...

    async def reply_queue_stats(self, name: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of a reply queue, or None if it does not exist.

        Like ``reply_queue_exists`` it renews the expiry lease.
        """
        ...

    async def work_queue_depth(self, processing: str) -> int:
        """Ready (not unacked) messages over all shards of ``processing``."""
        ...

    async def try_lock(self, name: str) -> LockToken | None:
        """Take the lock ``name`` if no connection holds it, this one included: its token
        when taken, None at once when held. The broker enforces it across connections
        (gateways); it is held until ``unlock`` or until this connection closes or drops
        (a robust connection that reconnects does not get it back), so a gateway that
        dies holds none. A refused attempt disturbs nothing else on the connection."""
        ...

    def holds_lock(self, token: LockToken) -> bool:
        """Whether the holding ``token`` is still ours: False once unlocked, or once the
        connection it was taken on closed or dropped, even if the transport reconnected
        since. The broker has let the lock go then, and another taker may hold it."""
        ...

    async def unlock(self, token: LockToken) -> None:
        """Let go of a holding taken with ``try_lock`` (nothing if it is let go already,
        or lost with its connection: the lock may be another's by now). A cancelled
        caller does not cut it short."""
        ...


@runtime_checkable
class DeadLetterProbe(Protocol):
    """A transport with a dead-letter queue whose depth can be read (RabbitMQ)."""

    async def dead_letter_depth(self) -> int | None:
        """Messages in the dead-letter queue, or None when it does not exist."""
        ...
