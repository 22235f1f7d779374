"""File mode end to end: ``audiostream stream --rate max`` on a long WAV, timed and checked.

Builds a ``--minutes`` WAV from the bundled noisy speech, starts ``audiostream serve``
(gateway + one worker, in-memory broker) and runs, as separate processes:

* ``stream --pipeline passthrough``: must be complete and bit-exact;
* ``offline --pipeline denoise`` (the reference) and ``stream --pipeline denoise`` with
  and without ``--compensate-delay``: without, the output must equal ``offline``'s
  sample for sample; with, it must equal ``offline`` advanced by the model's delay
  (319 samples at 16 kHz), and be as long as the input (the tail flushed).

Prints one JSON line per run (wall time, speed as a multiple of real time, checks).

    PYTHONPATH=src .venv/bin/python benchmarks/file_mode.py [--minutes 10] [--chunk-ms 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import numpy as np
import soundfile
from sdk_memory import serve

from audiostream.embedded import sample_wav

DELAY = 319


def run(*args: str) -> tuple[float, dict[str, Any], int]:
    t0 = time.monotonic()
    out = subprocess.run(c.cli(*args), capture_output=True, text=True, env=c.env(), cwd=c.ROOT)
    wall = time.monotonic() - t0
    if out.returncode not in (0, 3):
        raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stderr[-2000:]}")
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
    try:
        report = json.loads(last)
    except ValueError:
        report = {"output": last}
    return wall, report, out.returncode


def read(path: Path) -> np.ndarray:
    data, _ = soundfile.read(str(path), dtype="int16")
    return np.asarray(data)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--chunk-ms", type=float, default=1000.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="file-mode-"))
    speech, rate = soundfile.read(str(sample_wav()), dtype="int16")
    n = int(args.minutes * 60 * rate)
    x = np.tile(speech, -(-n // speech.size))[:n]
    src = tmp / "in.wav"
    soundfile.write(str(src), x, rate, subtype="PCM_16")
    audio_s = n / rate
    proc, url, key = await serve()
    common = ["--url", url, "--api-key", key, "--rate", "max", "--chunk-ms",
              str(args.chunk_ms), "--json", "--quiet", "--log-level", "warning"]
    try:
        out = tmp / "passthrough.wav"
        wall, rep, code = await asyncio.to_thread(
            run, "stream", str(src), str(out), "--pipeline", "passthrough", *common)
        c.emit({"run": "stream passthrough", "audio_s": audio_s, "chunk_ms": args.chunk_ms,
                "wall_s": round(wall, 2), "x_real_time": round(audio_s / wall, 1),
                "exit": code, "dropped": rep.get("dropped"),
                "bit_exact": bool(np.array_equal(read(out), x))})

        ref = tmp / "offline.wav"
        wall, rep, code = await asyncio.to_thread(
            run, "offline", str(src), str(ref), "--pipeline", "denoise")
        offline = read(ref)
        c.emit({"run": "offline denoise", "audio_s": audio_s, "wall_s": round(wall, 2),
                "x_real_time": round(audio_s / wall, 1)})

        raw = tmp / "denoise-raw.wav"
        wall, rep, code = await asyncio.to_thread(
            run, "stream", str(src), str(raw), "--pipeline", "denoise",
            "--no-compensate-delay", *common)
        c.emit({"run": "stream denoise --no-compensate-delay", "audio_s": audio_s,
                "wall_s": round(wall, 2), "x_real_time": round(audio_s / wall, 1),
                "exit": code, "dropped": rep.get("dropped"),
                "equal_to_offline": bool(np.array_equal(read(raw), offline))})

        comp = tmp / "denoise-comp.wav"
        wall, rep, code = await asyncio.to_thread(
            run, "stream", str(src), str(comp), "--pipeline", "denoise", *common)
        y = read(comp)
        c.emit({"run": "stream denoise --compensate-delay", "audio_s": audio_s,
                "wall_s": round(wall, 2), "x_real_time": round(audio_s / wall, 1),
                "exit": code, "dropped": rep.get("dropped"),
                "same_length": y.size == x.size,
                "equal_to_offline_advanced_by_delay": bool(
                    np.array_equal(y[:-DELAY], offline[DELAY:])),
                "machine": c.machine()})
    finally:
        proc.terminate()
        await proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
