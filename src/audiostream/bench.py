"""``audiostream bench``: N concurrent real-time sessions against a running gateway.

Each session streams deterministic synthetic audio (a tone plus seeded noise) in
real time over a lean protocol v1.1 client (not the SDK: the generator must cost
little next to what it measures); sessions start spread over a ramp. While it runs, a line
a second goes to stderr. At the end: throughput, round trip percentiles, drops and
errors, and the server's own view of the same period — counters and per-stage means
from the difference of two ``/metrics`` scrapes — as text, JSON and a PNG plot.

The server-side figures are only this run's if nothing else uses the gateway meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import numpy as np
import numpy.typing as npt
from aiohttp import WSMsgType
from prometheus_client.parser import text_string_to_metric_families

from audiostream.audio import AudioFormat, Encoding
from audiostream.client import chunk_array
from audiostream.errors import ErrorCode, ProtocolError
from audiostream.metrics import STAGES
from audiostream.protocol import (
    V1_1,
    Credit,
    ErrorMsg,
    Notice,
    Ready,
    decode_server,
    latency_summary,
    start_json,
)

STOP = '{"type":"stop"}'

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[SampleKey, float]
Reporter = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    url: str
    """WebSocket URL of the gateway's ``/v1/stream``."""
    api_key: str
    sessions: int
    duration_s: float
    """Audio per session, streamed in real time."""
    pipeline: tuple[Any, ...]
    chunk_ms: float = 20.0
    ramp_s: float = 0.0
    """Session ``i`` starts at ``i * ramp_s / sessions``."""
    sample_rate: int = 16000
    deadline_ms: int | None = None
    seed: int = 0
    metrics_urls: tuple[str, ...] = ()
    """Endpoints to scrape before and after; default: the gateway's ``/metrics``."""
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.sessions < 1:
            raise ValueError("sessions must be >= 1")
        if self.duration_s <= 0 or self.chunk_ms <= 0 or self.ramp_s < 0:
            raise ValueError("duration and chunk must be > 0, ramp >= 0")

    @property
    def format(self) -> AudioFormat:
        return AudioFormat(Encoding.PCM_S16LE, self.sample_rate, 1)

    def scrape_urls(self) -> tuple[str, ...]:
        return self.metrics_urls or (metrics_url_for(self.url),)


def metrics_url_for(ws_url: str, ops_port: int = 9090) -> str:
    """``ws[s]://host:port/v1/stream`` -> ``http://host:9090/metrics``: the gateway's
    operations site (plain HTTP, the default --ops-port) on the same host."""
    host = urlsplit(ws_url).hostname or "127.0.0.1"
    netloc = f"[{host}]:{ops_port}" if ":" in host else f"{host}:{ops_port}"
    return urlunsplit(("http", netloc, "/metrics", "", ""))


def synthetic_audio(session: int, seconds: float, rate: int, seed: int = 0) -> npt.NDArray[
    np.int16
]:
    """Deterministic speech-band test signal for one session: a tone plus seeded noise."""
    n = round(seconds * rate)
    t = np.arange(n, dtype=np.float64) / rate
    rng = np.random.default_rng([seed, session])
    tone = 0.3 * np.sin(2 * np.pi * (180.0 + 37.0 * (session % 20)) * t)
    noise = 0.05 * rng.standard_normal(n)
    return np.asarray(np.clip(tone + noise, -1, 1) * 32767, dtype=np.int16)


# --- per-session bookkeeping ------------------------------------------------------------


@dataclass
class _Session:
    index: int
    chunks: list[bytes]
    session_id: str = ""
    sent: int = 0
    sent_at: list[float] = field(default_factory=list)
    paced_from: float = 0.0
    """When chunk 0 was due: chunk ``i`` is due ``i * chunk_ms`` later."""
    start_ms: float | None = None
    """From opening the connection to ``ready``."""
    audio: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    points: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the bench started, round trip ms) per audio outcome."""
    from_due: list[float] = field(default_factory=list)
    """ms from when each audio outcome's chunk was due to when it came back."""
    drop_times: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    running: bool = False
    done: bool = False
    close_code: int | None = None


