"""Shared fixtures. Data in ../shared is found through ``shared_dir`` only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two test workers share the machine's cores (`-n 2`), and TensorFlow trains in one while numpy or
# scikit-learn works in the other: OpenBLAS's own threads then spin against both, and a probe of
# one second took 12-30 s under that load. One BLAS thread per process (children inherit it); set
# before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGEDGE_SHARED", ROOT.parent / "shared"))
REQUIRE_SHARED = os.environ.get("LUNGEDGE_REQUIRE_SHARED") == "1"
CORAL = "models/coral_mobilenet_v2_quant"


@pytest.fixture(autouse=True)
def _lungedge_logging_restored():
    """A command run in this process (click's runner) configures the ``lungedge`` loggers for a
    terminal session; the next test starts from the library's defaults again."""
    import logging

    loggers = [logging.getLogger("lungedge"), logging.getLogger("lungedge.progress")]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    yield
    for lg, level, handlers, propagate in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


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


#: Marks of the tests the default command leaves out (deselects); ``--full`` (or LUNGEDGE_FULL=1, as
#: CI sets) runs them too. Deselected, not skipped, so a full run's "0 skipped" rule still means something.
FULL_ONLY = ("slow", "needs_shared", "browser", "emulated")
#: The fixtures that read ../shared: a test using one is marked needs_shared even if its author forgot.
SHARED_FIXTURES = {"shared_dir", "coral_dir", "imagenet_weights", "xray_dir", "fullres_dir"}
#: Seconds an unmarked test's own call may take before the run lists it: the default command must
#: stay about three minutes, so anything slower is marked ``slow`` and runs with --full. (Fixtures
#: shared by several tests are set up once; ``--durations`` lists what they cost.)
TIME_LIMIT = float(os.environ.get("LUNGEDGE_TEST_TIME_LIMIT", "10"))


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=os.environ.get("LUNGEDGE_FULL") == "1",
                     help="also run the slow, real-data (../shared), browser and emulated tests "
                          "(default: LUNGEDGE_FULL=1 in the environment)")


def _full(config) -> bool:
    return bool(config.getoption("--full"))


def pytest_report_header(config):
    if _full(config):
        return "lungedge: full suite (slow, real-data, browser and emulated tests included)"
    return ("lungedge: fast suite; the slow, real-data, browser and emulated tests are deselected "
            "(run everything with: python -m pytest --full)")


#: Fixtures that cost minutes and are shared by several tests. With pytest-xdist (the README's
#: ``-n 2 --dist loadgroup``) the tests using one run on the same worker, so each is built once;
#: ``interop_run`` (conftest) is shared across files, the others within their file.
SHARED_EXPENSIVE = ("interop_run", "readme_demo", "trained", "converted", "tiny_run", "xray_gate",
                    "tiny_mobilenet", "run_dir", "int8_file", "server", "tiny_models", "dicoms")


#: The groups that take longest in a full run (measured with ``--durations=0`` in CI rehearsals,
#: heaviest first: the README demo's training, the pipeline runs, the interop models, the training
#: runs). xdist hands groups out in the order of the collection (``--no-loadscope-reorder``, set in
#: ``pytest_configure``), so these start first and the many short groups fill the gaps at the end;
#: by default xdist would order groups by their number of tests, and the two longest, which hold
#: few tests, ran last, one worker alone for their last 15 minutes.
LONGEST_FIRST = ("test_pipeline.py:shared fixtures", "test_pipeline.py:rest", "interop_run",
                 "test_train_run.py:rest", "test_convert.py:shared fixtures", "test_commands.py:shared fixtures",
                 "test_serve.py:shared fixtures", "test_heatmap.py:shared fixtures")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _group_for_workers(items) -> None:
    """An xdist group per file (needs pytest < 9.2: github.com/pytest-dev/pytest-xdist/issues/1386),
    split into the tests that use one of its expensive fixtures and the rest (``interop_run``'s tests,
    from several files, form one group): ``loadgroup`` then spreads the suite over the workers
    without building a fixture twice. The items are then ordered so that
    the groups of LONGEST_FIRST come first (a stable sort: the order within a group is kept)."""
    groups = {}
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "interop_run" in names:
            group = "interop_run"
        else:
            shared = any(f in names for f in SHARED_EXPENSIVE)
            group = f"{Path(str(item.fspath)).name}:{'shared fixtures' if shared else 'rest'}"
        item.add_marker(pytest.mark.xdist_group(group))
        groups[item.nodeid] = group
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item.nodeid], len(rank)))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark tests that use ../shared; deselect the full-only tests unless --full; without
    TensorFlow installed, needs_tf tests skip with a reason (a device install)."""
    import importlib.util

    for item in items:
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.needs_shared)
    if config.pluginmanager.hasplugin("xdist"):
        _group_for_workers(items)
    if not _full(config):
        keep = [i for i in items if not any(m in i.keywords for m in FULL_ONLY)]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    if importlib.util.find_spec("tensorflow") is not None:
        return
    skip = pytest.mark.skip(reason="TensorFlow not installed (pip install 'lungedge[train]')")
    for item in items:
        if "needs_tf" in item.keywords:
            item.add_marker(skip)


_OVER_TIME: list = []


def pytest_runtest_logreport(report):
    """The time watch: an unmarked test whose call takes longer than TIME_LIMIT is listed at the end
    of the run, so that the default command cannot slowly grow back to half an hour. Listed, not
    failed: a duration depends on the machine, and a test's verdict must not. (A report hook, so
    that it also sees the tests pytest-xdist's workers ran.)"""
    if (report.when == "call" and report.passed and report.duration > TIME_LIMIT
            and not any(m in report.keywords for m in FULL_ONLY)):
        _OVER_TIME.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter):
    if _OVER_TIME:
        terminalreporter.section("unmarked tests over the time limit")
        terminalreporter.write_line(f"these took longer than the {TIME_LIMIT:g} s an unmarked test may take on this "
                                    "machine: mark them slow (they then run with --full) or make them faster")
        for nodeid, seconds in sorted(_OVER_TIME, key=lambda x: -x[1]):
            terminalreporter.write_line(f"  {seconds:6.1f} s  {nodeid}")


