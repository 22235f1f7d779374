"""A client that never acks: every chunk comes back bit-exact, memory and queues bounded.

Runs a real ``audiostream gateway`` and ``audiostream worker`` (passthrough) on RabbitMQ
and one raw client written from docs/protocol.md (plain aiohttp, nothing from the
SDK) that never sends ``ack``:

* ``--mode realtime`` (v1): 20 ms chunks on the wall clock for ``--minutes`` (5);
* ``--mode credit`` (v1.1): ``--minutes`` (30) of audio as fast as the granted credit
  allows (file mode, ``--rate max``).

Every chunk carries its seq in its first 8 bytes, so each outcome is checked
against exactly what was sent (passthrough is bit-exact). Every ``--sample-s`` the
gateway's RSS (/proc) and the session's reply queue (``rabbitmqctl list_queues``:
ready + unacked) are sampled. Prints JSON.

    .venv/bin/python benchmarks/nonacking.py --mode realtime --minutes 5
    .venv/bin/python benchmarks/nonacking.py --mode credit --minutes 30
    .venv/bin/python benchmarks/nonacking.py --mode realtime --minutes 0.5  # quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
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
SAMPLES = 320  # 20 ms at 16 kHz
FORMAT = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}


class Audio:
    """Chunk ``seq``: a block of noise with ``seq`` in its first 8 bytes."""

    def __init__(self) -> None:
        rng = np.random.default_rng(12)
        pcm = (rng.standard_normal(SAMPLES * 101) * 3000).astype(np.int16).tobytes()
        self.blocks = [pcm[k * 2 * SAMPLES:(k + 1) * 2 * SAMPLES] for k in range(101)]

    def chunk(self, seq: int) -> bytes:
        return seq.to_bytes(8, "little") + self.blocks[seq % 101][8:]


@dataclass
class Tally:
    sent: int = 0
    audio: int = 0
    exact: int = 0
    notices: dict[str, int] = field(default_factory=dict)
    credits: int = 0
    summary: dict[str, Any] | None = None
    close_code: int | None = None
    waits_for_credit: int = 0


def reply_queue_depth(name: str) -> tuple[int, int] | None:
    """(ready, unacked) of one queue, from ``rabbitmqctl`` (exact; the management API
    can be seconds stale)."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "--no-table-headers", "name",
                          "messages_ready", "messages_unacknowledged"],
                         capture_output=True, text=True, timeout=120, check=False).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == name:
            return int(parts[1]), int(parts[2])
    return None


async def run_client(url: str, key: str, args: argparse.Namespace, audio: Audio, tally: Tally,
                     on_ready: asyncio.Future[str]) -> None:
    n = round(args.minutes * 60 / CHUNK_S)
    version = 1.1 if args.mode == "credit" else 1
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(json.dumps({"type": "start", "version": version, "api_key": key,
                                      "format": FORMAT, "pipeline": ["passthrough"]}))
        ready = json.loads((await ws.receive(timeout=30)).data)
        assert ready["type"] == "ready", ready
        on_ready.set_result(ready["session_id"])
        credit = int(ready.get("credit", 0))
        more = asyncio.Event()

        async def reader() -> None:
            nonlocal credit
            seq = 0  # outcomes arrive in seq order: the next one is for this seq
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    tally.audio += 1
                    tally.exact += msg.data == audio.chunk(seq)
                    seq += 1
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m["type"] == "notice":
                        count = int(m.get("count", 1))
                        tally.notices[m["reason"]] = tally.notices.get(m["reason"], 0) + count
                        seq += count
                    elif m["type"] == "credit":
                        tally.credits += 1
                        credit = max(credit, int(m["credit"]))
                        more.set()
                    elif m["type"] == "summary":
                        tally.summary = m
            tally.close_code = ws.close_code

        rd = asyncio.get_running_loop().create_task(reader())
        t0 = time.monotonic()
        for seq in range(n):
            if args.mode == "realtime":
                delay = t0 + seq * CHUNK_S - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # the real-time schedule itself
            else:
                while seq >= credit:
                    more.clear()
                    tally.waits_for_credit += 1
                    await asyncio.wait_for(more.wait(), 60)
            await ws.send_bytes(audio.chunk(seq))
            tally.sent += 1
        await ws.send_str(json.dumps({"type": "stop"}))
        await asyncio.wait_for(rd, 120)


async def main(args: argparse.Namespace) -> None:
    audio = Audio()
    async with c.stack(["passthrough"], broker=args.broker) as st:
        pid = st.gateway.pid
        tally = Tally()
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        rss0 = c.rss_bytes(pid)
        started = time.monotonic()
        client = asyncio.ensure_future(run_client(st.ws_url, st.key, args, audio, tally, ready))
        queue = f"{st.prefix}.reply.{await ready}"
        samples: list[dict[str, Any]] = []
        while not client.done():
            depth = await asyncio.to_thread(reply_queue_depth, queue)
            samples.append({"t_s": round(time.monotonic() - started, 1),
                            "outcomes": tally.audio + sum(tally.notices.values()),
                            "gateway_rss_mb": round(c.rss_bytes(pid) / 2**20, 1),
                            "reply_ready": depth[0] if depth else None,
                            "reply_unacked": depth[1] if depth else None})
            await asyncio.wait({client}, timeout=args.sample_s)
        await client
        wall = time.monotonic() - started
        rss1 = c.rss_bytes(pid)
        depths = [s["reply_ready"] + s["reply_unacked"] for s in samples
                  if s["reply_ready"] is not None]
        step = max(1, len(samples) // 12)
        c.emit({
            "bench": "nonacking", "mode": args.mode,
            "protocol": "1.1 credit, --rate max" if args.mode == "credit" else "1, real time",
            "audio_minutes": args.minutes, "chunk_ms": 20, "wall_s": round(wall, 1),
            "x_real_time": round(args.minutes * 60 / wall, 1),
            "chunks_sent": tally.sent, "audio_back": tally.audio, "bit_exact": tally.exact,
            "notices": tally.notices, "credit_messages": tally.credits,
            "waits_for_credit": tally.waits_for_credit,
            "summary_chunks_out": tally.summary and tally.summary["chunks_out"],
            "close_code": tally.close_code,
            "gateway_rss_mb_start": round(rss0 / 2**20, 1),
            "gateway_rss_mb_peak": max([s["gateway_rss_mb"] for s in samples]
                                       + [round(rss1 / 2**20, 1)]),
            "gateway_rss_mb_end": round(rss1 / 2**20, 1),
            "reply_queue_peak": max(depths) if depths else None,
            "reply_queue_samples": len(depths),
            "samples": samples[::step],
            "machine": c.machine(),
        })


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("realtime", "credit"), default="realtime")
    ap.add_argument("--minutes", type=float, default=None,
                    help="minutes of audio (default: 5 realtime, 30 credit)")
    ap.add_argument("--sample-s", type=float, default=None,
                    help="seconds between samples (default: 10 realtime, 1 credit)")
    ap.add_argument("--broker", default=c.BROKER)
    a = ap.parse_args()
    a.minutes = a.minutes if a.minutes is not None else (5.0 if a.mode == "realtime" else 30.0)
    a.sample_s = a.sample_s if a.sample_s is not None else (
        10.0 if a.mode == "realtime" else 1.0)
    asyncio.run(main(a))
