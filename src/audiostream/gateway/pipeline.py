"""Per-session message flow between the gateway and the broker.

The send policy (one message in flight, coalescing, deadlines, the backlog cap) is
the pure ``Coalescer`` (``gateway/coalescer.py``); this module drives it with one
timer per session and does the I/O. The gateway's ``WorkBundler`` then packs the
messages of many sessions into one broker message. Every accepted chunk ends as
audio or a drop notice: a reply, a deadline, or a publish failure settles it.

The reply queue doubles as the session's journal (``gateway/journal.py``): replies
stay unacked until the client confirms it holds their outcomes, or, for a client
that never acks, until they were written to its socket and the journal is over its
cap (the newest one always stays, for its state). If the gateway dies or drains,
they return to the queue, and the gateway that takes the session over
(``take_over``) replays what the client missed and continues from the newest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from enum import Enum
from typing import Any

from audiostream.audio import AudioFormat
from audiostream.bundler import WorkBundler
from audiostream.envelope import (
    Control,
    Reply,
    ReplyStatus,
    Step,
    WorkEnvelope,
    decode_reply_queue_message,
    encode_control,
)
from audiostream.errors import AudioStreamError, AuthError, ErrorCode, TransportError
from audiostream.gateway.budget import BudgetPolicy, LoadBudget
from audiostream.gateway.coalescer import (
    FLIGHT_EXPIRED,
    MAX_MESSAGE_BYTES,
    CoalescePolicy,
    Coalescer,
    Message,
    Outcome,
)
from audiostream.gateway.journal import MAX_JOURNAL, Journal, JournalEntry
from audiostream.metrics import GatewayMetrics
from audiostream.transport.base import Delivery, LockToken, Subscription, Transport

__all__ = [
    "MAX_BACKLOG",
    "MAX_COALESCE",
    "MAX_JOURNAL",
    "CoalescePolicy",
    "Outcome",
    "OutcomeSink",
    "SessionPhase",
    "SessionPipeline",
    "reply_outcomes",
]

log = logging.getLogger(__name__)

#: Most chunks carried by one message.
MAX_COALESCE = 50
#: Most chunks waiting for a session before new ones are refused as overloaded.
MAX_BACKLOG = 1000
#: Message ids are ``generation << GEN_SHIFT | counter``.
GEN_SHIFT = 32
DISPLACE = "displace"
RELEASED = "released"
#: Why a takeover with a token that is not newer than the holder's fails.
HELD_BY_NEWER = "this session is held with this resume token or a newer one"
REFUSED = "refused"
#: The holder's answer to a takeover once the session's summary exists: it is ending.
ENDED = "ended"
#: A holder's mark in its own reply queue, kept unacked while it holds the session: if
#: the holder dies, the broker hands it to the next taker with its generation.
HELD = "held"
#: After our displace message comes back, how long to wait for a closing holder's
#: "released" (a holder that died never sends one).
RELEASE_GRACE_S = 0.5
#: How often a taker asks again for a session's takeover lock that another one holds.
LOCK_POLL_S = 0.02
#: Why a takeover fails whose lock went with a dropped broker connection (retryable: the
#: journal is handed back whole, and the next attempt takes the lock afresh).
LOCK_LOST = ("the broker connection dropped during the takeover, and the session's "
             "takeover lock with it; resume again")


OutcomeSink = Callable[[list[Outcome]], None]


class SessionPhase(Enum):
    NEW = "new"
    TAKING_OVER = "taking_over"
    """Reading the journal a previous holder left (``take_over``)."""
    LIVE = "live"
    CLOSED = "closed"


def reply_outcomes(reply: Reply, seqs: list[int]) -> list[Outcome]:
    """Per-chunk outcomes of a reply covering ``seqs`` (its chunks, in order)."""
    if reply.status is ReplyStatus.OK and reply.chunk_count == len(seqs):
        events: dict[int, list[Mapping[str, Any]]] = {}
        for ev in reply.events:
            events.setdefault(int(ev.get("seq", seqs[0])), []).append(ev)
        outcomes = []
        pos = 0
        fb = reply.format.frame_bytes
        for seq, frames in zip(seqs, reply.chunk_frames, strict=True):
            data = reply.audio[pos : pos + frames * fb]
            pos += frames * fb
            outcomes.append(Outcome(seq, audio=data, events=tuple(events.get(seq, ()))))
        return outcomes
    if reply.status is ReplyStatus.OK:
        code, message = ErrorCode.PROCESSING_FAILED, "reply does not match the message"
    else:
        code = ErrorCode(reply.error_code or ErrorCode.PROCESSING_FAILED)
        message = reply.error_message or str(reply.status)
        if reply.error_step:
            message = f"{reply.error_step}: {message}"
    return [Outcome(seq, code=code, message=message) for seq in seqs]


async def _gather_quietly(waits: list[Awaitable[None]]) -> None:
    await asyncio.gather(*waits, return_exceptions=True)


class _Outage:
    """Publish failures of one session during one broker outage: logged once when it
    starts and once, with counts, when it ends (or the session closes)."""

    __slots__ = ("chunks", "first_error", "messages")

    def __init__(self) -> None:
        self.messages = 0
        self.chunks = 0
        self.first_error = ""

    def failed(self, session_id: str, chunks: int, err: AudioStreamError) -> None:
        if self.messages == 0:
            self.first_error = str(err)
            log.warning("session=%s stage=publish: cannot publish (%s); chunks are answered "
                        "broker_unavailable until the broker is back", session_id, err)
        self.messages += 1
        self.chunks += chunks

    def ended(self, session_id: str, how: str) -> None:
        if self.messages:
            log.warning("session=%s stage=publish: %s after %d failed messages "
                        "(%d chunks answered broker_unavailable; first error: %s)",
                        session_id, how, self.messages, self.chunks, self.first_error)
            self.messages = self.chunks = 0


class SessionPipeline:
    def __init__(
        self,
        *,
        session_id: str,
        transport: Transport,
        pipeline: tuple[Step, ...],
        fmt: AudioFormat,
        deadline_s: float,
        sink: OutcomeSink,
        metrics: GatewayMetrics | None = None,
        generation: int = 0,
        state: Mapping[str, bytes] | None = None,
        on_displaced: Callable[[], None] | None = None,
        ending: Callable[[], bool] | None = None,
        bundler: WorkBundler,
        linger_s: float = 0.0,
        coalesce_fraction: float = 0.5,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        policy: CoalescePolicy | None = None,
        journal_cap: int = MAX_JOURNAL,
        budget: LoadBudget | None = None,
    ) -> None:
        self.session_id = session_id
        self.transport = transport
        self.bundler = bundler  # the gateway's, shared by all its sessions
        self.pipeline = pipeline
        self.format = fmt
        self.deadline_s = deadline_s
        if policy is None:
            policy = CoalescePolicy(max_chunks=MAX_COALESCE, max_backlog=MAX_BACKLOG,
                                    max_message_bytes=max_message_bytes,
                                    linger_s=max(0.0, linger_s),
                                    budget_fraction=max(0.0, coalesce_fraction))
        # The gateway's (shared by all its sessions); alone, one that never coalesces.
        self.budget = budget or LoadBudget(BudgetPolicy(coalesce_above=0))
        # Steps (with parameters: a model variant changes the floor) and format.
        floor_key = (tuple((st.name, repr(sorted(st.params.items()))) for st in pipeline),
                     fmt)
        self.coalescer = Coalescer(deadline_s=deadline_s, policy=policy,
                                   first_msg_id=generation << GEN_SHIFT,
                                   reply_floor=self.budget.reply_floor(floor_key))
        self.linger_s = max(0.0, min(policy.linger_s, deadline_s / 2))
        self.sink = sink
        self.metrics = metrics
        self.reply_queue = transport.topology.reply_queue(session_id)
        self.state: dict[str, bytes] = dict(state or {})
        self.generation = generation
        self.on_displaced = on_displaced
        self.ending = ending
        """True once the session's summary exists: a takeover is refused (``ENDED``),
        never half served from a journal about to be deleted."""
        self.nonce = uuid.uuid4().hex
        self.journal = Journal(journal_cap)
        self.phase = SessionPhase.NEW
        self._history: list[JournalEntry] = []
        self._seen_own_displace = asyncio.Event()
        self._seen_released = asyncio.Event()
        self._refused = asyncio.Event()
        self._lock: LockToken | None = None
        """Our holding of the session's takeover lock, while ``take_over`` runs."""
        self._ended = False
        """A takeover was refused because the session is ending (``ENDED``)."""
        self._held: Delivery | None = None
        """Our ``HELD`` mark, unacked while we hold the session (``mark_held``)."""
        self._held_generation = -1
        """The generation our ``HELD`` mark carries (-1: none)."""
        self._held_arrived = asyncio.Event()
        self._finishing = False
        """``close(finished=True)`` runs: the reply queue is about to be deleted."""
        self._newest_seen = 0
        """The newest generation known to have held the session: what a takeover saw in
        the journal (released markers, reply message ids; one not older than ours means
        our token is stale), then ours once a token of it was issued (``issued``)."""
        self._subscription: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._outage = _Outage()
        self._idle = asyncio.Event()
        self._idle.set()
        self.messages_published = 0

    async def open(self) -> None:
        await self.transport.declare_reply_queue(self.reply_queue)
        self._subscription = await self.transport.consume_replies(self.reply_queue, self._on_reply)
        self.phase = SessionPhase.LIVE

    async def take_over(self, *, settle_s: float = 5.0) -> list[Reply]:
        """Become the reply queue's only consumer and read the journal a previous
        holder left: returns its replies (deduplicated, by seq) and keeps them unacked.

        One taker at a time, on any gateway: two that read the journal at once would
        each get part of it (the broker shares a queue's messages among its consumers).
        The session's takeover lock (``Transport.try_lock``, an exclusive queue on
        RabbitMQ) serialises them; the next taker then finds the winner holding the
        session and is refused by the generation rule like any other (a same-token
        twin is not newer). The lock dies with a gateway that dies.

        It also dies with a broker connection that drops and comes back: another taker
        may read the journal from then on (our consumer, taken under the lock, is not
        restored). Such a takeover fails (``LOCK_LOST``, retryable) and hands back
        everything it read, as any failed takeover does."""
        t = self.transport
        lock = self._lock = await self._take_lock(f"{self.reply_queue}.lock", settle_s)
        try:
            return await self._take_over(settle_s)
        finally:
            self._lock = None
            await t.unlock(lock)

    async def _take_lock(self, lock: str, settle_s: float) -> LockToken:
        """Wait (up to ``settle_s``) while another taker holds the session's lock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle_s
        while (token := await self.transport.try_lock(lock)) is None:
            if loop.time() >= deadline:
                raise AudioStreamError("another connection is resuming this session",
                                       ErrorCode.RESUME_FAILED)
            # Polling the broker: nothing announces that another connection's lock is gone.
            await asyncio.sleep(LOCK_POLL_S)
        return token

    def _lock_held(self) -> bool:
        return self._lock is not None and self.transport.holds_lock(self._lock)

    async def _take_over(self, settle_s: float) -> list[Reply]:
        t = self.transport
        stats = await t.reply_queue_stats(self.reply_queue)
        if stats is None:
            raise AuthError("the session has expired (its reply queue is gone)",
                            ErrorCode.RESUME_FAILED)
        if stats[1]:
            # Someone holds the session (on any gateway): give it an inbox to refuse us
            # in, so a stale token is answered at once rather than after ``settle_s``.
            await self._wait_for_holder(settle_s, inbox=f"{self.reply_queue}.taker.{self.nonce}")
        else:
            await self._wait_for_holder(settle_s, inbox="")
        if not self._lock_held():  # nothing read yet: nothing to hand back
            raise TransportError(LOCK_LOST)
        # Read the journal until our own displace message comes back: the holder's
        # released replies were queued ahead of it. A holder that closed cleanly says
        # "released" when it has put everything back; one that died has nothing to say
        # (the broker requeued its replies when its connection dropped).
        self.phase = SessionPhase.TAKING_OVER
        self._history = []
        try:
            # Under the lock: a reconnect that loses it does not restore this consumer.
            self._subscription = await t.consume_replies(self.reply_queue, self._on_reply,
                                                         lock=self._lock)
        except TransportError:
            # The queue's x-expires lease can run out after the probe above: that is
            # an expired session, not a broker fault.
            if await t.reply_queue_stats(self.reply_queue) is None:
                raise AuthError("the session has expired (its reply queue is gone)",
                                ErrorCode.RESUME_FAILED) from None
            raise
        assert self._lock is not None
        try:
            released = asyncio.ensure_future(self._seen_released.wait())
            own = asyncio.ensure_future(self._seen_own_displace.wait())
            # A lock lost with the connection: no delivery can come (the consumer is
            # not restored), so stop now rather than at ``settle_s``.
            lost = asyncio.ensure_future(self._lock.lost.wait())
            try:
                done, _ = await asyncio.wait({released, own, lost}, timeout=settle_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise TimeoutError
                if released not in done and lost not in done:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(released), RELEASE_GRACE_S)
            finally:
                for waiter in (released, own, lost):
                    waiter.cancel()
        except TimeoutError:
            log.warning("session=%s stage=resume: journal may be incomplete (%d replies)",
                        self.session_id, len(self._history))
        lock_lost = not self._lock_held()
        if lock_lost and self._subscription is not None:
            # Stop reading first: what is still on its way goes back to the queue in
            # place, ahead of the copies ``close`` hands back below.
            with contextlib.suppress(AudioStreamError):
                await self._subscription.cancel()
        history, self._history = self._history, []
        if self.phase is SessionPhase.TAKING_OVER and not lock_lost:
            self.phase = SessionPhase.LIVE
        seen: set[int] = set()
        entries: list[JournalEntry] = []
        stray: list[Delivery] = []
        for entry in sorted(history, key=lambda e: (e.reply.seq, e.reply.msg_id)):
            if entry.reply.msg_id in seen or entry.reply.session_id != self.session_id:
                stray.append(entry.delivery)
                continue
            seen.add(entry.reply.msg_id)
            entries.append(entry)
        if lock_lost:
            # Another taker may have read part of the journal beside us: ours need not
            # be the whole of it, nor the generation it shows. Everything we read goes
            # back (duplicates too, which takers drop): strays to the queue, the journal
            # as copies with "released" (``close``, as for any failed takeover).
            log.warning("session=%s stage=resume: the takeover lock was lost with the "
                        "broker connection; handing back %d replies", self.session_id,
                        len(entries))
            for d in stray:
                with contextlib.suppress(AudioStreamError):
                    await d.release()
            self.journal = Journal(self.journal.cap, entries, max_bytes=self.journal.max_bytes)
            await self.close(finished=False)
            raise TransportError(LOCK_LOST)
        await self._ack(stray)
        # handed back by close() if refused
        self.journal = Journal(self.journal.cap, entries, max_bytes=self.journal.max_bytes)
        newest = max([self._newest_seen, *(e.reply.msg_id >> GEN_SHIFT for e in entries)])
        self._newest_seen = newest
        if newest >= self.generation:
            # A detached session last held with a newer token than ours.
            log.info("session=%s stage=resume: refused a takeover by generation %d (the "
                     "journal has %d)", self.session_id, self.generation, newest)
            raise AuthError(HELD_BY_NEWER, ErrorCode.RESUME_FAILED)
        if entries:
            self.state = dict(entries[-1].reply.state)
        return [e.reply for e in entries]

    async def _wait_for_holder(self, settle_s: float, *, inbox: str) -> None:
        """Ask whoever consumes the reply queue to let go, and wait until nobody does.
        A holder with a newer token refuses in ``inbox`` (if given)."""
        t = self.transport
        subscription: Subscription | None = None
        if inbox:
            await t.declare_reply_queue(inbox)
            subscription = await t.consume_replies(inbox, self._on_inbox)
        try:
            await t.publish_reply(self.reply_queue, encode_control(Control(
                self.session_id, DISPLACE, self.nonce, generation=self.generation,
                reply_to=inbox)))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + settle_s
            while True:
                if self._refused.is_set():
                    raise AuthError("the session has ended" if self._ended
                                    else HELD_BY_NEWER,
                                    ErrorCode.RESUME_FAILED)
                stats = await t.reply_queue_stats(self.reply_queue)
                if stats is None:
                    raise AuthError("the session's reply queue vanished during the takeover",
                                    ErrorCode.RESUME_FAILED)
                if stats[1] == 0:
                    return
                if loop.time() >= deadline:
                    raise AudioStreamError("the previous connection did not let the session go",
                                           ErrorCode.RESUME_FAILED)
                # Polling the broker for the consumer count; a refusal ends the wait early.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._refused.wait(), 0.02)
        finally:
            if subscription is not None:
                with contextlib.suppress(AudioStreamError):
                    await subscription.cancel()
                with contextlib.suppress(AudioStreamError):
                    await t.delete_reply_queue(inbox)

    async def _on_inbox(self, delivery: Delivery) -> None:
        await self._ack([delivery])
        try:
            msg = decode_reply_queue_message(delivery.body)
        except AudioStreamError:
            return
        if (isinstance(msg, Control) and msg.command in (REFUSED, ENDED)
                and msg.nonce == self.nonce):
            self._newest_seen = max(self._newest_seen, msg.generation)
            self._ended = msg.command == ENDED
            self._refused.set()

    async def mark_held(self) -> None:
        """Leave a generation in the journal while we hold the session: a ``HELD`` mark
        that we keep unacked. If this gateway dies, the broker returns it to the queue
        with the journal, and the next taker refuses tokens older than the mark (a holder
        that closes acks it and leaves "released" instead). Only once the takeover is
        sure to succeed: the mark raises the bar for older tokens.

        A mark says which generation was *issued* to the client. Before our ``ready``
        goes out, that is the token we were given (generation - 1), not ours: a gateway
        that dies between the mark and the ``ready`` leaves a client holding only that
        token, which must still resume. ``issued`` then replaces it with a mark of our
        generation. Generation 0 needs none: no token is older."""
        if self.generation == 0:
            return
        await self._mark(self.generation - 1)

    async def _mark(self, generation: int) -> None:
        """Publish a ``HELD`` mark of ``generation`` and wait until it is ours (on our own
        subscription: one broker round trip); the older mark it replaces is acked then."""
        if self._held is not None and self._held_generation >= generation:
            return
        await self.transport.publish_reply(self.reply_queue, encode_control(Control(
            self.session_id, HELD, self.nonce, generation=generation)))
        while self._held is None or self._held_generation < generation:
            self._held_arrived.clear()
            await self._held_arrived.wait()

    async def _mark_issued(self) -> None:
        try:
            await self._mark(self.generation)
        except AudioStreamError as err:
            log.warning("session=%s stage=resume: could not mark generation %d in the "
                        "journal (%s); until it is, a gateway death lets its previous "
                        "token resume the session", self.session_id, self.generation, err)

    def _on_own_mark(self, delivery: Delivery, generation: int) -> None:
        """Keep our newest mark unacked, ack any other (the one it replaces, or one the
        broker handed back after a reconnect)."""
        if self._held is None or generation >= self._held_generation:
            old, self._held, self._held_generation = self._held, delivery, generation
            self._held_arrived.set()
        else:
            old = delivery
        if old is not None:
            self._ack_now([old])

    @property
    def marked(self) -> int:
        """The generation our ``HELD`` mark in the journal carries (-1: none)."""
        return self._held_generation if self._held is not None else -1

    def issued(self) -> None:
        """A token of this generation went to the client: from now on the journal's
        "released" marker and ``HELD`` mark name it. (A takeover that fails before, e.g.
        on a bad ``received``, must not raise the bar for the token it was given.)"""
        self._newest_seen = max(self._newest_seen, self.generation)
        if self.generation and self.phase is SessionPhase.LIVE:
            self._spawn(self._mark_issued())

    async def _hand_back(self, delivery: Delivery) -> None:
        """Put a reply back for the next holder: a confirmed copy, then ack the original.

        Copies and the final "released" marker go out on one channel in order, so a
        taker that sees "released" has seen every copy. (A nack-requeue gives no such
        ordering against a publish.)
        """
        try:
            await self.transport.publish_reply(self.reply_queue, delivery.body)
        except AudioStreamError:
            with contextlib.suppress(AudioStreamError):
                await delivery.release()
            return
        await self._ack([delivery])

    @staticmethod
    async def _ack(deliveries: Iterable[Delivery]) -> None:
        """Ack together: the RabbitMQ transport sends one turn's acks in one write."""
        acks = [d.ack() for d in deliveries]
        if acks:
            await asyncio.gather(*acks, return_exceptions=True)

    def _ack_now(self, deliveries: Iterable[Delivery]) -> None:
        """Ask for acks without waiting: the transport writes them at the end of this
        turn (together with the turn's other acks). Only a delivery whose ack is not
        a future (a transport that acks in a coroutine) costs an owned task."""
        waits: list[Awaitable[None]] = []
        for d in deliveries:
            try:
                ack = d.ack()
            except AudioStreamError:
                continue  # already settled, or the channel is gone: nothing to do
            if not isinstance(ack, asyncio.Future):
                waits.append(ack)
        if waits:
            self._spawn(_gather_quietly(waits))

    def _settle(self, entries: list[JournalEntry]) -> None:
        if entries:
            self._ack_now([e.delivery for e in entries])

    # -- from the connection -------------------------------------------------------------
    def confirm(self, received: int) -> None:
        """The client holds every outcome before ``received``: forget those replies."""
        self._settle(self.journal.confirm(received))

    def delivered(self, written: int) -> None:
        """Every outcome before seq ``written`` is on the client's socket. Once the journal
        is over its cap, those replies count as delivered (a client that never acks)."""
        self._settle(self.journal.delivered(written))

    @property
    def journal_length(self) -> int:
        return len(self.journal)

    @property
    def outstanding(self) -> int:
        return self.coalescer.outstanding

    @property
    def queued_bytes(self) -> int:
        """Audio bytes of chunks waiting here or in flight (the connection's byte budget)."""
        return self.coalescer.queued_bytes

    async def wait_idle(self) -> None:
        """Until every submitted chunk has an outcome."""
        await self._idle.wait()

    def submit(self, seq: int, data: bytes, received_at: float) -> None:
        if self.phase is SessionPhase.CLOSED:
            return
        self.budget.note_chunk()
        refused = self.coalescer.add(seq, data, received_at)
        if refused:
            self._emit(refused)
            return
        self._idle.clear()
        self._drive()

    # -- sending ----------------------------------------------------------------------
    def _emit(self, outcomes: list[Outcome]) -> None:
        if outcomes:
            self.sink(outcomes)
        if self.coalescer.outstanding == 0:
            self._idle.set()

    def _drive(self) -> None:
        """Expire what is late, send what is due, re-arm the session's one timer."""
        if self.phase is SessionPhase.CLOSED:
            return
        co = self.coalescer
        now = time.time()
        co.set_floor(self.budget.floor, now)
        expired = co.tick(now)
        if expired:
            if expired[0].message == FLIGHT_EXPIRED:
                log.info("session=%s seq=%d stage=deadline: expired in the pipeline",
                         self.session_id, expired[0].seq)
            self._emit(expired)
        msg = co.take(now)
        if msg is not None:
            self._send(msg, now)
        elif co.outstanding == 0:
            self._idle.set()
        self._arm(co.due_at())

    def _arm(self, due: float | None) -> None:
        timer = self._timer
        if due is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        if timer is not None:
            if self._timer_at <= due:
                return  # fires first; _drive re-arms then
            timer.cancel()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, due - time.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._drive()

    def _send(self, msg: Message, now: float) -> None:
        chunks = msg.chunks
        if self.metrics is not None:
            self.metrics.stages["gateway_backlog"].observe(
                max(0.0, now - chunks[0].received_at)
            )
        fb = self.format.frame_bytes
        env = WorkEnvelope(
            session_id=self.session_id,
            msg_id=msg.msg_id,
            seq=chunks[0].seq,
            chunk_frames=tuple(len(c.data) // fb for c in chunks),
            received_at=chunks[0].received_at,
            deadline=msg.deadline,
            format=self.format,
            output_format=self.format,
            audio=b"".join(c.data for c in chunks),
            pipeline=self.pipeline,
            step_index=0,
            reply_to=self.reply_queue,
            state=dict(self.state),
            timings=(("gateway_rx", chunks[0].received_at), ("gateway_publish", now)),
        )
        self.bundler.submit(env, functools.partial(self._published, msg, now))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _published(self, msg: Message, started: float, err: AudioStreamError | None) -> None:
        """The bundle carrying ``msg`` was confirmed (``err`` None) or failed."""
        if self.phase is SessionPhase.CLOSED:
            return
        if err is not None:
            self._outage.failed(self.session_id, len(msg.chunks), err)
            failed = self.coalescer.failed(msg.msg_id, ErrorCode.BROKER_UNAVAILABLE,
                                           f"could not publish: {err}")
            if failed:
                self._emit(failed)
                self._drive()
            return
        self._outage.ended(self.session_id, "publishing again")
        self.messages_published += 1
        if self.metrics is not None:
            self.metrics.messages_published.inc()
            self.metrics.stages["gateway_to_broker"].observe(time.time() - started)

    # -- receiving -----------------------------------------------------------------------
    def _on_reply(self, delivery: Delivery) -> Awaitable[None] | None:
        """The reply queue's handler, called inline by the transport for every reply.

        The common path (a reply turned into outcomes, a control message) waits for
        nothing and returns None, so no task is made per reply; only handing a reply
        back after the close and refusing a stale taker wait on the broker, and those
        return their awaitable for the transport to run as a task it owns.
        """
        if self.phase is SessionPhase.CLOSED:
            return self._on_reply_closed(delivery)
        try:
            msg = decode_reply_queue_message(delivery.body)
        except AudioStreamError as err:
            flight = self.coalescer.in_flight
            log.error("session=%s seq=%d stage=reply: undecodable reply: %s", self.session_id,
                      flight.chunks[0].seq if flight is not None else -1, err)
            self._ack_now([delivery])
            return None
        if isinstance(msg, Control):
            if msg.command == HELD and msg.nonce == self.nonce:
                self._on_own_mark(delivery, msg.generation)  # unacked while we hold it
                return None
            self._ack_now([delivery])
            if msg.command == HELD:
                # A holder that died left it (a live one keeps its own unacked).
                self._newest_seen = max(self._newest_seen, msg.generation)
            elif self.phase is SessionPhase.TAKING_OVER:
                if msg.command == DISPLACE and msg.nonce == self.nonce:
                    self._seen_own_displace.set()
                elif msg.command == RELEASED and msg.nonce != self.nonce:
                    self._newest_seen = max(self._newest_seen, msg.generation)
                    self._seen_released.set()
            elif msg.command == DISPLACE and msg.nonce != self.nonce:
                if self.ending is not None and self.ending():
                    log.info("session=%s stage=resume: refused a takeover by generation %d: "
                             "the session is ending", self.session_id, msg.generation)
                    return self._refuse(msg, ENDED)
                if 0 < msg.generation <= self.generation:
                    # A taker holding an older resume token than ours (on any gateway):
                    # we keep the session and tell it so in its inbox, so it fails with
                    # resume_failed at once. (A taker without an inbox times out;
                    # generation 0: a gateway that predates generations, obeyed.)
                    log.info("session=%s stage=resume: refused a takeover by generation "
                             "%d (this holder has %d)", self.session_id, msg.generation,
                             self.generation)
                    return self._refuse(msg, REFUSED)
                log.info("session=%s stage=resume: taken over by another connection",
                         self.session_id)
                if self.on_displaced is not None:
                    self.on_displaced()
            return None
        if self.phase is SessionPhase.TAKING_OVER:
            self._history.append(JournalEntry(msg, delivery))
            return None
        if not self.handle_reply(msg):
            self._ack_now([delivery])
            return None
        trimmed = self.journal.append(JournalEntry(msg, delivery))
        if trimmed:
            self._ack_now([e.delivery for e in trimmed])
        return None

    async def _on_reply_closed(self, delivery: Delivery) -> None:
        """What arrives while closing. Finishing: nothing is handed on (the queue is being
        deleted) and a takeover is told the session ended. Otherwise everything goes back
        to the queue for whoever resumes the session, except our own ``HELD`` mark."""
        try:
            msg: Reply | Control | None = decode_reply_queue_message(delivery.body)
        except AudioStreamError:
            msg = None
        if self._finishing:
            await self._ack([delivery])
            if isinstance(msg, Control) and msg.command == DISPLACE and msg.nonce != self.nonce:
                await self._refuse(msg, ENDED)
            return
        if isinstance(msg, Control) and msg.command == HELD and msg.nonce == self.nonce:
            await self._ack([delivery])
            return
        await self._hand_back(delivery)

    async def _refuse(self, displace: Control, command: str) -> None:
        """Answer a takeover we do not yield to (``REFUSED`` or ``ENDED``) in its inbox."""
        # Only an inbox named after this session's queue: nothing else is written to.
        if not displace.reply_to.startswith(self.reply_queue + "."):
            return
        refusal = Control(self.session_id, command, displace.nonce, generation=self.generation)
        with contextlib.suppress(AudioStreamError):
            await self.transport.publish_reply(displace.reply_to, encode_control(refusal))

    def handle_reply(self, reply: Reply) -> bool:
        """Turn the awaited reply into outcomes; False for one that is not awaited."""
        if reply.session_id != self.session_id:
            return False
        msg = self.coalescer.answered(reply.msg_id, time.time())
        if msg is None:
            # A duplicate (redelivery after a worker crash) or a reply past its deadline.
            log.debug("session=%s: discarding reply for msg %d", self.session_id, reply.msg_id)
            return False
        self._observe(reply)
        if reply.status is ReplyStatus.OK:
            self.state = dict(reply.state)
        self._emit(reply_outcomes(reply, [c.seq for c in msg.chunks]))
        self._drive()
        return True

    def _observe(self, reply: Reply) -> None:
        if self.metrics is None:
            return
        now = time.time()
        if log.isEnabledFor(logging.DEBUG):
            # One message's trip, for tracing one session's tail (benchmarks/nonreader.py).
            log.debug("session=%s msg=%d stage=trace: bytes=%d at=%.6f marks=%s",
                      self.session_id, reply.msg_id, len(reply.audio), now,
                      ",".join(f"{k}={v:.6f}" for k, v in reply.timings))
        marks = dict(reply.timings)
        publish = marks.get("gateway_publish")
        first_step = self.pipeline[0].name
        last_step = self.pipeline[-1].name
        rx = marks.get(f"{first_step}:worker_rx")
        batch = marks.get(f"{first_step}:batch_start")
        processed = marks.get(f"{last_step}:processed")
        replied = marks.get(f"{last_step}:replied")
        stage = self.metrics.stages
        if publish is not None and rx is not None:
            stage["queue_wait"].observe(max(0.0, rx - publish))
        if rx is not None and batch is not None:
            stage["batch_wait"].observe(max(0.0, batch - rx))
        if batch is not None and processed is not None:
            stage["inference"].observe(max(0.0, processed - batch))
        if replied is not None:
            stage["reply"].observe(max(0.0, now - replied))

    async def close(self, *, finished: bool) -> None:
        """Stop consuming and cancel owned tasks.

        ``finished`` (a clean stop): the journal is acked and the reply queue deleted
        while we still consume it, so no taker ever finds it without a consumer and
        half-reads it (a takeover meanwhile is answered ``ENDED``). Otherwise the
        journal goes back to the queue for whoever resumes the session, and the queue
        is left to expire.
        """
        if self.phase is SessionPhase.CLOSED:
            return
        self.phase = SessionPhase.CLOSED
        self._finishing = finished
        self.coalescer.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._outage.ended(self.session_id, "session closed")
        held, self._held = self._held, None
        if finished:
            await self._ack([e.delivery for e in self.journal.drain()]
                            + ([held] if held is not None else []))
            with contextlib.suppress(AudioStreamError):
                await self.transport.delete_reply_queue(self.reply_queue)
        await self._stop_consuming()
        if not finished:
            await self._release_journal([e.delivery for e in self.journal.drain()])
            if held is not None:  # "released" now carries our generation
                await self._ack([held])
        self._idle.set()

    async def _stop_consuming(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(AudioStreamError):
                await self._subscription.cancel()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _release_journal(self, journal: list[Delivery]) -> None:
        """Hand the journal to whoever resumes the session: a copy of every reply, then
        "released", as one ordered batch (one write, one wait for the confirms), then
        ack the originals.

        A taker stops reading the journal at "released", or shortly after its own
        "displace" came back; copies published one confirm at a time could still be on
        their way then (under load, for a long journal), and a reply the client already
        holds would be missing from the resumed session's journal.
        """
        # The marker carries the newest generation that held the session, so a stale
        # token cannot take it over while it is detached.
        marker = encode_control(Control(self.session_id, RELEASED, self.nonce,
                                        generation=self._newest_seen))
        batch = [(self.reply_queue, d.body) for d in journal] + [(self.reply_queue, marker)]
        try:
            results: list[bool | TransportError] = await self.transport.publish_replies(batch)
        except AudioStreamError as err:
            log.warning("session=%s stage=release: could not hand the journal back (%s); "
                        "returning %d replies to the queue", self.session_id, err, len(journal))
            results = [False] * len(batch)
        copied = [d for d, r in zip(journal, results, strict=False) if r is True]
        await self._ack(copied)
        for d, r in zip(journal, results, strict=False):
            if r is not True:
                with contextlib.suppress(AudioStreamError):
                    await d.release()

    # -- load accessor (read by gateway/load.py) ---------------------------------------
    @property
    def oldest_pending_at(self) -> float | None:
        """Wall-clock receipt of the oldest chunk not yet answered (in flight or queued
        here), or None when idle: its age grows while workers fall behind, even with one
        message in flight per session."""
        return self.coalescer.oldest_pending_at

