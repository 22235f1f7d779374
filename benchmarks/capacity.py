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
load budget on/off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

P99_LIMIT_MS = 100.0


async def trial(st: c.Stack, ptype: str, sessions: int, duration: float,
                pids: dict[str, int], variant: str) -> dict[str, Any]:
    from audiostream.bench import BenchConfig, run_bench

    cfg = BenchConfig(url=st.ws_url, api_key=st.key, sessions=sessions, duration_s=duration,
                      pipeline=(ptype,), ramp_s=min(3.0, 0.05 * sessions),
                      metrics_urls=tuple(u for u in (st.gateway_metrics, st.worker_metrics)
                                         if u))
    with c.CpuMeter(pids) as cpu:
        r = await run_bench(cfg)
        usage = cpu.read()
        machine = cpu.machine()
    rt = r["round_trip_ms"]
    srv = r["server"] or {}
    ok = (rt["p99"] < P99_LIMIT_MS and r["chunks"]["dropped"] == 0 and not r["errors_by_code"]
          and r["sessions"]["completed"] == sessions)
    return {
        "bench": "capacity", "processing": ptype, "gateway_args": variant,
        "sessions": sessions, "pass": ok,
        "latency_ms": {k: rt[k] for k in ("p50", "p90", "p99", "max")},
        "dropped": r["chunks"]["dropped"], "drops_by_reason": r["drops_by_reason"],
        "errors": r["errors_by_code"],
        "chunks_per_message": srv.get("chunks_per_message"),
        "stage_means_ms": {k: v["mean_ms"] for k, v in srv.get("stages", {}).items()},
        "worker": srv.get("workers"),
        "cpu_cores": usage,
        "machine_cpu_cores": machine,
    }


async def sweep(args: argparse.Namespace, ptype: str, variant: str) -> dict[str, Any]:
    rabbit = c.find_pid("beam.smp")
    try:
        async with c.stack([ptype], broker=args.broker,
                           gateway_args=shlex.split(variant)) as st:
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
        return {"bench": "capacity", "processing": ptype, "gateway_args": variant,
                "unavailable": str(exc)}
    return {"bench": "capacity", "processing": ptype, "gateway_args": variant,
            "max_sessions": best,
            "first_failing": worst, "criterion": f"p99 < {P99_LIMIT_MS:g} ms, no drops",
            "resolution": args.resolution}


async def ab(args: argparse.Namespace, ptype: str, variants: list[str]) -> dict[str, Any]:
    """Variants in turn at each level (see the module docstring)."""
    rabbit = c.find_pid("beam.smp")
    results: dict[str, dict[int, list[dict[str, Any]]]] = {v: {} for v in variants}
    async with contextlib.AsyncExitStack() as stack:
        stacks = {v: await stack.enter_async_context(
            c.stack([ptype], broker=args.broker, gateway_args=shlex.split(v)))
            for v in variants}
        for n in range(args.start, args.max + 1, args.step):
            for r in range(args.rounds):
                for v, st in stacks.items():
                    assert st.worker is not None
                    pids = {"client": os.getpid(), "gateway": st.gateway.pid,
                            "worker": st.worker.pid}
                    if rabbit:
                        pids["rabbitmq"] = rabbit
                    c.log(f"[capacity] {ptype} {v!r}: {n} sessions (round {r + 1})")
                    t = await trial(st, ptype, n, args.duration, pids, v)
                    c.emit(t, args.out)
                    results[v].setdefault(n, []).append(t)
    return {"bench": "capacity", "processing": ptype, "ab": {
        v: {str(n): {"passed": sum(t["pass"] for t in ts), "trials": len(ts),
                     "p50_ms": [t["latency_ms"]["p50"] for t in ts],
                     "p99_ms": [t["latency_ms"]["p99"] for t in ts],
                     "chunks_per_message": [t["chunks_per_message"] for t in ts],
                     "cpu_cores": [t["cpu_cores"] for t in ts]}
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
        if len(args.gateway_args) > 1:
            c.emit(await ab(args, ptype, args.gateway_args), args.out)
        else:
            c.emit(await sweep(args, ptype, "".join(args.gateway_args)), args.out)
    return 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=c.BROKER)
    ap.add_argument("--types", default="passthrough,denoise")
    ap.add_argument("--gateway-args", action="append", default=[], metavar="ARGS",
                    help="options for the gateway, one string (repeat for an A/B: the "
                    "variants take turns at each level, no bisection)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="A/B only: trials per variant and level (default 1)")
    c.sweep_options(ap, start=10, step=10, maximum=300, resolution=2)
    args = ap.parse_args()
    c.use_uvloop()
    c.raise_nofile()
    gc.collect()
    gc.freeze()  # the load generator's start-up heap: shorter GC pauses in its timings
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
