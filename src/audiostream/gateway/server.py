"""aiohttp adapter: WebSocket sessions at /v1/stream, health, readiness and metrics.

The handler only moves frames: the protocol core (``audiostream.protocol``)
decides, ``SessionPipeline`` talks to the broker. Every task a connection
starts is owned by it and cancelled when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import cast

from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from audiostream.audio import Codec
from audiostream.bundler import WorkBundler
from audiostream.envelope import Step
from audiostream.errors import (
    AudioStreamError,
    AuthError,
    ConfigError,
    ErrorCode,
    LimitError,
)
from audiostream.gateway import browser
from audiostream.gateway import edge as _edge
from audiostream.gateway.budget import BudgetPolicy, LoadBudget
from audiostream.gateway.coalescer import MAX_MESSAGE_BYTES
from audiostream.gateway.keys import KeyRecord, KeyStore
from audiostream.gateway.load import LoadMonitor
from audiostream.gateway.opusdecode import BudgetedDecoder, CpuBucket
from audiostream.gateway.pipeline import (
    HELD_BY_NEWER,
    Outcome,
    SessionPipeline,
    reply_outcomes,
)
from audiostream.gateway.revocation import KeyRevocation
from audiostream.gateway.telephony import add_telephony_routes
from audiostream.gateway.tokens import SessionGrant, TokenSigner
from audiostream.gateway.watchdog import BrokerWatchdog
from audiostream.gateway.wsframes import FrameWriter
from audiostream.metrics import GatewayMetrics, exposition
from audiostream.processors import ProcessorRegistry, registry
from audiostream.processors.pipeline import delay_frames, plan_raw
from audiostream.protocol import (
    MAX_WS_MESSAGE,
    NORMAL_CLOSURE,
    AckReceived,
    ChunkReceived,
    Limits,
    Output,
    SendBytes,
    SendText,
    ServerProtocol,
    StartMessage,
    StartRequested,
    State,
    plan_resume,
)
from audiostream.transport.base import DeadLetterProbe, Transport

log = logging.getLogger(__name__)

#: At most one log line per this many seconds for starts refused with broker_unavailable
#: or overloaded (each its own line).
REFUSAL_LOG_INTERVAL_S = 10.0
#: Oldest sample of the sessions' lateness (``gateway/load.py``) a start is admitted on.
SHED_SAMPLE_S = 0.1

#: Query parameters that look like credentials; such a request is refused before the upgrade.
CREDENTIAL_PARAMS = frozenset({"api_key", "apikey", "key", "token", "access_token", "auth"})
#: aiohttp's ceiling on one frame: the largest legal chunk plus headroom (the protocol
#: applies a tighter, format-derived one per session).
HARD_MAX_FRAME = MAX_WS_MESSAGE
#: An Opus CPU budget holds this many seconds' worth of its share (a burst).
OPUS_BURST_S = 1.0


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    default_deadline_ms: int = 1000
    auth_timeout_s: float = 10.0
    heartbeat_s: float = 30.0
    max_connections: int = 10_000
    drain_grace_s: float = 20.0
    idle_timeout_s: float = 60.0
    """A session with no frame (audio, control or keepalive) for this long is closed."""
    chunk_rate: float | None = 120.0
    """Token bucket per connection: chunks per second ..."""
    chunk_burst: float = 60.0
    """... and how many may come at once; chunks over it get a rate_limited notice."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to connect (``*`` for any); requests without an Origin
    header (SDKs, telephony bridges) are always allowed."""
    resume_window_s: float = 60.0
    depth_poll_s: float = 5.0
    """How often the work-queue depth gauge is refreshed; 0 disables polling."""
    load_sample_s: float = 1.0
    """How often the oldest-chunk age gauges are refreshed; 0 disables sampling."""
    bundle_max: int = 64
    """Most sessions' work messages packed into one broker message."""
    linger_ms: float = 0.0
    """Hold a session's next message until its oldest chunk is this old (0: send as soon
    as the previous one is answered). Fewer, larger messages per session for up to this
    much latency: a throughput knob for workers that are the bottleneck."""
    coalesce_fraction: float = 0.5
    """A session coalesces on its own once its replies take longer than the quickest
    reply seen by more than this share of its chunk interval (0: never;
    ``CoalescePolicy.budget_fraction``)."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Most audio bytes in one work message (``CoalescePolicy.max_message_bytes``)."""
    coalesce_above: float = 1500.0
    """Gateway-wide chunks per second above which every session coalesces (a floor of
    chunks per message that brings the message rate back to about this; 0: never).
    See ``gateway/budget.py``."""
    loop_lag_high_ms: float = 25.0
    """Event-loop lag that also raises the coalescing floor (0: ignore lag)."""
    budget_sample_s: float = 0.25
    """How often the chunk rate and loop lag are sampled into the floor."""
    bundle_wait_ms: float = 5.0
    """Longest an envelope waits for its bundle while an earlier one awaits its confirm
    (with none in flight it goes out at once)."""
    key_recheck_s: float = 1.0  # live sessions of a revoked key end (gateway/revocation.py)
    broker_probe_s: float = 1.0  # stall watchdog period, 0 disables (gateway/watchdog.py)
    broker_stall_s: float = 2.0  # broker silent this long (lag-free): /readyz 503, starts 4091
    start_timeout_s: float = 5.0  # longest a start waits on the broker before 4091
    takeover_s: float = 5.0
    """Longest a resume waits for the session's previous holder (on any gateway) to let
    go before 4040. A holder with a newer token refuses at once instead."""

    close_timeout_s: float = 5.0
    """After our close frame, how long to wait for the client's."""
    max_outbound_bytes: int = 8 * 1024 * 1024
    """Unwritten bytes per connection above which the slow-consumer grace starts ..."""
    slow_consumer_grace_s: float = 10.0
    """... and how long they may stay above it before closing 4023 (resumable)."""
    max_queued_bytes: int = 16 * 1024 * 1024
    """Bytes one session may hold here: its chunks waiting for or in the pipeline plus
    its outcomes not yet written to the socket. Above it the gateway stops reading the
    connection until it is below again (TCP back-pressure on the client's sends), so a
    client sending large chunks faster than the pipeline answers, or one that does not
    read, cannot grow the gateway's memory. It must exceed ``max_outbound_bytes``: a
    client that stops reading then still reaches the slow-consumer close."""
    credit_window: int = 64
    """v1.1: most chunks a client may have outstanding ..."""
    credit_bytes: int = 4 * 1024 * 1024
    """... and most bytes of them (the window is the smaller, at least 2 chunks)."""
    flood_burst: float = 300.0
    """Chunks over credit or rate tolerated at once before closing 4025 ..."""
    flood_rate: float = 60.0
    """... refilled per second."""
    session_starts_per_minute: int | None = 600
    """New sessions one key may start per minute on this gateway (None: no cap)."""
    shed_above_ms: float = 250.0
    """Refuse new sessions (4031 ``overloaded``, retryable) while the typical waiting
    session of their processing type has a chunk older than this (``gateway/load.py``);
    resumes are still taken. A saturated gateway that keeps accepting sets each new
    session up slowly and makes every session late; refusing at the door keeps the
    admitted ones served. 0: never refuse."""
    opus_cpu_share: float = 0.1
    """CPU seconds per second one Opus session's decoding may cost the event loop (a
    second's worth may come at once); over it the gateway stops reading that session's
    socket until it is back within (``gateway/opusdecode.py``) ..."""
    opus_cpu_share_total: float = 0.25
    """... and what all Opus sessions together may cost, so PCM sessions keep the rest."""

    def limits(self) -> Limits:
        """The per-connection limits the protocol core enforces."""
        return Limits(
            chunk_rate=self.chunk_rate, chunk_burst=self.chunk_burst,
            auth_timeout_s=self.auth_timeout_s, idle_timeout_s=self.idle_timeout_s,
            credit_window=self.credit_window, credit_bytes=self.credit_bytes,
            max_outbound_bytes=self.max_outbound_bytes,
            slow_consumer_grace_s=self.slow_consumer_grace_s,
            flood_burst=self.flood_burst, flood_rate=self.flood_rate)

    edge: _edge.EdgeSettings = field(default_factory=_edge.EdgeSettings)
    """Handshake timeout, pending-socket cap, ping limit, operations site (edge.py)."""

    def __post_init__(self) -> None:
        if self.linger_ms < 0:
            raise ConfigError(f"linger must be >= 0 ms, not {self.linger_ms:g}")
        if self.coalesce_fraction < 0:
            raise ConfigError(f"coalesce fraction must be >= 0, not {self.coalesce_fraction:g}")
        if self.coalesce_above < 0 or self.loop_lag_high_ms < 0 or self.budget_sample_s <= 0:
            raise ConfigError("coalesce-above and loop lag must be >= 0, the budget sample "
                              "period > 0")
        if self.opus_cpu_share <= 0 or self.opus_cpu_share_total <= 0:
            raise ConfigError("the Opus CPU shares must be > 0")
        if self.max_queued_bytes <= self.max_outbound_bytes:
            raise ConfigError(
                f"max_queued_bytes ({self.max_queued_bytes}) must exceed max_outbound_bytes "
                f"({self.max_outbound_bytes}), or a client that stops reading is never "
                "closed as a slow consumer")


