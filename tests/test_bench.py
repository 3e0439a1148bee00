"""Benchmark library and ``lungedge bench``: reports, robustness, comparison.

Third-party models (``coral_dir``) run without TensorFlow; a tiny MobileNetV2 of our own
(alpha 0.35, 96 px, weights=None), converted with tf.lite, checks metadata, int8 and accuracy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lungedge.edge_runtime import bench, bench_isolate
from lungedge import bench_report
from lungedge.edge_runtime.errors import ConfigError
from lungedge.edge_runtime.metadata import embed_spec
from lungedge.edge_runtime.spec import ModelSpec, Preprocessing

RUNS = 4


def _xray_like(seed: int, size=(300, 260)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = 128 + 80 * np.sin(xx / (12 + seed)) * np.cos(yy / 17)
    return np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """Two good JPEGs, a truncated one and an empty one."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        Image.fromarray(_xray_like(i)).save(d / f"good{i}.jpeg", quality=90)
    data = (d / "good0.jpeg").read_bytes()
    (d / "truncated.jpeg").write_bytes(data[: len(data) // 3])
    (d / "empty.jpeg").write_bytes(b"")
    return d


def _check_summary(s: dict, runs: int) -> None:
    assert s["n"] == runs and len(s["raw_ms"]) == runs
    assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["p50_ms"] == pytest.approx(float(np.percentile(s["raw_ms"], 50)), rel=1e-6, abs=1e-5)


# ---- third-party models, no TensorFlow ------------------------------------------------------
@pytest.mark.needs_shared
def test_report_has_every_measurement_and_survives_bad_models_and_images(coral_dir, image_folder, tmp_path):
    good = coral_dir / "mobilenet_v1_0.25_128_quant.tflite"
    broken = coral_dir / "model_invoking_error.tflite"
    missing = tmp_path / "nope.tflite"
    report = bench.run_bench([good, broken, missing], images=[image_folder], threads=[1, 2], runs=RUNS, warmup=1)

    assert report["schema"] == "lungedge.bench/1"
    assert {"cpu", "cores", "arch", "os", "python"} <= set(report["machine"])
    ok, bad, gone = report["models"]
    assert ok["status"] == "ok", ok["error"]
    assert ok["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert ok["size_bytes"] == good.stat().st_size
    assert ok["backend"] in ("litert", "tflite-runtime") and ok["backend_version"]
    assert ok["peak_rss_mb"] > 10
    assert ok["images"]["count"] == 2
    assert sorted(Path(f["source"]).name for f in ok["images"]["failures"]) == ["empty.jpeg", "truncated.jpeg"]
    assert [r["threads"] for r in ok["runs"]] == [1, 2]
    for r in ok["runs"]:
        for what in ("invoke", "classify_decoded", "preprocess", "end_to_end"):
            _check_summary(r[what], RUNS)
        assert r["startup_ms"] > 0 and r["first_invoke_ms"] > 0 and r["first_classify_ms"] > 0
        # the Coral uint8 model: LiteRT's XNNPACK takes most of it (2 partitions measured); tflite-runtime
        # 2.14 may take none, so only LiteRT's count is pinned
        if ok["backend"] == "litert":
            assert r["delegate_nodes"] >= 1
        assert r["throughput_ips"] == pytest.approx(1e3 / r["end_to_end"]["mean_ms"])
        # end to end contains the invoke, so its median cannot be below the bare invoke's minimum
        assert r["end_to_end"]["p50_ms"] >= r["invoke"]["min_ms"]

    assert bad["status"] == "error" and "fake-op-double" in bad["error"]
    assert gone["status"] == "error" and "not found" in gone["error"] and str(missing) in gone["error"]

    paths = bench_report.write_report(report, tmp_path / "out")
    assert json.loads(Path(paths["json"]).read_text())["models"][0]["runs"][0]["invoke"]["raw_ms"]
    md = Path(paths["md"]).read_text()
    assert md.count("| mobilenet_v1_0.25_128_quant.tflite |") == 2
    assert "FAILED: " in md and "nope.tflite" in md and "truncated.jpeg" in md
    pytest.importorskip("matplotlib")
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.needs_shared
def test_a_hung_model_process_is_an_error_row(coral_dir):
    report = bench.run_bench([coral_dir / "mobilenet_v1_0.25_128_quant.tflite"], runs=2, warmup=0, threads=[1],
                             timeout_s=0.01)
    (m,) = report["models"]
    assert m["status"] == "error" and "timed out" in m["error"]


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="threads"):
        bench.run_bench(["x.tflite"], threads=[0])
    with pytest.raises(ConfigError, match="runs"):
        bench.run_bench(["x.tflite"], runs=0)
    with pytest.raises(ConfigError, match="no models"):
        bench.run_bench([])


def test_load_report_refuses_other_files(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"schema": "something/2"}))
    with pytest.raises(ConfigError, match="something/2"):
        bench_report.load_report(p)
    p.write_text("not json")
    with pytest.raises(ConfigError, match="not a JSON report"):
        bench_report.load_report(p)


