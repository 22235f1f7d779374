"""Prometheus metrics, always registered on an injected ``CollectorRegistry``.

Metric names are part of the operations contract: the alert rules in
``helm/audiostream/files/alerts.yaml`` and the Grafana dashboard refer to them.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Metric,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200)
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0)

#: Stages of a message's trip, in order; the gateway exports each (see docs/operations.md).
#: ``gateway_to_broker`` (publish until confirmed) overlaps ``queue_wait`` (publish until
#: a worker has it); the others follow one another.
STAGES = (
    "gateway_backlog",
    "gateway_to_broker",
    "queue_wait",
    "batch_wait",
    "inference",
    "reply",
    "gateway_to_client",
)

QUEUE_DEPTH = "audiostream_queue_depth"
OLDEST_AGE = "audiostream_queue_oldest_age_seconds"
_queue_depth_gauges: weakref.WeakKeyDictionary[CollectorRegistry, Gauge] = (
    weakref.WeakKeyDictionary()
)


def queue_depth_gauge(registry: CollectorRegistry) -> Gauge:
    """The work-queue depth gauge of ``registry``, created once.

    Gateways and workers both poll and export it (a gateway keeps reporting when no
    worker runs, which is when depth matters most); when both live in one process
    they share one registry, hence one gauge.
    """
    gauge = _queue_depth_gauges.get(registry)
    if gauge is None:
        gauge = Gauge(
            QUEUE_DEPTH, "Ready messages over all shards of a processing type's work queues",
            ["processing"], registry=registry)
        _queue_depth_gauges[registry] = gauge
    return gauge


_gc_registries: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()


def export_gc(registry: CollectorRegistry) -> None:
    """Export the interpreter's garbage collections (``python_gc_collections_total`` by
    generation), as prometheus_client's default registry does and ours, being injected,
    does not: whether a latency tail lines up with full collections. Once per registry
    (a gateway and its workers in one process share one)."""
    if registry not in _gc_registries:
        _DescribedGC(registry=registry)
        _gc_registries.add(registry)


class _DescribedGC(GCCollector):
    """prometheus_client's GC collector, with the ``describe`` a restricted scrape needs
    to find it by name (``exposition``)."""

    def describe(self) -> Iterator[Metric]:
        return iter(self.collect())


def exposition(registry: CollectorRegistry, names: Sequence[str] = ()) -> bytes:
    """The text exposition of ``registry``; with ``names`` (``/metrics?name[]=...``, as
    prometheus_client's own handlers allow) only those samples. A benchmark that samples
    a gauge four times a second then costs the gateway it measures a few lines, not the
    whole registry's histograms."""
    return generate_latest(registry.restricted_registry(names) if names else registry)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        export_gc(registry)
        self.connections_active = Gauge(
            "audiostream_gateway_connections_active",
            "Open WebSocket connections", registry=registry)
        self.connections_capacity = Gauge(
            "audiostream_gateway_connections_capacity",
            "Configured maximum of connections for this gateway", registry=registry)
        self.connections_total = Counter(
            "audiostream_gateway_connections_total",
            "WebSocket connections accepted", registry=registry)
        self.sessions_total = Counter(
            "audiostream_sessions_total", "Sessions by how they started or were refused",
            ["result"], registry=registry)
        self.session_start = Histogram(
            "audiostream_gateway_session_start_seconds",
            "A session's start message received to the session set up (ready follows), "
            "by result: started or resumed. Seconds here mean the gateway or the broker "
            "is saturated before lateness shows", ["result"], buckets=START_BUCKETS,
            registry=registry)
        self.session_duration = Histogram(
            "audiostream_session_duration_seconds", "Session durations",
            buckets=DURATION_BUCKETS, registry=registry)
        self.replayed = Counter(
            "audiostream_outcomes_replayed_total",
            "Outcomes re-sent to clients that resumed a session", registry=registry)
        self.chunks_in = Counter(
            "audiostream_chunks_in_total", "Audio chunks accepted from clients",
            registry=registry)
        self.chunks_out = Counter(
            "audiostream_chunks_out_total", "Processed audio chunks sent to clients",
            registry=registry)
        self.bytes_in = Counter(
            "audiostream_bytes_in_total", "Audio bytes received", registry=registry)
        self.bytes_out = Counter(
            "audiostream_bytes_out_total", "Audio bytes sent", registry=registry)
        self.dropped = Counter(
            "audiostream_chunks_dropped_total", "Chunks answered with a drop notice",
            ["reason"], registry=registry)
        self.reads_paused = Counter(
            "audiostream_gateway_reads_paused_total",
            "Times a connection stopped being read because its session held more than "
            "max_queued_bytes (back-pressure)", registry=registry)
        self.opus_decode_cpu = Counter(
            "audiostream_gateway_opus_decode_cpu_seconds_total",
            "CPU seconds the event loop spent decoding Opus uploads", registry=registry)
        self.opus_decode_paused = Counter(
            "audiostream_gateway_opus_decode_paused_total",
            "Times an Opus session's socket was left unread because its decoding was over "
            "its CPU budget or the gateway's", registry=registry)
        self.messages_published = Counter(
            "audiostream_gateway_messages_published_total",
            "Work messages published (one carries one or more coalesced chunks)",
            registry=registry)
        self.bundles_published = Counter(
            "audiostream_gateway_bundles_published_total",
            "Broker messages published; one bundles the work messages of one or more sessions",
            registry=registry)
        self.round_trip = Histogram(
            "audiostream_round_trip_seconds",
            "Chunk received by the gateway to its processed audio written to the socket",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.stage = Histogram(
            "audiostream_stage_seconds", "Time spent per stage, per message",
            ["stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.errors = Counter(
            "audiostream_gateway_errors_total", "Errors reported to clients, by code",
            ["code"], registry=registry)
        self.queue_depth = queue_depth_gauge(registry)
        # Sampled by gateway/load.py; what KEDA and the queue-age alerts read.
        self.oldest_age = Gauge(
            OLDEST_AGE,
            "Age of the oldest unanswered chunk of any session, by first processing step",
            ["processing"], registry=registry)
        self.session_lateness = Gauge(
            "audiostream_gateway_session_lateness_seconds",
            "The typical waiting session's oldest chunk age (lower median over sessions "
            "with one waiting), by first processing step; new sessions are refused above "
            "--shed-above-ms", ["processing"], registry=registry)
        self.dead_letters = Gauge(
            "audiostream_dead_letter_depth",
            "Messages in the dead-letter queue (expired or over the delivery limit)",
            registry=registry)
        self.session_messages_waiting = Gauge(
            "audiostream_gateway_session_messages_waiting",
            "Sessions with a chunk waiting for a worker (not bundles), by first processing step",
            ["processing"], registry=registry)
        # The load budget (gateway/budget.py), sampled a few times a second.
        self.coalesce_floor = Gauge(
            "audiostream_gateway_coalesce_floor",
            "Fewest chunks per work message every session waits for (1: no coalescing)",
            registry=registry)
        self.loop_lag = Gauge(
            "audiostream_gateway_loop_lag_seconds",
            "How late the gateway's event loop ran a timer at the last sample",
            registry=registry)
        self.chunk_rate = Gauge(
            "audiostream_gateway_chunk_rate",
            "Chunks accepted per second (moving average), all sessions", registry=registry)
        # Label children looked up once, not per chunk (a labels() call hashes and locks).
        self.stages = {s: self.stage.labels(stage=s) for s in STAGES}


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        export_gc(registry)
        self.messages = Counter(
            "audiostream_worker_messages_total", "Messages handled, by outcome",
            ["processing", "status"], registry=registry)
        self.batch_size = Histogram(
            "audiostream_worker_batch_size", "Messages per processing call",
            ["processing"], buckets=BATCH_BUCKETS, registry=registry)
        self.bundle_size = Histogram(
            "audiostream_worker_bundle_size",
            "Work messages per broker delivery (the gateway bundles sessions)",
            ["processing"], buckets=BATCH_BUCKETS, registry=registry)
        self.inference = Histogram(
            "audiostream_worker_inference_seconds", "Duration of one processing call",
            ["processing"], buckets=LATENCY_BUCKETS, registry=registry)
        self.errors = Counter(
            "audiostream_worker_errors_total", "Processing or transport errors",
            ["processing", "kind"], registry=registry)
        self.queue_depth = queue_depth_gauge(registry)
        self.provider = Gauge(
            "audiostream_worker_provider_info",
            "Execution provider actually in use (1) per processing type",
            ["processing", "provider"], registry=registry)
        self.executor_busy = Counter(
            "audiostream_worker_executor_busy_seconds",
            "Wall time the processing executor spent running batches; its rate is the "
            "lane's utilisation (one thread per processing type)",
            ["processing"], registry=registry)
        self._loop_busy = _ThreadCpuCollector(
            "audiostream_worker_loop_busy_seconds",
            "CPU time of the event-loop thread (consuming, decoding, publishing, acking); "
            "its rate is the loop's utilisation")
        registry.register(self._loop_busy)

    def watch_loop_thread(self) -> None:
        """Call from the event-loop thread: the loop-busy counter reads its CPU clock."""
        self._loop_busy.watch(threading.get_ident())


class _ThreadCpuCollector(Collector):
    """A counter read at scrape time from one thread's CPU clock (Linux and macOS):
    exact, and no sampling task to own."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self._clock: int | None = None

    def watch(self, thread_id: int) -> None:
        if self._clock is None:
            self._clock = time.pthread_getcpuclockid(thread_id)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.doc)
        if self._clock is not None:
            try:
                family.add_metric([], time.clock_gettime(self._clock))
            except OSError:  # the thread has ended
                self._clock = None
        yield family
