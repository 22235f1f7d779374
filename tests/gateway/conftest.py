"""Real TLS for gateway tests: a trustme CA, a server context (TLS 1.3) and a client context."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from audiostream.gateway import GatewaySettings, server_ssl_context
from audiostream.testing import Embedded, embedded_server
from audiostream.topology import Topology
from tests.conftest import delete_prefixed


@dataclass
class TLS:
    server: ssl.SSLContext
    client: ssl.SSLContext
    ca_file: Path
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    ca_file, cert_file, key_file = d / "ca.pem", d / "server.pem", d / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    client = ssl.create_default_context(cafile=str(ca_file))
    return TLS(server_ssl_context(cert_file, key_file), client, ca_file, cert_file, key_file)


ServerFactory = Callable[..., AbstractAsyncContextManager[Embedded]]


@pytest.fixture
async def make_server(
    transport_kind: str, topology: Topology, tls: TLS, request: pytest.FixtureRequest
) -> AsyncIterator[ServerFactory]:
    """Starts gateway + workers over wss:// on the transport under test."""
    url = request.getfixturevalue("rabbitmq_url") if transport_kind == "rabbitmq" else None
    used: list[Topology] = []

    def make(**kw: Any) -> AbstractAsyncContextManager[Embedded]:
        # Tests stream faster than real time: no per-connection rate limit unless asked.
        kw.setdefault("gateway_settings", GatewaySettings(chunk_rate=None))
        kw.setdefault("topology", topology)
        kw.setdefault("processing", kw["topology"].processing_types)
        used.append(kw["topology"])
        return embedded_server(broker_url=url, ssl_context=tls.server, **kw)

    yield make
    if url is not None:
        for topo in used:
            await delete_prefixed(url, topo)


@pytest.fixture
async def server(make_server: ServerFactory) -> AsyncIterator[Embedded]:
    async with make_server() as s:
        yield s


async def read_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, object]:
    """The next message, which must be a JSON text frame."""
    msg = await ws.receive(timeout=30)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    data: dict[str, object] = json.loads(msg.data)
    return data


async def expect_close(ws: aiohttp.ClientWebSocketResponse, code: int) -> None:
    """The server closes with ``code``: read it from the close frame itself, because
    answering the close can race the server dropping TLS, which aiohttp reports as 1006."""
    msg = await ws.receive(timeout=10)
    if msg.type is aiohttp.WSMsgType.CLOSE:
        assert msg.data == code, (msg.data, msg.extra)
    else:
        assert msg.type is aiohttp.WSMsgType.CLOSED and ws.close_code == code, msg


class TcpProxy:
    """A real TCP hop we can cut, to simulate a network blip between client and gateway."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.target_host = target_host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.refuse = False
        """While set, new connections are closed at once (the target is 'down')."""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host,
                                                                 self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


def rabbit_unacked(queue: str) -> int:
    """``messages_unacknowledged`` of ``queue`` as RabbitMQ itself reports it."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "--no-table-headers", "name",
         "messages_unacknowledged"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    raise AssertionError(f"queue {queue} not listed")
