"""Hole 11, across gateways: an older resume token must not displace the holder of a
newer one when the holder is on another gateway sharing the broker. The displace message
carries the taker's generation and the holder yields only to a newer one. Two gateways
on one broker, both transports."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings, create_key
from audiostream.protocol import ResumeRequest, start_json
from audiostream.transport.memory import MemoryBroker
from tests.gateway.conftest import (
    TLS,
    ServerFactory,
    expect_close,
    make_server,  # noqa: F401  (the two-transport fixture)
)
from tests.security.conftest import FMT

pytestmark = pytest.mark.integration
CHUNK = b"\x01\x00" * 320
SECRET = b"one-secret-both-gateways-share-0123456789"


async def read_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, object]:
    msg = await ws.receive(timeout=15)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return dict(json.loads(msg.data))


async def test_an_older_token_on_another_gateway_cannot_displace_a_newer_holder(
    make_server: ServerFactory, tls: TLS, tmp_path: Path  # noqa: F811
) -> None:
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "tenant")
    broker = MemoryBroker()  # used by the memory transport only
    settings = GatewaySettings(chunk_rate=None)
    common = dict(keys_file=keys, token_secret=SECRET, memory_broker=broker,
                  gateway_settings=settings)
    async with make_server(**common) as gw_a, make_server(**common) as gw_b, \
            aiohttp.ClientSession() as http:
        # Generation 0 on A; the client resumes it on A: generation 1 holds it there.
        ws = await http.ws_connect(gw_a.url, ssl=tls.client)
        await ws.send_str(start_json(key, FMT, ["passthrough"]))
        old_token = str((await read_json(ws))["token"])
        await ws.close()
        holder = await http.ws_connect(gw_a.url, ssl=tls.client)
        await holder.send_str(start_json(key, FMT, ["passthrough"],
                                         resume=ResumeRequest(old_token, 0)))
        ready = await read_json(holder)
        assert ready["type"] == "ready"
        new_token = str(ready["token"])
        # A stale copy of the generation-0 token, presented to gateway B: refused, and
        # the holder on A keeps the session.
        async with http.ws_connect(gw_b.url, ssl=tls.client) as stale:
            await stale.send_str(start_json(key, FMT, ["passthrough"],
                                            resume=ResumeRequest(old_token, 0)))
            err = await read_json(stale)
            assert err["type"] == "error" and err["code"] == ErrorCode.RESUME_FAILED
            await expect_close(stale, ErrorCode.RESUME_FAILED)
        await holder.send_bytes(CHUNK)
        msg = await holder.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == CHUNK
        # The holder's own (newer) token still moves the session to B.
        async with http.ws_connect(gw_b.url, ssl=tls.client) as mover:
            await mover.send_str(start_json(key, FMT, ["passthrough"],
                                            resume=ResumeRequest(new_token, 1)))
            ready = await read_json(mover)
            assert ready["type"] == "ready" and ready["resume_from"] == 1
            err = await read_json(holder)
            assert err["type"] == "error" and err["code"] == ErrorCode.DISPLACED
            await expect_close(holder, ErrorCode.DISPLACED)
            await mover.send_bytes(CHUNK)
            msg = await mover.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == CHUNK
        await holder.close()
