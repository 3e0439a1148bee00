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


@pytest.fixture(scope="session")
def coral_dir(shared_dir) -> Path:
    d = shared_dir / CORAL
    if not (d / "mobilenet_v2_1.0_224_quant.tflite").is_file():
        _missing_shared(f"third-party TFLite models not found in {d}")
    return d


@pytest.fixture(scope="session")
def imagenet_weights(shared_dir) -> Path:
    p = shared_dir / "models/mobilenet_v2_imagenet/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    if not p.is_file():
        _missing_shared(f"MobileNetV2 ImageNet weights not found at {p}")
    return p


@pytest.fixture(scope="session")
def xray_dir(shared_dir) -> Path:
    d = shared_dir / "data/chest_xray/train"
    if not d.is_dir():
        _missing_shared(f"chest X-ray data not found at {d}")
    return d


@pytest.fixture(scope="session")
def ct_dir(shared_dir) -> Path:
    d = shared_dir / "data/iq_othnccd/The IQ-OTHNCCD lung cancer dataset"
    if not d.is_dir():
        _missing_shared(f"IQ-OTH/NCCD data not found at {d}")
    return d


@pytest.fixture(scope="session")
def fullres_dir(shared_dir) -> Path:
    d = shared_dir / "data/chest_xray_fullres"
    if not d.is_dir():
        _missing_shared(f"full-resolution X-rays not found at {d}")
    return d


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
