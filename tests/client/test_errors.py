"""Connection errors are their own classes, raised after a bounded budget; refusals map
to the exception tree by code."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest

from audiostream.audio import AudioFormat
from audiostream.client import AudioStreamClient, ReconnectPolicy
from audiostream.client_errors import (
    AuthenticationError,
    ClientError,
    ConnectError,
    ConnectionRefused,
    DnsError,
    HandshakeError,
    LimitExceeded,
    ReadyTimeout,
    RequestError,
    ResumeError,
    ServiceUnavailable,
    TlsError,
    error_for,
)
from audiostream.errors import RETRYABLE_CODES, AudioStreamError, ErrorCode
from audiostream.testing import Embedded
from tests.gateway.conftest import TLS

FMT = AudioFormat.pcm16(16000)
FAST = ReconnectPolicy(initial_s=0.01, max_s=0.05, connect_attempts=3)
#: Generous upper bound for a whole retry budget on this shared machine (vs ~3 min before).
BOUND_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def open_session(client: AudioStreamClient) -> None:
    async with client.session(["passthrough"], format=FMT) as s:
        await s.finish()


async def test_connection_refused_is_its_own_error_after_the_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = AudioStreamClient(f"ws://127.0.0.1:{free_port()}/v1/stream", api_key="as_x_y",
                               reconnect=FAST)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="audiostream.client"), \
            pytest.raises(ConnectionRefused) as info:
        await open_session(client)
    assert time.monotonic() - started < BOUND_S
    assert info.value.attempts == 3
    assert info.value.code != ErrorCode.BROKER_UNAVAILABLE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "retrying" in warnings[0].message  # the first retry only


async def test_dns_failure_is_its_own_error() -> None:
    client = AudioStreamClient("ws://audiostream-nope.invalid/v1/stream", api_key="as_x_y",
                               reconnect=FAST)
    started = time.monotonic()
    with pytest.raises(DnsError) as info:
        await open_session(client)
    assert time.monotonic() - started < BOUND_S and info.value.attempts == 3


async def test_untrusted_certificate_is_a_tls_error(tls_server: Embedded) -> None:
    # The default context does not trust the test CA: verification must fail.
    client = AudioStreamClient(tls_server.url, api_key=tls_server.api_key, reconnect=FAST)
    started = time.monotonic()
    with pytest.raises(TlsError) as info:
        await open_session(client)
    assert time.monotonic() - started < BOUND_S and info.value.attempts == 3
    assert isinstance(info.value, ConnectError) and isinstance(info.value, AudioStreamError)


async def test_trusted_certificate_works(tls_server: Embedded, tls: TLS) -> None:
    client = AudioStreamClient(tls_server.url, api_key=tls_server.api_key,
                               ssl_context=tls.client)
    result = await client.stream([b"\x00\x00" * 160], format=FMT, pipeline=["passthrough"])
    assert result.chunks == 1


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP server that accepts and never answers (a hung gateway or a wrong service)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    srv = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(srv.sockets[0].getsockname()[1])
    finally:
        for w in held:
            w.close()
        srv.close()


async def test_ready_timeout_against_a_silent_tcp_server(silent_port: int) -> None:
    client = AudioStreamClient(f"ws://127.0.0.1:{silent_port}/v1/stream", api_key="as_x_y",
                               connect_timeout_s=0.2, ready_timeout_s=0.3,
                               reconnect=ReconnectPolicy(initial_s=0.01, connect_attempts=2))
    started = time.monotonic()
    with pytest.raises(ReadyTimeout) as info:
        await open_session(client)
    assert time.monotonic() - started < BOUND_S and info.value.attempts == 2


async def test_refusals_raise_by_code(server: Embedded) -> None:
    bad_step = AudioStreamClient(server.url, api_key=server.api_key)
    with pytest.raises(RequestError) as info:
        async with bad_step.session(["teleport"], format=FMT):
            pass
    assert info.value.code == ErrorCode.UNKNOWN_STEP and not info.value.retryable
    bad_key = AudioStreamClient(server.url, api_key="as_000000000000_nope")
    with pytest.raises(AuthenticationError) as auth:
        await open_session(bad_key)
    assert auth.value.code == ErrorCode.AUTH_FAILED


def test_session_needs_a_format() -> None:
    client = AudioStreamClient("ws://127.0.0.1:1/v1/stream", api_key="k")
    with pytest.raises(ClientError, match=r"AudioFormat\.pcm16"):
        client.session(["passthrough"])
    with pytest.raises(ClientError, match="at most 1000 ms"):
        client.session(["passthrough"], format=FMT, chunk_ms=5000)


@pytest.mark.parametrize(("code", "cls"), [
    (4006, RequestError), (4010, AuthenticationError), (4013, AuthenticationError),
    (4020, LimitExceeded), (4023, LimitExceeded), (4025, LimitExceeded),
    (4040, ResumeError), (4041, ResumeError), (4050, ServiceUnavailable),
    (4091, ServiceUnavailable),
])
def test_error_table_mirrors_error_codes(code: int, cls: type[ClientError]) -> None:
    err = error_for(code, "m")
    assert type(err) is cls and err.wire_code == code
    known = [c for c in ErrorCode if int(c) == code]
    if known:
        assert err.code == known[0]


def test_every_error_code_has_a_class() -> None:
    for code in ErrorCode:
        err = error_for(int(code), "m")
        assert err.code == code and err.retryable == (code in RETRYABLE_CODES)


async def test_credentials_in_the_url_are_refused_at_once(server: Embedded) -> None:
    client = AudioStreamClient(server.url + "?api_key=leaked", api_key=server.api_key,
                               reconnect=FAST)
    with pytest.raises(HandshakeError) as info:
        await open_session(client)
    assert info.value.status == 400 and info.value.attempts == 1
