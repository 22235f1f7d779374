"""RabbitMQ transport: the ``Transport`` contract over aio-pika.

This is the only module that imports aio-pika; every aio-pika, aiormq, pamqp
and socket exception is converted here into ``TransportError`` (retryable) or
``ConfigError`` (a declaration that contradicts what the broker already has).

Channels, and why there are several kinds:

* **publish**: one channel with publisher confirms and ``on_return_raises``;
  every ``publish_*`` awaits only its own confirm, so concurrent callers
  overlap on the wire. ``publish_replies`` writes a whole batch at once.
* acks asked for in one event-loop turn, on every channel, go out in one write.

Those two batched writes use aiormq 7's channel internals (its confirm registry, write
queue and ``ChannelFrame``), hence the ``aiormq>=7.2,<8`` pin; the RabbitMQ tests cover them.
* **work consumers**: one channel per ``consume_work`` subscription, with a
  per-consumer QoS (quorum queues refuse global QoS). Cancelling is a
  ``basic.cancel``: deliveries already handed out can still be settled, and the
  channel closes once they are (closing returns whatever is left unacked).
* **reply consumers**: a few channels (``reply_channels``, 4) shared by every
  ``consume_replies``, each subscription on one of them in turn. A channel answers one
  request at a time, so on a single shared channel the consumes and cancels of a burst
  of starting and ending sessions queued behind each other: at three times the held
  load a start took seconds.
* **throwaway**: declarations and passive probes run on short-lived channels,
  because a failed passive declare (404) or an inequivalent redeclare (406)
  closes the channel it ran on.

All of these are plain (non-robust) channels on a robust connection. aio-pika
10's robust channels reopen themselves after a channel error, and an operation
issued during that reopen can make the broker close the whole connection
(``504 CHANNEL_ERROR - expected 'channel.open'``). So the connection
reconnects by itself, and this module reopens its own channels: the publish
channel on next use, consumer channels in one owned restore task that runs
whenever a consumer channel closes while its subscription is still wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aio_pika
import aiormq
import pamqp.exceptions
import pamqp.frame
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from yarl import URL

from audiostream.errors import ConfigError, TransportError
from audiostream.topology import Topology
from audiostream.transport.base import Delivery, Handler, LockToken, Subscription

__all__ = ["QueueProbe", "RabbitTransport", "TopologyProbe", "declare_topology",
           "probe_topology"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Everything aio-pika and the layers below it raise for broker or network trouble.
#: ``ChannelInvalidStateError`` is a ``RuntimeError``; ``TimeoutError`` is an ``OSError``.
_BROKER_ERRORS: Final[tuple[type[BaseException], ...]] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    pamqp.exceptions.PAMQPException,
    OSError,
    RuntimeError,
)

#: Per-consumer prefetch of the shared reply channels (a reply is settled quickly).
DEFAULT_REPLY_PREFETCH = 1000
#: Reply channels the sessions' consumers are spread over (see the module docstring).
DEFAULT_REPLY_CHANNELS = 4
#: How long a reply queue we declared or found counts as existing without a probe (at
#: most a quarter of its ``x-expires``) ...
SEEN_FRESH_S: Final = 1.0
#: ... and how many such names are kept before the stale ones are dropped.
SEEN_QUEUES_MAX: Final = 4096


def _redact(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return "<unparseable url>"
    return str(parsed.with_password("***")) if parsed.password else str(parsed)


def _reason(exc: BaseException) -> str:
    """A short description of a broker exception (its reply text when it has one)."""
    if isinstance(exc, aiormq.exceptions.AMQPError) and exc.args:
        first = exc.args[0]
        text = getattr(first, "reply_text", None)
        return str(text) if text else str(first)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _RabbitDelivery:
    """One delivery from RabbitMQ; settled exactly once.

    Built from aiormq's ``DeliveredMessage`` directly: aio-pika's ``IncomingMessage``
    (property objects, header decoding, a channel wrapper) cost a tenth of a gateway's
    CPU at 25 sessions, for fields this transport never reads.
    """

    __slots__ = ("_dispatch", "_message", "_settled", "_subscription")

    def __init__(
        self, message: DeliveredMessage, subscription: _Subscription, dispatch: _Dispatch
    ) -> None:
        self._message = message
        self._subscription = subscription
        self._dispatch = dispatch
        self._settled = False

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def delivery_count(self) -> int:
        """Earlier deliveries of this message (quorum queues count them; 0 otherwise)."""
        count = (self._message.header.properties.headers or {}).get("x-delivery-count", 0)
        return count if isinstance(count, int) else 0

    @property
    def redelivered(self) -> bool:
        delivery = self._message.delivery
        again = isinstance(delivery, aiormq.spec.Basic.Deliver) and bool(delivery.redelivered)
        return again or self.delivery_count > 0

    def ack(self) -> asyncio.Future[None]:
        """Joins this turn's ack write (``_Dispatch``); the future resolves once written."""
        tag = self._claim()
        try:
            return self._dispatch.ack(tag)
        finally:
            self._subscription.settled(self)

    async def reject(self) -> None:
        """Reject without requeue: the queue's dead-letter exchange receives it."""
        await self._settle(requeue=False)

    async def release(self) -> None:
        """``basic.nack(requeue=True)``: back to the head of its queue.

        On a quorum queue this counts as a delivery attempt (``x-delivery-limit``).
        Like every settlement it is not confirmed by the broker.
        """
        await self._settle(requeue=True)

    def _claim(self) -> int:
        if self._settled:
            raise TransportError("delivery already settled")
        self._settled = True
        tag = self._message.delivery_tag
        if tag is None:
            self._subscription.settled(self)
            raise TransportError("the delivery has no delivery tag")
        return tag

    async def _settle(self, *, requeue: bool) -> None:
        tag = self._claim()
        how = "release" if requeue else "reject"
        try:
            await self._dispatch.refuse(tag, requeue=requeue)
        except _BROKER_ERRORS as exc:
            raise TransportError(
                f"could not {how} a delivery ({_reason(exc)}); the broker will redeliver it"
            ) from exc
        finally:
            self._subscription.settled(self)


