"""Phone platforms, simulated from their published wire formats (not from our code).

``MediaStreamSim`` is a Twilio Media Streams peer (with the Telnyx and Exotel field
names as variants): it sends ``connected``, ``start``, ``media`` every 20 ms, ``mark``,
``dtmf``, ``stop``; it plays what it receives at real time, echoes the server's marks
once the audio before them has played, and empties its buffer on ``clear`` (echoing
the marks still pending), as Twilio documents. ``AsteriskSim`` is a
``chan_websocket`` peer: ``MEDIA_START``, binary audio, XOFF/XON around its queue,
and a hang-up on any message over 65,500 bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

#: Field names per platform (from each one's public documentation).
SCHEMAS: dict[str, dict[str, str]] = {
    "twilio": {"stream": "streamSid", "seq": "sequenceNumber", "params": "customParameters",
               "format": "mediaFormat", "call": "callSid", "track": "inbound"},
    "telnyx": {"stream": "stream_id", "seq": "sequence_number", "params": "custom_parameters",
               "format": "media_format", "call": "call_control_id", "track": "inbound"},
    "exotel": {"stream": "stream_sid", "seq": "sequence_number", "params": "custom_parameters",
               "format": "media_format", "call": "call_sid", "track": "inbound"},
}
MEDIA_FORMATS: dict[str, dict[str, Any]] = {
    "twilio": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    "telnyx": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
    "exotel": {"encoding": "base64", "sample_rate": 8000, "bit_rate": "128kbps"},
}
ASTERISK_LIMIT = 65_500


@dataclass
class Heard:
    kind: str
    at: float
    payload: bytes = b""
    name: str = ""
    stream: str | None = None


@dataclass
class MediaStreamSim:
    url: str
    platform: str = "twilio"
    params: Mapping[str, str] = field(default_factory=dict)
    bytes_per_second: int = 8000
    headers: Mapping[str, str] = field(default_factory=dict)
    stream_sid: str = "MZ0123456789abcdef0123456789abcdef"
    heard: list[Heard] = field(default_factory=list)
    played_marks: list[str] = field(default_factory=list)
    max_buffered_s: float = 0.0
    media_messages: int = 0

    def __post_init__(self) -> None:
        self.f = SCHEMAS[self.platform]
        self._seq = 0
        self._chunk = 0
        self._ts = 0
        self._play_end = 0.0
        self._echoes: set[asyncio.Future[None]] = set()
        self._changed = asyncio.Event()
        self.closed: asyncio.Future[int | None] | None = None

    async def __aenter__(self) -> MediaStreamSim:
        self._http = aiohttp.ClientSession()
        self.ws = await self._http.ws_connect(self.url, headers=dict(self.headers))
        self.closed = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._http.close()

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def _send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(obj))

    async def start(self) -> None:
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        f = self.f
        await self._send({
            "event": "start", f["seq"]: self._next_seq(), f["stream"]: self.stream_sid,
            "start": {f["stream"]: self.stream_sid, f["call"]: "CA42", "accountSid": "AC1",
                      "tracks": ["inbound"], f["params"]: dict(self.params),
                      f["format"]: MEDIA_FORMATS[self.platform]},
        })

    def media_message(self, payload: bytes, chunk: int | None = None) -> dict[str, Any]:
        self._chunk += 1
        msg = {
            "event": "media", self.f["seq"]: self._next_seq(), self.f["stream"]: self.stream_sid,
            "media": {"track": self.f["track"], "chunk": str(chunk or self._chunk),
                      "timestamp": str(self._ts), "payload": base64.b64encode(payload).decode()},
        }
        self._ts += 20
        return msg

    async def send_media(self, payload: bytes) -> None:
        await self._send(self.media_message(payload))

    async def send_raw(self, msg: dict[str, Any]) -> None:
        await self._send(msg)

    async def send_mark(self, name: str) -> None:
        await self._send({"event": "mark", self.f["seq"]: self._next_seq(),
                          self.f["stream"]: self.stream_sid, "mark": {"name": name}})

    async def send_clear(self) -> None:
        await self._send({"event": "clear", self.f["stream"]: self.stream_sid})

    async def send_dtmf(self, digit: str) -> None:
        await self._send({"event": "dtmf", self.f["stream"]: self.stream_sid,
                          self.f["seq"]: self._next_seq(),
                          "dtmf": {"track": "inbound_track", "digit": digit}})

    async def stop(self) -> None:
        await self._send({"event": "stop", self.f["seq"]: self._next_seq(),
                          self.f["stream"]: self.stream_sid,
                          "stop": {"accountSid": "AC1", "callSid": "CA42"}})

    async def play_call(self, frames: list[Any], *, pace_s: float = 0.02,
                        marks_after: Mapping[int, str] | None = None) -> None:
        """Send frames on a 20 ms clock (absolute, so scheduling jitter does not add up);
        a frame may be a prepared media message (to send frames out of order)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, frame in enumerate(frames):
            delay = t0 + i * pace_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the call's clock, not synchronisation
            if isinstance(frame, dict):
                await self._send(frame)
            else:
                await self.send_media(frame)
            if marks_after and i in marks_after:
                await self.send_mark(marks_after[i])

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for msg in self.ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                obj = json.loads(msg.data)
                now = loop.time()
                kind = obj.get("event")
                stream = obj.get(self.f["stream"])
                if kind == "media":
                    payload = base64.b64decode(obj["media"]["payload"])
                    self.media_messages += 1
                    self._play_end = max(self._play_end, now) + len(payload) / self.bytes_per_second
                    self.max_buffered_s = max(self.max_buffered_s, self._play_end - now)
                    self.heard.append(Heard("media", now, payload=payload, stream=stream))
                elif kind == "mark":
                    name = obj["mark"]["name"]
                    self.heard.append(Heard("mark", now, name=name, stream=stream))
                    # Twilio echoes a mark when the audio sent before it has played.
                    loop.call_at(max(now, self._play_end), self._echo, name)
                elif kind == "clear":
                    self.heard.append(Heard("clear", now, stream=stream))
                    self._play_end = now
                self._changed.set()
        finally:
            if self.closed is not None and not self.closed.done():
                self.closed.set_result(self.ws.close_code)
            self._changed.set()

    def _echo(self, name: str) -> None:
        self.played_marks.append(name)
        self._changed.set()
        if not self.ws.closed:
            task = asyncio.ensure_future(self._send({
                "event": "mark", self.f["stream"]: self.stream_sid,
                self.f["seq"]: self._next_seq(), "mark": {"name": name}}))
            self._echoes.add(task)
            task.add_done_callback(self._echoes.discard)

    def media(self) -> list[bytes]:
        return [h.payload for h in self.heard if h.kind == "media"]

    async def wait_until(self, predicate: Any, within: float = 30.0) -> bool:
        deadline = time.monotonic() + within
        while not predicate():
            if self.ws.closed or time.monotonic() > deadline:
                return bool(predicate())
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        return True


