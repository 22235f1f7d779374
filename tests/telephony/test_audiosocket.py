"""AudioSocket (TCP, behind a setting): a simulated Asterisk call."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from audiostream.gateway.keys import create_key, revoke_key
from audiostream.gateway.telephony import TELEPHONY_KEY
from audiostream.testing import embedded_server
from tests.telephony.conftest import distinct_frames

pytestmark = pytest.mark.integration


def frame(kind: int, payload: bytes = b"") -> bytes:
    """Written from the AudioSocket spec: type, uint16 big-endian length, payload."""
    return bytes([kind]) + len(payload).to_bytes(2, "big") + payload


async def test_audiosocket_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "pbx")
    monkeypatch.setenv("AUDIOSTREAM_AUDIOSOCKET", "127.0.0.1:0")
    monkeypatch.setenv("AUDIOSTREAM_AUDIOSOCKET_KEY", key)
    monkeypatch.setenv("AUDIOSTREAM_TELEPHONY_PIPELINE", "passthrough")
    pcm = [f + f for f in distinct_frames(40, seed=41)]  # 320-byte s16 frames
    async with embedded_server(keys_file=keys) as srv:
        port = srv.runner.app[TELEPHONY_KEY].audiosocket_port
        assert port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame(0x01, uuid.uuid4().bytes))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, f in enumerate(pcm):  # a 20 ms clock; each frame split across two writes
            await asyncio.sleep(max(0.0, t0 + i * 0.02 - loop.time()))  # the call's clock
            msg = frame(0x10, f)
            writer.write(msg[:50])
            await writer.drain()
            writer.write(msg[50:])
            await writer.drain()
        got = b""
        want = b"".join(pcm)
        while len(got) < len(want):
            head = await asyncio.wait_for(reader.readexactly(3), 20)
            n = int.from_bytes(head[1:], "big")
            body = await reader.readexactly(n)
            assert head[0] == 0x10
            got += body
        assert got == want
        writer.write(frame(0x00))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 20) == b""  # the gateway hangs up too
        writer.close()


async def test_a_revoked_keys_audiosocket_call_is_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AudioSocket has no close code: a revoked key's call ends with its stream."""
    keys = tmp_path / "keys.json"
    key, record = create_key(keys, "pbx")
    monkeypatch.setenv("AUDIOSTREAM_AUDIOSOCKET", "127.0.0.1:0")
    monkeypatch.setenv("AUDIOSTREAM_AUDIOSOCKET_KEY", key)
    monkeypatch.setenv("AUDIOSTREAM_TELEPHONY_PIPELINE", "passthrough")
    pcm = distinct_frames(1, seed=42)[0] * 2  # one 320-byte s16 frame
    async with embedded_server(keys_file=keys) as srv:
        port = srv.runner.app[TELEPHONY_KEY].audiosocket_port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(frame(0x01, uuid.uuid4().bytes) + frame(0x10, pcm))
            await writer.drain()
            head = await asyncio.wait_for(reader.readexactly(3), 20)  # the call is live
            assert head[0] == 0x10
            await reader.readexactly(int.from_bytes(head[1:], "big"))
            revoke_key(keys, record.id)
            st = keys.stat()  # an mtime that surely moves on coarse clocks
            os.utime(keys, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
            assert srv.gateway.revocation.sweep() == 1
            await asyncio.wait_for(reader.read(), 20)  # whatever was in flight, then EOF
            assert reader.at_eof()
        finally:
            writer.close()
