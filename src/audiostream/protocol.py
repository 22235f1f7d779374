"""Sans-I/O core of the WebSocket protocol, v1 and v1.1 (see docs/protocol.md).

No asyncio, aiohttp or broker import here: the server core takes frames as
values and returns events; what to send back accumulates in an outbox the
adapter drains with ``data_to_send()`` and confirms with ``written()``. Time
comes from an injected clock and leaves as data (``next_deadline``/``poll``),
so every limit is testable without sockets or sleeps.

Server->client messages are typed (``Ready``, ``Notice``, ...) with one encoder
(``encode_server``) and one parser (``decode_server``), used by the gateway and
the SDK alike. States, and how each client message is handled in each of them,
are the ``TABLE``; the state table in docs/protocol.md is generated from it.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from audiostream.audio import (
    OPUS_MAX_FRAME_BYTES,
    AudioFormat,
    Codec,
    check_chunk,
    check_opus_chunk,
    parse_wire_format,
    wire_format_dict,
)
from audiostream.errors import AudioStreamError, ErrorCode, ProtocolError

PROTOCOL_VERSION = 1
#: Versions a client may ask for in ``start``; 1.1 adds credit flow control.
V1 = 1.0
V1_1 = 1.1
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
#: Longest chunk accepted, in milliseconds of audio; larger frames get FRAME_TOO_LARGE.
MAX_CHUNK_MS = 1000
#: The largest legal chunk of any supported format (48 kHz stereo float32, 1 s).
LARGEST_CHUNK_BYTES = 48_000 * 2 * 4 * MAX_CHUNK_MS // 1000
#: The WebSocket layer's cap on one frame: the largest legal chunk plus headroom, so a
#: frame that can never be legal is refused before it is buffered whole.
MAX_WS_MESSAGE = 512 * 1024
#: Text frames before ``start`` are never parsed above this (an unauthenticated peer
#: must not make the event loop parse megabytes of JSON).
MAX_PRE_START_TEXT = 8 * 1024
#: Text frames after ``start`` (ack, stop, keepalive are tiny).
MAX_TEXT = 64 * 1024
MIN_DEADLINE_MS = 20
MAX_DEADLINE_MS = 30_000
MAX_PIPELINE_STEPS = 8
#: Unwritten bytes beyond this multiple of ``max_outbound_bytes`` close a slow consumer
#: at once, without waiting for the grace (fast producers would otherwise queue
#: grace x rate bytes).
HARD_OUTBOUND_FACTOR = 4
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


class Reaction(Enum):
    """What the core does with a client message in a given state."""

    ACCEPT = "hand `start` to the adapter (authenticate, open the pipeline)"
    PROCESS = "number the chunk; hand it on or answer it with a notice"
    FLUSH = "answer what is outstanding, then `summary` and close 1000"
    ACK = "let the gateway forget confirmed outcomes"
    KEEPALIVE = "answer `keepalive` (does not extend the auth deadline)"
    REPORT = "`error`; the session goes on"
    FAIL = "`error`, then close with its code"
    IGNORE = "nothing"


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
    version: float = V1
    codec: Codec = Codec.PCM
    """How binary frames carry audio; ``format`` is what the pipeline sees (PCM)."""


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """A binary frame (only used as a key of ``TABLE``; the core takes raw bytes)."""

    data: bytes


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

_S, _R = State, Reaction
#: (state, client message type) -> (reaction, next state). Complete: every state and
#: every message type. The adapter's own decisions (accept, reject, fail, drain) are
#: in ``INTERNAL``.
TABLE: dict[tuple[State, type], tuple[Reaction, State]] = {
    (_S.AWAITING_START, StartMessage): (_R.ACCEPT, _S.STARTING),
    (_S.AWAITING_START, AudioFrame): (_R.FAIL, _S.CLOSED),
    (_S.AWAITING_START, StopMessage): (_R.FAIL, _S.CLOSED),
    (_S.AWAITING_START, AckMessage): (_R.FAIL, _S.CLOSED),
    (_S.AWAITING_START, KeepaliveMessage): (_R.KEEPALIVE, _S.AWAITING_START),
    (_S.STARTING, StartMessage): (_R.REPORT, _S.STARTING),
    (_S.STARTING, AudioFrame): (_R.FAIL, _S.CLOSED),
    (_S.STARTING, StopMessage): (_R.REPORT, _S.STARTING),
    (_S.STARTING, AckMessage): (_R.REPORT, _S.STARTING),
    (_S.STARTING, KeepaliveMessage): (_R.KEEPALIVE, _S.STARTING),
    (_S.STREAMING, StartMessage): (_R.REPORT, _S.STREAMING),
    (_S.STREAMING, AudioFrame): (_R.PROCESS, _S.STREAMING),
    (_S.STREAMING, StopMessage): (_R.FLUSH, _S.STOPPING),
    (_S.STREAMING, AckMessage): (_R.ACK, _S.STREAMING),
    (_S.STREAMING, KeepaliveMessage): (_R.KEEPALIVE, _S.STREAMING),
    (_S.STOPPING, StartMessage): (_R.REPORT, _S.STOPPING),
    (_S.STOPPING, AudioFrame): (_R.REPORT, _S.STOPPING),
    (_S.STOPPING, StopMessage): (_R.REPORT, _S.STOPPING),
    (_S.STOPPING, AckMessage): (_R.ACK, _S.STOPPING),
    (_S.STOPPING, KeepaliveMessage): (_R.KEEPALIVE, _S.STOPPING),
    (_S.DRAINING, StartMessage): (_R.REPORT, _S.DRAINING),
    (_S.DRAINING, AudioFrame): (_R.IGNORE, _S.DRAINING),
    (_S.DRAINING, StopMessage): (_R.IGNORE, _S.DRAINING),
    (_S.DRAINING, AckMessage): (_R.ACK, _S.DRAINING),
    (_S.DRAINING, KeepaliveMessage): (_R.KEEPALIVE, _S.DRAINING),
    **{(_S.CLOSED, t): (_R.IGNORE, _S.CLOSED)
       for t in (StartMessage, AudioFrame, StopMessage, AckMessage, KeepaliveMessage)},
}

#: (state, adapter decision or timer) -> next state.
INTERNAL: dict[tuple[State, str], State] = {
    (_S.STARTING, "accept"): _S.STREAMING,
    (_S.STARTING, "reject"): _S.CLOSED,
    (_S.STREAMING, "drain"): _S.DRAINING,
    (_S.STOPPING, "last outcome queued → `summary` + close 1000"): _S.CLOSED,
    (_S.DRAINING, "drained"): _S.CLOSED,
    **{(s, "fail"): _S.CLOSED for s in State if s is not _S.CLOSED},
}
#: Kept for callers of the v1 API: every (state, trigger) -> next state.
TRANSITIONS = INTERNAL

_MESSAGE_NAMES: dict[type, str] = {
    StartMessage: "start", AudioFrame: "audio", StopMessage: "stop", AckMessage: "ack",
    KeepaliveMessage: "keepalive",
}


def state_table_markdown() -> str:
    """docs/protocol.md's state table, generated from ``TABLE`` and ``INTERNAL``."""
    lines = ["| state | message | reaction | next |", "|---|---|---|---|"]
    for (state, kind), (reaction, nxt) in TABLE.items():
        if state is State.CLOSED:
            continue
        lines.append(f"| `{state.value}` | `{_MESSAGE_NAMES[kind]}` | {reaction.value} "
                     f"| `{nxt.value}` |")
    lines.append("| `closed` | anything | nothing | `closed` |")
    lines += ["", "| state | adapter decision or timer | next |", "|---|---|---|"]
    failing = [s.value for s in State if (s, "fail") in INTERNAL]
    for (state, trigger), nxt in INTERNAL.items():
        if trigger != "fail":
            lines.append(f"| `{state.value}` | {trigger} | `{nxt.value}` |")
    lines.append(f"| {', '.join(f'`{s}`' for s in failing)} | fail (error, timeout, "
                 "slow consumer, flooding) → `error` + close 4xxx | `closed` |")
    return "\n".join(lines) + "\n"


