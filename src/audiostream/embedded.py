"""A whole gateway + workers in one process: what ``audiostream serve`` runs.

``embedded_server()`` starts a real aiohttp server on a real socket (optionally TLS)
with either the in-memory broker or RabbitMQ. It lives here, not in ``testing.py``,
so the product never imports test helpers; ``testing`` re-exports it, and tests use
it so that they exercise the product, not a double.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aiohttp import web

from audiostream.gateway import Gateway, GatewaySettings, KeyStore, start_site
from audiostream.gateway.edge import EDGE_KEY
from audiostream.metrics import WorkerMetrics
from audiostream.processors import ProcessorRegistry, registry
from audiostream.topology import Topology
from audiostream.transport import MemoryBroker, open_transport
from audiostream.worker import Worker, WorkerSettings

__all__ = ["Embedded", "default_topology", "embedded_server", "sample_wav"]


def sample_wav() -> Path:
    """The bundled noisy-speech sample (16 kHz mono, 16-bit)."""
    return Path(str(resources.files("audiostream") / "data" / "noisy_speech_16k.wav"))


def default_topology(shards: int = 2, prefix: str | None = None) -> Topology:
    if prefix is None:
        return Topology(processing_types=tuple(registry.names()), shards=shards)
    return Topology(processing_types=tuple(registry.names()), shards=shards, prefix=prefix)


@dataclass
class Embedded:
    url: str
    """WebSocket URL of ``/v1/stream``."""
    http_url: str
    api_key: str | None
    """The in-memory development key; None when a keys file was given."""
    gateway: Gateway
    workers: list[Worker]
    runner: web.AppRunner
    ops_url: str | None = None
    """``http://host:port`` of ``/metrics``, ``/healthz`` and ``/readyz`` (edge.py)."""


@contextlib.asynccontextmanager
async def embedded_server(
    *,
    broker_url: str | None = None,
    topology: Topology | None = None,
    processing: Sequence[str] | None = None,
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    keys_file: Path | None = None,
    gateway_settings: GatewaySettings | None = None,
    worker_settings: WorkerSettings | None = None,
    memory_broker: MemoryBroker | None = None,
    processors: ProcessorRegistry = registry,
    token_secret: bytes | None = None,
) -> AsyncIterator[Embedded]:
    """Run a gateway and ``workers`` workers until the block exits."""
    topo = topology or default_topology()
    broker = memory_broker or (MemoryBroker() if broker_url is None else None)
    keys = KeyStore(keys_file)
    # A development key only when no keys file is given: it cannot be revoked.
    dev_key = keys.add_in_memory("development") if keys_file is None else None
    gw_transport = open_transport(broker_url, topo, broker)
    gateway = Gateway(gw_transport, keys, settings=gateway_settings, processors=processors,
                      token_secret=token_secret)
    ws_settings = worker_settings or WorkerSettings(
        processing=tuple(processing or topo.processing_types)
    )
    worker_metrics = WorkerMetrics(gateway.metrics_registry)  # one /metrics for the process
    started: list[Worker] = []
    runner: web.AppRunner | None = None
    try:
        runner, bound = await start_site(gateway.app(), host, port, ssl_context)
        for _ in range(workers):
            wt = open_transport(broker_url, topo, broker)
            await wt.connect()
            w = Worker(wt, ws_settings, processors=processors, metrics=worker_metrics)
            started.append(w)
            await w.start()
        scheme = "wss" if ssl_context else "ws"
        http = "https" if ssl_context else "http"
        yield Embedded(
            url=f"{scheme}://{host}:{bound}/v1/stream",
            http_url=f"{http}://{host}:{bound}",
            api_key=dev_key,
            gateway=gateway,
            workers=started,
            runner=runner,
            ops_url=runner.app[EDGE_KEY].ops_url,
        )
    finally:
        for w in started:
            await w.stop()
            await w.transport.close()
        if runner is not None:
            await runner.cleanup()
