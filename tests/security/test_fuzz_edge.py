"""Fuzzing the pre-auth paths of a live gateway: at least 10,000 mutated HTTP request
heads and WebSocket frame sequences a run, over real sockets, within a time budget.

Nothing may crash or log an error, no answer may be a 5xx (or a 1011 close), every socket
must end by itself (one request per connection, handshake timeout), no task or socket
may be left behind, and a victim session streaming alongside keeps every chunk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time

import pytest

from audiostream.gateway import GatewaySettings
from audiostream.gateway.edge import EdgeSettings
from audiostream.testing import Embedded
from tests.security.conftest import (
    EdgeServer,
    client_frame,
    host_port,
    start_victim,
    upgrade_request,
)

pytestmark = pytest.mark.integration

CASES = int(os.environ.get("AUDIOSTREAM_FUZZ_CASES", "10000"))
BUDGET_S = float(os.environ.get("AUDIOSTREAM_FUZZ_BUDGET_S", "300"))
CONCURRENCY = 64

METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"CONNECT", b"PRI", b"G\x00T", b"get", b""]
PATHS = [b"/v1/stream", b"/", b"/metrics", b"/healthz", b"/readyz", b"*", b"//v1/stream",
         b"/v1/stream/../metrics", b"http://evil/v1/stream", b"/%00", b"/v1/stream#frag"]
QUERIES = [b"", b"?", b"?a=1", b"?api_key=as_0123456789ab_secretsecretsecret",
           b"?x=" + b"A" * 40, b"?Api-Key=1", b"?%61pi_key=1", b"?token=bt1.x", b"?" + b"&" * 300]
HEADERS = [b"Host: x", b"Upgrade: websocket", b"Connection: Upgrade", b"Connection: close",
           b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8",
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Key: short",
           b"Sec-WebSocket-Protocol: as_0123456789ab_secretsecret", b"Origin: https://evil",
           b"Transfer-Encoding: chunked", b"Content-Length: 5", b"Content-Length: -1",
           b"Content-Length: 99999999999", b"Expect: 100-continue", b"X-A: " + b"b" * 9000,
           b"X-Forged: \"quoted\"\x1b[31m", b" folded: continuation", b"Bad Header: 1",
           b"Host: x\rInjected: y", b"Sec-WebSocket-Extensions: permessage-deflate"]


def http_case(rng: random.Random) -> bytes:
    """A request head built from hostile parts, then mutated at the byte level."""
    line = (rng.choice(METHODS) + b" " + rng.choice(PATHS) + rng.choice(QUERIES) + b" " +
            rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""]))
    headers = rng.sample(HEADERS, rng.randint(0, 8))
    data = bytearray(line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n")
    for _ in range(rng.choice([0, 0, 1, 3])):
        if not data:
            break
        op = rng.randrange(4)
        i = rng.randrange(len(data))
        if op == 0:
            data[i] = rng.randrange(256)
        elif op == 1:
            del data[i:i + rng.randint(1, 20)]
        elif op == 2:
            data[i:i] = rng.choice([b"\r\n", b"\n", b"\x00", b":", b" ", b"\r\n\r\n"])
        else:
            data = data[:i]  # truncated: the handshake timeout must end it
    if rng.random() < 0.1:
        data += rng.randbytes(rng.randint(1, 200))  # a body or pipelined garbage
    return bytes(data)


def frames_case(rng: random.Random) -> bytes:
    """A valid upgrade followed by hostile frames."""
    out = [upgrade_request()]
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(8)
        if kind == 0:
            out.append(rng.randbytes(rng.randint(1, 40)))
        elif kind == 1:
            out.append(client_frame(rng.choice([0x0, 0x3, 0xB, 0xF]), rng.randbytes(5)))
        else:
            opcode = rng.choice([0x1, 0x2, 0x8, 0x9, 0xA])
            payload = rng.choice([
                b'{"type":"keepalive"}', b'{"type":"start","api_key":"as_1_2"}', b"{",
                b"\xff\xfe", rng.randbytes(rng.randint(0, 300)), b"\x03\xe8", b"\x00",
            ])
            out.append(client_frame(opcode, payload, masked=rng.random() > 0.15,
                                    fin=rng.random() > 0.1))
    if rng.random() < 0.6:
        out.append(client_frame(0x8, b"\x03\xe8"))  # a goodbye: the server closes
    return b"".join(out)


async def run_case(host: str, port: int, data: bytes, half_close: bool = True) -> bytes:
    """Send, half-close (or not), read to the end; returns what the server said."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
            if half_close and writer.can_write_eof():
                writer.write_eof()
        got = bytearray()
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(20):
                while chunk := await reader.read(65536):
                    got += chunk
        return bytes(got)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def check_answer(data: bytes, got: bytes) -> None:
    if got.startswith(b"HTTP/1."):
        status = int(got[9:12])
        assert status < 500, (data[:300], got[:300])
    if b"\x88\x02\x03\xf3" in got:  # a close frame with 1011 (internal error)
        raise AssertionError((data[:300], got[:300]))


