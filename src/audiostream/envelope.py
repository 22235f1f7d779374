"""Broker messages: the work envelope and the reply. This module alone owns msgpack.

A ``WorkEnvelope`` carries one or more consecutive chunks of one session (the
gateway coalesces chunks that arrive while the previous message is in flight)
through the remaining steps of its pipeline. Per-step state rides along so any
worker can process any message. The last step sends a ``Reply`` to the
session's reply queue. Both carry a version; an unknown version is refused, not
guessed at.

On the work queues, one broker message is a *bundle* of envelopes of many
sessions bound for the same processing type: the per-message cost of AMQP
(framing, confirms, acks, a task per delivery) is paid once per bundle, not
once per session, which is what lets a worker core carry ~100 sessions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

from audiostream.audio import AudioFormat
from audiostream.errors import ErrorCode, ProtocolError

ENVELOPE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Step:
    """One processing step of a pipeline: a processing type and its parameters."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [self.name, dict(self.params)]

    @classmethod
    def from_wire(cls, raw: Any) -> Step:
        if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str)):
            raise ProtocolError(f"bad step {raw!r}")
        if not isinstance(raw[1], dict):
            raise ProtocolError(f"bad step params {raw[1]!r}")
        return cls(raw[0], raw[1])


class ReplyStatus(StrEnum):
    OK = "ok"
    EXPIRED = "expired"
    FAILED = "failed"


def state_key(index: int, step: Step) -> str:
    """Key of a step's state in the envelope; the index keeps repeated steps apart."""
    return f"{index}:{step.name}"


@dataclass(frozen=True, slots=True)
class WorkEnvelope:
    session_id: str
    msg_id: int
    """Per-session message counter; the gateway accepts a reply only for the
    message it is waiting for, which discards redelivery duplicates."""
    seq: int
    """Sequence number of the first chunk carried."""
    chunk_frames: tuple[int, ...]
    """Sample frames per chunk in ``audio`` (its format), to split the result."""
    received_at: float
    """Wall-clock time the gateway received the oldest chunk."""
    deadline: float
    """Wall-clock time after which the result is useless and must not be produced."""
    format: AudioFormat
    output_format: AudioFormat
    audio: bytes
    pipeline: tuple[Step, ...]
    step_index: int
    """Index in ``pipeline`` of the step this message is queued for."""
    reply_to: str
    state: Mapping[str, bytes] = field(default_factory=dict)
    events: tuple[Mapping[str, Any], ...] = ()
    timings: tuple[tuple[str, float], ...] = ()
    version: int = ENVELOPE_VERSION

    @property
    def step(self) -> Step:
        return self.pipeline[self.step_index]

    @property
    def is_last_step(self) -> bool:
        return self.step_index == len(self.pipeline) - 1

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_frames)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.deadline


@dataclass(frozen=True, slots=True)
class Reply:
    session_id: str
    msg_id: int
    seq: int
    status: ReplyStatus
    chunk_frames: tuple[int, ...]
    """Frames per chunk in ``audio``; its length is the number of chunks answered."""
    format: AudioFormat
    audio: bytes = b""
    state: Mapping[str, bytes] = field(default_factory=dict)
    events: tuple[Mapping[str, Any], ...] = ()
    timings: tuple[tuple[str, float], ...] = ()
    error_code: int | None = None
    error_message: str | None = None
    error_step: str | None = None
    version: int = ENVELOPE_VERSION

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_frames)


@dataclass(frozen=True, slots=True)
class Control:
    """A message to whoever consumes a session's reply queue (e.g. "displace":
    another gateway takes the session over)."""

    session_id: str
    command: str
    nonce: str
    version: int = ENVELOPE_VERSION
    generation: int = 0
    """The sender's resume-token generation: a holder yields only to a newer one
    (optional on the wire, 0 when absent)."""
    reply_to: str = ""
    """Where a holder that refuses a "displace" says so at once (the taker's inbox
    queue), so the taker need not wait for its takeover to time out (optional on the
    wire, empty when absent)."""


def redistribute(lengths: Sequence[int], new_total: int) -> tuple[int, ...]:
    """Split ``new_total`` frames over chunks in proportion to ``lengths``.

    Used when a step changes the number of frames (resampling); exact when the
    total is unchanged.
    """
    old_total = sum(lengths)
    if old_total == new_total:
        return tuple(lengths)
    if old_total == 0:
        if not lengths:
            raise ValueError(f"cannot split {new_total} frames over no chunks")
        # Nothing to be proportional to: split evenly, so the parts still add up.
        return redistribute([1] * len(lengths), new_total)
    out: list[int] = []
    cum_old = 0
    prev = 0
    for n in lengths:
        cum_old += n
        edge = (cum_old * new_total) // old_total if old_total else 0
        out.append(edge - prev)
        prev = edge
    return tuple(out)


