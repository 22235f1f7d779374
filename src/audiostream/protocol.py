"""Sans-I/O core of WebSocket protocol v1 (see docs/protocol.md).

No asyncio, aiohttp or broker import here: the server core takes frames as
values and returns events; what to send back accumulates in an outbox the
adapter drains with ``data_to_send()``. The same module holds the client core
used by the SDK. States and their transitions are the ``TRANSITIONS`` table.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from audiostream.audio import AudioFormat, check_chunk
from audiostream.errors import AudioStreamError, ErrorCode, ProtocolError

PROTOCOL_VERSION = 1
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
#: Longest chunk accepted, in milliseconds of audio; larger frames get FRAME_TOO_LARGE.
MAX_CHUNK_MS = 1000
MIN_DEADLINE_MS = 20
MAX_DEADLINE_MS = 30_000
MAX_PIPELINE_STEPS = 8
#: The summary's latency percentiles cover at least this many of the most recent chunks
#: (bounded memory for sessions that last hours).
LATENCY_WINDOW = 10_000


class State(Enum):
    AWAITING_START = "awaiting_start"
    STARTING = "starting"
    STREAMING = "streaming"
    STOPPING = "stopping"
    DRAINING = "draining"
    CLOSED = "closed"


#: (state, trigger) -> next state. Anything absent is a protocol violation.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.AWAITING_START, "start"): State.STARTING,
    (State.STARTING, "accept"): State.STREAMING,
    (State.STARTING, "reject"): State.CLOSED,
    (State.STREAMING, "stop"): State.STOPPING,
    (State.STOPPING, "flushed"): State.CLOSED,
    (State.STREAMING, "drain"): State.DRAINING,
    (State.DRAINING, "drained"): State.CLOSED,
    (State.DRAINING, "fail"): State.CLOSED,
    (State.AWAITING_START, "fail"): State.CLOSED,
    (State.STARTING, "fail"): State.CLOSED,
    (State.STREAMING, "fail"): State.CLOSED,
    (State.STOPPING, "fail"): State.CLOSED,
}


# --- client -> server messages ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    token: str
    received: int
    """Outcomes the client already has; the server replays from this seq."""


@dataclass(frozen=True, slots=True)
class StartMessage:
    api_key: str
    format: AudioFormat
    pipeline: tuple[Any, ...]
    """Steps as sent: names or ``{"name": ..., "params": {...}}``; validated by the gateway."""
    deadline_ms: int | None = None
    resume: ResumeRequest | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StopMessage:
    pass


@dataclass(frozen=True, slots=True)
class KeepaliveMessage:
    pass


@dataclass(frozen=True, slots=True)
class AckMessage:
    received: int
    """Outcomes the client holds (seq 0 .. received-1); lets the server forget them."""


ClientMessage = StartMessage | StopMessage | KeepaliveMessage | AckMessage


def _require(cond: bool, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
    if not cond:
        raise ProtocolError(message, code)


def parse_client_message(text: str) -> ClientMessage:
    """Parse one JSON text frame from a client; raises ``ProtocolError`` with a code."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"invalid JSON: {exc}", ErrorCode.INVALID_JSON) from None
    _require(isinstance(data, dict), "a control message must be a JSON object")
    kind = data.get("type")
    if kind == "stop":
        return StopMessage()
    if kind == "keepalive":
        return KeepaliveMessage()
    if kind == "ack":
        received = data.get("received")
        _require(isinstance(received, int) and not isinstance(received, bool)
                 and received >= 0, "ack needs a non-negative integer 'received'")
        return AckMessage(received)
    if kind != "start":
        raise ProtocolError(f"unknown message type {kind!r}", ErrorCode.UNEXPECTED_MESSAGE)
    version = data.get("version", PROTOCOL_VERSION)
    _require(
        version == PROTOCOL_VERSION,
        f"protocol version {version!r} is not supported (server speaks {PROTOCOL_VERSION})",
        ErrorCode.UNSUPPORTED_VERSION,
    )
    api_key = data.get("api_key")
    _require(isinstance(api_key, str) and api_key != "", "start needs an api_key",
             ErrorCode.AUTH_FAILED)
    fmt = AudioFormat.from_dict(data.get("format"))
    pipeline = data.get("pipeline")
    _require(
        isinstance(pipeline, list) and 1 <= len(pipeline) <= MAX_PIPELINE_STEPS,
        f"pipeline must be a list of 1..{MAX_PIPELINE_STEPS} steps",
        ErrorCode.UNKNOWN_STEP,
    )
    options = data.get("options", {})
    _require(isinstance(options, dict), "options must be an object", ErrorCode.INVALID_OPTION)
    deadline = options.get("deadline_ms")
    if deadline is not None:
        _require(
            isinstance(deadline, int)
            and not isinstance(deadline, bool)
            and MIN_DEADLINE_MS <= deadline <= MAX_DEADLINE_MS,
            f"deadline_ms must be an integer in [{MIN_DEADLINE_MS}, {MAX_DEADLINE_MS}]",
            ErrorCode.INVALID_OPTION,
        )
    resume = None
    raw_resume = data.get("resume")
    if raw_resume is not None:
        _require(
            isinstance(raw_resume, dict)
            and isinstance(raw_resume.get("token"), str)
            and isinstance(raw_resume.get("received"), int)
            and raw_resume["received"] >= 0,
            "resume needs a token and the count of outcomes received",
            ErrorCode.RESUME_FAILED,
        )
        resume = ResumeRequest(raw_resume["token"], raw_resume["received"])
    return StartMessage(api_key, fmt, tuple(pipeline), deadline, resume, options)