#: Every variant ``convert`` can write.
ALL_VARIANTS = ("float32", "float16", "dynamic", "int8", "uint8", "int8-float-io", "int8-mixed")


@pytest.fixture(scope="session")
def interop_run(xray_dir, tmp_path_factory) -> Path:
    """A run folder with a small real model and every variant converted by ``convert_run``.

    MobileNetV2 alpha 0.35 at 96 px from random initialisation (BatchNorm momentum 0.9, so a
    few steps settle its statistics), trained for 8 epochs on 300 real chest X-rays: it learns
    (measured: P(PNEUMONIA) 0.000-0.48 on the 12 normal full-resolution X-rays, 0.85-1.0 on 11 of
    the 12 pneumonia ones; 6 epochs called all 24 pneumonia), so its outputs vary between images
    and agreement between two runtimes means something. Converted without bias correction to keep the fixture under
    about 90 s on 2 cores (the uint8 bias correction has its own test).
    """
    import csv

    import keras
    import numpy as np

    from lungedge.convert.conversion import convert_run
    from lungedge.edge_runtime.image_files import list_labelled_folder
    from lungedge.edge_runtime.preprocess import preprocess
    from lungedge.edge_runtime.spec import ModelSpec, Preprocessing

    keras.utils.set_random_seed(0)
    size, per_class = 96, 150
    files = list_labelled_folder(str(xray_dir))
    rng = np.random.default_rng(0)
    train = []
    for c, name in enumerate(files.class_names):
        idx = rng.permutation([i for i, y in enumerate(files.labels) if y == c])[:per_class]
        train += [(files.paths[i], name) for i in idx]
    pre = Preprocessing(size, size)
    labels = tuple(files.class_names)
    x = np.stack([preprocess(p, pre) for p, _ in train])
    y = np.array([labels.index(n) for _, n in train])
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, include_top=False, weights=None)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    inp = keras.Input((size, size, 3), name="image")
    model = keras.Model(inp, keras.layers.Dense(len(labels), activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(base(inp))))
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=8, batch_size=32, verbose=0, shuffle=True)
    run = tmp_path_factory.mktemp("interop") / "run"
    run.mkdir()
    model.save(run / "model.keras")
    spec = ModelSpec(labels=labels, preprocessing=pre, positive_label="PNEUMONIA", recipe="test-interop")
    (run / "spec.json").write_text(spec.to_json())
    with open(run / "split_manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows([p, n, "train"] for p, n in train)
        w.writerows([p, n, "test"] for p, n in train[::10])
    # the gate as users get it (learning floor and the default limits): the model learned, and the
    # float variants must follow it; an integer variant may fail, and the report must say why
    report = convert_run(run, variants=ALL_VARIANTS, calibration_count=16, bias_correction=False)
    rows = {v["variant"]: v for v in report["variants"]}
    for name in ("float32", "float16", "dynamic"):
        assert rows[name]["gate"] == "passed", (name, rows[name]["gate_reasons"])
    for v in rows.values():
        assert v["gate"] == ("failed" if v["gate_reasons"] else "passed"), v
    return run
