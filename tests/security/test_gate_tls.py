"""The gate's TLS path (``_Gate`` in gateway/edge.py) under attack, on asyncio and on
uvloop (what the CLI serves on): a reconnect flood over the per-address rate is refused
before its TLS handshake, handshakes cut midway give their per-address count back, and a
gateway that stops while handshakes are in flight cuts them. Real TLS sockets; each test
counts what the loop's exception handler and the logs report."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from audiostream.gateway import GatewaySettings, server_ssl_context
from audiostream.gateway.edge import EDGE_KEY, EdgeGuard, EdgeSettings
from audiostream.testing import Embedded, embedded_server, eventually
from tests.gateway.conftest import TLS
from tests.security.conftest import (
    closed_by_server,
    host_port,
    read_head,
    start_victim,
    upgrade_request,
)

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.2"  # victims connect from 127.0.0.1
LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run, "uvloop": uvloop.run}


def counting_context(tls: TLS) -> tuple[ssl.SSLContext, list[int]]:
    """The server's TLS context, and a list that grows by one for every server-side SSL
    object that starts a handshake (asyncio's and uvloop's SSL protocols both build one
    per socket with ``wrap_bio`` and call its ``do_handshake``)."""
    started: list[int] = []

    class Counting(ssl.SSLObject):
        def do_handshake(self) -> None:
            if not getattr(self, "counted", False):
                self.counted = True
                started.append(1)
            super().do_handshake()

    ctx = server_ssl_context(tls.cert_file, tls.key_file)
    ctx.sslobject_class = Counting
    return ctx, started


def client_hello(tls: TLS) -> bytes:
    """The first flight of a real TLS client: its ClientHello record."""
    obj = tls.client.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                              server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def handshake(tls: TLS, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
    """A whole TLS handshake driven by hand over a plain socket (a client-side SSL
    protocol of the test's own loop would report its own errors to the same handler)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls.client.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            writer.write(outgoing.read())
            data = await reader.read(65536)
            assert data, "the server closed the socket during the handshake"
            incoming.write(data)
        else:
            writer.write(outgoing.read())  # the client's Finished
            await writer.drain()
            return


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a client that crashes or aborts does."""
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Reports:
    """What the loop's exception handler and the logs say while a test runs."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.handler_calls: list[dict[str, Any]] = []
        self._caplog = caplog
        caplog.set_level(logging.DEBUG, "asyncio")
        caplog.set_level(logging.INFO, "aiohttp")
        caplog.set_level(logging.INFO, "audiostream")

    def install(self) -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: self.handler_calls.append(context))

    def tracebacks(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self._caplog.records
                if r.exc_info is not None or r.levelno >= logging.ERROR]


def gateway(ctx: ssl.SSLContext, **edge: Any) -> Any:
    settings = GatewaySettings(chunk_rate=None, edge=EdgeSettings(ops_port=None, **edge))
    return embedded_server(processing=("passthrough",), ssl_context=ctx,
                           gateway_settings=settings)


# --- a reconnect flood over the rate costs no handshakes ---------------------------------------

FLOOD, BURST = 60, 5


async def _flood_one(srv: Embedded, tls: TLS) -> int:
    """One connection from the attacker's address: 101 when served, 0 when its TLS
    handshake was cut by the gateway."""
    host, port = host_port(srv)
    async with asyncio.timeout(30):  # a hang guard, not a measurement
        try:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls.client, local_addr=(ATTACKER, 0))
        except OSError:  # reset or EOF during the handshake (ssl.SSLError is an OSError)
            return 0
        writer.write(upgrade_request())
        status, _ = await read_head(reader)
        writer.transport.abort()
        return status


async def _flood(tls: TLS, cap: int | None) -> None:
    ctx, started = counting_context(tls)
    async with gateway(ctx, conn_rate_per_ip=0.01, conn_burst_per_ip=BURST,
                       max_pending_per_ip=cap) as srv:
        victim = start_victim(srv, tls)
        statuses = [await _flood_one(srv, tls) for _ in range(FLOOD)]
        served = statuses.count(101)
        await victim.assert_intact()
        # The victim's socket and the served ones paid a handshake; the refused none.
        assert len(started) == served + 1, (len(started), served)
        assert BURST <= served <= BURST + 1, statuses  # + at most one token refilled
        assert statuses.count(0) == FLOOD - served, statuses
        refused = srv.gateway.metrics_registry.get_sample_value(
            "audiostream_gateway_edge_refused_total", {"reason": "connection_rate"})
        assert refused == FLOOD - served
        guard: EdgeGuard = srv.runner.app[EDGE_KEY]
        assert await eventually(lambda: not guard.per_address and not guard.tasks)