# --- wire encoding --------------------------------------------------------------------

_KIND_WORK = "w"
_KIND_BUNDLE = "b"
_KIND_REPLY = "r"
_KIND_CONTROL = "c"


def _fmt_wire(fmt: AudioFormat) -> list[Any]:
    return [str(fmt.encoding), fmt.sample_rate, fmt.channels]


#: Formats already parsed, by wire value and types (``True`` must not pass for ``1``):
#: every envelope carries two, and a worker sees the same few all day.
_FORMATS: dict[tuple[Any, ...], AudioFormat] = {}


def _fmt_parse(raw: Any) -> AudioFormat:
    if not (isinstance(raw, list) and len(raw) == 3):
        raise ProtocolError(f"bad audio format {raw!r}")
    key = (*raw, *map(type, raw))
    try:
        known = _FORMATS.get(key)
    except TypeError:  # an unhashable field: from_dict says what is wrong
        known = None
    if known is not None:
        return known
    fmt = AudioFormat.from_dict({"encoding": raw[0], "sample_rate": raw[1], "channels": raw[2]})
    if len(_FORMATS) >= 256:
        _FORMATS.clear()
    _FORMATS[key] = fmt
    return fmt


def encode_work(env: WorkEnvelope) -> bytes:
    return msgpack.packb(_work_body(env), use_bin_type=True)


def encode_work_bundle(envelopes: Sequence[WorkEnvelope]) -> bytes:
    """One broker message carrying the envelopes of many sessions for one processing type."""
    if not envelopes:
        raise ValueError("a bundle needs at least one envelope")
    body = {"k": _KIND_BUNDLE, "v": ENVELOPE_VERSION, "items": [_work_body(e) for e in envelopes]}
    return msgpack.packb(body, use_bin_type=True)


def _work_body(env: WorkEnvelope) -> dict[str, Any]:
    return {
        "k": _KIND_WORK,
        "v": env.version,
        "sid": env.session_id,
        "mid": env.msg_id,
        "seq": env.seq,
        "cf": env.chunk_frames,
        "rx": env.received_at,
        "dl": env.deadline,
        "fmt": _fmt_wire(env.format),
        "ofmt": _fmt_wire(env.output_format),
        "pcm": env.audio,
        "pl": [s.to_wire() for s in env.pipeline],
        "si": env.step_index,
        "rt": env.reply_to,
        "st": _as_dict(env.state),
        "ev": [_as_dict(e) for e in env.events],
        "tm": env.timings,  # tuples pack as arrays
    }


def _as_dict(m: Mapping[str, Any]) -> dict[str, Any]:
    """msgpack packs only real dicts; most mappings here already are one (no copy)."""
    return m if type(m) is dict else dict(m)


def encode_reply(reply: Reply, *, also: Sequence[tuple[str, float]] = ()) -> bytes:
    """``also``: timings to append on the wire (the moment of sending, without a copy)."""
    body = {
        "k": _KIND_REPLY,
        "v": reply.version,
        "sid": reply.session_id,
        "mid": reply.msg_id,
        "seq": reply.seq,
        "s": str(reply.status),
        "cf": reply.chunk_frames,
        "fmt": _fmt_wire(reply.format),
        "pcm": reply.audio,
        "st": _as_dict(reply.state),
        "ev": [_as_dict(e) for e in reply.events],
        "tm": (*reply.timings, *also),
        "ec": reply.error_code,
        "em": reply.error_message,
        "es": reply.error_step,
    }
    return msgpack.packb(body, use_bin_type=True)


def encode_control(ctl: Control) -> bytes:
    body = {"k": _KIND_CONTROL, "v": ctl.version, "sid": ctl.session_id,
            "cmd": ctl.command, "n": ctl.nonce}
    if ctl.generation:
        body["g"] = ctl.generation
    if ctl.reply_to:
        body["rt"] = ctl.reply_to
    return msgpack.packb(body, use_bin_type=True)


def decode_reply_queue_message(data: bytes) -> Reply | Control:
    """What a reply queue carries: replies, and now and then a control message."""
    body = _unpack(data, (_KIND_REPLY, _KIND_CONTROL))
    if body["k"] == _KIND_CONTROL:
        generation = body.get("g", 0)
        reply_to = body.get("rt", "")
        return Control(_typed(body, "sid", str), _typed(body, "cmd", str), _typed(body, "n", str),
                       generation=generation if isinstance(generation, int) else 0,
                       reply_to=reply_to if isinstance(reply_to, str) else "")
    return _reply_from(body)


