"""Worker runtime: consume, batch across sessions, process off the loop, forward or reply, ack.

A broker message is a bundle of work envelopes of many sessions (see
``audiostream.bundler``); its envelopes join the batcher one by one. The
message is acked only after everything its envelopes produced (the next step's
messages, bundled again, or the sessions' replies) is confirmed by the broker,
so a worker that dies at any point loses nothing: its unacked messages go to
another worker, and the gateway discards a duplicate reply by message id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audiostream.bundler import WorkBundler
from audiostream.envelope import (
    Reply,
    WorkEnvelope,
    decode_work_message,
    encode_reply,
)
from audiostream.errors import AudioStreamError, TransportError
from audiostream.metrics import WorkerMetrics
from audiostream.processors import ProcessorContext, ProcessorRegistry, registry
from audiostream.processors.base import BatchFn
from audiostream.transport.base import Delivery, Subscription, Transport
from audiostream.worker.batcher import Batcher
from audiostream.worker.step import BatchReport, expired_reply, run_step

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    processing: tuple[str, ...]
    device: str = "cpu"
    max_batch: int = 64
    max_wait_ms: float | None = None
    """For every lane; None: each processing type's own default (``ProcessorSpec``)."""
    prefetch: int | None = None
    """Unacked messages per work queue; default ``max(2 * max_batch, 32)``."""
    model_dir: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    depth_poll_s: float = 5.0

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch or max(2 * self.max_batch, 32)


@dataclass(slots=True)
class _Held:
    """One broker delivery and how many of its envelopes are not settled yet."""

    delivery: Delivery
    pending: int
    failed: bool = False


@dataclass(slots=True)
class _Item:
    held: _Held
    envelope: WorkEnvelope
    received: float
    """Wall-clock time the delivery arrived (stamped with the batch start, in one go)."""


class _Lane:
    """One processing type: its batcher, its executor and its flusher task."""

    def __init__(self, name: str, fn: BatchFn, max_batch: int, max_wait_ms: float,
                 *, inline: bool = False) -> None:
        self.name = name
        self.fn = fn
        self.inline = inline
        """Run batches on the event loop (``ProcessorSpec.inline``), not the executor."""
        self.max_wait_ms = max_wait_ms
        self.batcher: Batcher[_Item] = Batcher(max_batch, max_wait_ms / 1000, adaptive=True)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"as-{name}")
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.subscription: Subscription | None = None


