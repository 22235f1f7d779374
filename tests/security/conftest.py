"""A live gateway (real sockets, TLS optional) for attack tests, a victim session that
streams beside each attack, and raw-socket helpers for what no client library sends."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import AudioStreamClient, StreamResult
from audiostream.gateway import GatewaySettings
from audiostream.testing import Embedded, embedded_server
from audiostream.topology import Topology
from audiostream.transport.memory import MemoryBroker
from tests.conftest import TEST_TYPES, delete_prefixed, unique_prefix
from tests.gateway.conftest import TLS, tls  # noqa: F401  (the session's TLS fixture)

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
SECRET = b"one-secret-both-gateways-share-0123456789"


def shared_gateways(make: Callable[..., AbstractAsyncContextManager[Embedded]], keys: Path,
                    *, takeover_s: float, count: int = 2, **settings: Any
                    ) -> list[AbstractAsyncContextManager[Embedded]]:
    """Gateway contexts on one broker (one memory broker, or one RabbitMQ prefix) with one
    token secret, so a session started on one can be resumed on another.

    Reply queues outlive a minute unconsumed (the suite's default is 1.5 s): a detached
    session's queue must not expire between a refused taker and the honest resume on a
    loaded machine; these tests are about takeovers, not the resume window."""
    topology = Topology(processing_types=TEST_TYPES, prefix=unique_prefix(),
                        reply_expires_ms=60_000)
    common = dict(keys_file=keys, token_secret=SECRET, memory_broker=MemoryBroker(),
                  topology=topology, processing=topology.processing_types,
                  gateway_settings=GatewaySettings(chunk_rate=None, takeover_s=takeover_s,
                                                   **settings))
    return [make(**common) for _ in range(count)]
EdgeServer = Callable[..., AbstractAsyncContextManager[Embedded]]


@pytest.fixture
async def edge_server(request: pytest.FixtureRequest, tls: TLS) -> AsyncIterator[EdgeServer]:  # noqa: F811
    """``async with edge_server(settings, tls=True, broker=False) as srv``: a gateway with
    one passthrough worker; ``broker=True`` puts real RabbitMQ between them."""
    used: list[tuple[str, Topology]] = []

    @asynccontextmanager
    async def make(settings: GatewaySettings | None = None, *, use_tls: bool = True,
                   broker: bool = False, **kw: Any) -> AsyncIterator[Embedded]:
        topo = Topology(processing_types=("passthrough",), prefix=unique_prefix(),
                        reply_expires_ms=1500)
        url = request.getfixturevalue("rabbitmq_url") if broker else None
        if url is not None:
            used.append((url, topo))
        async with embedded_server(
                broker_url=url, topology=topo, processing=("passthrough",),
                ssl_context=tls.server if use_tls else None,
                gateway_settings=settings or GatewaySettings(), **kw) as srv:
            yield srv

    yield make
    for url, topo in used:
        await delete_prefixed(url, topo)


def victim_audio(seconds: float = 2.0) -> np.ndarray[Any, np.dtype[np.int16]]:
    rng = np.random.default_rng(7)
    return (rng.standard_normal(int(16000 * seconds)) * 3000).astype(np.int16)


@dataclass
class Victim:
    """A well-behaved real-time session streaming while an attack runs."""

    task: asyncio.Task[StreamResult]
    sent: bytes

    async def result(self) -> StreamResult:
        return await asyncio.wait_for(self.task, 60)

    async def assert_intact(self) -> None:
        result = await self.result()
        assert not result.dropped, result.dropped
        assert result.audio == self.sent


def start_victim(srv: Embedded, tls: TLS | None, seconds: float = 2.0,  # noqa: F811
                 key: str | None = None) -> Victim:
    """``key``: the victim's API key (default: the server's development key)."""
    key = key or srv.api_key
    assert key is not None
    x = victim_audio(seconds)
    client = AudioStreamClient(srv.url, api_key=key, pipeline=["passthrough"],
                               format=FMT, deadline_ms=10_000,
                               ssl_context=tls.client if tls is not None else None)
    return Victim(asyncio.get_running_loop().create_task(client.stream(x, rate=1.0)),
                  x.tobytes())


def host_port(srv: Embedded) -> tuple[str, int]:
    netloc = srv.http_url.split("://", 1)[1]
    host, port = netloc.rsplit(":", 1)
    return host, int(port)


async def raw_connect(srv: Embedded, tls: TLS | None = None  # noqa: F811
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = host_port(srv)
    ctx: ssl.SSLContext | None = tls.client if tls is not None else None
    return await asyncio.open_connection(host, port, ssl=ctx)


def upgrade_request(path: str = "/v1/stream", extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status and headers of an HTTP response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


def client_frame(opcode: int, payload: bytes, *, masked: bool = True, fin: bool = True) -> bytes:
    """A client WebSocket frame, masked as RFC 6455 requires (or not, to attack)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([first, (0x80 if masked else 0) | n])
    elif n < 65536:
        head = bytes([first, (0x80 if masked else 0) | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, (0x80 if masked else 0) | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of the next server frame (servers never mask)."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 10)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def closed_by_server(reader: asyncio.StreamReader, within: float = 10.0) -> bool:
    """True when the server closes the socket (EOF or reset) within ``within`` s."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


class Wrapped:
    """A gateway's transport with some methods replaced by a subclass; everything else is
    the wrapped transport's own."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