def _unpack(data: bytes, kind: str | tuple[str, ...]) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable message: {exc}") from exc
    kinds = (kind,) if isinstance(kind, str) else kind
    if not isinstance(body, dict) or body.get("k") not in kinds:
        raise ProtocolError(f"not a {kind!r} message")
    if body.get("v") != ENVELOPE_VERSION:
        raise ProtocolError(
            f"envelope version {body.get('v')!r} is not supported (expected {ENVELOPE_VERSION})",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    return body


def _typed(body: Mapping[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise ProtocolError(f"field {key!r} has a bad type: {type(value).__name__}")
    return value


def _state(raw: Any) -> dict[str, bytes]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, bytes) for k, v in raw.items()
    ):
        raise ProtocolError("field 'st' must map str to bytes")
    return raw


def _timings(raw: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, list):
        raise ProtocolError("field 'tm' must be a list")
    return tuple((str(t[0]), float(t[1])) for t in raw)


def _frames(raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(n, int) and n >= 0 for n in raw):
        raise ProtocolError("field 'cf' must be a list of frame counts")
    return tuple(raw)


def decode_work(data: bytes) -> WorkEnvelope:
    return _work_from(_unpack(data, _KIND_WORK))


def decode_work_message(data: bytes) -> tuple[list[WorkEnvelope], list[ProtocolError]]:
    """What a work queue carries: a single envelope or a bundle.

    A bundle is decoded item by item: a malformed item is returned as an error
    (its session's gateway answers those chunks when their deadline passes) and
    does not cost its neighbours their audio. A message that is not a work
    message at all raises.
    """
    body = _unpack(data, (_KIND_WORK, _KIND_BUNDLE))
    if body["k"] == _KIND_WORK:
        return [_work_from(body)], []
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise ProtocolError("a work bundle needs a non-empty 'items' list")
    good: list[WorkEnvelope] = []
    bad: list[ProtocolError] = []
    for raw in items:
        try:
            if not isinstance(raw, dict) or raw.get("k") != _KIND_WORK:
                raise ProtocolError("a bundle item is not a work envelope")
            if raw.get("v") != ENVELOPE_VERSION:
                raise ProtocolError(
                    f"envelope version {raw.get('v')!r} is not supported "
                    f"(expected {ENVELOPE_VERSION})",
                    ErrorCode.UNSUPPORTED_VERSION,
                )
            good.append(_work_from(raw))
        except ProtocolError as err:
            bad.append(err)
    return good, bad


def _work_from(body: dict[str, Any]) -> WorkEnvelope:
    try:
        pipeline = tuple(Step.from_wire(s) for s in _typed(body, "pl", list))
        step_index = _typed(body, "si", int)
        if not 0 <= step_index < len(pipeline):
            raise ProtocolError(f"step index {step_index} outside the pipeline")
        return WorkEnvelope(
            session_id=_typed(body, "sid", str),
            msg_id=_typed(body, "mid", int),
            seq=_typed(body, "seq", int),
            chunk_frames=_frames(body.get("cf")),
            received_at=float(_typed(body, "rx", (int, float))),
            deadline=float(_typed(body, "dl", (int, float))),
            format=_fmt_parse(body.get("fmt")),
            output_format=_fmt_parse(body.get("ofmt")),
            audio=_typed(body, "pcm", bytes),
            pipeline=pipeline,
            step_index=step_index,
            reply_to=_typed(body, "rt", str),
            state=_state(body.get("st", {})),
            events=tuple(_typed(body, "ev", list)),
            timings=_timings(body.get("tm", [])),
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed work envelope: {exc}") from exc


def decode_reply(data: bytes) -> Reply:
    return _reply_from(_unpack(data, _KIND_REPLY))


def _reply_from(body: dict[str, Any]) -> Reply:
    try:
        ec = body.get("ec")
        return Reply(
            session_id=_typed(body, "sid", str),
            msg_id=_typed(body, "mid", int),
            seq=_typed(body, "seq", int),
            status=ReplyStatus(_typed(body, "s", str)),
            chunk_frames=_frames(body.get("cf")),
            format=_fmt_parse(body.get("fmt")),
            audio=_typed(body, "pcm", bytes),
            state=_state(body.get("st", {})),
            events=tuple(_typed(body, "ev", list)),
            timings=_timings(body.get("tm", [])),
            error_code=int(ec) if ec is not None else None,
            error_message=body.get("em"),
            error_step=body.get("es"),
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed reply: {exc}") from exc