async def tasks_settled(srv: Embedded, baseline: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        n = len(asyncio.all_tasks())
        if n <= baseline and not srv.gateway.connections:
            return n
        await asyncio.sleep(0.05)  # sockets wind down after their clients left
    return len(asyncio.all_tasks())


@pytest.mark.parametrize("data", [
    b"CONNECT \r\n\r\n/%00 \r\n\r\n",  # aiohttp 3.14 parses a request without a target
    b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n",  # not an upgrade
    upgrade_request() + client_frame(0x1, b"{", masked=False),
    # aiohttp answers an unknown Expect with a 417 quoting it; a byte that is not UTF-8
    # made building that answer fail (500)
    b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nExpect: 100-co\xa4tinue\r\n\r\n",
])
async def test_pinned_cases(
    edge_server: EdgeServer, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """Inputs a fuzz run once failed on, kept as fixed cases."""
    caplog.set_level(logging.WARNING)
    async with edge_server(GatewaySettings(chunk_rate=None), use_tls=False) as srv:
        got = await run_case(*host_port(srv), data, half_close=False)
        check_answer(data, got)
        assert got  # an answer, then the server closed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_fuzz_the_pre_auth_paths(
    edge_server: EdgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    seed = int(os.environ.get("AUDIOSTREAM_FUZZ_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    settings = GatewaySettings(chunk_rate=None, auth_timeout_s=0.5,
                               edge=EdgeSettings(handshake_timeout_s=0.5))
    async with edge_server(settings, use_tls=False) as srv:
        host, port = host_port(srv)
        baseline = len(asyncio.all_tasks())
        victim = start_victim(srv, None, seconds=4.0)
        # Most cases do not half-close (aiohttp drops a socket at EOF, before answering):
        # the server must end them itself (answer and close, handshake or auth timeout).
        cases = [(http_case(rng) if rng.random() < 0.6 else frames_case(rng),
                  rng.random() < 0.3) for _ in range(CASES)]
        began = time.monotonic()
        queue = iter(cases)
        done = 0

        async def work() -> None:
            nonlocal done
            for data, half_close in queue:
                assert time.monotonic() - began < BUDGET_S, f"budget spent after {done} cases"
                check_answer(data, await run_case(host, port, data, half_close))
                done += 1

        await asyncio.gather(*(work() for _ in range(CONCURRENCY)))
        took = time.monotonic() - began
        await victim.assert_intact()
        assert await tasks_settled(srv, baseline + 1) <= baseline + 1  # + the victim's own
        pending = srv.gateway.metrics_registry.get_sample_value(
            "audiostream_gateway_pending_sockets")
        assert pending == 0
    print(f"fuzz: {done} cases in {took:.1f} s (seed {seed})")
    assert done >= 10_000 or done == CASES
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, (seed, [r.getMessage() for r in errors[:5]])
