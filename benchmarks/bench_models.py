"""NSNet2 engine throughput (streams per core), I/O binding on the CPU EP, and INT8/FP16
quality against FP32, as JSON.

Measures the whole engine a worker runs per batch (numpy STFT, one ORT call per
10 ms hop across the batch, overlap-add, state (de)serialisation) with one
intra-op thread, for B sessions each sending one message per call.
"streams/core" = real-time streams one core sustains (audio seconds / CPU seconds).

    .venv/bin/python benchmarks/bench_models.py [--model-dir DIR] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soxr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from audiostream.models import files, nsnet2, prepare, runtime  # noqa: E402

BATCHES = (1, 8, 32, 128)


def speech(rate: int) -> np.ndarray:
    import soundfile as sf

    x, sr = sf.read(ROOT / "tests" / "data" / "speech_16k.wav", dtype="float32")
    return x if rate == sr else soxr.resample(x, sr, rate, "HQ").astype(np.float32)


def noisy(rate: int, snr_db: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    clean = speech(rate)
    noise = np.random.default_rng(0).standard_normal(clean.size).astype(np.float32)
    noise *= np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return clean, (clean + noise).astype(np.float32)


def throughput(
    engine: nsnet2.Denoiser, batch: int, chunk_ms: int, seconds: float
) -> dict[str, Any]:
    rate = engine.framing.rate
    n = rate * chunk_ms // 1000
    rng = np.random.default_rng(1)
    audio = [(0.1 * rng.standard_normal((n, 1))).astype(np.float32) for _ in range(batch)]
    states: list[bytes | None] = [None] * batch
    for _ in range(3):  # warm up, and get past the all-zeros start
        states = [s for _, s in engine.process(list(zip(audio, states, strict=True)))]
    calls = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds:
        states = [s for _, s in engine.process(list(zip(audio, states, strict=True)))]
        calls += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    audio_s = calls * batch * chunk_ms / 1000
    return {
        "batch": batch,
        "chunk_ms": chunk_ms,
        "ms_per_call": round(1000 * wall / calls, 3),
        "streams_per_core": round(audio_s / cpu, 1),
    }


def model_only(engine: nsnet2.Denoiser, batch: int, seconds: float) -> float:
    """Streams/core of the bare ORT call (one hop per stream), to show engine overhead."""
    model = engine.model
    feat = np.random.default_rng(2).normal(-4, 2, (batch, 1, model.bins)).astype(np.float32)
    h = model.zero_state(batch)
    model.run(feat, h)
    calls = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds:
        model.run(feat, h)
        calls += 1
    hop_s = engine.framing.hop / engine.framing.rate
    return round(calls * batch * hop_s / (time.process_time() - cpu0), 1)


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((test - ref) ** 2)))


def batch_dependence(engine: nsnet2.Denoiser, x: np.ndarray, others: int = 6) -> float:
    """Max |difference| of one session's output alone vs batched with ``others`` sessions.

    0.0 means sessions are isolated: a session's output does not depend on its
    batch neighbours (fp32 always; int8 since per-row activation quantisation).
    """
    chunk = engine.framing.rate // 50
    rng = np.random.default_rng(3)
    neighbours = [
        np.roll(x, 997 * (k + 1)) * np.float32(rng.uniform(0.05, 3.0)) for k in range(others)
    ]

    def run(batch: list[np.ndarray], pos: int) -> np.ndarray:
        states: list[bytes | None] = [None] * len(batch)
        out = []
        for start in range(0, x.size - chunk + 1, chunk):
            items = [
                (sig[start : start + chunk, None], st)
                for sig, st in zip(batch, states, strict=True)
            ]
            results = engine.process(items)
            states = [st for _, st in results]
            out.append(results[pos][0][:, 0])
        return np.concatenate(out)

    alone = run([x], 0)
    mixed = [*neighbours[: others // 2], x, *neighbours[others // 2 :]]
    return float(np.abs(run(mixed, others // 2) - alone).max())


def streamed(engine: nsnet2.Denoiser, x: np.ndarray, chunk: int) -> np.ndarray:
    """``x`` through ``process`` in ``chunk``-sample messages, the state carried: what a
    worker computes (fp16 differs more here than offline: state rounding every hop)."""
    state: bytes | None = None
    out = []
    for pos in range(0, len(x), chunk):
        ((y, state),) = engine.process([(x[pos : pos + chunk, None], state)])
        out.append(y[:, 0])
    return np.concatenate(out)


def quality(model_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rate in nsnet2.RATES:
        clean, x = noisy(rate)
        fp32 = nsnet2.denoiser(rate, "fp32", model_dir=model_dir).offline(x)
        int8 = nsnet2.denoiser(rate, "int8", model_dir=model_dir).offline(x)
        int8_engine = nsnet2.denoiser(rate, "int8", model_dir=model_dir)
        chunk = rate // 50  # 20 ms
        fp32_stream = streamed(nsnet2.denoiser(rate, "fp32", model_dir=model_dir), x, chunk)
        fp16_stream = streamed(nsnet2.denoiser(rate, "fp16", model_dir=model_dir), x, chunk)
        entry: dict[str, Any] = {
            "int8_vs_fp32_snr_db": round(snr_db(fp32, int8), 1),
            "fp16_vs_fp32_streamed_snr_db": round(snr_db(fp32_stream, fp16_stream), 1),
            "int8_batch_max_abs_diff": batch_dependence(int8_engine, x[: rate * 2]),
            "snr_vs_clean_db": {
                "noisy": round(snr_db(clean, x), 2),
                "fp32": round(snr_db(clean, fp32), 2),
                "int8": round(snr_db(clean, int8), 2),
            },
        }
        if rate == 16000:
            try:
                from pesq import pesq

                entry["pesq_wb"] = {
                    name: round(float(pesq(16000, clean, sig, "wb")), 3)
                    for name, sig in (("noisy", x), ("fp32", fp32), ("int8", int8))
                }
            except ImportError:
                pass
        out[str(rate)] = entry
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = files.model_dir(args.model_dir)
        if not prepare.is_prepared(directory):
            directory = Path(tmp)
            prepare.prepare(directory, optimized=False)
        opts = runtime.RuntimeOptions(intra_op_threads=1)
        results: dict[str, Any] = {
            "machine": {
                "python": platform.python_version(),
                "cpu": platform.processor(),
                "load_average": os.getloadavg(),
            },
            **runtime.versions(),
            "intra_op_threads": 1,
            "throughput": {},
        }
        plan = [(16000, 10), (16000, 20), (48000, 20)]
        for variant in ("fp32", "int8"):
            for rate, chunk_ms in plan:
                engine = nsnet2.denoiser(rate, variant, model_dir=directory, options=opts)
                key = f"{variant}/{rate // 1000}k/{chunk_ms}ms"
                rows = [throughput(engine, b, chunk_ms, args.seconds) for b in BATCHES]
                if chunk_ms == 20:
                    for row in rows:
                        row["model_only_streams_per_core"] = model_only(
                            engine, row["batch"], args.seconds / 2
                        )
                results["throughput"][key] = rows
        # I/O binding on the CPU EP (workers bind by default only on GPU): same engine,
        # bound vs plain, alternating per batch size so load changes hit both alike.
        bound_opts = runtime.RuntimeOptions(intra_op_threads=1, io_binding=True)
        plain = nsnet2.denoiser(16000, "fp32", model_dir=directory, options=opts)
        bound = nsnet2.denoiser(16000, "fp32", model_dir=directory, options=bound_opts)
        results["io_binding_fp32_16k_20ms"] = [
            {"batch": b,
             "plain_streams_per_core": throughput(plain, b, 20, args.seconds)[
                 "streams_per_core"],
             "bound_streams_per_core": throughput(bound, b, 20, args.seconds)[
                 "streams_per_core"]}
            for b in BATCHES
        ]
        results["quality"] = quality(directory)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
