"""Configuration of the pytest-benchmark suite (runs with only the ``edge`` and ``bench`` extras).

Which models: ``--models GLOB[,GLOB...]`` or ``LUNGEDGE_BENCH_MODELS``; default the
third-party Coral models in ``../shared``. Images: ``--bench-images DIR`` or
``LUNGEDGE_BENCH_IMAGES``; default ``../shared/data/chest_xray_fullres``. Threads:
``--bench-threads 1,2,4`` (default 1, 2 and the core count). Backends: every importable one
(LiteRT, tflite-runtime) unless ``--bench-backends`` names some. Rounds: ``--bench-rounds``,
``--bench-warmup``.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGEDGE_SHARED", ROOT.parent / "shared"))
CORAL = SHARED / "models/coral_mobilenet_v2_quant"
DEFAULT_MODELS = [CORAL / "mobilenet_v2_1.0_224_quant.tflite", CORAL / "mobilenet_v1_0.25_128_quant.tflite"]
DEFAULT_IMAGES = SHARED / "data/chest_xray_fullres"


def pytest_addoption(parser):
    g = parser.getgroup("lungedge bench")
    g.addoption("--models", default=os.environ.get("LUNGEDGE_BENCH_MODELS"),
                help="Comma-separated globs of .tflite models (env LUNGEDGE_BENCH_MODELS; default: Coral models in ../shared).")
    g.addoption("--bench-images", default=os.environ.get("LUNGEDGE_BENCH_IMAGES"),
                help="Folder of real images for the end-to-end timings (default ../shared/data/chest_xray_fullres).")
    g.addoption("--bench-threads", default=None, help="Comma-separated thread counts (default: 1, 2 and the core count).")
    g.addoption("--bench-backends", default=None, help="Comma-separated backends (default: every importable one).")
    g.addoption("--bench-rounds", type=int, default=50, help="Timed rounds per benchmark (default 50).")
    g.addoption("--bench-warmup", type=int, default=5, help="Untimed warm-up rounds (default 5).")


def _models(config) -> list:
    spec = config.getoption("--models")
    if not spec:
        return [str(p) for p in DEFAULT_MODELS if p.is_file()]
    found = []
    for pattern in spec.split(","):
        pattern = pattern.strip()
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        found.extend(m for m in matches if m not in found)
    return found


def _threads(config) -> list:
    raw = config.getoption("--bench-threads")
    if raw:
        return [int(x) for x in raw.split(",") if x.strip()]
    return sorted({1, 2, os.cpu_count() or 1})


def _backends(config) -> list:
    from lungedge.edge_runtime.backend import available_backends

    raw = config.getoption("--bench-backends")
    have = available_backends()
    return [b for b in raw.split(",") if b in have] if raw else have


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    if "case" in metafunc.fixturenames:
        cases = [(m, b, t) for m in _models(cfg) for b in _backends(cfg) for t in _threads(cfg)]
        metafunc.parametrize("case", cases, ids=[f"{Path(m).stem}-{b}-t{t}" for m, b, t in cases], scope="session")
    elif "model_path" in metafunc.fixturenames:
        models = _models(cfg)
        metafunc.parametrize("model_path", models, ids=[Path(m).stem for m in models], scope="session")


@pytest.fixture(scope="session")
def bench_settings(pytestconfig) -> dict:
    return {"rounds": pytestconfig.getoption("--bench-rounds"), "warmup": pytestconfig.getoption("--bench-warmup")}


@pytest.fixture(scope="session")
def bench_images(pytestconfig) -> list:
    """Readable real images (paths); skip when none are available."""
    from lungedge.edge_runtime.bench import _usable_images

    folder = pytestconfig.getoption("--bench-images") or str(DEFAULT_IMAGES)
    if not Path(folder).exists():
        pytest.skip(f"benchmark images not found at {folder}; pass --bench-images DIR")
    ok, failures = _usable_images([folder])
    if not ok:
        pytest.skip(f"no readable images in {folder} ({len(failures)} unreadable)")
    return ok


_CACHE: dict = {}


def _classifier(model: str, backend: str, threads):
    """One Classifier per (model, backend, threads) for the whole session, like a device keeps one."""
    from lungedge.edge_runtime.bench import _labels_for
    from lungedge.edge_runtime.classifier import Classifier

    key = (model, backend, threads)
    if key not in _CACHE:
        _CACHE[key] = Classifier(model, threads=threads, backend=backend,
                                 labels=_labels_for(model, backend, None), use_threshold=False,
                                 allow_out_of_domain=True)
    return _CACHE[key]


@pytest.fixture(scope="session")
def classifier_factory():
    return _classifier


@pytest.fixture()
def clf(case):
    """The Classifier of this (model, backend, threads) case; a model that fails to load fails its tests."""
    model, backend, threads = case
    return _classifier(model, backend, threads)
