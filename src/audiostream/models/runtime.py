"""ONNX Runtime sessions: the one module that talks to onnxruntime directly.

Every onnxruntime exception is converted to ``ModelError`` here. The GPU path
never trusts the request: onnxruntime-gpu lists CUDA/TensorRT as *available*
even without a GPU, logs an error and quietly runs on CPU, so we read
``session.get_providers()`` and warn when the truth is CPU only.

``RecurrentBinding`` runs stateful graphs step by step with I/O binding, so a
recurrent state stays where the session computes (GPU memory under CUDA)
instead of crossing PCIe twice per 10 ms hop.
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
    device_id: int = 0
    """CUDA device ordinal on ``gpu``; ignored on ``cpu``."""
    io_binding: bool | None = None
    """Step recurrent models with I/O binding; ``None`` means on for ``gpu``, off for ``cpu``.

    On CUDA it keeps the GRU state on the device between hops. On CPU there is
    no copy to save: it gives the same bits and measured 0-8 % slower per call
    (a few bind calls per hop), so plain ``session.run`` stays the CPU default.
    """

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(
                f"device must be one of {', '.join(DEVICES)}, got {self.device!r}",
                ErrorCode.CONFIG_ERROR,
            )
        if not 1 <= self.intra_op_threads <= 256:
            raise ConfigError("intra_op_threads must be in 1..256", ErrorCode.CONFIG_ERROR)
        if not 0 <= self.device_id <= 255:
            raise ConfigError("device_id must be in 0..255", ErrorCode.CONFIG_ERROR)

    @property
    def bind_io(self) -> bool:
        """Whether recurrent models are stepped with I/O binding (``io_binding`` resolved)."""
        return self.device == "gpu" if self.io_binding is None else self.io_binding

    @classmethod
    def from_options(cls, device: str, options: Mapping[str, Any]) -> RuntimeOptions:
        """From ``ProcessorContext`` (keys ``intra_op_threads``, ``tensorrt``, ``device_id``,
        ``io_binding``: a bool, or absent/``None`` for the per-device default)."""
        threads = options.get("intra_op_threads", 1)
        if not isinstance(threads, int) or isinstance(threads, bool):
            raise ConfigError("intra_op_threads must be an integer", ErrorCode.CONFIG_ERROR)
        device_id = options.get("device_id", 0)
        if not isinstance(device_id, int) or isinstance(device_id, bool):
            raise ConfigError("device_id must be an integer", ErrorCode.CONFIG_ERROR)
        binding = options.get("io_binding")
        if binding is not None and not isinstance(binding, bool):
            raise ConfigError("io_binding must be true or false", ErrorCode.CONFIG_ERROR)
        return cls(
            device=device,
            intra_op_threads=threads,
            tensorrt=bool(options.get("tensorrt")),
            device_id=device_id,
            io_binding=binding,
        )


def requested_providers(options: RuntimeOptions) -> list[str | tuple[str, dict[str, Any]]]:
    if options.device == "cpu":
        return ["CPUExecutionProvider"]
    chain: list[str | tuple[str, dict[str, Any]]] = []
    available = set(_ort().get_available_providers())
    if options.tensorrt:
        if "TensorrtExecutionProvider" in available:
            chain.append(
                (
                    "TensorrtExecutionProvider",
                    {"trt_fp16_enable": True, "device_id": options.device_id},
                )
            )
        else:
            log.warning("TensorRT requested but this onnxruntime build has no TensorRT provider")
    if "CUDAExecutionProvider" in available:
        chain.append(("CUDAExecutionProvider", {"device_id": options.device_id}))
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


#: Providers whose tensors live in CUDA memory (TensorRT runs on CUDA buffers too).
_CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def binding_device(session: ort.InferenceSession, options: RuntimeOptions) -> tuple[str, int]:
    """``(device type, id)`` for bound tensors, from the providers the session really uses.

    Not from the request: a ``gpu`` request that fell back to CPU must bind CPU
    memory, or every step would copy to a device nobody computes on.
    """
    if any(p in _CUDA_PROVIDERS for p in session.get_providers()):
        return "cuda", options.device_id
    return "cpu", 0


class RecurrentBinding:
    """Steps a graph whose state output feeds its own state input, state kept on device.

    Each ``step`` binds host inputs (ORT copies them to the device), feeds the
    state from the previous step's device buffer, writes it into a second
    device buffer (the two swap every step, so no allocation per step) and
    writes the other outputs straight into host arrays the caller provides.
    The state crosses to the host only in ``state()``; ``uploads`` and
    ``downloads`` count those crossings (metrics, tests). One user at a time:
    the caller holds the model's lock.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        options: RuntimeOptions,
        *,
        state_in: str,
        state_out: str,
    ) -> None:
        self.session = session
        self.providers = providers_in_use(session)
        self.device, self.device_id = binding_device(session, options)
        self.state_in, self.state_out = state_in, state_out
        self.uploads = self.downloads = self.steps = 0
        self.state_device: str | None = None
        """``device_name()`` of the last state the session wrote: where it really lived."""
        try:
            self._binding = session.io_binding()
        except Exception as exc:  # onnxruntime raises its own pybind11 exception types
            raise ModelError(f"cannot bind I/O: {exc}", ErrorCode.MODEL_ERROR) from exc
        self._state: Any = None
        self._spare: Any = None

    def set_state(self, state: np.ndarray[Any, Any]) -> None:
        """Copy ``state`` (host) to the device as the next step's state input."""
        host = np.ascontiguousarray(state, dtype=np.float32)
        value = _ort().OrtValue
        try:
            self._state = value.ortvalue_from_shape_and_type(
                host.shape, np.float32, self.device, self.device_id
            )
            self._state.update_inplace(host)
            self._spare = value.ortvalue_from_shape_and_type(
                host.shape, np.float32, self.device, self.device_id
            )
        except Exception as exc:  # onnxruntime raises its own pybind11 exception types
            raise ModelError(
                f"cannot place state on {self.device}: {exc}", ErrorCode.MODEL_ERROR
            ) from exc
        self.uploads += 1

    def step(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Mapping[str, np.ndarray[Any, Any]],
    ) -> None:
        """One run: ``inputs`` from host arrays; each of ``outputs`` is written in place."""
        if self._state is None:
            raise ModelError("RecurrentBinding.step before set_state")
        for name, out in outputs.items():
            # ORT writes through the raw pointer: it must be exactly this array's memory.
            if not (out.flags.c_contiguous and out.flags.writeable):
                raise ModelError(f"output buffer for {name!r} must be C-contiguous and writable")
        b = self._binding
        # Held until the run is over: a binding may point into these arrays' memory.
        held = {name: np.ascontiguousarray(arr) for name, arr in inputs.items()}
        try:
            for name, arr in held.items():
                b.bind_cpu_input(name, arr)
            b.bind_ortvalue_input(self.state_in, self._state)
            b.bind_ortvalue_output(self.state_out, self._spare)
            for name, out in outputs.items():
                b.bind_output(name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
            if self.device != "cpu":
                b.synchronize_inputs()
            self.session.run_with_iobinding(b)
            if self.device != "cpu":
                b.synchronize_outputs()
        except Exception as exc:  # onnxruntime raises its own pybind11 exception types
            raise ModelError(f"inference failed: {exc}", ErrorCode.MODEL_ERROR) from exc
        self._state, self._spare = self._spare, self._state
        self.state_device = str(self._state.device_name())
        self.steps += 1

    def state(self) -> np.ndarray[Any, Any]:
        """The current state, copied to the host (CPU OrtValues' ``numpy()`` is a view)."""
        if self._state is None:
            raise ModelError("RecurrentBinding.state before set_state")
        self.downloads += 1
        return np.array(self._state.numpy(), dtype=np.float32, copy=True)

    def release(self) -> None:
        """Drop the bound buffers, so a finished batch keeps no device memory or pointers."""
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        self._state = self._spare = None


def versions() -> dict[str, str]:
    return {"onnxruntime": str(_ort().__version__)}