class SlotPhase(Enum):
    """Where a connection stands against its key's session cap."""

    NONE = "none"
    RESERVED = "reserved"
    """Counted before any await, so concurrent starts cannot overshoot the cap."""
    CLAIMED = "claimed"
    """A resume took over the count of the detached session it resumes (one session,
    counted once); a failed resume gives it back (``Gateway.restore_detached``)."""
    LIVE = "live"
    RELEASED = "released"


@dataclass(frozen=True, slots=True)
class Detached:
    """A resumable session whose connection here dropped: it counts against its key
    until ``expires_at`` (loop time), the end of its resume window."""

    key_id: str
    answered: int
    """Outcomes its last connection answered: the bound on a resume's ``received``."""
    expires_at: float


class _Connection:
    """One WebSocket: its protocol core, its one timer, its writer task and its pipeline."""

    def __init__(self, ws: web.WebSocketResponse, gateway: Gateway,
                 request: web.Request | None = None) -> None:
        self.ws = ws
        self.request = request
        self.gateway = gateway
        # Batched audio frames need the socket itself (the response is uncompressed).
        self.frames = FrameWriter(request) if request is not None else None
        self.loop = asyncio.get_running_loop()
        self.proto = ServerProtocol(clock=self.loop.time, limits=gateway.limits)
        self.pipeline: SessionPipeline | None = None
        self.decoder: BudgetedDecoder | None = None
        """``format.encoding: "opus"``: the session's Opus decoder (its state spans chunks)
        and CPU budget. A resume gets a fresh one (see docs/protocol.md, *Resume*)."""
        self.key: KeyRecord | None = None
        self.slot = SlotPhase.NONE
        self._claimed: tuple[str, Detached] | None = None
        """The detached session this connection's resume claimed (``SlotPhase.CLAIMED``)."""
        self._start_began = 0.0
        """When this connection's start message arrived (monotonic; the start histogram)."""
        self.grant: SessionGrant | None = None
        self._refresh: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._wake = asyncio.Event()
        self._parked = False
        """The writer waits for output, with no batch of its own in hand."""
        self._batch: deque[Output] = deque()
        """The writer's current batch: taken from the core, not yet written."""
        self.writer = self.loop.create_task(self._write_loop())
        self.reader: asyncio.Task[None] | None = None
        self.receiving = False
        """The reader waits in ``ws.receive()`` or for room (see ``_stop_reading``)."""
        self._room = asyncio.Event()
        self.reading_paused = False
        """The reader waits for the session's queued bytes to drop (``wait_for_room``)."""
        self._forcing: asyncio.Task[None] | None = None
        self.handshaking = False
        """The writer sent (or is sending) the close frame and waits for the client's."""
        self.started_at = time.monotonic()
        # Seq of the last audio outcome of each reply -> when the reply arrived, for the
        # gateway_to_client stage (one entry per reply, removed when that audio is written).
        self._replied: dict[int, float] = {}

    @property
    def queued_bytes(self) -> int:
        """What the session holds here: chunks waiting for or in the pipeline, and
        outcomes not yet written to the socket."""
        pl = self.pipeline
        return self.proto.unwritten_bytes + (pl.queued_bytes if pl is not None else 0)

    def _has_room(self) -> bool:
        return (self.queued_bytes <= self.gateway.settings.max_queued_bytes
                or self.proto.state is State.CLOSED)

    async def wait_for_room(self) -> bool:
        """Back-pressure: read nothing more from the client while the session holds more
        than ``max_queued_bytes``. aiohttp then stops reading the socket, TCP's window
        closes and the client's sends wait. Outcomes written, replies and expiries make
        room (each ends in ``kick`` or the writer's ``_check_room``). False: the session
        closed meanwhile, nothing more to read."""
        if not self._has_room():
            self.reading_paused = True
            self.proto.pause_reading()
            self.gateway.metrics.reads_paused.inc()
            try:
                while not self._has_room():
                    self._room.clear()
                    await self._room.wait()
            finally:
                self.reading_paused = False
                self.proto.resume_reading()
                self._rearm()
        return self.proto.state is not State.CLOSED

    def _check_room(self) -> None:
        if self.reading_paused and self._has_room():
            self._room.set()

    def kick(self) -> None:
        """Something may be in the outbox, or the next deadline moved. The writer is woken
        only for output: every received chunk kicks, and waking it for nothing cost a
        task switch per chunk (it re-checks ``has_output`` before it waits again)."""
        if self.proto.has_output and not self._write_now():
            self._wake.set()
        self._rearm()
        self._check_room()
        if self.proto.close_code == ErrorCode.SLOW_CONSUMER and self._forcing is None:
            self._forcing = self.loop.create_task(self._force_close())

    # -- the one timer ------------------------------------------------------------
    def _rearm(self) -> None:
        """Keep the one timer at or before the core's next deadline. A deadline that
        moved later (the idle deadline does on every frame) is left alone: the timer
        fires early, ``poll`` finds nothing due, and it is re-armed then, so frames
        cost no timer churn."""
        due = self.proto.next_deadline()
        if due is None or (self._timer_at is not None and self._timer_at <= due):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.proto.poll(self.loop.time())
        if self.proto.state is State.CLOSED and self._forcing is None:
            # The writer may be stuck on a client that does not read: make sure the
            # close happens within a bound.
            self._forcing = self.loop.create_task(self._force_close())
        self.kick()

    async def _force_close(self) -> None:
        # asyncio.wait, not wait_for(shield(...)): it only watches the writer (no extra
        # task, nothing cancelled when the timeout and the writer's end race) and never
        # raises the writer's own exception here.
        if await self._writer_done_within(1.0):
            return
        # Handshaking, the writer is not stuck: its close frame is out and aiohttp's
        # close() waits for the client's (within the close timeout). Cancelling it there
        # would drop the socket with the client's input unread; the kernel would then
        # reset the connection and the client lose our last frames (1006, not the code).
        if self.handshaking and await self._writer_done_within(
                self.gateway.settings.close_timeout_s + 1):
            return
        # The writer is stuck on a client that does not read. Its queued outcomes cannot
        # reach it; the error and the close frame go into the transport's buffer (no
        # drain), and the close handshake keeps reading what the client sends until its
        # close frame or the close timeout, so the socket never closes with unread input
        # (which would reset it and lose the close code).
        self.writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
            await self.writer
        code = self.proto.close_code or 1011
        # What the cancelled writer had not reached yet (the error after the audio it was
        # stuck on), then what was queued since.
        for out in [*self._batch, *self.proto.data_to_send()]:
            if isinstance(out, SendText) and out.kind == "error":
                with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
                    await asyncio.wait_for(self.ws.send_str(out.text), 0.5)
                self.gateway.metrics.errors.labels(code=out.label).inc()
        with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
            if self.request is not None:
                _edge.closing(self.request)
            await asyncio.wait_for(self.ws.close(code=code, drain=False),
                                   self.gateway.settings.close_timeout_s + 1)
        if self.reader is not None:
            self.reader.cancel()

    async def _writer_done_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the writer to end, leaving it running if not."""
        done, _ = await asyncio.wait({self.writer}, timeout=seconds)
        return bool(done)

    # -- writing ------------------------------------------------------------------
    async def _stop_reading(self) -> None:
        """aiohttp's ``close()`` called while another task waits in ``receive()`` drops
        the socket at once, with the client's unread input (its acks) still in it: the
        kernel then resets the connection and the client loses our last frames (the
        summary, the close frame: 1006). With the reader stopped, ``close()`` itself
        reads until the client's close frame (or the close timeout)."""
        reader = self.reader
        # Only while it is parked in receive(): cancelled elsewhere (opening a pipeline)
        # it could leave work half done. Started later, receive() sees the close.
        if reader is not None and self.receiving and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _write_loop(self) -> None:
        proto = self.proto
        while True:
            if not proto.has_output:  # a write may have queued a credit grant itself
                self._parked = True
                try:
                    await self._wake.wait()
                finally:
                    self._parked = False
            self._wake.clear()
            written = proto.next_out  # every outcome below is in this batch or sent
            audio: list[SendBytes] = []
            self._batch = batch = deque(proto.data_to_send())
            while batch:
                out = batch[0]
                if isinstance(out, SendBytes):
                    batch.popleft()
                    audio.append(out)  # consecutive audio goes out in one write
                    continue
                if audio:
                    await self._send_audio(audio)
                    audio = []
                batch.popleft()  # only now: stuck on the audio, the error stays for _force_close
                if isinstance(out, SendText):
                    await self.ws.send_str(out.text)
                    proto.written(out.nbytes)
                    metrics = self.gateway.metrics
                    if out.kind == "notice":
                        metrics.dropped.labels(reason=out.label).inc(out.count)
                    elif out.kind == "error":
                        metrics.errors.labels(code=out.label).inc()
                else:
                    if self.request is not None:
                        _edge.closing(self.request)
                    await self._stop_reading()
                    self.handshaking = True
                    await self.ws.close(code=out.code, message=out.reason.encode())
                    return
            if audio:
                await self._send_audio(audio)
            if self.pipeline is not None:
                self.pipeline.delivered(written)  # lets the journal trim a non-acking client
            self._rearm()
            self._check_room()

    def _write_now(self) -> bool:
        """Write queued audio in this turn, without waking the writer task: the reply that
        just arrived reaches the socket one task switch sooner (reply -> socket 0.12 ms
        against 0.14-0.16 at one session; git show 9e76bf1:docs/benchmarks.md). Only
        when the writer is parked with no batch of its own (order), the outbox holds
        audio only and the socket takes it without waiting (flow control stays the
        writer's); otherwise False and the writer does it."""
        proto = self.proto
        frames = self.frames
        if (not self._parked or frames is None or not proto.audio_only_out
                or not frames.writable(self.ws)):
            return False
        written = proto.next_out
        audio = cast(list[SendBytes], proto.data_to_send())
        frames.write([out.data for out in audio])
        self._audio_written(audio)
        if self.pipeline is not None:
            self.pipeline.delivered(written)
        return not proto.has_output  # a credit grant: the writer sends it

    async def _send_audio(self, audio: list[SendBytes]) -> None:
        """Audio outcomes as frames of one socket write (``gateway/wsframes.py``)."""
        if self.frames is None or len(audio) == 1:
            for out in audio:
                await self.ws.send_bytes(out.data)
        else:
            await self.frames.send(self.ws, [out.data for out in audio])
        self._audio_written(audio)

    def _audio_written(self, audio: list[SendBytes]) -> None:
        metrics = self.gateway.metrics
        now = self.loop.time()
        nbytes = 0
        round_trip = metrics.round_trip
        replied = self._replied
        for out in audio:
            self.proto.written(out.nbytes)
            nbytes += out.nbytes
            if out.received_at is not None:
                round_trip.observe(now - out.received_at)
            at = replied.pop(out.seq, None)
            if at is not None:
                metrics.stages["gateway_to_client"].observe(now - at)
        metrics.chunks_out.inc(len(audio))
        metrics.bytes_out.inc(nbytes)

    # -- outcomes from the pipeline ---------------------------------------------------
    def on_outcomes(self, outcomes: list[Outcome]) -> None:
        last_audio = -1
        for o in outcomes:
            for ev in o.events:
                self.proto.deliver_event(o.seq, ev)
            if o.audio is not None:
                self.proto.deliver_audio(o.seq, o.audio)
                last_audio = o.seq
            else:
                assert o.code is not None
                self.proto.deliver_notice(o.seq, o.code, o.message)
        if last_audio >= 0:
            self._replied[last_audio] = self.loop.time()
        self.kick()

    def submit(self, seq: int, data: bytes) -> None:
        """Hand a numbered chunk to the pipeline; Opus frames are decoded into the
        session's PCM first, or answered with an ``invalid_audio`` notice (the session
        goes on)."""
        assert self.pipeline is not None
        if (dec := self.decoder) is not None:
            before = dec.cpu_s
            try:
                data = dec.decode(data)
            except AudioStreamError as err:
                self.proto.deliver_notice(seq, err.code, err.message)
                return
            finally:
                self.gateway.metrics.opus_decode_cpu.inc(dec.cpu_s - before)
        self.pipeline.submit(seq, data, time.time())

    async def wait_for_decode_budget(self) -> bool:
        """An Opus session over its CPU budget (or the gateway's) is not read until it is
        back within: its client's sends wait, nothing is refused. False: the session
        closed meanwhile."""
        dec = self.decoder
        if dec is None or (wait := dec.wait_s()) <= 0:
            return self.proto.state is not State.CLOSED
        self.gateway.metrics.opus_decode_paused.inc()
        while wait > 0 and self.proto.state is not State.CLOSED:
            await asyncio.sleep(wait)
            wait = dec.wait_s()
        return self.proto.state is not State.CLOSED

    # -- starting -----------------------------------------------------------------
    async def start_session(self, start: StartMessage) -> None:
        gw = self.gateway
        self._start_began = time.monotonic()
        pl: SessionPipeline | None = None
        try:
            if gw.draining:
                raise AudioStreamError("gateway is draining; reconnect elsewhere",
                                       ErrorCode.SERVER_DRAINING)
            self.key = key = gw.keys.verify(start.api_key)
            if start.resume is not None:
                await self._resume(start)
                return
            pipeline = plan_raw(start.pipeline, start.format, gw.processors)
            self._check_steps(pipeline)
            self._reserve(new=True, processing=pipeline[0].name if pipeline else None)
            deadline_ms = start.deadline_ms or gw.settings.default_deadline_ms
            self.grant = SessionGrant(
                session_id=uuid.uuid4().hex,
                key_id=key.id,
                format=start.format,
                pipeline=pipeline,
                deadline_ms=deadline_ms,
                generation=0,
                expires_at=0.0,
            )
            self._make_decoder(start)
            pl = self._make_pipeline(self.grant)
            await gw.watchdog.bounded(pl.open(), cleanup=lambda: pl.close(finished=True))
        except AudioStreamError as err:
            gw.metrics.sessions_total.labels(result=err.code.name.lower()).inc()
            if err.code in (ErrorCode.BROKER_UNAVAILABLE, ErrorCode.OVERLOADED):
                gw.refusals.warning(err.code.name, "stage=start: refused a start with "
                                    "%s: %s", err.code.name.lower(), err.message)
            self._release()
            if self.proto.state is State.STARTING:
                self.proto.reject(err)
            self.kick()  # a pipeline that failed to open is closed by the watchdog's cleanup
            return
        if await self._closed_meanwhile(pl):
            return
        self._started(pl, "started")
        self._accept()

    def _accept(self, resume_from: int | None = None, delivered: int = 0) -> None:
        assert self.grant is not None and self.pipeline is not None
        self.pipeline.issued()
        if self.request is not None:  # audio frames may now be as large as the format allows
            _edge.limit_frames(self.request, None)
        self.proto.accept(
            self.grant.session_id, self.grant.format,
            pipeline=[s.name for s in self.grant.pipeline],
            deadline_ms=self.grant.deadline_ms,
            token=self.gateway.signer.issue(self.grant),
            resume_window_s=self.gateway.signer.ttl_s,
            resume_from=resume_from, delivered=delivered,
            delay_frames=delay_frames(self.grant.pipeline, self.grant.format,
                                      self.gateway.processors))

    async def _closed_meanwhile(self, pl: SessionPipeline) -> bool:
        """The gateway began draining while the session was being set up."""
        if self.proto.state is State.STARTING:
            return False
        self._release()
        await pl.close(finished=False)
        return True

    def _check_steps(self, pipeline: tuple[Step, ...]) -> None:
        gw = self.gateway
        assert self.key is not None
        if self.key.pipelines is not None:
            denied = [s.name for s in pipeline if s.name not in self.key.pipelines
                      and not gw.processors.get(s.name).internal]
            if denied:
                raise AuthError(f"this key may not use {', '.join(denied)}",
                                ErrorCode.FORBIDDEN)

    def _reserve(self, *, new: bool, processing: str | None = None) -> None:
        """Count this session against its key's cap now, before any await (live and
        detached sessions both count), and cap how many new sessions a key starts per
        minute."""
        assert self.key is not None
        self.gateway.reserve(self.key, new=new, processing=processing)
        self.slot = SlotPhase.RESERVED

    def _release(self) -> None:
        if self.slot is SlotPhase.CLAIMED and self._claimed is not None:
            # The resume failed: the session is still detached and resumable.
            self.gateway.restore_detached(*self._claimed)
        elif self.slot in (SlotPhase.RESERVED, SlotPhase.LIVE) and self.key is not None:
            self.gateway.release(self.key.id)
        self._claimed = None
        self.slot = SlotPhase.RELEASED

    def _make_decoder(self, start: StartMessage) -> None:
        """An Opus session's decoder, at the session's own format (a resume's is the
        token's): a fresh one on every connection, so a resumed session's first packets
        decode without the previous connection's state."""
        assert self.grant is not None
        if start.codec is not Codec.OPUS:
            self.decoder = None
            return
        gw, fmt = self.gateway, self.grant.format
        share = gw.settings.opus_cpu_share
        self.decoder = BudgetedDecoder(
            fmt.sample_rate, fmt.channels, session=CpuBucket(share, share * OPUS_BURST_S),
            shared=gw.opus_budget, clock=self.loop.time)

    def _make_pipeline(self, grant: SessionGrant) -> SessionPipeline:
        return SessionPipeline(
            session_id=grant.session_id,
            transport=self.gateway.transport,
            pipeline=grant.pipeline,
            fmt=grant.format,
            deadline_s=grant.deadline_ms / 1000,
            sink=self.on_outcomes,
            metrics=self.gateway.metrics,
            generation=grant.generation,
            on_displaced=self.on_displaced,
            ending=self.ending,
            bundler=self.gateway.bundler,
            linger_s=self.gateway.settings.linger_ms / 1000,
            coalesce_fraction=self.gateway.settings.coalesce_fraction,
            max_message_bytes=self.gateway.settings.max_message_bytes,
            budget=self.gateway.budget,
        )

    def _started(self, pl: SessionPipeline, result: str) -> None:
        assert self.grant is not None
        self.pipeline = pl
        self.slot = SlotPhase.LIVE
        self._claimed = None
        self.gateway.holders[self.grant.session_id] = self
        metrics = self.gateway.metrics
        metrics.sessions_total.labels(result=result).inc()
        metrics.session_start.labels(result=result).observe(
            time.monotonic() - self._start_began)
        self._arm_refresh()

    async def _resume(self, start: StartMessage) -> None:
        """Take over a session another connection (on any gateway) held."""
        gw = self.gateway
        assert start.resume is not None and self.key is not None
        old = gw.signer.verify(start.resume.token)
        if old.key_id != self.key.id:
            raise AuthError("the resume token belongs to another API key",
                            ErrorCode.RESUME_FAILED)
        holder = gw.holders.get(old.session_id)
        if holder is not None and holder.grant is not None and (
                holder.grant.generation > old.generation):
            raise AuthError(HELD_BY_NEWER, ErrorCode.RESUME_FAILED)
        self._check_steps(old.pipeline)
        claimed = gw.claim_detached(old.session_id)
        if claimed is not None:  # detached here: this resume takes over its count
            answered: int | None = claimed.answered
            self._claimed = (old.session_id, claimed)
            self.slot = SlotPhase.CLAIMED
        else:
            answered = gw.answered_by(old.session_id)
            self._reserve(new=False)
        self.grant = replace(old, generation=old.generation + 1)
        self._make_decoder(start)
        pl = self._make_pipeline(self.grant)
        history = await gw.watchdog.bounded(pl.take_over(settle_s=gw.settings.takeover_s),
                                            timed=False,
                                            cleanup=lambda: pl.close(finished=False))
        try:
            plan = plan_resume((range(r.seq, r.seq + r.chunk_count) for r in history),
                               start.resume.received, answered=answered)
        except AudioStreamError:
            await pl.close(finished=False)
            raise
        # The token we were given goes into the journal as the newest issued before our
        # ready does, and our own generation once its token is out (``issued``).
        await gw.watchdog.bounded(pl.mark_held(), cleanup=lambda: pl.close(finished=False))
        if await self._closed_meanwhile(pl):
            return
        self._started(pl, "resumed")
        self._accept(resume_from=plan.resume_from, delivered=plan.delivered)
        wanted = set(plan.replay)
        replay: list[Outcome] = []
        for reply in history:
            seqs = list(range(reply.seq, reply.seq + reply.chunk_count))
            for o in reply_outcomes(reply, seqs):
                if o.seq in wanted:
                    wanted.discard(o.seq)
                    replay.append(o)
        replay += [Outcome(seq, code=ErrorCode.EXPIRED, message="expired while the session moved")
                   for seq in plan.expired]
        gw.metrics.replayed.inc(len(replay))
        with self.proto.replaying():  # bounded by the journal, not by the outbound caps
            self.on_outcomes(sorted(replay, key=lambda o: o.seq))
        pl.confirm(plan.delivered)

    def ending(self) -> bool:
        """The summary exists: the session is ending, and no resume may take it."""
        return self.proto.close_code == NORMAL_CLOSURE

    def on_displaced(self) -> None:
        self.proto.displace()
        self.kick()

    def _arm_refresh(self) -> None:
        """Send a fresh resume token before the last one expires."""
        self._refresh = self.loop.call_later(self.gateway.signer.ttl_s / 3, self._refresh_token)

    def _refresh_token(self) -> None:
        if self.grant is None or self.proto.state is State.CLOSED:
            return
        if not self.gateway.revocation.allows(self):  # ends the session if the key is revoked
            return
        self.proto.send_token(self.gateway.signer.issue(self.grant))
        self.kick()
        self._arm_refresh()

    def token(self) -> str | None:
        return self.gateway.signer.issue(self.grant) if self.grant is not None else None

    # -- ending -------------------------------------------------------------------
    async def finish_writing(self) -> None:
        """Let the writer deliver what the core queued (outcomes, summary, close frame)
        for as long as the client keeps reading; give up only when nothing moved for the
        slow-consumer grace."""
        grace = self.gateway.settings.slow_consumer_grace_s
        while not self.writer.done():
            before = self.proto.unwritten_bytes, self.proto.delivered
            self.kick()
            await self._writer_done_within(grace)
            if (self.proto.unwritten_bytes, self.proto.delivered) == before:
                break

    async def close(self) -> None:
        gw = self.gateway
        if self._refresh is not None:
            self._refresh.cancel()
        if self._timer is not None:
            self._timer.cancel()
        stopping = self.proto.close_code == 1000
        if not stopping:
            # No summary will be written: release the session at once, so whoever
            # resumes it (going_away, a dropped link) can take it over without waiting
            # for this connection's close handshake.
            await self._end_session()
        if self.proto.state is State.CLOSED and not self.writer.done():
            await self.finish_writing()
        if self._forcing is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._forcing
        if not self.writer.done():
            self.writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
            await self.writer
        if stopping:
            await self._end_session()
        self._release()
        gw.metrics.session_duration.observe(time.monotonic() - self.started_at)

    async def _end_session(self) -> None:
        """Close the pipeline: finished only if the summary reached the socket; otherwise
        the reply queue (the journal) stays for the resume window and the session keeps
        counting against its key until then."""
        gw = self.gateway
        pl, self.pipeline = self.pipeline, None
        if pl is None:
            return
        finished = self.proto.finished
        await pl.close(finished=finished)
        assert self.grant is not None and self.key is not None
        if gw.holders.get(self.grant.session_id) is self:
            del gw.holders[self.grant.session_id]
        if not finished and self.slot is SlotPhase.LIVE:
            gw.detach(self.grant.session_id, self.key.id, self.proto.next_out)
            self.slot = SlotPhase.RELEASED