# ---- the CLI ----------------------------------------------------------------------------------
def _cli():
    from lungedge.cli import main

    return main


@pytest.mark.needs_shared
def test_cli_bench_and_compare(coral_dir, tmp_path):
    """The real 224 uint8 model; two 'machines' merged by --compare."""
    model = tmp_path / "m" / "mobilenet_v2_1.0_224_quant.tflite"
    model.parent.mkdir()
    shutil.copy(coral_dir / "mobilenet_v2_1.0_224_quant.tflite", model)
    runner = CliRunner()
    res = runner.invoke(_cli(), ["bench", str(model), "--images", str(coral_dir / "cat.bmp"), "--threads", "1",
                                 "--runs", "3", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    out = model.parent / "bench"  # the run-folder default
    report = json.loads((out / "bench_report.json").read_text())
    assert report["models"][0]["status"] == "ok"
    assert "| mobilenet_v2_1.0_224_quant.tflite |" in res.output

    other = json.loads(json.dumps(report))
    other["machine"]["hostname"], other["machine"]["arch"] = "pi4", "aarch64"
    (tmp_path / "pi4.json").write_text(json.dumps(other))
    res = runner.invoke(_cli(), ["bench", "--compare", str(out / "bench_report.json"), str(tmp_path / "pi4.json"),
                                 "-o", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "cmp" / "compare_report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("|") and "mobilenet_v2_1.0_224_quant.tflite" in ln]
    assert len(rows) == 2 and any("pi4/aarch64" in r for r in rows)
    assert json.loads((tmp_path / "cmp" / "compare_report.json").read_text())["kind"] == "comparison"


@pytest.mark.needs_shared
def test_cli_exit_code_1_when_a_model_fails(coral_dir, tmp_path):
    res = CliRunner().invoke(_cli(), ["bench", str(coral_dir / "mobilenet_v1_0.25_128_quant.tflite"),
                                      str(tmp_path / "missing.tflite"), "--runs", "2", "--warmup", "0",
                                      "--threads", "1", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "error: missing.tflite: model file not found" in res.output
    assert (tmp_path / "o" / "bench_report.md").is_file()


def test_cli_usage_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(_cli(), ["bench", "x.tflite", "--threads", "1,zero"])
    assert res.exit_code == 2 and "--threads must be comma-separated integers" in res.output
    res = runner.invoke(_cli(), ["bench", "--compare", str(tmp_path / "none.json")])
    assert res.exit_code == 2 and "report not found" in res.output


# ---- our own model, converted with tf.lite -----------------------------------------------------
@pytest.fixture(scope="session")
def tiny_mobilenet(tmp_path_factory) -> dict:
    """MobileNetV2 alpha 0.35 at 96 px (weights=None), float32 and int8 with lungedge metadata."""
    pytest.importorskip("tensorflow")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None,
                                          pooling="avg")
    model = keras.Sequential([base, keras.layers.Dense(2, activation="softmax")])
    spec = ModelSpec(labels=("NORMAL", "PNEUMONIA"), positive_label="PNEUMONIA",
                     preprocessing=Preprocessing(height=96, width=96), recipe="test-tiny")
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("bench_models")
    paths = {}
    for variant in ("float32", "int8"):
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if variant == "int8":
            def rep():
                for _ in range(8):
                    yield [rng.uniform(-1, 1, (1, 96, 96, 3)).astype(np.float32)]

            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = rep
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        p = d / f"model_{variant}.tflite"
        p.write_bytes(embed_spec(conv.convert(), spec.replace(variant=variant)))
        paths[variant] = p
    return paths


@pytest.mark.needs_tf
@pytest.mark.slow
def test_own_models_with_accuracy(tiny_mobilenet, tmp_path):
    data = tmp_path / "data"
    for k, cls in enumerate(("NORMAL", "PNEUMONIA")):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_xray_like(10 * k + i)).save(data / cls / f"{i}.png")
    report = bench.run_bench([tiny_mobilenet["float32"], tiny_mobilenet["int8"]], images=[data], threads=[1],
                             runs=RUNS, warmup=1, data_dir=data)
    f32, i8 = report["models"]
    assert f32["status"] == i8["status"] == "ok", (f32["error"], i8["error"])
    assert (f32["variant"], f32["input_dtype"]) == ("float32", "float32")
    assert (i8["variant"], i8["input_dtype"]) == ("int8", "int8")
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.folder_eval import evaluate_classifier

    files = sorted(data.rglob("*.png"))
    for path, m in zip((tiny_mobilenet["float32"], tiny_mobilenet["int8"]), (f32, i8)):
        acc = m["accuracy"]
        # counted here image by image through the public API, not through the evaluator bench uses
        clf = Classifier(path, use_threshold=False)
        right = sum(clf.classify(str(f)).label == f.parent.name for f in files)
        assert acc["n"] == 6 and acc["failures"] == 0 and acc["accuracy"] == pytest.approx(right / 6)
        assert m["runs"][0]["first_label"] in ("NORMAL", "PNEUMONIA")
    md = bench_report.format_markdown(report)
    assert "| model_int8.tflite | int8 |" in md

    # the trade-off: accuracy, agreement with float32 image by image, size, latency; chart; CPU features
    preds = {v: evaluate_classifier(Classifier(tiny_mobilenet[v]), str(data), keep_predictions=True)["predictions"]
             for v in ("float32", "int8")}
    want = sum(a == b for a, b in zip(preds["float32"], preds["int8"])) / 6
    trade = {r["variant"]: r for r in bench_report.tradeoff_rows(report)}
    assert trade["float32"]["agreement"] == 1.0 and trade["int8"]["agreement"] == pytest.approx(want)
    assert trade["int8"]["majority_rate"] == pytest.approx(0.5)  # 3 images per class
    assert "would score 50.00%" in md
    assert trade["int8"]["size_mb"] == pytest.approx(Path(tiny_mobilenet["int8"]).stat().st_size / 1e6)
    assert trade["int8"]["invoke_p50_ms"] == i8["runs"][0]["invoke"]["p50_ms"]
    assert "## Trade-off" in md and "int8-relevant CPU features" in md
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.lower().startswith(("flags", "features"))), [])
    feats = report["machine"]["cpu_features"]
    assert feats["read"] == bool(flags) and all(f in flags for f in feats["present"])
    assert not any(f in flags for f in feats["absent"])
    paths = bench_report.write_report(report, tmp_path / "out")
    png = Path(paths["tradeoff_png"])
    assert png.read_bytes()[:4] == b"\x89PNG" and Image.open(png).size[0] > 400


def test_png_is_skipped_with_a_reason_without_matplotlib(tmp_path, monkeypatch):
    report = {"schema": bench.SCHEMA, "machine": {"hostname": "h", "arch": "x"}, "settings": {},
              "models": [bench_isolate._error_result("m.tflite", "model file not found: 'm.tflite'")]}
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = bench_report.write_report(report, tmp_path)
    assert paths["png"] is None and "PNG chart skipped" in paths["png_skipped"]
    assert "FAILED: model file not found" in Path(paths["md"]).read_text()
    assert not list(tmp_path.glob("*.png"))


def test_missing_backend_is_a_usage_error(monkeypatch):
    import lungedge.edge_runtime.backend as backend_mod

    real = backend_mod.importlib.import_module

    def no_tflite(name, *a, **k):
        if name.startswith(("tflite_runtime", "ai_edge_litert")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(backend_mod.importlib, "import_module", no_tflite)
    res = CliRunner().invoke(_cli(), ["bench", "m.tflite", "--backend", "tflite-runtime"])
    assert res.exit_code == 2 and "backend tflite-runtime is not usable" in res.output