@dataclass
class _Live:
    t0: float
    sessions: list[_Session]
    window: list[float] = field(default_factory=list)
    """Round trips (ms) since the last progress line."""
    tick: float = 0.0


#: Outcomes between two acks, as the SDK does (the gateway's journal is trimmed by them).
ACK_EVERY = 25


async def _run_session(cfg: BenchConfig, s: _Session, live: _Live,
                       http: aiohttp.ClientSession) -> None:
    """One session over a lean v1.1 client: a sender paced on an absolute clock and the
    connection's reader, with as little Python per chunk as possible (a timestamp and
    a list append each way), so that on a shared machine the load generator leaves the
    CPU to what it measures. Seqs are implicit; credit is respected (a sender out of
    credit waits, and that chunk's time is counted from when it goes)."""
    delay = s.index * cfg.ramp_s / cfg.sessions
    if delay:
        await asyncio.sleep(delay)  # the ramp
    opened = time.monotonic()
    try:
        ws = await http.ws_connect(cfg.url, ssl=cfg.ssl_context if cfg.ssl_context else True,
                                   autoping=True, max_msg_size=0, compress=0)
    except (aiohttp.ClientError, OSError):
        s.errors["connection_failed"] = s.errors.get("connection_failed", 0) + 1
        s.done = True
        return
    s.running = True
    try:
        await _lean_session(cfg, s, live, ws, opened)
    finally:
        s.running = False
        s.done = True
        await ws.close()


def _count_error(s: _Session, code: ErrorCode | int) -> None:
    name = code.name.lower() if isinstance(code, ErrorCode) else str(code)
    s.errors[name] = s.errors.get(name, 0) + 1


async def _lean_session(cfg: BenchConfig, s: _Session, live: _Live,
                        ws: aiohttp.ClientWebSocketResponse, opened: float) -> None:
    await ws.send_str(start_json(cfg.api_key, cfg.format, list(cfg.pipeline),
                                 deadline_ms=cfg.deadline_ms, version=V1_1))
    first = await ws.receive()
    if first.type is not WSMsgType.TEXT:
        s.errors["closed_before_ready"] = s.errors.get("closed_before_ready", 0) + 1
        return
    ready = decode_server(first.data)
    if isinstance(ready, ErrorMsg):
        _count_error(s, ready.code)
        return
    if not isinstance(ready, Ready):
        raise ProtocolError(f"expected ready, got {type(ready).__name__}")
    s.session_id = ready.session_id
    s.start_ms = (time.monotonic() - opened) * 1000
    loop = asyncio.get_running_loop()
    credit = [ready.credit if ready.credit is not None else len(s.chunks)]
    more = asyncio.Event()
    sender = loop.create_task(_send(cfg, s, ws, credit, more))
    try:
        await _receive(s, live, ws, credit, more, cfg.chunk_ms / 1000)
    finally:
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
            await sender
    s.close_code = ws.close_code
    if ws.close_code != 1000:
        key = f"close_{ws.close_code}"
        s.errors[key] = s.errors.get(key, 0) + 1


async def _send(cfg: BenchConfig, s: _Session, ws: aiohttp.ClientWebSocketResponse,
                credit: list[int], more: asyncio.Event) -> None:
    chunk_s = cfg.chunk_ms / 1000
    clock = time.monotonic
    sent_at = s.sent_at
    start = s.paced_from = clock()
    for i, chunk in enumerate(s.chunks):
        delay = start + i * chunk_s - clock()
        if delay > 0:
            await asyncio.sleep(delay)  # real-time pacing, not synchronisation
        while i >= credit[0]:
            more.clear()
            await more.wait()
        sent_at.append(clock())
        s.sent += 1
        await ws.send_bytes(chunk)
    await ws.send_str(STOP)


