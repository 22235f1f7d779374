"""The gateway's per-session reply path end to end: a client that never acks, session
churn on the embedded server, and publish failures during a broker outage."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from audiostream.envelope import Reply, ReplyStatus, encode_reply
from audiostream.gateway import GatewaySettings
from audiostream.gateway.journal import MAX_JOURNAL
from audiostream.gateway.pipeline import SessionPipeline
from audiostream.testing import Embedded, embedded_server, eventually
from audiostream.topology import Topology
from audiostream.transport import MemoryBroker, MemoryTransport
from tests.conftest import unique_prefix
from tests.gateway.conftest import TLS, ServerFactory, rabbit_unacked

pytestmark = pytest.mark.integration

FORMAT = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}


def start(key: str, pipeline: list[str]) -> str:
    """A raw v1 client's ``start`` (docs/protocol.md), written by hand on purpose."""
    return json.dumps({"type": "start", "version": 1, "api_key": key, "format": FORMAT,
                       "pipeline": pipeline})


async def test_client_that_never_acks_streams_past_the_old_wall(
    make_server: ServerFactory, tls: TLS, transport_kind: str, memory_broker: MemoryBroker
) -> None:
    """4,000 chunks (the old gateway stopped answering after 1,000 reply messages):
    every one comes back as audio, bit-exact, while the journal and the reply queue's
    unacked count stay bounded by the journal cap."""
    n, window = 4000, 2
    rng = np.random.default_rng(7)
    chunks = [(rng.standard_normal(320) * 3000).astype(np.int16).tobytes() for _ in range(n)]
    kw: dict[str, Any] = {"memory_broker": memory_broker} if transport_kind == "memory" else {}
    async with make_server(**kw) as srv, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url, ssl=tls.client, max_msg_size=0)
        await ws.send_str(start(srv.api_key, ["passthrough"]))
        ready = json.loads((await ws.receive(timeout=10)).data)
        assert ready["type"] == "ready", ready
        [conn] = srv.gateway.connections
        pipe = conn.pipeline
        assert pipe is not None
        queue = pipe.reply_queue
        sampled: list[int] = []

        async def sample_unacked() -> None:
            while True:
                if transport_kind == "memory":
                    sampled.append(memory_broker.unacked(queue))
                    await asyncio.sleep(0.05)
                else:
                    sampled.append(await asyncio.to_thread(rabbit_unacked, queue))

        sampler = asyncio.get_running_loop().create_task(sample_unacked())
        got: list[bytes] = []
        longest = 0
        sent = 0
        try:
            while len(got) < n:
                while sent < n and sent - len(got) < window:
                    await ws.send_bytes(chunks[sent])
                    sent += 1
                msg = await ws.receive(timeout=30)
                if msg.type is aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "token":
                    continue  # a refreshed resume token
                assert msg.type is aiohttp.WSMsgType.BINARY, (len(got), msg)
                got.append(msg.data)
                longest = max(longest, pipe.journal_length)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        assert got == chunks  # bit-exact passthrough, in order, none dropped
        assert pipe.messages_published > 1000, pipe.messages_published  # past the old wall
        assert longest <= MAX_JOURNAL + 1, longest
        assert sampled and max(sampled) <= MAX_JOURNAL + window + 2, sampled
        assert sampled[-1] <= MAX_JOURNAL + window + 2
        await ws.send_str(json.dumps({"type": "stop"}))
        summary = json.loads((await ws.receive(timeout=10)).data)
        assert summary["type"] == "summary" and summary["dropped"] == 0, summary
        assert (await ws.receive(timeout=10)).type is aiohttp.WSMsgType.CLOSE
        await ws.close()


class _Handed:
    """A delivery handed straight to the pipeline's reply handler (a transport calls
    it the same way); its ack is settled at once, as the memory transport's."""

    redelivered = False

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.acks = 0

    def ack(self) -> asyncio.Future[None]:
        self.acks += 1
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def reject(self) -> None:
        raise AssertionError("not expected")

    async def release(self) -> None:
        raise AssertionError("not expected")


async def test_replies_are_handled_inline_without_a_task(
    make_server: ServerFactory, tls: TLS
) -> None:
    """The reply path runs once per reply message: the handler turns a reply into audio
    on the socket and returns None (no task, nothing to wait for); a duplicate is acked
    the same way."""
    async with make_server(processing=["gain"]) as srv, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url, ssl=tls.client)
        await ws.send_str(start(srv.api_key, ["passthrough"]))  # no passthrough worker
        ready = json.loads((await ws.receive(timeout=10)).data)
        assert ready["type"] == "ready", ready
        [conn] = srv.gateway.connections
        pipe = conn.pipeline
        assert pipe is not None
        chunk = np.arange(320, dtype=np.int16).tobytes()
        await ws.send_bytes(chunk)
        await eventually(lambda: pipe.coalescer.in_flight is not None)
        flight = pipe.coalescer.in_flight
        assert flight is not None
        reply = encode_reply(Reply(pipe.session_id, flight.msg_id, flight.chunks[0].seq,
                                   ReplyStatus.OK, (320,), pipe.format, audio=chunk))

        answer, duplicate = _Handed(reply), _Handed(reply)
        before = asyncio.all_tasks()
        assert pipe._on_reply(answer) is None
        assert pipe._on_reply(duplicate) is None
        assert asyncio.all_tasks() - before == set()
        out = await ws.receive(timeout=10)
        assert out.type is aiohttp.WSMsgType.BINARY and out.data == chunk
        assert (answer.acks, duplicate.acks) == (0, 1)  # the answer waits in the journal
        await ws.close()


