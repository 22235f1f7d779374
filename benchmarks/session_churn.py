"""Embedded-server memory after many start -> stop sessions: back to where it started.

Runs ``embedded_server`` (the in-memory broker, what ``audiostream serve`` runs) in
this process and ``--sessions`` raw WebSocket sessions (``--concurrency`` at a time),
each: start, one chunk, its audio, stop, summary, close. RSS is read before the
first session (the start), after ``--warmup`` sessions (allocator and import
warm-up), at the end after a ``gc.collect()``, and once more one WebSocket heartbeat
period later (older trees' aiohttp kept a closed connection referenced until then).
Growth is reported against both the start and the warm-up. ``gc`` counts the live
objects a session leaves behind if it leaks: the gateway's connections
(``_Connection``, aiohttp ``WebSocketResponse``), ``SessionPipeline``s and the
memory broker's consumers and subscriptions. ``--tracemalloc`` also lists the
allocation sites that grew most between the warm-up and the end.
Prints JSON. Run it with another tree's sources first on PYTHONPATH to compare.

    .venv/bin/python benchmarks/session_churn.py [--sessions 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import aiohttp

FORMAT = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}


async def one(http: aiohttp.ClientSession, url: str, key: str, payload: bytes) -> None:
    async with http.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "start", "version": 1, "api_key": key,
                                      "format": FORMAT, "pipeline": ["passthrough"]}))
        assert json.loads((await ws.receive(timeout=30)).data)["type"] == "ready"
        await ws.send_bytes(payload)
        assert (await ws.receive(timeout=30)).data == payload
        await ws.send_str(json.dumps({"type": "stop"}))
        assert json.loads((await ws.receive(timeout=30)).data)["type"] == "summary"
        await ws.receive(timeout=30)


def malloc_trim() -> bool:
    """Hand freed heap pages back to the OS (glibc), so RSS shows what is still in use
    rather than the allocator's high-water mark."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def live(*kinds: type) -> dict[str, int]:
    counts = dict.fromkeys((k.__name__ for k in kinds), 0)
    for o in gc.get_objects():
        for k in kinds:
            if isinstance(o, k):
                counts[k.__name__] += 1
    return counts


def _where(frame: Any) -> str:
    return f"{frame.filename.split('site-packages/')[-1].split('/src/')[-1]}:{frame.lineno}"


def top_growth(before: Any, after: Any, n: int = 8, frames: int = 1) -> list[str]:
    """The allocation sites (``frames`` > 1: whole tracebacks, innermost first) whose
    live memory grew most between the two snapshots."""
    stats = after.compare_to(before, "traceback" if frames > 1 else "lineno")
    return [f"{s.size_diff / 1024:+.0f} KiB ({s.count_diff:+d} blocks) at "
            + " <- ".join(_where(f) for f in reversed(list(s.traceback)))
            for s in stats[:n]]


