"""Real-time sessions per gateway core, with the gateway under a CFS quota.

The 2-core machine cannot load a whole gateway core and also run RabbitMQ, a worker
and the clients, so the gateway gets a CPU limit (``--quota`` cores, what a
Kubernetes limit is) and everything else runs outside it. A level passes when p99 <
100 ms, nothing is dropped and every session completes; sessions per core is the
highest passing level divided by the quota. In the same run, at every level, a bare
aiohttp WebSocket echo process under the same quota carries the same traffic: the
floor that the gateway's CPU per session-second is compared with.

    .venv/bin/python benchmarks/gateway_capacity.py --quota 0.2 --levels 20,40,60,80,100 \\
        --duration 60

Prints one JSON object per level and mode, then a summary. Needs root (cgroups).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import roundtrip

P99_LIMIT_MS = 100.0


def per_session_second_ms(cores: float, sessions: int) -> float:
    """CPU milliseconds per second of one session's audio."""
    return round(cores * 1000 / sessions, 3)


async def level(st: c.Stack, quota: c.CpuQuota, sessions: int, duration: float,
                pids: dict[str, int]) -> dict[str, Any]:
    throttle0 = quota.stats()
    pipe = await roundtrip.measure_pipeline(st, sessions, duration, pids)
    throttle = {k: round(v - throttle0[k], 3) for k, v in quota.stats().items()}
    lat = pipe["latency_ms"]
    expected = sessions * int(duration * 1000 / roundtrip.CHUNK_MS)
    ok = (lat["p99"] < P99_LIMIT_MS and pipe["dropped"] == 0 and not pipe["errors"]
          and lat["count"] >= expected)
    gw = pipe["cpu_cores"]["gateway"]
    return {**pipe, "pass": ok, "expected_chunks": expected, "gateway_throttled": throttle,
            "gateway_cpu_ms_per_session_s": per_session_second_ms(gw, sessions)}


async def main(args: argparse.Namespace) -> int:
    levels = [int(x) for x in args.levels.split(",")]
    c.emit({"bench": "gateway_capacity", "machine": c.machine(), "quota_cores": args.quota,
            "levels": levels, "duration_s": args.duration}, args.out)
    rabbit = c.find_pid("beam.smp")
    best = 0
    rows: list[dict[str, Any]] = []
    async with c.stack(["passthrough"], broker=args.broker) as st:
        assert st.worker is not None
        pids = {"client": os.getpid(), "gateway": st.gateway.pid, "worker": st.worker.pid}
        if rabbit:
            pids["rabbitmq"] = rabbit
        with c.CpuQuota(st.gateway.pid, args.quota) as quota:
            for n in levels:
                c.log(f"[gateway_capacity] {n} sessions through the gateway")
                g = await level(st, quota, n, args.duration, pids)
                c.emit({"bench": "gateway_capacity", "mode": "gateway", "sessions": n, **g},
                       args.out)
                c.log(f"[gateway_capacity] {n} sessions through the bare echo")
                floor_pids = {k: v for k, v in pids.items() if k not in ("gateway", "worker")}
                e = await roundtrip.measure_ws(n, args.duration, floor_pids,
                                               quota_cores=args.quota)
                echo_ms = per_session_second_ms(e["cpu_cores"]["echo"], n)
                c.emit({"bench": "gateway_capacity", "mode": "ws_echo", "sessions": n, **e,
                        "echo_cpu_ms_per_session_s": echo_ms}, args.out)
                rows.append({
                    "sessions": n, "pass": g["pass"], "p50_ms": g["latency_ms"]["p50"],
                    "p99_ms": g["latency_ms"]["p99"], "dropped": g["dropped"],
                    "gateway_cpu_ms_per_session_s": g["gateway_cpu_ms_per_session_s"],
                    "echo_cpu_ms_per_session_s": echo_ms,
                    "gateway_vs_echo_cpu": (round(g["gateway_cpu_ms_per_session_s"] / echo_ms, 2)
                                            if echo_ms else None),
                    "echo_p99_ms": e["latency_ms"]["p99"],
                })
                if g["pass"]:
                    best = max(best, n)
                elif args.stop_on_fail:
                    break
    c.emit({"bench": "gateway_capacity", "summary": rows, "quota_cores": args.quota,
            "max_sessions_within_quota": best,
            "sessions_per_gateway_core": round(best / args.quota, 1)}, args.out)
    return 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=c.BROKER)
    ap.add_argument("--quota", type=float, default=0.2, metavar="CORES",
                    help="CFS limit on the gateway process, in cores (default 0.2)")
    ap.add_argument("--levels", default="20,40,60,80,100",
                    help="session counts to try, in order (default 20,40,60,80,100)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    ap.add_argument("--stop-on-fail", action="store_true", help="stop at the first failure")
    ap.add_argument("--out", type=Path, default=None, help="also append JSON lines here")
    args = ap.parse_args()
    c.use_uvloop()
    c.raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main(args))
    return 130


if __name__ == "__main__":
    sys.exit(cli())
