"""Pipeline round trip against two floors, measured in one run (``make bench``).

    client -> gateway -> RabbitMQ -> worker (passthrough) -> RabbitMQ -> gateway -> client

at 1, 10, 25 and 50 real-time sessions (20 ms chunks), gateway and worker as
separate ``audiostream`` processes. At each level, in the same run:

* ``amqp_floor``: bare aio-pika, one message per chunk at the same rate: publisher
  (confirms) -> topic exchange -> quorum queue -> consumer process (prefetch 128,
  reply confirmed before ack, like the worker) -> per-session reply queue -> publisher;
* ``amqp_coalesced_floor``: the same, but with the gateway's message pattern: one
  message in flight per session, chunks arriving meanwhile ride in the next one;
* ``ws_floor``: a bare aiohttp WebSocket echo process, same clients, same rate.

Prints one JSON object per line (one per measurement, then a summary with the
pipeline/floor ratios). Talks to 127.0.0.1 only.

    .venv/bin/python benchmarks/roundtrip.py [--levels 1,10,25,50] [--duration 10]
        [--rounds N [--skip-coalesced]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

SELF = str(Path(__file__).resolve())
CHUNK_MS = 20.0
BODY_BYTES = 700  # about a msgpack work envelope carrying 20 ms of 16 kHz mono audio


def ramp_for(sessions: int) -> float:
    return min(2.0, 0.05 * sessions)


# --- floor 1: bare aio-pika ---------------------------------------------------------------------


async def amqp_echo(broker: str, queue: str) -> None:
    """The floor's consumer process: reply to each message, ack after the confirm."""
    import aio_pika

    conn = await aio_pika.connect(broker)
    pub = await conn.channel(publisher_confirms=True)
    sub = await conn.channel()
    await sub.set_qos(prefetch_count=128)
    q = await sub.get_queue(queue, ensure=False)

    async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert msg.reply_to is not None
        await pub.default_exchange.publish(aio_pika.Message(msg.body), routing_key=msg.reply_to)
        await msg.ack()

    await q.consume(on_message)
    print("amqp echo ready", flush=True)
    await asyncio.Event().wait()


