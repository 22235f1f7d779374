"""Fixtures for the policy tests: the gateway tests' TLS and servers, and a TCP hop to
RabbitMQ that can stop moving bytes while its connections stay open."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from tests.gateway.conftest import expect_close, make_server, server, tls  # noqa: F401


class StallingProxy:
    """Forwards TCP to ``target``; ``pause()`` stops forwarding in both directions
    without closing anything (the broker "hangs"), ``resume()`` carries on.
    ``upstream_bytes`` counts what reached the target."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.target_port = host, port
        self.port = 0
        self.upstream_bytes = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, broker_url: str, query: str = "") -> str:
        parts = urlsplit(broker_url)
        netloc = parts.netloc.rsplit("@", 1)
        creds = netloc[0] + "@" if len(netloc) == 2 else ""
        return f"{parts.scheme}://{creds}127.0.0.1:{self.port}{parts.path or '/'}{query}"

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while True:
                    await self._flowing.wait()
                    data = await src.read(65536)
                    if not data:
                        break
                    await self._flowing.wait()  # read just before a pause: hold it
                    if up:
                        self.upstream_bytes += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            self._tasks.discard(task)

    async def close(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


@pytest.fixture
async def stalling_proxy(rabbitmq_url: str) -> AsyncIterator[StallingProxy]:
    parts = urlsplit(rabbitmq_url)
    proxy = StallingProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
