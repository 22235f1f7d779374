"""Worker runtime on the in-memory transport: start-up reports the real providers."""

from __future__ import annotations

import logging
import threading

import pytest
from prometheus_client import CollectorRegistry

from audiostream.envelope import ReplyStatus, Step, decode_reply, encode_work_bundle
from audiostream.metrics import WorkerMetrics
from audiostream.processors.base import ProcessorRegistry, StepInput, StepOutput, registry
from audiostream.topology import Topology
from audiostream.transport import MemoryBroker, MemoryTransport
from audiostream.worker import Worker, WorkerSettings
from tests.worker.test_bundles import envelope, replies_for


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


async def test_inline_steps_run_on_the_event_loop_and_others_on_the_executor() -> None:
    """A step declared ``inline`` (microseconds of work) skips the executor's thread
    hand-off, which costs more than the step; every other step runs off the loop."""
    ran_on: dict[str, int] = {}
    processors = ProcessorRegistry()

    @processors.per_item("cheap", inline=True)
    def cheap(item: StepInput) -> StepOutput:
        ran_on["cheap"] = threading.get_ident()
        return StepOutput(item.audio)

    @processors.per_item("heavy")
    def heavy(item: StepInput) -> StepOutput:
        ran_on["heavy"] = threading.get_ident()
        return StepOutput(item.audio)

    steps = ("cheap", "heavy")
    transport = MemoryTransport(MemoryBroker(), Topology(processing_types=steps))
    await transport.connect()
    worker = Worker(transport, WorkerSettings(processing=steps), processors=processors)
    await worker.start()
    try:
        for name in steps:
            env = envelope(transport, name, (Step(name),))
            inbox = (await replies_for(transport, [name]))[name]
            await transport.publish_work(name, 0, encode_work_bundle([env]), ttl=30)
            await inbox.wait_for(1)
            assert decode_reply(inbox.bodies[0]).status is ReplyStatus.OK
        assert ran_on["cheap"] == threading.get_ident()
        assert ran_on["heavy"] != threading.get_ident()
        assert registry.get("passthrough").inline and not registry.get("highpass").inline
    finally:
        await worker.stop()
        await transport.close()


class _Delivery:
    """Just what the handler reads; settled later by the flusher, or refused."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.redelivered = 0
        self.outcome: str | None = None

    async def ack(self) -> None:
        self.outcome = "ack"

    async def reject(self) -> None:
        self.outcome = "reject"


async def test_a_delivery_joins_its_batch_within_the_handler_call() -> None:
    """No task per delivery (a task switch on every round trip): a good message is in the
    lane's batch when the handler returns, with nothing to await; a message with nothing
    decodable returns its refusal to be awaited."""
    transport = MemoryTransport(MemoryBroker(), Topology(processing_types=("passthrough",)))
    await transport.connect()
    worker = Worker(transport, WorkerSettings(processing=("passthrough",)))
    await worker.start()
    try:
        lane = worker._lanes["passthrough"]
        handle = worker._handler(lane)
        good = _Delivery(encode_work_bundle([envelope(transport, "s", (Step("passthrough"),))]))
        assert handle(good) is None
        assert len(lane.batcher) == 1
        bad = _Delivery(b"\x00 not a bundle")
        refusal = handle(bad)
        assert refusal is not None and bad.outcome is None
        await refusal
        assert bad.outcome == "reject"
    finally:
        await worker.stop()
        await transport.close()
    assert good.outcome == "ack"
