"""Hole 7 against a live gateway on real RabbitMQ: hostile step params are refused with
``invalid_option`` (4008) at ``start``, and not one byte goes to the broker for them.

The gateway reaches RabbitMQ through a counting TCP hop, with every periodic broker
call (depth poll, stall probe, AMQP heartbeats) off, so the byte count moves only for
work done on behalf of a session.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.protocol import start_json
from audiostream.testing import embedded_server
from audiostream.topology import Topology
from tests.conftest import delete_prefixed, unique_prefix
from tests.gateway.conftest import TLS
from tests.policy.conftest import StallingProxy, expect_close

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
QUIET = GatewaySettings(chunk_rate=None, depth_poll_s=0, load_sample_s=0, broker_probe_s=0)


async def first_message(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=20)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    data: dict[str, Any] = json.loads(msg.data)
    return data


async def test_hostile_params_are_refused_before_the_broker(
    rabbitmq_url: str, stalling_proxy: StallingProxy, tls: TLS
) -> None:
    topo = Topology(processing_types=("passthrough", "gain", "denoise"), prefix=unique_prefix())
    big = "x" * 200_000
    # A 200 KB start is closed 4004 by the 8 KiB pre-start cap from its frame header;
    # under the cap, the param schemas refuse with 4008. Neither reaches the broker.
    hostile: list[tuple[list[Any], str]] = [
        ([{"name": "passthrough", "params": {"note": big}}], "FRAME_TOO_LARGE"),
        ([{"name": "denoise", "params": {"variant": big}}], "FRAME_TOO_LARGE"),
        ([{"name": "denoise", "params": {"variant": "v" * 600}}], "602 bytes; the limit is 512"),
        ([{"name": "gain", "params": {"db": -3, "x" * 2000: 1}}], "unknown parameter"),
        ([{"name": "gain", "params": {"db": -3, "comment": "hi"}}], "unknown parameter"),
        ([{"name": "gain", "params": {"db": [0] * 500}}], "must be a number"),
    ]
    url = stalling_proxy.url(rabbitmq_url, "?heartbeat=0")
    try:
        async with embedded_server(broker_url=url, topology=topo, workers=0,
                                   gateway_settings=QUIET, ssl_context=tls.server) as srv, \
                aiohttp.ClientSession() as http:
            for pipeline, words in hostile:
                before = stalling_proxy.upstream_bytes
                async with http.ws_connect(srv.url, ssl=tls.client, max_msg_size=0) as ws:
                    await ws.send_str(start_json(srv.api_key, FMT, pipeline))
                    if words == "FRAME_TOO_LARGE":
                        # Refused at the edge from the frame header, unread: a bare close.
                        msg = await ws.receive(timeout=20)
                        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
                        assert msg.data == ErrorCode.FRAME_TOO_LARGE, msg
                    else:
                        err = await first_message(ws)
                        assert err["type"] == "error", err
                        assert err["code"] == ErrorCode.INVALID_OPTION, err
                        assert len(err["message"]) < 300 and words in err["message"], err
                        await expect_close(ws, ErrorCode.INVALID_OPTION)
                assert stalling_proxy.upstream_bytes == before, pipeline
            assert srv.gateway.metrics_registry.get_sample_value(
                "audiostream_gateway_bundles_published_total") in (None, 0.0)
            # The control: a legal start does reach the broker (its reply queue).
            before = stalling_proxy.upstream_bytes
            async with http.ws_connect(srv.url, ssl=tls.client) as ws:
                await ws.send_str(start_json(srv.api_key, FMT,
                                             [{"name": "gain", "params": {"db": -3}}]))
                ready = await first_message(ws)
                assert ready["type"] == "ready", ready
                await ws.send_bytes(np.zeros(320, np.int16).tobytes())
                await ws.send_str(json.dumps({"type": "stop"}))
            assert stalling_proxy.upstream_bytes > before
    finally:
        await delete_prefixed(rabbitmq_url, topo)
