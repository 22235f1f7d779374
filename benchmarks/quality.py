"""Speech quality of ``denoise`` and ``highpass``: PESQ-WB and STOI on synthetic noisy speech.

Clean speech: Harvard sentences spoken by espeak-ng (four talkers, two sentences
each, 16 kHz, RMS -25 dBFS, 0.5 s of silence at each end). Noise: white, pink
(1/f) and babble (six other espeak-ng talkers reading other sentences, summed at
equal level), each at 0, 5 and 10 dB SNR (speech RMS over the utterance vs noise
RMS). Every mixture goes through ``audiostream.worker.offline.run_offline`` --
the exact worker code, and equal to what a stream returns (see
tests/integration/test_denoise_pipeline.py) -- as ``pcm_f32le``. NSNet2's fixed
streaming delay (319 samples) is removed before scoring; ``highpass`` is scored
as it comes out. PESQ-WB (ITU-T P.862.2, package ``pesq``) and STOI (``pystoi``)
compare each output with the clean speech; "noisy" is the unprocessed mixture.

One JSON object per line: per utterance and condition, then per noise/SNR means,
then a summary; ``--markdown`` also prints the docs table to stderr.

    .venv/bin/python benchmarks/quality.py [--model-dir DIR] [--markdown]

Needs ``espeak-ng`` (Debian: ``apt-get install espeak-ng``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

RATE = 16000
LEVEL_DBFS = -25.0
PAD_S = 0.5
SNRS = (0, 5, 10)
NOISES = ("white", "pink", "babble")

# Harvard sentences (IEEE 1969), lists 1 and 2: public domain.
TARGETS = [  # (espeak-ng voice, text)
    ("en-us", "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue "
              "background."),
    ("en-gb+f3", "It's easy to tell the depth of a well. These days a chicken leg is a rare "
                 "dish."),
    ("en-us+m3", "Rice is often served in round bowls. The juice of lemons makes fine punch."),
    ("en-gb-scotland+f2", "The box was thrown beside the parked truck. The hogs were fed "
                          "chopped corn and garbage."),
]
BABBLE = [
    ("en-us+f4", "Four hours of steady work faced us. A large size in stockings is hard to "
                 "sell."),
    ("en-gb+m2", "The boy was there when the sun rose. A rod is used to catch pink salmon."),
    ("en-029+f1", "The source of the huge river is the clear spring. Kick the ball straight "
                  "and follow through."),
    ("en-us+m5", "Help the woman get back to her feet. A pot of tea helps to pass the "
                 "evening."),
    ("en-gb-x-rp+f5", "Smoky fires lack flame and heat. The soft cushion broke the man's "
                      "fall."),
    ("en-us+m7", "The salt breeze came across from the sea. The girl at the booth sold fifty "
                 "bonds."),
]

#: (label, pipeline, delay in samples to remove before scoring)
CONDITIONS: list[tuple[str, list[Any], int]] = [
    ("highpass", ["highpass"], 0),
    ("denoise", ["denoise"], 319),
    ("denoise_int8", [{"name": "denoise", "params": {"variant": "int8"}}], 319),
]


def speak(voice: str, text: str, tmp: Path) -> np.ndarray:
    out = tmp / "say.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(out), text], check=True,
                   capture_output=True)
    x, sr = sf.read(out, dtype="float32")
    x = soxr.resample(x, sr, RATE, quality="HQ").astype(np.float32)
    active = np.flatnonzero(np.abs(x) > 1e-3)  # trim espeak's leading/trailing silence
    return x[active[0] : active[-1] + 1]


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x * (10 ** (dbfs / 20) / rms(x))).astype(np.float32)


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    spec /= np.sqrt(f)
    spec[0] = 0.0
    return np.fft.irfft(spec, n).astype(np.float32)


def babble(n: int, talkers: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n, np.float32)
    for t in talkers:
        looped = np.tile(t, -(-2 * n // t.size))
        start = int(rng.integers(0, t.size))
        out += at_level(looped[start : start + n], -30.0)
    return out


def noise(kind: str, n: int, talkers: list[np.ndarray], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "white":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "pink":
        return pink(n, rng)
    return babble(n, talkers, rng)


def mix(speech: np.ndarray, kind: str, snr_db: float, talkers: list[np.ndarray],
        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy), both padded; SNR measured over the utterance."""
    pad = np.zeros(round(PAD_S * RATE), np.float32)
    clean = np.concatenate([pad, speech, pad])
    n = noise(kind, clean.size, talkers, seed)
    n *= rms(speech) / rms(n) / 10 ** (snr_db / 20)
    noisy = clean + n
    peak = float(np.max(np.abs(noisy)))
    if peak >= 1.0:
        raise RuntimeError(f"mixture clips (peak {peak:.2f}); lower LEVEL_DBFS")
    return clean, noisy.astype(np.float32)


