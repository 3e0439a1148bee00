"""Shared fixtures. Data in ../shared is found through ``shared_dir`` only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGEDGE_SHARED", ROOT.parent / "shared"))
REQUIRE_SHARED = os.environ.get("LUNGEDGE_REQUIRE_SHARED") == "1"
CORAL = "models/coral_mobilenet_v2_quant"


def _missing_shared(reason: str):
    if REQUIRE_SHARED:
        pytest.fail(f"{reason} (LUNGEDGE_REQUIRE_SHARED=1 makes this a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ../shared folder (real data and models); skip, or fail in CI, if absent."""
    if not (SHARED / "README.md").is_file():
        _missing_shared(f"real data not found at {SHARED}; set LUNGEDGE_SHARED or put shared/ beside the repo")
    return SHARED


def _require(path: Path, what: str) -> Path:
    """``path`` inside ../shared, or skip (fail in CI) saying what is missing."""
    if not path.exists():
        _missing_shared(f"{what} not found at {path}")
    return path


@pytest.fixture(scope="session")
def coral_dir(shared_dir) -> Path:
    d = shared_dir / CORAL
    _require(d / "mobilenet_v2_1.0_224_quant.tflite", "third-party TFLite models")
    return d


@pytest.fixture(scope="session")
def imagenet_weights(shared_dir) -> Path:
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    return _require(shared_dir / "models/mobilenet_v2_imagenet" / name, "MobileNetV2 ImageNet weights")


@pytest.fixture(scope="session")
def xray_dir(shared_dir) -> Path:
    return _require(shared_dir / "data/chest_xray/train", "chest X-ray data")


@pytest.fixture(scope="session")
def fullres_dir(shared_dir) -> Path:
    return _require(shared_dir / "data/chest_xray_fullres", "full-resolution X-rays")


def pytest_collection_modifyitems(config, items):
    """Without TensorFlow installed, needs_tf tests skip with a reason (a device install)."""
    try:
        import importlib.util

        has_tf = importlib.util.find_spec("tensorflow") is not None
    except Exception:  # pragma: no cover
        has_tf = False
    if has_tf:
        return
    skip = pytest.mark.skip(reason="TensorFlow not installed (pip install 'lungedge[train]')")
    for item in items:
        if "needs_tf" in item.keywords:
            item.add_marker(skip)