async def measure_amqp(broker: str, prefix: str, sessions: int, duration: float,
                       pids: dict[str, int], *, coalesce: bool = False) -> dict[str, Any]:
    """Bare aio-pika round trips. ``coalesce``: like the gateway, one message in flight
    per session, chunks that arrive meanwhile ride in the next message (1 s deadline)."""
    import aio_pika

    conn = await aio_pika.connect(broker)
    setup = await conn.channel()
    exchange_name, work = f"{prefix}.floor", f"{prefix}.floor.work"
    exchange = await setup.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC,
                                            durable=True)
    wq = await setup.declare_queue(work, durable=True, arguments={"x-queue-type": "quorum"})
    await wq.bind(exchange, "floor.0")
    echo = await c.start("amqp-echo", [sys.executable, SELF, "--role", "amqp-echo",
                                       "--broker", broker, "--queue", work], "ready")
    pub = await conn.channel(publisher_confirms=True)
    pub_exchange = await pub.get_exchange(exchange_name, ensure=False)
    replies = await conn.channel()
    sent_at: dict[tuple[int, int], list[float]] = {}
    """(session, message) -> send times of the chunks it carries."""
    pending: list[list[float]] = [[] for _ in range(sessions)]
    in_flight: list[int | None] = [None] * sessions
    next_msg = [0] * sessions
    latencies: list[float] = []
    lost = 0
    messages = 0
    reply_queues = []
    tasks: set[asyncio.Task[None]] = set()
    sending = True
    all_back = asyncio.Event()
    try:
        for i in range(sessions):
            rq = await replies.declare_queue(f"{prefix}.floor.reply.{i}",
                                             arguments={"x-expires": 60_000})
            reply_queues.append(rq)

            async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
                now = time.monotonic()
                s, m = struct.unpack_from("!II", msg.body)
                times = sent_at.pop((s, m), None)
                if times is not None:
                    latencies.extend((now - t) * 1000 for t in times)
                    if coalesce and in_flight[s] == m:
                        in_flight[s] = None
                        flush(s)
                with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError):
                    await msg.ack()  # the channel may be closing at the end of a run
                if not sending and not sent_at and not any(pending):
                    all_back.set()

            await rq.consume(on_reply)

        async def publish(body: bytes, reply_to: str) -> None:
            # A nack or a closed channel (cleanup while behind) shows up as a lost message.
            with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError):
                await pub_exchange.publish(
                    aio_pika.Message(body, reply_to=reply_to, expiration=1.0), "floor.0")

        pad = bytes(BODY_BYTES - 8)

        def expire(i: int, m: int) -> None:
            if in_flight[i] == m:  # no reply by the deadline: give up, send the rest
                in_flight[i] = None
                flush(i)

        def flush(i: int) -> None:
            nonlocal messages
            if not pending[i] or (coalesce and in_flight[i] is not None):
                return
            times, pending[i] = pending[i], []
            m = next_msg[i]
            next_msg[i] += 1
            sent_at[(i, m)] = times
            messages += 1
            body = struct.pack("!II", i, m) + pad * len(times)
            if coalesce:
                in_flight[i] = m
                asyncio.get_running_loop().call_later(1.0, expire, i, m)
            t = asyncio.get_running_loop().create_task(publish(body, reply_queues[i].name))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        async def session(i: int) -> None:
            await asyncio.sleep(i * ramp_for(sessions) / sessions)  # the ramp
            start = time.monotonic()
            for seq in range(int(duration * 1000 / CHUNK_MS)):
                delay = start + seq * CHUNK_MS / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # real-time pacing
                pending[i].append(time.monotonic())
                flush(i)

        with c.CpuMeter({**pids, "echo": echo.pid}) as cpu:
            await asyncio.gather(*(session(i) for i in range(sessions)))
            sending = False
            if sent_at:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_back.wait(), 5)  # the last replies
            usage = cpu.read()
        lost = sum(len(v) for v in sent_at.values()) + sum(len(p) for p in pending)
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await echo.stop()
        with contextlib.suppress(Exception):
            await replies.close()
        # A fresh channel per delete: an earlier error may have closed the others.
        names = [rq.name for rq in reply_queues] + [work]
        for action, name in [("queue_delete", n) for n in names] + [
                ("exchange_delete", exchange_name)]:
            with contextlib.suppress(Exception):
                ch = await conn.channel()
                await getattr(ch, action)(name)
                await ch.close()
        await conn.close()
    chunks = len(latencies) + lost
    return {"latency_ms": c.percentiles(latencies), "lost": lost, "messages": messages,
            "chunks_per_message": round(chunks / messages, 3) if messages else None,
            "cpu_cores": usage}


# --- floor 2: bare aiohttp WebSocket echo -----------------------------------------------------


async def ws_echo() -> None:
    from aiohttp import WSMsgType, web

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/echo", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"ws echo on {port}", flush=True)
    await asyncio.Event().wait()


