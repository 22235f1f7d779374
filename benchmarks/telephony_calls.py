"""Concurrent simulated phone calls through one gateway and one worker process.

Each call is the tests' Twilio Media Streams simulator (``tests/telephony/simulator.py``):
μ-law 8 kHz, one 20 ms ``media`` message every 20 ms on an absolute clock, for
``--duration`` seconds, against ``/v1/telephony/twilio`` of an ``audiostream gateway``
process with an ``audiostream worker`` process behind RabbitMQ (private prefix).

Latency of frame i = arrival of the i-th outbound ``media`` message - sending of the
i-th inbound one (the pipeline returns one frame per frame, in order). It includes
the gateway's real-time pacing, which is what a caller hears. Drops = frames sent
without a media frame back (each has an ``audiostream:drop:`` mark or was cut off at
hang-up). Prints one JSON object.

    .venv/bin/python benchmarks/telephony_calls.py [--calls 50] [--duration 20] \
        [--pipeline denoise]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as c
import numpy as np
from tests.telephony.simulator import MediaStreamSim


def _cpu_idle() -> tuple[int, int]:
    """(idle, total) jiffies of the whole machine: how busy it was besides us."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def call_frames(seconds: float, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    n = int(seconds * 50)
    x = rng.standard_normal(n * 160).astype(np.float32) * 0.1
    from audiostream import audio
    from audiostream.audio import AudioFormat, Encoding

    data = audio.encode(AudioFormat(Encoding.MULAW, 8000, 1), x.reshape(-1, 1))
    return [data[i : i + 160] for i in range(0, len(data), 160)]


async def one_call(url: str, key: str, pipeline: str, frames: list[bytes],
                   delay_s: float) -> dict[str, Any]:
    await asyncio.sleep(delay_s)  # ramp: calls do not all ring in the same millisecond
    sent: list[float] = []
    params = {"api_key": key, "pipeline": pipeline}
    async with MediaStreamSim(url, params=params) as sim:
        await sim.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, frame in enumerate(frames):
            wait = t0 + i * 0.02 - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the call's 20 ms clock
            sent.append(loop.time())
            await sim.send_media(frame)
        await sim.wait_until(lambda: sim.media_messages >= len(frames), within=10)
        await sim.stop()
    # Which frame each media message answers: drop marks stand in place of theirs.
    got: list[float] = []
    lat: list[float] = []
    nxt = 0
    for h in sim.heard:
        if h.kind == "mark" and h.name.startswith("audiostream:drop:"):
            seqs = h.name.split(":")[2]
            nxt = int(seqs.partition("-")[2] or seqs) + 1
        elif h.kind == "media":
            got.append(h.at)
            if nxt < len(sent):
                lat.append((h.at - sent[nxt]) * 1000)
            nxt += 1
    drop_marks = [h.name for h in sim.heard if h.kind == "mark"
                  and h.name.startswith("audiostream:drop")]
    reasons: dict[str, int] = {}
    for name in drop_marks:  # audiostream:drop:<seq or range>:<reason>
        seqs, reason = name.split(":")[2:4]
        a, _, b = seqs.partition("-")
        reasons[reason] = reasons.get(reason, 0) + (int(b) - int(a) + 1 if b else 1)
    return {"sent": len(frames), "received": len(got), "lat_ms": lat,
            "drop_marks": len(drop_marks), "reasons": reasons,
            "max_buffered_s": sim.max_buffered_s}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per call")
    ap.add_argument("--pipeline", default="denoise")
    ap.add_argument("--broker", default=c.BROKER)
    args = ap.parse_args()
    c.raise_nofile()
    processing = ["passthrough"] if args.pipeline == "passthrough" else \
        [*args.pipeline.split(","), "resample"]
    async with c.stack(processing, broker=args.broker) as st:
        url = st.ws_url.replace("/v1/stream", "/v1/telephony/twilio")
        frames = [call_frames(args.duration, i) for i in range(args.calls)]
        # One short call first: the worker loads its model on first use.
        warm = await one_call(url, st.key, args.pipeline, call_frames(2.0, 999), 0.0)
        c.log(f"warm-up call: {warm['received']}/{warm['sent']} frames back")
        assert st.worker is not None
        pids = {"gateway": st.gateway.pid, "worker": st.worker.pid, "simulator": os.getpid()}
        broker = c.find_pid("beam.smp")
        if broker is not None:
            pids["rabbitmq"] = broker
        meter = c.CpuMeter(pids)
        from audiostream.bench import scrape_all, server_view

        before = await scrape_all([st.gateway_metrics], None)
        idle0 = _cpu_idle()
        started = time.monotonic()
        with meter:
            results = await asyncio.gather(*(
                one_call(url, st.key, args.pipeline, frames[i], i * 1.0 / max(1, args.calls))
                for i in range(args.calls)))
            cpu = meter.read()
        wall = time.monotonic() - started
        idle1 = _cpu_idle()
        idle = round(100 * (idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1]), 1)
        server = server_view(before, await scrape_all([st.gateway_metrics], None))
    lat = [v for r in results for v in r["lat_ms"]]
    sent = sum(r["sent"] for r in results)
    received = sum(r["received"] for r in results)
    c.emit({
        "benchmark": "telephony_calls", "calls": args.calls, "duration_s": args.duration,
        "pipeline": args.pipeline, "frames_sent": sent, "frames_received": received,
        "dropped": sent - received, "drop_marks": sum(r["drop_marks"] for r in results),
        "drops_by_reason": {k: sum(r["reasons"].get(k, 0) for r in results)
                            for k in sorted({k for r in results for k in r["reasons"]})},
        "drop_rate": round((sent - received) / sent, 5) if sent else 0.0,
        "latency_ms": c.percentiles(lat),
        "max_peer_buffer_s": round(max(r["max_buffered_s"] for r in results), 3),
        "cpu_cores": cpu, "server": server, "wall_s": round(wall, 1), "machine": c.machine(),
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "machine_idle_pct": idle,
    })


if __name__ == "__main__":
    asyncio.run(main())
