"""The ``denoise`` and ``vad`` steps as a worker sees them: batches in, outputs in order."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from audiostream.errors import ConfigError, ErrorCode, ModelError
from audiostream.models import nsnet2, prepare, runtime, silero
from audiostream.processors import ProcessorContext, StepInput, registry
from tests.models.signals import load_speech, noisy_speech


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("neural-models")
    prepare.prepare(directory, optimized=False)
    return directory


def _item(audio: np.ndarray, rate: int, state: bytes | None = None, **params: object) -> StepInput:
    return StepInput(audio=audio, sample_rate=rate, state=state, params=params)


def test_registration() -> None:
    den, vad = registry.get("denoise"), registry.get("vad")
    assert den.stateful and den.sample_rates == frozenset({16000, 48000})
    assert vad.stateful and vad.sample_rates == frozenset({8000, 16000})
    assert {"denoise", "vad"} <= set(registry.public_names())


def test_denoise_batch_of_mixed_rates_and_variants(model_dir: Path) -> None:
    run = registry.get("denoise").factory(ProcessorContext(model_dir=model_dir))
    a16 = noisy_speech(16000)[:, None][:320]
    a48 = noisy_speech(48000)[:, None][:960]
    batch = [
        _item(a16, 16000),
        _item(a48, 48000),
        _item(a16, 16000, variant="int8"),
        _item(a16[:100], 16000),
    ]
    out = run(batch)
    assert [len(o.audio) for o in out] == [320, 960, 320, 100]
    assert all(o.state for o in out) and all(o.sample_rate is None for o in out)
    # second message of the first session continues from its state
    (nxt,) = run([_item(a16, 16000, out[0].state)])
    engine = nsnet2.denoiser(16000, model_dir=model_dir)
    ((ref, _),) = engine.process([(np.concatenate([a16, a16]), None)])
    assert np.array_equal(np.concatenate([out[0].audio, nxt.audio]), ref)


def test_denoise_default_variant_comes_from_worker_options(model_dir: Path) -> None:
    ctx = ProcessorContext(model_dir=model_dir, options={"denoise_variant": "int8"})
    run = registry.get("denoise").factory(ctx)
    x = noisy_speech(16000)[:, None][:3200]
    (out,) = run([_item(x, 16000)])
    ((ref, _),) = nsnet2.denoiser(16000, "int8", model_dir=model_dir).process([(x, None)])
    assert np.array_equal(out.audio, ref)
    with pytest.raises(ConfigError):
        registry.get("denoise").factory(
            ProcessorContext(model_dir=model_dir, options={"denoise_variant": "bf16"})
        )


def test_denoise_state_precision_comes_from_worker_options(model_dir: Path) -> None:
    x = noisy_speech(16000)[:, None][:640]
    for options, size in (({}, 5156), ({"denoise_state": "fp16"}, 3556),
                          ({"denoise_variant": "fp16"}, 3556),
                          ({"denoise_variant": "fp16", "denoise_state": "fp32"}, 5156)):
        run = registry.get("denoise").factory(
            ProcessorContext(model_dir=model_dir, options=options))
        (out,) = run([_item(x, 16000)])
        assert out.state is not None and len(out.state) == size, options
    with pytest.raises(ConfigError) as err:
        registry.get("denoise").factory(
            ProcessorContext(model_dir=model_dir, options={"denoise_state": "int8"}))
    assert err.value.code is ErrorCode.INVALID_OPTION


@pytest.mark.parametrize("params", [{"variant": "int4"}, {"variant": 8}, {"strength": 1}])
def test_denoise_param_errors(params: dict[str, object]) -> None:
    check = registry.get("denoise").check_params
    assert check is not None
    with pytest.raises(ConfigError) as err:
        check(params)
    assert err.value.code is ErrorCode.INVALID_OPTION


def test_denoise_rejects_a_rate_the_model_does_not_take(model_dir: Path) -> None:
    run = registry.get("denoise").factory(ProcessorContext(model_dir=model_dir))
    with pytest.raises(ConfigError) as err:
        run([_item(np.zeros((80, 1), np.float32), 8000)])
    assert err.value.code is ErrorCode.UNSUPPORTED_FORMAT


def test_models_load_lazily(tmp_path: Path) -> None:
    run = registry.get("denoise").factory(ProcessorContext(model_dir=tmp_path))  # no models
    with pytest.raises(ModelError, match="models prepare"):
        run([_item(np.zeros((160, 1), np.float32), 16000)])


def test_vad_events_and_passthrough(model_dir: Path) -> None:
    run = registry.get("vad").factory(ProcessorContext(model_dir=model_dir))
    x = load_speech(16000)[:, None]
    state = None
    events: list[dict[str, object]] = []
    pos = 0
    for start in range(0, len(x), 320):
        chunk = x[start : start + 320]
        (out,) = run([_item(chunk, 16000, state)])
        assert out.audio is chunk and out.sample_rate is None
        for e in out.events:
            assert 0 < int(e["offset"]) <= len(chunk)
            events.append({**e, "at": pos + int(e["offset"])})
        state = out.state
        pos += len(chunk)
    windows = [e for e in events if e["name"] == "vad"]
    assert len(windows) == len(x) // 512
    assert all(0.0 <= float(e["probability"]) <= 1.0 for e in windows)
    marks = [(e["name"], e["at"]) for e in events if e["name"] != "vad"]
    assert [m[0] for m in marks] == ["speech_start", "speech_end"]


def test_vad_batch_mixed_rates_and_params(model_dir: Path) -> None:
    run = registry.get("vad").factory(ProcessorContext(model_dir=model_dir))
    x16 = load_speech(16000)[8000:16000, None]
    x8 = x16[::2].copy()
    out = run([_item(x16, 16000), _item(x8, 8000, threshold=0.9), _item(x16[:100], 16000)])
    assert [sum(e["name"] == "vad" for e in o.events) for o in out] == [15, 15, 0]
    check = registry.get("vad").check_params
    assert check is not None
    with pytest.raises(ConfigError):
        check({"threshold": 2})
    with pytest.raises(ConfigError):
        check({"window": 512})
    with pytest.raises(ConfigError):
        run([_item(x16, 48000)])


def test_gpu_request_without_cuda_warns_and_reports_cpu(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="audiostream.models.runtime")
    opts = runtime.RuntimeOptions(device="gpu", tensorrt=True)
    model = silero.Model(model_dir=model_dir, options=opts)
    assert model.providers[-1] == "CPUExecutionProvider"
    if model.providers == ["CPUExecutionProvider"]:
        assert any(r.levelno == logging.WARNING for r in caplog.records)
    with pytest.raises(ConfigError):
        runtime.RuntimeOptions(device="tpu")


def test_lanes_report_providers(model_dir: Path) -> None:
    run = registry.get("denoise").factory(ProcessorContext(model_dir=model_dir))
    assert run.providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]
    run([_item(np.zeros((160, 1), np.float32), 16000)])
    assert run.providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]