def _require(cond: bool, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
    if not cond:
        raise ProtocolError(message, code)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_version(value: Any) -> float:
    if value is None or (_is_int(value) and value == 1) or (
            isinstance(value, float) and value == 1.0):
        return V1
    if (isinstance(value, float) and value == V1_1) or value == "1.1":
        return V1_1
    shown = value if isinstance(value, int | float) else "?"
    raise ProtocolError(f"protocol version {shown} is not supported (server speaks 1 and 1.1)",
                        ErrorCode.UNSUPPORTED_VERSION)


def json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words (never a Python type name)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def parse_client_message(text: str) -> ClientMessage:
    """Parse one JSON text frame from a client; raises ``ProtocolError`` with a code.

    Messages never echo Python's own exception text (it names internals)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("a text frame is not valid JSON", ErrorCode.INVALID_JSON) from None
    _require(isinstance(data, dict), "a control message must be a JSON object")
    kind = data.get("type")
    if kind == "stop":
        return StopMessage()
    if kind == "keepalive":
        return KeepaliveMessage()
    if kind == "ack":
        received = data.get("received")
        _require(_is_int(received) and received >= 0,
                 "ack needs a non-negative integer 'received'")
        return AckMessage(received)
    if kind != "start":
        if not isinstance(kind, str):
            raise ProtocolError(f"'type' must be a string, not {json_kind(kind)}",
                                ErrorCode.UNEXPECTED_MESSAGE)
        raise ProtocolError(f"unknown message type {kind[:32]!r}", ErrorCode.UNEXPECTED_MESSAGE)
    version = _parse_version(data.get("version"))
    api_key = data.get("api_key")
    _require(isinstance(api_key, str) and api_key != "", "start needs an api_key",
             ErrorCode.AUTH_FAILED)
    fmt, codec = parse_wire_format(data.get("format"))
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
            _is_int(deadline) and MIN_DEADLINE_MS <= deadline <= MAX_DEADLINE_MS,
            f"deadline_ms must be an integer in [{MIN_DEADLINE_MS}, {MAX_DEADLINE_MS}]",
            ErrorCode.INVALID_OPTION,
        )
    resume = None
    raw_resume = data.get("resume")
    if raw_resume is not None:
        _require(
            isinstance(raw_resume, dict)
            and isinstance(raw_resume.get("token"), str)
            and _is_int(raw_resume.get("received"))
            and raw_resume["received"] >= 0,
            "resume needs a token and the count of outcomes received",
            ErrorCode.RESUME_FAILED,
        )
        resume = ResumeRequest(raw_resume["token"], raw_resume["received"])
    return StartMessage(api_key, fmt, tuple(pipeline), deadline, resume, options, version,
                        codec)


def start_json(
    api_key: str,
    fmt: AudioFormat,
    pipeline: list[Any],
    *,
    deadline_ms: int | None = None,
    resume: ResumeRequest | None = None,
    version: float = V1,
    codec: Codec = Codec.PCM,
) -> str:
    msg: dict[str, Any] = {
        "type": "start",
        "version": PROTOCOL_VERSION if version == V1 else version,
        "api_key": api_key,
        "format": wire_format_dict(fmt, codec),
        "pipeline": pipeline,
    }
    if deadline_ms is not None:
        msg["options"] = {"deadline_ms": deadline_ms}
    if resume is not None:
        msg["resume"] = {"token": resume.token, "received": resume.received}
    return json.dumps(msg)


# --- server -> client messages ----------------------------------------------------------


def _reason(code: ErrorCode | int) -> str:
    return code.name.lower() if isinstance(code, ErrorCode) else "unknown"


def _code(value: Any) -> ErrorCode | int:
    try:
        return ErrorCode(value)
    except ValueError:
        return int(value)


@dataclass(frozen=True, slots=True)
class Rate:
    """The connection's token bucket, advertised in ``ready`` so clients can pace."""

    chunks_per_s: float
    burst: float


@dataclass(frozen=True, slots=True)
class Ready:
    session_id: str
    max_frame_bytes: int
    version: float = V1
    pipeline: tuple[str, ...] = ()
    deadline_ms: int | None = None
    token: str | None = None
    resume_window_s: float | None = None
    resume_from: int | None = None
    """Set on a resumed session: the client re-sends from this seq."""
    credit: int | None = None
    """v1.1: the client may send chunks with seq < credit."""
    rate: Rate | None = None
    delay_frames: int | None = None
    """The pipeline's fixed delay in frames of the session's format (NSNet2: 319 at
    16 kHz), so file clients line output up with input; absent from older gateways."""

    @property
    def resumed(self) -> bool:
        return self.resume_from is not None

    @property
    def info(self) -> dict[str, Any]:
        """The message as a JSON object (for callers of the v1 client API)."""
        return _ready_dict(self)


@dataclass(frozen=True, slots=True)
class Notice:
    """Chunks ``seq`` .. ``seq + count - 1`` end without audio (count > 1 only in v1.1)."""

    seq: int
    count: int
    code: ErrorCode | int
    message: str

    @property
    def reason(self) -> str:
        return _reason(self.code)


@dataclass(frozen=True, slots=True)
class Event:
    """An analysis result (e.g. VAD) belonging to chunk ``seq``; sent before its outcome."""

    seq: int
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    code: ErrorCode | int
    message: str
    retryable: bool
    seq: int | None = None

    @property
    def name(self) -> str:
        return _reason(self.code)


@dataclass(frozen=True, slots=True)
class Summary:
    session_id: str | None
    chunks_in: int
    chunks_out: int
    dropped: int
    dropped_by_reason: Mapping[str, int]
    latency_ms: Mapping[str, float]

    @property
    def data(self) -> dict[str, Any]:
        return _summary_dict(self)


@dataclass(frozen=True, slots=True)
class GoingAway:
    reason: str
    token: str | None = None

    @property
    def data(self) -> dict[str, Any]:
        return {"type": "going_away", "reason": self.reason, "token": self.token}


@dataclass(frozen=True, slots=True)
class Credit:
    credit: int


@dataclass(frozen=True, slots=True)
class TokenRefresh:
    token: str


@dataclass(frozen=True, slots=True)
class Keepalive:
    pass


ServerMessage = (
    Ready | Notice | Event | ErrorMsg | Summary | GoingAway | Credit | TokenRefresh | Keepalive
)


_KINDS: dict[type, str] = {
    Ready: "ready", Notice: "notice", Event: "event", ErrorMsg: "error", Summary: "summary",
    GoingAway: "going_away", Credit: "credit", TokenRefresh: "token", Keepalive: "keepalive",
}


def _ready_dict(m: Ready) -> dict[str, Any]:
    d: dict[str, Any] = {
        "type": "ready",
        "version": PROTOCOL_VERSION if m.version == V1 else m.version,
        "session_id": m.session_id,
        "max_frame_bytes": m.max_frame_bytes,
    }
    if m.pipeline:
        d["pipeline"] = list(m.pipeline)
    if m.deadline_ms is not None:
        d["deadline_ms"] = m.deadline_ms
    if m.token is not None:
        d["token"] = m.token
    if m.resume_window_s is not None:
        d["resume_window_s"] = m.resume_window_s
    if m.resume_from is not None:
        d["resumed"] = True
        d["resume_from"] = m.resume_from
    if m.rate is not None:
        d["rate"] = {"chunks_per_s": m.rate.chunks_per_s, "burst": m.rate.burst}
    if m.credit is not None:
        d["credit"] = m.credit
    if m.delay_frames is not None:
        d["delay_frames"] = m.delay_frames
    return d


def _summary_dict(m: Summary) -> dict[str, Any]:
    return {
        "type": "summary",
        "session_id": m.session_id,
        "chunks_in": m.chunks_in,
        "chunks_out": m.chunks_out,
        "dropped": m.dropped,
        "dropped_by_reason": dict(m.dropped_by_reason),
        "latency_ms": dict(m.latency_ms),
    }


def _server_dict(msg: ServerMessage) -> dict[str, Any]:
    if isinstance(msg, Ready):
        return _ready_dict(msg)
    if isinstance(msg, Notice):
        d: dict[str, Any] = {"type": "notice", "seq": msg.seq}
        if msg.count != 1:
            d["count"] = msg.count
        d.update(code=int(msg.code), reason=msg.reason, message=msg.message)
        return d
    if isinstance(msg, Event):
        return {"type": "event", "seq": msg.seq,
                **{k: v for k, v in msg.fields.items() if k not in ("type", "seq")}}
    if isinstance(msg, ErrorMsg):
        d = {"type": "error", "code": int(msg.code), "name": msg.name,
             "message": msg.message, "retryable": msg.retryable}
        if msg.seq is not None:
            d["seq"] = msg.seq
        return d
    if isinstance(msg, Summary):
        return _summary_dict(msg)
    if isinstance(msg, GoingAway):
        return msg.data
    if isinstance(msg, Credit):
        return {"type": "credit", "credit": msg.credit}
    if isinstance(msg, TokenRefresh):
        return {"type": "token", "token": msg.token}
    return {"type": "keepalive"}


def encode_server(msg: ServerMessage) -> str:
    """The one place server->client JSON is written."""
    return json.dumps(_server_dict(msg), separators=(",", ":"))


def _get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = d.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"server message field {key!r} is missing or has the wrong type")
    return value


