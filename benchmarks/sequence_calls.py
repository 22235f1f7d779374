"""fp32 NSNet2: T hops in one ORT call against one call per hop (the ORT calls alone).

``Model.run_steps`` feeds a run of hops over the same sessions to ORT as one sequence;
this compares that with the per-hop loop it replaced, at several batch sizes and run
lengths, and checks the two are bit-identical. Pinned to ``--cpu``; one JSON line per case.

    .venv/bin/python benchmarks/sequence_calls.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import numpy as np


def per_call_ms(fn: Callable[[], Any], seconds: float) -> float:
    for _ in range(20):
        fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return 1000 * (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", type=int, default=1, help="core to pin to")
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--hops", default="2,3,4")
    ap.add_argument("--seconds", type=float, default=0.7, help="per measurement")
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    from audiostream.models import nsnet2

    model = nsnet2.denoiser(16000, "fp32").model
    rng = np.random.default_rng(0)
    c.emit({"bench": "sequence_calls", "machine": c.machine()})
    for b in map(int, args.batches.split(",")):
        for t in map(int, args.hops.split(",")):
            feat_t = rng.normal(-2.0, 1.0, (t, b, model.bins)).astype(np.float32)
            feat = np.ascontiguousarray(feat_t.transpose(1, 0, 2))
            h0 = model.zero_state(b)

            def per_hop(feat_t: Any = feat_t, h0: Any = h0, b: int = b) -> Any:
                h, gains = h0.copy(), []
                for s in range(len(feat_t)):
                    g, h = model.run(feat_t[s].reshape(b, 1, -1), h)
                    gains.append(g[:, 0])
                return np.stack(gains, axis=1), h

            def one_call(feat: Any = feat, h0: Any = h0) -> Any:
                return model.run(feat, h0.copy())

            (g1, h1), (g2, h2) = per_hop(), one_call()
            hop_ms, seq_ms = per_call_ms(per_hop, args.seconds), per_call_ms(one_call, args.seconds)
            c.emit({"bench": "sequence_calls", "batch": b, "hops": t,
                    "per_hop_ms": round(hop_ms, 3), "one_call_ms": round(seq_ms, 3),
                    "saving_pct": round(100 * (1 - seq_ms / hop_ms), 1),
                    "bit_identical": bool(np.array_equal(g1, g2) and np.array_equal(h1, h2))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
