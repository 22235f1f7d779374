"""Compressed files through the service: ``audiostream stream --rate max`` on long MP3,
Opus and FLAC speech files, timed and checked.

Builds ``--minutes`` of the bundled noisy speech (16 kHz), encodes it with PyAV as
MP3 at 22.05 kHz (64 kbit/s; a rate the wire refuses, so the client converts),
Ogg/Opus (48 kHz inside, 32 kbit/s) and FLAC at 16 kHz, starts ``audiostream serve``
(gateway + one worker, in-memory broker) and streams each file, as a separate
process, through ``passthrough`` (``--chunk-ms 1000``) and ``denoise`` (``--chunk-ms
200``). Each run must be complete (no drops) and come out at the decoded input's rate
and exact length. One JSON line per run: wall time, multiple of real time, wire rate,
audio bytes sent to the gateway. ``--encodings pcm,opus`` runs each file both ways
(``audiostream stream --encoding opus``: Opus packets on the wire, 32 kbit/s).
``--stdin`` pipes each file into ``audiostream stream -`` instead (decoded as it
arrives: the client's peak RSS must not grow with the file).

    PYTHONPATH=src .venv/bin/python benchmarks/file_formats.py [--minutes 10]
        [--formats mp3,opus,flac] [--pipelines passthrough,denoise] [--encodings pcm,opus]
        [--stdin] [--serve-args "--opus-cpu-share 1e9 --opus-cpu-share-total 1e9"]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import av
import numpy as np
import soundfile

from audiostream.audiofile import decode, resample
from audiostream.testing import sample_wav

#: suffix -> (PyAV codec, container, rate, bit rate)
FORMATS: dict[str, tuple[str, str | None, int, int | None]] = {
    "mp3": ("libmp3lame", None, 22050, 64000),
    "opus": ("libopus", "ogg", 48000, 32000),
    "flac": ("flac", None, 16000, None),
}
CHUNK_MS = {"passthrough": 1000, "denoise": 200}
#: (pipeline, extra CLI arguments); extra runs only for 48 kHz files (Opus): denoise sent
#: at 16 kHz instead of through the 48 kHz model.
RUNS: list[tuple[str, list[str]]] = [
    ("passthrough", []), ("denoise", []), ("denoise", ["--server-rate", "16000"])]
extra_formats = {"opus"}


def encode(x: np.ndarray, rate: int, dst: Path, codec: str, fmt: str | None,
           out_rate: int, bitrate: int | None) -> None:
    data = resample(x.reshape(-1, 1), rate, out_rate)
    with av.open(str(dst), "w", format=fmt) as cont:
        s = cont.add_stream(codec, rate=out_rate)
        s.layout = "mono"
        if bitrate:
            s.bit_rate = bitrate
        step = out_rate  # one second per frame keeps memory flat
        for start in range(0, len(data), step):
            block = np.ascontiguousarray(data[start:start + step]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate = out_rate
            frame.pts = start
            for p in s.encode(frame):
                cont.mux(p)
        for p in s.encode(None):
            cont.mux(p)


def _hwm_mib(pid: int) -> float:
    """The process's peak RSS so far (VmHWM, counted from its exec), or 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _cpu_s(pid: int) -> float:
    """utime + stime of a process so far (the server's: gateway, worker and broker)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(*args: str, stdin: Path | None = None) -> tuple[float, dict[str, Any], int, str, float]:
    """One CLI run: wall time, its JSON report, exit code, stderr tail, peak RSS (MiB,
    sampled every 20 ms: the peak until at most 20 ms before exit)."""
    t0 = time.monotonic()
    peak = 0.0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            (stdin.open("rb") if stdin is not None else tempfile.TemporaryFile()) as inp:
        proc = subprocess.Popen(c.cli(*args), stdout=out, stderr=err, stdin=inp, env=c.env(),
                                cwd=c.ROOT, text=True)
        while proc.poll() is None:
            peak = max(peak, _hwm_mib(proc.pid))
            time.sleep(0.02)  # sampling interval of the RSS probe
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        text, tail = out.read(), err.read()[-500:]
    last = text.strip().splitlines()[-1] if text.strip() else "{}"
    try:
        report = json.loads(last)
    except ValueError:
        report = {}
    return wall, report, int(proc.returncode), tail, peak


async def serve(extra: list[str]) -> tuple[asyncio.subprocess.Process, str, str]:
    """``audiostream serve`` (one worker, in-memory broker) with ``extra`` arguments."""
    proc = await asyncio.create_subprocess_exec(
        *c.cli("serve", "--port", "0", "--workers", "1", "--log-level", "warning",
               "--ops-port", str(c.free_port()), *extra),  # 9090 may be another process's
        cwd=c.ROOT, env=c.env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    url = key = ""
    while not key:
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        if not line:
            raise RuntimeError("serve exited before it was ready")
        if line.startswith("audiostream serving "):
            url = line.split()[2]
        elif line.startswith("as_"):
            key = line.strip()
    asyncio.get_running_loop().create_task(c._drain(proc))
    return proc, url, key


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--formats", default="mp3,opus,flac")
    ap.add_argument("--pipelines", default="passthrough,denoise")
    ap.add_argument("--encodings", default="pcm", help="pcm, opus or both (wire encoding)")
    ap.add_argument("--stdin", action="store_true", help="pipe each file into `stream -`")
    ap.add_argument("--serve-args", default="",
                    help="extra `audiostream serve` arguments, e.g. \"--opus-cpu-share 1e9 "
                    "--opus-cpu-share-total 1e9\" (no Opus decode budget) for an A/B")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="file-formats-"))
    speech, rate = soundfile.read(str(sample_wav()), dtype="int16")
    n = int(args.minutes * 60 * rate)
    x = np.tile(speech, -(-n // speech.size))[:n]
    audio_s = n / rate
    pipelines = args.pipelines.split(",")
    files: dict[str, tuple[Path, int, int]] = {}
    for name in args.formats.split(","):
        codec, fmt, out_rate, bitrate = FORMATS[name]
        path = tmp / f"speech.{name}"
        encode(x, rate, path, codec, fmt, out_rate, bitrate)
        t0 = time.monotonic()
        decoded, decoded_rate = decode(path)
        c.emit({"run": f"decode {name}", "audio_s": audio_s, "rate": decoded_rate,
                "bytes": path.stat().st_size, "decode_s": round(time.monotonic() - t0, 2)})
        files[name] = (path, decoded.shape[0], decoded_rate)
        del decoded
    proc, url, key = await serve(args.serve_args.split())
    try:
        for name, (path, frames, decoded_rate) in files.items():
            for (pipeline, base), encoding in itertools.product(
                    RUNS, args.encodings.split(",")):
                if pipeline not in pipelines or (base and name not in extra_formats):
                    continue
                extra = [*base, *(["--encoding", encoding] if encoding != "pcm" else [])]
                out = tmp / f"out-{name}-{pipeline}.wav"
                cpu0 = _cpu_s(proc.pid)
                wall, rep, code, err, rss = await asyncio.to_thread(
                    run, "stream", "-" if args.stdin else str(path), str(out), "--pipeline",
                    pipeline, "--url", url, "--api-key", key, "--rate", "max",
                    "--chunk-ms", str(CHUNK_MS[pipeline]), "--json", "--quiet",
                    "--log-level", "warning", *extra, stdin=path if args.stdin else None)
                info = soundfile.info(str(out)) if out.exists() else None
                c.emit({"run": " ".join(["stream", name, pipeline, *extra,
                                         *(["(stdin)"] if args.stdin else [])]),
                        "audio_s": audio_s, "chunk_ms": CHUNK_MS[pipeline],
                        "wire_rate": rep.get("wire_rate"), "wall_s": round(wall, 2),
                        "x_real_time": round(audio_s / wall, 1), "exit": code,
                        "wire_bytes": rep.get("wire_bytes"),
                        "server_cpu_s": round(_cpu_s(proc.pid) - cpu0, 2),
                        "dropped": rep.get("dropped"), "client_peak_rss_mib": round(rss),
                        "same_rate_and_length": bool(
                            info is not None and info.samplerate == decoded_rate
                            and info.frames == frames),
                        **({"stderr": err} if code else {})})
        c.emit({"machine": c.machine(), "serve_args": args.serve_args})
    finally:
        proc.terminate()
        await proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
