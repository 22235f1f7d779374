"""/readyz follows the broker: false while RabbitMQ is unreachable, true once it is back."""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp
import pytest

from audiostream.gateway import Gateway, KeyStore, start_site
from audiostream.gateway.edge import EDGE_KEY
from audiostream.testing import eventually
from audiostream.topology import Topology
from audiostream.transport.rabbitmq import RabbitTransport
from tests.conftest import delete_prefixed, unique_prefix
from tests.gateway.conftest import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


async def test_readyz_is_false_while_the_broker_is_unreachable(rabbitmq_url: str) -> None:
    parts = urlsplit(rabbitmq_url)
    proxy = TcpProxy(parts.port or 5672, parts.hostname or "127.0.0.1")
    await proxy.start()
    url = rabbitmq_url.replace(f":{parts.port or 5672}", f":{proxy.port}", 1)
    topology = Topology(processing_types=("passthrough",), prefix=unique_prefix())
    transport = RabbitTransport(url, topology)
    gateway = Gateway(transport, KeyStore(None))
    runner, _port = await start_site(gateway.app(), "127.0.0.1", 0)
    ready_url = f"{runner.app[EDGE_KEY].ops_url}/readyz"  # the operations site

    async def ready() -> bool:
        async with aiohttp.ClientSession() as http, http.get(ready_url) as r:
            body = await r.json()
            assert (r.status == 200) == body["ready"]
            return bool(body["ready"])

    async def not_ready() -> bool:
        return not await ready()

    try:
        assert await ready()
        proxy.refuse = True  # the broker "goes away": cut and refuse new connections
        proxy.cut()
        assert await eventually(not_ready, within=15)
        proxy.refuse = False  # it comes back; the robust connection reconnects
        assert await eventually(ready, within=30)
    finally:
        await runner.cleanup()
        await proxy.close()
        await delete_prefixed(rabbitmq_url, topology)