def start_json(
    api_key: str,
    fmt: AudioFormat,
    pipeline: list[Any],
    *,
    deadline_ms: int | None = None,
    resume: ResumeRequest | None = None,
) -> str:
    msg: dict[str, Any] = {
        "type": "start",
        "version": PROTOCOL_VERSION,
        "api_key": api_key,
        "format": fmt.to_dict(),
        "pipeline": pipeline,
    }
    if deadline_ms is not None:
        msg["options"] = {"deadline_ms": deadline_ms}
    if resume is not None:
        msg["resume"] = {"token": resume.token, "received": resume.received}
    return json.dumps(msg)


# --- server-side events and outputs -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartRequested:
    start: StartMessage


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    seq: int
    data: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class StopRequested:
    pass


@dataclass(frozen=True, slots=True)
class KeepaliveReceived:
    pass


@dataclass(frozen=True, slots=True)
class AckReceived:
    received: int


ServerEvent = StartRequested | ChunkReceived | StopRequested | KeepaliveReceived | AckReceived


@dataclass(frozen=True, slots=True)
class SendText:
    text: str
    kind: str = ""
    """The message's ``type`` ("notice", "error", …), so adapters need not parse it."""
    label: str = ""
    """A notice's ``reason`` or an error's ``name``; empty otherwise."""


@dataclass(frozen=True, slots=True)
class SendBytes:
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


Output = SendText | SendBytes | Close


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    values = sorted(latencies_ms)
    return {
        "p50": round(_percentile(values, 50), 3),
        "p90": round(_percentile(values, 90), 3),
        "p99": round(_percentile(values, 99), 3),
        "max": round(values[-1], 3) if values else 0.0,
    }


