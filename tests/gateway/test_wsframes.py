"""Batched binary frames are byte for byte what aiohttp's own writer sends."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp._websocket.writer import WebSocketWriter
from aiohttp.http_websocket import WSMsgType

from audiostream.gateway.wsframes import binary_frames


class Capture(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def write(self, data: Any) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


class Protocol:
    _paused = False


async def test_frames_match_aiohttps_writer_for_every_length_class() -> None:
    payloads = [b"", b"a" * 125, b"b" * 126, b"c" * 640, b"d" * 65535, b"e" * 65536,
                bytes(range(256)) * 300]
    transport = Capture()
    writer = WebSocketWriter(Protocol(), transport)  # type: ignore[arg-type]
    for p in payloads:
        await writer.send_frame(p, WSMsgType.BINARY)
    assert binary_frames(payloads) == bytes(transport.data)
    assert binary_frames([]) == b""
