"""The Python SDK: sync and async APIs, sources, callbacks, typed errors, backoff."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import (
    AudioStreamClient,
    ErrorReport,
    Notice,
    ReconnectPolicy,
    chunk_array,
)
from audiostream.client_errors import ConnectionRefused
from audiostream.errors import AudioStreamError, ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.testing import ThreadedServer, sample_wav

FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    with ThreadedServer(processing=("passthrough", "gain"),
                        gateway_settings=GatewaySettings(chunk_rate=None)) as srv:
        yield srv


def test_sync_api_streams_a_wav_file(server: ThreadedServer) -> None:
    client = AudioStreamClient(server.server.url, api_key=server.server.api_key,
                               pipeline=["passthrough"])
    seen: list[int] = []
    client.on_audio(lambda seq, _pcm: seen.append(seq))
    result = client.stream_sync(sample_wav(), rate=None)
    assert seen == list(range(len(result.outcomes)))
    assert result.summary["chunks_out"] == len(seen) and result.close_code == 1000


def test_numpy_and_async_iterator_sources_agree(server: ThreadedServer) -> None:
    x = (np.random.default_rng(4).standard_normal(4000) * 2000).astype(np.int16)
    floats = x.astype(np.float32) / 32768

    async def chunks() -> AsyncIterator[bytes]:
        for c in chunk_array(x, FMT, 20):
            yield c

    def client() -> AudioStreamClient:
        return AudioStreamClient(server.server.url, api_key=server.server.api_key,
                                 pipeline=[{"name": "gain", "params": {"db": 0}}], format=FMT)

    from_ints = client().stream_sync(x, rate=None)
    from_floats = client().stream_sync(floats, rate=None)
    from_iter = server.run(client().stream(chunks(), rate=None))
    assert from_ints.audio == from_floats.audio == from_iter.audio == x.tobytes()


def test_typed_notices_and_errors_reach_callbacks(server: ThreadedServer) -> None:
    client = AudioStreamClient(server.server.url, api_key=server.server.api_key,
                               pipeline=["passthrough"], format=FMT)
    notices: list[Notice] = []
    client.on_notice(notices.append)
    result = client.stream_sync([b"\x00\x00" * 10, b"\x00\x00\x00", b"\x01\x00"], rate=None)
    assert [n.code for n in notices] == [ErrorCode.INVALID_AUDIO]
    assert notices[0].seq == 1 and result.dropped == notices


def test_refusal_raises_with_the_code(server: ThreadedServer) -> None:
    client = AudioStreamClient(server.server.url, api_key=server.server.api_key,
                               pipeline=["teleport"], format=FMT)
    errors: list[ErrorReport] = []
    client.on_error(errors.append)
    with pytest.raises(AudioStreamError) as info:
        client.stream_sync([b"\x00\x00"])
    assert info.value.code == ErrorCode.UNKNOWN_STEP


def test_unreachable_gateway_gives_up_after_the_policy() -> None:
    client = AudioStreamClient("ws://127.0.0.1:1/v1/stream", api_key="as_x_y",
                               pipeline=["passthrough"], format=FMT,
                               reconnect=ReconnectPolicy(initial_s=0.001, connect_attempts=2))
    with pytest.raises(ConnectionRefused) as info:
        client.stream_sync([b"\x00\x00"])
    assert info.value.attempts == 2 and info.value.code != ErrorCode.BROKER_UNAVAILABLE


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    policy = ReconnectPolicy()  # 1 s doubling to 60 s, +-20 %
    for attempt, base in [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (20, 60)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays)
        assert max(delays) - min(delays) > 0  # jitter spreads reconnect storms
