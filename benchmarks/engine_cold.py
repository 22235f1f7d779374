"""CPU per NSNet2 batch call with warm caches against cold ones.

Why the worker waits longer for a batch of a model step than of a DSP step: in a
worker, other work runs between two model calls (the event loop, RabbitMQ, the
gateway), so every call starts with its weights out of the CPU caches. This script
calls ``Denoiser.process`` back to back (warm) and with a 64 MB array walked between
calls (cold), pinned to one core, and prints one JSON line per variant and batch
size: process CPU µs per call and per stream.

    .venv/bin/python benchmarks/engine_cold.py [--cpu 1] [--batches 2,8,32] [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

RATE = 16000
CHUNK = 320  # 20 ms


def measure(variant: str, batch: int, cold: bool, seconds: float) -> float:
    """Mean process CPU seconds per call."""
    from audiostream.models import nsnet2

    engine = nsnet2.denoiser(RATE, variant)
    audio = (np.random.default_rng(batch).standard_normal((batch, CHUNK, 1)) * 0.1).astype(
        np.float32)
    states: list[bytes | None] = [None] * batch
    junk = np.ones(64 * 1024 * 1024 // 8)  # larger than L2 and this machine's L3 share

    def call() -> None:
        nonlocal states
        results = engine.process([(audio[i], states[i]) for i in range(batch)])
        states = [state for _, state in results]

    for _ in range(30):
        call()
    spent, calls = 0.0, 0
    while spent < seconds:
        if cold:
            junk += 1.0  # touches every cache line of 64 MB
        start = time.process_time()
        call()
        spent += time.process_time() - start
        calls += 1
    return spent / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", type=int, default=1, help="core to pin to")
    ap.add_argument("--batches", default="2,8,32")
    ap.add_argument("--variants", default="fp32,int8")
    ap.add_argument("--seconds", type=float, default=2.0, help="CPU time per measurement")
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    c.emit({"bench": "engine_cold", "machine": c.machine(), "load_average": os.getloadavg()})
    for variant in args.variants.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            warm = measure(variant, batch, False, args.seconds)
            cold = measure(variant, batch, True, args.seconds)
            c.emit({"bench": "engine_cold", "variant": variant, "batch": batch,
                    "warm_us_per_call": round(warm * 1e6), "cold_us_per_call": round(cold * 1e6),
                    "warm_us_per_stream": round(warm * 1e6 / batch),
                    "cold_us_per_stream": round(cold * 1e6 / batch),
                    "cold_extra_us_per_call": round((cold - warm) * 1e6)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
