"""Shared fixtures. Model folders are built by `make model-all` (which `make test` runs first)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL_NAME = "smollm2-135m-instruct"


def _model_dir(precision: str) -> Path:
    base = os.environ.get("SLUICE_TEST_MODELS", str(ROOT / "models"))
    path = Path(base) / f"{MODEL_NAME}-{precision}"
    if not (path / "model.onnx").exists():
        pytest.fail(f"model folder {path} is missing: run `make model-all` (make test does)")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default int4 export of the embedded model."""
    return _model_dir("int4")


@pytest.fixture(scope="session")
def model_dir_int8() -> Path:
    return _model_dir("int8")


@pytest.fixture(scope="session")
def model_dir_fp32() -> Path:
    return _model_dir("fp32")