@dataclass
class AsteriskSim:
    """chan_websocket: Asterisk dials the app's WebSocket server (websocket_client.conf)."""

    url: str
    api_key: str
    codec: str = "ulaw"
    frame_bytes: int = 160
    xoff_at: int = 900
    xon_at: int = 800
    json_control: bool = False
    received: list[bytes] = field(default_factory=list)
    queue_frames: int = 0
    max_queue_frames: int = 0
    xoff_sent: int = 0
    xon_sent: int = 0
    after_xoff: int = 0
    """Binary messages that arrived while XOFF was in force (in flight when it was sent)."""
    oversized: int = 0
    playing: bool = True

    def __post_init__(self) -> None:
        self._changed = asyncio.Event()
        self._off = False

    async def __aenter__(self) -> AsteriskSim:
        self._http = aiohttp.ClientSession()
        self.ws = await self._http.ws_connect(self.url, headers={
            "Authorization": aiohttp.encode_basic_auth("asterisk", self.api_key)})
        self._reader = asyncio.create_task(self._read())
        self._player = asyncio.create_task(self._play())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in (self._reader, self._player):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.ws.close()
        await self._http.close()

    async def start(self) -> None:
        if self.json_control:
            await self.ws.send_str(json.dumps({
                "event": "MEDIA_START", "connection_id": "media1",
                "channel": "WebSocket/media1/0x1", "channel_id": "1761245643.1",
                "format": self.codec, "optimal_frame_size": self.frame_bytes, "ptime": 20}))
        else:
            await self.ws.send_str(
                f"MEDIA_START connection_id:media1 channel:WebSocket/media1/0x1 "
                f"format:{self.codec} optimal_frame_size:{self.frame_bytes} ptime:20")

    async def send_audio(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def play_call(self, frames: list[bytes], *, pace_s: float = 0.02) -> None:
        """The caller's audio on a 20 ms clock (absolute, so jitter does not add up)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, frame in enumerate(frames):
            delay = t0 + i * pace_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the channel's clock, not synchronisation
            await self.ws.send_bytes(frame)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                if len(msg.data) > ASTERISK_LIMIT:
                    self.oversized += 1  # Asterisk would hang up the call here
                self.received.append(msg.data)
                if self._off:
                    self.after_xoff += 1
                self.queue_frames += -(-len(msg.data) // self.frame_bytes)
                self.max_queue_frames = max(self.max_queue_frames, self.queue_frames)
                await self._flow()
            self._changed.set()
        self._changed.set()

    async def _flow(self) -> None:
        if not self._off and self.queue_frames >= self.xoff_at:
            self._off = True
            self.xoff_sent += 1
            await self.ws.send_str("MEDIA_XOFF")
        elif self._off and self.queue_frames <= self.xon_at:
            self._off = False
            self.xon_sent += 1
            await self.ws.send_str("MEDIA_XON")

    async def _play(self) -> None:
        """Asterisk's channel plays one frame per 20 ms (when not stalled)."""
        while True:
            await asyncio.sleep(0.02)  # the channel's clock
            if self.playing and self.queue_frames > 0:
                self.queue_frames -= 1
                await self._flow()
                self._changed.set()

    def audio(self) -> bytes:
        return b"".join(self.received)

    async def wait_until(self, predicate: Any, within: float = 30.0) -> bool:
        deadline = time.monotonic() + within
        while not predicate():
            if self.ws.closed or time.monotonic() > deadline:
                return bool(predicate())
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        return True
