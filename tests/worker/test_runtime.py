"""Worker runtime on the in-memory transport: start-up reports the real providers."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from audiostream.metrics import WorkerMetrics
from audiostream.topology import Topology
from audiostream.transport import MemoryBroker, MemoryTransport
from audiostream.worker import Worker, WorkerSettings


async def test_gpu_request_without_a_gpu_says_so_and_exports_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    transport = MemoryTransport(MemoryBroker(), Topology(processing_types=("denoise", "vad")))
    await transport.connect()
    worker = Worker(transport, WorkerSettings(processing=("denoise", "vad"), device="gpu"),
                    metrics=WorkerMetrics(registry))
    with caplog.at_level(logging.INFO):
        await worker.start()
    try:
        for step in ("denoise", "vad"):
            value = registry.get_sample_value(
                "audiostream_worker_provider_info",
                {"processing": step, "provider": "CPUExecutionProvider"})
            assert value == 1
            assert registry.get_sample_value(
                "audiostream_worker_provider_info",
                {"processing": step, "provider": "CUDAExecutionProvider"}) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("--device gpu but ONNX Runtime runs on the CPU only" in w for w in warnings)
    finally:
        await worker.stop()
        await transport.close()


@pytest.mark.parametrize(("given", "want"), [
    (None, {"denoise": "10", "vad": "10", "passthrough": "2", "highpass": "2"}),
    (3.0, {"denoise": "3", "vad": "3", "passthrough": "3", "highpass": "3"}),
])
async def test_each_processing_type_has_its_batch_wait_unless_one_is_given(
    caplog: pytest.LogCaptureFixture, given: float | None, want: dict[str, str],
) -> None:
    """Model steps wait longer for a batch than DSP (a model call costs nearly as much
    for 2 sessions as for 8); ``--max-wait-ms`` sets one wait for all."""
    steps = tuple(want)
    transport = MemoryTransport(MemoryBroker(), Topology(processing_types=steps))
    await transport.connect()
    worker = Worker(transport, WorkerSettings(processing=steps, max_wait_ms=given))
    with caplog.at_level(logging.INFO):
        await worker.start()
    try:
        started = next(r.getMessage() for r in caplog.records
                       if r.getMessage().startswith("worker consuming"))
        for step, ms in want.items():
            assert f"{step}={ms}" in started
    finally:
        await worker.stop()
        await transport.close()
