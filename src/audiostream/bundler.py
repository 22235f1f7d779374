"""Pack the work envelopes of many sessions into one broker message per processing type.

Every AMQP message costs the same Python work in the gateway, the broker and the
worker (framing, a confirm, a delivery task, an ack) whatever it carries; measured
here at 0.45-0.8 ms of worker CPU per message, that cost, not the model, capped a
worker core at ~20 real-time sessions. The bundler spends it once per *bundle*.

It adds no fixed delay. Like Nagle's algorithm, it sends at once while fewer than
``max_in_flight`` bundles of that processing type await their confirm, and
otherwise collects envelopes until a confirm comes back, ``max_items`` are
waiting, or ``max_wait_s`` has passed. At low load every envelope goes out
alone, as soon as it is made; under load, bundles grow with the broker's confirm
latency, so load raises message size rather than message count (the same
principle as the per-session coalescing in the gateway).

``submit`` calls its callback once the bundle holding the envelope is confirmed
(with None) or failed (with the transport's error), so callers keep their exact
delivery accounting without a task or a future per message (the gateway's hot
path). ``publish`` is the awaitable form; a cancelled ``publish`` that was not sent
yet is left out of its bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from audiostream.envelope import WorkEnvelope, encode_work, encode_work_bundle
from audiostream.errors import AudioStreamError, ConfigError, TransportError
from audiostream.transport.base import Transport

#: Told how an envelope's bundle ended: None (confirmed) or the transport's error.
Done = Callable[[AudioStreamError | None], None]
#: An envelope, its callback, and the future of an awaiting ``publish`` (None for ``submit``).
_Item = tuple[WorkEnvelope, Done, "asyncio.Future[None] | None"]


def _settle_future(future: asyncio.Future[None], error: AudioStreamError | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


@dataclass(slots=True)
class _Lane:
    """Envelopes waiting for one processing type, and that type's bundles in flight."""

    waiting: list[_Item] = field(default_factory=list)
    in_flight: int = 0
    timer: asyncio.TimerHandle | None = None


class WorkBundler:
    def __init__(
        self,
        transport: Transport,
        *,
        max_items: int = 64,
        max_in_flight: int = 1,
        max_wait_s: float = 0.005,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        if max_items < 1 or max_in_flight < 1 or max_wait_s < 0:
            raise ConfigError(
                f"bundles need at least 1 item (got {max_items}), at least 1 in flight "
                f"(got {max_in_flight}) and a wait >= 0 (got {max_wait_s * 1000:g} ms)"
            )
        self.transport = transport
        self.max_items = max_items
        self.max_in_flight = max_in_flight
        self.max_wait_s = max_wait_s
        self.on_sent = on_sent
        """Called with the number of envelopes of each confirmed bundle (metrics)."""
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._shards = itertools.cycle(range(transport.topology.shards))
        self._closed = False
        self.bundles = 0
        """Broker messages sent (for metrics and benchmarks)."""
        self.envelopes = 0
        """Envelopes carried by them."""

    @property
    def waiting(self) -> int:
        """Envelopes not sent yet (all processing types)."""
        return sum(len(lane.waiting) for lane in self._lanes.values())

    async def publish(self, env: WorkEnvelope) -> None:
        """Send ``env`` to its step's exchange in the next bundle; return once confirmed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._add(env, functools.partial(_settle_future, future), future)
        await future

    def submit(self, env: WorkEnvelope, done: Done) -> None:
        """Send ``env`` in the next bundle and call ``done`` when that bundle is settled
        (never from inside this call)."""
        self._add(env, done, None)

    def _add(self, env: WorkEnvelope, done: Done,
             future: asyncio.Future[None] | None) -> None:
        loop = asyncio.get_running_loop()
        if self._closed:
            loop.call_soon(done, TransportError("the work publisher is closed"))
            return
        name = env.step.name
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane()
        lane.waiting.append((env, done, future))
        if lane.in_flight < self.max_in_flight or len(lane.waiting) >= self.max_items:
            self._send(name, lane)
        elif lane.timer is None:
            lane.timer = loop.call_later(self.max_wait_s, self._on_timer, name)

    def _on_timer(self, name: str) -> None:
        lane = self._lanes.get(name)
        if lane is not None:
            lane.timer = None
            self._send(name, lane)

    def _send(self, name: str, lane: _Lane) -> None:
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        items = [i for i in lane.waiting[: self.max_items] if i[2] is None or not i[2].done()]
        del lane.waiting[: self.max_items]
        if not items:
            return
        lane.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._publish(name, lane, items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, name: str, lane: _Lane, items: list[_Item]) -> None:
        envelopes = [e for e, _, _ in items]
        # The bundle lives as long as its longest-lived item; the worker drops the
        # items whose own deadline has passed (each gets an "expired" reply).
        ttl = max(0.001, max(e.deadline for e in envelopes) - time.time())
        body = encode_work(envelopes[0]) if len(envelopes) == 1 else encode_work_bundle(envelopes)
        error: AudioStreamError | None = None
        try:
            await self.transport.publish_work(name, next(self._shards), body, ttl=ttl)
        except AudioStreamError as err:
            error = err
        except asyncio.CancelledError:
            error = TransportError("the work publisher closed before the broker confirmed")
            raise
        finally:
            lane.in_flight -= 1
            if error is None:
                self.bundles += 1
                self.envelopes += len(items)
                if self.on_sent is not None:
                    self.on_sent(len(items))
            for _, done, _ in items:
                done(error)
            if lane.waiting and not self._closed:
                self._send(name, lane)

    async def close(self) -> None:
        """Fail what was not sent, cancel what is in flight (its callers get an error)."""
        self._closed = True
        for lane in self._lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
                lane.timer = None
            waiting, lane.waiting = lane.waiting, []
            for _, done, _ in waiting:
                done(TransportError("the work publisher is closed"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
