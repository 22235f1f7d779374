"""`helm test` smoke test: stream a short sample through the release and check it.

Streams ``SMOKE_DURATION_MS`` of a 440 Hz tone (16 kHz mono s16le, 20 ms chunks)
through the ``passthrough`` step of the gateway at ``SMOKE_URL`` with the key in
``SMOKE_API_KEY``, and fails unless every chunk comes back in order, bit-identical
(passthrough is exact for s16le), with no drop notice and a summary that agrees.
Needs only the standard library and aiohttp, both in the gateway image. Exit 0 on
success; the last line printed says what happened.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import ssl
import struct
import sys
import time

import aiohttp

RATE = 16_000
CHUNK_MS = 20


def tone(duration_ms: int) -> list[bytes]:
    frames = RATE * CHUNK_MS // 1000
    n = RATE * duration_ms // 1000
    samples = [int(8000 * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(n)]
    pcm = struct.pack(f"<{n}h", *samples)
    step = frames * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


async def run(url: str, api_key: str, duration_ms: int, timeout_s: float) -> str:
    chunks = tone(duration_ms)
    ctx: ssl.SSLContext | bool = True
    if url.startswith("wss://"):
        # The test pod reaches the Service by its cluster name, which the gateway's public
        # certificate usually does not cover; the stream is what is under test here.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    start = {
        "type": "start",
        "version": 1,
        "api_key": api_key,
        "format": {"encoding": "pcm_s16le", "sample_rate": RATE, "channels": 1},
        "pipeline": ["passthrough"],
    }
    received: list[bytes] = []
    summary: dict[str, object] | None = None
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.ws_connect(url, ssl=ctx) as ws:
            await ws.send_str(json.dumps(start))
            ready = await ws.receive()
            if ready.type is not aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"expected a ready message, got {ready.type} {ready.data!r}")
            msg = json.loads(ready.data)
            if msg.get("type") != "ready":
                raise AssertionError(f"session refused: {msg}")
            for chunk in chunks:
                await ws.send_bytes(chunk)
            await ws.send_str(json.dumps({"type": "stop"}))
            async for frame in ws:
                if frame.type is aiohttp.WSMsgType.BINARY:
                    received.append(frame.data)
                elif frame.type is aiohttp.WSMsgType.TEXT:
                    event = json.loads(frame.data)
                    kind = event.get("type")
                    if kind in ("notice", "error"):
                        raise AssertionError(f"chunk not processed: {event}")
                    if kind == "summary":
                        summary = event
                else:
                    break
    took = time.monotonic() - started
    if received != chunks:
        raise AssertionError(
            f"sent {len(chunks)} chunks, got {len(received)} back"
            + ("" if len(received) != len(chunks) else " with different bytes")
        )
    if summary is None:
        raise AssertionError("no summary before the server closed the session")
    if summary.get("chunks_out") != len(chunks) or summary.get("dropped") != 0:
        raise AssertionError(f"summary disagrees: {summary}")
    return f"ok: {len(chunks)} chunks round-tripped bit-identical in {took:.2f} s; {summary}"


def main() -> int:
    url = os.environ["SMOKE_URL"]
    api_key = os.environ["SMOKE_API_KEY"]
    duration_ms = int(os.environ.get("SMOKE_DURATION_MS", "1000"))
    timeout_s = float(os.environ.get("SMOKE_TIMEOUT_S", "60"))
    try:
        print(asyncio.run(run(url, api_key, duration_ms, timeout_s)), flush=True)
    except (AssertionError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"FAILED: {exc!r}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
