"""Pipeline planning: validate the client's steps and insert the conversions they need."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from audiostream.audio import AudioFormat
from audiostream.envelope import Step
from audiostream.errors import AudioStreamError, ConfigError, ErrorCode
from audiostream.processors.base import ProcessorRegistry

RESAMPLE = "resample"
#: Longer names are refused without being looked up (or echoed back in full).
MAX_STEP_NAME = 64


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 48 else f"{text[:48]}... ({len(text)} characters)"


def parse_steps(raw: Sequence[Any], processors: ProcessorRegistry) -> list[Step]:
    """Client pipeline entries (``"name"`` or ``{"name":…, "params":{…}}``) -> steps."""
    steps: list[Step] = []
    for entry in raw:
        if isinstance(entry, str):
            name, params = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name, params = entry["name"], entry.get("params", {})
            extra = sorted(set(entry) - {"name", "params"})
            if extra:
                raise ConfigError(
                    f"pipeline entry {_short(name)} has unknown field(s) "
                    f"{', '.join(_short(k) for k in extra[:5])}; allowed: name, params",
                    ErrorCode.INVALID_OPTION)
        else:
            raise ConfigError(f"bad pipeline entry {_short(entry)}", ErrorCode.UNKNOWN_STEP)
        if len(name) > MAX_STEP_NAME:
            raise ConfigError(f"unknown processing step {_short(name)}", ErrorCode.UNKNOWN_STEP)
        spec = processors.get(name)
        if spec.internal:
            raise ConfigError(f"step {name!r} is inserted automatically; do not request it",
                              ErrorCode.UNKNOWN_STEP)
        # The declared schema first: types, ranges, unknown keys and size caps, before
        # anything is copied into a work message or a resume token.
        params = spec.params.validate(name, params)
        if spec.check_params is not None:
            try:
                spec.check_params(params)
            except AudioStreamError:
                raise
            except Exception as exc:
                raise ConfigError(f"bad params for {name!r}: {exc}",
                                  ErrorCode.INVALID_OPTION) from exc
        steps.append(Step(name, params))
    return steps


def _closest_rate(rate: int, allowed: frozenset[int]) -> int:
    """Prefer the lowest allowed rate at or above ``rate`` (no information lost)."""
    higher = sorted(r for r in allowed if r >= rate)
    return higher[0] if higher else max(allowed)


def plan(
    steps: Sequence[Step], fmt: AudioFormat, processors: ProcessorRegistry
) -> tuple[Step, ...]:
    """Insert resampling where a step needs another rate, and back to the client's rate."""
    planned: list[Step] = []
    rate = fmt.sample_rate

    def convert(to: int) -> None:
        if RESAMPLE not in processors:
            raise ConfigError(
                f"the pipeline needs {rate} Hz -> {to} Hz but no resampler is available",
                ErrorCode.UNSUPPORTED_FORMAT,
            )
        planned.append(Step(RESAMPLE, {"to": to}))

    for step in steps:
        spec = processors.get(step.name)
        if spec.sample_rates is not None and rate not in spec.sample_rates:
            target = _closest_rate(rate, spec.sample_rates)
            convert(target)
            rate = target
        planned.append(step)
    if rate != fmt.sample_rate:
        convert(fmt.sample_rate)
    return tuple(planned)


def plan_raw(
    raw: Sequence[Any], fmt: AudioFormat, processors: ProcessorRegistry
) -> tuple[Step, ...]:
    return plan(parse_steps(raw, processors), fmt, processors)


def delay_seconds(
    steps: Sequence[Step], fmt: AudioFormat, processors: ProcessorRegistry
) -> float:
    """A planned pipeline's fixed delay in seconds, from the steps' declared delays
    (inserted resamplers included); steps that declare none count as zero."""
    delay_s = 0.0
    rate = fmt.sample_rate
    for step in steps:
        spec = processors.get(step.name)
        out_rate = int(step.params.get("to", rate)) if spec.internal else rate
        if spec.delay_frames is not None:
            delay_s += spec.delay_frames(rate, step.params) / out_rate
        rate = out_rate
    return delay_s


def delay_frames(
    steps: Sequence[Step], fmt: AudioFormat, processors: ProcessorRegistry
) -> int:
    """``delay_seconds`` in frames of ``fmt``, rounded to the nearest frame (exact when
    every step runs at ``fmt``'s rate, e.g. NSNet2's 319 samples at 16 kHz)."""
    return round(delay_seconds(steps, fmt, processors) * fmt.sample_rate)


def native_rate(
    raw: Sequence[Any], rate: int, processors: ProcessorRegistry
) -> int | None:
    """Where audio at ``rate`` Hz best meets the pipeline: among the rates of its first
    rate-bound step, the highest at or below ``rate`` (no upsampling that adds nothing;
    16 kHz for ``denoise`` on 22.05 kHz audio), else its lowest. None when no step is
    bound to a rate."""
    for step in parse_steps(raw, processors):
        rates = processors.get(step.name).sample_rates
        if rates:
            below = [r for r in rates if r <= rate]
            return max(below) if below else min(rates)
    return None
