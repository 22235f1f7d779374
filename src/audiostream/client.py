"""Python SDK: a session you ``send`` audio into and iterate typed items out of.

    async with AudioStreamClient(urls, api_key=KEY) as client:
        async with client.session(pipeline=["denoise", "vad"],
                                  format=AudioFormat.pcm16(16000)) as s:
            await s.send(pcm)        # waits for credit: never a burst
            await s.finish()         # flush; s.summary is then set
            async for item in s:     # Audio | Notice | Event | Reconnected | Summary ...
                ...

Flow control: with a v1.1 gateway the session never sends a chunk beyond the
server's credit; with a v1 gateway it paces chunks evenly at the rate the gateway
advertises (``DEFAULT_V1_RATE`` when it advertises none). Memory is bounded by that
window: only chunks the server has not answered are kept (to re-send after a resume).

Reconnect with resume: if the connection drops or the gateway drains, the session
reconnects (next URL, exponential backoff), the server replays missed outcomes and the
session re-sends unanswered chunks, within credit or at the advertised rate.
``stream()`` and ``stream_sync()`` are conveniences over a session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import numpy as np
import numpy.typing as npt

from audiostream import audio
from audiostream import protocol as wire
from audiostream.audio import OPUS_MAX_FRAME_BYTES, AudioFormat, Codec, Encoding
from audiostream.client_errors import (
    RESUMABLE_CLOSES,
    CallbackError,
    ClientError,
    ConnectError,
    ConnectionRefused,
    DnsError,
    HandshakeError,
    ReadyTimeout,
    ReconnectFailed,
    ServerRefused,
    SessionClosed,
    TlsError,
    error_for,
)
from audiostream.errors import AudioStreamError, ErrorCode, ProtocolError
from audiostream.protocol import MAX_CHUNK_MS, latency_summary

log = logging.getLogger("audiostream.client")
log.addHandler(logging.NullHandler())  # a library prints nothing unless the app configures logging

T = TypeVar("T")

#: Protocol version this SDK asks for; a v1-only gateway refuses it and the SDK falls back.
CLIENT_VERSION = 1.1
#: Chunks per second a v1 gateway is assumed to allow when its ``ready`` has no ``rate``.
DEFAULT_V1_RATE = 100.0
#: Chunks kept unanswered (sent or waiting) on a v1 connection, which has no credit.
DEFAULT_V1_WINDOW = 64
#: Send an ``ack`` after this many new outcomes, so gateways can forget them.
ACK_EVERY = 25


# --- items ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Audio:
    """Processed audio of chunk ``seq`` (same encoding, rate and channels as sent)."""

    seq: int
    data: bytes
    latency_ms: float | None = None
    """Send to receive on this connection; None for outcomes replayed after a resume."""


@dataclass(frozen=True, slots=True)
class Notice:
    """Chunks ``seq .. seq+count-1`` got no audio; ``code``/``reason`` say why."""

    seq: int
    code: ErrorCode | int
    reason: str
    message: str
    count: int = 1

    @property
    def seqs(self) -> range:
        return range(self.seq, self.seq + self.count)


@dataclass(frozen=True, slots=True)
class Event:
    """An event a step attached to chunk ``seq`` (``data`` is the message as sent)."""

    seq: int
    name: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SpeechStart(Event):
    offset: int
    """Sample frames into chunk ``seq`` where the deciding VAD window ends."""


@dataclass(frozen=True, slots=True)
class SpeechEnd(Event):
    offset: int


@dataclass(frozen=True, slots=True)
class SpeechProbability(Event):
    probability: float
    offset: int


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """A non-fatal ``error`` message (the session goes on); fatal ones are raised."""

    code: ErrorCode | int
    message: str
    retryable: bool
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Connected:
    url: str
    session_id: str
    version: float
    resumed: bool


@dataclass(frozen=True, slots=True)
class Reconnecting:
    attempt: int
    delay_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The session continues on a new connection; chunks from ``resume_from`` are re-sent."""

    url: str
    session_id: str
    attempt: int
    resume_from: int


@dataclass(frozen=True, slots=True)
class Closed:
    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class CallbackFailed:
    """A callback raised; reported instead of ending the session (unless asked to)."""

    callback: str
    item: Any
    error: BaseException


@dataclass(frozen=True, slots=True)
class Summary:
    session_id: str
    chunks_in: int
    chunks_out: int
    dropped: int
    dropped_by_reason: Mapping[str, int]
    latency_ms: Mapping[str, float]
    data: Mapping[str, Any]

    @classmethod
    def from_wire(cls, msg: wire.Summary) -> Summary:
        return cls(
            session_id=msg.session_id or "",
            chunks_in=msg.chunks_in,
            chunks_out=msg.chunks_out,
            dropped=msg.dropped,
            dropped_by_reason=dict(msg.dropped_by_reason),
            latency_ms=dict(msg.latency_ms),
            data=msg.data,
        )


Item = (Audio | Notice | Event | ErrorReport | Reconnected | CallbackFailed | Summary)
Hook = Callable[[Any], Any]


def event_from_wire(ev: wire.Event) -> Event:
    """A typed event: VAD's probabilities and speech marks get their own classes."""
    seq = ev.seq
    msg = ev.fields
    name = str(msg.get("name", ""))
    data = {"type": "event", "seq": seq, **msg}
    if name == "speech_start":
        return SpeechStart(seq, name, data, int(msg.get("offset", 0)))
    if name == "speech_end":
        return SpeechEnd(seq, name, data, int(msg.get("offset", 0)))
    if name == "vad" and "probability" in msg:
        return SpeechProbability(seq, name, data, float(msg["probability"]),
                                 int(msg.get("offset", 0)))
    return Event(seq, name, data)


