"""Per-session message flow between the gateway and the broker.

At most one message per session is in flight. Chunks that arrive meanwhile are
coalesced into the next message, so load raises message size, not message
count, and the per-session state (returned by the workers with each reply) is
always applied in order. The gateway's ``WorkBundler`` then packs the messages
of many sessions into one broker message. Every accepted chunk ends as audio or a drop notice:
a reply, a deadline timer, or a publish failure settles it.

The reply queue doubles as the session's journal: replies stay unacked until
the client confirms it holds their outcomes (and the newest one always stays,
for its state). If the gateway dies or drains, they return to the queue, and
the gateway that takes the session over (``take_over``) replays what the
client missed and continues from the newest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
from audiostream.errors import AudioStreamError, AuthError, ErrorCode
from audiostream.metrics import GatewayMetrics
from audiostream.transport.base import Delivery, Subscription, Transport

log = logging.getLogger(__name__)

#: Most chunks carried by one message.
MAX_COALESCE = 50
#: Most chunks waiting for a session before new ones are refused as overloaded.
MAX_BACKLOG = 1000
#: Most replies kept unacked for a client that never confirms what it received.
MAX_JOURNAL = 3000
#: Message ids are ``generation << GEN_SHIFT | counter``.
GEN_SHIFT = 32
DISPLACE = "displace"
RELEASED = "released"
#: After our displace message comes back, how long to wait for a closing holder's
#: "released" (a holder that died never sends one).
RELEASE_GRACE_S = 0.5


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the gateway hands back to the connection for one chunk."""

    seq: int
    audio: bytes | None = None
    code: ErrorCode | None = None
    message: str = ""
    events: tuple[Mapping[str, Any], ...] = ()


OutcomeSink = Callable[[list[Outcome]], None]


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


@dataclass(slots=True)
class _Entry:
    delivery: Delivery
    reply: Reply

    @property
    def end(self) -> int:
        return self.reply.seq + self.reply.chunk_count


@dataclass(slots=True)
class _Chunk:
    seq: int
    data: bytes
    received_at: float
    deadline: float


