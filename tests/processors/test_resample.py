"""Streaming resampler: exact lengths, chunking-invariant, quality close to soxr 'HQ'.

Run with ``-s`` to see the measured numbers (ripple, stopband, SNR vs soxr).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import soxr
from scipy import signal

from audiostream.audio import SUPPORTED_RATES
from audiostream.errors import ConfigError, ErrorCode, ProcessingError
from audiostream.processors import ProcessorContext, StepInput, registry
from audiostream.processors import resample as rs

PAIRS = [(a, b) for a, b in itertools.permutations(SUPPORTED_RATES, 2)]
QUALITY_PAIRS = [(48000, 16000), (16000, 48000), (44100, 48000), (48000, 44100), (16000, 8000)]


def stream(d: rs.Design, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    state = None
    out = []
    pos = 0
    while pos < len(x):
        n = int(rng.choice([0, 1, 7, 160, 441, 960, 2000]))
        y, state = rs.process(d, x[pos : pos + n], state)
        pos = min(pos + n, len(x))
        assert state.n_in == pos
        out.append(y)
        assert sum(len(o) for o in out) == pos * d.dst // d.src  # exact cumulative length
    return np.concatenate(out)


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_streaming_equals_one_shot(src: int, dst: int) -> None:
    rng = np.random.default_rng(src + dst)
    x = (0.3 * rng.standard_normal((src // 4, 2))).astype(np.float32)
    d = rs.design(src, dst)
    whole = rs.one_shot(x, src, dst)
    assert whole.shape == (len(x) * dst // src, 2)
    assert np.array_equal(stream(d, x, rng), whole)


def _tone_gain_db(y: np.ndarray, f: float, fs: int) -> float:
    t = np.arange(len(y)) / fs
    basis = np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t)], axis=1)
    coef = np.linalg.lstsq(basis, y, rcond=None)[0]
    return float(20 * np.log10(np.hypot(*coef)))


def _ours(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Our output with the (whole-sample) filter delay removed, for comparison."""
    d = rs.design(src, dst)
    return rs.one_shot(x[:, None].astype(np.float32), src, dst)[d.delay_frames :, 0].astype(float)