# --- policies and results ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ReconnectPolicy:
    """Exponential backoff with jitter: 1 s doubling to 60 s by default.

    ``max_attempts`` bounds reconnection while the server answers but cannot serve (a
    broker outage, a drain). ``connect_attempts`` bounds the attempts that fail before
    any server answered (refused, DNS, TLS, no ``ready``): those are usually a wrong
    address or certificate, so they give up sooner, with their own error.
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2
    max_attempts: int = 8
    connect_attempts: int = 4

    def delay(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * self.factor**attempt)
        return float(base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass
class StreamResult:
    session_id: str
    outcomes: list[bytes | Notice] = field(default_factory=list)
    """One entry per chunk sent, in order: processed audio or a notice (empty when
    ``stream(collect=False)``)."""
    events: list[Event] = field(default_factory=list)
    errors: list[ErrorReport] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    close_code: int | None = None
    resumes: int = 0
    """How many times the session was resumed on a new connection."""
    chunks: int = 0
    """Outcomes received (also counted when not collected)."""
    dropped_count: int = 0

    @property
    def audio(self) -> bytes:
        """The processed audio of every chunk that has some, concatenated."""
        return b"".join(o for o in self.outcomes if isinstance(o, bytes))

    @property
    def dropped(self) -> list[Notice]:
        return [o for o in self.outcomes if isinstance(o, Notice)]

    def latency(self) -> dict[str, float]:
        return latency_summary(self.latencies_ms)


def chunk_array(
    samples: npt.NDArray[Any], fmt: AudioFormat, chunk_ms: float
) -> list[bytes]:
    """Cut an array into wire chunks of ``chunk_ms`` in ``fmt``."""
    data = encode_array(samples, fmt)
    step = fmt.bytes_for_ms(chunk_ms)
    return [data[i : i + step] for i in range(0, len(data), step)]


def encode_array(samples: npt.NDArray[Any], fmt: AudioFormat) -> bytes:
    """An int16 or float array ``(frames[, channels])`` as wire bytes in ``fmt``."""
    arr = np.asarray(samples)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != fmt.channels:
        raise ClientError(f"array of shape {np.shape(samples)} does not match "
                          f"{fmt.channels} channel(s)", ErrorCode.UNSUPPORTED_FORMAT)
    if arr.dtype == np.int16:
        if fmt.encoding is Encoding.PCM_S16LE:
            return arr.astype("<i2", copy=False).tobytes()
        floats = arr.astype(np.float32) / 32768.0
    else:
        floats = arr.astype(np.float32)
    return audio.encode(fmt, floats)


def read_wav(path: str | Path) -> tuple[npt.NDArray[np.int16], int]:
    import soundfile

    data, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    return data, int(rate)


# --- helpers ----------------------------------------------------------------------------------


async def _call(fn: Callable[..., Any], *args: Any) -> None:
    """Run a sync or async callback."""
    res = fn(*args)
    if inspect.isawaitable(res):
        await res


def _classify(url: str, exc: BaseException, attempts: int) -> ConnectError:
    """aiohttp/OS connection failures as the SDK's connection errors."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = getattr(e, "os_error", None) or e.__cause__ or e.__context__
    text = f"cannot connect to {url}: {exc}"
    for e in chain:
        if isinstance(e, (ssl.SSLError, ssl.CertificateError, aiohttp.ClientSSLError)):
            return TlsError(text, url=url, attempts=attempts)
        dns = getattr(aiohttp, "ClientConnectorDNSError", None)
        if (dns is not None and isinstance(e, dns)) or isinstance(e, socket.gaierror):
            return DnsError(text, url=url, attempts=attempts)
        if isinstance(e, ConnectionRefusedError):
            return ConnectionRefused(text, url=url, attempts=attempts)
    return ConnectError(text, url=url, attempts=attempts)


@dataclass(slots=True)
class _Entry:
    data: bytes
    sent_at: float | None = None


