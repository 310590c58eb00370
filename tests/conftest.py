"""Shared fixtures. Real models are fetched on demand (see tests/realmodels.py) and skipped if unavailable."""
from __future__ import annotations

import pathlib

import pytest

import realmodels


@pytest.fixture(scope="session")
def ppocr_det() -> pathlib.Path:
    """Path to PP-OCRv4 det ONNX (input ``x``: [N, 3, H, W], H and W multiples of 32)."""
    try:
        return realmodels.ppocr_det_path()
    except realmodels.RealModelUnavailable as exc:
        pytest.skip(f"PP-OCRv4 det model not available: {exc}")