def _opt(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    return None if d.get(key) is None else _get(d, key, kind)


def decode_server(text: str) -> ServerMessage:
    """Parse one server text frame; raises ``ProtocolError`` (only) when it is malformed
    or of an unknown type."""
    try:
        d = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("server sent invalid JSON", ErrorCode.INVALID_JSON) from None
    if not isinstance(d, dict):
        raise ProtocolError("server sent a non-object message")
    kind = d.get("type")
    num = (int, float)
    if kind == "ready":
        rate = d.get("rate")
        version = _parse_version(d.get("version"))
        return Ready(
            session_id=str(_get(d, "session_id", str)),
            max_frame_bytes=int(d.get("max_frame_bytes", 0)) if _is_int(
                d.get("max_frame_bytes", 0)) else 0,
            version=version,
            pipeline=tuple(str(s) for s in (_opt(d, "pipeline", list) or ())),
            deadline_ms=_opt(d, "deadline_ms", int),
            token=_opt(d, "token", str),
            resume_window_s=_opt(d, "resume_window_s", num),
            resume_from=_get(d, "resume_from", int) if d.get("resumed") else None,
            credit=_opt(d, "credit", int),
            delay_frames=_opt(d, "delay_frames", int),
            rate=Rate(float(_get(rate, "chunks_per_s", num)), float(_get(rate, "burst", num)))
            if isinstance(rate, dict) else None,
        )
    if kind == "notice":
        count = d.get("count", 1)
        if not _is_int(count) or count < 1:
            raise ProtocolError("notice count must be a positive integer")
        return Notice(_get(d, "seq", int), count, _code(_get(d, "code", int)),
                      str(d.get("message", "")))
    if kind == "event":
        return Event(_get(d, "seq", int), {k: v for k, v in d.items() if k not in ("type", "seq")})
    if kind == "error":
        return ErrorMsg(_code(_get(d, "code", int)), str(d.get("message", "")),
                        bool(d.get("retryable")), _opt(d, "seq", int))
    if kind == "summary":
        return Summary(_opt(d, "session_id", str), _get(d, "chunks_in", int),
                       _get(d, "chunks_out", int), _get(d, "dropped", int),
                       dict(_get(d, "dropped_by_reason", dict)), dict(_get(d, "latency_ms", dict)))
    if kind == "going_away":
        return GoingAway(str(d.get("reason", "")), _opt(d, "token", str))
    if kind == "credit":
        return Credit(_get(d, "credit", int))
    if kind == "token":
        return TokenRefresh(_get(d, "token", str))
    if kind == "keepalive":
        return Keepalive()
    raise ProtocolError("server sent a message of unknown type", ErrorCode.UNEXPECTED_MESSAGE)


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
    count: int = 1
    """Chunks an (aggregated) notice answers."""

    @property
    def nbytes(self) -> int:
        return len(self.text.encode())


@dataclass(frozen=True, slots=True)
class SendBytes:
    """The audio outcome of chunk ``seq``, received at ``received_at`` (the core's clock)."""

    data: bytes
    seq: int = -1
    received_at: float | None = None

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str

    @property
    def nbytes(self) -> int:
        return 0


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Per-connection limits the core enforces (the gateway fills them from its settings)."""

    chunk_rate: float | None = None
    """v1 token bucket: chunks per second (None: no limit; the gateway's default is 120) ..."""
    chunk_burst: float = 60.0
    """... and how many may come at once."""
    auth_timeout_s: float = 10.0
    """From the upgrade to ``start``; nothing (pings, keepalives) extends it."""
    idle_timeout_s: float = 60.0
    """A started session with no frame from the client for this long is closed; pings
    never reach the core, so they do not count."""
    credit_window: int = 64
    credit_bytes: int = 4 * 1024 * 1024
    max_outbound_bytes: int = 8 * 1024 * 1024
    """Unwritten bytes for one connection above which the slow-consumer grace starts."""
    slow_consumer_grace_s: float = 10.0
    flood_burst: float = 300.0
    """Chunks over the limit (credit or rate) tolerated at once before closing 4025 ..."""
    flood_rate: float = 60.0
    """... refilled at this many per second."""
    max_pre_start_text: int = MAX_PRE_START_TEXT
    max_text: int = MAX_TEXT


@dataclass(slots=True)
class _Pending:
    audio: bytes | None = None
    notice: tuple[ErrorCode, str] | None = None
    events: list[Mapping[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class _NoticeRun:
    """A v1.1 notice still in the outbox: consecutive seqs with one reason merge."""

    seq: int
    count: int
    code: ErrorCode
    message: str


def credit_window(max_frame_bytes: int, limits: Limits) -> int:
    """Chunks a v1.1 client may have outstanding: bounded in count and in bytes."""
    return max(2, min(limits.credit_bytes // max(1, max_frame_bytes), limits.credit_window))


class ServerProtocol:
    """One client session on the server, as a state machine over frames."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits = limits or Limits()
        self.state = State.AWAITING_START
        self.version = V1
        self.format: AudioFormat | None = None
        """The PCM format the pipeline sees (and answers are in)."""
        self.codec = Codec.PCM
        """How the client's binary frames carry audio (from ``start``)."""
        self.session_id: str | None = None
        self._clock = clock
        now = clock()
        self._out: list[Output | _NoticeRun] = []
        self.next_in = 0
        """Seq the next accepted binary frame gets."""
        self.next_out = 0
        """Seq of the next outcome to send."""
        self.delivered = 0
        """Outcomes written to the socket (seq 0 .. delivered-1)."""
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
        self.over_credit = 0
        self._bucket = (TokenBucket(limits.chunk_rate, limits.chunk_burst, now)
                        if limits.chunk_rate is not None else None)
        self._flood = TokenBucket(limits.flood_rate, limits.flood_burst, now)
        self.window = 0
        self.credit = 0
        """v1.1: the bound last granted (the client may send seq < credit)."""
        self._auth_deadline = now + limits.auth_timeout_s
        self._last_activity = now
        self._reading_paused = False
        # Outbound accounting: bytes handed to the adapter, bytes it wrote, and for every
        # output that completes outcomes, the byte offset at which it is written.
        self._handed = 0
        self._written = 0
        self._outbox_bytes = 0
        self._marks: deque[tuple[int, int]] = deque()
        self._summary_end: int | None = None
        self._over_since: float | None = None
        # Bytes of a resume's replay not written yet: exempt from the outbound caps.
        self._replaying = False
        self._replay_bytes = 0

    # -- helpers ------------------------------------------------------------------
    def _internal(self, trigger: str) -> None:
        nxt = INTERNAL.get((self.state, trigger))
        if nxt is None:
            raise ProtocolError(f"{trigger!r} is not allowed in state {self.state.value}",
                                ErrorCode.UNEXPECTED_MESSAGE)
        self.state = nxt

    def _push(self, item: Output | _NoticeRun, size: int) -> None:
        self._out.append(item)
        self._outbox_bytes += size
        if self._replaying:
            self._replay_bytes += size
        self._check_outbound()

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Outcomes delivered inside this block are a resume's replay. The journal a
        client that stopped reading leaves behind can hold more than the hard cap (what
        was unwritten at the close plus what was in flight); counted against the caps it
        would close the resumed connection 4023 at once, so the session could never
        finish. The journal bounds the replay instead; only later outcomes count."""
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False
            self._check_outbound()

    def send(self, msg: ServerMessage) -> None:
        """Queue a control message (e.g. a refreshed resume token)."""
        if self.state is not State.CLOSED:
            self._send(msg)

    def _send(self, msg: ServerMessage, outcomes: int = 0) -> None:
        text = encode_server(msg)
        kind = _KINDS[type(msg)]
        label = msg.reason if isinstance(msg, Notice) else (
            msg.name if isinstance(msg, ErrorMsg) else "")
        self._push(SendText(text, kind, label, outcomes or 1), len(text))

    def send_token(self, token: str) -> None:
        self.send(TokenRefresh(token))

    def _error(self, err: AudioStreamError, *, seq: int | None = None) -> None:
        self._send(ErrorMsg(err.code, err.message, err.retryable, seq))

    @property
    def outstanding(self) -> int:
        """Chunks accepted whose outcome has not been queued yet."""
        return self.next_in - self.next_out

    @property
    def unwritten_bytes(self) -> int:
        """Bytes queued for this connection that the adapter has not written yet."""
        return self._outbox_bytes + self._handed - self._written

    @property
    def _counted_bytes(self) -> int:
        """Unwritten bytes that count against the caps (a replay does not). The replay
        follows ``ready`` in the outbox, so it is credited with the first bytes written
        after it was queued: off by the size of ``ready`` at most."""
        return self.unwritten_bytes - self._replay_bytes

    @property
    def has_output(self) -> bool:
        """Something is queued to write. ``written`` can queue a v1.1 ``credit`` itself, so
        an adapter checks this after every batch: a grant left here while the client waits
        for it would stall the session until some unrelated event."""
        return bool(self._out)

    @property
    def audio_only_out(self) -> bool:
        """Everything queued to write is audio (an adapter may then write it at once)."""
        return all(type(item) is SendBytes for item in self._out)

    @property
    def finished(self) -> bool:
        """The summary was written to the socket: the session ended cleanly."""
        return self._summary_end is not None and self._written >= self._summary_end

    @property
    def max_frame_bytes(self) -> int:
        assert self.format is not None
        if self.codec is Codec.OPUS:
            return OPUS_MAX_FRAME_BYTES
        return self.format.bytes_for_ms(MAX_CHUNK_MS)

    def data_to_send(self) -> list[Output]:
        """What to write, in order; call ``written`` for each once it is on the wire."""
        items, self._out = self._out, []
        self._outbox_bytes = 0
        out: list[Output] = []
        for item in items:
            o: Output
            if isinstance(item, _NoticeRun):
                n = Notice(item.seq, item.count, item.code, item.message)
                o = SendText(encode_server(n), "notice", n.reason, item.count)
            else:
                o = item
            size = o.nbytes
            self._handed += size
            if isinstance(o, SendBytes):
                self._marks.append((self._handed, 1))
            elif isinstance(o, SendText) and o.kind == "notice":
                self._marks.append((self._handed, o.count))
            elif isinstance(o, SendText) and o.kind == "summary":
                self._summary_end = self._handed
            out.append(o)
        return out

    def written(self, nbytes: int) -> None:
        """The adapter wrote ``nbytes`` more to the socket: outcomes count as delivered,
        v1.1 credit rises, and the slow-consumer clock may stop."""
        self._written += nbytes
        self._replay_bytes = max(0, self._replay_bytes - nbytes)
        delivered = self.delivered
        while self._marks and self._marks[0][0] <= self._written:
            delivered += self._marks.popleft()[1]
        if delivered != self.delivered:
            self.delivered = delivered
            self._grant()
        self._check_outbound()

    def _grant(self) -> None:
        if self.version != V1_1 or self.state is State.CLOSED or self.window == 0:
            return
        bound = self.delivered + self.window
        rose = bound - self.credit
        # Quarter-window steps only: a grant whenever everything sent is answered would
        # add a message per chunk at idle; the client still has three quarters left.
        if rose >= max(1, self.window // 4):
            self.credit = bound
            self._send(Credit(bound))

    def _check_outbound(self) -> None:
        unwritten = self._counted_bytes
        if unwritten > self.limits.max_outbound_bytes:
            if self._over_since is None:
                self._over_since = self._clock()
            if unwritten > HARD_OUTBOUND_FACTOR * self.limits.max_outbound_bytes:
                # The grace bounds time, this bounds memory: due now.
                self._over_since = min(self._over_since,
                                       self._clock() - self.limits.slow_consumer_grace_s)
        else:
            self._over_since = None

    def _slow_consumer(self) -> AudioStreamError:
        return AudioStreamError(
            f"the client read too slowly: over {self.limits.max_outbound_bytes} bytes "
            f"unread for {self.limits.slow_consumer_grace_s:g} s; resume the session",
            ErrorCode.SLOW_CONSUMER)

    # -- time ---------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When ``poll`` has something to do next (core clock), or None."""
        due: list[float] = []
        if self.state is State.AWAITING_START:
            due.append(self._auth_deadline)
        elif self._idle_clock_runs():
            due.append(self._last_activity + self.limits.idle_timeout_s)
        if self._over_since is not None and self.state is not State.CLOSED:
            due.append(self._over_since + self.limits.slow_consumer_grace_s)
        return min(due) if due else None

    def _idle_clock_runs(self) -> bool:
        return (not self._reading_paused
                and self.state in (State.STREAMING, State.STOPPING, State.DRAINING))

    def pause_reading(self) -> None:
        """The adapter stopped reading the socket (back-pressure). Silence from the client
        is then ours, not theirs: the idle clock stops until ``resume_reading``."""
        self._reading_paused = True

    def resume_reading(self) -> None:
        """Reading again: the client gets a whole idle timeout from now."""
        self._reading_paused = False
        self._last_activity = self._clock()

    def poll(self, now: float) -> None:
        """Fire whatever deadline has passed at ``now``."""
        if self.state is State.CLOSED:
            return
        if self.state is State.AWAITING_START and now >= self._auth_deadline:
            self.fail(AudioStreamError("no start message in time", ErrorCode.AUTH_TIMEOUT))
        elif (self._over_since is not None
              and now >= self._over_since + self.limits.slow_consumer_grace_s):
            self.fail(self._slow_consumer())
        elif self._idle_clock_runs() and (
                now >= self._last_activity + self.limits.idle_timeout_s):
            self.fail(AudioStreamError(
                f"nothing received for {self.limits.idle_timeout_s:g} s",
                ErrorCode.IDLE_TIMEOUT))

    # -- inbound ------------------------------------------------------------------
    def receive_text(self, text: str) -> list[ServerEvent]:
        if self.state is State.CLOSED:
            return []
        cap = (self.limits.max_pre_start_text if self.state is State.AWAITING_START
               else self.limits.max_text)
        if len(text) > cap or (len(text) * 4 > cap and len(text.encode()) > cap):
            self.fail(ProtocolError(
                f"text frame over {cap} bytes"
                + (" before start" if self.state is State.AWAITING_START else ""),
                ErrorCode.FRAME_TOO_LARGE))
            return []
        self._last_activity = self._clock()
        try:
            msg = parse_client_message(text)
        except AudioStreamError as err:
            if self.state is State.AWAITING_START:
                self.fail(err)
            else:
                self._error(err)
            return []
        return self._react(msg, None)

    def receive_bytes(self, data: bytes) -> list[ServerEvent]:
        if self.state is State.CLOSED:
            return []
        self._last_activity = self._clock()
        return self._react(AudioFrame(data), data)

    def _react(self, msg: ClientMessage | AudioFrame, data: bytes | None) -> list[ServerEvent]:
        before = self.state
        reaction, nxt = TABLE[(before, type(msg))]
        name = _MESSAGE_NAMES[type(msg)]
        if reaction is Reaction.FAIL:
            self.fail(ProtocolError(_refusal(before, name), ErrorCode.UNEXPECTED_MESSAGE))
            return []
        if reaction is Reaction.REPORT:
            self._error(ProtocolError(_refusal(before, name), ErrorCode.UNEXPECTED_MESSAGE))
            return []
        if reaction is Reaction.IGNORE:
            return []
        if reaction is Reaction.KEEPALIVE:
            self._send(Keepalive())
            return [KeepaliveReceived()]
        if reaction is Reaction.ACK:
            assert isinstance(msg, AckMessage)
            if msg.received > self.next_out:
                self._error(ProtocolError(
                    f"ack of {msg.received} outcomes but only {self.next_out} were sent"))
                return []
            return [AckReceived(msg.received)]
        self.state = nxt
        if reaction is Reaction.ACCEPT:
            assert isinstance(msg, StartMessage)
            self.version = msg.version
            self.codec = msg.codec
            return [StartRequested(msg)]
        if reaction is Reaction.FLUSH:
            self._maybe_finish()
            return [StopRequested()]
        assert reaction is Reaction.PROCESS and data is not None
        return self._chunk(data)

    def _chunk(self, data: bytes) -> list[ServerEvent]:
        assert self.format is not None
        seq = self.next_in
        self.next_in += 1
        now = self._clock()
        self._received_at[seq] = now
        if self.version == V1_1:
            if seq >= self.credit:
                self.over_credit += 1
                self._over_limit(now)
                self.deliver_notice(seq, ErrorCode.CREDIT_EXCEEDED,
                                    f"sent beyond the granted credit ({self.credit})")
                return []
        elif self._bucket is not None and not self._bucket.take(now):
            self.rate_limited += 1
            self._over_limit(now)
            self.deliver_notice(
                seq, ErrorCode.RATE_LIMITED,
                f"more than {self._bucket.rate:g} chunks/s (burst {self._bucket.burst:g})")
            return []
        try:
            if len(data) > self.max_frame_bytes:
                raise ProtocolError(
                    f"frame of {len(data)} bytes exceeds {self.max_frame_bytes} "
                    f"({MAX_CHUNK_MS} ms of {self.format.encoding} audio)"
                    if self.codec is Codec.PCM else f"({self.codec} frames)",
                    ErrorCode.FRAME_TOO_LARGE,
                )
            if self.codec is Codec.OPUS:
                frames = check_opus_chunk(self.format, data)
                if frames > self.format.sample_rate * MAX_CHUNK_MS // 1000:
                    raise ProtocolError(
                        f"frame of Opus packets lasting {frames * 1000 // self.format.sample_rate}"
                        f" ms exceeds {MAX_CHUNK_MS} ms", ErrorCode.FRAME_TOO_LARGE)
            else:
                check_chunk(self.format, data)
        except AudioStreamError as err:
            self.deliver_notice(seq, err.code, err.message)
            return []
        return [ChunkReceived(seq, data, now)]

    def _over_limit(self, now: float) -> None:
        if not self._flood.take(now):
            self.fail(AudioStreamError(
                "persistent flooding: far more chunks than the credit or rate allows",
                ErrorCode.FLOODING))

    # -- decisions from the adapter --------------------------------------------------
    def accept(
        self,
        session_id: str,
        fmt: AudioFormat,
        *,
        pipeline: Iterable[str] = (),
        deadline_ms: int | None = None,
        token: str | None = None,
        resume_window_s: float | None = None,
        resume_from: int | None = None,
        delivered: int = 0,
        delay_frames: int | None = None,
    ) -> None:
        """Send ``ready``. A resumed session (``resume_from`` set) continues at that seq
        with ``delivered`` outcomes already in the client's hands."""
        next_seq = resume_from if resume_from is not None else 0
        if not 0 <= delivered <= next_seq:
            raise ValueError("delivered must be within [0, resume_from]")
        self._internal("accept")
        self.session_id = session_id
        self.format = fmt
        self.next_in = next_seq
        self.next_out = self.delivered = delivered
        rate = (Rate(self._bucket.rate, self._bucket.burst)
                if self._bucket is not None and self.version == V1 else None)
        if self.version == V1_1:
            self.window = credit_window(self.max_frame_bytes, self.limits)
            self.credit = delivered + self.window
        self._last_activity = self._clock()
        self._send(Ready(
            session_id=session_id, max_frame_bytes=self.max_frame_bytes, version=self.version,
            pipeline=tuple(pipeline), deadline_ms=deadline_ms, token=token,
            resume_window_s=resume_window_s, resume_from=resume_from,
            credit=self.credit if self.version == V1_1 else None, rate=rate,
            delay_frames=delay_frames))

    def reject(self, err: AudioStreamError) -> None:
        self._error(err)
        self._internal("reject")
        self._close(int(err.code), err.code.name.lower())

    def fail(self, err: AudioStreamError) -> None:
        """A session-level error: report it and close with its code."""
        if self.state is State.CLOSED:
            return
        self._error(err)
        self._internal("fail")
        self._close(int(err.code), err.code.name.lower())

    def go_away(self, reason: str, token: str | None) -> None:
        """Server draining: tell the client to reconnect elsewhere; audio sent from now
        on is not accepted. ``finish_drain`` closes with 1001 once outcomes are out."""
        if self.state is State.STREAMING:
            self._send(GoingAway(reason, token))
            self._internal("drain")
        elif self.state in (State.AWAITING_START, State.STARTING):
            self.state = State.CLOSED
            self._close(GOING_AWAY, "server going away")

    def finish_drain(self) -> None:
        if self.state is State.DRAINING:
            self._internal("drained")
            self._close(GOING_AWAY, "server going away")

    def displace(self) -> None:
        """A newer connection took this session over."""
        self.fail(ProtocolError("the session was resumed on another connection",
                                ErrorCode.DISPLACED))

    def _close(self, code: int, reason: str) -> None:
        self.close_code = code
        self._push(Close(code, reason), 0)

    def _slot(self, seq: int) -> _Pending | None:
        if seq < self.next_out or seq >= self.next_in:
            return None  # already answered, or never accepted: ignore duplicates
        return self._pending.setdefault(seq, _Pending())

    def deliver_event(self, seq: int, event: Mapping[str, Any]) -> None:
        """An event (e.g. VAD speech start) that belongs to chunk ``seq``."""
        slot = self._slot(seq)
        if slot is not None:
            slot.events.append(event)

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
        slot.notice = (code, message)
        self._flush()

    def _flush(self) -> None:
        """Queue every outcome that is next in order."""
        if self.state is State.CLOSED:
            return
        while (slot := self._pending.get(self.next_out)) is not None and (
            slot.audio is not None or slot.notice is not None
        ):
            seq = self.next_out
            del self._pending[seq]
            for ev in slot.events:
                self._send(Event(seq, ev))
            if slot.audio is not None and not self._replaying and (
                    self._counted_bytes + len(slot.audio)
                    > HARD_OUTBOUND_FACTOR * self.limits.max_outbound_bytes):
                self.fail(self._slow_consumer())  # memory bound: no grace
                return
            received = self._received_at.pop(seq, None)
            if slot.audio is not None:
                self._push(SendBytes(slot.audio, seq, received), len(slot.audio))
                self.chunks_out += 1
                if received is not None:
                    self.latencies_ms.append((self._clock() - received) * 1000)
                    self.measured += 1
                    if len(self.latencies_ms) > 2 * LATENCY_WINDOW:
                        del self.latencies_ms[:LATENCY_WINDOW]
            else:
                assert slot.notice is not None
                code, message = slot.notice
                self._queue_notice(seq, code, message)
                reason = code.name.lower()
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
            self.next_out += 1
        self._maybe_finish()

    def _queue_notice(self, seq: int, code: ErrorCode, message: str) -> None:
        if self.version == V1_1:
            last = self._out[-1] if self._out else None
            if (isinstance(last, _NoticeRun) and last.code is code and last.message == message
                    and last.seq + last.count == seq):
                last.count += 1
                return
            self._push(_NoticeRun(seq, 1, code, message), 100 + len(message))
            return
        self._send(Notice(seq, 1, code, message))

    def _maybe_finish(self) -> None:
        if self.state is State.STOPPING and self.outstanding == 0:
            self._send(self.summary_message())
            self._internal("last outcome queued → `summary` + close 1000")
            self._close(NORMAL_CLOSURE, "done")

    def summary_message(self) -> Summary:
        return Summary(self.session_id, self.next_in, self.chunks_out,
                       sum(self.dropped.values()), dict(self.dropped),
                       latency_summary(self.latencies_ms))

    def summary(self) -> dict[str, Any]:
        return self.summary_message().data


def _refusal(state: State, kind: str) -> str:
    if state in (State.AWAITING_START, State.STARTING):
        if kind == "audio":
            return "audio before start"
        if kind == "start":
            return "the session is already starting"
        return f"{kind} before ready"
    if kind == "start":
        return "the session has already started"
    if kind == "audio":
        return "audio after stop"
    return f"{kind} is not allowed in state {state.value}"


# --- resume ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """How a resumed session continues: the client holds seq < ``delivered``; the
    journal's outcomes of ``replay`` are sent again, ``expired`` seqs get notices, and
    the client re-sends from ``resume_from``."""

    delivered: int
    resume_from: int
    replay: tuple[int, ...]
    expired: tuple[int, ...]


#: When the previous connection's count of answered chunks is unknown (it was on another
#: gateway), a client may claim at most this many outcomes beyond the journal's newest
#: reply: outcomes the gateway answered itself (rate_limited, expired at the gateway)
#: leave no reply in the journal.
RESUME_SLACK = 4096


def plan_resume(covered: Iterable[range], received: int, *,
                answered: int | None = None) -> ResumePlan:
    """Plan a resume from the seqs the journal's replies cover, the client's ``received``
    and, when known, how many outcomes the previous connection ``answered``. The client
    cannot hold more than was answered: a larger ``received`` is refused
    (``resume_failed``), never trusted."""
    ranges = [r for r in covered if len(r)]
    end = max((r.stop for r in ranges), default=0)
    # ``answered`` is exact unless the session moved on elsewhere since (then the
    # journal covers more than it).
    bound = answered if answered is not None and end <= answered else end + RESUME_SLACK
    if received > bound:
        raise ProtocolError(
            f"resume claims {received} outcomes but at most {bound} were answered",
            ErrorCode.RESUME_FAILED)
    resume_from = max(end, received)
    have = sorted({s for r in ranges for s in r if s >= received})
    have_set = set(have)
    expired = tuple(s for s in range(received, resume_from) if s not in have_set)
    return ResumePlan(received, resume_from, tuple(have), expired)


# --- client core ------------------------------------------------------------------------


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
    count: int = 1


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


ClientEvent = (
    Ready | AudioOutcome | DropNotice | StreamEvent | ServerError | Summary | GoingAway
    | TokenRefresh | Credit
)


class ClientProtocol:
    """Client side of protocols v1 and v1.1: numbers chunks, checks outcomes arrive in
    order, and tracks credit (``may_send``)."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.session_id: str | None = None
        self.ready_info: Mapping[str, Any] = {}
        self.ready: Ready | None = None
        self.token: str | None = None
        self.credit: int | None = None
        """v1.1: chunks with seq < credit may be sent; None for v1 (no credit)."""

    def next_seq(self) -> int:
        seq = self.sent
        self.sent += 1
        return seq

    def may_send(self) -> bool:
        """Whether the next chunk is within credit (always True on v1)."""
        return self.credit is None or self.sent < self.credit

    @property
    def outstanding(self) -> int:
        return self.sent - self.received

    def receive_bytes(self, data: bytes) -> AudioOutcome:
        if self.received >= self.sent:
            raise ProtocolError("server sent audio for a chunk that was never sent")
        outcome = AudioOutcome(self.received, data)
        self.received += 1
        return outcome

    def receive_message(self, msg: ServerMessage) -> None:
        """Update the client's counters from one decoded server message."""
        if isinstance(msg, Ready):
            self.ready = msg
            self.session_id = msg.session_id
            self.ready_info = msg.info
            self.token = msg.token or self.token
            self.credit = msg.credit
            if msg.resume_from is not None:
                # The server has everything before resume_from; outcomes from
                # `received` on are replayed; the client re-sends from resume_from.
                if msg.resume_from < self.received:
                    raise ProtocolError("server resumed before what we already have")
                self.sent = msg.resume_from
        elif isinstance(msg, Notice):
            if msg.seq != self.received:
                raise ProtocolError(f"notice for seq {msg.seq}, expected {self.received}")
            if msg.seq + msg.count > self.sent:
                raise ProtocolError("server sent a notice for a chunk that was never sent")
            self.received += msg.count
        elif isinstance(msg, Credit):
            self.credit = max(self.credit or 0, msg.credit)
        elif isinstance(msg, TokenRefresh | GoingAway) and msg.token is not None:
            self.token = msg.token

    def receive_text(self, text: str) -> ClientEvent | None:
        msg = decode_server(text)
        self.receive_message(msg)
        if isinstance(msg, Notice):
            return DropNotice(msg.seq, msg.code, msg.reason, msg.message, msg.count)
        if isinstance(msg, Event):
            return StreamEvent(msg.seq, _server_dict(msg))
        if isinstance(msg, ErrorMsg):
            return ServerError(msg.code, msg.message, msg.retryable, msg.seq)
        if isinstance(msg, Keepalive):
            return None
        return msg