class _Pacer:
    """v1 pacing: one chunk every 1/rate s, never saving up (a token bucket of burst 1)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_at = time.monotonic()

    def delay(self) -> float:
        now = time.monotonic()
        self.next_at = max(self.next_at, now)
        wait = self.next_at - now
        self.next_at += self.interval
        return wait


class _Failed(Exception):
    """Internal: the link ended; carries the close code and whether it may resume."""

    def __init__(self, reason: str, close_code: int | None = None) -> None:
        super().__init__(reason)
        self.close_code = close_code


# --- the session ------------------------------------------------------------------------------


class Session:
    """One stream of audio: ``send``, ``finish``, iterate items. Made by ``client.session``.

    Owns its connection (and the next ones after a reconnect) and every task it starts;
    leaving the ``async with`` block finishes the session (or aborts it on an exception).
    """

    def __init__(
        self,
        client: AudioStreamClient,
        *,
        pipeline: Sequence[Any],
        format: AudioFormat,
        deadline_ms: int | None = None,
        chunk_ms: float | None = None,
        iterate: bool = True,
        max_items: int = 4096,
        codec: Codec = Codec.PCM,
    ) -> None:
        self.client = client
        self.pipeline = list(pipeline)
        self.format = format
        self.codec = codec
        self.deadline_ms = deadline_ms
        self.chunk_ms = chunk_ms
        if codec is Codec.OPUS:
            if chunk_ms is not None:
                raise ClientError("an Opus session sends each frame of packets as it is: "
                                  "leave chunk_ms unset", ErrorCode.INVALID_OPTION)
            if format.encoding is not Encoding.PCM_S16LE:
                raise ClientError("an Opus session's format is the PCM it decodes to: "
                                  "AudioFormat.pcm16(rate, channels)",
                                  ErrorCode.UNSUPPORTED_FORMAT)
        if chunk_ms is not None:
            chunk_bytes = format.bytes_for_ms(chunk_ms)
            if chunk_bytes <= 0 or chunk_ms > MAX_CHUNK_MS:
                raise ClientError(
                    f"chunk_ms {chunk_ms:g} is out of range: a chunk must hold at least one "
                    f"sample and at most {MAX_CHUNK_MS} ms of audio", ErrorCode.FRAME_TOO_LARGE)
        self.session_id: str | None = None
        self.delay_frames: int | None = None
        """The pipeline's fixed delay in frames, from ``ready`` (None: not advertised)."""
        self.summary: Summary | None = None
        self.close_code: int | None = None
        self.version: float = CLIENT_VERSION
        self.max_frame_bytes = (OPUS_MAX_FRAME_BYTES if codec is Codec.OPUS
                                else format.bytes_for_ms(MAX_CHUNK_MS))
        self.resumes = 0
        self._items: asyncio.Queue[Item | None] | None = (
            asyncio.Queue(max_items) if iterate else None)
        self._item_cbs: list[Hook] = []
        self._cv = asyncio.Condition()
        self._journal: deque[_Entry] = deque()
        self._carry = b""
        self.next_seq = 0
        """Chunks taken by ``send`` so far (the next chunk's seq)."""
        self.received = 0
        """Outcomes received: the journal holds seqs ``received .. next_seq-1``."""
        self._transmitted = 0
        self._credit: int | None = None
        self._window = DEFAULT_V1_WINDOW
        self._token: str | None = None
        self._finishing = False
        self._error: BaseException | None = None
        self._done = False
        self._runner: asyncio.Task[None] | None = None
        self._link: _Link | None = None
        self._warned_full = False

    # -- public API ---------------------------------------------------------------------
    async def __aenter__(self) -> Session:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None and not self._done and self._error is None:
            await self.finish()
        await self.close()
        if exc is None and self._error is not None:
            raise self._error  # the session failed after the block's last call

    async def open(self) -> None:
        """Connect and wait for ``ready``; raises the connection or refusal error."""
        link = await self.client._establish(self, first=True)
        self.client._sessions.add(self)
        self._runner = asyncio.get_running_loop().create_task(self._run(link))

    def on_item(self, callback: Hook) -> Hook:
        """Call ``callback(item)`` (sync or async) for every item, in order."""
        self._item_cbs.append(callback)
        return callback

    async def send(self, data: bytes | npt.NDArray[Any]) -> None:
        """Queue audio; returns once the server's credit (v1.1) or the local window (v1)
        has room for it. Arrays are encoded in the session's format; with ``chunk_ms``
        audio is re-cut into chunks of that length. An Opus session (``codec``) sends
        bytes only, each call one frame of packets (``audio.frame_opus_packets``)."""
        if self._finishing or self._done:
            raise SessionClosed("send after finish() or after the session ended")
        if self.codec is Codec.OPUS:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ClientError("an Opus session sends framed packets (bytes), not arrays",
                                  ErrorCode.UNSUPPORTED_FORMAT)
            if len(data) > self.max_frame_bytes:
                raise ClientError(f"a frame of Opus packets is {len(data)} bytes, over "
                                  f"{self.max_frame_bytes}", ErrorCode.FRAME_TOO_LARGE)
            await self._admit(bytes(data))
            return
        raw = data if isinstance(data, bytes | bytearray | memoryview) else encode_array(
            data, self.format)
        for chunk in self._cut(bytes(raw)):
            await self._admit(chunk)

    async def finish(self) -> Summary:
        """Send what is left, ``stop``, and wait for every outcome and the summary."""
        if self._done and self.summary is not None:
            return self.summary
        if self._carry:
            carry, self._carry = self._carry, b""
            await self._admit(carry)
        async with self._cv:
            self._finishing = True
            self._cv.notify_all()
            await self._cv.wait_for(lambda: self._done or self._error is not None)
        if self._error is not None:
            raise self._error
        if self.summary is None:
            raise SessionClosed(f"the session ended without a summary (close {self.close_code})")
        return self.summary

    async def close(self) -> None:
        """End the session now (without waiting for outcomes) and release its tasks."""
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            runner.cancel()
        if runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        if self._link is not None:  # the runner may have been cancelled before it ran
            await self._link.aclose()
        if not self._done:
            await self._end(None)

    def __aiter__(self) -> AsyncIterator[Item]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Item]:
        if self._items is None:
            raise ClientError("this session was opened with iterate=False")
        while True:
            item = await self._items.get()
            if item is None:
                self._items.put_nowait(None)  # later iterations end at once too
                if self._error is not None:
                    raise self._error
                return
            yield item

    @property
    def outstanding(self) -> int:
        """Chunks sent or queued whose outcome has not arrived (what resume needs)."""
        return self.next_seq - self.received

    # -- sending ------------------------------------------------------------------------
    def _cut(self, data: bytes) -> Iterator[bytes]:
        if self.chunk_ms is None:
            step = self.max_frame_bytes
            if len(data) <= step:
                yield data
                return
            for i in range(0, len(data), step):
                yield data[i : i + step]
            return
        size = self.format.bytes_for_ms(self.chunk_ms)
        buf = self._carry + data if self._carry else data
        end = len(buf) - len(buf) % size
        for i in range(0, end, size):
            yield buf[i : i + size]
        self._carry = buf[end:]

    async def _admit(self, chunk: bytes) -> None:
        async with self._cv:
            await self._cv.wait_for(lambda: self._error is not None or self._done
                                    or self.next_seq - self.received < self._window)
            if self._error is not None:
                raise self._error
            if self._done:
                raise SessionClosed("the session has ended")
            self._journal.append(_Entry(chunk))
            self.next_seq += 1
            self._cv.notify_all()

    # -- connection lifetime ---------------------------------------------------------------
    async def _run(self, link: _Link) -> None:
        """Keep the session connected until its summary, resuming after each drop."""
        client = self.client
        attempt = 0
        try:
            while True:
                try:
                    await link.serve()
                    break  # summary received
                except _Failed as failure:
                    code = failure.close_code
                    self.close_code = code
                    if code is not None and 4000 <= code < 5000 and (
                            code not in RESUMABLE_CLOSES):
                        raise error_for(code, str(failure)) from None
                    reason = str(failure)
                    going_away = link.going_away
                while True:
                    if attempt >= client.reconnect.max_attempts:
                        raise ReconnectFailed(
                            f"gave up after {attempt} reconnection attempts: {reason}")
                    delay = 0.0 if going_away else client.reconnect.delay(attempt)
                    going_away = False
                    attempt += 1
                    info = Reconnecting(attempt, delay, reason)
                    log.warning("session %s: connection lost (%s); reconnecting in %.2f s "
                                "(attempt %d)", self.session_id, reason, delay, attempt)
                    await client._hook("reconnect", info)
                    await asyncio.sleep(delay)  # backoff between reconnection attempts
                    try:
                        link = await client._establish(self, first=False, attempt=attempt)
                        attempt = 0
                        break
                    except ServerRefused as err:
                        if not err.retryable:
                            raise
                        reason = str(err)
                    except (ConnectError, _Failed) as err:
                        reason = str(err)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the session failed: wake every waiter with it
            self._error = exc if isinstance(exc, Exception) else ClientError(str(exc))
            log.info("session %s failed: %s", self.session_id, exc)
            await self._end(None)
            if not isinstance(exc, Exception):
                raise
            return
        await self._end(self.summary)

    async def _end(self, summary: Summary | None) -> None:
        if self._done:
            return
        self._done = True
        self.client._sessions.discard(self)
        async with self._cv:
            self._cv.notify_all()
        await self.client._hook("close", Closed(self.close_code,
                                                "done" if summary else "closed"))
        if self._items is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._items.put_nowait(None)
            if self._items.full():  # make room for the end marker: drop nothing the user
                self._make_room_for_end()  # will read; the marker goes after the items

    def _make_room_for_end(self) -> None:
        assert self._items is not None
        q: asyncio.Queue[Item | None] = asyncio.Queue()
        while not self._items.empty():
            q.put_nowait(self._items.get_nowait())
        q.put_nowait(None)
        self._items = q

    async def _emit(self, item: Item) -> None:
        for cb in self._item_cbs:
            await self.client._run_callback(self, cb, item)
        await self.client._dispatch(self, item)
        if self._items is not None:
            if self._items.full() and not self._warned_full:
                self._warned_full = True
                log.warning("session %s: %d items wait to be read; reading stops until "
                            "`async for item in session` consumes them (iterate while "
                            "sending, or open the session with iterate=False)",
                            self.session_id, self._items.maxsize)
            await self._items.put(item)


