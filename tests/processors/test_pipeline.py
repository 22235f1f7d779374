from __future__ import annotations

import pytest

from audiostream.audio import AudioFormat, Encoding
from audiostream.envelope import Step
from audiostream.errors import ConfigError, ErrorCode
from audiostream.processors import ProcessorRegistry, StepInput, StepOutput
from audiostream.processors import registry as builtin
from audiostream.processors.pipeline import parse_steps, plan, plan_raw


def fmt(rate: int) -> AudioFormat:
    return AudioFormat(Encoding.PCM_S16LE, rate, 1)


def test_names_and_objects() -> None:
    steps = parse_steps(["highpass", {"name": "gain", "params": {"db": 3}}], builtin)
    assert steps == [Step("highpass"), Step("gain", {"db": 3})]


def test_unknown_step_has_its_code() -> None:
    with pytest.raises(ConfigError) as info:
        parse_steps(["nope"], builtin)
    assert info.value.code == ErrorCode.UNKNOWN_STEP and "available" in info.value.message


def test_bad_params_have_their_code() -> None:
    with pytest.raises(ConfigError) as info:
        parse_steps([{"name": "gain", "params": {"db": "loud"}}], builtin)
    assert info.value.code == ErrorCode.INVALID_OPTION


def test_resampling_is_inserted_around_a_fixed_rate_step() -> None:
    reg = ProcessorRegistry()

    @reg.per_item("model16", sample_rates=[16000])
    def model16(item: StepInput) -> StepOutput:
        return StepOutput(item.audio)

    @reg.per_item("resample", internal=True)
    def resample(item: StepInput) -> StepOutput:
        return StepOutput(item.audio)

    planned = plan([Step("model16")], fmt(48000), reg)
    assert planned == (Step("resample", {"to": 16000}), Step("model16"),
                       Step("resample", {"to": 48000}))
    assert plan([Step("model16")], fmt(16000), reg) == (Step("model16"),)
    with pytest.raises(ConfigError) as info:
        plan_raw(["resample"], fmt(16000), reg)
    assert info.value.code == ErrorCode.UNKNOWN_STEP


def test_no_resampler_means_unsupported_format() -> None:
    reg = ProcessorRegistry()

    @reg.per_item("model16", sample_rates=[16000])
    def model16(item: StepInput) -> StepOutput:
        return StepOutput(item.audio)

    with pytest.raises(ConfigError) as info:
        plan([Step("model16")], fmt(8000), reg)
    assert info.value.code == ErrorCode.UNSUPPORTED_FORMAT