async def measure_ws(sessions: int, duration: float, pids: dict[str, int],
                     quota_cores: float | None = None) -> dict[str, Any]:
    """The echo floor; ``quota_cores`` puts the echo process under the same CFS limit
    as a gateway measured in the same run (``gateway_capacity.py``)."""
    import aiohttp

    echo = await c.start("ws-echo", [sys.executable, SELF, "--role", "ws-echo"], "ws echo on")
    port = int(echo.info["line"].rsplit(" ", 1)[1])
    limits = contextlib.ExitStack()
    if quota_cores:
        limits.enter_context(c.CpuQuota(echo.pid, quota_cores))
    latencies: list[float] = []
    lost = 0
    chunk = bytes(640)

    async def session(http: aiohttp.ClientSession, i: int) -> int:
        await asyncio.sleep(i * ramp_for(sessions) / sessions)  # the ramp
        n = int(duration * 1000 / CHUNK_MS)
        sent: dict[int, float] = {}
        async with http.ws_connect(f"http://127.0.0.1:{port}/echo", compress=0) as ws:

            async def receive() -> None:
                for _ in range(n):
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.BINARY:
                        return
                    seq = struct.unpack_from("!I", msg.data)[0]
                    latencies.append((time.monotonic() - sent.pop(seq)) * 1000)

            rx = asyncio.get_running_loop().create_task(receive())
            start = time.monotonic()
            for seq in range(n):
                delay = start + seq * CHUNK_MS / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # real-time pacing
                sent[seq] = time.monotonic()
                await ws.send_bytes(struct.pack("!I", seq) + chunk[4:])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rx, 5)
        return len(sent)

    try:
        with limits, c.CpuMeter({**pids, "echo": echo.pid}) as cpu:
            async with aiohttp.ClientSession() as http:
                lost = sum(await asyncio.gather(*(session(http, i) for i in range(sessions))))
            usage = cpu.read()
    finally:
        await echo.stop()
    return {"latency_ms": c.percentiles(latencies), "lost": lost, "cpu_cores": usage}


# --- the pipeline ----------------------------------------------------------------------------


async def measure_pipeline(st: c.Stack, sessions: int, duration: float,
                           pids: dict[str, int]) -> dict[str, Any]:
    from audiostream.bench import BenchConfig, run_bench

    cfg = BenchConfig(url=st.ws_url, api_key=st.key, sessions=sessions, duration_s=duration,
                      pipeline=("passthrough",), chunk_ms=CHUNK_MS, ramp_s=ramp_for(sessions),
                      metrics_urls=tuple(u for u in (st.gateway_metrics, st.worker_metrics)
                                         if u))
    with c.CpuMeter(pids) as cpu:
        r = await run_bench(cfg)
        usage = cpu.read()
    srv = r["server"] or {}
    return {
        "latency_ms": {**{k: r["round_trip_ms"][k] for k in ("p50", "p90", "p99", "max")},
                       "count": r["round_trip_ms"]["count"]},
        "from_due_ms": r["round_trip_from_due_ms"],
        "send_lag_ms": r["send_lag_ms"],
        "dropped": r["chunks"]["dropped"],
        "errors": r["errors_by_code"],
        "consistent": r.get("consistent"),
        "chunks_per_message": srv.get("chunks_per_message"),
        "stage_means_ms": {k: v["mean_ms"] for k, v in srv.get("stages", {}).items()},
        "worker": srv.get("workers"),
        "cpu_cores": usage,
    }


# --- main ----------------------------------------------------------------------------------------


_MODES = ("pipeline", "amqp_floor", "amqp_coalesced_floor", "ws_floor")


async def _measure(mode: str, st: c.Stack, args: argparse.Namespace, n: int,
                   pids: dict[str, int]) -> dict[str, Any]:
    if mode == "pipeline":
        return await measure_pipeline(st, n, args.duration, pids)
    floor_pids = {k: v for k, v in pids.items() if k not in ("gateway", "worker")}
    if mode == "ws_floor":
        return await measure_ws(n, args.duration, floor_pids)
    prefix = f"{st.prefix}f{uuid.uuid4().hex[:4]}"
    return await measure_amqp(args.broker, prefix, n, args.duration, floor_pids,
                              coalesce=mode == "amqp_coalesced_floor")


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def _ratios(row: dict[str, Any]) -> dict[str, Any]:
    """One round's figures and the pipeline's ratios to the floors measured beside it."""
    p, a, w = (row[k]["latency_ms"] for k in ("pipeline", "amqp_floor", "ws_floor"))
    out: dict[str, Any] = {
        "pipeline_p50_ms": p["p50"], "pipeline_p99_ms": p["p99"],
        "amqp_floor_p50_ms": a["p50"], "amqp_floor_p99_ms": a["p99"],
        "ws_floor_p50_ms": w["p50"], "ws_floor_p99_ms": w["p99"],
        "ratio_p50_vs_amqp": _ratio(p["p50"], a["p50"]),
        "ratio_p99_vs_amqp": _ratio(p["p99"], a["p99"]),
        "ratio_p50_vs_amqp_plus_ws": _ratio(p["p50"], a["p50"] + w["p50"]),
        "ratio_p99_vs_amqp_plus_ws": _ratio(p["p99"], a["p99"] + w["p99"]),
        "pipeline_dropped": row["pipeline"]["dropped"],
    }
    if "amqp_coalesced_floor" in row:
        q = row["amqp_coalesced_floor"]["latency_ms"]
        out.update({"amqp_coalesced_floor_p50_ms": q["p50"],
                    "amqp_coalesced_floor_p99_ms": q["p99"],
                    "ratio_p50_vs_amqp_coalesced": _ratio(p["p50"], q["p50"]),
                    "ratio_p99_vs_amqp_coalesced": _ratio(p["p99"], q["p99"])})
    return out