class TokenBucket:
    """Rate limiter: ``rate`` tokens per second, at most ``burst`` saved up. Pure."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass(slots=True)
class _Pending:
    audio: bytes | None = None
    notice: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


class ServerProtocol:
    """One client session on the server, as a state machine over frames."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        chunk_rate: float | None = None,
        chunk_burst: float = 60.0,
    ) -> None:
        self.state = State.AWAITING_START
        self.format: AudioFormat | None = None
        self.session_id: str | None = None
        self._clock = clock
        self._out: list[Output] = []
        self.next_in = 0
        """Seq the next accepted binary frame gets."""
        self.next_out = 0
        """Seq of the next outcome to send."""
        self._received_at: dict[int, float] = {}
        self._pending: dict[int, _Pending] = {}
        self.chunks_out = 0
        self.dropped: dict[str, int] = {}
        self.latencies_ms: list[float] = []
        """Recent per-chunk latencies (at most ``LATENCY_WINDOW``) for the summary."""
        self.measured = 0
        """Latencies measured so far in total (the list keeps only the recent ones)."""
        self.close_code: int | None = None
        self.rate_limited = 0
        self._bucket = (
            TokenBucket(chunk_rate, chunk_burst, clock()) if chunk_rate is not None else None
        )

    # -- helpers ------------------------------------------------------------------
    def _transition(self, trigger: str) -> None:
        nxt = TRANSITIONS.get((self.state, trigger))
        if nxt is None:
            raise ProtocolError(
                f"{trigger!r} is not allowed in state {self.state.value}",
                ErrorCode.UNEXPECTED_MESSAGE,
            )
        self.state = nxt

    def send_json(self, msg: Mapping[str, Any]) -> None:
        """Queue a control message (e.g. a refreshed resume token)."""
        if self.state is not State.CLOSED:
            self._send_json(msg)

    def _send_json(self, msg: Mapping[str, Any]) -> None:
        kind = str(msg.get("type", ""))
        label = str(msg.get("reason" if kind == "notice" else "name", "")) if kind in (
            "notice", "error") else ""
        self._out.append(SendText(json.dumps(msg, separators=(",", ":")), kind, label))

    def _error(self, err: AudioStreamError, *, seq: int | None = None) -> None:
        msg: dict[str, Any] = {
            "type": "error",
            "code": int(err.code),
            "name": err.code.name.lower(),
            "message": err.message,
            "retryable": err.retryable,
        }
        if seq is not None:
            msg["seq"] = seq
        self._send_json(msg)

    @property
    def outstanding(self) -> int:
        """Chunks accepted whose outcome has not been sent yet."""
        return self.next_in - self.next_out

    @property
    def max_frame_bytes(self) -> int:
        assert self.format is not None
        return self.format.bytes_for_ms(MAX_CHUNK_MS)

    def data_to_send(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    # -- inbound ------------------------------------------------------------------
    def receive_text(self, text: str) -> list[ServerEvent]:
        if self.state is State.CLOSED:
            return []
        try:
            msg = parse_client_message(text)
        except AudioStreamError as err:
            if self.state is State.AWAITING_START:
                self.fail(err)
            else:
                self._error(err)
            return []
        if isinstance(msg, KeepaliveMessage):
            self._send_json({"type": "keepalive"})
            return [KeepaliveReceived()]
        if isinstance(msg, AckMessage):
            if self.state not in (State.STREAMING, State.STOPPING, State.DRAINING):
                self._error(ProtocolError("ack before ready", ErrorCode.UNEXPECTED_MESSAGE))
                return []
            if msg.received > self.next_out:
                self._error(ProtocolError(
                    f"ack of {msg.received} outcomes but only {self.next_out} were sent"))
                return []
            return [AckReceived(msg.received)]
        if isinstance(msg, StartMessage):
            if self.state is not State.AWAITING_START:
                self._error(
                    ProtocolError("the session has already started",
                                  ErrorCode.UNEXPECTED_MESSAGE)
                )
                return []
            self._transition("start")
            return [StartRequested(msg)]
        # stop
        if self.state is not State.STREAMING:
            refusal = ProtocolError(f"stop is not allowed in state {self.state.value}",
                                    ErrorCode.UNEXPECTED_MESSAGE)
            if self.state is State.AWAITING_START:
                self.fail(refusal)
            else:
                self._error(refusal)
            return []
        self._transition("stop")
        self._maybe_finish()
        return [StopRequested()]

    def receive_bytes(self, data: bytes) -> list[ServerEvent]:
        if self.state is State.CLOSED:
            return []
        if self.state in (State.AWAITING_START, State.STARTING):
            self.fail(ProtocolError("audio before start", ErrorCode.UNEXPECTED_MESSAGE))
            return []
        if self.state is State.STOPPING:
            self._error(ProtocolError("audio after stop", ErrorCode.UNEXPECTED_MESSAGE))
            return []
        if self.state is State.DRAINING:
            return []  # not accepted: the client re-sends it after resuming elsewhere
        assert self.format is not None
        seq = self.next_in
        self.next_in += 1
        now = self._clock()
        self._received_at[seq] = now
        if self._bucket is not None and not self._bucket.take(now):
            self.rate_limited += 1
            self.deliver_notice(
                seq, ErrorCode.RATE_LIMITED,
                f"more than {self._bucket.rate:g} chunks/s (burst {self._bucket.burst:g})")
            return []
        try:
            if len(data) > self.max_frame_bytes:
                raise ProtocolError(
                    f"frame of {len(data)} bytes exceeds {self.max_frame_bytes} "
                    f"({MAX_CHUNK_MS} ms of {self.format.encoding} audio)",
                    ErrorCode.FRAME_TOO_LARGE,
                )
            check_chunk(self.format, data)
        except AudioStreamError as err:
            self.deliver_notice(seq, err.code, err.message)
            return []
        return [ChunkReceived(seq, data, now)]

    # -- decisions from the adapter --------------------------------------------------
    def accept(
        self,
        session_id: str,
        fmt: AudioFormat,
        extra: Mapping[str, Any],
        *,
        next_seq: int = 0,
        delivered: int = 0,
    ) -> None:
        """Send ``ready``. A resumed session starts at ``next_seq`` with ``delivered``
        outcomes already in the client's hands."""
        if not 0 <= delivered <= next_seq:
            raise ValueError("delivered must be within [0, next_seq]")
        self._transition("accept")
        self.session_id = session_id
        self.format = fmt
        self.next_in = next_seq
        self.next_out = delivered
        self._send_json(
            {
                "type": "ready",
                "version": PROTOCOL_VERSION,
                "session_id": session_id,
                "max_frame_bytes": self.max_frame_bytes,
                **extra,
            }
        )

    def reject(self, err: AudioStreamError) -> None:
        self._error(err)
        self._transition("reject")
        self._close(int(err.code), err.code.name.lower())

    def fail(self, err: AudioStreamError) -> None:
        """A session-level error: report it and close with its code."""
        if self.state is State.CLOSED:
            return
        self._error(err)
        self._transition("fail")
        self._close(int(err.code), err.code.name.lower())

    def go_away(self, extra: Mapping[str, Any]) -> None:
        """Server draining: tell the client to reconnect elsewhere; audio sent from now
        on is not accepted. ``finish_drain`` closes with 1001 once outcomes are out."""
        if self.state is State.STREAMING:
            self._send_json({"type": "going_away", **extra})
            self._transition("drain")
        elif self.state in (State.AWAITING_START, State.STARTING):
            self.state = State.CLOSED
            self._close(GOING_AWAY, "server going away")

    def finish_drain(self) -> None:
        if self.state is State.DRAINING:
            self._transition("drained")
            self._close(GOING_AWAY, "server going away")

    def displace(self) -> None:
        """A newer connection took this session over."""
        self.fail(ProtocolError("the session was resumed on another connection",
                                ErrorCode.DISPLACED))

    def _close(self, code: int, reason: str) -> None:
        self.close_code = code
        self._out.append(Close(code, reason))

    def _slot(self, seq: int) -> _Pending | None:
        if seq < self.next_out or seq >= self.next_in:
            return None  # already answered, or never accepted: ignore duplicates
        return self._pending.setdefault(seq, _Pending())

    def deliver_event(self, seq: int, event: Mapping[str, Any]) -> None:
        """An event (e.g. VAD speech start) that belongs to chunk ``seq``."""
        slot = self._slot(seq)
        if slot is not None:
            slot.events.append({"type": "event", "seq": seq, **event})

    def deliver_audio(self, seq: int, audio: bytes) -> None:
        slot = self._slot(seq)
        if slot is None or slot.audio is not None or slot.notice is not None:
            return
        slot.audio = audio
        self._flush()

    def deliver_notice(self, seq: int, code: ErrorCode, message: str) -> None:
        slot = self._slot(seq)
        if slot is None or slot.audio is not None or slot.notice is not None:
            return
        slot.notice = {
            "type": "notice",
            "seq": seq,
            "code": int(code),
            "reason": code.name.lower(),
            "message": message,
        }
        self._flush()

    def _flush(self) -> None:
        """Send every outcome that is next in order."""
        if self.state is State.CLOSED:
            return
        while (slot := self._pending.get(self.next_out)) is not None and (
            slot.audio is not None or slot.notice is not None
        ):
            seq = self.next_out
            del self._pending[seq]
            for ev in slot.events:
                self._send_json(ev)
            if slot.audio is not None:
                self._out.append(SendBytes(slot.audio))
                self.chunks_out += 1
                received = self._received_at.get(seq)
                if received is not None:
                    self.latencies_ms.append((self._clock() - received) * 1000)
                    self.measured += 1
                    if len(self.latencies_ms) > 2 * LATENCY_WINDOW:
                        del self.latencies_ms[:LATENCY_WINDOW]
            else:
                assert slot.notice is not None
                self._send_json(slot.notice)
                reason = slot.notice["reason"]
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
            self._received_at.pop(seq, None)
            self.next_out += 1
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.state is State.STOPPING and self.outstanding == 0:
            self._send_json(self.summary())
            self._transition("flushed")
            self._close(NORMAL_CLOSURE, "done")

    def summary(self) -> dict[str, Any]:
        return {
            "type": "summary",
            "session_id": self.session_id,
            "chunks_in": self.next_in,
            "chunks_out": self.chunks_out,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped),
            "latency_ms": latency_summary(self.latencies_ms),
        }


