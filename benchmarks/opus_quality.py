"""Speech quality of ``denoise`` when the audio arrives as Opus: PESQ-WB and STOI, Opus
input against PCM input, on the noisy speech of ``benchmarks/quality.py``.

Each mixture (four espeak-ng talkers, white/pink/babble noise at 0, 5 and 10 dB SNR,
16 kHz) is scored four ways against the clean speech:

- ``noisy``: the mixture as PCM (what a PCM session sends);
- ``opus``: the mixture through the wire's Opus path: ``OpusPacketEncoder`` at 16 kHz
  (what the SDK and ``audiostream stream --encoding opus`` send: 20 ms packets,
  ``--bitrate``, default 32 kbit/s) and ``OpusPacketDecoder`` (what the gateway
  decodes with), the encoder's look-ahead (``pre_skip``) cut as the client cuts it;
- ``denoise``: the PCM mixture through ``run_offline(["denoise"])`` (the worker's code);
- ``opus_denoise``: the Opus-decoded mixture through the same.

The gateway adds nothing to the decode (tests/gateway/test_opus_wire.py: its output
equals the client's own decode) and a stream's denoise equals ``run_offline``'s, so
these are the scores a real Opus session gets. ``--e2e`` also streams the first
mixture through an embedded gateway and worker with ``codec=Codec.OPUS`` and checks the
output equals the offline ``opus_denoise``.

    PYTHONPATH=src .venv/bin/python benchmarks/opus_quality.py [--bitrate 32000] [--e2e]

Needs ``espeak-ng``. One JSON line per mixture, per noise/SNR mean, and a summary;
``--markdown`` prints the docs table to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import quality as q

DELAY = 319  # NSNet2's streaming delay at 16 kHz (quality.py checks it)
LABELS = ("noisy", "opus", "denoise", "opus_denoise")


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def opus_frames(x: np.ndarray, bitrate: int) -> tuple[list[bytes], int]:
    from audiostream.audio import frame_opus_packets
    from audiostream.audiofile import OpusPacketEncoder

    enc = OpusPacketEncoder(q.RATE, 1, bitrate=bitrate)
    packets = enc.encode(to_int16(x)[:, None]) + enc.flush()
    return ([frame_opus_packets(packets[i:i + 10]) for i in range(0, len(packets), 10)],
            enc.pre_skip)


def opus_round_trip(x: np.ndarray, bitrate: int) -> tuple[np.ndarray, list[bytes], int]:
    """The mixture as the gateway decodes it (float, full length with look-ahead)."""
    from audiostream.audiofile import OpusPacketDecoder

    frames, pre_skip = opus_frames(x, bitrate)
    dec = OpusPacketDecoder(q.RATE, 1)
    y = np.frombuffer(b"".join(dec.decode(f) for f in frames), "<i2")
    return y.astype(np.float32) / 32768.0, frames, pre_skip


def denoise(x: np.ndarray, model_dir: Path | None) -> np.ndarray:
    """run_offline's denoise, with its delay left in (trimmed by the caller)."""
    return q.process(x, ["denoise"], 0, model_dir)


async def e2e(frames: list[bytes]) -> bytes:
    from audiostream.audio import AudioFormat, Codec
    from audiostream.client import Audio, AudioStreamClient
    from audiostream.testing import embedded_server
    from audiostream.topology import Topology

    topo = Topology(processing_types=("denoise",), prefix="bench-opusq")
    async with embedded_server(topology=topo) as srv:
        client = AudioStreamClient(srv.url, api_key=srv.api_key)
        out: list[bytes] = []
        async with client.session(["denoise"], format=AudioFormat.pcm16(q.RATE),
                                  codec=Codec.OPUS, iterate=False, deadline_ms=30_000) as s:
            s.on_item(lambda it: out.append(it.data) if isinstance(it, Audio) else None)
            for f in frames:
                await s.send(f)
            await s.finish()
    return b"".join(out)


