"""Per-session message flow between the gateway and the broker.

At most one message per session is in flight. Chunks that arrive meanwhile are
coalesced into the next message, so load raises message size, not message
count, and the per-session state (returned by the workers with each reply) is
always applied in order. Every accepted chunk ends as audio or a drop notice:
a reply, a deadline timer, or a publish failure settles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from audiostream.audio import AudioFormat
from audiostream.envelope import (
    Reply,
    ReplyStatus,
    Step,
    WorkEnvelope,
    decode_reply,
    encode_work,
)
from audiostream.errors import AudioStreamError, ErrorCode
from audiostream.metrics import GatewayMetrics
from audiostream.transport.base import Delivery, Subscription, Transport

log = logging.getLogger(__name__)

#: Most chunks carried by one message.
MAX_COALESCE = 50
#: Most chunks waiting for a session before new ones are refused as overloaded.
MAX_BACKLOG = 1000


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the gateway hands back to the connection for one chunk."""

    seq: int
    audio: bytes | None = None
    code: ErrorCode | None = None
    message: str = ""
    events: tuple[Mapping[str, Any], ...] = ()


OutcomeSink = Callable[[list[Outcome]], None]


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
    extra: dict[str, Any] = field(default_factory=dict)


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
    ) -> None:
        self.session_id = session_id
        self.transport = transport
        self.pipeline = pipeline
        self.format = fmt
        self.deadline_s = deadline_s
        self.sink = sink
        self.metrics = metrics
        self.reply_queue = transport.topology.reply_queue(session_id)
        self.shard = transport.topology.shard_for(session_id)
        self.state: dict[str, bytes] = {}
        self._backlog: deque[_Chunk] = deque()
        self._inflight: _InFlight | None = None
        self._next_msg_id = 0
        self._subscription: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.messages_published = 0

    async def open(self) -> None:
        await self.transport.declare_reply_queue(self.reply_queue)
        self._subscription = await self.transport.consume_replies(self.reply_queue, self._on_reply)

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
        chunks = [self._backlog.popleft() for _ in range(min(MAX_COALESCE, len(self._backlog)))]
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
        self._spawn(self._publish(flight, env, deadline - now))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, flight: _InFlight, env: WorkEnvelope, ttl: float) -> None:
        started = time.time()
        try:
            await self.transport.publish_work(
                env.step.name, self.shard, encode_work(env), ttl=max(ttl, 0.001)
            )
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
        try:
            reply = decode_reply(delivery.body)
        except AudioStreamError as err:
            log.error("session=%s stage=reply: undecodable reply: %s", self.session_id, err)
            await delivery.ack()
            return
        await delivery.ack()
        self.handle_reply(reply)

    def handle_reply(self, reply: Reply) -> None:
        flight = self._inflight
        if flight is None or reply.msg_id != flight.msg_id or reply.session_id != self.session_id:
            # A duplicate (redelivery after a worker crash) or a reply past its deadline.
            log.debug("session=%s: discarding reply for msg %d", self.session_id, reply.msg_id)
            return
        if flight.timer is not None:
            flight.timer.cancel()
        self._inflight = None
        self._observe(reply)
        chunks = flight.chunks
        if reply.status is ReplyStatus.OK and reply.chunk_count == len(chunks):
            self.state = dict(reply.state)
            events: dict[int, list[Mapping[str, Any]]] = {}
            for ev in reply.events:
                events.setdefault(int(ev.get("seq", chunks[0].seq)), []).append(ev)
            outcomes = []
            pos = 0
            fb = reply.format.frame_bytes
            for c, frames in zip(chunks, reply.chunk_frames, strict=True):
                data = reply.audio[pos : pos + frames * fb]
                pos += frames * fb
                outcomes.append(Outcome(c.seq, audio=data, events=tuple(events.get(c.seq, ()))))
            self._emit(outcomes)
        else:
            if reply.status is ReplyStatus.OK:
                code, message = ErrorCode.PROCESSING_FAILED, "reply does not match the message"
            else:
                code = ErrorCode(reply.error_code or ErrorCode.PROCESSING_FAILED)
                message = reply.error_message or str(reply.status)
                if reply.error_step:
                    message = f"{reply.error_step}: {message}"
            self._emit([Outcome(c.seq, code=code, message=message) for c in chunks])
        self._pump()

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

    async def close(self, *, delete_reply_queue: bool) -> None:
        """Stop consuming; settle whatever is outstanding as dropped; free the reply queue."""
        if self._closed:
            return
        self._closed = True
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
        if delete_reply_queue:
            with contextlib.suppress(AudioStreamError):
                await self.transport.delete_reply_queue(self.reply_queue)
        self._idle.set()
