"""The WebSocket frame guard (gateway/edge.py) in isolation: whatever the split of the
byte stream, data frames reach aiohttp's reader byte for byte, pings are answered and
removed, and an unmasked frame closes with 1002."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from audiostream.gateway.edge import EdgeGuard, EdgeMetrics, EdgeSettings, FrameGuard
from tests.security.conftest import client_frame


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        pass


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class FakeHandler:
    def __init__(self, settings: EdgeSettings) -> None:
        self.guard = EdgeGuard(settings, EdgeMetrics(CollectorRegistry()))
        self.transport = Transport()
        self.peer = "test"
        self.frame_cap: int | None = None
        self.hard_cap: int | None = None
        self.closing = False


frame = st.tuples(st.sampled_from([0x1, 0x2, 0x0, 0x9, 0xA, 0x8]),
                  st.binary(max_size=300), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(frame, max_size=8), st.lists(st.integers(1, 400), min_size=1, max_size=20))
def test_any_split_passes_data_frames_unchanged_and_answers_pings(
    frames: list[tuple[int, bytes, bool]], cuts: list[int]
) -> None:
    handler = FakeHandler(EdgeSettings(control_rate=1000, control_burst=1000))
    sink = Sink()
    guard = FrameGuard(sink, handler)  # type: ignore[arg-type]
    expected, pongs = bytearray(), bytearray()
    stream = bytearray()
    for opcode, payload, fin in frames:
        if opcode in (0x8, 0x9, 0xA):
            payload, fin = payload[:125], True
        raw = client_frame(opcode, payload, fin=fin)
        stream += raw
        if opcode == 0x9:
            pongs += bytes([0x8A, len(payload)]) + payload
        else:
            expected += raw
    i = 0
    for cut in cuts * 100:
        if i >= len(stream):
            break
        guard.feed_data(bytes(stream[i:i + cut]))
        i += cut
    if i < len(stream):
        guard.feed_data(bytes(stream[i:]))
    # Once the client sent close, later pings are passed on to aiohttp (which ignores them).
    if any(op == 0x8 for op, _, _ in frames):
        return
    assert bytes(sink.data) == bytes(expected)
    assert bytes(handler.transport.written) == bytes(pongs)


def test_an_unmasked_frame_closes_with_1002() -> None:
    handler = FakeHandler(EdgeSettings())
    sink = Sink()
    guard = FrameGuard(sink, handler)  # type: ignore[arg-type]
    guard.feed_data(client_frame(0x2, b"ok"))
    guard.feed_data(client_frame(0x2, b"bad", masked=False))
    assert handler.transport.closed
    assert bytes(handler.transport.written)[2:4] == (1002).to_bytes(2, "big")
    assert bytes(sink.data) == b"" or len(sink.data) == len(client_frame(0x2, b"ok"))


def test_a_frame_over_the_cap_closes_from_its_header_with_4004() -> None:
    handler = FakeHandler(EdgeSettings())
    handler.frame_cap = 100
    sink = Sink()
    guard = FrameGuard(sink, handler)  # type: ignore[arg-type]
    guard.feed_data(client_frame(0x1, b"x" * 100))
    assert not handler.transport.closed
    guard.feed_data(client_frame(0x1, b"x" * 5000)[:10])  # the header only
    assert handler.transport.closed
    assert bytes(handler.transport.written)[2:4] == (4004).to_bytes(2, "big")
    assert len(sink.data) == len(client_frame(0x1, b"x" * 100))


def test_after_our_close_data_frames_are_dropped_and_the_close_frame_passes() -> None:
    handler = FakeHandler(EdgeSettings())
    sink = Sink()
    guard = FrameGuard(sink, handler)  # type: ignore[arg-type]
    handler.closing = True
    close = client_frame(0x8, (1000).to_bytes(2, "big"))
    stream = client_frame(0x2, b"a" * 3000) * 5 + close
    for i in range(0, len(stream), 777):  # any split
        guard.feed_data(stream[i:i + 777])
    assert bytes(sink.data) == close
