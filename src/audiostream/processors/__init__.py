"""Processing steps. Importing this package registers the built-in ones."""

from audiostream.processors import dsp as _dsp  # noqa: F401  (registers built-ins)
from audiostream.processors import neural as _neural  # noqa: F401  (registers denoise, vad)
from audiostream.processors import resample as _resample  # noqa: F401  (registers resample)
from audiostream.processors.base import (
    BatchFn,
    ProcessorContext,
    ProcessorRegistry,
    ProcessorSpec,
    StepInput,
    StepOutput,
    registry,
)

__all__ = [
    "BatchFn",
    "ProcessorContext",
    "ProcessorRegistry",
    "ProcessorSpec",
    "StepInput",
    "StepOutput",
    "registry",
]
