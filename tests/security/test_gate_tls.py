"""The gate's TLS path (``_Gate`` in gateway/edge.py) under attack, on asyncio and on
uvloop (what the CLI serves on): a reconnect flood over the per-address rate is refused
before its TLS handshake. Real TLS sockets."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from audiostream.gateway import GatewaySettings, server_ssl_context
from audiostream.gateway.edge import EDGE_KEY, EdgeGuard, EdgeSettings
from audiostream.testing import Embedded, embedded_server, eventually
from tests.gateway.conftest import TLS
from tests.security.conftest import (
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
