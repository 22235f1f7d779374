"""Telephony media streams, sans-I/O: Twilio, Telnyx, Exotel and Asterisk ``chan_websocket``.

Phone platforms speak their own wire formats, not ours. This module turns their
messages into events and a call's processed audio back into their messages, with
no sockets and an injected clock, so every rule below is tested with plain values:

* **Dialects** (``DIALECTS``): Twilio's Media Streams schema and the variants that
  reuse it with other field names (Telnyx, Exotel), plus Asterisk's binary audio /
  text control protocol.
* **Order**: Telnyx may deliver media out of order; ``Reorder`` puts frames back in
  ``chunk`` order within a small window and gives up on a gap only when it must.
* **One outcome per frame**: every inbound frame gets exactly one outbound audio
  frame, or an explicit drop (a log line, a metric and, where the dialect has it, a
  ``mark`` named ``audiostream:drop:...``).
* **Pacing**: Twilio discards audio sent faster than real time (its error 31930)
  without telling anyone, so ``Pacer`` never lets the peer's buffered audio exceed a
  small lead. Asterisk re-times media itself and says XOFF/XON instead.
* **Marks and clear**: a ``mark`` the peer sends comes back after the processed audio
  of the frames that preceded it; a ``clear`` empties what is queued here (and in the
  peer), answering those frames as drops and pending marks at once, as Twilio does.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ErrorCode, ProtocolError

#: Asterisk hangs up on a WebSocket message longer than this.
ASTERISK_MAX_MESSAGE = 65_500
#: Prefix of the marks this gateway invents (drops, clears); the peer's own pass through.
MARK_PREFIX = "audiostream:"


class Dialect(StrEnum):
    TWILIO = "twilio"
    TELNYX = "telnyx"
    EXOTEL = "exotel"
    ASTERISK = "asterisk"
    AUDIOSOCKET = "audiosocket"


@dataclass(frozen=True, slots=True, kw_only=True)
class DialectSpec:
    """What differs between platforms that share Twilio's schema."""

    dialect: Dialect
    stream_key: str
    """Field naming the stream in every message (``streamSid``, ``stream_id``...)."""
    seq_key: str
    params_key: str
    format_key: str
    call_keys: tuple[str, ...]
    wire_format: AudioFormat
    """The format the platform sends (and expects back) unless ``start`` says otherwise."""
    reorder_window: int = 0
    """Frames held back to restore order (0: the platform keeps order)."""
    out_min_bytes: int = 0
    out_max_bytes: int = 1 << 20
    out_multiple: int = 1
    lead_s: float = 0.1
    """Most audio the peer may hold unplayed: the pacing budget."""
    has_marks: bool = True
    binary: bool = False
    """Audio goes out as raw binary pieces (at most ``out_max_bytes``), not JSON media."""
    max_behind_s: float = 0.3
    """Most processed audio queued here beyond the lead. Audio cannot be played faster
    than real time, so a backlog (after a worker stall) would otherwise add its length
    to every later frame's latency for the rest of the call; the oldest frames over
    this are dropped as ``behind`` instead."""


MULAW_8K = AudioFormat(Encoding.MULAW, 8000, 1)
ALAW_8K = AudioFormat(Encoding.ALAW, 8000, 1)
PCM_8K = AudioFormat(Encoding.PCM_S16LE, 8000, 1)

DIALECTS: dict[Dialect, DialectSpec] = {
    Dialect.TWILIO: DialectSpec(
        dialect=Dialect.TWILIO, stream_key="streamSid", seq_key="sequenceNumber",
        params_key="customParameters", format_key="mediaFormat",
        call_keys=("callSid",), wire_format=MULAW_8K),
    Dialect.TELNYX: DialectSpec(
        dialect=Dialect.TELNYX, stream_key="stream_id", seq_key="sequence_number",
        params_key="custom_parameters", format_key="media_format",
        call_keys=("call_control_id", "call_session_id"), wire_format=MULAW_8K,
        reorder_window=8),
    Dialect.EXOTEL: DialectSpec(
        # 16-bit PCM; outbound messages of 3.2 KB .. 100 KB in multiples of 320 B.
        dialect=Dialect.EXOTEL, stream_key="stream_sid", seq_key="sequence_number",
        params_key="custom_parameters", format_key="media_format",
        call_keys=("call_sid",), wire_format=PCM_8K,
        out_min_bytes=3200, out_max_bytes=100_000, out_multiple=320, lead_s=0.25),
    Dialect.ASTERISK: DialectSpec(
        dialect=Dialect.ASTERISK, stream_key="connection_id", seq_key="",
        params_key="", format_key="format", call_keys=("channel",), wire_format=MULAW_8K,
        out_max_bytes=ASTERISK_MAX_MESSAGE, has_marks=False, lead_s=0.2, max_behind_s=2.0,
        binary=True),
    Dialect.AUDIOSOCKET: DialectSpec(
        # Plain TCP; Asterisk plays what arrives, so we own the clock: a short lead.
        dialect=Dialect.AUDIOSOCKET, stream_key="uuid", seq_key="", params_key="",
        format_key="", call_keys=(), wire_format=PCM_8K, out_max_bytes=0xFFFF - 1,
        has_marks=False, lead_s=0.06, binary=True),
}


