"""I/O binding for the NSNet2 per-hop loop, checked on the CPU execution provider.

There is no GPU here, so these tests pin what can be pinned on CPU: the bound path
(state in device OrtValues, gains written into host buffers) is bit-identical to
plain ``session.run``, and the binding device is derived from the providers the
session really uses, not from what was requested.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audiostream.errors import ConfigError, ModelError
from audiostream.models import nsnet2, runtime
from tests.models.signals import noisy_speech

VARIANTS = ("fp32", "int8", "fp16")
RATES = (16000, 48000)
PLAIN = runtime.RuntimeOptions(io_binding=False)
BOUND = runtime.RuntimeOptions(io_binding=True)

Pair = tuple[nsnet2.Denoiser, nsnet2.Denoiser]


@pytest.fixture(scope="module")
def pair(model_dir: Path) -> Callable[[int, str], Pair]:
    """``(plain, bound)`` engines per rate and variant, loaded on first use."""
    cache: dict[tuple[int, str], Pair] = {}

    def get(rate: int, variant: str) -> Pair:
        if (rate, variant) not in cache:
            cache[rate, variant] = (
                nsnet2.denoiser(rate, variant, model_dir=model_dir, options=PLAIN),
                nsnet2.denoiser(rate, variant, model_dir=model_dir, options=BOUND),
            )
        return cache[rate, variant]

    return get


def _binding(engine: nsnet2.Denoiser) -> runtime.RecurrentBinding:
    assert engine.model.binding is not None
    return engine.model.binding


def _features(rate: int, counts: list[int], seed: int) -> np.ndarray:
    """Real log-power features of noisy speech, ``sum(counts)`` frames back to back."""
    fr = nsnet2.framing(rate)
    x = noisy_speech(rate, seed=seed)
    start = fr.hop * 37  # skip the leading silence: speech drives the GRU state
    frames = np.stack(
        [x[start + k * fr.hop : start + k * fr.hop + fr.win] for k in range(sum(counts))]
    )
    _, feat = nsnet2._analyse(fr, frames.astype(np.float32))
    return feat


def _warm_state(engine: nsnet2.Denoiser, rows: int, rate: int) -> np.ndarray:
    """A non-zero GRU state per row, ``[rows, 2, hidden]``, from a plain run."""
    counts = np.arange(1, rows + 1, dtype=np.int64)
    feat = _features(rate, counts.tolist(), seed=9)
    zeros = np.zeros((rows, 2, engine.model.hidden), np.float32)
    _, h = engine._run_rows(feat, counts, zeros)
    assert np.abs(h).max() > 0
    return h


def test_option_key_defaults_and_validation() -> None:
    assert runtime.RuntimeOptions().bind_io is False
    assert runtime.RuntimeOptions(device="gpu").bind_io is True
    assert runtime.RuntimeOptions.from_options("cpu", {"io_binding": True}).bind_io is True
    assert runtime.RuntimeOptions.from_options("gpu", {"io_binding": False}).bind_io is False
    assert runtime.RuntimeOptions.from_options("gpu", {"io_binding": None}).bind_io is True
    opts = runtime.RuntimeOptions.from_options("gpu", {"device_id": 1})
    assert opts.device_id == 1
    with pytest.raises(ConfigError, match="io_binding"):
        runtime.RuntimeOptions.from_options("cpu", {"io_binding": "yes"})
    with pytest.raises(ConfigError, match="device_id"):
        runtime.RuntimeOptions.from_options("gpu", {"device_id": "1"})


class _FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self.providers = providers

    def get_providers(self) -> list[str]:
        return self.providers


@pytest.mark.parametrize(
    ("providers", "device"),
    [
        (["CUDAExecutionProvider", "CPUExecutionProvider"], ("cuda", 3)),
        (
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            ("cuda", 3),
        ),
        (["CPUExecutionProvider"], ("cpu", 0)),
    ],
)
def test_binding_device_comes_from_providers_in_use(
    providers: list[str], device: tuple[str, int]
) -> None:
    opts = runtime.RuntimeOptions(device="gpu", device_id=3)
    session: Any = _FakeSession(providers)
    assert runtime.binding_device(session, opts) == device


def test_gpu_request_on_a_cpu_build_binds_cpu_memory(model_dir: Path) -> None:
    """onnxruntime (CPU build) falls back to CPU; the binding must follow the session."""
    model = nsnet2.Model(16000, model_dir=model_dir, options=runtime.RuntimeOptions(device="gpu"))
    assert model.session.get_providers() == ["CPUExecutionProvider"]
    assert model.binding is not None  # gpu turns binding on by default ...
    assert (model.binding.device, model.binding.device_id) == ("cpu", 0)  # ... in CPU memory
    engine = nsnet2.Denoiser(model)
    engine.process([(np.zeros((480, 1), np.float32), None)])
    assert model.binding.state_device == "cpu"


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bound_rows_bit_identical_to_plain(
    pair: Callable[[int, str], Pair], rate: int, variant: str
) -> None:
    plain, bound = pair(rate, variant)
    binding = _binding(bound)
    # What the code reports is what the session says, and the binding follows it.
    assert plain.model.binding is None
    assert bound.model.providers == bound.model.session.get_providers() == ["CPUExecutionProvider"]
    assert binding.providers == bound.model.session.get_providers()
    assert binding.device == "cpu"
    rows = 5
    h_rows = _warm_state(plain, rows, rate)
    for counts in ([4, 4, 4, 4, 4], [5, 2, 5, 1, 3], [1, 6, 1, 1, 2]):
        c = np.array(counts, np.int64)
        feat = _features(rate, counts, seed=sum(counts))
        before = (binding.uploads, binding.downloads, binding.steps)
        g_plain, h_plain = plain._run_rows(feat, c, h_rows.copy())
        g_bound, h_bound = bound._run_rows(feat, c, h_rows.copy())
        assert g_bound.dtype == g_plain.dtype == np.float32
        assert np.array_equal(g_bound, g_plain)
        assert np.array_equal(h_bound, h_plain)
        assert not np.array_equal(h_bound, h_rows)  # the state did advance
        # The state crossed to the host once per distinct row count (rows dropping
        # out), not once per hop; every hop ran bound, on CPU memory.
        crossings = len(set(counts))
        assert binding.uploads - before[0] == crossings
        assert binding.downloads - before[1] == crossings
        assert binding.steps - before[2] == max(counts)
        assert binding.state_device == "cpu"


def _session_audio(rate: int, k: int) -> np.ndarray:
    return noisy_speech(rate, seed=k)[: rate // 2]


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bound_process_with_states_bit_identical(
    pair: Callable[[int, str], Pair], rate: int, variant: str
) -> None:
    """Sessions of different chunk sizes in one batch: non-uniform hop counts, carried state."""
    plain, bound = pair(rate, variant)
    ms = rate // 1000
    sizes = [20 * ms, 10 * ms, 30 * ms, 7 * ms + 3, 20 * ms]  # per session, per message
    audio = [_session_audio(rate, k) for k in range(len(sizes))]
    states: dict[str, list[bytes | None]] = {
        "plain": [None] * len(sizes),
        "bound": [None] * len(sizes),
    }
    pos = [0] * len(sizes)
    before = _binding(bound).steps
    for _ in range(6):
        chunks = []
        for k, size in enumerate(sizes):
            chunks.append(audio[k][pos[k] : pos[k] + size][:, None])
            pos[k] += size
        out = {}
        for name, engine in (("plain", plain), ("bound", bound)):
            out[name] = engine.process(list(zip(chunks, states[name], strict=True)))
            states[name] = [s for _, s in out[name]]
        for (y_p, s_p), (y_b, s_b), chunk in zip(out["plain"], out["bound"], chunks, strict=True):
            assert y_b.shape == chunk.shape
            assert np.array_equal(y_b, y_p)
            assert s_b == s_p
    assert _binding(bound).steps > before
    assert _binding(bound).state_device == "cpu"


def test_bound_offline_stepwise_equals_plain(pair: Callable[[int, str], Pair]) -> None:
    """The int8 graph takes one frame per call, so ``offline`` also runs the hop loop."""
    plain, bound = pair(16000, "int8")
    assert bound.model.frames_per_call == 1
    x = np.stack([noisy_speech(16000, seed=1), noisy_speech(16000, seed=2)], axis=1)[:8000]
    before = _binding(bound).steps
    assert np.array_equal(bound.offline(x), plain.offline(x))
    assert _binding(bound).steps - before == 8000 // 160


def test_binding_failures_are_model_errors(pair: Callable[[int, str], Pair]) -> None:
    _, bound = pair(16000, "fp32")
    binding = _binding(bound)
    binding.set_state(np.zeros((2, 1, bound.model.hidden), np.float32))
    gain = np.empty((1, 1, 161), np.float32)
    with pytest.raises(ModelError, match="inference failed"):
        binding.step({"input": np.zeros((1, 1, 7), np.float32)}, {"output": gain})
    with pytest.raises(ModelError, match="C-contiguous"):
        binding.step({"input": np.zeros((1, 1, 161), np.float32)}, {"output": gain[:, :, ::2]})
    binding.release()
    with pytest.raises(ModelError, match="before set_state"):
        binding.state()
    # Still usable afterwards.
    ((y, _),) = bound.process([(np.zeros((480, 1), np.float32), None)])
    assert y.shape == (480, 1)