class Worker:
    def __init__(
        self,
        transport: Transport,
        settings: WorkerSettings,
        *,
        processors: ProcessorRegistry = registry,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.transport = transport
        self.settings = settings
        self.processors = processors
        self.metrics = metrics
        self._lanes: dict[str, _Lane] = {}
        # Forwards results to their next step, bundling sessions like the gateway does.
        self.bundler = WorkBundler(transport, max_items=settings.max_batch)
        self._settling: set[asyncio.Task[None]] = set()
        self._depth_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self.handled = 0

    async def start(self) -> None:
        """Load processors, declare the topology and start consuming."""
        for name in self.settings.processing:
            self.processors.get(name)  # unknown names fail before anything starts
        await self.transport.declare()
        loop = asyncio.get_running_loop()
        ctx = ProcessorContext(
            device=self.settings.device,
            model_dir=self.settings.model_dir,
            options=self.settings.options,
        )
        for name in self.settings.processing:
            spec = self.processors.get(name)
            lane_fn: BatchFn = await loop.run_in_executor(None, spec.factory, ctx)
            warmup = getattr(lane_fn, "warmup", None)
            if callable(warmup):
                try:
                    await loop.run_in_executor(None, warmup)
                except AudioStreamError as err:
                    # Keep serving: its messages will get error outcomes naming the cause.
                    log.error("stage=%s: model not available: %s", name, err)
            wait = self.settings.max_wait_ms
            lane = _Lane(name, lane_fn, self.settings.max_batch,
                         spec.max_wait_ms if wait is None else wait, inline=spec.inline)
            self._lanes[name] = lane
            self._export_provider(name, lane_fn)
            lane.task = loop.create_task(self._flusher(lane), name=f"flusher-{name}")
            lane.subscription = await self.transport.consume_work(
                name, self._handler(lane), prefetch=self.settings.effective_prefetch
            )
        if self.metrics is not None:
            self.metrics.watch_loop_thread()
            self._depth_task = loop.create_task(self._poll_depth(), name="depth-poll")
        log.info(
            "worker consuming %s (device=%s, max_batch=%d, max_wait_ms %s)",
            ",".join(self.settings.processing),
            self.settings.device,
            self.settings.max_batch,
            ", ".join(f"{n}={lane.max_wait_ms:g}" for n, lane in self._lanes.items()),
        )

    def _export_provider(self, name: str, fn: BatchFn) -> None:
        """Log and export the execution providers really in use (after warm-up)."""
        providers = getattr(fn, "providers", None)
        if providers:
            log.info("stage=%s: execution providers in use: %s", name, ", ".join(providers))
            if self.settings.device == "gpu" and list(providers) == ["CPUExecutionProvider"]:
                log.warning("stage=%s: --device gpu but ONNX Runtime runs on the CPU only "
                            "(no CUDA device or onnxruntime-gpu missing)", name)
        if self.metrics is not None:
            for p in providers or ["python"]:
                self.metrics.provider.labels(processing=name, provider=str(p)).set(1)

    def _handler(self, lane: _Lane) -> Any:
        def handle(delivery: Delivery) -> Awaitable[None] | None:
            """Synchronous: a delivery goes to the batcher in the reader's own turn, with
            no task of its own (only a refusal returns something to await)."""
            received = time.time()
            bad: list[AudioStreamError] = []
            try:
                envelopes, undecodable = decode_work_message(delivery.body)
                bad.extend(undecodable)
            except AudioStreamError as err:
                envelopes = []
                bad.append(err)
            wrong = [e for e in envelopes if e.step.name != lane.name]
            if wrong:
                envelopes = [e for e in envelopes if e.step.name == lane.name]
                bad += [AudioStreamError(f"message for {e.step.name!r} arrived on the "
                                         f"{lane.name!r} queue") for e in wrong]
            if bad:
                # Their sessions' gateways answer those chunks with a drop notice when
                # the deadline passes; the rest of the bundle is served normally.
                log.error("stage=%s: %d undecodable work item(s) (%s)%s", lane.name, len(bad),
                          bad[0], "" if envelopes else "; rejecting the message")
                if self.metrics is not None:
                    self.metrics.errors.labels(processing=lane.name, kind="bad_message").inc(
                        len(bad))
            if not envelopes:
                return delivery.reject()
            if self.metrics is not None:
                self.metrics.bundle_size.labels(processing=lane.name).observe(len(envelopes))
            held = _Held(delivery, len(envelopes))
            now = time.monotonic()
            for env in envelopes:
                lane.batcher.add(_Item(held, env, received), now)
            lane.wake.set()
            return None

        return handle

    async def _flusher(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            if not lane.batcher.ready(now) and not (self._stopping and len(lane.batcher)):
                if self._stopping and not len(lane.batcher):
                    return
                due = lane.batcher.due_at()
                lane.wake.clear()
                timeout = None if due is None else max(0.0, due - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lane.wake.wait(), timeout)
                continue
            items = lane.batcher.take(now)
            envelopes = [it.envelope for it in items]
            received = [it.received for it in items]
            started = time.perf_counter()
            if lane.inline:
                report = self._timed_step(lane, envelopes, received)
            else:
                report = await loop.run_in_executor(
                    lane.executor, functools.partial(self._timed_step, lane, envelopes, received)
                )
            if self.metrics is not None and report.processed_size:
                self.metrics.inference.labels(processing=lane.name).observe(
                    time.perf_counter() - started
                )
                self.metrics.batch_size.labels(processing=lane.name).observe(
                    report.processed_size
                )
            task = loop.create_task(self._settle(lane, items, report))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    def _timed_step(
        self, lane: _Lane, envelopes: list[WorkEnvelope], received: list[float]
    ) -> BatchReport:
        """Runs in the lane's executor (or inline); counts its busy time so utilisation
        is a ratio."""
        started = time.perf_counter()
        try:
            return run_step(lane.fn, envelopes, received=received)
        finally:
            if self.metrics is not None:
                self.metrics.executor_busy.labels(processing=lane.name).inc(
                    time.perf_counter() - started)

    async def _settle(self, lane: _Lane, items: list[_Item], report: BatchReport) -> None:
        """Publish every result (the replies in one write, forwards through the
        bundler), then ack each delivery whose envelopes are all confirmed."""

        settled: dict[str, int] = {}
        done = [False] * len(items)
        replies: list[tuple[int, Reply]] = []
        forwards: list[tuple[int, WorkEnvelope]] = []
        now = time.time()
        for i, result in enumerate(report.results):
            if isinstance(result, WorkEnvelope):
                if result.deadline > now:
                    forwards.append((i, result))
                    continue
                result = expired_reply(result)
            replies.append((i, result))

        def failed(i: int, err: TransportError) -> None:
            env = items[i].envelope
            log.error("could not forward session=%s seq=%d stage=%s: %s; leaving it unacked",
                      env.session_id, env.seq, lane.name, err)
            if self.metrics is not None:
                self.metrics.errors.labels(processing=lane.name, kind="transport").inc()

        def succeeded(i: int, status: str) -> None:
            done[i] = True
            self.handled += 1
            settled[status] = settled.get(status, 0) + 1

        async def forward(i: int, env: WorkEnvelope) -> None:
            try:
                await self.bundler.publish(env)
            except TransportError as err:
                failed(i, err)
            else:
                succeeded(i, "ok")

        async def reply_all() -> None:
            if not replies:
                return
            stamp = ((f"{lane.name}:replied", time.time()),)
            bodies = [(items[i].envelope.reply_to, encode_reply(r, also=stamp))
                      for i, r in replies]
            try:
                outcomes = await self.transport.publish_replies(bodies)
            except TransportError as err:
                outcomes = [err] * len(replies)
            for (i, reply), outcome in zip(replies, outcomes, strict=True):
                if isinstance(outcome, TransportError):
                    failed(i, outcome)
                else:  # False: the session's queue is gone, nobody is waiting
                    succeeded(i, str(reply.status))

        if forwards:
            await asyncio.gather(reply_all(), *(forward(i, env) for i, env in forwards))
        else:  # the usual last step: no task per batch before the replies leave
            await reply_all()
        if self.metrics is not None:  # once per batch, not per message: it adds up
            for status, count in settled.items():
                self.metrics.messages.labels(processing=lane.name, status=status).inc(count)
        complete: list[_Item] = []
        for item, ok in zip(items, done, strict=True):
            held = item.held
            held.pending -= 1
            held.failed = held.failed or not ok
            if not (held.pending or held.failed):
                complete.append(item)

        async def ack(item: _Item) -> None:
            try:
                await item.held.delivery.ack()
            except TransportError as err:
                env = item.envelope
                log.warning("session=%s seq=%d stage=%s: ack failed: %s",
                            env.session_id, env.seq, lane.name, err)

        # Together, so the transport can send them in one write.
        await asyncio.gather(*(ack(item) for item in complete))

    async def _poll_depth(self) -> None:
        assert self.metrics is not None
        while True:
            for name in self.settings.processing:
                try:
                    depth = await self.transport.work_queue_depth(name)
                except AudioStreamError as err:
                    log.warning("queue depth of %s unavailable: %s", name, err)
                    continue
                self.metrics.queue_depth.labels(processing=name).set(depth)
            await asyncio.sleep(self.settings.depth_poll_s)

    async def stop(self) -> None:
        """Stop consuming, finish and ack what was received, then release everything."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        for lane in self._lanes.values():
            if lane.subscription is not None:
                with contextlib.suppress(AudioStreamError):
                    await lane.subscription.cancel()
            lane.wake.set()
        for lane in self._lanes.values():
            if lane.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self.bundler.close()
        if self._depth_task is not None:
            self._depth_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._depth_task
        for lane in self._lanes.values():
            lane.executor.shutdown(wait=True)
        self._stopped.set()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