def measure(src: int, dst: int) -> dict[str, float]:
    nyq = min(src, dst) / 2
    n = src // 2
    t = np.arange(n) / src
    keep = slice(300, -300)
    ripple = {"ours": 0.0, "soxr": 0.0}
    for f in np.linspace(0.01, 0.9, 12) * nyq:  # passband: up to 90 % of Nyquist
        x = np.sin(2 * np.pi * f * t)
        for name, y in (("ours", _ours(x, src, dst)), ("soxr", soxr.resample(x, src, dst, "HQ"))):
            ripple[name] = max(ripple[name], abs(_tone_gain_db(y[keep], f, dst)))
    leak = {"ours": -np.inf, "soxr": -np.inf}
    if dst < src:  # aliasing: tones above the output Nyquist must vanish
        for f in np.linspace(1.01, 0.97 * src / dst, 8) * nyq:
            x = np.sin(2 * np.pi * f * t)
            for name, y in (
                ("ours", _ours(x, src, dst)),
                ("soxr", soxr.resample(x, src, dst, "HQ")),
            ):
                level = 10 * np.log10(2 * np.mean(y[keep] ** 2))
                leak[name] = max(leak[name], level)
    else:  # imaging: nothing above the input Nyquist
        for f in np.array([0.2, 0.5, 0.9]) * nyq:
            x = np.sin(2 * np.pi * f * np.arange(src) / src)
            for name, y in (
                ("ours", _ours(x, src, dst)),
                ("soxr", soxr.resample(x, src, dst, "HQ")),
            ):
                seg = y[2000 : 2000 + dst // 2] * np.kaiser(dst // 2, 20)
                spec = np.abs(np.fft.rfft(seg))
                freqs = np.fft.rfftfreq(len(seg), 1 / dst)
                level = 20 * np.log10(spec[freqs > 1.01 * nyq].max() / spec.max())
                leak[name] = max(leak[name], level)
    rng = np.random.default_rng(1)
    band = signal.firwin(801, 0.85 * nyq, fs=src)
    noise = signal.lfilter(band, 1, rng.standard_normal(2 * src))[1000:] * 0.1
    noise = noise.astype(np.float32).astype(float)
    ours = _ours(noise, src, dst)
    ref = soxr.resample(noise, src, dst, "HQ")[: len(ours)]
    s = slice(1000, -1000)
    snr = 10 * np.log10(np.sum(ref[s] ** 2) / np.sum((ours[s] - ref[s]) ** 2))
    return {
        "ripple_db": ripple["ours"],
        "soxr_ripple_db": ripple["soxr"],
        "stopband_db": float(leak["ours"]),
        "soxr_stopband_db": float(leak["soxr"]),
        "snr_vs_soxr_db": float(snr),
    }


@pytest.mark.parametrize(("src", "dst"), QUALITY_PAIRS)
def test_quality_comparable_to_soxr_hq(src: int, dst: int) -> None:
    m = measure(src, dst)
    d = rs.design(src, dst)
    print(f"\n{src}->{dst}: delay {d.delay_frames} frames, {m}")
    assert m["ripple_db"] < 1e-4  # soxr HQ: ~2e-6 dB (7e-3 dB for 44.1 kHz pairs)
    assert m["stopband_db"] < -125  # soxr HQ: -131 .. -143 dB
    assert m["snr_vs_soxr_db"] > 75


def test_delay_is_the_filter_group_delay() -> None:
    d = rs.design(48000, 16000)
    impulse = np.zeros((4800, 1), np.float32)
    impulse[300] = 1.0
    y = rs.one_shot(impulse, 48000, 16000)[:, 0]
    assert int(np.argmax(np.abs(y))) == 100 + d.delay_frames
    assert 1000 * d.delay_frames / 16000 < 7  # ms


def _item(audio: np.ndarray, rate: int, to: object, state: bytes | None = None) -> StepInput:
    return StepInput(audio=audio, sample_rate=rate, state=state, params={"to": to})


def test_registered_as_internal_step() -> None:
    spec = registry.get("resample")
    assert spec.internal and spec.stateful
    assert "resample" not in registry.public_names()
    run = spec.factory(ProcessorContext())
    x = np.random.default_rng(0).standard_normal((441, 1)).astype(np.float32)
    (a,) = run([_item(x, 44100, 48000)])
    (b,) = run([_item(x, 44100, 48000, a.state)])
    assert a.sample_rate == 48000 and len(a.audio) + len(b.audio) == 2 * 441 * 48000 // 44100
    (same,) = run([_item(x, 16000, 16000, b"kept")])
    assert same.audio is x and same.state == b"kept"


@pytest.mark.parametrize("to", [22050, "16000", None, True])
def test_bad_target_rate(to: object) -> None:
    spec = registry.get("resample")
    assert spec.check_params is not None
    with pytest.raises(ConfigError) as err:
        spec.check_params({"to": to})
    assert err.value.code is ErrorCode.INVALID_OPTION


def test_bad_source_rate_and_state() -> None:
    run = registry.get("resample").factory(ProcessorContext())
    x = np.zeros((160, 1), np.float32)
    with pytest.raises(ConfigError):
        run([_item(x, 11025, 16000)])
    (out,) = run([_item(x, 8000, 16000)])
    assert out.state is not None
    with pytest.raises(ProcessingError, match="made for 8000->16000"):
        run([_item(x, 8000, 48000, out.state)])
    with pytest.raises(ProcessingError, match="shape"):
        run([_item(np.zeros((160, 2), np.float32), 8000, 16000, out.state)])
    with pytest.raises(ProcessingError, match="version 7"):
        run([_item(x, 8000, 16000, out.state[:4] + b"\x07\x00" + out.state[6:])])
    with pytest.raises(ProcessingError, match="not a resample state"):
        run([_item(x, 8000, 16000, b"X" * len(out.state))])
