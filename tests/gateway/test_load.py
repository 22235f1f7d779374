"""The queue-age gauge sees load that queue depth does not (issue 14, "autoscaling is blind")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from audiostream.audio import AudioFormat, Encoding
from audiostream.bench import parse_metrics
from audiostream.client import AudioStreamClient
from audiostream.envelope import Step
from audiostream.errors import ErrorCode
from audiostream.gateway import GatewaySettings
from audiostream.gateway.load import LoadMonitor
from audiostream.metrics import OLDEST_AGE, GatewayMetrics
from audiostream.protocol import V1_1, ResumeRequest, start_json
from audiostream.testing import Embedded, eventually
from audiostream.topology import Topology
from tests.gateway.conftest import TLS, ServerFactory, expect_close, read_json

VALUES = Path(__file__).resolve().parents[2] / "helm" / "audiostream" / "values.yaml"
FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


def scale_up_threshold() -> float:
    """The chart's worker scale-up threshold: the test and KEDA use the same number."""
    values = yaml.safe_load(VALUES.read_text())
    return float(values["workers"]["autoscaling"]["queueAgeAbove"])


@dataclass
class FakeSession:
    pipeline: tuple[Step, ...]
    oldest_pending_at: float | None = None


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def test_monitor_reports_the_oldest_age_and_waiting_sessions_per_first_step() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    clock = Clock()
    sessions = [
        FakeSession((Step("denoise"), Step("gain")), 999.2),
        FakeSession((Step("denoise"),), 999.9),
        FakeSession((Step("gain"),), None),  # idle
        FakeSession((Step("gain"),), 999.5),
    ]
    mon = LoadMonitor(metrics, lambda: sessions, ("denoise", "gain", "vad"), clock=clock)
    ages = mon.sample()
    assert ages == pytest.approx({"denoise": 0.8, "gain": 0.5, "vad": 0.0})
    reg = metrics.registry
    assert reg.get_sample_value(OLDEST_AGE, {"processing": "denoise"}) == pytest.approx(0.8)
    assert reg.get_sample_value(
        "audiostream_gateway_session_messages_waiting", {"processing": "denoise"}) == 2
    assert reg.get_sample_value(
        "audiostream_gateway_session_messages_waiting", {"processing": "gain"}) == 1
    # Served: the gauge falls back to zero, it is not a high-water mark.
    for s in sessions:
        s.oldest_pending_at = None
    mon.sample()
    assert reg.get_sample_value(OLDEST_AGE, {"processing": "denoise"}) == 0


async def test_monitor_task_is_owned_and_cancelled() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    sampled = asyncio.Event()

    def sessions() -> list[FakeSession]:
        sampled.set()
        return []

    mon = LoadMonitor(metrics, sessions, ("gain",), interval_s=0.01)
    sampled.clear()
    mon.start()
    await asyncio.wait_for(sampled.wait(), 10)
    task = mon._task
    await mon.close()
    assert task is not None and task.cancelled()


async def _live(stop: asyncio.Event, seed: int) -> AsyncIterator[bytes]:
    x = (np.random.default_rng(seed).standard_normal(320) * 3000).astype(np.int16).tobytes()
    while not stop.is_set():
        yield x


@pytest.mark.rabbitmq
@pytest.mark.parametrize("transport_kind", [pytest.param("rabbitmq")])
async def test_no_worker_crosses_the_scale_up_threshold_within_10s(
    make_server: ServerFactory, topology: Topology, tls: TLS
) -> None:
    """10 real-time sessions on a type no worker serves: one message in flight each, so
    the work queues hold at most ten ready bundles, yet the age gauge, scraped from the
    gateway's /metrics, crosses the chart's scale-up threshold within 10 s."""
    threshold = scale_up_threshold()
    stop = asyncio.Event()
    async with make_server(workers=0) as srv, aiohttp.ClientSession() as http:

        async def age() -> float:
            async with http.get(srv.ops_url + "/metrics") as resp:
                samples = parse_metrics(await resp.text())
            return float(samples.get((OLDEST_AGE, (("processing", "passthrough"),)), 0.0))

        assert await age() < threshold  # idle: nothing waits
        clients = [AudioStreamClient(srv.url, api_key=srv.api_key, pipeline=["passthrough"],
                                     format=FMT, ssl_context=tls.client) for _ in range(10)]
        streams = [asyncio.create_task(c.stream(_live(stop, i), rate=1.0))
                   for i, c in enumerate(clients)]
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()

            async def above() -> bool:
                return await age() > threshold

            crossed = await eventually(above, within=10.0, interval=0.1)
            elapsed = loop.time() - started
            assert crossed, f"queue age stayed under {threshold} s for 10 s"
            assert elapsed <= 10.0
        finally:
            stop.set()
            results = await asyncio.gather(*streams, return_exceptions=True)
    for r in results:
        assert not isinstance(r, BaseException), r
        assert not r.audio and r.dropped  # no worker: every chunk ended as a notice