@dataclass(slots=True)
class _InFlight:
    msg_id: int
    chunks: list[_Chunk]
    timer: asyncio.TimerHandle | None = None
    published_at: float = 0.0


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
        bundler: WorkBundler,
        linger_s: float = 0.0,
    ) -> None:
        self.session_id = session_id
        self.transport = transport
        self.bundler = bundler  # the gateway's, shared by all its sessions
        self.pipeline = pipeline
        self.format = fmt
        self.deadline_s = deadline_s
        # Opt-in latency for throughput: hold a message until its oldest chunk is this
        # old, so it carries more chunks (never more than half the deadline).
        self.linger_s = max(0.0, min(linger_s, deadline_s / 2))
        self._linger: asyncio.TimerHandle | None = None
        self.sink = sink
        self.metrics = metrics
        self.reply_queue = transport.topology.reply_queue(session_id)
        self.state: dict[str, bytes] = dict(state or {})
        self.generation = generation
        self.on_displaced = on_displaced
        self.nonce = uuid.uuid4().hex
        self._backlog: deque[_Chunk] = deque()
        self._inflight: _InFlight | None = None
        self._next_msg_id = generation << GEN_SHIFT
        self._journal: list[_Entry] = []
        self._confirmed = 0
        self._history: list[_Entry] | None = None
        self._seen_own_displace = asyncio.Event()
        self._seen_released = asyncio.Event()
        self._subscription: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.messages_published = 0

    async def open(self) -> None:
        await self.transport.declare_reply_queue(self.reply_queue)
        self._subscription = await self.transport.consume_replies(self.reply_queue, self._on_reply)

    async def take_over(self, *, settle_s: float = 5.0) -> list[Reply]:
        """Become the reply queue's only consumer and read the journal a previous
        holder left: returns its replies (deduplicated, by seq) and keeps them unacked."""
        t = self.transport
        stats = await t.reply_queue_stats(self.reply_queue)
        if stats is None:
            raise AuthError("the session has expired (its reply queue is gone)",
                            ErrorCode.RESUME_FAILED)
        await t.publish_reply(
            self.reply_queue, encode_control(Control(self.session_id, DISPLACE, self.nonce))
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle_s
        while True:
            stats = await t.reply_queue_stats(self.reply_queue)
            if stats is None:
                raise AuthError("the session's reply queue vanished during the takeover",
                                ErrorCode.RESUME_FAILED)
            if stats[1] == 0:
                break
            if loop.time() >= deadline:
                raise AudioStreamError("the previous connection did not let the session go",
                                       ErrorCode.RESUME_FAILED)
            await asyncio.sleep(0.02)  # polling the broker: nothing to await on
        # Read the journal until our own displace message comes back: the holder's
        # released replies were queued ahead of it. A holder that closed cleanly says
        # "released" when it has put everything back; one that died has nothing to say
        # (the broker requeued its replies when its connection dropped).
        self._history = []
        self._subscription = await t.consume_replies(self.reply_queue, self._on_reply)
        try:
            released = asyncio.ensure_future(self._seen_released.wait())
            own = asyncio.ensure_future(self._seen_own_displace.wait())
            try:
                done, _ = await asyncio.wait({released, own}, timeout=settle_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise TimeoutError
                if released not in done:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(released), RELEASE_GRACE_S)
            finally:
                released.cancel()
                own.cancel()
        except TimeoutError:
            log.warning("session=%s stage=resume: journal may be incomplete (%d replies)",
                        self.session_id, len(self._history))
        history, self._history = self._history, None
        seen: set[int] = set()
        entries: list[_Entry] = []
        for entry in sorted(history, key=lambda e: (e.reply.seq, e.reply.msg_id)):
            if entry.reply.msg_id in seen or entry.reply.session_id != self.session_id:
                await self._settle_delivery(entry.delivery)
                continue
            seen.add(entry.reply.msg_id)
            entries.append(entry)
        self._journal = entries
        if entries:
            self.state = dict(entries[-1].reply.state)
        return [e.reply for e in entries]

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
        await self._settle_delivery(delivery)

    async def _settle_delivery(self, delivery: Delivery) -> None:
        with contextlib.suppress(AudioStreamError):
            await delivery.ack()

    def confirm(self, received: int) -> None:
        """The client holds every outcome before ``received``: forget those replies."""
        self._confirmed = max(self._confirmed, received)
        self._trim()

    def _trim(self) -> None:
        keep: list[_Entry] = []
        last = len(self._journal) - 1
        for i, entry in enumerate(self._journal):
            over_cap = len(self._journal) - i > MAX_JOURNAL
            if i < last and (entry.end <= self._confirmed or over_cap):
                self._spawn(self._settle_delivery(entry.delivery))
            else:
                keep.append(entry)
        self._journal = keep

    @property
    def outstanding(self) -> int:
        return len(self._backlog) + (len(self._inflight.chunks) if self._inflight else 0)

    async def wait_idle(self) -> None:
        """Until every submitted chunk has an outcome."""
        await self._idle.wait()

    def submit(self, seq: int, data: bytes, received_at: float) -> None:
        if self._closed:
            return
        if len(self._backlog) >= MAX_BACKLOG:
            self._emit([Outcome(seq, code=ErrorCode.OVERLOADED,
                                message="session backlog is full; the pipeline is behind")])
            return
        self._backlog.append(_Chunk(seq, data, received_at, received_at + self.deadline_s))
        self._idle.clear()
        self._pump()

    # -- sending ----------------------------------------------------------------------
    def _emit(self, outcomes: list[Outcome]) -> None:
        if outcomes:
            self.sink(outcomes)
        if not self._backlog and self._inflight is None:
            self._idle.set()

    def _pump(self) -> None:
        """Send the backlog as the next message if nothing is in flight."""
        if self._closed or self._inflight is not None or not self._backlog:
            if not self._backlog and self._inflight is None:
                self._idle.set()
            return
        now = time.time()
        expired: list[Outcome] = []
        while self._backlog and self._backlog[0].deadline <= now:
            c = self._backlog.popleft()
            expired.append(Outcome(c.seq, code=ErrorCode.EXPIRED,
                                   message="deadline passed while queued at the gateway"))
        if expired:
            self._emit(expired)
        if not self._backlog:
            self._idle.set()
            return
        if self.linger_s and len(self._backlog) < MAX_COALESCE:
            wait = self._backlog[0].received_at + self.linger_s - now
            if wait > 0:
                if self._linger is None:
                    self._linger = asyncio.get_running_loop().call_later(wait, self._lingered)
                return
        chunks = [self._backlog.popleft() for _ in range(min(MAX_COALESCE, len(self._backlog)))]
        if self.metrics is not None:
            self.metrics.stage.labels(stage="gateway_backlog").observe(
                max(0.0, now - chunks[0].received_at)
            )
        msg_id = self._next_msg_id
        self._next_msg_id += 1
        flight = _InFlight(msg_id, chunks)
        self._inflight = flight
        deadline = min(c.deadline for c in chunks)
        loop = asyncio.get_running_loop()
        flight.timer = loop.call_later(max(0.0, deadline - time.time()), self._on_deadline, msg_id)
        env = WorkEnvelope(
            session_id=self.session_id,
            msg_id=msg_id,
            seq=chunks[0].seq,
            chunk_frames=tuple(len(c.data) // self.format.frame_bytes for c in chunks),
            received_at=chunks[0].received_at,
            deadline=deadline,
            format=self.format,
            output_format=self.format,
            audio=b"".join(c.data for c in chunks),
            pipeline=self.pipeline,
            step_index=0,
            reply_to=self.reply_queue,
            state=dict(self.state),
            timings=(("gateway_rx", chunks[0].received_at), ("gateway_publish", now)),
        )
        self._spawn(self._publish(flight, env))

    def _lingered(self) -> None:
        self._linger = None
        self._pump()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, flight: _InFlight, env: WorkEnvelope) -> None:
        started = time.time()
        try:
            await self.bundler.publish(env)
        except AudioStreamError as err:
            log.warning("session=%s seq=%d stage=publish: %s", self.session_id, env.seq, err)
            if self._inflight is flight:
                self._settle(flight, ErrorCode.BROKER_UNAVAILABLE, f"could not publish: {err}")
            return
        flight.published_at = time.time()
        self.messages_published += 1
        if self.metrics is not None:
            self.metrics.messages_published.inc()
            self.metrics.stage.labels(stage="gateway_to_broker").observe(
                flight.published_at - started
            )

    def _settle(self, flight: _InFlight, code: ErrorCode, message: str) -> None:
        """Answer every chunk of ``flight`` with a notice and move on."""
        if flight.timer is not None:
            flight.timer.cancel()
        self._inflight = None
        self._emit([Outcome(c.seq, code=code, message=message) for c in flight.chunks])
        self._pump()

    def _on_deadline(self, msg_id: int) -> None:
        flight = self._inflight
        if flight is not None and flight.msg_id == msg_id:
            log.info("session=%s seq=%d stage=deadline: expired in the pipeline",
                     self.session_id, flight.chunks[0].seq)
            self._settle(flight, ErrorCode.EXPIRED,
                         "deadline passed before the processed audio came back")

    # -- receiving -----------------------------------------------------------------------
    async def _on_reply(self, delivery: Delivery) -> None:
        if self._closed:
            # Closing without finishing: whatever still arrives belongs to whoever
            # resumes the session, so it goes back to the queue.
            await self._hand_back(delivery)
            return
        try:
            msg = decode_reply_queue_message(delivery.body)
        except AudioStreamError as err:
            flight = self._inflight
            log.error("session=%s seq=%d stage=reply: undecodable reply: %s", self.session_id,
                      flight.chunks[0].seq if flight is not None else -1, err)
            await self._settle_delivery(delivery)
            return
        if isinstance(msg, Control):
            await self._settle_delivery(delivery)
            if self._history is not None:
                if msg.command == DISPLACE and msg.nonce == self.nonce:
                    self._seen_own_displace.set()
                elif msg.command == RELEASED and msg.nonce != self.nonce:
                    self._seen_released.set()
            elif msg.command == DISPLACE and msg.nonce != self.nonce:
                log.info("session=%s stage=resume: taken over by another connection",
                         self.session_id)
                if self.on_displaced is not None:
                    self.on_displaced()
            return
        if self._history is not None:
            self._history.append(_Entry(delivery, msg))
            return
        if not self.handle_reply(msg):
            await self._settle_delivery(delivery)
            return
        self._journal.append(_Entry(delivery, msg))
        self._trim()

    def handle_reply(self, reply: Reply) -> bool:
        """Turn the awaited reply into outcomes; False for one that is not awaited."""
        flight = self._inflight
        if flight is None or reply.msg_id != flight.msg_id or reply.session_id != self.session_id:
            # A duplicate (redelivery after a worker crash) or a reply past its deadline.
            log.debug("session=%s: discarding reply for msg %d", self.session_id, reply.msg_id)
            return False
        if flight.timer is not None:
            flight.timer.cancel()
        self._inflight = None
        self._observe(reply)
        if reply.status is ReplyStatus.OK:
            self.state = dict(reply.state)
        self._emit(reply_outcomes(reply, [c.seq for c in flight.chunks]))
        self._pump()
        return True

    def _observe(self, reply: Reply) -> None:
        if self.metrics is None:
            return
        now = time.time()
        marks = dict(reply.timings)
        publish = marks.get("gateway_publish")
        first_step = self.pipeline[0].name
        last_step = self.pipeline[-1].name
        rx = marks.get(f"{first_step}:worker_rx")
        batch = marks.get(f"{first_step}:batch_start")
        processed = marks.get(f"{last_step}:processed")
        replied = marks.get(f"{last_step}:replied")
        stage = self.metrics.stage
        if publish is not None and rx is not None:
            stage.labels(stage="queue_wait").observe(max(0.0, rx - publish))
        if rx is not None and batch is not None:
            stage.labels(stage="batch_wait").observe(max(0.0, batch - rx))
        if batch is not None and processed is not None:
            stage.labels(stage="inference").observe(max(0.0, processed - batch))
        if replied is not None:
            stage.labels(stage="reply").observe(max(0.0, now - replied))

    async def close(self, *, finished: bool) -> None:
        """Stop consuming and cancel owned tasks.

        ``finished`` (a clean stop): the journal is acked and the reply queue deleted.
        Otherwise the journal goes back to the queue for whoever resumes the session,
        and the queue is left to expire.
        """
        if self._closed:
            return
        self._closed = True
        if self._linger is not None:
            self._linger.cancel()
        if self._inflight is not None and self._inflight.timer is not None:
            self._inflight.timer.cancel()
        if self._subscription is not None:
            with contextlib.suppress(AudioStreamError):
                await self._subscription.cancel()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        journal, self._journal = self._journal, []
        for entry in journal:
            if finished:
                await self._settle_delivery(entry.delivery)
            else:
                await self._hand_back(entry.delivery)
        with contextlib.suppress(AudioStreamError):
            if finished:
                await self.transport.delete_reply_queue(self.reply_queue)
            else:
                await self.transport.publish_reply(
                    self.reply_queue,
                    encode_control(Control(self.session_id, RELEASED, self.nonce)),
                )
        self._idle.set()

    # -- load accessor (read by gateway/load.py) ---------------------------------------
    @property
    def oldest_pending_at(self) -> float | None:
        """Wall-clock receipt of the oldest chunk not yet answered (in flight or queued
        here), or None when idle: its age grows while workers fall behind, even with one
        message in flight per session."""
        if self._inflight is not None and self._inflight.chunks:
            return self._inflight.chunks[0].received_at
        return self._backlog[0].received_at if self._backlog else None
