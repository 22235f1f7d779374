"""Several binary WebSocket frames in one socket write (an aiohttp fast path).

Why: one reply carries the outcomes of several chunks under load (coalescing), and
aiohttp's ``send_bytes`` writes each frame to the transport on its own: one
``write`` (a send system call) per chunk, the gateway's largest single cost in a
profile at 40 sessions. Here the frames of one batch are built and written at once.

The only aiohttp internals used live here: the server's frames are unmasked and,
with ``compress=False`` (how the gateway opens every WebSocket), never compressed,
so a frame is a 2/4/10-byte header and the payload (RFC 6455 section 5.2), which
aiohttp's writer would produce too; and flow control is aiohttp's own: while the
transport's buffer is over its high-water mark the protocol's ``_drain_helper``
waits for it to drain, as ``send_bytes`` does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from aiohttp import web

_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack
#: FIN + opcode 2 (binary).
_BINARY = 0x82


def binary_frames(payloads: Sequence[bytes]) -> bytes:
    """The wire bytes of one unmasked, uncompressed binary frame per payload."""
    parts: list[bytes] = []
    for p in payloads:
        n = len(p)
        if n < 126:
            parts.append(_LEN1(_BINARY, n))
        elif n < 65536:
            parts.append(_LEN2(_BINARY, 126, n))
        else:
            parts.append(_LEN3(_BINARY, 127, n))
        parts.append(p)
    return b"".join(parts)


class FrameWriter:
    """Writes batches of binary frames to one server-side WebSocket's transport."""

    __slots__ = ("_request",)

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request

    def writable(self, ws: web.WebSocketResponse) -> bool:
        """The transport takes a write now without waiting: open, below its high-water
        mark. Lets a reply go to the socket in the turn it arrived (``write``)."""
        transport = self._request.transport
        return not (transport is None or transport.is_closing() or ws.closed
                    or self._request.protocol.writing_paused)

    def write(self, payloads: Sequence[bytes]) -> None:
        """Write ``payloads`` as binary frames; only after ``writable`` said yes."""
        transport = self._request.transport
        assert transport is not None
        transport.write(binary_frames(payloads))

    async def send(self, ws: web.WebSocketResponse, payloads: Sequence[bytes]) -> None:
        """Send ``payloads`` as binary frames, in order; returns once the transport took
        them (raises ``ConnectionError`` if it is gone, like ``send_bytes``)."""
        transport = self._request.transport
        if transport is None or transport.is_closing() or ws.closed:
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(binary_frames(payloads))
        protocol = self._request.protocol
        if protocol.writing_paused:
            await protocol._drain_helper()