async def _receive(s: _Session, live: _Live, ws: aiohttp.ClientWebSocketResponse,
                   credit: list[int], more: asyncio.Event, chunk_s: float) -> None:
    clock = time.monotonic
    t0 = live.t0
    sent_at = s.sent_at
    points = s.points
    from_due = s.from_due
    window = live.window
    received = acked = 0
    async for msg in ws:
        if msg.type is WSMsgType.BINARY:
            now = clock()
            ms = (now - sent_at[received]) * 1000
            from_due.append((now - s.paced_from - received * chunk_s) * 1000)
            received += 1
            s.audio += 1
            points.append((now - t0, ms))
            window.append(ms)
        elif msg.type is WSMsgType.TEXT:
            m = decode_server(msg.data)
            if isinstance(m, Credit):
                credit[0] = max(credit[0], m.credit)
                more.set()
                continue
            if isinstance(m, Notice):
                s.dropped[m.reason] = s.dropped.get(m.reason, 0) + m.count
                s.drop_times.extend([clock() - t0] * m.count)
                received += m.count
            elif isinstance(m, ErrorMsg):
                _count_error(s, m.code)
            continue
        else:
            break
        if received - acked >= ACK_EVERY:
            acked = received
            await ws.send_str(f'{{"type":"ack","received":{received}}}')


def _progress_line(live: _Live, total_chunks: int, out: Reporter) -> None:
    ss = live.sessions
    window, live.window = live.window, []
    now = time.monotonic()
    window_s, live.tick = now - (live.tick or live.t0), now
    lat = latency_summary(window)
    out(
        f"[bench {now - live.t0:6.1f}s] sessions "
        f"{sum(s.running for s in ss)} running, {sum(s.done for s in ss)} done | "
        f"sent {sum(s.sent for s in ss)}/{total_chunks} "
        f"audio {sum(s.audio for s in ss)} "
        f"dropped {sum(sum(s.dropped.values()) for s in ss)} "
        f"errors {sum(sum(s.errors.values()) for s in ss)} | last {window_s:.1f}s: "
        f"n={len(window)} p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} ms"
    )


async def _report_progress(live: _Live, total_chunks: int, out: Reporter, every: float) -> None:
    while True:
        await asyncio.sleep(every)  # a progress line every `every` seconds
        _progress_line(live, total_chunks, out)


# --- /metrics ------------------------------------------------------------------------------


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = samples.get(key, 0.0) + float(sample.value)
    return samples


async def scrape(http: aiohttp.ClientSession, url: str,
                 ssl_context: ssl.SSLContext | None) -> Samples:
    async with http.get(url, ssl=ssl_context if ssl_context is not None else True) as resp:
        resp.raise_for_status()
        return parse_metrics(await resp.text())


async def scrape_all(urls: Sequence[str], ssl_context: ssl.SSLContext | None) -> Samples:
    """Every endpoint's samples, added up (gateway and worker families do not overlap
    except ``audiostream_queue_depth``, which is not used in deltas)."""
    total: Samples = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for url in urls:
            for k, v in (await scrape(http, url, ssl_context)).items():
                total[k] = total.get(k, 0.0) + v
    return total


def _delta_by(before: Samples, after: Samples, name: str, label: str | None = None,
              where: Mapping[str, str] | None = None) -> dict[str, float]:
    """Counter/histogram-part increase of ``name`` over the run, grouped by ``label``."""
    out: dict[str, float] = {}
    for (n, labels), value in after.items():
        if n != name:
            continue
        lab = dict(labels)
        if where and any(lab.get(k) != v for k, v in where.items()):
            continue
        d = value - before.get((n, labels), 0.0)
        key = lab.get(label, "") if label else ""
        out[key] = out.get(key, 0.0) + d
    return out