async def main(args: argparse.Namespace) -> int:
    levels = [int(x) for x in args.levels.split(",")]
    c.emit({"bench": "roundtrip", "machine": c.machine(), "levels": levels,
            "duration_s": args.duration, "chunk_ms": CHUNK_MS}, args.out)
    rabbit = c.find_pid("beam.smp")
    results: dict[int, list[dict[str, Any]]] = {}
    async with c.stack(["passthrough"], broker=args.broker) as st:
        assert st.worker is not None
        pids = {"client": os.getpid(), "gateway": st.gateway.pid,
                "worker": st.worker.pid}
        if rabbit:
            pids["rabbitmq"] = rabbit
        for n in levels:
            for r in range(args.rounds):
                # Alternate the order so neither side always runs in the later window.
                order = _MODES if r % 2 == 0 else _MODES[1:] + _MODES[:1]
                if args.skip_coalesced:
                    order = tuple(m for m in order if m != "amqp_coalesced_floor")
                row: dict[str, Any] = {}
                for mode in order:
                    c.log(f"[roundtrip] {n} sessions, round {r + 1}/{args.rounds}: {mode}")
                    row[mode] = await _measure(mode, st, args, n, pids)
                for mode, data in row.items():
                    c.emit({"bench": "roundtrip", "mode": mode, "sessions": n, "round": r + 1,
                            **data}, args.out)
                results.setdefault(n, []).append(row)

    summary = []
    for n, rows in results.items():
        per_round = [_ratios(row) for row in rows]
        entry: dict[str, Any] = {"sessions": n, "rounds": len(rows)}
        if len(rows) == 1:
            entry.update(per_round[0])
        else:
            entry["per_round"] = per_round
        if len(rows) > 1:
            # The median of ratios each measured in one round: robust to the machine's
            # drift between rounds, which moves a floor by up to 1.7x here.
            entry["median"] = {k: round(statistics.median(x[k] for x in per_round
                                                          if x[k] is not None), 2)
                               for k in per_round[0] if k.startswith("ratio")
                               and any(x[k] is not None for x in per_round)}
        summary.append(entry)
    c.emit({"bench": "roundtrip", "summary": summary}, args.out)
    return 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="main", choices=("main", "amqp-echo", "ws-echo"))
    ap.add_argument("--broker", default=c.BROKER)
    ap.add_argument("--queue", default="")
    ap.add_argument("--levels", default="1,10,25,50")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each level this many times, the pipeline and the floors "
                         "back to back in alternating order; the summary adds the median "
                         "of the per-round ratios")
    ap.add_argument("--skip-coalesced", action="store_true",
                    help="leave out the coalesced AMQP floor (shorter rounds)")
    ap.add_argument("--out", type=Path, default=None, help="also append JSON lines here")
    args = ap.parse_args()
    c.use_uvloop()
    c.raise_nofile()
    if args.role == "amqp-echo":
        asyncio.run(amqp_echo(args.broker, args.queue))
        return 0
    if args.role == "ws-echo":
        asyncio.run(ws_echo())
        return 0
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
