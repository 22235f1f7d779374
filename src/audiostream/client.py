"""Python SDK: stream audio to a gateway and get processed audio back.

    client = AudioStreamClient(url, api_key=key, pipeline=["denoise"])
    client.on_audio(lambda seq, pcm: ...)
    result = await client.stream("speech.wav")

Sources: a WAV path, a numpy array (float or int16, ``(frames[, channels])``),
or an async iterator of PCM byte chunks. Outcomes arrive in order, one per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt

from audiostream import audio
from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import AudioStreamError, ErrorCode, ProtocolError, TransportError
from audiostream.protocol import (
    ClientProtocol,
    DropNotice,
    GoingAway,
    Ready,
    ResumeRequest,
    ServerError,
    StreamEvent,
    Summary,
    latency_summary,
    start_json,
)

AudioCallback = Callable[[int, bytes], None]
NoticeCallback = Callable[[DropNotice], None]
EventCallback = Callable[[StreamEvent], None]
ProgressCallback = Callable[[int, int], None]
ErrorCallback = Callable[["ServerError"], None]


@dataclass
class StreamResult:
    session_id: str
    outcomes: list[bytes | DropNotice] = field(default_factory=list)
    """One entry per chunk sent, in order: processed audio or a drop notice."""
    events: list[StreamEvent] = field(default_factory=list)
    errors: list[ServerError] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    close_code: int | None = None
    resumes: int = 0
    """How many times the session was resumed on a new connection."""

    @property
    def audio(self) -> bytes:
        """The processed audio of every chunk that has some, concatenated."""
        return b"".join(o for o in self.outcomes if isinstance(o, bytes))

    @property
    def dropped(self) -> list[DropNotice]:
        return [o for o in self.outcomes if isinstance(o, DropNotice)]

    def latency(self) -> dict[str, float]:
        return latency_summary(self.latencies_ms)


def chunk_array(
    samples: npt.NDArray[Any], fmt: AudioFormat, chunk_ms: float
) -> list[bytes]:
    """Cut an array into wire chunks of ``chunk_ms`` in ``fmt``."""
    arr = np.asarray(samples)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.dtype == np.int16:
        floats = arr.astype(np.float32) / 32768.0
    else:
        floats = arr.astype(np.float32)
    data = audio.encode(fmt, floats)
    step = fmt.bytes_for_ms(chunk_ms)
    return [data[i : i + step] for i in range(0, len(data), step)]


def read_wav(path: str | Path) -> tuple[npt.NDArray[np.int16], int]:
    import soundfile

    data, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    return data, int(rate)


#: Send an ``ack`` after this many new outcomes, so gateways can forget them.
ACK_EVERY = 25
#: Close codes after which the client resumes instead of giving up.
_RESUMABLE_CLOSES = frozenset({int(ErrorCode.SERVER_DRAINING), int(ErrorCode.INTERNAL_ERROR),
                               int(ErrorCode.BROKER_UNAVAILABLE), int(ErrorCode.IDLE_TIMEOUT)})


@dataclass(frozen=True, kw_only=True)
class ReconnectPolicy:
    """Exponential backoff with jitter: 1 s doubling to 60 s by default."""

    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2
    max_attempts: int = 8

    def delay(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * self.factor**attempt)
        return float(base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass
class _Run:
    """One stream's state across connections."""

    fmt: AudioFormat
    source: AsyncIterator[bytes]
    total: int
    chunk_ms: float
    rate: float | None
    progress: ProgressCallback | None
    proto: ClientProtocol = field(default_factory=ClientProtocol)
    result: StreamResult = field(default_factory=lambda: StreamResult(session_id=""))
    pending: dict[int, bytes] = field(default_factory=dict)
    """Chunks sent but not answered yet, by seq: re-sent after a resume."""
    sent_at: dict[int, float] = field(default_factory=dict)
    source_done: bool = False
    held: bytes | None = None
    fresh: int = 0
    started: float = field(default_factory=time.monotonic)
    acked: int = 0
    going_away: bool = False
    ready_seen: bool = False

    def answered(self, seq: int, *, latency: bool = True) -> None:
        self.pending.pop(seq, None)
        sent = self.sent_at.pop(seq, None)
        if sent is not None and latency:
            self.result.latencies_ms.append((time.monotonic() - sent) * 1000)


