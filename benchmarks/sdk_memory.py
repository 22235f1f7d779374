"""SDK memory over a long session: RSS growth of the client process only.

Starts ``audiostream serve`` (gateway + worker, in-memory broker) as a separate
process, then streams ``--minutes`` of generated audio through one SDK session at
``--rate max`` (as fast as credit, or a v1 gateway's rate, allows), reading items
while sending and keeping none. The audio is generated chunk by chunk, so the
input itself takes no memory. Prints one JSON line: the client's RSS before, at
its peak and after, the growth, chunks, wall and CPU time.

    PYTHONPATH=src .venv/bin/python benchmarks/sdk_memory.py [--minutes 60]
        [--chunk-ms 1000] [--pipeline passthrough]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import numpy as np

from audiostream.audio import AudioFormat
from audiostream.client import Audio, AudioStreamClient, Notice, Summary

FMT = AudioFormat.pcm16(16000)


async def serve() -> tuple[asyncio.subprocess.Process, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *c.cli("serve", "--port", "0", "--workers", "1", "--log-level", "warning",
               "--ops-port", str(c.free_port())),  # 9090 may be another process's
        cwd=c.ROOT, env=c.env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    url = key = ""
    while not key:
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        if not line:
            raise RuntimeError("serve exited before it was ready")
        if line.startswith("audiostream serving "):
            url = line.split()[2]
        elif line.startswith("as_"):
            key = line.strip()
    asyncio.get_running_loop().create_task(c._drain(proc))
    return proc, url, key


async def one_session(url: str, key: str, pipeline: list[str], chunks: int, chunk_ms: float,
                      sample: Any | None = None) -> dict[str, Any]:
    client = AudioStreamClient(url, api_key=key)
    frames = FMT.sample_rate * chunk_ms / 1000
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(int(frames)) * 2000).astype(np.int16).tobytes()
    counts = {"audio": 0, "notices": 0}
    peak = 0
    async with client.session(pipeline, format=FMT) as s:

        async def read() -> None:
            nonlocal peak
            async for item in s:
                if isinstance(item, Audio):
                    counts["audio"] += 1
                    if counts["audio"] % 500 == 0 and sample is not None:
                        peak = max(peak, sample())
                elif isinstance(item, Notice):
                    counts["notices"] += item.count
                elif isinstance(item, Summary):
                    counts["summary_chunks_out"] = item.chunks_out

        reader = asyncio.create_task(read())
        for _ in range(chunks):
            await s.send(block)
        await s.finish()
        await reader
        counts["version"] = s.version  # type: ignore[assignment]
    counts["peak"] = peak
    return counts


def rss() -> int:
    return c.rss_bytes(__import__("os").getpid())


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--chunk-ms", type=float, default=1000.0)
    ap.add_argument("--pipeline", default="passthrough")
    args = ap.parse_args()
    proc, url, key = await serve()
    pipeline = args.pipeline.split(",")
    try:
        # Warm up: imports, first connection, allocator pools.
        await one_session(url, key, pipeline, 50, args.chunk_ms)
        gc.collect()
        before = rss()
        chunks = int(args.minutes * 60_000 / args.chunk_ms)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        counts = await one_session(url, key, pipeline, chunks, args.chunk_ms, sample=rss)
        wall = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        gc.collect()
        after = rss()
        peak = max(int(counts.pop("peak")), after)
        c.emit({
            "benchmark": "sdk_memory",
            "audio_minutes": args.minutes,
            "chunk_ms": args.chunk_ms,
            "pipeline": pipeline,
            "protocol_version": counts.pop("version"),
            "chunks": chunks,
            **counts,
            "rss_before_mb": round(before / 2**20, 1),
            "rss_peak_mb": round(peak / 2**20, 1),
            "rss_after_mb": round(after / 2**20, 1),
            "rss_growth_mb": round((peak - before) / 2**20, 1),
            "wall_s": round(wall, 1),
            "client_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime
                                  - cpu0.ru_stime, 1),
            "machine": c.machine(),
        })
    finally:
        proc.terminate()
        await proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
