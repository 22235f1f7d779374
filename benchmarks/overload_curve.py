"""Graceful degradation: latency and outcomes from 1x to 3x the load the stack holds.

Everything co-located (RabbitMQ, one gateway, one worker, this load generator). For
each multiple of ``--held`` sessions it streams ``--duration`` seconds of real-time
20 ms chunks and records p50/p90/p99, the drops by reason and whether every chunk
ended as audio or a notice (``accounted``: outcomes == chunks sent). Then it draws
the curve as a PNG (needs matplotlib: the ``[plot]`` or ``[dev]`` extra).

    .venv/bin/python benchmarks/overload_curve.py --held 20 --multiples 1,1.5,2,2.5,3 \\
        --duration 60 --png docs/overload-curve.png
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c


async def level(st: c.Stack, sessions: int, duration: float, ptype: str,
                pids: dict[str, int], ramp: float | None) -> dict[str, Any]:
    from audiostream.bench import BenchConfig, run_bench

    cfg = BenchConfig(url=st.ws_url, api_key=st.key, sessions=sessions, duration_s=duration,
                      pipeline=(ptype,),
                      ramp_s=min(3.0, 0.05 * sessions) if ramp is None else ramp,
                      metrics_urls=tuple(u for u in (st.gateway_metrics, st.worker_metrics)
                                         if u))
    with c.CpuMeter(pids) as cpu:
        r = await run_bench(cfg)
        usage = cpu.read()
    chunks = r["chunks"]
    keys = ("p50", "p90", "p99", "max")
    return {
        "latency_ms": {k: r["round_trip_ms"][k] for k in keys},
        # A real-time source cannot wait: time a sender spent behind its clock (credit
        # withheld, or this load generator late) counts from when each chunk was due.
        "from_due_ms": {k: r["round_trip_from_due_ms"][k] for k in keys},
        "send_lag_ms": {k: r["send_lag_ms"][k] for k in keys},
        "start_ms": {k: r["start_ms"][k] for k in keys},
        "wall_s": r["wall_s"],
        "chunks": chunks, "drops_by_reason": r["drops_by_reason"],
        "errors": r["errors_by_code"],
        "accounted": chunks["outcomes"] == chunks["sent"],
        "sessions_admitted": r["start_ms"]["count"],  # the sessions that got ``ready``
        "drop_fraction": round(chunks["dropped"] / chunks["sent"], 4) if chunks["sent"] else 0,
        "chunks_per_message": (r["server"] or {}).get("chunks_per_message"),
        "cpu_cores": usage,
    }


def plot(rows: list[dict[str, Any]], held: int, ptype: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["multiple"] for r in rows]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(x, [r["latency_ms"][key] for r in rows], style, label=key)
    ax.plot(x, [r["from_due_ms"]["p50"] for r in rows], "x-", color="tab:purple",
            label="p50 from when due")
    ax.axhline(100, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("round trip (ms)")
    ax.set_title(f"{ptype}: load as a multiple of {held} held sessions")
    ax.legend()
    bx.plot(x, [100 * r["drop_fraction"] for r in rows], "o-", color="tab:red",
            label="chunks answered by a notice")
    bx.plot(x, [100 * (1 - r["sessions_admitted"] / r["sessions"]) for r in rows], "s--",
            color="tab:orange", label="sessions refused at start")
    bx.plot(x, [100.0 * r["accounted"] for r in rows], "k.", label="every chunk accounted (100)")
    bx.set_ylabel("% of chunks or sessions")
    bx.set_xlabel("load multiple")
    bx.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


async def main(args: argparse.Namespace) -> int:
    multiples = [float(x) for x in args.multiples.split(",")]
    c.emit({"bench": "overload_curve", "machine": c.machine(), "held": args.held,
            "processing": args.processing, "multiples": multiples,
            "duration_s": args.duration}, args.out)
    rabbit = c.find_pid("beam.smp")
    rows: list[dict[str, Any]] = []
    # Every session starts under the bench's one key, several hundred a minute at 3x:
    # the per-key start cap (600 a minute) would refuse them and hide the curve.
    async with c.stack([args.processing], broker=args.broker,
                       gateway_args=["--session-starts-per-minute", "0",
                                     "--shed-above-ms", f"{args.shed_above_ms:g}"]) as st:
        assert st.worker is not None
        pids = {"client": os.getpid(), "gateway": st.gateway.pid, "worker": st.worker.pid}
        if rabbit:
            pids["rabbitmq"] = rabbit
        for m in multiples:
            n = max(1, round(args.held * m))
            c.log(f"[overload_curve] {m}x = {n} sessions")
            row = {"multiple": m, "sessions": n,
                   **await level(st, n, args.duration, args.processing, pids, args.ramp)}
            c.emit({"bench": "overload_curve", **row}, args.out)
            rows.append(row)
    if args.png:
        plot(rows, args.held, args.processing, args.png)
    c.emit({"bench": "overload_curve", "summary": [
        {"multiple": r["multiple"], "sessions": r["sessions"], "p50_ms": r["latency_ms"]["p50"],
         "p99_ms": r["latency_ms"]["p99"], "p50_from_due_ms": r["from_due_ms"]["p50"],
         "send_lag_p99_ms": r["send_lag_ms"]["p99"], "start_p99_ms": r["start_ms"]["p99"],
         "drop_fraction": r["drop_fraction"], "sessions_admitted": r["sessions_admitted"],
         "accounted": r["accounted"]} for r in rows],
        "all_accounted": all(r["accounted"] for r in rows),
        "png": str(args.png) if args.png else None}, args.out)
    return 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=c.BROKER)
    ap.add_argument("--processing", default="passthrough")
    ap.add_argument("--held", type=int, default=20,
                    help="sessions the stack holds (from capacity.py), the 1x load")
    ap.add_argument("--multiples", default="1,1.5,2,2.5,3")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    ap.add_argument("--ramp", type=float, default=None,
                    help="seconds over which a level's sessions start (default: 0.05 s "
                    "per session, at most 3 s: nearly a step)")
    ap.add_argument("--shed-above-ms", type=float, default=250.0,
                    help="the gateway's --shed-above-ms (0: it admits every session)")
    ap.add_argument("--png", type=Path, default=None, help="write the curve here")
    ap.add_argument("--out", type=Path, default=None, help="also append JSON lines here")
    args = ap.parse_args()
    c.use_uvloop()
    c.raise_nofile()
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