def main(args: argparse.Namespace) -> int:
    if shutil.which("espeak-ng") is None:
        print("espeak-ng is needed: apt-get install espeak-ng", file=sys.stderr)
        return 2
    c.emit({"bench": "opus_quality", "machine": c.machine(), "rate": q.RATE,
            "bitrate": args.bitrate, "snrs_db": list(q.SNRS), "noises": list(q.NOISES)},
           args.out)
    with tempfile.TemporaryDirectory() as tmp:
        targets = [q.at_level(q.speak(v, t, Path(tmp)), q.LEVEL_DBFS) for v, t in q.TARGETS]
        talkers = [q.speak(v, t, Path(tmp)) for v, t in q.BABBLE]
    rows = []
    checked = not args.e2e
    for kind in q.NOISES:
        for snr in q.SNRS:
            acc: dict[str, dict[str, list[float]]] = {"pesq_wb": {}, "stoi": {}}
            for u, speech in enumerate(targets):
                clean, noisy = q.mix(speech, kind, snr, talkers, seed=1000 * u + snr)
                n = clean.size
                coded, frames, pre_skip = opus_round_trip(noisy, args.bitrate)
                dn_opus = denoise(coded, args.model_dir)
                outs = {
                    "noisy": q.scores(clean, noisy),
                    "opus": q.scores(clean, coded[pre_skip:pre_skip + n]),
                    "denoise": q.scores(clean, denoise(noisy, args.model_dir)[DELAY:DELAY + n]),
                    "opus_denoise": q.scores(
                        clean, dn_opus[DELAY + pre_skip:DELAY + pre_skip + n]),
                }
                if not checked:
                    got = np.frombuffer(asyncio.run(e2e(frames)), "<i2")
                    want = to_int16(dn_opus)
                    same = got.shape == want.shape and int(np.max(np.abs(
                        got.astype(np.int32) - want))) <= 1
                    c.emit({"bench": "opus_quality", "e2e_equal_offline": same,
                            "samples": int(got.size)}, args.out)
                    if not same:
                        return 1
                    checked = True
                c.emit({"bench": "opus_quality", "utterance": u, "noise": kind,
                        "snr_db": snr, "scores": outs}, args.out)
                for label, s in outs.items():
                    for metric, value in s.items():
                        acc[metric].setdefault(label, []).append(value)
            row: dict[str, Any] = {
                "bench": "opus_quality", "noise": kind, "snr_db": snr,
                **{m: {lb: round(float(np.mean(v)), 3) for lb, v in by.items()}
                   for m, by in acc.items()}}
            rows.append(row)
            c.emit(row, args.out)
            c.log(f"[opus_quality] {kind} {snr} dB done")
    overall = {m: {lb: round(float(np.mean([r[m][lb] for r in rows])), 3) for lb in LABELS}
               for m in ("pesq_wb", "stoi")}
    c.emit({"bench": "opus_quality", "summary": overall}, args.out)
    if args.markdown:
        head = ("| noise | SNR | " + " | ".join(f"PESQ-WB {lb}" for lb in LABELS) + " | "
                + " | ".join(f"STOI {lb}" for lb in LABELS) + " |")
        lines = [head, "|" + "---|" * (2 + 2 * len(LABELS))]
        for r in rows:
            p = " | ".join(f"{r['pesq_wb'][lb]:.2f}" for lb in LABELS)
            s = " | ".join(f"{r['stoi'][lb]:.3f}" for lb in LABELS)
            lines.append(f"| {r['noise']} | {r['snr_db']} dB | {p} | {s} |")
        c.log("\n".join(lines))
    return 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bitrate", type=int, default=32000, help="Opus bit rate (default 32000)")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--e2e", action="store_true",
                    help="also stream the first mixture through an embedded gateway")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    return main(ap.parse_args())


if __name__ == "__main__":
    sys.exit(cli())
