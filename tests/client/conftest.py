"""SDK fixtures: the embedded server (in-memory broker) and a scripted v1.1 gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from audiostream.gateway import GatewaySettings, start_site
from audiostream.testing import Embedded, embedded_server
from tests.gateway import conftest as gateway_fixtures
from tests.gateway.conftest import TLS

tls = gateway_fixtures.tls  # the trustme CA, shared with the gateway tests


@pytest.fixture
async def server() -> AsyncIterator[Embedded]:
    """Gateway + worker on the in-memory broker, with the product's default rate limit."""
    async with embedded_server(processing=("passthrough", "gain", "vad"),
                               gateway_settings=GatewaySettings()) as srv:
        yield srv


@dataclass
class Scripted:
    """A v1.1 gateway written from V11.md: grants ``window`` credit and raises it by
    ``window`` after every ``window`` answers; records what the client did."""

    url: str = ""
    window: int = 4
    starts: list[dict[str, Any]] = field(default_factory=list)
    beyond_credit: int = 0
    chunks: int = 0
    max_outstanding: int = 0


async def _scripted(state: Scripted, request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    start = json.loads((await ws.receive()).data)
    state.starts.append(start)
    credit = state.window
    await ws.send_str(json.dumps({"type": "ready", "version": 1.1, "session_id": "s-1",
                                  "max_frame_bytes": 32000, "credit": credit, "token": "t",
                                  "rate": {"chunks_per_s": 1000, "burst": 10}}))
    answered = 0
    held: int | None = None
    async for msg in ws:
        if msg.type is WSMsgType.BINARY:
            seq = state.chunks
            state.chunks += 1
            if seq >= credit:
                state.beyond_credit += 1
            state.max_outstanding = max(state.max_outstanding, state.chunks - answered)
            if seq == 0:
                await ws.send_str(json.dumps({"type": "error", "code": 4002, "name": "x",
                                              "message": "just a warning", "retryable": False}))
                await ws.send_str(json.dumps({"type": "event", "seq": 0, "name": "vad",
                                              "probability": 0.9, "offset": 160}))
                await ws.send_str(json.dumps({"type": "event", "seq": 0,
                                              "name": "speech_start", "offset": 160}))
                await ws.send_str(json.dumps({"type": "event", "seq": 0, "name": "custom",
                                              "value": 1}))
            if seq % 5 == 3:
                held = seq  # answered together with the next one: an aggregated notice
                continue
            if held is not None:
                await ws.send_str(json.dumps({"type": "notice", "seq": held, "count": 2,
                                              "code": 4030, "reason": "expired",
                                              "message": "late"}))
                held = None
                answered += 2
            else:
                if seq == 1:
                    await ws.send_str(json.dumps({"type": "event", "seq": 1,
                                                  "name": "speech_end", "offset": 0}))
                await ws.send_bytes(msg.data)
                answered += 1
            if answered + state.window > credit:
                credit = answered + state.window
                await ws.send_str(json.dumps({"type": "credit", "credit": credit}))
        elif msg.type is WSMsgType.TEXT:
            body = json.loads(msg.data)
            if body["type"] == "stop":
                await ws.send_str(json.dumps({
                    "type": "summary", "session_id": "s-1", "chunks_in": state.chunks,
                    "chunks_out": answered, "dropped": 0, "dropped_by_reason": {},
                    "latency_ms": {"p50": 1.0}}))
                await ws.close(code=1000)
    return ws


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    state = Scripted()
    app = web.Application()

    async def handle(request: web.Request) -> web.WebSocketResponse:
        return await _scripted(state, request)

    app.router.add_get("/v1/stream", handle)
    runner, port = await start_site(app, "127.0.0.1", 0, None)
    state.url = f"ws://127.0.0.1:{port}/v1/stream"
    try:
        yield state
    finally:
        await runner.cleanup()



@pytest.fixture
async def tls_server(tls: TLS) -> AsyncIterator[Embedded]:
    async with embedded_server(processing=("passthrough",), ssl_context=tls.server,
                               gateway_settings=GatewaySettings()) as srv:
        yield srv


@dataclass
class ScriptedV1:
    """A v1-only gateway: refuses ``"version": 1.1`` like today's gateways, advertises a
    token bucket in ``ready`` and counts the chunks that bucket would have refused."""

    url: str = ""
    rate: float = 50.0
    burst: float = 10.0
    starts: list[dict[str, Any]] = field(default_factory=list)
    chunks: int = 0
    over_rate: int = 0


async def _scripted_v1(state: ScriptedV1, request: web.Request) -> web.WebSocketResponse:
    from audiostream.protocol import TokenBucket

    ws = web.WebSocketResponse()
    await ws.prepare(request)
    start = json.loads((await ws.receive()).data)
    state.starts.append(start)
    if start.get("version", 1) != 1:
        await ws.send_str(json.dumps({"type": "error", "code": 4007,
                                      "name": "unsupported_version", "retryable": False,
                                      "message": "protocol version 1.1 is not supported"}))
        await ws.close(code=4007)
        return ws
    await ws.send_str(json.dumps({"type": "ready", "version": 1, "session_id": "v1",
                                  "max_frame_bytes": 32000, "token": "t",
                                  "rate": {"chunks_per_s": state.rate, "burst": state.burst}}))
    loop = asyncio.get_running_loop()
    bucket = TokenBucket(state.rate, state.burst, loop.time())
    async for msg in ws:
        if msg.type is WSMsgType.BINARY:
            state.chunks += 1
            if not bucket.take(loop.time()):
                state.over_rate += 1
            await ws.send_bytes(msg.data)
        elif msg.type is WSMsgType.TEXT and json.loads(msg.data)["type"] == "stop":
            await ws.send_str(json.dumps({
                "type": "summary", "session_id": "v1", "chunks_in": state.chunks,
                "chunks_out": state.chunks, "dropped": 0, "dropped_by_reason": {},
                "latency_ms": {}}))
            await ws.close(code=1000)
    return ws


@pytest.fixture
async def scripted_v1() -> AsyncIterator[ScriptedV1]:
    state = ScriptedV1()
    app = web.Application()

    async def handle(request: web.Request) -> web.WebSocketResponse:
        return await _scripted_v1(state, request)

    app.router.add_get("/v1/stream", handle)
    runner, port = await start_site(app, "127.0.0.1", 0, None)
    state.url = f"ws://127.0.0.1:{port}/v1/stream"
    try:
        yield state
    finally:
        await runner.cleanup()
