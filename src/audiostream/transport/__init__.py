"""Transports: how envelopes travel between gateways and workers."""

from __future__ import annotations

from audiostream.topology import Topology
from audiostream.transport.base import Delivery, Handler, LockToken, Subscription, Transport
from audiostream.transport.memory import MemoryBroker, MemoryTransport

__all__ = [
    "Delivery",
    "Handler",
    "LockToken",
    "MemoryBroker",
    "MemoryTransport",
    "Subscription",
    "Transport",
    "open_transport",
]


def open_transport(
    url: str | None, topology: Topology, broker: MemoryBroker | None = None
) -> Transport:
    """A transport for ``url`` (``amqp://``/``amqps://``), or in-memory when None/``memory://``."""
    if url is None or url.startswith("memory://"):
        return MemoryTransport(broker or MemoryBroker.default(), topology)
    from audiostream.transport.rabbitmq import RabbitTransport

    return RabbitTransport(url, topology)