# -- events (peer -> gateway) ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str = ""


@dataclass(frozen=True, slots=True)
class CallStarted:
    stream_id: str
    call_id: str
    params: Mapping[str, str]
    format: AudioFormat
    optimal_frame_bytes: int = 0


@dataclass(frozen=True, slots=True)
class MediaIn:
    chunk: int
    """The platform's media counter (1, 2, ...), used to restore order."""
    payload: bytes
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class MarkIn:
    name: str


@dataclass(frozen=True, slots=True)
class DtmfIn:
    digit: str


@dataclass(frozen=True, slots=True)
class ClearIn:
    """The peer asks to drop what is queued (barge-in)."""


@dataclass(frozen=True, slots=True)
class FlowOff:
    """Asterisk MEDIA_XOFF: its queue is nearly full; stop sending."""


@dataclass(frozen=True, slots=True)
class FlowOn:
    """Asterisk MEDIA_XON: sending may resume."""


@dataclass(frozen=True, slots=True)
class CallStopped:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message we understood and have no use for (logged at debug)."""

    kind: str


PeerEvent = (Connected | CallStarted | MediaIn | MarkIn | DtmfIn | ClearIn | FlowOff | FlowOn
             | CallStopped | Ignored)


def _field(obj: Mapping[str, Any], key: str, kind: str) -> Any:
    if key not in obj:
        raise ProtocolError(f"{kind} message lacks {key!r}", ErrorCode.PROTOCOL_ERROR)
    return obj[key]


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"{what} must be an integer, not {value!r}",
                            ErrorCode.PROTOCOL_ERROR) from None


def _media_format(spec: DialectSpec, raw: Any) -> AudioFormat:
    """The ``mediaFormat`` of a start message; the dialect's default when absent."""
    if not isinstance(raw, dict):
        return spec.wire_format
    enc = str(raw.get("encoding", "")).lower()
    rate = _int(raw.get("sampleRate", raw.get("sample_rate", 8000)), "sample rate")
    channels = _int(raw.get("channels", 1), "channels")
    if enc in ("audio/x-mulaw", "pcmu", "mulaw", "ulaw"):
        encoding = Encoding.MULAW
    elif enc in ("audio/x-alaw", "pcma", "alaw"):
        encoding = Encoding.ALAW
    elif enc in ("audio/l16", "l16", "slin", "raw/slin", "pcm_s16le"):
        encoding = Encoding.PCM_S16LE
    elif enc in ("", "base64"):  # unnamed (Exotel says only "base64"): the platform's own
        encoding = spec.wire_format.encoding
    else:
        raise ProtocolError(f"unsupported media encoding {enc!r}", ErrorCode.UNSUPPORTED_FORMAT)
    return AudioFormat(encoding, rate, channels)