@pytest.mark.parametrize("cap", [None, 32], ids=["rate-only", "with-address-cap"])
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_tls_reconnect_flood_over_the_rate_costs_no_handshakes(
        tls: TLS, loop: str, cap: int | None) -> None:
    """60 TLS connections from one address against 0.01/s, burst 5: the burst is served
    (101), every other socket is closed at accept with no server-side handshake started
    (before: each paid a full handshake, then got a 429 over TLS), counted as
    ``connection_rate``; a victim on another address keeps all its audio."""
    LOOPS[loop](_flood(tls, cap))


# --- handshakes cut midway -----------------------------------------------------------------------

CUT = 20


async def _cut(tls: TLS, way: str, reports: Reports) -> None:
    reports.install()
    ctx, _started = counting_context(tls)
    hello = client_hello(tls)
    async with gateway(ctx, max_pending_per_ip=CUT + 1, handshake_timeout_s=3600.0) as srv:
        guard: EdgeGuard = srv.runner.app[EDGE_KEY]
        victim = start_victim(srv, tls)
        host, port = host_port(srv)
        sockets = [await asyncio.open_connection(host, port, local_addr=(ATTACKER, 0))
                   for _ in range(CUT)]
        for reader, writer in sockets:
            if way == "after-server-hello":
                writer.write(hello)
                await reader.read(1)  # the server's first flight has begun
            elif way == "after-handshake":
                await handshake(tls, reader, writer)
            else:
                writer.write(hello[:len(hello) // 2])
            await writer.drain()
        # Each is counted; those past the handshake wait for their request in a handler.
        handshaking = 0 if way == "after-handshake" else CUT
        assert await eventually(lambda: guard.per_address.get(ATTACKER) == CUT
                                and len(guard.tasks) == handshaking
                                and len(guard.pending) == CUT - handshaking)
        for _reader, writer in sockets:
            if way == "fin":
                writer.close()
            else:
                reset(writer)
        assert await eventually(
            lambda: not guard.per_address and not guard.tasks and not guard.pending), (
            guard.per_address, len(guard.tasks), len(guard.pending))
        await victim.assert_intact()


@pytest.mark.parametrize("way", ["fin", "reset", "after-server-hello", "after-handshake"])
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_handshake_cut_midway_gives_its_count_back(
        tls: TLS, loop: str, way: str, caplog: pytest.LogCaptureFixture) -> None:
    """20 sockets from one address send half a ClientHello (or a whole one and read the
    start of the server's answer, or finish the handshake), then close (FIN) or reset,
    as a TLS reconnect loop that aborts does: the address's pending
    count returns to zero and the gate's handshake tasks end, long before the handshake
    timeout (an hour here); no exception reaches the loop's handler, nothing is logged
    with a traceback, and a victim keeps its audio."""
    reports = Reports(caplog)
    LOOPS[loop](_cut(tls, way, reports))
    assert reports.handler_calls == []
    assert reports.tracebacks() == []


async def _stop_midway(tls: TLS, reports: Reports) -> None:
    reports.install()
    ctx, _started = counting_context(tls)
    hello = client_hello(tls)
    async with gateway(ctx, max_pending_per_ip=CUT + 1, handshake_timeout_s=3600.0) as srv:
        guard: EdgeGuard = srv.runner.app[EDGE_KEY]
        host, port = host_port(srv)
        sockets = [await asyncio.open_connection(host, port, local_addr=(ATTACKER, 0))
                   for _ in range(CUT)]
        for _reader, writer in sockets:
            writer.write(hello[:len(hello) // 2])
            await writer.drain()
        assert await eventually(lambda: guard.per_address.get(ATTACKER) == CUT
                                and len(guard.tasks) == CUT)
        tasks = set(guard.tasks)
    # The gateway has stopped: no handshake is left running, no count held, and every
    # socket was closed by the server (the handshake timeout is an hour).
    assert not guard.tasks and not guard.per_address, (len(guard.tasks), guard.per_address)
    assert all(task.done() for task in tasks)
    for reader, writer in sockets:
        assert await closed_by_server(reader)
        writer.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_stopping_the_gateway_cuts_handshakes_in_flight(
        tls: TLS, loop: str, caplog: pytest.LogCaptureFixture) -> None:
    """The gateway stops while 20 TLS handshakes wait for the rest of their ClientHello:
    they are cut with it (before: the tasks ran on, holding their sockets and counts, until
    the handshake timeout), with no exception in the loop's handler and no traceback."""
    reports = Reports(caplog)
    LOOPS[loop](_stop_midway(tls, reports))
    assert reports.handler_calls == []
    assert reports.tracebacks() == []
