"""A client that stops reading, at the largest legal chunk size: bounded, closed, resumable.

Runs a real ``audiostream gateway`` and ``audiostream worker`` (passthrough) on RabbitMQ
with the gateway's default outbound limits (8 MiB unwritten for 10 s, or 32 MiB at
once). ``--victims`` raw v1 sessions stream 20 ms chunks in real time throughout and
measure each chunk's round trip (send -> its outcome). After ``--baseline-s`` a raw
v1 client starts sending 1 s chunks of 48 kHz stereo float32 (384,000 bytes, the
largest legal chunk; ``--rate`` per second, default as fast as it can) and never
reads. Reported:

* the gateway's RSS before, at its peak (sampled every 0.1 s) and after the close;
* the time from the non-reader's first chunk to the gateway reporting the error it
  closes the connection with (``slow_consumer``, ``flooding`` or ``idle_timeout`` in
  its ``audiostream_gateway_errors_total``), and the close code the client reads once
  it reads again;
* how often the gateway stopped reading the connection at its per-session byte
  budget (``audiostream_gateway_reads_paused_total``);
* whether the session resumes: ``start`` with the token and the outcomes it holds,
  ``stop``, every remaining outcome, ``summary``, close 1000;
* the victims' p50/p99 round trip before and while the non-reader was connected.

Prints JSON.

    .venv/bin/python benchmarks/nonreader.py [--victims 5] [--baseline-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import aiohttp
import numpy as np

CHUNK_S = 0.02
SMALL = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}
BIG = {"encoding": "pcm_f32le", "sample_rate": 48000, "channels": 2}
BIG_BYTES = 48000 * 2 * 4  # 1 s: the largest legal chunk


@dataclass
class Victims:
    latencies: list[tuple[float, float]] = field(default_factory=list)
    """(time sent, round trip s) per audio outcome."""
    notices: int = 0
    closes: list[int | None] = field(default_factory=list)


async def victim(url: str, key: str, i: int, stop: asyncio.Event, out: Victims) -> None:
    rng = np.random.default_rng(i)
    frames = [(rng.standard_normal(320) * 3000).astype(np.int16).tobytes() for _ in range(50)]
    sent_at: list[float] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "start", "version": 1, "api_key": key,
                                      "format": SMALL, "pipeline": ["passthrough"]}))
        assert json.loads((await ws.receive(timeout=30)).data)["type"] == "ready"

        async def reader() -> None:
            seq = 0
            async for msg in ws:
                now = time.monotonic()
                if msg.type is aiohttp.WSMsgType.BINARY:
                    out.latencies.append((sent_at[seq], now - sent_at[seq]))
                    seq += 1
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m["type"] == "notice":
                        out.notices += 1
                        seq += 1
            out.closes.append(ws.close_code)

        rd = asyncio.get_running_loop().create_task(reader())
        t0 = time.monotonic()
        n = 0
        while not stop.is_set():
            delay = t0 + n * CHUNK_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the real-time schedule itself
            sent_at.append(time.monotonic())
            await ws.send_bytes(frames[n % 50])
            n += 1
        await ws.send_str(json.dumps({"type": "stop"}))
        await asyncio.wait_for(rd, 60)


#: Errors the gateway closes a non-reader with.
CLOSING = ("slow_consumer", "flooding", "idle_timeout")


async def gateway_counts(http: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    """The closing errors sent so far, and ``reads_paused``."""
    async with http.get(metrics_url) as r:
        text = await r.text()
    out: dict[str, float] = {}
    for code in CLOSING:
        m = re.search(r'audiostream_gateway_errors_total\{code="' + code + r'"\} (\S+)', text)
        out[code] = float(m.group(1)) if m else 0.0
    m = re.search(r'^audiostream_gateway_reads_paused_total (\S+)', text, re.M)
    out["reads_paused"] = float(m.group(1)) if m else 0.0
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(1000 * s[min(len(s) - 1, int(q * len(s)))], 1)


async def main(args: argparse.Namespace) -> None:
    block = np.random.default_rng(3).standard_normal(BIG_BYTES // 4).astype(np.float32)
    big = block.tobytes()
    async with c.stack(["passthrough"], broker=args.broker) as st, \
            aiohttp.ClientSession() as http:
        pid = st.gateway.pid
        stop, vict = asyncio.Event(), Victims()
        victims = [asyncio.ensure_future(victim(st.ws_url, st.key, i, stop, vict))
                   for i in range(args.victims)]
        await asyncio.sleep(args.baseline_s)  # the victims' baseline window
        rss_before = c.rss_bytes(pid)
        ws = await http.ws_connect(st.ws_url)
        await ws.send_str(json.dumps({"type": "start", "version": 1, "api_key": st.key,
                                      "format": BIG, "pipeline": ["passthrough"],
                                      "options": {"deadline_ms": 30_000}}))
        ready = json.loads((await ws.receive(timeout=30)).data)
        assert ready["type"] == "ready", ready
        counts0 = await gateway_counts(http, st.gateway_metrics)
        sent = 0

        async def push() -> None:
            nonlocal sent
            t0 = time.monotonic()
            while not ws.closed:
                if args.rate:
                    delay = t0 + sent / args.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)  # the client's own send schedule
                await ws.send_bytes(big)
                sent += 1

        t_start = time.monotonic()
        pusher = asyncio.ensure_future(push())
        peak, closed_after, closed_with = rss_before, None, None
        counts = counts0
        while time.monotonic() - t_start < args.max_s:
            peak = max(peak, c.rss_bytes(pid))
            counts = await gateway_counts(http, st.gateway_metrics)
            grew = [k for k in CLOSING if counts[k] > counts0[k]]
            if grew:
                closed_after, closed_with = time.monotonic() - t_start, grew[0]
                break
            await asyncio.sleep(0.1)  # sampling period
        pusher.cancel()
        await asyncio.gather(pusher, return_exceptions=True)
        t_closed = time.monotonic()
        # The client reads again: what was written before the close, the error, the code.
        received, error = 0, None
        async with asyncio.timeout(60):
            while True:
                msg = await ws.receive()
                peak = max(peak, c.rss_bytes(pid))
                if msg.type is aiohttp.WSMsgType.BINARY:
                    received += 1
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m["type"] == "error":
                        error = m
                else:
                    code = msg.data if msg.type is aiohttp.WSMsgType.CLOSE else ws.close_code
                    break
        await ws.close()
        rss_after_close = c.rss_bytes(pid)
        # Resume with what the client holds; stop; every remaining outcome + summary + 1000.
        resume: dict[str, Any] = {}
        async with http.ws_connect(st.ws_url) as again:
            await again.send_str(json.dumps({
                "type": "start", "version": 1, "api_key": st.key, "format": BIG,
                "pipeline": ["passthrough"], "options": {"deadline_ms": 30_000},
                "resume": {"token": ready["token"], "received": received}}))
            r = json.loads((await again.receive(timeout=30)).data)
            resume["ready"] = r["type"] == "ready" and bool(r.get("resumed"))
            resume["resume_from"] = r.get("resume_from")
            await again.send_str(json.dumps({"type": "stop"}))
            audio = notices = 0
            async for msg in again:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    audio += 1
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m["type"] == "notice":
                        notices += 1
                    elif m["type"] == "summary":
                        resume["summary"] = True
            resume.update(replayed_audio=audio, replayed_notices=notices,
                          close_code=again.close_code)
        await asyncio.sleep(args.after_s)  # victims after the non-reader is gone
        stop.set()
        await asyncio.gather(*victims)
        base = [rt for at, rt in vict.latencies if at < t_start]
        during = [rt for at, rt in vict.latencies if t_start <= at <= t_closed]
        after = [rt for at, rt in vict.latencies if at > t_closed]
        c.emit({
            "bench": "nonreader", "chunk_bytes": BIG_BYTES, "format": BIG,
            "gateway_limits": "defaults: 8 MiB unwritten for 10 s, or 32 MiB at once; "
                              "16 MiB queued per session",
            "nonreader_rate": args.rate or "max", "nonreader_chunks_sent": sent,
            "seconds_to_close": round(closed_after, 2) if closed_after is not None else None,
            "closed_with": closed_with,
            "gateway_reads_paused": counts["reads_paused"] - counts0["reads_paused"],
            "close_code_seen_by_client": code,
            "error": error and {k: error[k] for k in ("code", "name", "retryable")},
            "outcomes_read_before_close": received,
            "gateway_rss_mb_before": round(rss_before / 2**20, 1),
            "gateway_rss_mb_peak": round(peak / 2**20, 1),
            "gateway_rss_mb_after_close": round(rss_after_close / 2**20, 1),
            "gateway_rss_mb_end": round(c.rss_bytes(pid) / 2**20, 1),
            "resume": resume,
            "victims": args.victims,
            "victim_round_trip_ms": {
                "before": {"chunks": len(base), "p50": pct(base, 0.5), "p99": pct(base, 0.99)},
                "during": {"chunks": len(during), "p50": pct(during, 0.5),
                           "p99": pct(during, 0.99)},
                "after": {"chunks": len(after), "p50": pct(after, 0.5),
                          "p99": pct(after, 0.99)},
            },
            "victim_notices": vict.notices, "victim_closes": vict.closes,
            "machine": c.machine(),
        })


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victims", type=int, default=5)
    ap.add_argument("--baseline-s", type=float, default=10.0)
    ap.add_argument("--after-s", type=float, default=5.0)
    ap.add_argument("--max-s", type=float, default=60.0,
                    help="give up waiting for the close after this long")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="the non-reader's chunks per second (0: as fast as it can)")
    ap.add_argument("--broker", default=c.BROKER)
    asyncio.run(main(ap.parse_args()))
