"""Model-backed steps: ``denoise`` (NSNet2) and ``vad`` (Silero).

Both batch across sessions: one ONNX Runtime call per 10 ms hop (denoise) or
per 32 ms window (vad) for the whole batch, with each session's state coming
in and going out as bytes. Models load on the first batch that needs them, so
a worker that never sees ``denoise`` never pays for it.

Worker options read from ``ProcessorContext.options``: ``denoise_variant``
(default ``fp32`` on CPU, ``fp16`` on GPU), ``intra_op_threads`` (default 1),
``tensorrt`` (default False).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from audiostream.errors import ConfigError, ErrorCode
from audiostream.models import nsnet2, runtime, silero
from audiostream.processors.base import (
    BatchFn,
    ProcessorContext,
    StepInput,
    StepOutput,
    registry,
)

_DENOISE_KEYS = frozenset({"variant"})
_VAD_KEYS = frozenset({"threshold", "neg_threshold", "min_silence_ms"})


def _only(params: Mapping[str, Any], allowed: frozenset[str], step: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(
            f"{step}: unknown parameter(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(allowed)) or 'none'}",
            ErrorCode.INVALID_OPTION,
        )


def _check_denoise(params: Mapping[str, Any]) -> None:
    _only(params, _DENOISE_KEYS, "denoise")
    if "variant" in params:
        nsnet2.check_variant(params["variant"])


def _default_variant(ctx: ProcessorContext) -> str:
    variant = ctx.options.get("denoise_variant", "fp16" if ctx.device == "gpu" else "fp32")
    return nsnet2.check_variant(variant)


@registry.factory(
    "denoise",
    sample_rates=nsnet2.RATES,
    stateful=True,
    check_params=_check_denoise,
)
def denoise(ctx: ProcessorContext) -> BatchFn:
    """NSNet2 noise suppression (16 or 48 kHz), streaming with ~20 ms delay."""
    options = runtime.RuntimeOptions.from_options(ctx.device, ctx.options)
    default = _default_variant(ctx)

    def run(batch: Sequence[StepInput]) -> list[StepOutput]:
        groups: dict[tuple[int, str], list[int]] = {}
        for i, item in enumerate(batch):
            _check_denoise(item.params)
            nsnet2.framing(item.sample_rate)
            variant = str(item.params.get("variant", default))
            groups.setdefault((item.sample_rate, variant), []).append(i)
        out: list[StepOutput | None] = [None] * len(batch)
        for (rate, variant), idx in groups.items():
            engine = nsnet2.denoiser(rate, variant, model_dir=ctx.model_dir, options=options)
            results = engine.process([(batch[i].audio, batch[i].state) for i in idx])
            for i, (audio, state) in zip(idx, results, strict=True):
                out[i] = StepOutput(audio, state=state)
        return [o for o in out if o is not None]

    return run


def _check_vad(params: Mapping[str, Any]) -> None:
    _only(params, _VAD_KEYS, "vad")
    silero.Hysteresis.from_params(params)


@registry.factory(
    "vad",
    sample_rates=silero.RATES,
    stateful=True,
    check_params=_check_vad,
)
def vad(ctx: ProcessorContext) -> BatchFn:
    """Silero voice activity events at 8/16 kHz; the audio passes through unchanged."""
    options = runtime.RuntimeOptions.from_options(ctx.device, ctx.options)

    def run(batch: Sequence[StepInput]) -> list[StepOutput]:
        groups: dict[int, list[int]] = {}
        hyst = []
        for i, item in enumerate(batch):
            _only(item.params, _VAD_KEYS, "vad")
            silero.check_rate(item.sample_rate)
            hyst.append(silero.Hysteresis.from_params(item.params))
            groups.setdefault(item.sample_rate, []).append(i)
        out: list[StepOutput | None] = [None] * len(batch)
        for rate, idx in groups.items():
            det = silero.detector(model_dir=ctx.model_dir, options=options)
            results = det.process([(batch[i].audio, batch[i].state, hyst[i]) for i in idx], rate)
            for i, res in zip(idx, results, strict=True):
                events: list[dict[str, Any]] = []
                starts = {e.end: e for e in res.events}
                for w in res.windows:
                    events.append({"name": "vad", "probability": w.probability, "offset": w.end})
                    ev = starts.get(w.end)
                    if ev is not None:
                        events.append({"name": ev.name, "offset": ev.end})
                out[i] = StepOutput(batch[i].audio, state=res.state, events=tuple(events))
        return [o for o in out if o is not None]

    return run
