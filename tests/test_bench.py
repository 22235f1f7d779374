"""``audiostream bench`` against a real embedded server: its numbers must be the server's."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, generate_latest

from audiostream.bench import (
    BenchConfig,
    histogram_quantile,
    metrics_url_for,
    parse_metrics,
    plot,
    run_bench,
    server_view,
    synthetic_audio,
)
from audiostream.metrics import STAGES, GatewayMetrics, WorkerMetrics
from audiostream.protocol import V1_1, Credit, Ready, encode_server
from audiostream.testing import embedded_server

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def sum_over(registry: CollectorRegistry, name: str) -> float:
    """A labelled counter summed over all its children."""
    total = 0.0
    for family in registry.collect():
        for s in family.samples:
            if s.name == name:
                total += s.value
    return total


@pytest.mark.integration
async def test_bench_agrees_with_the_servers_own_counters(tmp_path: Path) -> None:
    async with embedded_server() as srv:
        cfg = BenchConfig(url=srv.url, api_key=srv.api_key, sessions=4, duration_s=2.0,
                          pipeline=("passthrough",), ramp_s=0.5,
                          metrics_urls=(f"{srv.ops_url}/metrics",))
        lines: list[str] = []
        frozen: list[int] = []

        def progress(line: str) -> None:
            lines.append(line)
            frozen.append(gc.get_freeze_count())

        gc.unfreeze()  # whatever an earlier test in this process froze
        r = await run_bench(cfg, report=progress, progress_every_s=0.5)
        # While streaming, the heap from before is out of the collector's reach (a full
        # collection stalled every session at once); afterwards it is given back.
        assert frozen and min(frozen) > 0
        assert gc.get_freeze_count() == 0
        reg = srv.gateway.metrics_registry
        chunks_in = counter(reg, "audiostream_chunks_in_total")
        chunks_out = counter(reg, "audiostream_chunks_out_total")
        dropped = sum_over(reg, "audiostream_chunks_dropped_total")
        published = counter(reg, "audiostream_gateway_messages_published_total")
        rt_count = counter(reg, "audiostream_round_trip_seconds_count")

    per_session = math.ceil(2.0 * 16000 / 320)
    c = r["chunks"]
    assert c["sent"] == 4 * per_session == chunks_in
    assert c["outcomes"] == chunks_out + dropped == c["sent"]
    assert c["audio"] == chunks_out and c["dropped"] == dropped
    assert r["sessions"] == {"requested": 4, "completed": 4, "failed": 0}
    assert r["errors_by_code"] == {}
    assert r["round_trip_ms"]["count"] == c["audio"] == rt_count
    rt = r["round_trip_ms"]
    assert 0 < rt["p50"] <= rt["p90"] <= rt["p99"] <= rt["max"]
    assert r["round_trip_from_due_ms"]["count"] == c["audio"]
    assert r["send_lag_ms"]["count"] == c["sent"]
    assert r["start_ms"]["count"] == 4 and r["start_ms"]["p50"] > 0

    # The server section is the difference of two scrapes: it must equal the registry.
    srv_view = r["server"]
    assert r["consistent"] is True
    assert srv_view["chunks_in"] == chunks_in
    assert srv_view["chunks_out"] == chunks_out
    assert srv_view["messages_published"] == published
    assert srv_view["round_trip"]["count"] == rt_count
    for stage in STAGES:  # every stage observed once per message (no drops here)
        assert srv_view["stages"][stage]["count"] == published, stage
        assert srv_view["stages"][stage]["mean_ms"] is not None
    worker = srv_view["workers"]["passthrough"]
    assert worker["messages_by_status"] == {"ok": published}
    assert worker["mean_batch_size"] >= 1

    # Progress went to the reporter; the last line is the final tally.
    assert lines and f"sent {c['sent']}/{c['sent']}" in lines[-1]
    json.dumps(r)  # JSON-able as is
    out = tmp_path / "latency.png"
    plot(r, out)
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.integration
async def test_refused_sessions_are_errors_by_code() -> None:
    async with embedded_server() as srv:
        cfg = BenchConfig(url=srv.url, api_key="as_000000000000_wrong", sessions=2,
                          duration_s=0.1, pipeline=("passthrough",),
                          metrics_urls=(f"{srv.ops_url}/metrics",))
        gc.freeze()  # as the gateway and worker commands do after start-up
        try:
            r = await run_bench(cfg)
            assert gc.get_freeze_count() > 0  # the bench left its caller's freeze alone
        finally:
            gc.unfreeze()
    assert r["errors_by_code"] == {"auth_failed": 2}
    assert r["sessions"]["failed"] == 2
    assert r["chunks"]["sent"] == 0
    assert r["server"]["chunks_in"] == 0


@pytest.mark.integration
async def test_cli_bench_writes_json_and_png(tmp_path: Path) -> None:
    async with embedded_server() as srv:
        out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "audiostream", "bench", "--url", srv.url,
            "--api-key", srv.api_key, "--sessions", "2", "--duration", "1",
            "--pipeline", "passthrough", "--ramp", "0.2", "--chunk-ms", "20",
            "--json", str(out_json), "--plot", str(out_png),
            "--metrics-url", f"{srv.ops_url}/metrics",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
        reg = srv.gateway.metrics_registry
        chunks_in = counter(reg, "audiostream_chunks_in_total")
    assert proc.returncode == 0, stderr.decode()
    assert b"[bench" in stderr  # live progress
    assert b"round trip ms: p50" in stdout
    report = json.loads(out_json.read_text())
    assert report["chunks"]["sent"] == 2 * 50 == chunks_in
    assert report["consistent"] is True
    assert "timeline" not in report
    assert out_png.read_bytes()[:8] == PNG_MAGIC


async def test_time_a_sender_waits_for_credit_counts_in_the_latency_from_when_due() -> None:
    """A real-time source cannot pause: a chunk held back by flow control is that much
    later for the listener. Timed only from its send, the wait vanished, so an
    overloaded gateway that throttled its senders looked faster (coordinated omission).
    This server echoes at once but grants credit for the second chunk ``HOLD`` late."""
    hold = 0.25

    async def gateway(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # start
        await ws.send_str(encode_server(Ready("s", 4096, version=V1_1, credit=1)))
        granted = False
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
                if not granted:
                    granted = True
                    await asyncio.sleep(hold)  # the stalled gateway under test
                    await ws.send_str(encode_server(Credit(1000)))
            elif msg.type is WSMsgType.TEXT and '"stop"' in msg.data:
                break
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/v1/stream", gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        r = await run_bench(BenchConfig(url=f"ws://127.0.0.1:{port}/v1/stream", api_key="k",
                                        sessions=1, duration_s=0.2,
                                        pipeline=("passthrough",)))
    finally:
        await runner.cleanup()
    assert r["chunks"]["audio"] == r["chunks"]["sent"] == 10
    waited_ms = (hold - 0.02) * 1000  # the second chunk was due 20 ms after the first
    assert r["send_lag_ms"]["max"] >= waited_ms
    assert r["round_trip_from_due_ms"]["max"] >= waited_ms
    assert r["round_trip_from_due_ms"]["count"] == 10 and r["start_ms"]["count"] == 1


# --- pure parts ------------------------------------------------------------------------------


def test_server_view_is_the_difference_of_two_scrapes() -> None:
    reg = CollectorRegistry()
    gm, wm = GatewayMetrics(reg), WorkerMetrics(reg)
    gm.chunks_in.inc(5)
    gm.stage.labels(stage="inference").observe(0.5)
    before = parse_metrics(generate_latest(reg).decode())
    gm.chunks_in.inc(3)
    gm.chunks_out.inc(2)
    gm.dropped.labels(reason="expired").inc()
    gm.messages_published.inc(2)
    gm.stage.labels(stage="inference").observe(0.002)
    gm.stage.labels(stage="inference").observe(0.004)
    wm.batch_size.labels(processing="gain").observe(3)
    wm.messages.labels(processing="gain", status="ok").inc(3)
    after = parse_metrics(generate_latest(reg).decode())
    view = server_view(before, after)
    assert view["chunks_in"] == 3 and view["chunks_out"] == 2
    assert view["dropped_by_reason"] == {"expired": 1}
    assert view["chunks_per_message"] == 1.5
    inference = view["stages"]["inference"]
    assert inference["count"] == 2 and inference["mean_ms"] == pytest.approx(3.0)
    assert view["stages"]["queue_wait"]["count"] == 0
    assert view["stages"]["queue_wait"]["mean_ms"] is None
    assert view["workers"]["gain"]["mean_batch_size"] == 3
    assert view["workers"]["gain"]["messages_by_status"] == {"ok": 3}


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 0.0, 0.2: 50.0, 0.4: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.99, {1.0: 0.0, math.inf: 0.0}) is None


def test_metrics_url_follows_the_stream_url() -> None:
    assert metrics_url_for("ws://127.0.0.1:8080/v1/stream") == "http://127.0.0.1:9090/metrics"
    assert metrics_url_for("wss://gw.example:443/v1/stream") == "http://gw.example:9090/metrics"


def test_synthetic_audio_is_deterministic_and_differs_per_session() -> None:
    a = synthetic_audio(3, 0.5, 16000, seed=1)
    assert a.dtype == np.int16 and a.shape == (8000,)
    assert np.array_equal(a, synthetic_audio(3, 0.5, 16000, seed=1))
    assert not np.array_equal(a, synthetic_audio(4, 0.5, 16000, seed=1))
    assert np.abs(a).max() > 1000
