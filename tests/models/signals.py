"""Deterministic test audio (no espeak-ng needed at run time).

``tests/data/speech_16k.wav`` (123 KB) was made once with
``espeak-ng -v en-us -s 160 -w sp.wav "The quick brown fox jumps over the lazy dog."``,
resampled to 16 kHz with soxr HQ, trimmed, peak-normalised to 0.5, padded with
0.5 s of silence at each end and written as 16-bit PCM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

DATA = Path(__file__).resolve().parent.parent / "data"


def load_speech(rate: int = 16000) -> np.ndarray:
    """espeak-ng speech (generated once, checked in): 0.5 s silence, 2.8 s speech, 0.5 s."""
    x, sr = sf.read(DATA / "speech_16k.wav", dtype="float32")
    assert sr == 16000
    if rate != 16000:
        x = soxr.resample(x, 16000, rate, quality="HQ").astype(np.float32)
    return np.asarray(x, dtype=np.float32)


def noisy_speech(rate: int = 16000, snr_db: float = 10.0, seed: int = 0) -> np.ndarray:
    speech = load_speech(rate)
    noise = np.random.default_rng(seed).standard_normal(speech.size).astype(np.float32)
    gain = np.sqrt(np.mean(speech**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (speech + gain * noise).astype(np.float32)