class _Link:
    """One WebSocket connection of a session: a pump that sends within credit or rate,
    and a reader that turns frames into items."""

    def __init__(self, session: Session, ws: aiohttp.ClientWebSocketResponse,
                 http: aiohttp.ClientSession, url: str, ready: wire.Ready,
                 version: float) -> None:
        self.s = session
        self.ws = ws
        self.http = http
        self.url = url
        self.version = version
        self.going_away = False
        self._lock = asyncio.Lock()
        self._acked = session.received
        chunks_per_s = DEFAULT_V1_RATE
        if ready.rate is not None:
            chunks_per_s = max(1.0, ready.rate.chunks_per_s)
        self.pacer = _Pacer(chunks_per_s) if version < 1.1 else None
        self.stop_sent = False

    async def serve(self) -> None:
        """Run until the summary arrives (return) or the connection ends (``_Failed``)."""
        loop = asyncio.get_running_loop()
        pump = loop.create_task(self._pump())
        try:
            await self._read(pump)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(Exception):
            await self.http.close()

    async def _send_str(self, text: str) -> None:
        async with self._lock:
            await self.ws.send_str(text)

    async def _pump(self) -> None:
        s = self.s
        while True:
            async with s._cv:
                await s._cv.wait_for(self._can_send)
                if self.going_away:
                    return
                if s._transmitted >= s.next_seq:  # finishing and everything is out
                    break
                entry = s._journal[s._transmitted - s.received]
            if self.pacer is not None:
                wait = self.pacer.delay()
                if wait > 0:
                    await asyncio.sleep(wait)  # v1 pacing at the advertised rate
            entry.sent_at = time.monotonic()
            async with self._lock:
                await self.ws.send_bytes(entry.data)
            s._transmitted += 1
        self.stop_sent = True
        await self._send_str('{"type":"stop"}')

    def _can_send(self) -> bool:
        s = self.s
        if self.going_away:
            return True
        if s._transmitted < s.next_seq:
            return s._credit is None or s._transmitted < s._credit
        return s._finishing and not self.stop_sent

    async def _read(self, pump: asyncio.Task[None]) -> None:
        s = self.s
        while True:
            msg = await self.ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                await self._audio(msg.data)
            elif msg.type is aiohttp.WSMsgType.TEXT:
                if await self._text(msg.data):
                    return
            else:
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    # The server's own code: answering the close may race the server
                    # dropping TLS, which aiohttp reports as 1006.
                    code: int | None = int(msg.data)
                else:
                    code = self.ws.close_code
                s.close_code = code
                reason = (msg.extra or "") if msg.type is aiohttp.WSMsgType.CLOSE else ""
                raise _Failed(f"connection closed ({code}{': ' + reason if reason else ''})",
                              code)
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                raise _Failed(f"sending failed: {pump.exception()!r}")
            if s.received - self._acked >= ACK_EVERY and not self.going_away:
                self._acked = s.received
                # Best effort: a lost ack only keeps replies in the server's journal longer.
                with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
                    await self._send_str(f'{{"type":"ack","received":{s.received}}}')

    async def _answered(self, count: int) -> list[_Entry]:
        s = self.s
        if count > s._transmitted - s.received:
            raise ProtocolError(f"server answered {count} chunk(s) at seq {s.received} but "
                                f"only {s._transmitted - s.received} are outstanding")
        async with s._cv:
            entries = [s._journal.popleft() for _ in range(count)]
            s.received += count
            s._cv.notify_all()
        return entries

    async def _audio(self, data: bytes) -> None:
        s = self.s
        seq = s.received
        (entry,) = await self._answered(1)
        latency = (time.monotonic() - entry.sent_at) * 1000 if entry.sent_at else None
        await s._emit(Audio(seq, data, latency))

    async def _text(self, text: str) -> bool:
        """Handle one control message; True once the summary is in."""
        s = self.s
        msg = wire.decode_server(text)
        if isinstance(msg, wire.Notice):
            if msg.seq != s.received:
                raise ProtocolError(f"notice for seq {msg.seq}, expected {s.received}")
            await self._answered(msg.count)
            await s._emit(Notice(msg.seq, msg.code, msg.reason, msg.message, msg.count))
        elif isinstance(msg, wire.Event):
            await s._emit(event_from_wire(msg))
        elif isinstance(msg, wire.Credit):
            async with s._cv:
                s._credit = max(s._credit or 0, msg.credit)
                s._cv.notify_all()
        elif isinstance(msg, wire.ErrorMsg):
            await s._emit(ErrorReport(msg.code, msg.message, msg.retryable, msg.seq))
        elif isinstance(msg, wire.Summary):
            s.summary = Summary.from_wire(msg)
            s.close_code = 1000
            await s._emit(s.summary)
            return True
        elif isinstance(msg, wire.GoingAway):
            s._token = msg.token or s._token
            async with s._cv:
                self.going_away = True  # the gateway accepts no more audio here
                s._cv.notify_all()
        elif isinstance(msg, wire.TokenRefresh):
            s._token = msg.token
        return False


