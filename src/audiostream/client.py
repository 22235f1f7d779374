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
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import AudioStreamError, ErrorCode, ProtocolError, TransportError
from audiostream.protocol import (
    ClientProtocol,
    DropNotice,
    GoingAway,
    Ready,
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
    from audiostream import audio as _audio

    arr = np.asarray(samples)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.dtype == np.int16:
        floats = arr.astype(np.float32) / 32768.0
    else:
        floats = arr.astype(np.float32)
    data = _audio.encode(fmt, floats)
    step = fmt.bytes_for_ms(chunk_ms)
    return [data[i : i + step] for i in range(0, len(data), step)]


def read_wav(path: str | Path) -> tuple[npt.NDArray[np.int16], int]:
    import soundfile

    data, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    return data, int(rate)


class AudioStreamClient:
    def __init__(
        self,
        url: str,
        *,
        api_key: str,
        pipeline: list[Any],
        format: AudioFormat | None = None,
        deadline_ms: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        heartbeat_s: float = 30.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.pipeline = pipeline
        self.format = format
        self.deadline_ms = deadline_ms
        self.ssl_context = ssl_context
        self.heartbeat_s = heartbeat_s
        self.connect_timeout_s = connect_timeout_s
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

        Raises ``AudioStreamError`` (with the server's code) if the session is refused.
        """
        fmt, chunks = self._prepare(source, chunk_ms)
        total = len(chunks) if isinstance(chunks, list) else 0
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http, http.ws_connect(
                self.url,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                heartbeat=self.heartbeat_s,
                max_msg_size=16 * 1024 * 1024,
                compress=0,
            ) as ws:
                return await self._session(ws, fmt, chunks, chunk_ms, rate, total, progress)
        except aiohttp.WSServerHandshakeError as exc:
            raise TransportError(f"WebSocket upgrade refused: {exc.status} {exc.message}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"cannot reach {self.url}: {exc}") from exc

    async def _session(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        fmt: AudioFormat,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        chunk_ms: float,
        rate: float | None,
        total: int,
        progress: ProgressCallback | None,
    ) -> StreamResult:
        proto = ClientProtocol()
        await ws.send_str(start_json(self.api_key, fmt, self.pipeline,
                                     deadline_ms=self.deadline_ms))
        first = await ws.receive()
        if first.type is not aiohttp.WSMsgType.TEXT:
            raise TransportError(f"connection closed before ready (code {ws.close_code})")
        ev = proto.receive_text(first.data)
        if isinstance(ev, ServerError):
            with contextlib.suppress(Exception):
                await ws.receive()
            code = ev.code if isinstance(ev.code, ErrorCode) else ErrorCode.PROTOCOL_ERROR
            raise AudioStreamError(ev.message, code)
        if not isinstance(ev, Ready):
            raise ProtocolError(f"expected ready, got {first.data[:200]!r}")
        result = StreamResult(session_id=ev.session_id)
        sent_at: dict[int, float] = {}
        sender = asyncio.get_running_loop().create_task(
            self._send(ws, proto, chunks, chunk_ms, rate, sent_at)
        )
        try:
            await self._receive(ws, proto, result, sent_at, sender, total, progress)
        finally:
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
        if result.close_code is None:
            result.close_code = ws.close_code
        return result

    async def _send(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        proto: ClientProtocol,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        chunk_ms: float,
        rate: float | None,
        sent_at: dict[int, float],
    ) -> None:
        start = time.monotonic()
        i = 0
        async for chunk in _aiter(chunks):
            if rate is not None:
                due = start + i * chunk_ms / 1000 / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing real-time audio, not synchronisation
            seq = proto.next_seq()
            sent_at[seq] = time.monotonic()
            await ws.send_bytes(chunk)
            i += 1
        await ws.send_str('{"type":"stop"}')

    async def _receive(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        proto: ClientProtocol,
        result: StreamResult,
        sent_at: dict[int, float],
        sender: asyncio.Task[None],
        total: int,
        progress: ProgressCallback | None,
    ) -> None:
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                out = proto.receive_bytes(msg.data)
                self._record(result, out.seq, sent_at)
                result.outcomes.append(out.data)
                for cb in self._audio_cbs:
                    cb(out.seq, out.data)
            elif msg.type is aiohttp.WSMsgType.TEXT:
                ev = proto.receive_text(msg.data)
                if isinstance(ev, DropNotice):
                    self._record(result, ev.seq, sent_at, latency=False)
                    result.outcomes.append(ev)
                    for ncb in self._notice_cbs:
                        ncb(ev)
                elif isinstance(ev, StreamEvent):
                    result.events.append(ev)
                    for ecb in self._event_cbs:
                        ecb(ev)
                elif isinstance(ev, ServerError):
                    result.errors.append(ev)
                elif isinstance(ev, Summary):
                    result.summary = dict(ev.data)
                elif isinstance(ev, GoingAway):
                    result.errors.append(
                        ServerError(ErrorCode.SERVER_DRAINING, "server going away", True)
                    )
            else:
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    # Record the server's code now: answering the close may race with the
                    # server dropping the TLS connection, which aiohttp reports as 1006.
                    result.close_code = int(msg.data)
                break
            if progress is not None:
                progress(proto.received, total)
            if sender.done() and sender.exception() is not None:
                raise TransportError(f"sending failed: {sender.exception()}")

    @staticmethod
    def _record(
        result: StreamResult, seq: int, sent_at: dict[int, float], *, latency: bool = True
    ) -> None:
        sent = sent_at.pop(seq, None)
        if sent is not None and latency:
            result.latencies_ms.append((time.monotonic() - sent) * 1000)


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
