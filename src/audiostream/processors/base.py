"""Processor registry: a processing type is one decorated function.

A processor takes a *batch* of inputs (one per message, from any sessions) and
returns one output per input, in order. Stateful processors receive the
session's previous state bytes and return the new state; the worker never
keeps it, so any worker can process any message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audiostream.audio import FloatAudio
from audiostream.errors import ConfigError, ErrorCode
from audiostream.processors.params import NO_PARAMS, ParamSchema


@dataclass(frozen=True, slots=True)
class StepInput:
    audio: FloatAudio
    """float32 ``(frames, channels)``."""
    sample_rate: int
    state: bytes | None
    """The session's state for this step; None on its first message."""
    params: Mapping[str, Any]
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class StepOutput:
    audio: FloatAudio
    state: bytes | None = None
    events: tuple[Mapping[str, Any], ...] = ()
    """JSON-able events; ``offset`` (frames into this message's audio) places them."""
    sample_rate: int | None = None
    """Set when the step changes the sample rate."""


BatchFn = Callable[[Sequence[StepInput]], Sequence[StepOutput]]
ItemFn = Callable[[StepInput], StepOutput]
ParamCheck = Callable[[Mapping[str, Any]], None]
DelayFn = Callable[[int, Mapping[str, Any]], int]


@dataclass(frozen=True, kw_only=True)
class ProcessorContext:
    """What a processor factory may depend on, per worker."""

    device: str = "cpu"
    model_dir: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessorSpec:
    name: str
    factory: Callable[[ProcessorContext], BatchFn]
    sample_rates: frozenset[int] | None = None
    """Rates the step accepts; None means any. Conversions are inserted for others."""
    stateful: bool = False
    check_params: ParamCheck | None = None
    params: ParamSchema = NO_PARAMS
    """The declared parameters (``processors/params.py``); others are refused at start."""
    description: str = ""
    internal: bool = False
    """Inserted by the planner (e.g. resample); not listed for clients."""
    max_wait_ms: float = 2.0
    """How long a worker's batcher waits for a batch to fill unless ``--max-wait-ms``
    says otherwise: models pay a large fixed cost per call, DSP does not."""
    delay_frames: DelayFn | None = None
    """Fixed output delay, in output frames, for (input rate, params); None means none.
    Lets a client line streamed output up with the input (``--compensate-delay``)."""
    inline: bool = False
    """Cheap enough (microseconds per item, pure Python holding the GIL anyway) to run on
    the worker's event loop: its batches skip the executor's thread hand-off, which
    costs more than the step. Models and heavier DSP stay on the executor."""


class ProcessorRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, ProcessorSpec] = {}

    def add(self, spec: ProcessorSpec) -> None:
        if spec.name in self._specs:
            raise ConfigError(f"processor {spec.name!r} is registered twice")
        self._specs[spec.name] = spec

    def batch(
        self,
        name: str,
        *,
        sample_rates: Sequence[int] | None = None,
        stateful: bool = False,
        check_params: ParamCheck | None = None,
        internal: bool = False,
        params: ParamSchema = NO_PARAMS,
        delay_frames: DelayFn | None = None,
        inline: bool = False,
    ) -> Callable[[BatchFn], BatchFn]:
        """Register a function that processes a whole batch in one call."""

        def deco(fn: BatchFn) -> BatchFn:
            self.add(
                ProcessorSpec(
                    name=name,
                    factory=lambda _ctx: fn,
                    sample_rates=frozenset(sample_rates) if sample_rates else None,
                    stateful=stateful,
                    check_params=check_params,
                    params=params,
                    description=(fn.__doc__ or "").strip().split("\n")[0],
                    internal=internal,
                    delay_frames=delay_frames,
                    inline=inline,
                )
            )
            return fn

        return deco

    def per_item(
        self,
        name: str,
        *,
        sample_rates: Sequence[int] | None = None,
        stateful: bool = False,
        check_params: ParamCheck | None = None,
        internal: bool = False,
        params: ParamSchema = NO_PARAMS,
        delay_frames: DelayFn | None = None,
        inline: bool = False,
    ) -> Callable[[ItemFn], ItemFn]:
        """Register a function of one input; the batch is a loop over it."""

        def deco(fn: ItemFn) -> ItemFn:
            def run(batch: Sequence[StepInput]) -> list[StepOutput]:
                return [fn(item) for item in batch]

            run.__doc__ = fn.__doc__
            self.batch(
                name,
                sample_rates=sample_rates,
                stateful=stateful,
                check_params=check_params,
                internal=internal,
                params=params,
                delay_frames=delay_frames,
                inline=inline,
            )(run)
            return fn

        return deco

    def factory(
        self,
        name: str,
        *,
        sample_rates: Sequence[int] | None = None,
        stateful: bool = False,
        check_params: ParamCheck | None = None,
        description: str = "",
        max_wait_ms: float = 2.0,
        params: ParamSchema = NO_PARAMS,
        delay_frames: DelayFn | None = None,
    ) -> Callable[[Callable[[ProcessorContext], BatchFn]], Callable[[ProcessorContext], BatchFn]]:
        """Register a factory called once per worker (e.g. to load a model)."""

        def deco(
            fn: Callable[[ProcessorContext], BatchFn],
        ) -> Callable[[ProcessorContext], BatchFn]:
            self.add(
                ProcessorSpec(
                    name=name,
                    factory=fn,
                    sample_rates=frozenset(sample_rates) if sample_rates else None,
                    stateful=stateful,
                    check_params=check_params,
                    params=params,
                    description=description or (fn.__doc__ or "").strip().split("\n")[0],
                    max_wait_ms=max_wait_ms,
                    delay_frames=delay_frames,
                )
            )
            return fn

        return deco

    def get(self, name: str) -> ProcessorSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise ConfigError(
                f"unknown processing step {name!r}; available: {', '.join(self.public_names())}",
                ErrorCode.UNKNOWN_STEP,
            )
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)

    def public_names(self) -> list[str]:
        return sorted(n for n, s in self._specs.items() if not s.internal)


#: The registry the CLI, gateway and workers use; built-ins register on import.
registry = ProcessorRegistry()
