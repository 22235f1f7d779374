"""Messages per session-second with and without proactive coalescing (the latency budget).

The gateway's per-session code runs in this process (one ``SessionPipeline`` per
session, the shared ``WorkBundler``, the reply queue as journal, no WebSocket in
front) against RabbitMQ and a real ``audiostream worker --processing passthrough``
process. Every session sends a 20 ms chunk every 20 ms on its own schedule (random
phase) and never acks. For each session count, the modes run back to back in one
process and one worker:

* ``off``: ``budget_fraction=0``: one message in flight; chunks coalesce only while
  a reply is outstanding (the behaviour before the budget);
* ``budget``: the default policy: when replies take longer than half the chunk
  interval, messages wait for more chunks (at most ``max_hold_s``, 40 ms).

Reported per mode: session messages per session-second, chunks per message, the round
trip (submit -> outcome) percentiles, drops, and CPU (this process, the worker,
RabbitMQ) per session-second. Prints JSON lines.

    .venv/bin/python benchmarks/coalesce.py [--sessions 10,40] [--duration 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

CHUNK_S = 0.02
RATE = 16000


async def trial(args: argparse.Namespace, mode: str, sessions: int, prefix: str,
                worker_pid: int) -> dict[str, Any]:
    from audiostream.audio import AudioFormat, Encoding
    from audiostream.bench import synthetic_audio
    from audiostream.bundler import WorkBundler
    from audiostream.embedded import default_topology
    from audiostream.envelope import Step
    from audiostream.gateway.coalescer import CoalescePolicy
    from audiostream.gateway.pipeline import Outcome, SessionPipeline
    from audiostream.transport import open_transport

    fmt = AudioFormat(Encoding.PCM_S16LE, RATE, 1)
    policy = CoalescePolicy(budget_fraction=0.0 if mode == "off" else args.fraction,
                            max_hold_s=args.max_hold_ms / 1000)
    transport = open_transport(args.broker, default_topology(prefix=prefix))
    await transport.connect()
    bundler = WorkBundler(transport, max_items=64, max_wait_s=0.005)
    n_chunks = int(args.duration / CHUNK_S)
    frame = int(RATE * CHUNK_S)
    sent_at: list[dict[int, float]] = [{} for _ in range(sessions)]
    latencies: list[float] = []
    drops: dict[str, int] = {}
    done = asyncio.Event()
    answered = 0

    def sink_for(i: int) -> Any:
        def sink(outcomes: list[Outcome]) -> None:
            nonlocal answered
            now = time.monotonic()
            for o in outcomes:
                t = sent_at[i].pop(o.seq, None)
                if o.audio is None:
                    reason = o.code.name.lower() if o.code is not None else "unknown"
                    drops[reason] = drops.get(reason, 0) + 1
                elif t is not None:
                    latencies.append(now - t)
                answered += 1
            pipes[i].delivered(outcomes[-1].seq + 1)  # as the gateway's writer does
            if answered == sessions * n_chunks:
                done.set()
        return sink

    pipes = [SessionPipeline(session_id=f"co{uuid.uuid4().hex[:10]}", transport=transport,
                             pipeline=(Step("passthrough"),), fmt=fmt, deadline_s=1.0,
                             sink=sink_for(i), bundler=bundler, policy=policy)
             for i in range(sessions)]
    audio = [synthetic_audio(i, n_chunks * CHUNK_S, RATE).tobytes() for i in range(sessions)]
    for p in pipes:
        await p.open()

    async def feed(i: int, t0: float) -> None:
        pcm, pipe = audio[i], pipes[i]
        for k in range(n_chunks):
            delay = t0 + k * CHUNK_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the real-time schedule itself
            sent_at[i][k] = time.monotonic()
            pipe.submit(k, pcm[2 * k * frame: 2 * (k + 1) * frame], time.time())

    rabbit = c.find_pid("beam.smp")
    pids = {"gateway_side": os.getpid(), "worker": worker_pid,
            **({"rabbitmq": rabbit} if rabbit else {})}
    start = time.monotonic() + 0.2
    with c.CpuMeter(pids) as cpu:
        await asyncio.gather(*(feed(i, start + random.random() * CHUNK_S)
                               for i in range(sessions)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 5.0)
        wall = time.monotonic() - cpu.t0
        usage = cpu.read()
    messages = sum(p.messages_published for p in pipes)
    for p in pipes:
        await p.close(finished=True)
    await bundler.close()
    await transport.close()
    pct = c.percentiles([1000 * x for x in latencies])
    return {
        "bench": "coalesce", "mode": mode, "sessions": sessions, "duration_s": args.duration,
        "session_messages_per_session_second": round(messages / (sessions * wall), 2),
        "chunks_per_message": round(sessions * n_chunks / max(1, messages), 3),
        "latency_ms": {k: pct[k] for k in ("p50", "p90", "p99", "max") if k in pct},
        "dropped": sum(drops.values()), "drops_by_reason": drops,
        "unanswered": sessions * n_chunks - answered,
        "cpu_cores": usage,
        "cpu_ms_per_session_second": {k: round(1000 * v / sessions, 2)
                                      for k, v in usage.items()},
    }


async def main(args: argparse.Namespace) -> None:
    from audiostream.embedded import default_topology
    from audiostream.transport.rabbitmq import declare_topology

    c.raise_nofile()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    await declare_topology(args.broker, default_topology(prefix=prefix))
    worker = await c.start("worker", c.cli(
        "worker", "--broker", args.broker, "--prefix", prefix, "--processing",
        "passthrough"), "consuming")
    try:
        for n in (int(x) for x in args.sessions.split(",")):
            for mode in args.modes.split(","):
                c.emit(await trial(args, mode, n, prefix, worker.pid))
    finally:
        await worker.stop()
        await c.delete_prefix(args.broker, prefix)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="10,40")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--modes", default="off,budget")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--max-hold-ms", type=float, default=40.0)
    ap.add_argument("--broker", default=c.BROKER)
    asyncio.run(main(ap.parse_args()))