async def one_session(http: aiohttp.ClientSession, srv: Embedded, payload: bytes) -> None:
    async with http.ws_connect(srv.url) as ws:
        await ws.send_str(start(srv.api_key, ["passthrough"]))
        ready = json.loads((await ws.receive(timeout=30)).data)
        assert ready["type"] == "ready", ready
        await ws.send_bytes(payload)
        out = await ws.receive(timeout=30)
        assert out.type is aiohttp.WSMsgType.BINARY and out.data == payload
        await ws.send_str(json.dumps({"type": "stop"}))
        summary = json.loads((await ws.receive(timeout=30)).data)
        assert summary["type"] == "summary", summary
        assert (await ws.receive(timeout=30)).type is aiohttp.WSMsgType.CLOSE


def alive(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


@pytest.mark.timeout(600)
async def test_two_thousand_sessions_leave_nothing_behind() -> None:
    """Embedded (in-memory) start -> stop sessions: the gateway's connection to the
    broker holds no consumer, the broker no reply queue, and no SessionPipeline lives
    on once they ended (``benchmarks/session_churn.py`` prints the RSS figure)."""
    broker = MemoryBroker()
    topo = Topology(processing_types=("passthrough",), prefix=unique_prefix(),
                    reply_expires_ms=60_000)
    payload = b"\x01\x02" * 320
    async with embedded_server(topology=topo, memory_broker=broker,
                               gateway_settings=GatewaySettings(
                                   chunk_rate=None, session_starts_per_minute=None)) as srv:
        transport = srv.gateway.transport
        assert isinstance(transport, MemoryTransport)
        queues = broker.queue_count
        assert transport.consumer_count == 0
        async with aiohttp.ClientSession() as http:
            done = 0

            async def worker() -> None:
                nonlocal done
                while done < 2000:
                    done += 1
                    await one_session(http, srv, payload)

            await asyncio.gather(*(worker() for _ in range(8)))
        assert done >= 2000
        # The gateway finishes closing a session after the client has its close frame.
        assert await eventually(lambda: not srv.gateway.connections)
        assert transport.consumer_count == 0
        assert broker.queue_count == queues
        assert alive(SessionPipeline) == 0
        assert not srv.gateway.connections


def uncollected(kind: type) -> int:
    """Objects of ``kind`` the heap still holds, reachable or merely awaiting the cyclic GC."""
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def test_ended_sessions_are_freed_at_once_without_the_cyclic_gc() -> None:
    """With the cyclic GC off, nothing of an ended session lives on: no reference
    cycle (handler <-> subscription, socket protocol <-> WebSocket response) and no
    heartbeat timer re-armed on a closed WebSocket holds its connection, so a busy
    embedded server's memory does not wait for a GC pass (or a heartbeat period)."""
    broker = MemoryBroker()
    topo = Topology(processing_types=("passthrough",), prefix=unique_prefix())
    payload = b"\x01\x02" * 320
    was_enabled = gc.isenabled()
    async with embedded_server(topology=topo, memory_broker=broker,
                               gateway_settings=GatewaySettings(
                                   chunk_rate=None, session_starts_per_minute=None)) as srv:
        async with aiohttp.ClientSession() as http:
            await one_session(http, srv, payload)  # imports and first-use caches
            assert await eventually(lambda: not srv.gateway.connections)
            gc.collect()
            gc.disable()
            try:
                for _ in range(20):
                    await one_session(http, srv, payload)
                assert await eventually(lambda: not srv.gateway.connections)
                left = uncollected(web.WebSocketResponse)
            finally:
                if was_enabled:
                    gc.enable()
    assert left == 0, f"{left} WebSocketResponse objects outlived their sessions"


async def test_publish_failures_are_logged_once_per_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every chunk sent while the broker is unreachable is answered broker_unavailable,
    and the session logs the outage once when it starts and once, with counts, when it
    ends (here: the session closes first), not a warning per chunk."""
    broker = MemoryBroker()
    topo = Topology(processing_types=("passthrough",), prefix=unique_prefix())
    payload = b"\x00\x01" * 320
    async with embedded_server(topology=topo, memory_broker=broker,
                               gateway_settings=GatewaySettings(chunk_rate=None)) as srv:
        async with aiohttp.ClientSession() as http, http.ws_connect(srv.url) as ws:
            await ws.send_str(start(srv.api_key, ["passthrough"]))
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "ready"
            await ws.send_bytes(payload)
            assert (await ws.receive(timeout=10)).data == payload
            transport = srv.gateway.transport
            assert isinstance(transport, MemoryTransport)
            caplog.set_level(logging.INFO, logger="audiostream.gateway.pipeline")
            await transport.close()  # the broker connection is gone
            codes = []
            for _ in range(20):
                await ws.send_bytes(payload)
                notice = json.loads((await ws.receive(timeout=10)).data)
                codes.append(notice["reason"])
            assert codes == ["broker_unavailable"] * 20
            await ws.send_str(json.dumps({"type": "stop"}))
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "summary"
            assert await eventually(lambda: not srv.gateway.connections)
    lines = [r.getMessage() for r in caplog.records if "stage=publish" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "cannot publish" in lines[0]
    assert re.search(r"session closed after 20 failed messages \(20 chunks", lines[1]), lines