# --- client core ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    session_id: str
    info: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AudioOutcome:
    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DropNotice:
    seq: int
    code: ErrorCode | int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class StreamEvent:
    seq: int
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ServerError:
    code: ErrorCode | int
    message: str
    retryable: bool
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class GoingAway:
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TokenRefresh:
    token: str


ClientEvent = (
    Ready | AudioOutcome | DropNotice | StreamEvent | ServerError | Summary | GoingAway
    | TokenRefresh
)


def _code(value: Any) -> ErrorCode | int:
    try:
        return ErrorCode(value)
    except ValueError:
        return int(value)


class ClientProtocol:
    """Client side of protocol v1: numbers chunks and checks outcomes arrive in order."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.session_id: str | None = None
        self.ready_info: Mapping[str, Any] = {}
        self.token: str | None = None

    def next_seq(self) -> int:
        seq = self.sent
        self.sent += 1
        return seq

    @property
    def outstanding(self) -> int:
        return self.sent - self.received

    def receive_bytes(self, data: bytes) -> AudioOutcome:
        if self.received >= self.sent:
            raise ProtocolError("server sent audio for a chunk that was never sent")
        outcome = AudioOutcome(self.received, data)
        self.received += 1
        return outcome

    def receive_text(self, text: str) -> ClientEvent | None:
        try:
            msg = json.loads(text)
        except ValueError:
            raise ProtocolError("server sent invalid JSON", ErrorCode.INVALID_JSON) from None
        if not isinstance(msg, dict):
            raise ProtocolError("server sent a non-object message")
        kind = msg.get("type")
        if kind == "ready":
            self.session_id = str(msg["session_id"])
            self.ready_info = msg
            self.token = msg.get("token", self.token)
            if msg.get("resumed"):
                # The server has everything before resume_from; outcomes from
                # `received` on are replayed; the client re-sends from resume_from.
                resume_from = int(msg["resume_from"])
                if resume_from < self.received:
                    raise ProtocolError("server resumed before what we already have")
                self.sent = resume_from
            return Ready(self.session_id, msg)
        if kind == "token":
            self.token = str(msg["token"])
            return TokenRefresh(self.token)
        if kind == "notice":
            seq = int(msg["seq"])
            if seq != self.received:
                raise ProtocolError(f"notice for seq {seq}, expected {self.received}")
            self.received += 1
            return DropNotice(seq, _code(msg["code"]), str(msg["reason"]), str(msg["message"]))
        if kind == "event":
            return StreamEvent(int(msg["seq"]), msg)
        if kind == "error":
            return ServerError(
                _code(msg["code"]), str(msg["message"]), bool(msg.get("retryable")), msg.get("seq")
            )
        if kind == "summary":
            return Summary(msg)
        if kind == "going_away":
            self.token = msg.get("token", self.token)
            return GoingAway(msg)
        if kind == "keepalive":
            return None
        return None
