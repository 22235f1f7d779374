"""Capacity sweep: the most real-time sessions this machine holds with p99 < 100 ms and no drops.

Everything co-located: RabbitMQ, one ``audiostream gateway`` process, one
``audiostream worker`` process and this load generator (which costs CPU too).
For each processing type (``passthrough``, and ``denoise`` when it is registered)
the number of sessions grows by ``--step`` until a trial fails, then is bisected
down to ``--resolution``. One JSON object per trial and one per processing type.

    .venv/bin/python benchmarks/capacity.py [--types passthrough,denoise] [--duration 10]

``--gateway-args "..."`` passes options to the gateway. Repeat it for an A/B in one
run: each variant gets its own gateway and worker (all started together, the idle
ones cost next to nothing), and at every level from ``--start`` to ``--max`` by
``--step`` the variants take turns, ``--rounds`` times, so background load hits
them alike; e.g. ``--gateway-args "" --gateway-args "--coalesce-above 0"`` for the
load budget on/off. ``--worker-args "..."`` does the same for the worker (repeat one of
the two, not both), e.g. ``--worker-args "" --worker-args "--denoise-state fp16"``.
``--every-level`` does the same for one variant: the curve rather than the limit.

Besides latency and CPU, each trial reports why a process might be late: per process
``runqueue_wait_ms_per_s`` (its threads' time runnable but without a CPU, from
``/proc/PID/task/*/schedstat``; 1000 = one thread always waiting) and
``involuntary_switches_per_s``; the gateway's event-loop lag as its own gauge reports
it, scraped every 0.25 s (``gateway_loop_lag_ms``), and its garbage collections per
generation (``gateway_gc_collections``); and this load generator's own loop lag
(``client_loop_lag_ms``). ``--nice-server N`` runs the gateway and the worker at
niceness N: an experiment on that wait (docs/benchmarks.md, Capacity), not a setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

P99_LIMIT_MS = 100.0
LAG = "audiostream_gateway_loop_lag_seconds"
GC = "python_gc_collections_total"
PROBE_S = 0.25  # the gateway samples its loop lag every 0.25 s (budget_sample_s)


@dataclass(frozen=True)
class Variant:
    """The options one stack's gateway and worker run with."""

    gateway: str = ""
    worker: str = ""

    @property
    def label(self) -> str:
        return self.gateway if not self.worker else f"{self.gateway} | worker: {self.worker}"

    def json(self) -> dict[str, str]:
        return {"gateway_args": self.gateway, "worker_args": self.worker}

    def stack(self, ptype: str, args: argparse.Namespace) -> Any:
        return c.stack([ptype], broker=args.broker, nice=args.nice_server,
                       gateway_args=shlex.split(self.gateway),
                       worker_args=shlex.split(self.worker))


async def scrape_gateway(url: str, into: list[dict[Any, float]]) -> None:
    """Scrape the gateway's /metrics every PROBE_S until cancelled: its loop-lag gauge
    holds only the latest sample, so a trial's distribution needs the series."""
    import aiohttp

    from audiostream.bench import scrape

    # Only the two families used here: the whole exposition, four times a second, cost
    # the gateway (the busiest process) about 3 % of its samples and this client 15 %.
    url = f"{url}?name[]={LAG}&name[]={GC}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                into.append(await scrape(http, url, None))
            await asyncio.sleep(PROBE_S)


