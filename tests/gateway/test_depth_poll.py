"""The gateway's work-queue depth poll ends when it is cancelled, whatever the probe
raised meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from audiostream.errors import TransportError
from audiostream.gateway import Gateway, GatewaySettings, KeyStore
from audiostream.topology import Topology
from audiostream.transport.memory import MemoryBroker, MemoryTransport


class ClosingBroker(MemoryTransport):
    """A probe cancelled while the connection closes: it fails with a broker error,
    not with the cancel (what aiormq can do, and ``asyncio.gather`` passes on)."""

    def __init__(self) -> None:
        super().__init__(MemoryBroker(), Topology(processing_types=("passthrough",)))
        self.probing = asyncio.Event()
        self.probes = 0

    async def work_queue_depth(self, processing: str) -> int:
        self.probes += 1
        if self.probes > 1:
            return 0
        self.probing.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise TransportError("probing queue: channel closed") from None
        return 0


async def test_a_cancelled_depth_poll_ends_even_if_its_probe_fails() -> None:
    transport = ClosingBroker()
    gateway = Gateway(transport, KeyStore(None), settings=GatewaySettings(depth_poll_s=0.01))
    poll = asyncio.get_running_loop().create_task(gateway._poll_depth())
    await asyncio.wait_for(transport.probing.wait(), 10)
    poll.cancel()
    # Before, the error was logged as an unavailable queue and the loop went on polling
    # every depth_poll_s: close() waited for it forever.
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(poll, 10)
    assert transport.probes == 1
