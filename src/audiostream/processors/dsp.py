"""Classical DSP steps that need no model."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import signal

from audiostream.errors import ConfigError, ErrorCode, ProcessingError
from audiostream.processors.base import StepInput, StepOutput, registry
from audiostream.processors.params import Kind, Param, ParamSchema


@registry.per_item("passthrough", inline=True)
def passthrough(item: StepInput) -> StepOutput:
    """Return the audio unchanged (measures the pipeline itself)."""
    return StepOutput(item.audio)


def _number(params: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = params.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(
            f"parameter {key!r} must be a number in [{lo}, {hi}], got {value!r}",
            ErrorCode.INVALID_OPTION,
        )
    return float(value)


def _check_gain(params: Mapping[str, Any]) -> None:
    _number(params, "db", 6.0, -60.0, 40.0)


GAIN_PARAMS = ParamSchema((
    Param(name="db", kind=Kind.NUMBER, minimum=-60.0, maximum=40.0, default=6.0,
          description="gain in dB; the result is clipped to full scale"),
))


@registry.per_item("gain", check_params=_check_gain, params=GAIN_PARAMS, inline=True)
def gain(item: StepInput) -> StepOutput:
    """Fixed gain in dB (``{"db": 6}``), clipped to full scale."""
    factor = np.float32(10 ** (_number(item.params, "db", 6.0, -60.0, 40.0) / 20))
    return StepOutput(np.clip(item.audio * factor, -1.0, 1.0).astype(np.float32))


def _check_highpass(params: Mapping[str, Any]) -> None:
    _number(params, "cutoff_hz", 80.0, 10.0, 1000.0)


_HP_STATE = struct.Struct("<4sIII")  # magic, version, sections, channels; then float64 zi
_HP_MAGIC = b"HPF1"


def _hp_state(raw: bytes | None, sections: int, channels: int) -> np.ndarray:
    shape = (sections, 2, channels)
    if raw is None:
        return np.zeros(shape)
    if len(raw) < _HP_STATE.size:
        raise ProcessingError("highpass state is truncated")
    magic, version, n_sec, n_ch = _HP_STATE.unpack_from(raw)
    if magic != _HP_MAGIC or version != 1 or (n_sec, n_ch) != (sections, channels):
        raise ProcessingError("highpass state has the wrong version or shape")
    arr = np.frombuffer(raw, dtype="<f8", offset=_HP_STATE.size)
    if arr.size != sections * 2 * channels:
        raise ProcessingError("highpass state has the wrong size")
    return arr.reshape(shape).copy()


HIGHPASS_PARAMS = ParamSchema((
    Param(name="cutoff_hz", kind=Kind.NUMBER, minimum=10.0, maximum=1000.0, default=80.0,
          description="-3 dB corner frequency in Hz"),
))


@registry.per_item("highpass", stateful=True, check_params=_check_highpass,
                   params=HIGHPASS_PARAMS)
def highpass(item: StepInput) -> StepOutput:
    """4th-order Butterworth high-pass (``{"cutoff_hz": 80}``): removes rumble and DC."""
    cutoff = _number(item.params, "cutoff_hz", 80.0, 10.0, 1000.0)
    sos = signal.butter(4, cutoff, btype="highpass", fs=item.sample_rate, output="sos")
    channels = item.audio.shape[1]
    zi = _hp_state(item.state, sos.shape[0], channels)
    y, zf = signal.sosfilt(sos, item.audio.astype(np.float64), axis=0, zi=zi)
    state = _HP_STATE.pack(_HP_MAGIC, 1, sos.shape[0], channels) + zf.astype("<f8").tobytes()
    return StepOutput(y.astype(np.float32), state=state)