def _stop_if_cancelled(err: BaseException) -> None:
    """A loop that lives through broker errors must still end when it is cancelled. A
    probe cancelled while the connection closes can fail with a broker error instead
    (``asyncio.gather`` passes a child's error on, not the cancel), and the depth poll
    then went on forever, with ``close()`` waiting for it (seen in CI, 1 close in 10)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from err


class Gateway:
    def __init__(
        self,
        transport: Transport,
        keys: KeyStore,
        *,
        settings: GatewaySettings | None = None,
        processors: ProcessorRegistry = registry,
        metrics_registry: CollectorRegistry | None = None,
        token_secret: bytes | None = None,
    ) -> None:
        self.transport = transport
        self.keys = keys
        self.settings = settings or GatewaySettings()
        self.signer = TokenSigner(token_secret, ttl_s=self.settings.resume_window_s)
        self.processors = processors
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = GatewayMetrics(self.metrics_registry)
        self.metrics.connections_capacity.set(self.settings.max_connections)
        self.bundler = WorkBundler(
            transport,
            max_items=self.settings.bundle_max,
            max_wait_s=self.settings.bundle_wait_ms / 1000,
            on_sent=lambda _n: self.metrics.bundles_published.inc(),
        )
        st = self.settings
        self.budget = LoadBudget(BudgetPolicy(coalesce_above=st.coalesce_above,
                                              lag_high_s=st.loop_lag_high_ms / 1000))
        self.limits = self.settings.limits()
        total = st.opus_cpu_share_total
        self.opus_budget = CpuBucket(total, total * OPUS_BURST_S)
        """All Opus sessions' decoding together (``gateway/opusdecode.py``)."""
        self.connections: set[_Connection] = set()
        self.sessions_per_key: dict[str, int] = {}
        """Live, starting and detached (resumable) sessions per key."""
        self.holders: dict[str, _Connection] = {}
        """Session id -> the connection holding it here."""
        self._detached: dict[str, tuple[Detached, asyncio.TimerHandle]] = {}
        """Session id -> the detached session and its expiry timer."""
        self._starts: dict[str, deque[float]] = {}
        self.draining = False
        self._changed = asyncio.Event()
        self.revocation = KeyRevocation(keys, lambda: self.connections,
                                        interval_s=st.key_recheck_s)
        self.watchdog = BrokerWatchdog(
            lambda: transport.work_queue_depth(transport.topology.processing_types[0]),
            progress=lambda: transport.progress, interval_s=st.broker_probe_s,
            stall_after_s=st.broker_stall_s, start_timeout_s=st.start_timeout_s)
        self.refusals = _edge.Throttled(log, REFUSAL_LOG_INTERVAL_S)
        """Starts the gateway gave up on (a stalled broker, or one it could not reach in
        time while saturated): one line per interval, so an overload is seen in the log
        and not only in ``audiostream_sessions_total``."""
        self.load = LoadMonitor(  # queue-age gauges for KEDA and alerts (gateway/load.py)
            self.metrics, lambda: [c.pipeline for c in self.connections if c.pipeline is not None],
            transport.topology.processing_types, interval_s=self.settings.load_sample_s)

    # -- per-key session accounting ----------------------------------------------------
    def reserve(self, key: KeyRecord, *, new: bool, processing: str | None = None) -> None:
        """Count one more session for ``key`` or raise; synchronous on purpose. A new
        session whose pipeline starts with ``processing`` is refused while that type is
        late (``GatewaySettings.shed_above_ms``)."""
        limit_ms = self.settings.shed_above_ms
        if new and processing is not None and limit_ms > 0:
            late_ms = 1000 * self.load.lateness_of(processing, fresh_s=SHED_SAMPLE_S)
            if late_ms > limit_ms:
                raise LimitError(
                    f"the gateway is behind: {processing} chunks wait {late_ms:.0f} ms "
                    f"(new sessions are refused above {limit_ms:g} ms); retry shortly or "
                    "at another gateway", ErrorCode.OVERLOADED)
        count = self.sessions_per_key.get(key.id, 0)
        if key.max_sessions is not None and count >= key.max_sessions:
            raise LimitError(
                f"key {key.id} already has {key.max_sessions} sessions (live or resumable)",
                ErrorCode.TOO_MANY_SESSIONS)
        cap = self.settings.session_starts_per_minute
        if new and cap is not None:
            now = time.monotonic()
            starts = self._starts.setdefault(key.id, deque())
            while starts and starts[0] <= now - 60:
                starts.popleft()
            if len(starts) >= cap:
                raise LimitError(f"key {key.id} started {cap} sessions in the last minute",
                                 ErrorCode.TOO_MANY_SESSIONS)
            starts.append(now)
        self.sessions_per_key[key.id] = count + 1

    def release(self, key_id: str) -> None:
        _edge.count_down(self.sessions_per_key, key_id)

    def detach(self, session_id: str, key_id: str, answered: int) -> None:
        """A resumable session lost its connection: it keeps counting against its key
        until its resume window ends (or it is resumed here)."""
        loop = asyncio.get_running_loop()
        self._keep_detached(session_id, Detached(
            key_id, answered, loop.time() + self.settings.resume_window_s))

    def _keep_detached(self, session_id: str, detached: Detached) -> None:
        timer = asyncio.get_running_loop().call_at(
            detached.expires_at, self.forget_detached, session_id)
        self._detached[session_id] = (detached, timer)

    def claim_detached(self, session_id: str) -> Detached | None:
        """A resume takes the detached session's place against its key's cap (no second
        count): it is no longer listed, and still counted."""
        entry = self._detached.pop(session_id, None)
        if entry is None:
            return None
        entry[1].cancel()
        return entry[0]

    def restore_detached(self, session_id: str, detached: Detached) -> None:
        """A resume that claimed the session failed: it is detached again, for what is
        left of its window (released at once if nothing is)."""
        expired = detached.expires_at <= asyncio.get_running_loop().time()
        if expired or session_id in self._detached:  # (detached again meanwhile: counted)
            self.release(detached.key_id)
        else:
            self._keep_detached(session_id, detached)

    def answered_by(self, session_id: str) -> int | None:
        """How many outcomes the session's connection here answered, if it was here."""
        holder = self.holders.get(session_id)
        if holder is not None:
            return holder.proto.next_out
        entry = self._detached.get(session_id)
        return entry[0].answered if entry is not None else None

    def forget_detached(self, session_id: str) -> None:
        entry = self._detached.pop(session_id, None)
        if entry is not None:
            entry[1].cancel()
            self.release(entry[0].key_id)

    # -- aiohttp wiring -------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app[GATEWAY_KEY] = self
        app.router.add_get("/v1/stream", self.handle_stream)
        _edge.install(app, self.settings.edge, self.metrics_registry, [
            ("/healthz", self.handle_health), ("/readyz", self.handle_ready),
            ("/metrics", self.handle_metrics)])  # on the operations site, not this one
        browser.install(app, self)  # /sdk/audiostream.js, /demo, POST /v1/tokens
        add_telephony_routes(app, self)  # /v1/telephony/*: Twilio, Telnyx, Exotel, Asterisk
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        if not self.transport.is_connected:
            await self.transport.connect()
        await self.transport.declare()
        poller = None
        if self.settings.depth_poll_s > 0:
            poller = asyncio.get_running_loop().create_task(self._poll_depth(), name="depth")
        budget = asyncio.get_running_loop().create_task(self._sample_budget(), name="budget")
        self.load.start()
        self.watchdog.start()
        self.revocation.start()
        yield
        budget.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await budget
        await self.revocation.close()
        await self.watchdog.close()
        await self.load.close()
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        await self.close_connections()
        await self.bundler.close()
        await self.transport.close()

    async def _sample_budget(self) -> None:
        """Feed the load budget the time and the event loop's lag (how late this sleep
        wakes up) and export both with the floor."""
        loop = asyncio.get_running_loop()
        period = self.settings.budget_sample_s
        m = self.metrics
        while True:
            expected = loop.time() + period
            await asyncio.sleep(period)  # the sampling period; its lateness is the lag
            now = loop.time()
            floor = self.budget.sample(now, now - expected)
            m.coalesce_floor.set(floor)
            m.loop_lag.set(self.budget.lag)
            m.chunk_rate.set(self.budget.rate)

    async def _poll_depth(self) -> None:
        """Export work-queue depth from here too: it matters most when no worker runs."""
        failing: set[str] = set()
        while True:
            for name in self.transport.topology.processing_types:
                try:
                    depth = await self.transport.work_queue_depth(name)
                except AudioStreamError as err:
                    _stop_if_cancelled(err)
                    if name not in failing:
                        log.warning("stage=queue_depth processing=%s: unavailable: %s",
                                    name, err)
                    failing.add(name)
                    continue
                failing.discard(name)
                self.metrics.queue_depth.labels(processing=name).set(depth)
            try:
                if isinstance(self.transport, DeadLetterProbe) and (
                        dead := await self.transport.dead_letter_depth()) is not None:
                    self.metrics.dead_letters.set(dead)
            except AudioStreamError as err:
                _stop_if_cancelled(err)
            await asyncio.sleep(self.settings.depth_poll_s)

    async def handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle_ready(self, _request: web.Request) -> web.Response:
        ready = self.transport.is_connected and self.watchdog.healthy and not self.draining
        body = {
            "ready": ready,
            "broker_connected": self.transport.is_connected,
            "broker_responsive": self.watchdog.healthy,
            "draining": self.draining,
            "connections": len(self.connections),
        }
        return web.json_response(body, status=200 if ready else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        data = exposition(self.metrics_registry, request.query.getall("name[]", []))
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        leaked = CREDENTIAL_PARAMS.intersection(k.lower() for k in request.query)
        if leaked:
            self.metrics.sessions_total.labels(result="credentials_in_url").inc()
            return web.json_response(
                {
                    "type": "error",
                    "code": int(ErrorCode.CREDENTIALS_IN_URL),
                    "name": "credentials_in_url",
                    "message": "credentials must not travel in the URL; send the API key "
                    "in the start message",
                },
                status=400,
            )
        origin = request.headers.get("Origin")
        allowed = self.settings.allowed_origins
        if origin is not None and "*" not in allowed and origin not in allowed:
            self.metrics.sessions_total.labels(result="origin_refused").inc()
            return web.json_response(
                {"type": "error", "code": int(ErrorCode.FORBIDDEN), "name": "forbidden",
                 "message": f"origin {origin!r} is not allowed"},
                status=403,
            )
        if len(self.connections) >= self.settings.max_connections or self.draining:
            code = ErrorCode.SERVER_DRAINING if self.draining else ErrorCode.TOO_MANY_SESSIONS
            return web.json_response(
                {"type": "error", "code": int(code), "name": code.name.lower(),
                 "message": "gateway is not accepting connections"},
                status=503,
            )
        ws = web.WebSocketResponse(
            heartbeat=self.settings.heartbeat_s,
            max_msg_size=HARD_MAX_FRAME,
            compress=False,
            timeout=self.settings.close_timeout_s,
        )
        # Until start is accepted, a data frame over the pre-start cap is refused from
        # its header (4004), unread: a keyless peer cannot make us buffer or parse it.
        _edge.limit_frames(request, self.limits.max_pre_start_text,
                           hard_cap=HARD_MAX_FRAME)
        await ws.prepare(request)
        conn = _Connection(ws, self, request)
        self.connections.add(conn)
        self.metrics.connections_total.inc()
        self.metrics.connections_active.inc()
        reader = conn.reader = asyncio.get_running_loop().create_task(self._serve(conn))
        try:
            await asyncio.wait({reader})
            if not reader.cancelled():
                reader.result()  # a bug in the core surfaces here
        finally:
            try:
                if not reader.done():
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
                await conn.close()
            finally:
                self.connections.discard(conn)
                self.metrics.connections_active.dec()
                self._changed.set()
        return ws

    async def _serve(self, conn: _Connection) -> None:
        """Read frames into the core until the connection closes. No receive timeout:
        the core's deadlines (auth, idle, slow consumer) drive the connection's one
        timer, which pings and pongs cannot reset."""
        proto = conn.proto
        ws = conn.ws
        conn.kick()  # arms the auth deadline
        while proto.state is not State.CLOSED:
            conn.receiving = True
            try:
                if not (await conn.wait_for_room() and await conn.wait_for_decode_budget()):
                    break  # the session closed meanwhile
                msg = await ws.receive()
            finally:
                conn.receiving = False
            if msg.type is WSMsgType.TEXT:
                events = proto.receive_text(msg.data)
            elif msg.type is WSMsgType.BINARY:
                seq = proto.next_in
                events = proto.receive_bytes(msg.data)
                if proto.next_in != seq:  # numbered: it gets audio or a notice
                    self.metrics.chunks_in.inc()
                    self.metrics.bytes_in.inc(len(msg.data))
            elif msg.type is WSMsgType.ERROR:
                log.info("session=%s seq=%d stage=websocket: connection error: %s",
                         proto.session_id, proto.next_in, ws.exception())
                break
            else:  # CLOSE, CLOSING, CLOSED
                break
            for ev in events:
                if isinstance(ev, StartRequested):
                    await conn.start_session(ev.start)
                elif isinstance(ev, ChunkReceived):
                    conn.submit(ev.seq, ev.data)
                elif isinstance(ev, AckReceived) and conn.pipeline is not None:
                    conn.pipeline.confirm(ev.received)
            conn.kick()
        if proto.state is State.CLOSED and not ws.closed:
            # Deliver what is queued (outcomes, summary, close frame) while the client
            # reads; the close handshake then ends the connection, never a reset.
            await conn.finish_writing()

    async def drain(self, grace_s: float) -> None:
        """Fail readiness and refuse new sessions; tell every client to resume elsewhere
        (``going_away`` with its token); deliver what is in flight for up to ``grace_s``;
        then close with 1001. Each session's journal goes back to its reply queue."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        conns = list(self.connections)
        for conn in conns:
            conn.proto.go_away("gateway draining; resume on another gateway", conn.token())
            conn.kick()

        async def settle(conn: _Connection) -> None:
            if conn.pipeline is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.pipeline.wait_idle(),
                                           max(0.0, deadline - loop.time()))
            conn.proto.finish_drain()
            conn.kick()

        await asyncio.gather(*(settle(c) for c in conns))
        while self.connections and loop.time() < deadline + 5:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)
        await self.close_connections()

    async def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.proto.go_away("server shutting down", conn.token())
            conn.proto.finish_drain()
            conn.kick()
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close()


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 only: older clients are refused during the handshake."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def start_site(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
    *, reuse_port: bool = False,
) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (useful with port 0)."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = _edge.EdgeSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
    await site.start()
    bound = port
    for address in runner.addresses:
        bound = int(address[1])
        break
    return runner, bound
