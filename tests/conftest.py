"""Shared test fixtures."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real data beside the repository (``../shared/data``) or ``ROBUSTLIB_DATA_DIR``."""
  path = pathlib.Path(os.environ.get("ROBUSTLIB_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
  if not (path / "mnist").is_dir():
    pytest.skip(f"real data not found at {path} (set ROBUSTLIB_DATA_DIR to a directory "
                "holding mnist/*.gz)")
  return path
