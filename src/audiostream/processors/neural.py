"""Model-backed steps: ``denoise`` (NSNet2) and ``vad`` (Silero).

Both batch across sessions: one ONNX Runtime call per 10 ms hop (denoise) or
per 32 ms window (vad) for the whole batch, with each session's state coming
in and going out as bytes. Models load on the first batch that needs them, so
a worker that never sees ``denoise`` never pays for it.

Worker options read from ``ProcessorContext.options``: ``denoise_variant``
(default ``fp32`` on CPU, ``fp16`` on GPU), ``denoise_state`` (how the GRU state
travels: ``fp32`` or ``fp16``; default the variant's own), ``intra_op_threads``
(default 1), ``tensorrt`` (default False).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from audiostream.errors import ConfigError, ErrorCode
from audiostream.models import nsnet2, runtime, silero
from audiostream.models.prepare import VARIANTS
from audiostream.processors.base import (
    BatchFn,
    ProcessorContext,
    StepInput,
    StepOutput,
    registry,
)
from audiostream.processors.params import Kind, Param, ParamSchema

_DENOISE_KEYS = frozenset({"variant"})
_VAD_KEYS = frozenset({"threshold", "neg_threshold", "min_silence_ms"})

#: Batch wait of the model steps. A model call costs about as much for 2 sessions as
#: for 8 (weights reloaded into cache, per-call overhead): at 25 real-time int8 denoise
#: sessions, waiting 10 ms instead of 2 cut worker CPU per session by 30-45 %
#: (docs/benchmarks.md). The worker's batcher waits only when more messages are due.
MODEL_MAX_WAIT_MS = 10.0


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


class _Lane:
    """A batch function that also reports the execution providers really in use.

    The worker reads ``providers`` for its metrics; before the first batch has
    loaded a model it shows the requested chain, afterwards the truth.
    """

    def __init__(self, ctx: ProcessorContext) -> None:
        self.ctx = ctx
        self.options = runtime.RuntimeOptions.from_options(ctx.device, ctx.options)
        self._loaded: list[list[str]] = []

    @property
    def providers(self) -> list[str]:
        if not self._loaded:
            return [
                p if isinstance(p, str) else p[0] for p in runtime.requested_providers(self.options)
            ]
        seen: dict[str, None] = {}
        for chain in self._loaded:
            seen.update(dict.fromkeys(chain))
        return list(seen)

    def _note(self, providers: list[str]) -> None:
        if providers not in self._loaded:
            self._loaded.append(providers)


class _Denoise(_Lane):
    def __init__(self, ctx: ProcessorContext) -> None:
        super().__init__(ctx)
        self.default = _default_variant(ctx)
        self.state_precision: str | None = ctx.options.get("denoise_state")
        nsnet2.state_version(self.default, self.state_precision)  # a bad value fails here
        # The shared cache resolves the model dir on every lookup: too slow per batch.
        self._engines: dict[tuple[int, str], nsnet2.Denoiser] = {}

    def _engine(self, rate: int, variant: str) -> nsnet2.Denoiser:
        engine = self._engines.get((rate, variant))
        if engine is None:
            engine = self._engines[(rate, variant)] = nsnet2.denoiser(
                rate, variant, model_dir=self.ctx.model_dir, options=self.options,
                state_precision=self.state_precision)
            self._note(engine.model.providers)
        return engine

    def warmup(self) -> None:
        """Load the default model now, so start-up logs the providers really in use."""
        self._engine(16000, self.default)

    def __call__(self, batch: Sequence[StepInput]) -> list[StepOutput]:
        groups: dict[tuple[int, str], list[int]] = {}
        for i, item in enumerate(batch):
            _check_denoise(item.params)
            nsnet2.framing(item.sample_rate)
            variant = str(item.params.get("variant", self.default))
            groups.setdefault((item.sample_rate, variant), []).append(i)
        out: list[StepOutput | None] = [None] * len(batch)
        for (rate, variant), idx in groups.items():
            engine = self._engine(rate, variant)
            results = engine.process([(batch[i].audio, batch[i].state) for i in idx])
            for i, (audio, state) in zip(idx, results, strict=True):
                out[i] = StepOutput(audio, state=state)
        return [o for o in out if o is not None]


DENOISE_PARAMS = ParamSchema((
    Param(name="variant", kind=Kind.STRING, choices=VARIANTS,
          description="model precision; the default is the worker's "
          "(`fp32` on CPU, `fp16` on GPU)"),
))


@registry.factory(
    "denoise",
    sample_rates=nsnet2.RATES,
    stateful=True,
    check_params=_check_denoise,
    max_wait_ms=MODEL_MAX_WAIT_MS,
    params=DENOISE_PARAMS,
    delay_frames=lambda rate, _params: nsnet2.framing(rate).delay,
)
def denoise(ctx: ProcessorContext) -> BatchFn:
    """NSNet2 noise suppression (16 or 48 kHz), streaming with ~20 ms delay."""
    return _Denoise(ctx)


def _check_vad(params: Mapping[str, Any]) -> None:
    _only(params, _VAD_KEYS, "vad")
    silero.Hysteresis.from_params(params)


class _Vad(_Lane):
    def warmup(self) -> None:
        """Load the model now, so start-up logs the providers really in use."""
        det = silero.detector(model_dir=self.ctx.model_dir, options=self.options)
        self._note(det.model.providers)

    def __call__(self, batch: Sequence[StepInput]) -> list[StepOutput]:
        groups: dict[int, list[int]] = {}
        hyst = []
        for i, item in enumerate(batch):
            _only(item.params, _VAD_KEYS, "vad")
            silero.check_rate(item.sample_rate)
            hyst.append(silero.Hysteresis.from_params(item.params))
            groups.setdefault(item.sample_rate, []).append(i)
        out: list[StepOutput | None] = [None] * len(batch)
        for rate, idx in groups.items():
            det = silero.detector(model_dir=self.ctx.model_dir, options=self.options)
            self._note(det.model.providers)
            results = det.process([(batch[i].audio, batch[i].state, hyst[i]) for i in idx], rate)
            for i, res in zip(idx, results, strict=True):
                out[i] = StepOutput(batch[i].audio, state=res.state, events=_vad_events(res))
        return [o for o in out if o is not None]


def _vad_events(res: silero.Result) -> tuple[dict[str, Any], ...]:
    """One ``vad`` event per window, each speech_start/speech_end right after its window."""
    marks = {e.end: e for e in res.events}
    events: list[dict[str, Any]] = []
    for w in res.windows:
        events.append({"name": "vad", "probability": w.probability, "offset": w.end})
        mark = marks.get(w.end)
        if mark is not None:
            events.append({"name": mark.name, "offset": mark.end})
    return tuple(events)


_VAD_DEFAULTS = silero.Hysteresis()
VAD_PARAMS = ParamSchema((
    Param(name="threshold", kind=Kind.NUMBER, minimum=0.0, maximum=1.0,
          default=_VAD_DEFAULTS.threshold,
          description="speech starts when a window's probability reaches this"),
    Param(name="neg_threshold", kind=Kind.NUMBER, minimum=0.0, maximum=1.0,
          default=_VAD_DEFAULTS.neg_threshold,
          description="speech may end below this (at most `threshold`; "
          "default `threshold - 0.15` when only `threshold` is given)"),
    Param(name="min_silence_ms", kind=Kind.NUMBER, minimum=0.0, maximum=10_000.0,
          default=_VAD_DEFAULTS.min_silence_ms,
          description="silence needed before `speech_end`"),
), cross_check=_check_vad)


@registry.factory(
    "vad",
    sample_rates=silero.RATES,
    stateful=True,
    check_params=_check_vad,
    max_wait_ms=MODEL_MAX_WAIT_MS,
    params=VAD_PARAMS,
)
def vad(ctx: ProcessorContext) -> BatchFn:
    """Silero voice activity events at 8/16 kHz; the audio passes through unchanged."""
    return _Vad(ctx)