async def main(args: argparse.Namespace) -> None:
    import tracemalloc

    from aiohttp import web

    from audiostream.embedded import embedded_server
    from audiostream.gateway import GatewaySettings
    from audiostream.gateway.pipeline import SessionPipeline
    from audiostream.gateway.server import _Connection
    from audiostream.testing import eventually
    from audiostream.topology import Topology
    from audiostream.transport import MemoryBroker
    from audiostream.transport.memory import _Consumer, _MemorySubscription

    kinds = (_Connection, web.WebSocketResponse, SessionPipeline, _Consumer,
             _MemorySubscription)

    broker = MemoryBroker()
    topo = Topology(processing_types=("passthrough",), prefix="churn")
    payload = b"\x01\x02" * 320
    pid = os.getpid()
    async with embedded_server(topology=topo, memory_broker=broker,
                               gateway_settings=GatewaySettings(
                                   chunk_rate=None, heartbeat_s=args.heartbeat_s,
                                   # one key starts them all: lift the per-key start cap
                                   session_starts_per_minute=None)) as srv:
        gw = srv.gateway
        gc.collect()
        rss_start = c.rss_bytes(pid)  # the server up, no session yet

        def consumers() -> int:
            t: Any = gw.transport
            count = getattr(t, "consumer_count", None)
            return int(count) if count is not None else len(t._consumers)

        async def run(n: int) -> None:
            left = n

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await one(http, srv.url, srv.api_key, payload)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            # The gateway finishes a session after the client has its close frame.
            await eventually(lambda: not gw.connections, within=30)

        async with aiohttp.ClientSession() as http:
            await run(args.warmup)
            await asyncio.sleep(2 * gw.settings.heartbeat_s + 2)  # see below
            gc.collect()
            malloc_trim()
            rss0 = c.rss_bytes(pid)
            consumers0 = consumers()
            live0 = live(*kinds)
            if args.tracemalloc:
                tracemalloc.start(args.tracemalloc_frames)
                snap0 = tracemalloc.take_snapshot()
            t0 = time.monotonic()
            await run(args.sessions)
            wall = time.monotonic() - t0
        gc.collect()
        rss1 = c.rss_bytes(pid)
        # aiohttp (3.14) re-arms a closed WebSocketResponse's heartbeat timer when the
        # client's close frame arrives after the server's: on trees before the edge's
        # guard (gateway/edge.py, _while_open) each ended connection stayed referenced
        # by the event loop for one heartbeat period. Kept to compare such trees.
        await asyncio.sleep(2 * gw.settings.heartbeat_s + 2)
        gc.collect()
        rss2 = c.rss_bytes(pid)
        live2 = live(*kinds)
        growth = (top_growth(snap0, tracemalloc.take_snapshot(), args.tracemalloc_top,
                             args.tracemalloc_frames) if args.tracemalloc else None)
        trimmed = malloc_trim()
        rss3 = c.rss_bytes(pid)
        c.emit({
            "bench": "session_churn", "sessions": args.sessions, "warmup": args.warmup,
            "concurrency": args.concurrency, "heartbeat_s": args.heartbeat_s,
            "wall_s": round(wall, 1),
            "rss_mb_start": round(rss_start / 2**20, 1),
            "rss_mb_after_warmup": round(rss0 / 2**20, 1),
            "rss_mb_after": round(rss1 / 2**20, 1),
            "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 1),
            "rss_mb_after_heartbeat": round(rss2 / 2**20, 1),
            "rss_growth_after_heartbeat_pct": round(100 * (rss2 - rss0) / rss0, 1),
            "rss_mb_after_malloc_trim": round(rss3 / 2**20, 1) if trimmed else None,
            "rss_growth_after_malloc_trim_pct": round(100 * (rss3 - rss0) / rss0, 1)
            if trimmed else None,
            "rss_growth_vs_start_pct": round(100 * (rss2 - rss_start) / rss_start, 1),
            "rss_growth_vs_start_after_malloc_trim_pct":
                round(100 * (rss3 - rss_start) / rss_start, 1) if trimmed else None,
            "live_objects_after_warmup": live0,
            "live_objects_after": live2,
            "tracemalloc_top_growth": growth,
            "gateway_consumers_after_warmup": consumers0,
            "gateway_consumers_after": consumers(),
            "broker_queues": len(broker._queues),
            "audiostream_src": str(Path(sys.modules["audiostream"].__file__ or "").parent),
            "machine": c.machine(),
        })


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tracemalloc", action="store_true",
                    help="trace allocations from the warm-up on (slower)")
    ap.add_argument("--tracemalloc-frames", type=int, default=1,
                    help="frames kept per allocation; above 1 the growth is grouped by "
                    "whole traceback")
    ap.add_argument("--tracemalloc-top", type=int, default=8,
                    help="how many of the sites that grew most to list")
    ap.add_argument("--heartbeat-s", type=float, default=30.0,
                    help="the gateway's WebSocket heartbeat (its default: 30)")
    asyncio.run(main(ap.parse_args()))