def _total(before: Samples, after: Samples, name: str, **where: str) -> float:
    return sum(_delta_by(before, after, name, where=where).values())


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` on cumulative bucket counts (le -> count)."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    rank = q * buckets[edges[-1]]
    lower, below = 0.0, 0.0
    for le in edges:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _histogram(before: Samples, after: Samples, name: str,
               **where: str) -> dict[str, float | None]:
    count = _total(before, after, f"{name}_count", **where)
    total = _total(before, after, f"{name}_sum", **where)
    buckets: dict[float, float] = {}
    for le, d in _delta_by(before, after, f"{name}_bucket", "le", where).items():
        buckets[float(le)] = buckets.get(float(le), 0.0) + d
    p99 = histogram_quantile(0.99, buckets)
    return {
        "count": count,
        "mean_ms": round(total / count * 1000, 3) if count else None,
        "p99_ms_est": round(p99 * 1000, 3) if p99 is not None and count else None,
    }


def server_view(before: Samples, after: Samples) -> dict[str, Any]:
    """What the server counted between the two scrapes."""
    t = _total
    stages = {s: _histogram(before, after, "audiostream_stage_seconds", stage=s)
              for s in STAGES}
    workers: dict[str, Any] = {}
    for processing in _delta_by(before, after, "audiostream_worker_batch_size_count",
                                "processing"):
        batches = t(before, after, "audiostream_worker_batch_size_count",
                    processing=processing)
        items = t(before, after, "audiostream_worker_batch_size_sum", processing=processing)
        deliveries = t(before, after, "audiostream_worker_bundle_size_count",
                       processing=processing)
        carried = t(before, after, "audiostream_worker_bundle_size_sum", processing=processing)
        workers[processing] = {
            "batches": batches,
            "mean_batch_size": round(items / batches, 3) if batches else None,
            "deliveries": deliveries,
            "mean_bundle_size": round(carried / deliveries, 3) if deliveries else None,
            "inference": _histogram(before, after, "audiostream_worker_inference_seconds",
                                    processing=processing),
            "messages_by_status": _delta_by(
                before, after, "audiostream_worker_messages_total", "status",
                {"processing": processing}),
        }
    messages = t(before, after, "audiostream_gateway_messages_published_total")
    bundles = t(before, after, "audiostream_gateway_bundles_published_total")
    chunks_in = t(before, after, "audiostream_chunks_in_total")
    return {
        "chunks_in": chunks_in,
        "chunks_out": t(before, after, "audiostream_chunks_out_total"),
        "bytes_in": t(before, after, "audiostream_bytes_in_total"),
        "bytes_out": t(before, after, "audiostream_bytes_out_total"),
        "dropped_by_reason": {k: v for k, v in _delta_by(
            before, after, "audiostream_chunks_dropped_total", "reason").items() if v},
        "errors_by_code": {k: v for k, v in _delta_by(
            before, after, "audiostream_gateway_errors_total", "code").items() if v},
        "messages_published": messages,
        "chunks_per_message": round(chunks_in / messages, 3) if messages else None,
        "bundles_published": bundles,
        "messages_per_bundle": round(messages / bundles, 3) if bundles else None,
        "round_trip": _histogram(before, after, "audiostream_round_trip_seconds"),
        "stages": stages,
        "workers": workers,
    }


# --- the run ---------------------------------------------------------------------------------


async def run_bench(cfg: BenchConfig, *, report: Reporter | None = None,
                    progress_every_s: float = 1.0) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able report (see ``docs/benchmarks.md``)."""
    fmt = cfg.format
    sessions = [
        _Session(i, chunk_array(synthetic_audio(i, cfg.duration_s, cfg.sample_rate, cfg.seed),
                                fmt, cfg.chunk_ms))
        for i in range(cfg.sessions)
    ]
    server_error: str | None = None
    before: Samples | None = None
    try:
        before = await scrape_all(cfg.scrape_urls(), cfg.ssl_context)
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        server_error = f"could not scrape before: {exc!r}"
    # Everything that exists now (modules, the sessions' audio and their growing lists)
    # leaves the collector's reach while streaming: a full collection of this process's
    # ~50,000 objects and 60 sessions' lists took 20-100 ms here, every session's chunks
    # waited behind it at once, and that stall was measured as the system's p99.
    # A caller's own freeze is left as it was (``unfreeze`` cannot tell ours from theirs).
    ours = gc.get_freeze_count() == 0
    gc.collect()
    gc.freeze()
    try:
        return await _stream(cfg, sessions, report, progress_every_s, server_error, before)
    finally:
        if ours:
            gc.unfreeze()


async def _stream(cfg: BenchConfig, sessions: list[_Session], report: Reporter | None,
                  progress_every_s: float, server_error: str | None,
                  before: Samples | None) -> dict[str, Any]:
    total_chunks = sum(len(s.chunks) for s in sessions)
    live = _Live(time.monotonic(), sessions)
    ticker = None
    if report is not None:
        ticker = asyncio.get_running_loop().create_task(
            _report_progress(live, total_chunks, report, progress_every_s))
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.gather(*(_run_session(cfg, s, live, http) for s in sessions))
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    if report is not None:
        _progress_line(live, total_chunks, report)
    wall = time.monotonic() - started
    server: dict[str, Any] | None = None
    if before is not None:
        try:
            after = await scrape_all(cfg.scrape_urls(), cfg.ssl_context)
            server = server_view(before, after)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            server_error = f"could not scrape after: {exc!r}"
    return _assemble(cfg, sessions, wall, server, server_error)


def _summary(values_ms: list[float]) -> dict[str, float]:
    return {**latency_summary(values_ms), "count": len(values_ms)}


def _assemble(cfg: BenchConfig, sessions: list[_Session], wall: float,
              server: dict[str, Any] | None, server_error: str | None) -> dict[str, Any]:
    latencies = [ms for s in sessions for _, ms in s.points]
    drops: dict[str, int] = {}
    errors: dict[str, int] = {}
    for s in sessions:
        for k, v in s.dropped.items():
            drops[k] = drops.get(k, 0) + v
        for k, v in s.errors.items():
            errors[k] = errors.get(k, 0) + v
    sent = sum(s.sent for s in sessions)
    audio = sum(s.audio for s in sessions)
    dropped = sum(drops.values())
    chunk_s = cfg.chunk_ms / 1000
    lags = [(t - s.paced_from - i * chunk_s) * 1000
            for s in sessions for i, t in enumerate(s.sent_at)]
    config = {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "ssl_context")}
    config["pipeline"] = list(cfg.pipeline)
    config["metrics_urls"] = list(cfg.scrape_urls())
    out: dict[str, Any] = {
        "config": config,
        "wall_s": round(wall, 3),
        "sessions": {
            "requested": cfg.sessions,
            "completed": sum(1 for s in sessions if s.close_code == 1000),
            "failed": sum(1 for s in sessions if s.close_code != 1000),
        },
        "chunks": {"sent": sent, "outcomes": audio + dropped, "audio": audio,
                   "dropped": dropped},
        "throughput": {
            "outcomes_per_s": round((audio + dropped) / wall, 2) if wall else 0.0,
            "audio_seconds_per_s": round(audio * cfg.chunk_ms / 1000 / wall, 3)
            if wall else 0.0,
        },
        "round_trip_ms": {**_summary(latencies), "mean": round(float(np.mean(latencies)), 3)
                          if latencies else 0.0},
        "round_trip_from_due_ms": _summary([ms for s in sessions for ms in s.from_due]),
        "send_lag_ms": _summary(lags),
        "start_ms": _summary([s.start_ms for s in sessions if s.start_ms is not None]),
        "drops_by_reason": drops,
        "errors_by_code": errors,
        "server": server,
        "server_error": server_error,
        "timeline": {
            "audio": [[round(t, 4), round(ms, 3)] for s in sessions for t, ms in s.points],
            "drops": [round(t, 4) for s in sessions for t in s.drop_times],
        },
    }
    if server is not None:
        out["consistent"] = (
            server["chunks_in"] == sent
            and server["chunks_out"] + sum(server["dropped_by_reason"].values())
            == audio + dropped
        )
    return out


# --- presentation -----------------------------------------------------------------------------


def _percentiles(what: str, q: Mapping[str, float]) -> str:
    return (f"{what} ms: p50 {q['p50']:.2f}  p99 {q['p99']:.2f}  max {q['max']:.2f}"
            if q.get("count") else f"{what}: none")


def summary_text(r: Mapping[str, Any]) -> str:
    c, rt = r["chunks"], r["round_trip_ms"]
    cfg = r["config"]
    lines = [
        f"audiostream bench: {cfg['sessions']} sessions x {cfg['duration_s']:g} s of "
        f"{cfg['chunk_ms']:g} ms chunks through {'+'.join(map(str, cfg['pipeline']))} "
        f"(ramp {cfg['ramp_s']:g} s); wall {r['wall_s']:.1f} s; sessions completed "
        f"{r['sessions']['completed']}/{r['sessions']['requested']}",
        f"chunks: {c['sent']} sent, {c['outcomes']} outcomes ({c['audio']} audio, "
        f"{c['dropped']} dropped); throughput {r['throughput']['outcomes_per_s']:.0f} "
        f"chunks/s = {r['throughput']['audio_seconds_per_s']:.2f} s of audio per s",
        f"round trip ms: p50 {rt['p50']:.2f}  p90 {rt['p90']:.2f}  p99 {rt['p99']:.2f}  "
        f"max {rt['max']:.2f}  mean {rt['mean']:.2f}  (n={rt['count']})",
        _percentiles("from when each chunk was due", r["round_trip_from_due_ms"]),
        _percentiles("send lag (behind the real-time clock)", r["send_lag_ms"]),
        _percentiles("session start (connect to ready)", r["start_ms"]),
        "drops by reason: " + (", ".join(f"{k} {v}" for k, v in r["drops_by_reason"].items())
                               or "none"),
        "errors by code: " + (", ".join(f"{k} {v}" for k, v in r["errors_by_code"].items())
                              or "none"),
    ]
    srv = r.get("server")
    if srv is None:
        lines.append(f"server: not available ({r.get('server_error')})")
    else:
        lines.append(
            f"server (/metrics deltas): chunks_in {srv['chunks_in']:.0f}, chunks_out "
            f"{srv['chunks_out']:.0f}, dropped {sum(srv['dropped_by_reason'].values()):.0f}, "
            f"messages {srv['messages_published']:.0f} "
            f"({srv['chunks_per_message'] or 0:.2f} chunks/message) in "
            f"{srv['bundles_published']:.0f} broker messages "
            f"({srv['messages_per_bundle'] or 0:.2f} messages/bundle); "
            f"consistent with the client: {'yes' if r.get('consistent') else 'NO'}"
        )
        parts = [f"{name} {v['mean_ms']:.2f}" for name, v in srv["stages"].items()
                 if v["mean_ms"] is not None]
        lines.append("stage means ms (per message): " + (" | ".join(parts) or "none"))
        rtm = srv["round_trip"]["mean_ms"]
        if rtm is not None:
            lines.append(f"server round trip mean {rtm:.2f} ms (receive -> written)")
        for name, w in srv["workers"].items():
            inf = w["inference"]["mean_ms"]
            lines.append(f"worker {name}: {w['batches']:.0f} batches, mean size "
                         f"{w['mean_batch_size']}, mean call {inf} ms")
    return "\n".join(lines)


def plot(r: Mapping[str, Any], out: Path) -> None:
    """Round trip per chunk over time, per-second p50/p99, and the distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = np.asarray(r["timeline"]["audio"], dtype=np.float64).reshape(-1, 2)
    drops = np.asarray(r["timeline"]["drops"], dtype=np.float64)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), height_ratios=(2, 1))
    cfg = r["config"]
    fig.suptitle(f"audiostream bench: {cfg['sessions']} sessions, "
                 f"{'+'.join(map(str, cfg['pipeline']))}, {cfg['chunk_ms']:g} ms chunks")
    if len(pts):
        ax1.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.3, label="chunk round trip")
        secs = np.floor(pts[:, 0]).astype(int)
        xs, p50s, p99s = [], [], []
        for sec in np.unique(secs):
            vals = pts[secs == sec, 1]
            xs.append(sec + 0.5)
            p50s.append(np.percentile(vals, 50))
            p99s.append(np.percentile(vals, 99))
        ax1.plot(xs, p50s, color="tab:green", label="p50 per second")
        ax1.plot(xs, p99s, color="tab:red", label="p99 per second")
        ax2.hist(pts[:, 1], bins=100, color="tab:blue")
    if len(drops):
        ymax = float(pts[:, 1].max()) if len(pts) else 1.0
        ax1.scatter(drops, np.full(len(drops), ymax), marker="x", color="black",
                    label=f"dropped ({len(drops)})")
    ax1.set_xlabel("seconds since start")
    ax1.set_ylabel("round trip (ms)")
    ax1.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax1.yaxis.set_major_formatter(ScalarFormatter())
    ax1.legend(loc="upper left", fontsize="small")
    rt = r["round_trip_ms"]
    ax2.set_xlabel(f"round trip (ms): p50 {rt['p50']:.1f}, p99 {rt['p99']:.1f}, "
                   f"max {rt['max']:.1f}")
    ax2.set_ylabel("chunks")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def without_timeline(r: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "timeline"}


# --- command line -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="ws:// or wss:// URL of /v1/stream")
    p.add_argument("--api-key", default=os.environ.get("AUDIOSTREAM_API_KEY"),
                   help="API key (env AUDIOSTREAM_API_KEY)")
    p.add_argument("--sessions", type=int, required=True, help="concurrent sessions")
    p.add_argument("--duration", type=float, required=True,
                   help="seconds of audio each session streams in real time")
    p.add_argument("--pipeline", required=True, help="steps, e.g. passthrough or denoise")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="chunk duration (default 20)")
    p.add_argument("--ramp", type=float, default=0.0,
                   help="start the sessions spread over this many seconds (default 0)")
    p.add_argument("--deadline-ms", type=int, default=None,
                   help="per-chunk deadline asked of the gateway (default: its own)")
    p.add_argument("--sample-rate", type=int, default=16000,
                   help="sample rate of each session's synthetic audio (default 16000)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic audio's noise (default 0)")
    p.add_argument("--metrics-url", action="append", default=[], metavar="URL",
                   help="/metrics to diff (repeatable; default the gateway's own); add "
                   "workers' --metrics-port URLs for batch and inference figures")
    p.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="write the report as JSON ('-' for stdout)")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                   help="write a latency plot (PNG; needs the [plot] extra: matplotlib)")
    p.add_argument("--ca", type=Path, default=None, help="CA bundle to trust for wss://")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    ctx = None
    if args.url.startswith("wss://"):
        ctx = ssl.create_default_context(cafile=str(args.ca) if args.ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return BenchConfig(
        url=args.url,
        api_key=args.api_key,
        sessions=args.sessions,
        duration_s=args.duration,
        pipeline=tuple(p.strip() for p in args.pipeline.split(",") if p.strip()),
        chunk_ms=args.chunk_ms,
        ramp_s=args.ramp,
        sample_rate=args.sample_rate,
        deadline_ms=args.deadline_ms,
        seed=args.seed,
        metrics_urls=tuple(args.metrics_url),
        ssl_context=ctx,
    )


async def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)

    def to_stderr(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = await run_bench(cfg, report=None if args.quiet else to_stderr)
    if args.plot is not None:
        await asyncio.to_thread(plot, result, args.plot)
    text = json.dumps(without_timeline(result), indent=2)
    if args.json is not None and str(args.json) == "-":
        print(text)
    else:
        if args.json is not None:
            await asyncio.to_thread(args.json.write_text, text + "\n")
        print(summary_text(result))
    failed = result["sessions"]["failed"]
    return 1 if failed == cfg.sessions else 0