def scores(clean: np.ndarray, degraded: np.ndarray) -> dict[str, float]:
    from pesq import pesq
    from pystoi import stoi

    n = min(clean.size, degraded.size)
    return {
        "pesq_wb": round(float(pesq(RATE, clean[:n], degraded[:n], "wb")), 3),
        "stoi": round(float(stoi(clean[:n], degraded[:n], RATE, extended=False)), 4),
    }


def process(x: np.ndarray, pipeline: list[Any], delay: int, model_dir: Path | None
            ) -> np.ndarray:
    from audiostream import audio
    from audiostream.audio import AudioFormat, Encoding
    from audiostream.processors import ProcessorContext
    from audiostream.worker.offline import run_offline

    fmt = AudioFormat(Encoding.PCM_F32LE, RATE, 1)
    out = run_offline(audio.encode(fmt, x[:, None]), fmt, pipeline,
                      context=ProcessorContext(model_dir=model_dir))
    return audio.decode(fmt, out)[delay:, 0]


def markdown(rows: list[dict[str, Any]]) -> str:
    labels = ["noisy"] + [label for label, _, _ in CONDITIONS]
    head = ("| noise | SNR | " + " | ".join(f"PESQ-WB {lb}" for lb in labels) + " | "
            + " | ".join(f"STOI {lb}" for lb in labels) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(labels))]
    for r in rows:
        p = " | ".join(f"{r['pesq_wb'][lb]:.2f}" for lb in labels)
        s = " | ".join(f"{r['stoi'][lb]:.3f}" for lb in labels)
        lines.append(f"| {r['noise']} | {r['snr_db']} dB | {p} | {s} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if shutil.which("espeak-ng") is None:
        print("espeak-ng is needed: apt-get install espeak-ng", file=sys.stderr)
        return 2
    from audiostream.models import nsnet2

    assert nsnet2.framing(RATE).delay == 319, "NSNet2's streaming delay changed: update CONDITIONS"
    c.emit({"bench": "quality", "machine": c.machine(), "rate": RATE, "level_dbfs": LEVEL_DBFS,
            "snrs_db": list(SNRS), "noises": list(NOISES),
            "conditions": {lb: p for lb, p, _ in CONDITIONS}}, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        targets = [at_level(speak(v, t, Path(tmp)), LEVEL_DBFS) for v, t in TARGETS]
        talkers = [speak(v, t, Path(tmp)) for v, t in BABBLE]
    per: dict[tuple[str, int], dict[str, dict[str, list[float]]]] = {}
    for kind in NOISES:
        for snr in SNRS:
            acc = per.setdefault((kind, snr), {"pesq_wb": {}, "stoi": {}})
            for u, speech in enumerate(targets):
                clean, noisy = mix(speech, kind, snr, talkers, seed=1000 * u + snr)
                outs = {"noisy": scores(clean, noisy)}
                for label, pipeline, delay in CONDITIONS:
                    outs[label] = scores(clean, process(noisy, pipeline, delay, args.model_dir))
                c.emit({"bench": "quality", "utterance": u, "noise": kind, "snr_db": snr,
                        "scores": outs}, args.out)
                for label, s in outs.items():
                    for metric, value in s.items():
                        acc[metric].setdefault(label, []).append(value)
            c.log(f"[quality] {kind} {snr} dB done")
    rows = []
    for (kind, snr), acc in per.items():
        row = {"bench": "quality", "noise": kind, "snr_db": snr, "utterances": len(targets),
               **{m: {lb: round(float(np.mean(v)), 3) for lb, v in by.items()}
                  for m, by in acc.items()}}
        rows.append(row)
        c.emit(row, args.out)
    overall = {m: {lb: round(float(np.mean([r[m][lb] for r in rows])), 3)
                   for lb in rows[0][m]} for m in ("pesq_wb", "stoi")}
    c.emit({"bench": "quality", "summary": overall}, args.out)
    if args.markdown:
        c.log(markdown(rows))
    return 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="prepared models (default: inside the environment)")
    ap.add_argument("--markdown", action="store_true", help="print the docs table to stderr")
    ap.add_argument("--out", type=Path, default=None, help="also append JSON lines here")
    return main(ap.parse_args())


if __name__ == "__main__":
    sys.exit(cli())