# --- the client -------------------------------------------------------------------------------


class AudioStreamClient:
    """Opens sessions against one or more gateway URLs (tried in turn on reconnect).

    Use as ``async with AudioStreamClient(...) as client`` (closes sessions left open) or
    plainly. ``pipeline``/``format`` here are defaults for ``session`` and ``stream``.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str,
        pipeline: Sequence[Any] | None = None,
        format: AudioFormat | None = None,
        deadline_ms: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        heartbeat_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        ready_timeout_s: float = 10.0,
        reconnect: ReconnectPolicy | None = None,
        raise_callback_errors: bool = False,
    ) -> None:
        self.api_key = api_key
        self.pipeline = list(pipeline) if pipeline is not None else None
        self.format = format
        self.deadline_ms = deadline_ms
        self.ssl_context = ssl_context
        self.heartbeat_s = heartbeat_s
        self.connect_timeout_s = connect_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("at least one URL is needed")
        self.reconnect = reconnect or ReconnectPolicy()
        self.raise_callback_errors = raise_callback_errors
        self._url_index = 0
        self._v11 = True
        self._hooks: dict[str, list[Hook]] = {}
        self._audio_cbs: list[Callable[[int, bytes], Any]] = []
        self._notice_cbs: list[Hook] = []
        self._event_cbs: list[Hook] = []
        self._error_cbs: list[Hook] = []
        self._sessions: set[Session] = set()

    # -- context manager -------------------------------------------------------------------
    async def __aenter__(self) -> AudioStreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Abort every session still open."""
        for s in list(self._sessions):
            await s.close()

    # -- callbacks and hooks ---------------------------------------------------------------
    def on_audio(self, callback: Callable[[int, bytes], Any]) -> Callable[[int, bytes], Any]:
        """``callback(seq, pcm)`` for every chunk of processed audio (sync or async)."""
        self._audio_cbs.append(callback)
        return callback

    def on_notice(self, callback: Hook) -> Hook:
        """``callback(Notice)`` for every chunk answered without audio."""
        self._notice_cbs.append(callback)
        return callback

    def on_event(self, callback: Hook) -> Hook:
        """``callback(Event)``: VAD events arrive as SpeechStart/SpeechEnd/SpeechProbability."""
        self._event_cbs.append(callback)
        return callback

    def on_error(self, callback: Hook) -> Hook:
        """``callback(ErrorReport)`` for non-fatal error messages."""
        self._error_cbs.append(callback)
        return callback

    def on_connect(self, callback: Hook) -> Hook:
        """``callback(Connected)`` after every ``ready``."""
        return self._add_hook("connect", callback)

    def on_reconnect(self, callback: Hook) -> Hook:
        """``callback(Reconnecting)`` before each reconnection attempt (attempt, delay)."""
        return self._add_hook("reconnect", callback)

    def on_resume(self, callback: Hook) -> Hook:
        """``callback(Reconnected)`` when a session continues on a new connection."""
        return self._add_hook("resume", callback)

    def on_close(self, callback: Hook) -> Hook:
        """``callback(Closed)`` when a session ends, however it ends."""
        return self._add_hook("close", callback)

    def _add_hook(self, name: str, callback: Hook) -> Hook:
        self._hooks.setdefault(name, []).append(callback)
        return callback

    async def _hook(self, name: str, info: Any) -> None:
        for cb in self._hooks.get(name, []):
            try:
                await _call(cb, info)
            except Exception:
                log.exception("the %s hook %r raised", name, cb)

    async def _run_callback(self, session: Session, cb: Callable[..., Any], item: Any,
                            *args: Any) -> None:
        try:
            await _call(cb, *(args or (item,)))
        except Exception as exc:
            log.error("callback %r raised on %s", cb, type(item).__name__, exc_info=True)
            if self.raise_callback_errors:
                raise CallbackError(f"callback {cb!r} raised {exc!r}") from exc
            if session._items is not None:
                await session._items.put(CallbackFailed(repr(cb), item, exc))

    async def _dispatch(self, session: Session, item: Item) -> None:
        if isinstance(item, Audio):
            for acb in self._audio_cbs:
                await self._run_callback(session, acb, item, item.seq, item.data)
        elif isinstance(item, Notice):
            for cb in self._notice_cbs:
                await self._run_callback(session, cb, item)
        elif isinstance(item, Event):
            for cb in self._event_cbs:
                await self._run_callback(session, cb, item)
        elif isinstance(item, ErrorReport):
            for cb in self._error_cbs:
                await self._run_callback(session, cb, item)

    # -- sessions --------------------------------------------------------------------------
    def session(
        self,
        pipeline: Sequence[Any] | None = None,
        *,
        format: AudioFormat | None = None,
        deadline_ms: int | None = None,
        chunk_ms: float | None = None,
        iterate: bool = True,
        max_items: int = 4096,
        codec: Codec = Codec.PCM,
    ) -> Session:
        """A new session (connects on ``async with`` or ``open()``).

        ``chunk_ms`` re-cuts sent audio into chunks of that length (default: each
        ``send`` is one chunk, split only above the 1 s frame limit). ``iterate=False``
        when only callbacks are used: items are then not buffered for ``async for``.
        Items wait for ``async for`` in a buffer of ``max_items``; when it is full the
        session stops reading (and the server stops granting credit), so iterate while
        sending in long sessions. ``codec=Codec.OPUS`` sends frames of Opus packets
        (``format`` is then the PCM they decode to, and the answers are that PCM).
        """
        pl = list(pipeline) if pipeline is not None else self.pipeline
        fmt = format or self.format
        if pl is None:
            raise ClientError("a session needs a pipeline, e.g. pipeline=['denoise']",
                              ErrorCode.UNKNOWN_STEP)
        if fmt is None:
            raise ClientError("a session needs format=AudioFormat.pcm16(16000) (or another "
                              "AudioFormat)", ErrorCode.UNSUPPORTED_FORMAT)
        return Session(self, pipeline=pl, format=fmt,
                       deadline_ms=deadline_ms if deadline_ms is not None else self.deadline_ms,
                       chunk_ms=chunk_ms, iterate=iterate, max_items=max_items, codec=codec)

    def _start_json(self, s: Session, version: float) -> str:
        resume = None
        if s.session_id is not None and s._token is not None:
            resume = wire.ResumeRequest(s._token, s.received)
        return wire.start_json(self.api_key, s.format, s.pipeline, deadline_ms=s.deadline_ms,
                               resume=resume, version=version, codec=s.codec)

    async def _establish(self, s: Session, *, first: bool, attempt: int = 0) -> _Link:
        """Open a connection and get ``ready`` for ``s``: a fresh session when ``first``,
        a resume otherwise. Retries connection-level failures within the policy."""
        policy = self.reconnect
        failures = 0
        busy = 0
        while True:
            url = self.urls[self._url_index % len(self.urls)]
            try:
                return await self._connect_once(s, url, first=first, attempt=attempt)
            except ConnectError as err:
                failures += 1
                self._url_index += 1
                err.attempts = failures
                refused = isinstance(err, HandshakeError) and err.status in (400, 401, 403)
                if refused or failures >= policy.connect_attempts or not first:
                    raise  # a reconnecting session counts its own attempts
                delay = policy.delay(failures - 1)
                if failures == 1:
                    log.warning("%s; retrying in %.2f s (up to %d attempts)", err, delay,
                                policy.connect_attempts)
                else:
                    log.info("%s; retry %d in %.2f s", err, failures, delay)
                await asyncio.sleep(delay)  # backoff between connection attempts
            except ServerRefused as err:
                if not (first and err.retryable):
                    raise
                busy += 1
                self._url_index += 1
                if busy > policy.max_attempts:
                    raise
                delay = policy.delay(busy - 1)
                log.warning("%s; retrying in %.2f s (attempt %d of %d)", err, delay, busy,
                            policy.max_attempts)
                await asyncio.sleep(delay)  # backoff while the service cannot serve

    async def _connect_once(self, s: Session, url: str, *, first: bool,
                            attempt: int) -> _Link:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
        http = aiohttp.ClientSession(timeout=timeout)
        try:
            try:
                async with asyncio.timeout(self.connect_timeout_s + self.ready_timeout_s):
                    ws = await http.ws_connect(
                        url, ssl=self.ssl_context if self.ssl_context is not None else True,
                        heartbeat=self.heartbeat_s, max_msg_size=16 * 1024 * 1024,
                        compress=0)
            except aiohttp.WSServerHandshakeError as exc:
                raise HandshakeError(f"WebSocket upgrade refused by {url}: {exc.status} "
                                     f"{exc.message}", url=url, status=exc.status) from exc
            except TimeoutError as exc:
                raise ReadyTimeout(f"no WebSocket handshake from {url} within "
                                   f"{self.connect_timeout_s + self.ready_timeout_s:g} s",
                                   url=url) from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise _classify(url, exc, 1) from exc
            version = CLIENT_VERSION if self._v11 else 1.0
            try:
                ready = await self._handshake(s, ws, url, version)
            except ServerRefused as err:
                if err.wire_code == int(ErrorCode.UNSUPPORTED_VERSION) and version > 1.0:
                    log.info("%s speaks protocol v1 only; falling back", url)
                    self._v11 = False
                    with contextlib.suppress(Exception):
                        await ws.close()
                    await http.close()
                    return await self._connect_once(s, url, first=first, attempt=attempt)
                raise
        except BaseException:
            await http.close()
            raise
        resumed = ready.resumed
        s.session_id = ready.session_id
        if ready.delay_frames is not None:
            s.delay_frames = ready.delay_frames
        s._token = ready.token or s._token
        if ready.max_frame_bytes:
            s.max_frame_bytes = ready.max_frame_bytes
        real_version = 1.1 if ready.version == wire.V1_1 else 1.0
        s.version = real_version
        async with s._cv:
            if resumed:
                assert ready.resume_from is not None
                resume_from = ready.resume_from
                if resume_from < s.received or resume_from > s.next_seq:
                    raise ProtocolError(f"server resumed from {resume_from}, outside "
                                        f"{s.received}..{s.next_seq}")
                s._transmitted = resume_from
            else:
                s._transmitted = s.received
            if real_version >= 1.1 and ready.credit is not None:
                s._credit = ready.credit
                s._window = max(2, s._credit - s.received)
            else:
                s._credit = None
                s._window = DEFAULT_V1_WINDOW
            s._cv.notify_all()
        link = s._link = _Link(s, ws, http, url, ready, real_version)
        log.info("session %s %s on %s (protocol v%s)", s.session_id,
                 "resumed" if resumed else "started", url, real_version)
        await self._hook("connect", Connected(url, s.session_id, real_version, resumed))
        if not first:
            s.resumes += 1
            info = Reconnected(url, s.session_id, attempt, s._transmitted)
            await self._hook("resume", info)
            await s._emit(info)
        return link

    async def _handshake(self, s: Session, ws: aiohttp.ClientWebSocketResponse, url: str,
                         version: float) -> wire.Ready:
        await ws.send_str(self._start_json(s, version))
        try:
            async with asyncio.timeout(self.ready_timeout_s):
                first = await ws.receive()
                if first.type is aiohttp.WSMsgType.TEXT:
                    msg = wire.decode_server(first.data)
                    if isinstance(msg, wire.ErrorMsg):
                        raise error_for(int(msg.code), msg.message)
                    if isinstance(msg, wire.Ready):
                        return msg
                    raise ProtocolError(f"expected ready, got {first.data[:200]!r}")
        except TimeoutError as exc:
            raise ReadyTimeout(f"{url} sent no ready within {self.ready_timeout_s:g} s",
                               url=url) from exc
        code: int | None = ws.close_code
        if first.type is aiohttp.WSMsgType.CLOSE:
            code = int(first.data)
        if code is not None and 4000 <= code < 5000:
            raise error_for(code, f"closed before ready: {first.extra or ''}")
        raise _classify_closed(url, code)

    # -- conveniences ------------------------------------------------------------------------
    def _prepare(
        self, source: Any, chunk_ms: float, fmt: AudioFormat | None
    ) -> tuple[AudioFormat, Iterable[bytes] | AsyncIterable[bytes], int]:
        fmt = fmt or self.format
        if isinstance(source, str | Path):
            samples, rate = read_wav(source)
            fmt = fmt or AudioFormat(Encoding.PCM_S16LE, rate, samples.shape[1])
            if fmt.sample_rate != rate or fmt.channels != samples.shape[1]:
                raise ClientError(
                    f"{source} is {rate} Hz/{samples.shape[1]} ch but the client format "
                    f"is {fmt.sample_rate} Hz/{fmt.channels} ch",
                    ErrorCode.UNSUPPORTED_FORMAT,
                )
            chunks = chunk_array(samples, fmt, chunk_ms)
            return fmt, chunks, len(chunks)
        if fmt is None:
            raise ClientError("streaming an array or raw chunks needs "
                              "format=AudioFormat.pcm16(rate) (or another AudioFormat)",
                              ErrorCode.UNSUPPORTED_FORMAT)
        if isinstance(source, np.ndarray):
            chunks = chunk_array(source, fmt, chunk_ms)
            return fmt, chunks, len(chunks)
        return fmt, source, len(source) if isinstance(source, list) else 0

    async def stream(
        self,
        source: str | Path | npt.NDArray[Any] | AsyncIterable[bytes] | Iterable[bytes],
        *,
        chunk_ms: float = 20.0,
        rate: float | None = 1.0,
        progress: Callable[[int, int], Any] | None = None,
        pipeline: Sequence[Any] | None = None,
        format: AudioFormat | None = None,
        collect: bool = True,
    ) -> StreamResult:
        """Stream ``source`` through a session and return every outcome.

        ``rate`` paces the source (1.0 = real time; None = as fast as credit allows). The
        session reconnects and resumes on its own; raises a ``ClientError`` subclass when
        the session is refused or reconnecting gives up. ``collect=False`` keeps only
        counts and latencies (callbacks still see every item).
        """
        fmt, chunks, total = self._prepare(source, chunk_ms, format)
        result = StreamResult(session_id="")
        latencies: deque[float] = deque(maxlen=100_000)

        def collect_item(item: Item) -> None:
            if isinstance(item, Audio):
                result.chunks += 1
                if collect:
                    result.outcomes.append(item.data)
                if item.latency_ms is not None:
                    latencies.append(item.latency_ms)
            elif isinstance(item, Notice):
                result.chunks += item.count
                result.dropped_count += item.count
                if collect:
                    if item.count == 1:
                        result.outcomes.append(item)
                    else:
                        result.outcomes.extend(
                            Notice(q, item.code, item.reason, item.message) for q in item.seqs)
            elif isinstance(item, Event):
                if collect:
                    result.events.append(item)
            elif isinstance(item, ErrorReport):
                result.errors.append(item)
            elif isinstance(item, Reconnected):
                result.resumes += 1
            elif isinstance(item, Summary):
                result.summary = dict(item.data)

        session = self.session(pipeline, format=fmt, iterate=False)
        session.on_item(collect_item)
        if progress is not None:
            session.on_item(lambda _item: progress(session.received, total))
        try:
            async with session:
                result.session_id = session.session_id or ""
                started = time.monotonic()
                sent = 0
                async for chunk in _aiter(chunks):
                    if rate is not None:
                        due = started + sent * chunk_ms / 1000 / rate
                        delay = due - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)  # pacing real-time audio
                    await session.send(chunk)
                    sent += 1
                await session.finish()
        finally:
            result.close_code = session.close_code
            result.session_id = session.session_id or result.session_id
            result.latencies_ms = list(latencies)
        return result

    def stream_sync(
        self,
        source: str | Path | npt.NDArray[Any] | Iterable[bytes],
        *,
        chunk_ms: float = 20.0,
        rate: float | None = 1.0,
        progress: Callable[[int, int], Any] | None = None,
        **kwargs: Any,
    ) -> StreamResult:
        """Blocking ``stream``: works from plain scripts and inside a running loop (Jupyter),
        where it runs on a thread with its own loop."""
        return run_sync(lambda: self.stream(source, chunk_ms=chunk_ms, rate=rate,
                                            progress=progress, **kwargs))

    def session_sync(self, pipeline: Sequence[Any] | None = None,
                     **kwargs: Any) -> SyncSession:
        """A blocking session (``with client.session_sync(...) as s``) for scripts and Jupyter."""
        return SyncSession(self, pipeline, kwargs)


