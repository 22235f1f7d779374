"""What a resumed Opus session's seam costs: a fresh decoder from chunk k on, against
the unbroken decode of the same packets.

The bundled clean speech (``tests/data/speech_16k.wav``, 3.8 s) is encoded the way the
SDK sends it (``OpusPacketEncoder``: 20 ms packets, ``--bitrate``, 10 packets per
200 ms chunk). For every chunk boundary k inside the speech, the chunks from k on are
decoded by a fresh ``OpusPacketDecoder`` (what the gateway does after a resume) and,
for comparison, by a fresh decoder first fed the ``--prime`` packets before k and
their output thrown away (a priming the protocol does not have). Printed: the SNR of
the first ``--window-ms`` after the seam against the unbroken decode, per seam, and
the median and range.

    PYTHONPATH=src .venv/bin/python benchmarks/opus_seam.py [--rate 16000] [--prime 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

from audiostream.audio import frame_opus_packets, split_opus_frame
from audiostream.audiofile import OpusPacketDecoder, OpusPacketEncoder, resample

SPEECH = c.ROOT / "tests" / "data" / "speech_16k.wav"


def snr_db(ref: np.ndarray, y: np.ndarray) -> float:
    e = float(np.sum((ref - y) ** 2))
    return round(10 * np.log10((float(np.sum(ref**2)) + 1e-9) / (e + 1e-9)), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=16000)
    ap.add_argument("--bitrate", type=int, default=32000)
    ap.add_argument("--prime", type=int, default=20, help="packets to prime with (default 20)")
    ap.add_argument("--window-ms", type=int, default=200)
    args = ap.parse_args()
    x, src = soundfile.read(str(SPEECH), dtype="int16", always_2d=True)
    x = resample(x, src, args.rate)
    enc = OpusPacketEncoder(args.rate, 1, bitrate=args.bitrate)
    packets = enc.encode(x) + enc.flush()
    chunks = [frame_opus_packets(packets[i:i + 10]) for i in range(0, len(packets), 10)]
    dec = OpusPacketDecoder(args.rate, 1)
    whole = np.concatenate([np.frombuffer(dec.decode(ch), "<i2") for ch in chunks])
    whole = whole.astype(np.float64)
    w = args.rate * args.window_ms // 1000
    per_chunk = args.rate // 5
    rows: dict[str, list[float]] = {"fresh": [], "primed": []}
    for k in range(1, len(chunks) - 1):
        ref = whole[k * per_chunk:k * per_chunk + w]
        if np.sqrt(np.mean(ref**2)) < 30:  # silence at the seam: nothing to compare
            continue
        for how in rows:
            d = OpusPacketDecoder(args.rate, 1)
            if how == "primed":
                before = [p for ch in chunks[:k] for p in split_opus_frame(ch)][-args.prime:]
                for i in range(0, len(before), 50):
                    d.decode(frame_opus_packets(before[i:i + 50]))
            y = np.concatenate([np.frombuffer(d.decode(ch), "<i2") for ch in chunks[k:]])
            rows[how].append(snr_db(ref, y[:w].astype(np.float64)))
    c.emit({"bench": "opus_seam", "rate": args.rate, "bitrate": args.bitrate,
            "window_ms": args.window_ms, "prime_packets": args.prime,
            **{how: {"seams": len(v), "median_db": float(np.median(v)),
                     "min_db": min(v), "max_db": max(v), "per_seam_db": v}
               for how, v in rows.items()}})


if __name__ == "__main__":
    main()
