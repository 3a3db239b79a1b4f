"""Fixtures of the reliability suite."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def model_copy(tmp_path, trained_workspace) -> Path:
    """A private copy of the trained model folder, for tests that damage it."""
    source = Path(trained_workspace["result"]["model_dir"])
    target = tmp_path / "models" / source.name
    shutil.copytree(source, target)
    return target