class _Dispatch:
    """Deliveries and acks of one aiormq channel.

    aiormq starts a task per delivery and writes each ack as its own ``send()``; at one
    reply per chunk that is most of a gateway's per-reply overhead. Here the channel's
    deliver hook calls the consumer inline (a handler that needs to wait returns an
    awaitable, which becomes a task the transport owns), and the acks asked for in one
    event-loop turn leave in one write from one end-of-turn callback of the transport
    (``_AckWriter``, for every channel at once): per channel a single ``multiple=True``
    ack when every earlier delivery of the channel is settled, one frame per tag
    otherwise. ``drain`` writes what is pending before a channel closes, so an ack asked
    for just before ``close()`` is not lost.

    This replaces aiormq 7's ``Channel._on_deliver_frame`` on one channel instance and
    reads content with its ``_read_content``/``__get_content_header`` (pinned
    ``aiormq>=7.2,<8``; the RabbitMQ tests cover it).
    """

    __slots__ = ("__weakref__", "_acks", "_channel", "_sent", "_transport", "_unsettled",
                 "_writes", "consumers")

    def __init__(self, channel: aiormq.Channel, transport: RabbitTransport) -> None:
        self._channel = channel
        self._transport = transport
        self.consumers: dict[str, Callable[[DeliveredMessage], None]] = {}
        self._unsettled: dict[int, None] = {}
        """Delivery tags handed out and not yet settled on the wire, in delivery order."""
        self._acks: list[int] = []
        self._sent: list[asyncio.Future[None]] = []
        self._writes: set[asyncio.Task[None]] = set()
        channel._on_deliver_frame = self._on_deliver_frame  # type: ignore[method-assign]
        transport._dispatches.add(self)

    @classmethod
    def of(cls, channel: aiormq.Channel, transport: RabbitTransport) -> _Dispatch:
        """The channel's dispatch (a reply channel is shared by many subscriptions)."""
        hook = getattr(channel._on_deliver_frame, "__self__", None)
        return hook if isinstance(hook, _Dispatch) else cls(channel, transport)

    async def _on_deliver_frame(self, frame: aiormq.spec.Basic.Deliver) -> None:
        channel = self._channel
        header = await _read_header(channel)
        message = await channel._read_content(frame, header)
        tag = frame.delivery_tag
        if tag is None:
            log.warning("delivery %r has no delivery tag", frame)
            return
        self._unsettled[tag] = None
        consumer = self.consumers.get(frame.consumer_tag or "")
        if consumer is None:  # its consumer is gone: give it back untouched
            self._transport.progress += 1
            self._spawn_write(self.refuse(tag, requeue=True))
            return
        consumer(message)

    # -- acks ----------------------------------------------------------------------
    def ack(self, tag: int) -> asyncio.Future[None]:
        """One future per caller: cancelling one does not cancel its batch."""
        sent: asyncio.Future[None] = self._channel.loop.create_future()
        sent.add_done_callback(_retrieve)
        self._sent.append(sent)
        self._acks.append(tag)
        self._transport._acks.due(self)
        return sent

    def flush(self) -> None:
        """Write the pending acks now (every channel's: the order of this channel's
        acks and a reject or release that follows them is kept)."""
        self._transport._acks.flush()

    def take(self) -> tuple[bytes, list[asyncio.Future[None]]] | None:
        """The pending acks as frames, with their callers' futures; None when there are
        none or the channel closed (then the callers are told)."""
        tags, sent = self._acks, self._sent
        if not tags:
            return None
        self._acks, self._sent = [], []
        channel = self._channel
        try:
            if channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
            return self._marshal_acks(tags), sent
        except _BROKER_ERRORS as exc:
            _chain_failure(sent, exc)
            return None

    def _marshal_acks(self, tags: list[int]) -> bytes:
        unsettled = self._unsettled
        for tag in tags:
            unsettled.pop(tag, None)
        last = max(tags)
        number = self._channel.number
        if not unsettled or next(iter(unsettled)) > last:
            # Every earlier delivery is settled: one frame acks them all.
            return pamqp.frame.marshal(
                aiormq.spec.Basic.Ack(delivery_tag=last, multiple=True), number)
        return b"".join(pamqp.frame.marshal(aiormq.spec.Basic.Ack(delivery_tag=tag), number)
                        for tag in tags)

    async def refuse(self, tag: int, *, requeue: bool) -> None:
        """Reject or release one delivery, after this turn's acks (their order on the
        wire is what lets an ack be ``multiple``)."""
        self.flush()
        channel = self._channel
        try:
            if requeue:
                await channel.basic_nack(tag, requeue=True)
            else:
                await channel.basic_reject(tag, requeue=False)
        finally:
            self._unsettled.pop(tag, None)

    def _spawn_write(self, write: Coroutine[Any, Any, Any]) -> None:
        task = self._channel.loop.create_task(_quietly(write))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def drain(self) -> None:
        """Write what is pending before the channel closes."""
        self.flush()
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    # -- handlers ------------------------------------------------------------------
    def own(self, result: Awaitable[None], queues: list[str]) -> None:
        """Run a handler's awaitable as a task the transport owns (cancelled on close)."""
        task = asyncio.ensure_future(result)
        tasks = self._transport._handler_tasks
        tasks.add(task)

        def done(task: asyncio.Future[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("handler for %s failed; its delivery stays unsettled", queues,
                          exc_info=task.exception())

        task.add_done_callback(done)


class _AckWriter:
    """One end-of-turn write of the acks every channel of the transport asked for in
    that turn. The channels share one connection, whose writer sends each queued frame
    with its own ``send()``: a write per channel per turn cost a gateway with four reply
    channels about 7 % more CPU per session than one channel."""

    def __init__(self) -> None:
        self._due: dict[_Dispatch, None] = {}
        self._scheduled = False

    def due(self, dispatch: _Dispatch) -> None:
        self._due[dispatch] = None
        if not self._scheduled:
            self._scheduled = True
            # Runs after what is ready in this turn, so their acks join this write.
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        due, self._due = self._due, {}
        # Channels of a connection that was replaced write to its old queue (and fail).
        writes: dict[asyncio.Queue[Any], tuple[_Dispatch, list[bytes],
                                               list[asyncio.Future[None]]]] = {}
        for dispatch in due:
            taken = dispatch.take()
            if taken is None:
                continue
            _, payloads, sent = writes.setdefault(
                dispatch._channel.write_queue, (dispatch, [], []))
            payloads.append(taken[0])
            sent.extend(taken[1])
        for dispatch, payloads, sent in writes.values():
            channel = dispatch._channel
            drained = channel.create_future()
            frame = ChannelFrame(payload=b"".join(payloads), should_close=False,
                                 drain_future=drained)
            try:
                channel.write_queue.put_nowait(frame)
            except asyncio.QueueFull:  # the writer is behind: queue it in order
                dispatch._spawn_write(channel.write_queue.put(frame))
            drained.add_done_callback(functools.partial(_chain, sent=sent))


#: aiormq 7's private reader of a delivery's content header (name-mangled).
_read_header: Final[Callable[[aiormq.Channel], Awaitable[ContentHeader]]] = getattr(  # noqa: B009
    aiormq.Channel, "_Channel__get_content_header")


async def _quietly(write: Awaitable[Any]) -> None:
    with contextlib.suppress(*_BROKER_ERRORS):
        await write


def _chain(done: asyncio.Future[Any], sent: list[asyncio.Future[None]]) -> None:
    """Pass a write's outcome to every ack waiting on it."""
    if done.cancelled():
        _chain_failure(sent, aiormq.exceptions.ChannelInvalidStateError(
            "the channel closed before the acks were written"))
    elif (exc := done.exception()) is not None:
        _chain_failure(sent, exc)
    else:
        for waiter in sent:
            if not waiter.done():
                waiter.set_result(None)


def _chain_failure(sent: list[asyncio.Future[None]], exc: BaseException) -> None:
    for waiter in sent:
        if not waiter.done():
            waiter.set_exception(TransportError(
                f"could not ack a delivery ({_reason(exc)}); the broker will redeliver it"))


async def _queue_write(channel: aiormq.Channel, payload: bytes) -> asyncio.Future[Any]:
    """Hand marshalled frames to aiormq's connection writer as one socket write; the
    future returned resolves once the socket took them (backpressure)."""
    drained = channel.create_future()
    await channel.write_queue.put(
        ChannelFrame(payload=payload, should_close=False, drain_future=drained))
    return drained


async def _unused_consumer(_message: DeliveredMessage) -> None:
    """aiormq wants a callback per consumer; ``_Dispatch`` delivers instead."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a shared outcome as seen even when every waiter was cancelled."""
    if not future.cancelled():
        future.exception()


class _Subscription:
    """Consumers of one ``consume_work``/``consume_replies`` call.

    Knows how to (re)start itself, so the transport can restore it after a
    reconnect or after the broker closed its channel.
    """

    def __init__(
        self,
        transport: RabbitTransport,
        queues: list[str],
        handler: Handler,
        *,
        prefetch: int | None,
        lock: LockToken | None = None,
    ) -> None:
        self._transport = transport
        self.lock = lock
        """The holding this consumer reads under (``consume_replies``)."""
        self.queues = queues
        self._handler = handler
        self._prefetch = prefetch  # None: consume on a shared reply channel ...
        self._reply_slot = transport._take_reply_channel() if prefetch is None else 0
        """... this one, for the subscription's life (restores too)."""
        self.channel: AbstractChannel | None = None
        self._consumers: list[tuple[aiormq.abc.AbstractChannel, str]] = []
        self._unsettled: set[_RabbitDelivery] = set()
        self._dispatch: _Dispatch | None = None
        self._closing_task: asyncio.Task[None] | None = None
        self.cancelled = False
        self._cancelled_by_broker = False

    @property
    def is_reply(self) -> bool:
        return self._prefetch is None

    @property
    def healthy(self) -> bool:
        return (
            self.channel is not None
            and not self.channel.is_closed
            and not self._cancelled_by_broker
        )

    async def start(self) -> None:
        """Open (or join) a channel and start one consumer per queue."""
        t = self._transport
        if self._prefetch is not None:
            await self._close_channel()  # a broken predecessor: returns what it held
        self._consumers = []
        self._cancelled_by_broker = False
        self._unsettled = set()  # deliveries of a previous channel cannot be settled here
        if self._prefetch is None:
            channel = await t._reply_channel(self._reply_slot)
        else:
            channel = await t._open_channel()
            try:
                await channel.set_qos(prefetch_count=self._prefetch)  # per consumer
            except BaseException:
                await _close_quietly(channel)
                raise
        self.channel = channel
        try:
            underlay = await channel.get_underlay_channel()
            if not isinstance(underlay, aiormq.Channel):  # what aio-pika 10 hands out
                raise TransportError(f"unexpected AMQP channel type {type(underlay)!r}")
            dispatch = self._dispatch = _Dispatch.of(underlay, t)
            for name in self.queues:
                tag = f"ctag{underlay.number}.{uuid.uuid4().hex}"
                dispatch.consumers[tag] = self._on_message
                self._consumers.append((underlay, tag))
                ok = await self._request(underlay.basic_consume(
                    name, _unused_consumer, consumer_tag=tag, no_ack=False),
                    f"consuming {name!r}")
                if ok.consumer_tag != tag:
                    raise TransportError(f"the broker gave another consumer tag for {name!r}")
        except BaseException:
            if self._prefetch is not None:
                await _close_quietly(channel)
            else:
                await self._cancel_consumers()
            raise
        if self._prefetch is not None:
            channel.close_callbacks.add(self._on_channel_closed)
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    def _on_channel_closed(self, _sender: object, _exc: BaseException | None) -> None:
        if not self.cancelled:
            self._transport._schedule_restore()

    def _on_broker_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        """The broker cancelled a consumer (its queue was deleted): start over.

        Runs inside the channel's frame reader, so it must not wait on the channel:
        the restore task reopens the subscription, retrying until the queue is back.
        """
        if not self.cancelled and any(tag == frame.consumer_tag for _, tag in self._consumers):
            log.warning("the broker cancelled consuming %s; restarting", self.queues)
            self._cancelled_by_broker = True
            self._transport._schedule_restore()

    def _on_message(self, message: DeliveredMessage) -> None:
        """Called inline by the channel's ``_Dispatch``: no task unless the handler
        returns an awaitable."""
        dispatch = self._dispatch
        tag = message.delivery_tag
        assert dispatch is not None and tag is not None
        self._transport.progress += 1
        if self.cancelled or self._transport._closing:
            # Sent by the broker before it processed our cancel: give it back untouched.
            dispatch._spawn_write(dispatch.refuse(tag, requeue=True))
            return
        delivery = _RabbitDelivery(message, self, dispatch)
        self._unsettled.add(delivery)
        try:
            result = self._handler(delivery)
        except Exception:
            log.exception("handler for %s failed; its delivery stays unsettled", self.queues)
            return
        if result is not None:
            dispatch.own(result, self.queues)

    def settled(self, delivery: _RabbitDelivery) -> None:
        self._unsettled.discard(delivery)
        # Closing waits for the pending acks to be written (``_close_channel``).
        if (self.cancelled and not self._unsettled and not self.is_reply
                and self._closing_task is None):
            task = asyncio.get_running_loop().create_task(self._close_channel())
            self._closing_task = task
            tasks = self._transport._closing_tasks
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _request(self, call: Awaitable[T], what: str) -> T:
        """One request on this subscription's channel, within ``op_timeout``. On the
        shared reply channels it is never cut short (``_on_reply_channel``); a work
        subscription's own channel may be closed by a timed-out one."""
        t = self._transport
        if self.is_reply:
            return await t._on_reply_channel(call, what)
        return await asyncio.wait_for(call, t.op_timeout)

    async def _cancel_consumers(self) -> None:
        consumers, self._consumers = self._consumers, []
        for underlay, tag in consumers:
            with contextlib.suppress(*_BROKER_ERRORS, TransportError):
                await self._request(underlay.basic_cancel(tag), f"cancelling consumer {tag}")
            # Deliveries still in flight for this tag are refused by the dispatch.
            if self._dispatch is not None:
                self._dispatch.consumers.pop(tag, None)

    async def _close_channel(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            if self._dispatch is not None:
                await self._dispatch.drain()
            await _close_quietly(channel)

    async def cancel(self) -> None:
        """Stop new deliveries; the ones handed out stay settleable.

        Unsettled deliveries return to their queue when the transport closes (a
        work subscription closes its own channel as soon as the last is settled).
        """
        if self.cancelled:
            return
        self.cancelled = True
        # Drop the handler (a session's bound method): the ack bookkeeping of a closed
        # channel can outlive the subscription, and must not keep the session alive.
        self._handler = _no_handler
        self._transport._subscriptions.discard(self)
        await self._cancel_consumers()
        if not self.is_reply and not self._unsettled:
            await self._close_channel()


class _ExpectedCancels(logging.Filter):
    """aiormq logs a WARNING whenever the broker cancels a consumer. When we deleted the
    consumed queue ourselves (``delete_reply_queue``) that is expected, and a warning per
    finished session would bury real ones: those records are dropped, by consumer tag."""

    _MSG = "Consumer %r cancelled by the broker on %r"
    _KEEP_S = 60.0  # a tag whose cancel never came is forgotten after this

    def __init__(self) -> None:
        super().__init__()
        self._tags: dict[str, float] = {}

    def expect(self, tags: Iterable[str]) -> None:
        now = time.monotonic()
        self._tags = {t: at for t, at in self._tags.items() if at > now}
        self._tags.update((t, now + self._KEEP_S) for t in tags)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self._MSG or not isinstance(record.args, tuple) or not record.args:
            return True
        return self._tags.pop(str(record.args[0]), None) is None


_EXPECTED_CANCELS = _ExpectedCancels()
logging.getLogger("aiormq.channel").addFilter(_EXPECTED_CANCELS)


def _no_handler(_delivery: Delivery) -> None:
    """A cancelled subscription's handler: deliveries after a cancel are nacked before
    they would reach it (``_on_message``), so it never runs; plain, since a handler may
    return None."""


async def _close_quietly(channel: AbstractChannel) -> None:
    if channel.is_closed:
        return
    with contextlib.suppress(*_BROKER_ERRORS):
        await channel.close()


def _reply_outcome(queue: str, outcome: object) -> bool | TransportError:
    """One confirm of ``publish_replies``: routed, returned (the queue is gone) or refused."""
    if isinstance(outcome, aiormq.spec.Basic.Ack):
        return True
    if isinstance(outcome, aiormq.exceptions.PublishError):
        return False  # Basic.Return: the queue is gone
    if isinstance(outcome, aiormq.exceptions.DeliveryError):
        return TransportError(f"the broker refused the reply to {queue!r} ({outcome})")
    reason = _reason(outcome) if isinstance(outcome, BaseException) else repr(outcome)
    return TransportError(f"publish to reply queue {queue!r} failed: {reason}")


class RabbitTransport:
    """The ``Transport`` contract on RabbitMQ (3.10+) via one robust connection.

    ``connect_timeout`` bounds the first connection (TCP and AMQP handshake);
    ``op_timeout`` bounds one publish confirm, declaration or probe;
    ``reconnect_interval`` is the pause between reconnection attempts;
    ``connection_name`` is what the management UI and ``rabbitmqctl`` show.
    """

    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        connect_timeout: float = 10.0,
        op_timeout: float = 10.0,
        reconnect_interval: float = 1.0,
        reply_prefetch: int = DEFAULT_REPLY_PREFETCH,
        reply_channels: int = DEFAULT_REPLY_CHANNELS,
        connection_name: str = "audiostream",
    ) -> None:
        if reply_channels < 1:
            raise ValueError("reply_channels must be >= 1")
        self.topology = topology
        self._url = url
        self.connect_timeout = connect_timeout
        self.op_timeout = op_timeout
        """Timeout of one broker operation (a publish confirm, a declare, a probe)."""
        self._reconnect_interval = reconnect_interval
        self._reply_prefetch = reply_prefetch
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._publish: AbstractChannel | None = None
        self._reply_ids = 0
        self._reply_frames: dict[str, bytes] = {}
        self._reply_frames_of: object = None
        self._replies: list[AbstractChannel | None] = [None] * reply_channels
        """The reply channels, opened on first use; each subscription takes the next."""
        self._next_reply_channel = 0
        self._acks = _AckWriter()
        self._channel_lock = asyncio.Lock()
        self._channels: weakref.WeakSet[AbstractChannel] = weakref.WeakSet()
        self._subscriptions: set[_Subscription] = set()
        self._handler_tasks: set[asyncio.Future[Any]] = set()
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self._reply_calls: set[asyncio.Future[Any]] = set()
        self._dispatches: weakref.WeakSet[_Dispatch] = weakref.WeakSet()
        self._restore_task: asyncio.Task[None] | None = None
        self._locks: dict[str, tuple[LockToken, aiormq.abc.AbstractConnection | None]] = {}
        """Locks this transport holds or is taking (``try_lock``), each with the AMQP
        connection its exclusive queue was declared on (None while taking): the broker lets
        the owner of an exclusive queue declare it again, so the exclusion within one
        connection is ours. A lock whose connection closed was deleted by the broker with
        it, however soon the robust connection came back (``holds_lock``)."""
        self._lost_locks: weakref.WeakSet[LockToken] = weakref.WeakSet()
        """Holdings lost with their connection: consumers taken under one stay down."""
        self._unlocking: dict[str, asyncio.Task[None]] = {}
        self._seen: dict[str, float] = {}
        """Reply queues this transport declared or found, with when (monotonic): a
        ``consume_replies`` soon after needs no probe of its own (``_known_to_exist``)."""
        self._closing = False
        self.progress = 0
        """Answers from the broker so far: publish confirms (and returns or nacks),
        deliveries, opened channels and queue declarations (the stall watchdog's
        evidence, gateway/watchdog.py)."""

    def __repr__(self) -> str:
        return f"<RabbitTransport {_redact(self._url)} connected={self.is_connected}>"

    # -- connection ------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        conn = self._connection
        return conn is not None and not conn.is_closed and conn.connected.is_set()

    async def connect(self) -> None:
        if self._connection is not None:
            return
        self._closing = False
        try:
            self._connection = await aio_pika.connect_robust(
                self._url,
                timeout=self.connect_timeout,
                reconnect_interval=self._reconnect_interval,
                client_properties={"connection_name": self._connection_name},
            )
        except _BROKER_ERRORS as exc:
            raise TransportError(
                f"cannot connect to RabbitMQ at {_redact(self._url)}: {_reason(exc)}"
            ) from exc
        self._connection.reconnect_callbacks.add(self._on_reconnect)

    async def close(self) -> None:
        """Cancel consumers and owned tasks, close channels and the connection.

        Unacked deliveries go back to their queues when the connection closes.
        """
        self._closing = True
        if self._restore_task is not None:
            self._restore_task.cancel()
            await asyncio.gather(self._restore_task, return_exceptions=True)
            self._restore_task = None
        self._subscriptions.clear()
        current = asyncio.current_task()  # close() may run inside a handler
        tasks = [t for t in self._handler_tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._handler_tasks.clear()
        # Acks asked for up to now are written before their channels close.
        await asyncio.gather(*(d.drain() for d in list(self._dispatches)))
        await asyncio.gather(*self._closing_tasks, return_exceptions=True)
        # A consume or cancel still waiting on a reply channel holds its lock, and the
        # channel's close would queue behind it for as long as the broker is silent.
        for call in list(self._reply_calls):
            call.cancel()
        # Channels closed one by one finish their close callbacks before we return
        # (a connection close would leave them running); unacked deliveries go back.
        await asyncio.gather(*(_close_quietly(c) for c in list(self._channels)))
        self._publish = None
        self._replies = [None] * len(self._replies)
        self._locks.clear()  # the broker deletes the exclusive queues with the connection
        conn, self._connection = self._connection, None
        if conn is not None:
            with contextlib.suppress(*_BROKER_ERRORS):
                await conn.close()
        await asyncio.gather(*self._reply_calls, return_exceptions=True)

    def _require_connection(self) -> AbstractRobustConnection:
        conn = self._connection
        if conn is None or self._closing:
            raise TransportError("RabbitMQ transport is not connected")
        if not self.is_connected:
            raise TransportError(
                f"RabbitMQ connection to {_redact(self._url)} is down (reconnecting)"
            )
        return conn

    async def _open_channel(
        self, *, confirms: bool = False, on_return_raises: bool = False
    ) -> AbstractChannel:
        """A plain channel on the robust connection (never reopened by aio-pika)."""
        conn = self._require_connection()
        channel = aio_pika.Channel(
            conn, publisher_confirms=confirms, on_return_raises=on_return_raises
        )
        await channel.initialize(timeout=self.op_timeout)
        self.progress += 1
        self._channels.add(channel)
        return channel

    @contextlib.asynccontextmanager
    async def _throwaway(self, what: str) -> AsyncIterator[AbstractChannel]:
        """A channel for one declaration or probe; broker errors become TransportError.

        Its open and close are never cut short by a cancelled caller (a session closed
        mid-probe): aiormq answers a cancelled ``channel.open`` or ``channel.close`` by
        abandoning the channel half way, and the broker then closes the whole
        connection (504 ``expected 'channel.open'``), failing every session on it. A
        cancelled caller leaves the channel to an owned task that opens and closes it.
        """
        opening = asyncio.ensure_future(self._open_channel())
        try:
            channel = await asyncio.shield(opening)
        except asyncio.CancelledError:
            self._own_closing(self._close_when_open(opening))
            raise
        except _BROKER_ERRORS as exc:
            raise TransportError(f"{what}: cannot open a channel ({_reason(exc)})") from exc
        try:
            yield channel
        except _BROKER_ERRORS as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # aiormq may answer a cancelled call with the error of the channel it
                # closed for it: the caller was cancelled, and must see that.
                raise asyncio.CancelledError from exc
            raise TransportError(f"{what}: {_reason(exc)}") from exc
        finally:
            closing = asyncio.ensure_future(_close_quietly(channel))
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                self._own_closing(closing)
                raise

    def _own_closing(self, work: Awaitable[None]) -> None:
        """Finish ``work`` in a task ``close()`` waits for."""
        task = asyncio.ensure_future(work)
        self._closing_tasks.add(task)
        task.add_done_callback(self._closing_tasks.discard)

    @staticmethod
    async def _close_when_open(opening: asyncio.Future[AbstractChannel]) -> None:
        with contextlib.suppress(*_BROKER_ERRORS):
            await _close_quietly(await opening)

    async def _on_reply_channel(self, call: Awaitable[T], what: str) -> T:
        """A request on a reply channel the sessions share, never cut short.

        aiormq answers a timed-out or cancelled request by closing its channel, and the
        broker may then close the whole connection (504 ``expected 'channel.open'``):
        every session on this gateway lost its replies because one start waited too
        long. That happened at three times the load a gateway holds, when the consumes
        and cancels of 200 starting and ending sessions queued for the channel's one
        lock past ``op_timeout``. So the request runs to its end in a task of ours,
        untimed, until ``close()`` cancels it; the caller stops waiting after
        ``op_timeout`` (``TransportError``) or when it is cancelled.
        """
        task = asyncio.ensure_future(call)
        self._reply_calls.add(task)
        task.add_done_callback(self._reply_calls.discard)
        task.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.op_timeout)
        except TimeoutError as exc:
            raise TransportError(f"{what}: no answer within {self.op_timeout:g} s "
                                 "(the request goes on)") from exc
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.cancelled() and caller is not None and not caller.cancelling():
                # The request was cancelled under us (the transport closing), not we.
                raise TransportError(f"{what}: the transport closed") from None
            raise

    async def _publish_channel(self) -> AbstractChannel:
        channel = self._publish
        if channel is not None and not channel.is_closed:
            return channel
        async with self._channel_lock:
            if self._publish is None or self._publish.is_closed:
                self._publish = await self._open_channel(confirms=True, on_return_raises=True)
            return self._publish

    def _take_reply_channel(self) -> int:
        """The reply channel the next subscription uses: each in turn."""
        slot = self._next_reply_channel
        self._next_reply_channel = (slot + 1) % len(self._replies)
        return slot

    async def _reply_channel(self, slot: int) -> AbstractChannel:
        channel = self._replies[slot]
        if channel is not None and not channel.is_closed:
            return channel
        async with self._channel_lock:
            channel = self._replies[slot]
            if channel is None or channel.is_closed:
                channel = await self._open_channel()
                try:
                    await channel.set_qos(prefetch_count=self._reply_prefetch)
                except BaseException:
                    await _close_quietly(channel)
                    raise
                channel.close_callbacks.add(self._on_reply_channel_closed)
                self._replies[slot] = channel
            return channel

    # -- restoring consumers -----------------------------------------------------------
    def _on_reply_channel_closed(self, _sender: object, _exc: BaseException | None) -> None:
        if any(s.is_reply for s in self._subscriptions):
            self._schedule_restore()

    def _on_reconnect(self, _connection: object) -> None:
        self._schedule_restore()  # which first forgets the locks lost with the connection

    def _schedule_restore(self) -> None:
        if self._closing or self._connection is None:
            return
        if self._restore_task is None or self._restore_task.done():
            self._restore_task = asyncio.get_running_loop().create_task(
                self._restore(), name="audiostream-rabbitmq-restore"
            )

    async def _restore(self) -> None:
        """Restart every wanted subscription whose channel is gone, until all run."""
        while not self._closing and self._connection is not None:
            await self._connection.ready()
            self._forget_lost_locks()
            broken = [s for s in list(self._subscriptions) if not s.healthy and not s.cancelled
                      and (s.lock is None or s.lock not in self._lost_locks)]
            if not broken:
                return
            failed = False
            for sub in broken:
                try:
                    if sub.is_reply:
                        # The queue may have expired while we were away; the session lives on.
                        for name in sub.queues:
                            await self.declare_reply_queue(name)
                    await sub.start()
                except Exception as exc:  # keep restoring the others; retry this one later
                    failed = True
                    log.warning("could not restore consumers of %s: %s", sub.queues, exc)
                else:
                    log.info("restored consumers of %s", sub.queues)
            if failed:
                await asyncio.sleep(self._reconnect_interval)

    # -- declarations ------------------------------------------------------------------
    async def declare(self) -> None:
        """Declare exchanges, work queues and the dead-letter path (idempotent)."""
        t = self.topology
        async with self._throwaway("declaring the topology") as ch:
            dlx = await _declare_exchange(ch, t.dead_letter_exchange)
            dlq = await _declare_queue(
                ch, t.dead_letter_queue, durable=True, arguments=t.dead_letter_queue_arguments()
            )
            await dlq.bind(dlx, "#", timeout=self.op_timeout)
            for ptype in t.processing_types:
                exchange = await _declare_exchange(ch, t.exchange(ptype))
                for shard in range(t.shards):
                    queue = await _declare_queue(
                        ch,
                        t.work_queue(ptype, shard),
                        durable=True,
                        arguments=t.work_queue_arguments(),
                    )
                    await queue.bind(
                        exchange, t.routing_key(ptype, shard), timeout=self.op_timeout
                    )

    async def declare_reply_queue(self, name: str) -> None:
        """Create (or renew the lease of) a classic reply queue with ``x-expires``."""
        async with self._throwaway(f"declaring reply queue {name!r}") as ch:
            await _declare_queue(
                ch, name, durable=False, arguments=self.topology.reply_queue_arguments()
            )
        self._saw(name)

    async def delete_reply_queue(self, name: str) -> None:
        """Delete it, even while we consume it (a finished session does, so a taker never
        finds it unconsumed): the broker then cancels our consumer, as expected."""
        _EXPECTED_CANCELS.expect(tag for s in self._subscriptions if s.is_reply
                                 and name in s.queues for _, tag in s._consumers)
        self._seen.pop(name, None)
        async with self._throwaway(f"deleting reply queue {name!r}") as ch:
            await ch.queue_delete(name, timeout=self.op_timeout)

    async def _queue_stats(self, name: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of ``name``, or None when it does not exist.

        A passive declare: exact and cheap, and it renews an ``x-expires`` lease.
        """
        async with self._throwaway(f"probing queue {name!r}") as ch:
            try:
                queue = await ch.declare_queue(name, passive=True, timeout=self.op_timeout)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self.progress += 1
                return None
            self.progress += 1
            self._saw(name)
            result = queue.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)

    def _saw(self, name: str) -> None:
        now = time.monotonic()
        if len(self._seen) >= SEEN_QUEUES_MAX:  # declared and never consumed: forget
            horizon = now - self._seen_fresh_s()
            self._seen = {n: at for n, at in self._seen.items() if at > horizon}
        self._seen[name] = now

    def _seen_fresh_s(self) -> float:
        return min(SEEN_FRESH_S, self.topology.reply_expires_ms / 4000)

    def _known_to_exist(self, name: str) -> bool:
        """Declared or found by us moments ago. A reply queue lives ``x-expires`` past
        its last use and only its session deletes it earlier, so it still exists: a new
        session's start then skips the probe (a channel opened, a passive declare, the
        channel closed: three broker round trips of its seven)."""
        at = self._seen.pop(name, None)
        return at is not None and time.monotonic() - at < self._seen_fresh_s()

    async def reply_queue_exists(self, name: str) -> bool:
        """Passive declare: note that it renews the queue's ``x-expires`` lease."""
        return await self._queue_stats(name) is not None

    async def reply_queue_stats(self, name: str) -> tuple[int, int] | None:
        return await self._queue_stats(name)

    async def try_lock(self, name: str) -> LockToken | None:
        """An exclusive queue named ``name``, declared on a throwaway channel: the broker
        lets one connection have it (another gets RESOURCE_LOCKED, which closes only
        that channel) and deletes it when the connection closes or drops."""
        pending = self._unlocking.get(name)
        if pending is not None:  # our own unlock of it still deleting the queue
            await asyncio.shield(pending)
        self._forget_lost_locks()
        if name in self._locks:
            return None
        token = LockToken(name)
        self._locks[name] = (token, None)
        answered = False
        try:
            async with self._throwaway(f"taking lock {name!r}") as ch:
                try:
                    await ch.declare_queue(name, durable=False, exclusive=True,
                                           auto_delete=False, timeout=self.op_timeout)
                except aiormq.exceptions.ChannelLockedResource:
                    answered = True
                    del self._locks[name]
                    self.progress += 1
                    return None
                underlay = await ch.get_underlay_channel()
                # If this connection dropped since the declare, the lock is lost already.
                self._locks[name] = (token, underlay.connection)
            answered = True
            self.progress += 1
            return token
        finally:
            if not answered:
                if self._locks.get(name, (None,))[0] is token:
                    del self._locks[name]
                # A cancelled or failed declare may still have made the queue: never
                # leave it to lock other gateways out until this connection closes.
                # (Deleting another connection's exclusive queue is refused.)
                self._start_unlock(name)

    def holds_lock(self, token: LockToken) -> bool:
        held = self._locks.get(token.name)
        if held is None or held[0] is not token:
            return False
        connection = held[1]
        return connection is not None and not connection.is_closed

    def _forget_lost_locks(self) -> None:
        """Drop the records of locks whose connection closed: the broker deleted their
        queues, so they neither refuse a new ``try_lock`` nor get deleted by ``unlock``
        (the name may be another connection's lock by now)."""
        for name in [n for n, (_, conn) in self._locks.items()
                     if conn is not None and conn.is_closed]:
            log.warning("lock %s was lost with its broker connection", name)
            token = self._locks.pop(name)[0]
            self._lost_locks.add(token)
            token.lost.set()

    async def unlock(self, token: LockToken) -> None:
        if token in self._lost_locks:
            # A consumer kept down for it is no longer a takeover's: if it still runs
            # (the takeover ended before it saw the loss), it is a session's own again.
            self._lost_locks.discard(token)
            self._schedule_restore()
        held = self._locks.get(token.name)
        if held is None or held[0] is not token:
            return
        del self._locks[token.name]
        connection = held[1]
        if connection is None or connection.is_closed:
            return  # lost with its connection: the broker deleted it already
        await asyncio.shield(self._start_unlock(token.name))

    def _start_unlock(self, name: str) -> asyncio.Task[None]:
        """Delete lock ``name`` in a task ``close()`` waits for."""
        task = self._unlocking.get(name)
        if task is None:
            task = asyncio.ensure_future(self._drop_lock(name))
            self._unlocking[name] = task
            self._closing_tasks.add(task)
            task.add_done_callback(self._closing_tasks.discard)
        return task

    async def _drop_lock(self, name: str) -> None:
        try:
            async with self._throwaway(f"releasing lock {name!r}") as ch:
                with contextlib.suppress(aiormq.exceptions.ChannelLockedResource,
                                         aiormq.exceptions.ChannelNotFoundEntity):
                    await ch.queue_delete(name, timeout=self.op_timeout)
        except TransportError as exc:
            if self._connection is not None and not self._closing:
                log.warning("could not release lock %s (%s); the broker releases it when "
                            "this connection closes", name, exc)
        finally:
            self._unlocking.pop(name, None)

    async def work_queue_depth(self, processing: str) -> int:
        stats = await asyncio.gather(
            *(self._queue_stats(q) for q in self.topology.work_queues(processing))
        )
        return sum(s[0] for s in stats if s is not None)

    async def dead_letter_depth(self) -> int | None:
        stats = await self._queue_stats(self.topology.dead_letter_queue)
        return None if stats is None else stats[0]

    # -- publishing --------------------------------------------------------------------
    async def publish_work(self, processing: str, shard: int, body: bytes, *, ttl: float) -> None:
        """The gateway's hot path (one bundle per publish): straight to the aiormq channel
        under aio-pika's, as ``publish_reply`` does, skipping ``Exchange.publish`` (a
        ``Message`` object, its property copy and a UUID message id per publish). The
        confirm is awaited as before; aiormq's exceptions are converted here."""
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        if processing not in self.topology.processing_types:
            # Publishing to a missing exchange would close the publish channel.
            raise TransportError(f"unknown processing type {processing!r}")
        exchange = self.topology.exchange(processing)
        routing_key = self.topology.routing_key(processing, shard)
        self._reply_ids += 1
        properties = aiormq.spec.Basic.Properties(
            delivery_mode=1,  # not persistent
            expiration=str(max(1, int(ttl * 1000))),  # milliseconds on the wire
            message_id=f"w{self._reply_ids}",
        )
        try:
            channel = await self._publish_channel()
            underlay = await channel.get_underlay_channel()
            result = await underlay.basic_publish(
                body, exchange=exchange, routing_key=routing_key, properties=properties,
                mandatory=True, timeout=self.op_timeout,
            )
            self.progress += 1
        except aiormq.exceptions.PublishError:
            self.progress += 1
            result = None  # Basic.Return: no queue is bound for this routing key
        except aiormq.exceptions.DeliveryError as exc:
            self.progress += 1
            raise TransportError(f"the broker refused the message ({exc})") from exc
        except _BROKER_ERRORS as exc:
            raise TransportError(
                f"publish to exchange {exchange!r} with key {routing_key!r} failed: "
                f"{_reason(exc)}"
            ) from exc
        if result is None or isinstance(result, aiormq.abc.DeliveredMessage):
            raise TransportError(
                f"no queue is bound for {processing!r} shard {shard} "
                f"(run 'audiostream topology declare' with this topology)"
            )

    async def publish_reply(self, queue: str, body: bytes) -> bool:
        """The hot path of a worker (one reply per session message): straight to the
        aiormq channel under aio-pika's, with a counter as message id (aiormq matches
        returns by it; otherwise it draws a UUID per message). The confirm is awaited
        as before. 11 % less CPU per reply than ``Exchange.publish``
        (``benchmarks/reply_publish.py``, docs/benchmarks.md)."""
        self._reply_ids += 1
        properties = aiormq.spec.Basic.Properties(
            delivery_mode=1, message_id=f"r{self._reply_ids}"
        )
        try:
            channel = await self._publish_channel()
            underlay = await channel.get_underlay_channel()
            result = await underlay.basic_publish(
                body, exchange="", routing_key=queue, properties=properties,
                mandatory=True, timeout=self.op_timeout,
            )
            self.progress += 1
        except aiormq.exceptions.PublishError:
            self.progress += 1
            return False  # Basic.Return: the queue is gone
        except aiormq.exceptions.DeliveryError as exc:
            self.progress += 1
            raise TransportError(f"the broker refused the reply ({exc})") from exc
        except _BROKER_ERRORS as exc:
            raise TransportError(
                f"publish to reply queue {queue!r} failed: {_reason(exc)}"
            ) from exc
        return not isinstance(result, aiormq.abc.DeliveredMessage)

    async def publish_replies(
        self, replies: Sequence[tuple[str, bytes]]
    ) -> list[bool | TransportError]:
        """A worker's batch of replies as one socket write and one wait.

        Per reply, aiormq's ``basic_publish`` takes the channel lock, marshals three
        frames, queues them, waits for the writer to drain and then for the confirm:
        about 190 µs of CPU here. This takes the lock once, reuses each reply queue's
        marshalled ``basic.publish`` frame, and registers the confirms exactly as
        aiormq does (so returns and acks are matched by aiormq's own reader): about
        a third of the CPU (``benchmarks/reply_publish.py``, docs/benchmarks.md).
        """
        if not replies:
            return []
        try:
            channel = await self._publish_channel()
            underlay = await channel.get_underlay_channel()
            if not isinstance(underlay, aiormq.Channel):  # what aio-pika 10 hands out
                raise TransportError(f"unexpected AMQP channel type {type(underlay)!r}")
            ids, confirms = await self._write_replies(underlay, replies)
        except _BROKER_ERRORS as exc:
            raise TransportError(
                f"publishing {len(replies)} replies failed: {_reason(exc)}"
            ) from exc
        waiting = [c for c in confirms if isinstance(c, asyncio.Future)]
        try:
            async with asyncio.timeout(self.op_timeout):
                outcomes = iter(await asyncio.gather(*waiting, return_exceptions=True))
            self.progress += len(waiting)
        except TimeoutError as exc:
            raise TransportError(
                f"no confirm for {len(waiting)} replies within {self.op_timeout:g} s"
            ) from exc
        finally:
            for message_id in ids:
                underlay.message_id_delivery_tag.pop(message_id, None)
        return [c if isinstance(c, TransportError) else _reply_outcome(queue, next(outcomes))
                for (queue, _), c in zip(replies, confirms, strict=True)]

    async def _write_replies(
        self, underlay: aiormq.Channel, replies: Sequence[tuple[str, bytes]]
    ) -> tuple[list[str], list[asyncio.Future[Any] | TransportError]]:
        """Register a confirm per reply (as aiormq's ``basic_publish``) and queue all
        frames at once; on failure before the write, undo the registrations."""
        number = underlay.number
        if self._reply_frames_of is not underlay or len(self._reply_frames) > 10_000:
            self._reply_frames = {}  # channel numbers differ after a reopen
            self._reply_frames_of = underlay
        max_body = underlay.max_content_size
        ids: list[str] = []
        confirms: list[asyncio.Future[Any] | TransportError] = []
        parts: list[bytes] = []
        async with underlay.lock:
            first_tag = underlay.delivery_tag + 1
            try:
                for queue, body in replies:
                    method = self._reply_frames.get(queue)
                    if method is None:
                        try:
                            method = pamqp.frame.marshal(aiormq.spec.Basic.Publish(
                                exchange="", routing_key=queue, mandatory=True), number)
                        except (TypeError, ValueError) as exc:  # pamqp: over 255 bytes
                            confirms.append(TransportError(
                                f"invalid reply queue name {queue[:80]!r}...: {exc}"))
                            continue
                        self._reply_frames[queue] = method
                    self._reply_ids += 1
                    message_id = f"r{self._reply_ids}"
                    header = ContentHeader(0, len(body), aiormq.spec.Basic.Properties(
                        delivery_mode=1, message_id=message_id))
                    parts += (method, pamqp.frame.marshal(header, number))
                    for start in range(0, len(body), max_body):
                        parts.append(pamqp.frame.marshal(
                            ContentBody(body[start:start + max_body]), number))
                    underlay.delivery_tag += 1
                    future = underlay.create_future()
                    underlay.confirmations[underlay.delivery_tag] = future
                    underlay.message_id_delivery_tag[message_id] = underlay.delivery_tag
                    ids.append(message_id)
                    confirms.append(future)
                if not parts:
                    return ids, confirms
                drained = await _queue_write(underlay, b"".join(parts))
            except BaseException:
                # Nothing reached the writer: give the sequence numbers back.
                for tag in range(first_tag, underlay.delivery_tag + 1):
                    underlay.confirmations.pop(tag, None)
                for message_id in ids:
                    underlay.message_id_delivery_tag.pop(message_id, None)
                for confirm in confirms:
                    if isinstance(confirm, asyncio.Future):
                        confirm.cancel()
                underlay.delivery_tag = first_tag - 1
                raise
            try:
                await drained  # backpressure: the socket took the frames
            except BaseException:
                for message_id in ids:
                    underlay.message_id_delivery_tag.pop(message_id, None)
                raise
        return ids, confirms

    # -- consuming ---------------------------------------------------------------------
    async def consume_work(
        self, processing: str, handler: Handler, *, prefetch: int
    ) -> Subscription:
        """Consume every shard of ``processing``; at most ``prefetch`` unacked per shard."""
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        if processing not in self.topology.processing_types:
            raise TransportError(f"unknown processing type {processing!r}")
        sub = _Subscription(
            self, self.topology.work_queues(processing), handler, prefetch=prefetch
        )
        await self._start(sub, f"consuming {processing!r}")
        return sub

    async def consume_replies(
        self, name: str, handler: Handler, *, lock: LockToken | None = None
    ) -> Subscription:
        # Probe first: a consume on a missing queue would close a shared reply channel.
        if not self._known_to_exist(name) and not await self.reply_queue_exists(name):
            raise TransportError(f"reply queue {name!r} does not exist")
        sub = _Subscription(self, [name], handler, prefetch=None, lock=lock)
        await self._start(sub, f"consuming replies from {name!r}")
        return sub

    async def _start(self, sub: _Subscription, what: str) -> None:
        self._require_connection()
        try:
            await sub.start()
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TransportError(f"{what}: {_reason(exc)} (is the topology declared?)") from exc
        except _BROKER_ERRORS as exc:
            raise TransportError(f"{what}: {_reason(exc)}") from exc
        self._subscriptions.add(sub)


async def _declare_exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    try:
        return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise ConfigError(
            f"exchange {name!r} already exists with different settings ({_reason(exc)}); "
            f"it must be a durable topic exchange: delete it "
            f"(rabbitmqctl delete_exchange {name}) and declare the topology again"
        ) from exc


async def _declare_queue(
    channel: AbstractChannel, name: str, *, durable: bool, arguments: dict[str, Any]
) -> AbstractQueue:
    try:
        return await channel.declare_queue(
            name, durable=durable, exclusive=False, auto_delete=False, arguments=arguments
        )
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise ConfigError(
            f"queue {name!r} already exists with different arguments ({_reason(exc)}); "
            f"this topology wants {arguments}. Either run with the settings it was "
            f"declared with, or delete it (rabbitmqctl delete_queue {name}; its messages "
            f"are lost) and declare the topology again"
        ) from exc


async def declare_topology(url: str, topology: Topology) -> None:
    """Declare ``topology`` on the broker at ``url`` (``audiostream topology declare``)."""
    transport = RabbitTransport(url, topology, connection_name="audiostream-declare")
    await transport.connect()
    try:
        await transport.declare()
    finally:
        await transport.close()



@dataclass(frozen=True, slots=True)
class QueueProbe:
    name: str
    messages: int | None
    """Ready messages; None when the queue does not exist."""
    consumers: int


@dataclass(frozen=True, slots=True)
class TopologyProbe:
    """What ``probe_topology`` found: which exchanges exist, and each queue's state."""

    exchanges: dict[str, bool]
    queues: tuple[QueueProbe, ...]


async def probe_topology(url: str, topology: Topology) -> TopologyProbe:
    """Passively look up every exchange and queue of ``topology`` (``healthcheck --broker``).

    Nothing is created; each lookup gets its own channel, because RabbitMQ closes a
    channel on a 404. Consumer counts show whether workers are attached.
    """
    try:
        conn = await aio_pika.connect(url, client_properties={"connection_name":
                                                              "audiostream-healthcheck"})
    except _BROKER_ERRORS as exc:
        raise TransportError(f"cannot connect to RabbitMQ at {_redact(url)}: {_reason(exc)}"
                             ) from exc
    try:
        exchanges: dict[str, bool] = {}
        for name in [*map(topology.exchange, topology.processing_types),
                     topology.dead_letter_exchange]:
            channel = await conn.channel()
            try:
                await channel.declare_exchange(name, passive=True)
                exchanges[name] = True
            except aiormq.exceptions.ChannelNotFoundEntity:
                exchanges[name] = False
            finally:
                await _close_quietly(channel)
        queues: list[QueueProbe] = []
        for name in [*(q for p in topology.processing_types for q in topology.work_queues(p)),
                     topology.dead_letter_queue]:
            channel = await conn.channel()
            try:
                result = (await channel.declare_queue(name, passive=True)).declaration_result
                queues.append(QueueProbe(name, int(result.message_count or 0),
                                         int(result.consumer_count or 0)))
            except aiormq.exceptions.ChannelNotFoundEntity:
                queues.append(QueueProbe(name, None, 0))
            finally:
                await _close_quietly(channel)
        return TopologyProbe(exchanges, tuple(queues))
    except _BROKER_ERRORS as exc:
        raise TransportError(f"probing {_redact(url)}: {_reason(exc)}") from exc
    finally:
        with contextlib.suppress(*_BROKER_ERRORS):
            await conn.close()


async def delete_topology(url: str, topology: Topology) -> None:
    """Delete the exchanges and work queues of ``topology`` (test and benchmark teardown).

    Missing objects are skipped: each deletion gets its own channel, because RabbitMQ
    closes a channel on a 404.
    """
    try:
        conn = await aio_pika.connect(url)
    except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
        raise TransportError(f"cannot reach {_redact(url)}: {_reason(exc)}") from exc

    async def attempt(action: str, name: str) -> None:
        channel = await conn.channel()
        with contextlib.suppress(aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException):
            await getattr(channel, action)(name)
        await _close_quietly(channel)

    try:
        for ptype in topology.processing_types:
            for queue in topology.work_queues(ptype):
                await attempt("queue_delete", queue)
            await attempt("exchange_delete", topology.exchange(ptype))
        await attempt("queue_delete", topology.dead_letter_queue)
        await attempt("exchange_delete", topology.dead_letter_exchange)
    finally:
        await conn.close()
