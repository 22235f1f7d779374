"""Gateway CPU per chunk over a non-acking session's life: flat, not growing with age.

Runs a real ``audiostream gateway`` and ``audiostream worker`` (passthrough) on
RabbitMQ and ``--sessions`` raw v1 clients written from docs/protocol.md that stream
20 ms chunks in real time and never send ``ack``. The gateway's CPU time (from
/proc) is divided by the chunks answered in two windows: the first ``--window``
seconds (minute 0) and the last ``--window`` seconds of the run (minute 5 with the
default ``--minutes 6``). It also samples the reply queues' unacked counts
(``rabbitmqctl``) and the gateway's RSS at each window's end. Prints JSON.

Before the journal rewrite, trimming rescanned the whole journal on every reply
(the cost grew with the session's age) and a non-acking session stalled after
1,000 replies (every later chunk expired).

    .venv/bin/python benchmarks/reply_cost.py                       # 6 minutes
    .venv/bin/python benchmarks/reply_cost.py --minutes 1 --window 15   # quick check
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
FORMAT = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}


@dataclass
class Totals:
    audio: int = 0
    notices: dict[str, int] = field(default_factory=dict)
    queues: list[str] = field(default_factory=list)
    mismatched: int = 0


def unacked(queues: list[str]) -> list[int]:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "--no-table-headers", "name",
                          "messages_unacknowledged"], capture_output=True, text=True,
                         timeout=120, check=False).stdout
    counts = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    return [int(counts.get(q, -1)) for q in queues]


async def session(url: str, key: str, i: int, t0: float, end: float, tot: Totals,
                  prefix: str) -> None:
    rng = np.random.default_rng(i)
    pcm = (rng.standard_normal(320 * 50) * 3000).astype(np.int16).tobytes()
    frames = [pcm[k * 640:(k + 1) * 640] for k in range(50)]
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(json.dumps({"type": "start", "version": 1, "api_key": key,
                                      "format": FORMAT, "pipeline": ["passthrough"]}))
        ready = json.loads((await ws.receive(timeout=30)).data)
        assert ready["type"] == "ready", ready
        tot.queues.append(f"{prefix}.reply.{ready['session_id']}")
        sent = 0

        async def reader() -> None:
            got = 0
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    if msg.data != frames[got % 50]:
                        tot.mismatched += 1
                    got += 1
                    tot.audio += 1
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m["type"] == "notice":
                        got += 1
                        tot.notices[m["reason"]] = tot.notices.get(m["reason"], 0) + 1
                    elif m["type"] == "summary":
                        return

        rd = asyncio.get_running_loop().create_task(reader())
        while (at := t0 + sent * CHUNK_S) < end:
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the real-time schedule itself
            await ws.send_bytes(frames[sent % 50])
            sent += 1
        await ws.send_str(json.dumps({"type": "stop"}))
        await asyncio.wait_for(rd, 30)


async def main(args: argparse.Namespace) -> None:
    c.raise_nofile()
    duration = args.minutes * 60
    async with c.stack(["passthrough"], broker=args.broker) as st:
        tot = Totals()
        t0 = time.monotonic() + 1.0
        end = t0 + duration
        tasks = [asyncio.ensure_future(
            session(st.ws_url, st.key, i, t0 + i * CHUNK_S / args.sessions, end, tot,
                    st.prefix)) for i in range(args.sessions)]
        windows: list[dict[str, Any]] = []
        for label, start in (("start", t0 + 2.0), ("end", end - args.window - 1.0)):
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            cpu0, n0, w0 = c.cpu_seconds(st.gateway.pid), tot.audio, time.monotonic()
            notices0 = sum(tot.notices.values())
            probe = asyncio.ensure_future(asyncio.to_thread(unacked, list(tot.queues)))
            await asyncio.sleep(args.window)
            cpu1, n1, w1 = c.cpu_seconds(st.gateway.pid), tot.audio, time.monotonic()
            chunks = n1 - n0
            windows.append({
                "window": label,
                "at_s": round(w0 - t0, 1),
                "chunks": chunks,
                "gateway_cpu_us_per_chunk": round(1e6 * (cpu1 - cpu0) / chunks, 1)
                if chunks else None,
                "gateway_cores": round((cpu1 - cpu0) / (w1 - w0), 3),
                "gateway_rss_mb": round(c.rss_bytes(st.gateway.pid) / 2**20, 1),
                "notices": sum(tot.notices.values()) - notices0,
                "reply_unacked": await probe,
            })
        await asyncio.gather(*tasks)
        first, last = windows
        c.emit({
            "bench": "reply_cost", "sessions": args.sessions, "minutes": args.minutes,
            "window_s": args.window, "windows": windows,
            "ratio_end_to_start": round(last["gateway_cpu_us_per_chunk"]
                                        / first["gateway_cpu_us_per_chunk"], 3)
            if first["gateway_cpu_us_per_chunk"] and last["gateway_cpu_us_per_chunk"] else None,
            "chunks_audio": tot.audio, "notices": tot.notices, "mismatched": tot.mismatched,
            "machine": c.machine(),
        })


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--window", type=float, default=60.0,
                    help="seconds measured at the start and at the end")
    ap.add_argument("--broker", default=c.BROKER)
    asyncio.run(main(ap.parse_args()))
