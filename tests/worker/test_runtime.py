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
