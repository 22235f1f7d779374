"""Call audio for the simulators: espeak-ng speech, noise, μ-law frames."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from audiostream import audio
from audiostream.audio import AudioFormat, Encoding

MULAW = AudioFormat(Encoding.MULAW, 8000, 1)
SENTENCE = ("The quick brown fox jumps over the lazy dog. "
            "Please call me back at five o'clock tomorrow afternoon.")


def distinct_frames(n: int, seed: int = 1, size: int = 160) -> list[bytes]:
    """Random μ-law frames, each unique; byte 0x7F (minus zero) is left out because a
    round trip through PCM returns it as 0xFF (plus zero)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b = rng.integers(0, 255, size, dtype=np.uint8)
        b[b == 0x7F] = 0x7E
        out.append(b.tobytes())
    return out


@pytest.fixture(scope="session")
def speech_8k(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Clean speech at 8 kHz (float32), from Debian's espeak-ng (installed by
    scripts/ensure-system-deps.sh; a missing binary fails the test, never skips it)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is required (make install runs scripts/ensure-system-deps.sh)")
    wav = Path(tmp_path_factory.mktemp("speech")) / "speech.wav"
    subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", str(wav), SENTENCE], check=True)
    x, rate = sf.read(wav, dtype="float32")
    x = soxr.resample(x, rate, 8000).astype(np.float32)
    pad = np.zeros(4000, np.float32)
    x = np.concatenate([pad, x / np.max(np.abs(x)) * 0.5, pad])
    return x[: len(x) // 160 * 160]


def noisy(clean: np.ndarray, snr_db: float, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(clean.size).astype(np.float32)
    p_s = float(np.mean(clean**2))
    noise *= np.sqrt(p_s / 10 ** (snr_db / 10) / float(np.mean(noise**2)))
    return np.clip(clean + noise, -1, 1).astype(np.float32)


def mulaw_frames(x: np.ndarray) -> list[bytes]:
    data = audio.encode(MULAW, x.reshape(-1, 1))
    return [data[i : i + 160] for i in range(0, len(data), 160)]


def from_mulaw(data: bytes) -> np.ndarray:
    return audio.decode(MULAW, data).reshape(-1)
