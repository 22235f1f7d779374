from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from audiostream.errors import ErrorCode, ModelError
from audiostream.models import prepare, runtime


def test_cpu_session_and_error_conversion(model_dir: Path, tmp_path: Path) -> None:
    opts = runtime.RuntimeOptions(intra_op_threads=2)
    session = runtime.create_session(model_dir / prepare.SILERO_NAME, opts)
    assert runtime.providers_in_use(session) == ["CPUExecutionProvider"]
    with pytest.raises(ModelError, match="inference failed") as err:
        runtime.run(session, {"input": np.zeros((1, 576), np.float32)})  # state, sr missing
    assert err.value.code is ErrorCode.MODEL_ERROR
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        runtime.create_session(bogus, opts)


def test_options_from_worker_context() -> None:
    opts = runtime.RuntimeOptions.from_options("gpu", {"intra_op_threads": 4, "tensorrt": True})
    assert (opts.device, opts.intra_op_threads, opts.tensorrt) == ("gpu", 4, True)
    assert runtime.requested_providers(runtime.RuntimeOptions())[-1] == "CPUExecutionProvider"
    with pytest.raises(Exception, match="intra_op_threads"):
        runtime.RuntimeOptions.from_options("cpu", {"intra_op_threads": "2"})
