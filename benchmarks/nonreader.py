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
* the victims' p50/p99 round trip before and while the non-reader was connected;
* where the victims' slow chunks are: a timeline of the victims' round trips per
  second from the non-reader's first chunk (with the non-reader's chunks sent in that
  second), the slowest victim chunks, and, from the gateway's ``/metrics``, how many
  work messages took more than 20 / 50 ms in each stage (``audiostream_stage_seconds``,
  all sessions) and in the gateway's own round trip, before and during; per second, the
  cores the gateway, the worker, RabbitMQ, the benchmark's processes and the whole
  machine used.

For an A/B, ``--gateway-args "..."`` passes options to the gateway (e.g.
``--gateway-args "--max-message-kib 2048"``, the cap before #12); ``--victims-process``
runs the victims in a process of their own, so their timing does not share an event
loop with the non-reader's 384,000 B sends; ``--trace`` says where the victims' work
messages spent their time (``victim_trace_ms``; the gateway's log is kept, ``trace_log``).
Run the variants alternately.

Prints JSON.

    .venv/bin/python benchmarks/nonreader.py [--victims 5] [--baseline-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
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
VICTIM_CHUNK_BYTES = 320 * 2  # a victim's 20 ms of 16 kHz mono 16-bit audio


@dataclass
class Victims:
    latencies: list[tuple[float, float]] = field(default_factory=list)
    """(time sent, round trip s) per audio outcome."""
    notices: int = 0
    closes: list[int | None] = field(default_factory=list)


async def victim(url: str, key: str, i: int, stop: asyncio.Event, out: Victims) -> None:
    rng = np.random.default_rng(i)
    frames = [(rng.standard_normal(VICTIM_CHUNK_BYTES // 2) * 3000).astype(np.int16).tobytes()
              for _ in range(50)]
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
    for key, name in (("floor", "coalesce_floor"), ("lag", "loop_lag_seconds")):
        m = re.search(r'^audiostream_gateway_' + name + r' (\S+)', text, re.M)
        out[key] = float(m.group(1)) if m else 0.0
    return out


#: Bucket bounds (s) above which a message counts as slow in ``stage_counts``.
SLOW = ("0.02", "0.05")


async def stage_counts(http: aiohttp.ClientSession, metrics_url: str) -> dict[str, list[float]]:
    """Per stage (and ``round_trip``): [messages, over 20 ms, over 50 ms] so far."""
    async with http.get(metrics_url) as r:
        text = await r.text()
    out: dict[str, list[float]] = {}
    pattern = (r'^audiostream_(?:stage_seconds_bucket\{le="([^"]+)",stage="([^"]+)"\}'
               r'|round_trip_seconds_bucket\{le="([^"]+)"\}) (\S+)')
    for m in re.finditer(pattern, text, re.M):
        le, stage = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), "round_trip")
        row = out.setdefault(stage, [0.0, 0.0, 0.0])
        n = float(m.group(4))
        if le == "+Inf":
            row[0] = n
        elif le in SLOW:
            row[1 + SLOW.index(le)] = -n  # cumulative at or below; made "over" below
    for row in out.values():
        row[1] += row[0]
        row[2] += row[0]
    return out


def stage_delta(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, Any]:
    return {k: {"messages": int(v[0] - a.get(k, [0, 0, 0])[0]),
                "over_20ms": int(v[1] - a.get(k, [0, 0, 0])[1]),
                "over_50ms": int(v[2] - a.get(k, [0, 0, 0])[2])}
            for k, v in b.items()}


def machine_busy() -> float:
    """CPU seconds all cores spent not idle so far (``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / c.CLK_TCK  # minus idle and iowait


def cpu_sample(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process in ``pids``, and of the whole machine."""
    out = {"machine": machine_busy()}
    for name, pid in pids.items():
        out[name] = c.CpuMeter._cpu(pid)
    return out


def timeline(lat: list[tuple[float, float]], sends: list[float], t0: float, t1: float,
             gauges: list[tuple[float, float, float]],
             cpu: list[tuple[float, dict[str, float]]]) -> list[dict[str, Any]]:
    """Per second from ``t0`` to ``t1``: victims' chunks, p50, max, over 20 ms; sends;
    the gateway's highest coalescing floor and loop lag sampled in that second; the
    cores each process (and the whole machine) used in that second."""
    rows = []
    for i in range(int(t1 - t0) + 1):
        lo, hi = t0 + i, t0 + i + 1
        rts = [rt for at, rt in lat if lo <= at < hi]
        rows.append({"s": i, "chunks": len(rts), "p50": pct(rts, 0.5),
                     "max": round(1000 * max(rts), 1) if rts else None,
                     "over_20ms": sum(rt > 0.02 for rt in rts),
                     "nonreader_sent": sum(lo <= t < hi for t in sends),
                     "gateway_floor": max((f for t, f, _ in gauges if lo <= t < hi),
                                          default=None),
                     "gateway_lag_ms": max((round(1000 * g, 1) for t, _, g in gauges
                                            if lo <= t < hi), default=None),
                     "cores": cores(cpu, lo, hi)})
    return rows


def cores(cpu: list[tuple[float, dict[str, float]]], lo: float, hi: float
          ) -> dict[str, float] | None:
    """Cores used between the samples nearest ``lo`` and ``hi``."""
    inside = [(t, s) for t, s in cpu if lo <= t <= hi + 0.05]
    if len(inside) < 2:
        return None
    (ta, a), (tb, b) = inside[0], inside[-1]
    return {k: round((b[k] - a[k]) / (tb - ta), 2) for k in a} if tb > ta else None


TRACE = re.compile(r"stage=trace: bytes=(\d+) at=(\S+) marks=(\S*)")


def trace_stages(log_file: Path, t0: float, t1: float, small: int) -> dict[str, Any]:
    """The victims' work messages (at most ``small`` bytes) from the gateway's trace
    lines: the ms between consecutive timing marks (and from the last one to the
    gateway's handling of the reply), averaged, for the messages received before
    ``t0``, between ``t0`` and ``t1`` (wall clock), and for those slower than 20 ms."""
    rows: list[tuple[float, list[tuple[str, float]]]] = []
    for line in log_file.read_text(errors="replace").splitlines():
        m = TRACE.search(line)
        if not m or int(m.group(1)) > small:
            continue
        marks = [(k.split(":")[-1], float(v)) for k, v in
                 (kv.split("=") for kv in m.group(3).split(","))]
        marks.append(("gateway_reply", float(m.group(2))))
        rows.append((marks[0][1], marks))

    def summary(sel: list[list[tuple[str, float]]]) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": len(sel)}
        if not sel:
            return out
        segs: dict[str, list[float]] = {}
        for marks in sel:
            for (a, ta), (b, tb) in itertools.pairwise(marks):
                segs.setdefault(f"{a}->{b}", []).append(1000 * (tb - ta))
            segs.setdefault("total", []).append(1000 * (marks[-1][1] - marks[0][1]))
        out.update({k: {"mean": round(sum(v) / len(v), 1), "p90": pct_ms(v, 0.9),
                        "max": round(max(v), 1)} for k, v in segs.items()})
        return out

    return {
        "before": summary([mk for at, mk in rows if at < t0]),
        "during": summary([mk for at, mk in rows if t0 <= at <= t1]),
        "during_slow": summary([mk for at, mk in rows if t0 <= at <= t1
                                and mk[-1][1] - mk[0][1] > 0.02]),
    }


def held_after_burst(log_file: Path, small: int, chunk: int) -> dict[str, Any] | None:
    """How long the victims' coalescing lasts once the non-reader's first burst of big
    messages has passed (their replies no longer arrive for 2 s): the victims' messages
    of more than one ``chunk`` bytes in the 3 s after its last big reply."""
    rows = sorted((float(m.group(2)), int(m.group(1))) for m in map(
        TRACE.search, log_file.read_text(errors="replace").splitlines()) if m)
    big = [at for at, n in rows if n > small]
    if not big:
        return None
    end = big[0]
    for at in big:
        if at - end > 2.0:
            break
        end = at
    after = [(at - end, n) for at, n in rows if n <= small and end < at <= end + 3.0]
    held = [(s, n) for s, n in after if n > chunk]
    return {"burst_s": round(end - big[0], 2), "victim_messages": len(after),
            "held_messages": len(held), "held_chunks": sum(n // chunk for _, n in held),
            "last_held_s": round(max((s for s, _ in held), default=0.0), 2)}


def pct_ms(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(1000 * s[min(len(s) - 1, int(q * len(s)))], 1)


async def victims_child(url: str, key: str, n: int) -> None:
    """``--victims-child``: stream until a line on stdin, then print the latencies."""
    stop, out = asyncio.Event(), Victims()
    tasks = [asyncio.ensure_future(victim(url, key, i, stop, out)) for i in range(n)]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    await asyncio.gather(*tasks)
    # time.monotonic() is CLOCK_MONOTONIC: the parent's clock too.
    print(json.dumps({"latencies": out.latencies, "notices": out.notices,
                      "closes": out.closes}), flush=True)


class VictimProcess:
    """The victims in a process of their own (``--victims-process``)."""

    def __init__(self, url: str, key: str, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--victims-child", url, key, str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def finish(self, out: Victims) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        line = await asyncio.get_running_loop().run_in_executor(None,
                                                                self.proc.stdout.readline)
        self.proc.wait()
        got = json.loads(line)
        out.latencies = [(at, rt) for at, rt in got["latencies"]]
        out.notices, out.closes = got["notices"], got["closes"]


async def main(args: argparse.Namespace) -> None:
    gateway_args = shlex.split(args.gateway_args)
    trace_dir = None
    if args.trace:
        trace_dir = tempfile.mkdtemp(prefix="nonreader-")
        os.environ["BENCH_LOG_DIR"] = trace_dir  # the gateway's stderr, read below
        gateway_args += ["--log-level", "debug"]
    block = np.random.default_rng(3).standard_normal(BIG_BYTES // 4).astype(np.float32)
    big = block.tobytes()
    async with c.stack(["passthrough"], broker=args.broker,
                       gateway_args=gateway_args) as st, \
            aiohttp.ClientSession() as http:
        pid = st.gateway.pid
        stop, vict = asyncio.Event(), Victims()
        child = VictimProcess(st.ws_url, st.key, args.victims) if args.victims_process \
            else None
        victims = [] if child else [
            asyncio.ensure_future(victim(st.ws_url, st.key, i, stop, vict))
            for i in range(args.victims)]
        stages0 = await stage_counts(http, st.gateway_metrics)
        await asyncio.sleep(args.baseline_s)  # the victims' baseline window
        rss_before = c.rss_bytes(pid)
        ws = await http.ws_connect(st.ws_url)
        await ws.send_str(json.dumps({"type": "start", "version": 1, "api_key": st.key,
                                      "format": BIG, "pipeline": ["passthrough"],
                                      "options": {"deadline_ms": 30_000}}))
        ready = json.loads((await ws.receive(timeout=30)).data)
        assert ready["type"] == "ready", ready
        counts0 = await gateway_counts(http, st.gateway_metrics)
        stages1 = await stage_counts(http, st.gateway_metrics)
        sent, sends = 0, []

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
                sends.append(time.monotonic())

        t_start, wall_start = time.monotonic(), time.time()
        pusher = asyncio.ensure_future(push())
        peak, closed_after, closed_with = rss_before, None, None
        counts = counts0
        gauges: list[tuple[float, float, float]] = []
        pids = {"gateway": pid, "client": os.getpid()}
        if st.worker is not None:
            pids["worker"] = st.worker.pid
        if child is not None:
            pids["victims"] = child.proc.pid
        beam = c.find_pid("beam.smp")
        if beam is not None:
            pids["rabbitmq"] = beam
        cpu = [(time.monotonic(), cpu_sample(pids))]
        while time.monotonic() - t_start < args.max_s:
            peak = max(peak, c.rss_bytes(pid))
            counts = await gateway_counts(http, st.gateway_metrics)
            gauges.append((time.monotonic(), counts["floor"], counts["lag"]))
            cpu.append((time.monotonic(), cpu_sample(pids)))
            grew = [k for k in CLOSING if counts[k] > counts0[k]]
            if grew:
                closed_after, closed_with = time.monotonic() - t_start, grew[0]
                break
            await asyncio.sleep(0.1)  # sampling period
        pusher.cancel()
        await asyncio.gather(pusher, return_exceptions=True)
        t_closed, wall_closed = time.monotonic(), time.time()
        stages2 = await stage_counts(http, st.gateway_metrics)
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
        if child is not None:
            await child.finish(vict)
        base = [rt for at, rt in vict.latencies if at < t_start]
        during = [rt for at, rt in vict.latencies if t_start <= at <= t_closed]
        after = [rt for at, rt in vict.latencies if at > t_closed]
        trace = held = None
        if trace_dir is not None:
            trace = trace_stages(Path(trace_dir) / "gateway.log", wall_start, wall_closed,
                                 small=BIG_BYTES - 1)
            held = held_after_burst(Path(trace_dir) / "gateway.log", BIG_BYTES - 1,
                                    chunk=VICTIM_CHUNK_BYTES)
        slowest = sorted(((rt, at) for at, rt in vict.latencies
                          if t_start <= at <= t_closed), reverse=True)[:15]
        c.emit({
            "bench": "nonreader", "gateway_args": args.gateway_args,
            "victims_process": args.victims_process,
            "chunk_bytes": BIG_BYTES, "format": BIG,
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
            "stages_before": stage_delta(stages0, stages1),
            "stages_during": stage_delta(stages1, stages2),
            "victim_timeline": timeline(vict.latencies, sends, t_start, t_closed, gauges, cpu),
            "victim_trace_ms": trace,
            "victim_held_after_burst": held,
            "trace_log": str(Path(trace_dir) / "gateway.log") if trace_dir else None,
            "victim_slowest": [{"s": round(at - t_start, 2), "ms": round(1000 * rt, 1)}
                               for rt, at in slowest],
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
    ap.add_argument("--gateway-args", default="",
                    help="options passed to the gateway, one string (an A/B variant)")
    ap.add_argument("--victims-process", action="store_true",
                    help="run the victims in a process of their own")
    ap.add_argument("--trace", action="store_true",
                    help="log the gateway at debug level and report where the victims' "
                    "work messages spent their time (from its per-message trace lines)")
    ap.add_argument("--victims-child", nargs=3, metavar=("URL", "KEY", "N"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.victims_child:
        asyncio.run(victims_child(a.victims_child[0], a.victims_child[1],
                                  int(a.victims_child[2])))
    else:
        asyncio.run(main(a))