def test_lateness_is_the_typical_waiting_session_not_the_oldest_one() -> None:
    """One chunk stuck (say, waiting for a redelivery) must not shut the door on a type
    whose other sessions are served; idle sessions do not water the figure down."""
    metrics = GatewayMetrics(CollectorRegistry())
    clock = Clock()
    sessions = [FakeSession((Step("gain"),), 1000 - age) for age in (30.0, 0.02, 0.04)]
    sessions += [FakeSession((Step("gain"),), None)] * 5  # idle
    sessions.append(FakeSession((Step("denoise"),), 999.5))
    mon = LoadMonitor(metrics, lambda: sessions, ("denoise", "gain", "vad"), clock=clock)
    assert mon.lateness_of("gain", fresh_s=1.0) == pytest.approx(0.04)
    assert mon.lateness_of("denoise", fresh_s=1.0) == pytest.approx(0.5)
    assert mon.lateness_of("vad", fresh_s=1.0) == 0.0
    assert metrics.registry.get_sample_value(
        "audiostream_gateway_session_lateness_seconds", {"processing": "gain"}
    ) == pytest.approx(0.04)
    sessions[1].oldest_pending_at = sessions[2].oldest_pending_at = None  # served
    clock.now += 0.5
    assert mon.lateness_of("gain", fresh_s=1.0) == pytest.approx(0.04)  # the last sample
    assert mon.lateness_of("gain", fresh_s=0.1) == pytest.approx(30.5)  # resampled


async def _started(http: aiohttp.ClientSession, srv: Embedded, tls: TLS, pipeline: str,
                   **kw: object) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, object]]:
    ws = await http.ws_connect(srv.url, ssl=tls.client)
    await ws.send_str(start_json(srv.api_key, FMT, [pipeline], version=V1_1, **kw))
    return ws, await read_json(ws)


async def test_new_sessions_of_a_late_type_are_refused_overloaded_and_resumes_taken(
    make_server: ServerFactory, tls: TLS
) -> None:
    """Past ``shed_above_ms`` a saturated gateway refuses new sessions of the late type at
    the door (4031, retryable, before any broker work) instead of setting each up slowly
    and making every session later; other types and resumed sessions still get in."""
    settings = GatewaySettings(chunk_rate=None, shed_above_ms=50)
    async with make_server(workers=0, gateway_settings=settings) as srv, \
            aiohttp.ClientSession() as http:
        gw = srv.gateway
        opened: list[aiohttp.ClientWebSocketResponse] = []
        try:
            # No worker: each session's one chunk waits (a 30-s deadline keeps it waiting).
            # Both start before either sends: the first one's chunk would shut the door.
            late = []
            for _ in range(2):
                ws, ready = await _started(http, srv, tls, "passthrough", deadline_ms=30_000)
                opened.append(ws)
                assert ready["type"] == "ready"
                late.append((ws, str(ready["token"])))
            for ws, _ in late:
                await ws.send_bytes(b"\x01\x00" * 160)

            async def behind() -> bool:
                return gw.load.lateness_of("passthrough", fresh_s=0) > 0.05

            assert await eventually(behind, within=10)
            ws, refused = await _started(http, srv, tls, "passthrough")
            opened.append(ws)
            assert refused["type"] == "error" and refused["code"] == ErrorCode.OVERLOADED
            assert "the gateway is behind: passthrough" in str(refused["message"])
            assert refused["retryable"] is True
            await expect_close(ws, ErrorCode.OVERLOADED)
            assert gw.metrics.registry.get_sample_value(
                "audiostream_sessions_total", {"result": "overloaded"}) == 1

            ws, other = await _started(http, srv, tls, "gain")  # gain is not behind
            opened.append(ws)
            assert other["type"] == "ready"

            first, token = late[0]
            await first.close()  # the first session's client drops ...
            assert await behind()  # ... and the second keeps passthrough late
            ws, resumed = await _started(http, srv, tls, "passthrough",
                                         resume=ResumeRequest(token, received=0))
            opened.append(ws)
            assert resumed["type"] == "ready" and resumed["resumed"] is True
        finally:
            for ws in opened:
                await ws.close()
