"""Hole 11, across gateways: an older resume token must not displace the holder of a
newer one when the holder is on another gateway sharing the broker. The displace message
carries the taker's generation and the holder yields only to a newer one; it refuses an
older one in the taker's inbox, so the stale token is refused at once. A detached
session's journal carries the newest generation too. Two gateways on one broker, both
transports.

The takeover wait (``takeover_s``) is an hour here: a refusal that arrives at all
arrived because the holder or the journal refused, not because the wait ran out."""

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
    settings = GatewaySettings(chunk_rate=None, takeover_s=3600.0)
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
            # The session ends; generation 1's token is refused on B, where it ended
            # (whether B still lists the finished holder or has deleted its queue).
            await mover.send_str(json.dumps({"type": "stop"}))
            while (await read_json(mover))["type"] != "summary":
                pass
            await expect_close(mover, 1000)
        async with http.ws_connect(gw_b.url, ssl=tls.client) as late:
            await late.send_str(start_json(key, FMT, ["passthrough"],
                                           resume=ResumeRequest(new_token, 1)))
            err = await read_json(late)
            assert err["type"] == "error" and err["code"] == ErrorCode.RESUME_FAILED
            await expect_close(late, ErrorCode.RESUME_FAILED)
        await holder.close()


async def test_an_older_token_cannot_take_a_detached_session_on_another_gateway(
    make_server: ServerFactory, tls: TLS, tmp_path: Path  # noqa: F811
) -> None:
    """Nobody holds the session: the generation-1 holder on A dropped its link. Its
    journal (the "released" marker) says generation 1, so generation 0's token is refused
    on B, and generation 1's still resumes there with the audio A answered."""
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "tenant")
    broker = MemoryBroker()
    settings = GatewaySettings(chunk_rate=None, takeover_s=3600.0)
    common = dict(keys_file=keys, token_secret=SECRET, memory_broker=broker,
                  gateway_settings=settings)
    async with make_server(**common) as gw_a, make_server(**common) as gw_b, \
            aiohttp.ClientSession() as http:
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
        await holder.send_bytes(CHUNK)
        msg = await holder.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == CHUNK
        await holder.close()  # no stop: the session stays resumable, detached
        async with http.ws_connect(gw_b.url, ssl=tls.client) as stale:
            await stale.send_str(start_json(key, FMT, ["passthrough"],
                                            resume=ResumeRequest(old_token, 0)))
            err = await read_json(stale)
            assert err["type"] == "error" and err["code"] == ErrorCode.RESUME_FAILED, err
            await expect_close(stale, ErrorCode.RESUME_FAILED)
        async with http.ws_connect(gw_b.url, ssl=tls.client) as mover:
            await mover.send_str(start_json(key, FMT, ["passthrough"],
                                            resume=ResumeRequest(new_token, 1)))
            ready = await read_json(mover)
            assert ready["type"] == "ready" and ready["resume_from"] == 1, ready
            await mover.send_bytes(CHUNK)
            msg = await mover.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == CHUNK