class AudioStreamClient:
    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str,
        pipeline: list[Any],
        format: AudioFormat | None = None,
        deadline_ms: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        heartbeat_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        reconnect: ReconnectPolicy | None = None,
    ) -> None:
        self.api_key = api_key
        self.pipeline = pipeline
        self.format = format
        self.deadline_ms = deadline_ms
        self.ssl_context = ssl_context
        self.heartbeat_s = heartbeat_s
        self.connect_timeout_s = connect_timeout_s
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("at least one URL is needed")
        self.reconnect = reconnect or ReconnectPolicy()
        self._error_cbs: list[ErrorCallback] = []
        self._audio_cbs: list[AudioCallback] = []
        self._notice_cbs: list[NoticeCallback] = []
        self._event_cbs: list[EventCallback] = []

    def on_audio(self, callback: AudioCallback) -> AudioCallback:
        self._audio_cbs.append(callback)
        return callback

    def on_notice(self, callback: NoticeCallback) -> NoticeCallback:
        self._notice_cbs.append(callback)
        return callback

    def on_event(self, callback: EventCallback) -> EventCallback:
        self._event_cbs.append(callback)
        return callback

    def stream_sync(
        self,
        source: str | Path | npt.NDArray[Any] | Iterable[bytes],
        *,
        chunk_ms: float = 20.0,
        rate: float | None = 1.0,
        progress: ProgressCallback | None = None,
    ) -> StreamResult:
        """Blocking ``stream`` for code without an event loop (runs one of its own)."""
        return asyncio.run(self.stream(source, chunk_ms=chunk_ms, rate=rate, progress=progress))

    def on_error(self, callback: ErrorCallback) -> ErrorCallback:
        """Typed error events (``ServerError`` with an ``ErrorCode``) as they arrive."""
        self._error_cbs.append(callback)
        return callback

    def _prepare(
        self, source: Any, chunk_ms: float
    ) -> tuple[AudioFormat, Iterable[bytes] | AsyncIterable[bytes]]:
        if isinstance(source, str | Path):
            samples, rate = read_wav(source)
            fmt = self.format or AudioFormat(Encoding.PCM_S16LE, rate, samples.shape[1])
            if fmt.sample_rate != rate or fmt.channels != samples.shape[1]:
                raise AudioStreamError(
                    f"{source} is {rate} Hz/{samples.shape[1]} ch but the client format "
                    f"is {fmt.sample_rate} Hz/{fmt.channels} ch",
                    ErrorCode.UNSUPPORTED_FORMAT,
                )
            return fmt, chunk_array(samples, fmt, chunk_ms)
        if isinstance(source, np.ndarray):
            if self.format is None:
                raise AudioStreamError("streaming an array needs format=AudioFormat(...)",
                                       ErrorCode.UNSUPPORTED_FORMAT)
            return self.format, chunk_array(source, self.format, chunk_ms)
        if self.format is None:
            raise AudioStreamError("streaming raw chunks needs format=AudioFormat(...)",
                                   ErrorCode.UNSUPPORTED_FORMAT)
        return self.format, source

    async def stream(
        self,
        source: str | Path | npt.NDArray[Any] | AsyncIterable[bytes] | Iterable[bytes],
        *,
        chunk_ms: float = 20.0,
        rate: float | None = 1.0,
        progress: ProgressCallback | None = None,
    ) -> StreamResult:
        """Stream ``source`` and return every outcome; ``rate=None`` sends as fast as possible.

        If the connection drops or the gateway drains, the client reconnects (to the
        next URL, with exponential backoff) and resumes: missed outcomes are replayed
        by the server and unanswered chunks are re-sent, so every chunk still gets
        exactly one outcome. Raises ``AudioStreamError`` (with the server's code) if
        the session is refused, or ``TransportError`` when reconnecting gives up.
        """
        fmt, chunks = self._prepare(source, chunk_ms)
        run = _Run(
            fmt=fmt,
            source=_aiter(chunks).__aiter__(),
            total=len(chunks) if isinstance(chunks, list) else 0,
            chunk_ms=chunk_ms,
            rate=rate,
            progress=progress,
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
        attempt = 0
        index = 0
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                url = self.urls[index % len(self.urls)]
                try:
                    if await self._connection(http, url, run):
                        return run.result
                    last: Exception | None = None
                except TransportError as exc:
                    last = exc
                if run.ready_seen:
                    attempt = 0  # a session ran: back off from scratch
                    run.ready_seen = False
                if attempt >= self.reconnect.max_attempts:
                    raise TransportError(
                        f"gave up after {attempt} reconnection attempts: {last}"
                    ) from last
                delay = 0.0 if run.going_away else self.reconnect.delay(attempt)
                run.going_away = False
                attempt += 1
                index += 1
                await asyncio.sleep(delay)  # backoff between reconnection attempts

    async def _connection(self, http: aiohttp.ClientSession, url: str, run: _Run) -> bool:
        """One WebSocket connection of the stream; True when the session completed."""
        try:
            async with http.ws_connect(
                url,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                heartbeat=self.heartbeat_s,
                max_msg_size=16 * 1024 * 1024,
                compress=0,
            ) as ws:
                return await self._session(ws, run)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (400, 401, 403):
                raise AudioStreamError(f"WebSocket upgrade refused: {exc.status} {exc.message}",
                                       ErrorCode.FORBIDDEN) from exc
            raise TransportError(f"WebSocket upgrade refused: {exc.status} {exc.message}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"connection to {url} failed: {exc!r}") from exc

    async def _session(self, ws: aiohttp.ClientWebSocketResponse, run: _Run) -> bool:
        proto = run.proto
        resume = None
        if proto.session_id is not None and proto.token is not None:
            resume = ResumeRequest(proto.token, proto.received)
        await ws.send_str(start_json(self.api_key, run.fmt, self.pipeline,
                                     deadline_ms=self.deadline_ms, resume=resume))
        first = await ws.receive()
        if first.type is not aiohttp.WSMsgType.TEXT:
            raise TransportError(f"connection closed before ready (code {ws.close_code})")
        ev = proto.receive_text(first.data)
        if isinstance(ev, ServerError):
            code = ev.code if isinstance(ev.code, ErrorCode) else ErrorCode.PROTOCOL_ERROR
            if ev.retryable:
                raise TransportError(f"server refused for now: {ev.message} ({int(code)})")
            raise AudioStreamError(ev.message, code)
        if not isinstance(ev, Ready):
            raise ProtocolError(f"expected ready, got {first.data[:200]!r}")
        run.ready_seen = True
        run.result.session_id = ev.session_id
        if ev.info.get("resumed"):
            run.result.resumes += 1
        lock = asyncio.Lock()
        sender = asyncio.get_running_loop().create_task(self._send(ws, run, lock))
        try:
            return await self._receive(ws, run, sender, lock)
        finally:
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await sender

    async def _send(
        self, ws: aiohttp.ClientWebSocketResponse, run: _Run, lock: asyncio.Lock
    ) -> None:
        proto = run.proto
        # After a resume, re-send what the server never answered, in order.
        for seq in sorted(k for k in run.pending if k >= proto.sent):
            if seq != proto.next_seq():
                raise ProtocolError(f"cannot re-send from seq {seq}: a chunk is missing")
            async with lock:
                await ws.send_bytes(run.pending[seq])
        while not run.source_done:
            if run.held is None:
                # Held on the run, not in a local: a connection lost while pacing must
                # not lose the chunk already taken from the source.
                try:
                    run.held = await run.source.__anext__()
                except StopAsyncIteration:
                    run.source_done = True
                    break
            if run.rate is not None:
                due = run.started + run.fresh * run.chunk_ms / 1000 / run.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing real-time audio, not synchronisation
            chunk, run.held = run.held, None
            run.fresh += 1
            seq = proto.next_seq()
            run.pending[seq] = chunk
            run.sent_at[seq] = time.monotonic()
            async with lock:
                await ws.send_bytes(chunk)
        async with lock:
            await ws.send_str('{"type":"stop"}')

    async def _receive(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        run: _Run,
        sender: asyncio.Task[None],
        lock: asyncio.Lock,
    ) -> bool:
        proto = run.proto
        result = run.result
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                out = proto.receive_bytes(msg.data)
                run.answered(out.seq)
                result.outcomes.append(out.data)
                for cb in self._audio_cbs:
                    cb(out.seq, out.data)
            elif msg.type is aiohttp.WSMsgType.TEXT:
                ev = proto.receive_text(msg.data)
                if isinstance(ev, DropNotice):
                    run.answered(ev.seq, latency=False)
                    result.outcomes.append(ev)
                    for ncb in self._notice_cbs:
                        ncb(ev)
                elif isinstance(ev, StreamEvent):
                    result.events.append(ev)
                    for ecb in self._event_cbs:
                        ecb(ev)
                elif isinstance(ev, ServerError):
                    result.errors.append(ev)
                    for err_cb in self._error_cbs:
                        err_cb(ev)
                elif isinstance(ev, Summary):
                    result.summary = dict(ev.data)
                elif isinstance(ev, GoingAway):
                    run.going_away = True
                    sender.cancel()  # the gateway no longer accepts audio
                due = proto.received - run.acked >= ACK_EVERY
                if due and not run.going_away and not result.summary:
                    run.acked = proto.received
                    # Best effort: the server may be closing; a lost ack only keeps
                    # replies in its journal a little longer.
                    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                        async with lock:
                            await ws.send_str(f'{{"type":"ack","received":{proto.received}}}')
            else:
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    # Record the server's code now: answering the close may race with the
                    # server dropping the TLS connection, which aiohttp reports as 1006.
                    result.close_code = int(msg.data)
                else:
                    result.close_code = ws.close_code
                if result.summary:
                    return True  # the summary comes after the last outcome: complete
                if result.close_code is not None and 4000 <= result.close_code < 5000 and (
                    result.close_code not in _RESUMABLE_CLOSES
                ):
                    detail = result.errors[-1].message if result.errors else "closed"
                    raise AudioStreamError(detail, ErrorCode(result.close_code))
                return False
            if run.progress is not None:
                run.progress(proto.received, run.total)
            if sender.done() and not sender.cancelled() and sender.exception() is not None:
                exc = sender.exception()
                raise TransportError(f"sending failed: {exc!r}") from exc


async def _aiter(chunks: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for c in chunks:
            yield c
    else:
        for c in chunks:
            yield c


def stream_sync(
    url: str,
    source: str | Path | npt.NDArray[Any],
    *,
    api_key: str,
    pipeline: list[Any],
    **kwargs: Any,
) -> StreamResult:
    """Blocking convenience wrapper around ``AudioStreamClient.stream``."""
    stream_kw = {k: kwargs.pop(k) for k in ("chunk_ms", "rate", "progress") if k in kwargs}
    client = AudioStreamClient(url, api_key=api_key, pipeline=pipeline, **kwargs)
    return asyncio.run(client.stream(source, **stream_kw))
