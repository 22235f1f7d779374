"""Hole 10, keys in URLs and logs: key-shaped query strings are refused whatever the
parameter is called, the access log carries no query string, no subprotocol value and no
unescaped client field, and malformed HTTP costs one rate-limited line, no traceback."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

import aiohttp
import pytest

from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.gateway.edge import credential_in_query
from tests.gateway.conftest import TLS
from tests.security.conftest import EdgeServer, raw_connect, read_head, start_victim

pytestmark = pytest.mark.integration

KEY = "as_0123456789ab_Zm9vYmFyYmF6cXV4cXV1eA-secret"


@pytest.mark.parametrize("query", [
    f"x={KEY}", f"Api-Key={KEY}", f"API_KEY={KEY}", f"k={quote(quote(KEY))}",
    "token=bt1.eyJhbGciOiJIUzI1NiJ9.payload.sig", f"{KEY}", "auth=short",
    "a=1&session_token=2", "q=" + "A" * 40,
])
async def test_key_shaped_query_strings_are_refused(
    edge_server: EdgeServer, tls: TLS, query: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with edge_server(GatewaySettings(chunk_rate=None)) as srv, \
            aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(f"{srv.url}?{query}", ssl=tls.client)
        assert info.value.status == 400
        async with http.get(f"{srv.http_url}/v1/stream?{query}", ssl=tls.client) as resp:
            body = await resp.json()
            assert body["code"] == ErrorCode.CREDENTIALS_IN_URL
    secret = query.split("=", 1)[-1]
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_ordinary_query_strings_are_not_key_shaped() -> None:
    assert not credential_in_query("")
    assert not credential_in_query("lang=en&debug=1")
    assert credential_in_query(f"X-Api-Key={KEY}")


async def test_access_log_has_no_query_subprotocol_or_forged_fields(
    edge_server: EdgeServer, tls: TLS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with edge_server(GatewaySettings(chunk_rate=None)) as srv:
        victim = start_victim(srv, tls)
        async with aiohttp.ClientSession() as http:
            # The key as a subprotocol, a user agent that tries to forge a field.
            forged = 'curl" 200 0 "injected'
            async with http.ws_connect(srv.url, ssl=tls.client, protocols=(KEY,),
                                       headers={"User-Agent": forged}) as ws:
                await ws.send_str('{"type":"keepalive"}')
                assert (await ws.receive(timeout=10)).type is aiohttp.WSMsgType.TEXT
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await http.ws_connect(f"{srv.url}?api_key={KEY}", ssl=tls.client)
        await victim.assert_intact()
    access = [r.getMessage() for r in caplog.records if r.name == "audiostream.access"]
    assert len(access) >= 3
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in text and "api_key" not in text
    assert any('"curl\\" 200 0 \\"injected"' in line for line in access), access
    assert all(line.count('"') - line.count('\\"') == 8 for line in access), access


async def test_malformed_http_costs_one_line_and_no_traceback(
    edge_server: EdgeServer, tls: TLS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "aiohttp")
    caplog.set_level(logging.WARNING, "audiostream")
    async with edge_server(GatewaySettings(chunk_rate=None)) as srv:
        victim = start_victim(srv, tls)

        async def garbage(i: int) -> int:
            reader, writer = await raw_connect(srv, tls)
            writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nBad Header\x00: " +
                         str(i).encode() + b"\r\n\r\n")
            await writer.drain()
            status, headers = await read_head(reader)
            writer.close()
            assert headers.get("server") == "audiostream"
            return status

        statuses = await asyncio.gather(*(garbage(i) for i in range(50)))
        assert set(statuses) == {400}
        await victim.assert_intact()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    lines = [r for r in caplog.records if "malformed HTTP" in r.getMessage()]
    assert 1 <= len(lines) <= 2
    assert all(r.exc_info is None for r in caplog.records)