def parse_json_message(spec: DialectSpec, text: str) -> PeerEvent:
    """One text frame of a Twilio-schema dialect -> an event; ``ProtocolError`` if malformed."""
    try:
        msg = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}", ErrorCode.INVALID_JSON) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
        raise ProtocolError("a message must be an object with an 'event'",
                            ErrorCode.PROTOCOL_ERROR)
    kind = msg["event"]
    if kind == "connected":
        return Connected(str(msg.get("protocol", "")))
    if kind == "start":
        start = _field(msg, "start", kind)
        if not isinstance(start, dict):
            raise ProtocolError("'start' must be an object", ErrorCode.PROTOCOL_ERROR)
        stream = msg.get(spec.stream_key, start.get(spec.stream_key))
        if not isinstance(stream, str) or not stream:
            raise ProtocolError(f"start message lacks {spec.stream_key!r}",
                                ErrorCode.PROTOCOL_ERROR)
        call = next((str(start[k]) for k in spec.call_keys if k in start), "")
        params = start.get(spec.params_key) or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"{spec.params_key} must be an object",
                                ErrorCode.PROTOCOL_ERROR)
        fmt = _media_format(spec, start.get(spec.format_key))
        return CallStarted(stream, call, {str(k): str(v) for k, v in params.items()}, fmt)
    if kind == "media":
        media = _field(msg, "media", kind)
        if not isinstance(media, dict):
            raise ProtocolError("'media' must be an object", ErrorCode.PROTOCOL_ERROR)
        track = media.get("track", "inbound")
        if track not in ("inbound", "inbound_track"):
            return Ignored(f"media:{track}")
        try:
            payload = base64.b64decode(str(_field(media, "payload", kind)), validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("media payload is not base64", ErrorCode.INVALID_AUDIO) from None
        chunk = _int(media.get("chunk", msg.get(spec.seq_key, 0)), "chunk")
        ts = media.get("timestamp")
        return MediaIn(chunk, payload, _int(ts, "timestamp") if ts is not None else None)
    if kind == "mark":
        mark = _field(msg, "mark", kind)
        if not isinstance(mark, dict) or not isinstance(mark.get("name"), str):
            raise ProtocolError("mark needs a name", ErrorCode.PROTOCOL_ERROR)
        return MarkIn(mark["name"])
    if kind == "dtmf":
        dtmf = _field(msg, "dtmf", kind)
        return DtmfIn(str(dtmf.get("digit", "")) if isinstance(dtmf, dict) else "")
    if kind == "clear":
        return ClearIn()
    if kind == "stop":
        return CallStopped("stop")
    return Ignored(kind)


def _asterisk_fields(text: str) -> tuple[str, dict[str, Any]]:
    """Plain-text ``EVENT key:value ...`` or JSON ``{"event": ...}`` (22.8+)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError as exc:
            raise ProtocolError(f"not JSON: {exc}", ErrorCode.INVALID_JSON) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
            raise ProtocolError("control message needs an 'event'", ErrorCode.PROTOCOL_ERROR)
        return obj["event"], obj
    name, *rest = stripped.split()
    fields: dict[str, Any] = {}
    for item in rest:
        key, sep, value = item.partition(":")
        if sep:
            fields[key] = value
    return name, fields


ASTERISK_CODECS: dict[str, AudioFormat] = {
    "ulaw": MULAW_8K,
    "alaw": ALAW_8K,
    "slin": PCM_8K,
    "slin16": AudioFormat(Encoding.PCM_S16LE, 16000, 1),
    "slin24": AudioFormat(Encoding.PCM_S16LE, 24000, 1),
    "slin48": AudioFormat(Encoding.PCM_S16LE, 48000, 1),
}


def parse_asterisk_text(text: str) -> PeerEvent:
    """One chan_websocket TEXT frame -> an event."""
    if not text.strip():
        raise ProtocolError("empty control message", ErrorCode.PROTOCOL_ERROR)
    name, fields = _asterisk_fields(text)
    if name == "MEDIA_START":
        codec = str(fields.get("format", "ulaw")).lower()
        if codec not in ASTERISK_CODECS:
            raise ProtocolError(f"codec {codec!r} is not supported; dial with c(ulaw), "
                                f"c(alaw) or c(slin16)", ErrorCode.UNSUPPORTED_FORMAT)
        fmt = ASTERISK_CODECS[codec]
        optimal = _int(fields.get("optimal_frame_size", 0), "optimal_frame_size")
        raw_vars = fields.get("channel_variables")
        params = ({str(k): str(v) for k, v in raw_vars.items()}
                  if isinstance(raw_vars, dict) else {})
        return CallStarted(str(fields.get("connection_id", "")),
                           str(fields.get("channel_id", fields.get("channel", ""))),
                           params, fmt, optimal)
    if name == "MEDIA_XOFF":
        return FlowOff()
    if name == "MEDIA_XON":
        return FlowOn()
    if name in ("DTMF_END", "DTMF"):
        return DtmfIn(str(fields.get("digit", "")))
    if name == "HANGUP":
        return CallStopped("hangup")
    return Ignored(name)


# -- AudioSocket (TCP): type byte, uint16 big-endian length, payload ----------------
AS_HANGUP, AS_UUID, AS_DTMF, AS_AUDIO, AS_ERROR = 0x00, 0x01, 0x03, 0x10, 0xFF


@dataclass(slots=True)
class AudioSocketReader:
    """Bytes from the TCP stream in, events out (frames may arrive split or merged)."""

    buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[PeerEvent | bytes]:
        self.buffer += data
        out: list[PeerEvent | bytes] = []
        while len(self.buffer) >= 3:
            kind = self.buffer[0]
            length = int.from_bytes(self.buffer[1:3], "big")
            if len(self.buffer) < 3 + length:
                break
            payload = bytes(self.buffer[3 : 3 + length])
            del self.buffer[: 3 + length]
            if kind == AS_UUID:
                if length != 16:
                    raise ProtocolError("AudioSocket UUID must be 16 bytes",
                                        ErrorCode.PROTOCOL_ERROR)
                out.append(CallStarted(payload.hex(), payload.hex(), {}, PCM_8K))
            elif kind == AS_AUDIO:
                out.append(payload)
            elif kind == AS_DTMF:
                out.append(DtmfIn(payload.decode("ascii", "replace")))
            elif kind == AS_HANGUP:
                out.append(CallStopped("hangup"))
            elif kind == AS_ERROR:
                out.append(CallStopped(f"error {payload.hex()}"))
            else:
                out.append(Ignored(f"audiosocket:{kind:#x}"))
        return out


def audiosocket_frame(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > 0xFFFF:
        raise ValueError("an AudioSocket payload is at most 65535 bytes")
    return bytes([kind]) + len(payload).to_bytes(2, "big") + payload


# -- encoding (gateway -> peer) -------------------------------------------------------
def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def encode_media(spec: DialectSpec, stream_id: str, payload: bytes) -> str:
    return _dumps({"event": "media", spec.stream_key: stream_id,
                   "media": {"payload": base64.b64encode(payload).decode()}})


def encode_mark(spec: DialectSpec, stream_id: str, name: str) -> str:
    return _dumps({"event": "mark", spec.stream_key: stream_id, "mark": {"name": name}})


def encode_clear(spec: DialectSpec, stream_id: str) -> str:
    if spec.dialect is Dialect.ASTERISK:
        return "FLUSH_MEDIA"
    return _dumps({"event": "clear", spec.stream_key: stream_id})


def split_message(data: bytes, limit: int, frame_bytes: int) -> list[bytes]:
    """Cut ``data`` into pieces of at most ``limit`` bytes on sample-frame boundaries."""
    step = max(frame_bytes, limit - limit % frame_bytes)
    return [data[i : i + step] for i in range(0, len(data), step)]


# -- order ----------------------------------------------------------------------------
@dataclass(slots=True)
class Reorder:
    """Restores ``chunk`` order within ``window`` frames.

    A missing frame is waited for until ``window`` later frames are held; then it is
    given up (the platform lost it: there is nothing to answer) and counted in
    ``skipped``. Duplicates and frames older than what was released are refused.
    """

    window: int
    next: int | None = None
    held: dict[int, MediaIn] = field(default_factory=dict)
    skipped: int = 0
    late: int = 0

    def push(self, media: MediaIn) -> list[MediaIn]:
        if self.next is None:  # counters start at 1; the first may not arrive first
            self.next = min(media.chunk, 1)
        if media.chunk < self.next or media.chunk in self.held:
            self.late += 1
            return []
        self.held[media.chunk] = media
        out = self._release()
        while len(self.held) > self.window:
            self.skipped += min(self.held) - self.next
            self.next = min(self.held)
            out += self._release()
        return out

    def _release(self) -> list[MediaIn]:
        out: list[MediaIn] = []
        assert self.next is not None
        while self.next in self.held:
            out.append(self.held.pop(self.next))
            self.next += 1
        return out

    def flush(self) -> list[MediaIn]:
        """Everything held, in order (the call ended: gaps cannot fill any more)."""
        out = [self.held[k] for k in sorted(self.held)]
        self.held.clear()
        if out:
            self.next = out[-1].chunk + 1
        return out


# -- pacing ---------------------------------------------------------------------------
@dataclass(slots=True)
class Pacer:
    """Real-time pacing against the peer's playout clock (injected ``now``).

    ``play_end`` is when the peer finishes playing what it was sent; it may run
    ahead of ``now`` by at most ``lead_s``. After an underrun the peer's clock has
    moved on without us, so the budget starts again from ``now``.
    """

    lead_s: float
    play_end: float = 0.0

    def may_send(self, now: float) -> bool:
        return self.play_end - now < self.lead_s - 1e-9

    def sent(self, duration_s: float, now: float) -> None:
        self.play_end = max(self.play_end, now) + duration_s

    def due_at(self) -> float:
        return self.play_end - self.lead_s

    def buffered(self, now: float) -> float:
        return max(0.0, self.play_end - now)

    def reset(self, now: float) -> None:
        """The peer dropped its buffer (``clear``)."""
        self.play_end = now


# -- the call -------------------------------------------------------------------------
class Phase(Enum):
    AWAITING_START = "awaiting_start"
    LIVE = "live"
    STOPPING = "stopping"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Submit:
    """Send this frame (in the dialect's wire format) through the pipeline as ``seq``."""

    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    """A frame that ends without audio: log it and count it."""

    seq: int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class _Audio:
    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class _Mark:
    name: str


_Queued = _Audio | _Mark


@dataclass(slots=True)
class CallStats:
    frames_in: int = 0
    frames_out: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    marks_sent: int = 0
    marks_played: int = 0
    largest_message: int = 0


Outbound = str | bytes
"""A text (JSON / control) or binary frame to write to the peer."""


class CallSession:
    """One phone call: inbound frames to pipeline submissions, outcomes to paced output.

    The I/O adapter calls ``started``/``media``/``mark``/``clear``/``outcome`` and
    sends what ``take(now)`` returns, then sleeps until ``due_at()`` or new input.
    """

    def __init__(
        self,
        spec: DialectSpec,
        *,
        on_drop: Callable[[Drop], None] = lambda _d: None,
        on_sent: Callable[[int], None] = lambda _seq: None,
    ) -> None:
        self.spec = spec
        self.phase = Phase.AWAITING_START
        self.stream_id = ""
        self.call_id = ""
        self.format = spec.wire_format
        self.params: Mapping[str, str] = {}
        self.reorder = Reorder(spec.reorder_window)
        self.pacer = Pacer(spec.lead_s)
        self.stats = CallStats()
        self.on_drop = on_drop
        self.max_behind_s = spec.max_behind_s
        self.on_sent = on_sent
        self.next_seq = 0
        self._next_out = 0
        self._ready: dict[int, bytes | Drop] = {}
        self._marks_after: dict[int, list[str]] = {}
        self._queue: deque[_Queued] = deque()
        self._discard_below = 0
        self.flow_on = True
        self._unechoed: dict[str, int] = {}

    # -- inbound --------------------------------------------------------------------
    def started(self, ev: CallStarted) -> None:
        if self.phase is not Phase.AWAITING_START:
            raise ProtocolError("a second start message", ErrorCode.UNEXPECTED_MESSAGE)
        self.phase = Phase.LIVE
        self.stream_id, self.call_id, self.params = ev.stream_id, ev.call_id, ev.params
        self.format = ev.format

    def _live(self, what: str) -> None:
        if self.phase is Phase.AWAITING_START:
            raise ProtocolError(f"{what} before start", ErrorCode.UNEXPECTED_MESSAGE)

    def media(self, ev: MediaIn) -> list[Submit]:
        """A media message -> frames to submit, in order (may be none while reordering)."""
        self._live("media")
        if self.phase is not Phase.LIVE:
            return []
        out: list[Submit] = []
        for m in self.reorder.push(ev) if self.spec.reorder_window else [ev]:
            out.append(self._submit(m.payload))
        return out

    def audio(self, data: bytes) -> list[Submit]:
        """Binary audio (Asterisk, AudioSocket): one frame is whatever the platform sent,
        in whole samples; it comes back as one frame of the same length."""
        self._live("audio")
        if self.phase is not Phase.LIVE:
            return []
        return [self._submit(data)]

    def _submit(self, payload: bytes) -> Submit:
        if not payload or len(payload) % self.format.frame_bytes:
            raise ProtocolError(
                f"media payload of {len(payload)} bytes is not whole {self.format.encoding} "
                f"samples", ErrorCode.INVALID_AUDIO)
        seq = self.next_seq
        self.next_seq += 1
        self.stats.frames_in += 1
        return Submit(seq, payload)

    def mark(self, ev: MarkIn) -> None:
        """A peer mark: echo it after the audio of every frame submitted before it.

        Twilio echoes every mark we send once the audio before it has played: such an
        echo (a name we sent and have not heard back) only counts as played."""
        self._live("mark")
        if self._unechoed.get(ev.name, 0) > 0:
            self._unechoed[ev.name] -= 1
            self.stats.marks_played += 1
            return
        if ev.name.startswith(MARK_PREFIX):
            return
        after = self.next_seq - 1
        if after < self._next_out:
            self._queue.append(_Mark(ev.name))
        else:
            self._marks_after.setdefault(after, []).append(ev.name)

    def clear(self, now: float) -> list[Outbound]:
        """Drop what is queued or still in the pipeline; returns what to send at once
        (``clear`` for the peer, then every pending mark, as Twilio does)."""
        self._live("clear")
        self._discard_below = self.next_seq
        first = last = -1
        marks: list[str] = []
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Audio):
                self._drop(Drop(item.seq, "cleared", "cleared before it was played"))
                first = item.seq if first < 0 else first
                last = item.seq
            else:
                marks.append(item.name)
        for seq in sorted(self._marks_after):
            marks += self._marks_after.pop(seq)
        # Outcomes already back but waiting for an earlier one, and those to come.
        for seq in sorted(self._ready):
            if seq >= self._next_out:
                self._ready.pop(seq)
        for seq in range(self._next_out, self._discard_below):
            self._drop(Drop(seq, "cleared", "cleared while in the pipeline"))
            first = seq if first < 0 else first
            last = seq
        self._next_out = self._discard_below
        self.pacer.reset(now)
        out: list[Outbound] = [encode_clear(self.spec, self.stream_id)]
        if self.spec.has_marks:
            if first >= 0:
                out.append(self._mark_out(f"{MARK_PREFIX}cleared:{first}-{last}"))
            out += [self._mark_out(m) for m in marks]
        self._count(out)
        return out

    def flow(self, on: bool) -> None:
        self.flow_on = on

    def stop(self) -> list[Submit]:
        """The peer said stop: flush the reorder buffer; queued audio still goes out
        (for platforms that keep the socket open to play it)."""
        out: list[Submit] = []
        if self.phase is Phase.LIVE:
            out = [self._submit(m.payload) for m in self.reorder.flush()]
            self.phase = Phase.STOPPING
        return out

    # -- outcomes -------------------------------------------------------------------
    def outcome(self, seq: int, audio: bytes | None, reason: str = "", message: str = "") -> None:
        """The pipeline answered frame ``seq`` (any order): audio, or a drop reason."""
        if seq < self._discard_below and seq < self._next_out:
            return  # cleared already: it was answered as a drop then
        self._ready[seq] = audio if audio is not None else Drop(seq, reason, message)
        while self._next_out in self._ready:
            s = self._next_out
            item = self._ready.pop(s)
            self._next_out += 1
            if isinstance(item, Drop):
                self._drop(item)
                if self.spec.has_marks:
                    self._queue.append(_Mark(f"{MARK_PREFIX}drop:{s}:{item.reason}"))
            else:
                self._queue.append(_Audio(s, item))
            for name in self._marks_after.pop(s, ()):
                self._queue.append(_Mark(name))

    def abandon(self, reason: str, message: str) -> None:
        """The call is over: whatever was not written ends as a drop."""
        self.phase = Phase.CLOSED
        for item in self._queue:
            if isinstance(item, _Audio):
                self._drop(Drop(item.seq, reason, message))
        self._queue.clear()
        for seq in range(self._next_out, self.next_seq):
            self._drop(Drop(seq, reason, message))
        self._ready.clear()
        self._marks_after.clear()
        self._next_out = self._discard_below = self.next_seq

    def _drop(self, drop: Drop) -> None:
        self.stats.dropped[drop.reason] = self.stats.dropped.get(drop.reason, 0) + 1
        self.on_drop(drop)

    @property
    def pending(self) -> int:
        """Frames submitted but not yet written out (pipeline, reorder wait, queue)."""
        queued = sum(1 for q in self._queue if isinstance(q, _Audio))
        return self.next_seq - self._next_out + queued

    @property
    def _ended(self) -> bool:
        """No more audio will join the queue: the call stopped and every frame is back."""
        return self.phase is not Phase.LIVE and self._next_out == self.next_seq

    @property
    def finished(self) -> bool:
        return self.phase is not Phase.LIVE and self.pending == 0 and not self._queue

    # -- outbound -------------------------------------------------------------------
    def take(self, now: float) -> list[Outbound]:
        """What may be written now without outrunning the peer's playout."""
        out: list[Outbound] = []
        binary = self.spec.binary
        while self._queue and self.flow_on and self.pacer.may_send(now):
            item = self._queue[0]
            if isinstance(item, _Mark):
                self._queue.popleft()
                out.append(self._mark_out(item.name))
                continue
            if binary:
                self._queue.popleft()
                self.stats.frames_out += 1
                self.on_sent(item.seq)
                self.pacer.sent(self.format.duration_s(len(item.data)), now)
                out += split_message(item.data, self.spec.out_max_bytes,
                                     self.format.frame_bytes)
                continue
            payload = self._take_audio()
            if payload is None:
                break
            self.pacer.sent(self.format.duration_s(len(payload)), now)
            out.append(encode_media(self.spec, self.stream_id, payload))
        # What could not go out now waits; beyond max_behind_s it never catches up.
        self._trim_behind(out)
        self._count(out)
        return out

    def _trim_behind(self, out: list[Outbound]) -> None:
        """Drop the oldest queued audio while more than ``max_behind_s`` is queued (the
        newest frame always stays, however long it is)."""
        audio = [len(q.data) for q in self._queue if isinstance(q, _Audio)]
        queued, count = sum(audio), len(audio)
        limit = self.format.bytes_for_ms(self.max_behind_s * 1000)
        first = last = -1
        while queued > limit and count > 1:
            item = self._queue.popleft()
            if isinstance(item, _Mark):
                out.append(self._mark_out(item.name))
                continue
            queued -= len(item.data)
            count -= 1
            self._drop(Drop(item.seq, "behind", "more processed audio queued than can be "
                            "played in time; dropped the oldest"))
            first = item.seq if first < 0 else first
            last = item.seq
        if first >= 0 and self.spec.has_marks:
            out.append(self._mark_out(f"{MARK_PREFIX}drop:{first}-{last}:behind"))

    def _take_audio(self) -> bytes | None:
        """The next outbound payload: one frame, or for Exotel a run of frames between
        its size bounds (a short run only before a mark or at the end)."""
        spec = self.spec
        if spec.out_min_bytes == 0:
            item = self._queue.popleft()
            assert isinstance(item, _Audio)
            self.stats.frames_out += 1
            self.on_sent(item.seq)
            return item.data
        size = 0
        n = 0
        for item in self._queue:
            if isinstance(item, _Mark) or size + len(item.data) > spec.out_max_bytes:
                break
            size += len(item.data)
            n += 1
            if size >= spec.out_min_bytes and size % spec.out_multiple == 0:
                break
        whole = size % spec.out_multiple == 0
        boundary = n < len(self._queue) or self._ended
        if n == 0 or not whole or (size < spec.out_min_bytes and not boundary):
            return None
        parts = [p for p in (self._queue.popleft() for _ in range(n)) if isinstance(p, _Audio)]
        self.stats.frames_out += n
        for p in parts:
            self.on_sent(p.seq)
        return b"".join(p.data for p in parts)

    def due_at(self, now: float) -> float | None:
        """When ``take`` may next return something (None: only after new input)."""
        if not self._queue or not self.flow_on:
            return None
        if self.spec.out_min_bytes:
            audio = sum(len(q.data) for q in self._queue if isinstance(q, _Audio))
            marks = any(isinstance(q, _Mark) for q in self._queue)
            if audio < self.spec.out_min_bytes and not marks and not self._ended:
                return None
        return max(now, self.pacer.due_at())

    def _mark_out(self, name: str) -> str:
        self._unechoed[name] = self._unechoed.get(name, 0) + 1
        self.stats.marks_sent += 1
        return encode_mark(self.spec, self.stream_id, name)

    def _count(self, out: Iterable[Outbound]) -> None:
        for o in out:
            n = len(o)
            self.stats.messages_out += 1
            self.stats.bytes_out += n
            self.stats.largest_message = max(self.stats.largest_message, n)
