"""Every exported family moves as it should, scraped over HTTP from live processes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.bench import Samples, parse_metrics
from audiostream.client import AudioStreamClient
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.metrics import STAGES
from audiostream.protocol import start_json
from audiostream.testing import Embedded, default_topology, embedded_server, eventually
from audiostream.topology import Topology
from tests.conftest import delete_prefixed, unique_prefix
from tests.gateway.test_e2e import stall_registry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)
CHUNK_BYTES = 640  # 20 ms


def chunks(n: int, seed: int = 0) -> list[bytes]:
    x = (np.random.default_rng(seed).standard_normal(320 * n) * 3000).astype(np.int16)
    return [x[i * 320:(i + 1) * 320].tobytes() for i in range(n)]


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(await resp.text())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def test_gateway_and_worker_families_move_with_a_stream() -> None:
    settings = GatewaySettings(max_connections=50)
    async with embedded_server(gateway_settings=settings) as srv:
        url = srv.ops_url + "/metrics"
        before = await scrape(url)
        assert value(before, "audiostream_gateway_connections_capacity") == 50
        assert value(before, "audiostream_gateway_connections_active") == 0
        # The gateway polls the depth of every work queue from the start.
        for ptype in srv.gateway.transport.topology.processing_types:
            assert ("audiostream_queue_depth", (("processing", ptype),)) in before

        pieces = chunks(50)
        half = asyncio.Event()

        async def source() -> AsyncIterator[bytes]:
            for i, c in enumerate(pieces):
                if i == 25:
                    await half.wait()
                yield c

        client = AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["passthrough"],
                                   format=FMT, deadline_ms=10_000)
        stream = asyncio.create_task(client.stream(source(), rate=None))

        async def mid_stream() -> bool:
            s = await scrape(url)
            return (value(s, "audiostream_chunks_in_total") == 25
                    and value(s, "audiostream_chunks_out_total") == 25)

        assert await eventually(mid_stream)
        during = await scrape(url)
        assert value(during, "audiostream_gateway_connections_active") == 1
        assert value(during, "audiostream_gateway_connections_total") == 1
        assert value(during, "audiostream_sessions_total", result="started") == 1
        assert value(during, "audiostream_gateway_session_start_seconds_count",
                     result="started") == 1
        assert value(during, "audiostream_gateway_session_start_seconds_sum",
                     result="started") > 0
        half.set()
        result = await stream
        assert len(result.outcomes) == 50 and not result.dropped

        async def closed() -> bool:
            s = await scrape(url)
            return (value(s, "audiostream_gateway_connections_active") == 0
                    and value(s, "audiostream_session_duration_seconds_count") == 1)

        assert await eventually(closed)
        after = await scrape(url)

    assert value(after, "audiostream_chunks_in_total") == 50
    assert value(after, "audiostream_bytes_in_total") == 50 * CHUNK_BYTES
    assert value(after, "audiostream_chunks_out_total") == 50
    assert value(after, "audiostream_bytes_out_total") == len(result.audio) == 50 * CHUNK_BYTES
    assert total(after, "audiostream_chunks_dropped_total") == 0
    assert value(after, "audiostream_round_trip_seconds_count") == 50
    assert value(after, "audiostream_round_trip_seconds_sum") > 0
    messages = value(after, "audiostream_gateway_messages_published_total")
    assert 2 <= messages <= 50  # at least one message per half, coalesced or not
    for stage in STAGES:
        assert value(after, "audiostream_stage_seconds_count", stage=stage) == messages, stage
    # Worker families (same registry in the embedded server).
    assert value(after, "audiostream_worker_messages_total",
                 processing="passthrough", status="ok") == messages
    assert value(after, "audiostream_worker_batch_size_sum", processing="passthrough") == messages
    batches = value(after, "audiostream_worker_batch_size_count", processing="passthrough")
    assert 1 <= batches <= messages
    assert value(after, "audiostream_worker_inference_seconds_count",
                 processing="passthrough") == batches
    assert value(after, "audiostream_worker_provider_info",
                 processing="passthrough", provider="python") == 1
    assert total(after, "audiostream_worker_errors_total") == 0
    # Busy time: the executor ran every batch, the loop thread used CPU; ratios need both.
    busy = value(after, "audiostream_worker_executor_busy_seconds_total",
                 processing="passthrough")
    assert 0 < busy <= value(after, "audiostream_worker_inference_seconds_sum",
                             processing="passthrough")
    assert value(after, "audiostream_worker_executor_busy_seconds_total", processing="gain") == 0
    loop_busy = value(after, "audiostream_worker_loop_busy_seconds_total")
    assert loop_busy > value(before, "audiostream_worker_loop_busy_seconds_total") > 0


async def test_forced_expiry_counts_a_drop_with_reason_expired(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg, entered, release = stall_registry()
    topo = Topology(processing_types=("passthrough", "stall"), prefix=unique_prefix())
    caplog.set_level(logging.INFO, logger="audiostream.gateway.pipeline")
    try:
        async with embedded_server(topology=topo, processors=reg) as srv:
            c = AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["stall"], format=FMT,
                                  deadline_ms=100)
            task = asyncio.create_task(c.stream(chunks(1), rate=None))
            await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
            result = await task  # the gateway's deadline answers while the worker is stuck
            release.set()
            s = await scrape(srv.ops_url + "/metrics")
    finally:
        release.set()
    [notice] = result.dropped
    assert notice.code == ErrorCode.EXPIRED
    assert value(s, "audiostream_chunks_in_total") == 1
    assert value(s, "audiostream_chunks_out_total") == 0
    assert value(s, "audiostream_chunks_dropped_total", reason="expired") == 1
    assert value(s, "audiostream_round_trip_seconds_count") == 0
    # The log line names the session, the chunk and the stage.
    assert f"session={result.session_id} seq=0 stage=deadline" in caplog.text


async def test_protocol_level_notices_and_errors_are_counted() -> None:
    async with embedded_server() as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(srv.url) as ws:
            await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
            assert (await ws.receive_json(timeout=10))["type"] == "ready"
            await ws.send_bytes(b"\x01\x02\x03")  # odd byte count: invalid audio, seq 0
            assert (await ws.receive_json(timeout=10))["reason"] == "invalid_audio"
            await ws.send_str("{oops")
            assert (await ws.receive_json(timeout=10))["name"] == "invalid_json"
            await ws.send_bytes(chunks(1)[0])  # seq 1
            assert (await ws.receive(timeout=10)).type is aiohttp.WSMsgType.BINARY
            await ws.send_str('{"type":"stop"}')
            assert (await ws.receive_json(timeout=10))["type"] == "summary"
        s = await scrape(srv.ops_url + "/metrics")
    # Every numbered frame counts in, and ends as audio or a counted notice.
    assert value(s, "audiostream_chunks_in_total") == 2
    assert value(s, "audiostream_chunks_out_total") == 1
    assert value(s, "audiostream_chunks_dropped_total", reason="invalid_audio") == 1
    assert value(s, "audiostream_gateway_errors_total", code="invalid_json") == 1


async def test_garbage_collections_are_exported_by_generation() -> None:
    """Gateway and worker share the embedded server's registry: exported once, and a full
    collection shows as generation 2."""
    async with embedded_server() as srv:
        url = srv.ops_url + "/metrics"
        before = await scrape(url)
        gc.collect()
        after = await scrape(url)
    for gen in ("0", "1", "2"):
        assert ("python_gc_collections_total", (("generation", gen),)) in before
    full = "python_gc_collections_total"
    assert value(after, full, generation="2") >= value(before, full, generation="2") + 1


async def test_a_scrape_can_ask_for_some_metrics_only() -> None:
    """``name[]`` narrows the exposition (benchmarks sample the loop lag 4 times a
    second without making the gateway render every histogram); none asked: all."""
    async with embedded_server() as srv:
        url = srv.ops_url + "/metrics"
        lag, gcs = "audiostream_gateway_loop_lag_seconds", "python_gc_collections_total"
        some = await scrape(f"{url}?name[]={lag}&name[]={gcs}")
        everything = await scrape(url)
    assert {n for n, _ in some} == {lag, gcs}
    assert len({n for n, _ in everything}) > 20
    assert {lag, gcs, "audiostream_chunks_in_total"} <= {n for n, _ in everything}


async def test_queue_depth_rises_without_workers_memory() -> None:
    settings = GatewaySettings(depth_poll_s=0.05, shed_above_ms=0)  # see hold_sessions
    async with embedded_server(workers=0, gateway_settings=settings) as srv:
        async with hold_sessions(srv, 3):
            assert await eventually(lambda: depth_is(srv, "passthrough", 3))


@contextlib.asynccontextmanager
async def hold_sessions(srv: Embedded, n: int) -> AsyncIterator[None]:
    """``n`` sessions that each sent one chunk (so one message each is published).

    Sent one session at a time, so that each goes out in a broker message of its own;
    with no worker the chunks wait, and the gateway must not shed (``shed_above_ms=0``)
    the next start when that takes longer than its threshold."""
    async with aiohttp.ClientSession() as http:
        sockets = []
        try:
            for i in range(n):
                ws = await http.ws_connect(srv.url)
                sockets.append(ws)
                await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"],
                                             deadline_ms=30_000))
                assert (await ws.receive_json(timeout=10))["type"] == "ready"
                await ws.send_bytes(chunks(1, seed=i)[0])
            yield
        finally:
            for ws in sockets:
                await ws.close()


async def depth_is(srv: Embedded, processing: str, expected: float) -> bool:
    s = await scrape(srv.ops_url + "/metrics")
    return value(s, "audiostream_queue_depth", processing=processing) == expected


# --- a worker process against RabbitMQ --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.rabbitmq
async def test_worker_process_metrics_and_queue_depth_on_rabbitmq(rabbitmq_url: str) -> None:
    prefix = unique_prefix()
    topo = Topology(processing_types=default_topology().processing_types, prefix=prefix,
                    reply_expires_ms=1500)
    port = free_port()
    worker = None
    settings = GatewaySettings(depth_poll_s=0.1, shed_above_ms=0)  # see hold_sessions
    try:
        async with embedded_server(broker_url=rabbitmq_url, topology=topo, workers=0,
                                   gateway_settings=settings) as srv:
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "audiostream", "worker", "--broker", rabbitmq_url,
                "--prefix", prefix, "--processing", "passthrough",
                "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            )
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), 60)
            assert b"consuming passthrough" in line, line
            wurl = f"http://127.0.0.1:{port}/metrics"

            async def depth_exported() -> bool:  # the worker's first poll
                key = ("audiostream_queue_depth", (("processing", "passthrough"),))
                return key in await scrape(wurl)

            assert await eventually(depth_exported)
            before = await scrape(wurl)
            assert value(before, "audiostream_worker_provider_info",
                         processing="passthrough", provider="python") == 1

            c = AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["passthrough"],
                                  format=FMT, deadline_ms=10_000)
            result = await c.stream(chunks(20), rate=None)
            assert len(result.outcomes) == 20 and not result.dropped
            gw = await scrape(srv.ops_url + "/metrics")
            messages = value(gw, "audiostream_gateway_messages_published_total")
            assert messages >= 1
            assert value(gw, "audiostream_chunks_in_total") == 20
            assert value(gw, "audiostream_stage_seconds_count", stage="queue_wait") == messages
            after = await scrape(wurl)
            assert value(after, "audiostream_worker_messages_total",
                         processing="passthrough", status="ok") == messages
            assert value(after, "audiostream_worker_batch_size_sum",
                         processing="passthrough") == messages
            batches = value(after, "audiostream_worker_batch_size_count",
                            processing="passthrough")
            assert value(after, "audiostream_worker_inference_seconds_count",
                         processing="passthrough") == batches >= 1
            assert total(after, "audiostream_worker_errors_total") == 0

            # Stop the worker (graceful), then publish with nobody consuming.
            worker.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.wait(), 30) == 0
            async with hold_sessions(srv, 3):
                assert await eventually(lambda: depth_is(srv, "passthrough", 3), within=20)
    finally:
        if worker is not None and worker.returncode is None:
            worker.kill()
            await worker.wait()
        await delete_prefixed(rabbitmq_url, topo)
