"""ONNX Runtime sessions: the one module that talks to onnxruntime directly.

Every onnxruntime exception is converted to ``ModelError`` here. The GPU path
never trusts the request: onnxruntime-gpu lists CUDA/TensorRT as *available*
even without a GPU, logs an error and quietly runs on CPU, so we read
``session.get_providers()`` and warn when the truth is CPU only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from audiostream.errors import ConfigError, ErrorCode, ModelError

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu")
_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def _ort() -> Any:
    """Import onnxruntime on first use, so gateways run without it installed."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(
            "onnxruntime is not installed: pip install 'audiostream[cpu]' (or '[gpu]' for "
            "onnxruntime-gpu; never both)"
        ) from exc
    return onnxruntime


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeOptions:
    """How to run models on one worker.

    One intra-op thread by default: a worker serves many streams, so throughput
    comes from batching and from running more worker processes, not from
    splitting one small GEMM over cores.
    """

    device: str = "cpu"
    intra_op_threads: int = 1
    tensorrt: bool = False
    """Put TensorRT before CUDA on ``gpu`` (engine builds take minutes on first use)."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(
                f"device must be one of {', '.join(DEVICES)}, got {self.device!r}",
                ErrorCode.CONFIG_ERROR,
            )
        if not 1 <= self.intra_op_threads <= 256:
            raise ConfigError("intra_op_threads must be in 1..256", ErrorCode.CONFIG_ERROR)

    @classmethod
    def from_options(cls, device: str, options: Mapping[str, Any]) -> RuntimeOptions:
        """From ``ProcessorContext`` (keys ``intra_op_threads``, ``tensorrt``)."""
        threads = options.get("intra_op_threads", 1)
        if not isinstance(threads, int) or isinstance(threads, bool):
            raise ConfigError("intra_op_threads must be an integer", ErrorCode.CONFIG_ERROR)
        return cls(device=device, intra_op_threads=threads, tensorrt=bool(options.get("tensorrt")))


def requested_providers(options: RuntimeOptions) -> list[str | tuple[str, dict[str, Any]]]:
    if options.device == "cpu":
        return ["CPUExecutionProvider"]
    chain: list[str | tuple[str, dict[str, Any]]] = []
    available = set(_ort().get_available_providers())
    if options.tensorrt:
        if "TensorrtExecutionProvider" in available:
            chain.append(("TensorrtExecutionProvider", {"trt_fp16_enable": True}))
        else:
            log.warning("TensorRT requested but this onnxruntime build has no TensorRT provider")
    if "CUDAExecutionProvider" in available:
        chain.append("CUDAExecutionProvider")
    else:
        log.warning(
            "device=gpu but this onnxruntime build has no CUDA provider "
            "(install onnxruntime-gpu instead of onnxruntime); using CPU"
        )
    chain.append("CPUExecutionProvider")
    return chain


def create_session(
    path: Path,
    options: RuntimeOptions,
    *,
    optimization: str = "ORT_ENABLE_ALL",
) -> ort.InferenceSession:
    """A throughput-tuned session for ``path`` on ``options.device``."""
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimization not in _LEVELS:
        raise ModelError(f"unknown graph optimisation level {optimization!r}")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    providers = requested_providers(options)
    try:
        session = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind11 exception types
        raise ModelError(f"cannot load model {path}: {exc}", ErrorCode.MODEL_ERROR) from exc
    used = session.get_providers()
    if options.device == "gpu" and used == ["CPUExecutionProvider"]:
        log.warning("device=gpu requested for %s but running on CPU only: %s", path.name, used)
    else:
        log.info("loaded %s on %s", path.name, used)
    return session


def providers_in_use(session: ort.InferenceSession) -> list[str]:
    """The execution providers the session really uses, best first."""
    return list(session.get_providers())


def run(
    session: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray[Any, Any]],
    outputs: Sequence[str] | None = None,
) -> list[np.ndarray[Any, Any]]:
    """``session.run`` with onnxruntime failures turned into ModelError."""
    try:
        result = session.run(list(outputs) if outputs is not None else None, dict(feeds))
    except Exception as exc:  # onnxruntime raises its own pybind11 exception types
        raise ModelError(f"inference failed: {exc}", ErrorCode.MODEL_ERROR) from exc
    return [np.asarray(r) for r in result]


def versions() -> dict[str, str]:
    return {"onnxruntime": str(_ort().__version__)}