async def client_lag(into: list[float]) -> None:
    """How late this load generator's own loop wakes from a PROBE_S sleep, in ms: a late
    client inflates the round trips it times."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + PROBE_S
        await asyncio.sleep(PROBE_S)
        into.append((loop.time() - due) * 1000)


def lag_summary(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {}
    ms = sorted(ms)
    return {"samples": len(ms), "p50": round(ms[len(ms) // 2], 1),
            "p90": round(ms[int(len(ms) * 0.9)], 1), "max": round(ms[-1], 1),
            "over_25ms": sum(v > 25 for v in ms)}


def gateway_view(scrapes: list[dict[Any, float]]) -> dict[str, Any]:
    """Loop-lag samples (ms) and garbage collections per generation over the trial."""
    lags = [v * 1000 for sc in scrapes for (n, _), v in sc.items() if n == LAG]
    gc_runs: dict[str, int] = {}
    if len(scrapes) >= 2:
        for (name, labels), v in scrapes[-1].items():
            if name == GC:
                gen = dict(labels).get("generation", "?")
                gc_runs[gen] = int(v - scrapes[0].get((name, labels), 0.0))
    return {"gateway_loop_lag_ms": lag_summary(lags), "gateway_gc_collections": gc_runs}


async def trial(st: c.Stack, ptype: str, sessions: int, duration: float,
                pids: dict[str, int], variant: Variant) -> dict[str, Any]:
    from audiostream.bench import BenchConfig, run_bench

    cfg = BenchConfig(url=st.ws_url, api_key=st.key, sessions=sessions, duration_s=duration,
                      pipeline=(ptype,), ramp_s=min(3.0, 0.05 * sessions),
                      metrics_urls=tuple(u for u in (st.gateway_metrics, st.worker_metrics)
                                         if u))
    scrapes: list[dict[Any, float]] = []
    own_lag: list[float] = []
    loop = asyncio.get_running_loop()
    probes = [loop.create_task(scrape_gateway(st.gateway_metrics, scrapes)),
              loop.create_task(client_lag(own_lag))]
    try:
        with c.CpuMeter(pids) as cpu:
            r = await run_bench(cfg)
            usage = cpu.read()
            machine = cpu.machine()
            waits = cpu.waits()
    finally:
        for t in probes:
            t.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
    rt = r["round_trip_ms"]
    srv = r["server"] or {}
    ok = (rt["p99"] < P99_LIMIT_MS and r["chunks"]["dropped"] == 0 and not r["errors_by_code"]
          and r["sessions"]["completed"] == sessions)
    return {
        "bench": "capacity", "processing": ptype, **variant.json(),
        "sessions": sessions, "pass": ok,
        "latency_ms": {k: rt[k] for k in ("p50", "p90", "p99", "max")},
        "from_due_ms": r["round_trip_from_due_ms"],
        "send_lag_ms": r["send_lag_ms"],
        "dropped": r["chunks"]["dropped"], "drops_by_reason": r["drops_by_reason"],
        "errors": r["errors_by_code"],
        "chunks_per_message": srv.get("chunks_per_message"),
        "stage_means_ms": {k: v["mean_ms"] for k, v in srv.get("stages", {}).items()},
        "stage_p99_ms_est": {k: v["p99_ms_est"] for k, v in srv.get("stages", {}).items()},
        "worker": srv.get("workers"),
        "cpu_cores": usage,
        "machine_cpu_cores": machine,
        **waits,
        **gateway_view(scrapes),
        "client_loop_lag_ms": lag_summary(own_lag),
    }


async def sweep(args: argparse.Namespace, ptype: str, variant: Variant) -> dict[str, Any]:
    rabbit = c.find_pid("beam.smp")
    try:
        async with variant.stack(ptype, args) as st:
            assert st.worker is not None
            pids = {"client": os.getpid(), "gateway": st.gateway.pid, "worker": st.worker.pid}
            if rabbit:
                pids["rabbitmq"] = rabbit
            best, worst = 0, None
            n = args.start
            while n <= args.max:
                c.log(f"[capacity] {ptype}: {n} sessions")
                t = await trial(st, ptype, n, args.duration, pids, variant)
                c.emit(t, args.out)
                if not t["latency_ms"]["max"] and set(t["drops_by_reason"]) <= {
                        "model_error", "processing_failed"}:
                    raise RuntimeError(f"{ptype} fails every chunk: {t['drops_by_reason']} "
                                       "(models prepared? `audiostream models prepare`)")
                if not t["pass"]:
                    worst = n
                    break
                best = n
                n += args.step
            while worst is not None and worst - best > args.resolution:
                n = (best + worst) // 2
                c.log(f"[capacity] {ptype}: {n} sessions (bisecting {best}..{worst})")
                t = await trial(st, ptype, n, args.duration, pids, variant)
                c.emit(t, args.out)
                if t["pass"]:
                    best = n
                else:
                    worst = n
    except RuntimeError as exc:
        return {"bench": "capacity", "processing": ptype, **variant.json(),
                "unavailable": str(exc)}
    return {"bench": "capacity", "processing": ptype, **variant.json(),
            "max_sessions": best,
            "first_failing": worst, "criterion": f"p99 < {P99_LIMIT_MS:g} ms, no drops",
            "resolution": args.resolution}


async def ab(args: argparse.Namespace, ptype: str, variants: list[Variant]) -> dict[str, Any]:
    """Variants in turn at each level (see the module docstring)."""
    rabbit = c.find_pid("beam.smp")
    results: dict[Variant, dict[int, list[dict[str, Any]]]] = {v: {} for v in variants}
    async with contextlib.AsyncExitStack() as stack:
        stacks = {v: await stack.enter_async_context(v.stack(ptype, args)) for v in variants}
        for n in range(args.start, args.max + 1, args.step):
            for r in range(args.rounds):
                for v, st in stacks.items():
                    assert st.worker is not None
                    pids = {"client": os.getpid(), "gateway": st.gateway.pid,
                            "worker": st.worker.pid}
                    if rabbit:
                        pids["rabbitmq"] = rabbit
                    c.log(f"[capacity] {ptype} {v.label!r}: {n} sessions (round {r + 1})")
                    t = await trial(st, ptype, n, args.duration, pids, v)
                    c.emit(t, args.out)
                    results[v].setdefault(n, []).append(t)
    return {"bench": "capacity", "processing": ptype, "ab": {
        v.label: {str(n): {"passed": sum(t["pass"] for t in ts), "trials": len(ts),
                     "p50_ms": [t["latency_ms"]["p50"] for t in ts],
                     "p99_ms": [t["latency_ms"]["p99"] for t in ts],
                     "chunks_per_message": [t["chunks_per_message"] for t in ts],
                     "cpu_cores": [t["cpu_cores"] for t in ts],
                     "runqueue_wait_ms_per_s": [t["runqueue_wait_ms_per_s"] for t in ts]}
            for n, ts in by_n.items()}
        for v, by_n in results.items()}, "criterion": f"p99 < {P99_LIMIT_MS:g} ms, no drops"}


async def main(args: argparse.Namespace) -> int:
    from audiostream.processors import registry

    c.emit({"bench": "capacity", "machine": c.machine(), "duration_s": args.duration}, args.out)
    for ptype in args.types.split(","):
        if ptype not in registry:
            c.emit({"bench": "capacity", "processing": ptype,
                    "unavailable": "not registered"}, args.out)
            continue
        variants = variants_of(args)
        if len(variants) > 1 or args.every_level:
            c.emit(await ab(args, ptype, variants), args.out)
        else:
            c.emit(await sweep(args, ptype, variants[0]), args.out)
    return 0


def variants_of(args: argparse.Namespace) -> list[Variant]:
    gateways, workers = args.gateway_args or [""], args.worker_args or [""]
    if len(gateways) > 1 and len(workers) > 1:
        raise SystemExit("repeat --gateway-args or --worker-args for an A/B, not both")
    return [Variant(g, w) for g in gateways for w in workers]


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=c.BROKER)
    ap.add_argument("--types", default="passthrough,denoise")
    ap.add_argument("--gateway-args", action="append", default=[], metavar="ARGS",
                    help="options for the gateway, one string (repeat for an A/B: the "
                    "variants take turns at each level, no bisection)")
    ap.add_argument("--worker-args", action="append", default=[], metavar="ARGS",
                    help="options for the worker, one string (repeat for an A/B, as "
                    "--gateway-args; not both)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="A/B only: trials per variant and level (default 1)")
    ap.add_argument("--every-level", action="store_true",
                    help="one variant too: every level from --start to --max, no stop at "
                    "the first failure and no bisection (the curve, not the limit)")
    ap.add_argument("--nice-server", type=int, default=0, metavar="N",
                    help="run the gateway and the worker at niceness N (e.g. -5, needs root): "
                    "an experiment on their run-queue wait, not a deployment setting")
    c.sweep_options(ap, start=10, step=10, maximum=300, resolution=2)
    args = ap.parse_args()
    c.use_uvloop()
    c.raise_nofile()
    gc.collect()
    gc.freeze()  # the load generator's start-up heap: shorter GC pauses in its timings
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
