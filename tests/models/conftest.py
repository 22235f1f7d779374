"""Fixtures for model tests: one prepared model dir per test session, and test audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from audiostream.models import prepare
from tests.models.signals import load_speech


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models derived once (about 3 s) into a temporary directory."""
    directory = tmp_path_factory.mktemp("models")
    assert prepare.prepare(directory) is True
    return directory


@pytest.fixture(scope="session")
def speech16() -> np.ndarray:
    return load_speech(16000)
