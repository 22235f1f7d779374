"""Helpers for tests: the embedded server (re-exported from ``embedded.py``, which
``audiostream serve`` runs), polling for conditions with nothing to await, and a server
on a thread of its own for synchronous code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from audiostream.embedded import Embedded, default_topology, embedded_server, sample_wav

__all__ = ["Embedded", "ThreadedServer", "default_topology", "embedded_server",
           "eventually", "sample_wav"]


async def eventually(
    predicate: Callable[[], Awaitable[bool] | bool],
    *,
    within: float = 10.0,
    interval: float = 0.02,
) -> bool:
    """Poll ``predicate`` until it is true or ``within`` seconds pass; returns its last value.

    For conditions that another process or task brings about (a queue expiring, a
    connection being cleaned up) and that offer nothing to await.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value or loop.time() >= deadline:
            return bool(value)
        await asyncio.sleep(interval)


class ThreadedServer:
    """``embedded_server`` on an event loop in a thread of its own, for synchronous code
    (a sync SDK call, a hypothesis test). ``run`` executes a coroutine on that loop."""

    def __init__(self, **server_kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._stop: asyncio.Event | None = None
        ready: concurrent.futures.Future[Embedded] = concurrent.futures.Future()
        self._done = asyncio.run_coroutine_threadsafe(self._serve(ready, server_kwargs),
                                                      self.loop)
        self.server = ready.result(timeout=60)

    async def _serve(
        self, ready: concurrent.futures.Future[Embedded], kwargs: dict[str, Any]
    ) -> None:
        self._stop = asyncio.Event()
        try:
            async with embedded_server(**kwargs) as srv:
                ready.set_result(srv)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._done.result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