def _classify_closed(url: str, code: int | None) -> ConnectError:
    return ConnectError(f"{url} closed the connection before ready (code {code})", url=url)


async def _aiter(chunks: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for c in chunks:
            yield c
    else:
        for c in chunks:
            yield c


# --- sync use -------------------------------------------------------------------------------


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop
    (Jupyter): then it runs on a thread with a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audiostream") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class SyncSession:
    """A ``Session`` driven from blocking code: its loop runs on a thread of its own."""

    def __init__(self, client: AudioStreamClient, pipeline: Sequence[Any] | None,
                 kwargs: dict[str, Any]) -> None:
        self._client = client
        self._pipeline = pipeline
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="audiostream-session")
        self._session: Session | None = None

    def _run(self, coro: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result()

    def __enter__(self) -> SyncSession:
        self._thread.start()

        async def make() -> Session:
            s = self._client.session(self._pipeline, **self._kwargs)
            await s.open()
            return s

        try:
            self._session = self._run(make())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._session is not None:
                self._run(self._session.__aexit__(exc_type, exc, tb))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def session(self) -> Session:
        assert self._session is not None, "use the SyncSession in a with block"
        return self._session

    def send(self, data: bytes | npt.NDArray[Any]) -> None:
        self._run(self.session.send(data))

    def finish(self) -> Summary:
        return self._run(self.session.finish())

    def __iter__(self) -> Iterator[Item]:
        it = self.session.__aiter__()
        while True:
            try:
                yield self._run(it.__anext__())
            except StopAsyncIteration:
                return


def stream_sync(
    url: str | Sequence[str],
    source: str | Path | npt.NDArray[Any] | Iterable[bytes],
    *,
    api_key: str,
    pipeline: list[Any],
    **kwargs: Any,
) -> StreamResult:
    """Blocking one-call streaming (see ``AudioStreamClient.stream``)."""
    stream_kw = {k: kwargs.pop(k) for k in ("chunk_ms", "rate", "progress", "collect")
                 if k in kwargs}
    client = AudioStreamClient(url, api_key=api_key, pipeline=pipeline, **kwargs)
    return client.stream_sync(source, **stream_kw)


__all__ = [
    "Audio", "AudioStreamClient", "CallbackFailed", "Closed", "Connected", "ErrorReport",
    "Event", "Item", "Notice", "ReconnectPolicy", "Reconnected", "Reconnecting", "Session",
    "SpeechEnd", "SpeechProbability", "SpeechStart", "StreamResult", "Summary", "SyncSession",
    "chunk_array", "encode_array", "read_wav", "run_sync", "stream_sync",
]
# Re-exported for code written against the first SDK.
__all__ += ["AudioStreamError"]
