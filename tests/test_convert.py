"""convert/: variants, calibration, conversion of a tiny run folder, the report and the gate.

The tiny run folder follows the run-folder contract (model.keras, spec.json,
split_manifest.csv) and is built here, independent of train/.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lungedge.convert.calibration import calibration_from_folder, stratified_pick
from lungedge.convert.variant_eval import decide
from lungedge.convert.variant_eval import rechoose_threshold as choose_threshold
from lungedge.convert.quant_gate import overall
from lungedge.convert.quant_gate import variant_reasons as gate_reasons
from lungedge.convert.variants import VARIANTS, get_variant, parse_variants
from lungedge.edge_runtime.errors import ConfigError, InputError, ModelError
from lungedge.edge_runtime.spec import ModelSpec, Preprocessing, Threshold

LABELS = ("normal", "disease")
SIZE = 96
#: float16 weights vs the Keras model: largest allowed probability difference on any image.
FLOAT16_TOLERANCE = 5e-3
#: float32 conversion vs Keras.
FLOAT32_TOLERANCE = 1e-4


# ---- no TensorFlow needed ------------------------------------------------------------------
def test_variants_named_and_unknown_refused_with_list():
    assert set(VARIANTS) == {"float32", "float16", "dynamic", "int8", "uint8", "int8-float-io", "int8-mixed", "micro"}
    assert get_variant("micro").micro and get_variant("micro").integer_only and get_variant("micro").io_dtype == "int8"
    assert get_variant("uint8").io_dtype == "uint8" and get_variant("uint8").integer_only
    assert get_variant("int8-mixed").float_stem_ops > 0 and not get_variant("int8-mixed").integer_only
    assert get_variant("INT8").io_dtype == "int8"
    assert get_variant("int8-float-io").calibrated and get_variant("int8-float-io").io_dtype == "float32"
    assert [v.name for v in parse_variants("float32, float16,float32")] == ["float32", "float16"]
    with pytest.raises(ConfigError) as err:
        parse_variants("float32,int4")
    msg = str(err.value)
    assert "'int4'" in msg and all(name in msg for name in VARIANTS) and "\n" not in msg
    with pytest.raises(ConfigError):
        parse_variants(" , ")


def test_stratified_pick_spreads_over_classes_and_is_seeded():
    labels = [0] * 90 + [1] * 10 + [2] * 50
    picked = stratified_pick(labels, 30, seed=1)
    counts = np.bincount(np.asarray(labels)[picked], minlength=3)
    assert counts.tolist() == [10, 10, 10]
    assert picked == stratified_pick(labels, 30, seed=1)
    assert picked != stratified_pick(labels, 30, seed=2)
    # a small class gives all it has, the rest goes to the others
    counts = np.bincount(np.asarray(labels)[stratified_pick(labels, 60)], minlength=3)
    assert counts.tolist() == [25, 10, 25]
    assert len(stratified_pick(labels, 1000)) == len(labels)
    with pytest.raises(ConfigError):
        stratified_pick(labels, 0)


def test_empty_calibration_folder_is_one_line(tmp_path):
    (tmp_path / "normal").mkdir()
    (tmp_path / "disease").mkdir()
    (tmp_path / "disease" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError) as err:
        calibration_from_folder(str(tmp_path), Preprocessing(SIZE, SIZE), LABELS)
    assert "no images" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(InputError, match="not found"):
        calibration_from_folder(str(tmp_path / "nope"), Preprocessing(SIZE, SIZE), LABELS)


def test_bias_correction_images_spread_over_a_class_sorted_array():
    from lungedge.convert.bias_correction import evenly_spaced

    labels = np.asarray([0] * 100 + [1] * 100 + [2] * 100)  # as stratified_pick orders them
    idx = evenly_spaced(300, 64)
    assert len(idx) == 64 and idx[0] == 0 and idx[-1] == 299
    assert np.bincount(labels[idx]).tolist() in ([21, 22, 21], [22, 21, 21], [21, 21, 22])
    assert evenly_spaced(10, 64).tolist() == list(range(10))


def test_decide_follows_the_threshold_rule():
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.8, 0.2]])
    assert decide(probs, LABELS, None).tolist() == [0, 1, 0]
    assert decide(probs, LABELS, Threshold("disease", 0.25)).tolist() == [1, 1, 0]


def test_choose_threshold_meets_target_recall():
    rng = np.random.default_rng(0)
    y = np.array([0] * 50 + [1] * 50)
    p1 = np.clip(0.35 * y + rng.uniform(0, 0.65, 100), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    th = choose_threshold(probs, y, LABELS, Threshold("disease", 0.5, target_recall=0.95), "validation")
    pred = decide(probs, LABELS, th)
    assert np.mean(pred[y == 1] == 1) >= 0.95
    assert th.target_recall == 0.95 and th.chosen_on == "validation"


def _metrics(acc, recall_disease):
    return {"accuracy": acc, "per_class": {"normal": {"recall": 0.9}, "disease": {"recall": recall_disease}}}


def test_gate_margins():
    keras = _metrics(0.900, 0.950)
    assert gate_reasons(keras, _metrics(0.895, 0.940), "disease", 1.0, 2.0) == []
    r = gate_reasons(keras, _metrics(0.880, 0.940), "disease", 1.0, 2.0)
    assert len(r) == 1 and "accuracy 2.00 points" in r[0]
    r = gate_reasons(keras, _metrics(0.900, 0.920), "disease", 1.0, 2.0)
    assert len(r) == 1 and "disease recall 3.00 points" in r[0]
    assert gate_reasons(keras, _metrics(0.880, 0.920), "disease", 5.0, 5.0) == []


# ---- a tiny run folder ---------------------------------------------------------------------
def _image(label: int, seed: int) -> Image.Image:
    """Grey noise; 'disease' images carry a bright blob (a learnable difference)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(90, 25, (64, 64))
    if label == 1:
        yy, xx = np.mgrid[:64, :64]
        cy, cx = rng.integers(16, 48, 2)
        a += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 80.0)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")


def _build_run(root: Path) -> Path:
    import keras

    from lungedge.edge_runtime.preprocess import preprocess

    keras.utils.set_random_seed(0)
    images = root / "images"
    rows = []
    counts = {"train": 12, "val": 6, "test": 8}
    seed = 0
    for split, per_class in counts.items():
        for label_i, label in enumerate(LABELS):
            for _ in range(per_class):
                seed += 1
                p = images / label / f"{split}_{seed}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                _image(label_i, seed).save(p)
                rows.append({"path": str(p.relative_to(root)), "label": label, "split": split})
    run = root / "run"
    run.mkdir()
    # manifest paths relative to the run folder's parent are resolved by trying both; use absolute-free paths
    for r in rows:
        r["path"] = os.path.join("..", r["path"])
    with open(run / "split_manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    pre = Preprocessing(SIZE, SIZE)
    spec = ModelSpec(labels=LABELS, preprocessing=pre, positive_label="disease",
                     threshold=Threshold("disease", 0.45, target_recall=0.9), recipe="tiny-test",
                     training_fingerprint="tiny")
    (run / "spec.json").write_text(spec.to_json())
    base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False, weights=None)
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    out = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    model = keras.Model(base.input, out)
    train = [r for r in rows if r["split"] == "train"]
    xs = np.stack([preprocess(run / r["path"], pre) for r in train])
    ys = np.array([LABELS.index(r["label"]) for r in train])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(xs, ys, epochs=2, batch_size=8, verbose=0)
    model.save(run / "model.keras")
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    pytest.importorskip("tensorflow")
    return _build_run(tmp_path_factory.mktemp("tinyrun"))


@pytest.fixture(scope="session")
def converted(tiny_run, tmp_path_factory):
    from lungedge.convert.conversion import convert_run

    out = tmp_path_factory.mktemp("converted")
    # the tiny model is at chance (2 epochs on 16 noise-like images): this fixture checks the file
    # contract of every variant, so the learning floor and the accuracy margins are off here only
    report = convert_run(tiny_run, variants=list(VARIANTS), out_dir=str(out), calibration_count=16,
                         max_accuracy_drop=100.0, max_recall_drop=100.0, rethreshold=True,
                         learning_floor=False)
    return out, report


@pytest.mark.needs_tf
@pytest.mark.slow
def test_every_variant_converts_loads_and_carries_metadata(tiny_run, converted):
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.metadata import read_spec_from_file

    out, report = converted
    train_spec = ModelSpec.from_json((tiny_run / "spec.json").read_text())
    source_sha = hashlib.sha256((tiny_run / "model.keras").read_bytes()).hexdigest()
    expected_io = {"float32": "float32", "float16": "float32", "dynamic": "float32", "int8": "int8",
                   "int8-float-io": "float32", "int8-mixed": "float32", "micro": "int8"}
    assert [v["variant"] for v in report["variants"]] == list(VARIANTS)
    for name, io_dtype in expected_io.items():
        path = out / f"model_{name}.tflite"
        clf = Classifier(path)
        d = clf.describe()
        assert (d["input_dtype"], d["output_dtype"]) == (io_dtype, io_dtype), name
        spec = read_spec_from_file(path)
        assert spec.variant == name
        assert spec.labels == LABELS and spec.preprocessing == train_spec.preprocessing
        assert spec.recipe == "tiny-test"
        if VARIANTS[name].calibrated:  # re-chosen on the validation split (rethreshold=True)
            assert spec.threshold.label == "disease" and spec.threshold.target_recall == 0.9
            assert spec.threshold.chosen_on.startswith("validation (re-chosen")
        else:
            assert spec.threshold == train_spec.threshold
        assert spec.source_model_sha256 == source_sha
        assert {"tensorflow", "keras", "lungedge", "converter"} <= set(spec.versions)
        if VARIANTS[name].calibrated:
            assert spec.extra["conversion"]["calibration_images"] == 16
            assert spec.extra["conversion"]["bias_correction"]["layers"] >= 1
            # integer files output centred logits (the device applies the softmax in float)
            assert spec.output == "logits" and spec.extra["conversion"]["logits"] == "centred"
        else:
            assert spec.output == "probabilities" and "logits" not in spec.extra["conversion"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.needs_tf
@pytest.mark.slow
def test_report_numbers_and_float_parity(converted):
    out, report = converted
    rows = {v["variant"]: v for v in report["variants"]}
    assert report["test"]["n"] == 16 and report["test"]["note"].startswith("test split")
    assert report["calibration"]["class_counts"] == {"normal": 8, "disease": 8}
    assert rows["float32"]["max_prob_diff"] <= FLOAT32_TOLERANCE
    assert rows["float16"]["max_prob_diff"] <= FLOAT16_TOLERANCE
    assert rows["float32"]["top1_agreement"] == 1.0 and rows["float16"]["top1_agreement"] == 1.0
    assert rows["float32"]["size_ratio"] == 1.0
    assert rows["float16"]["size_ratio"] < 0.6 and rows["int8"]["size_ratio"] < 0.45
    for v in rows.values():
        assert os.path.getsize(v["file"]) == v["size_bytes"]
        # the margins are off for this untrained model, so a failure can only be the paired test's or none
        assert v["gate"] == ("failed" if v["gate_reasons"] else "passed") and v["conversion_seconds"] > 0, v
        assert v["gate"] == "passed", v["gate_reasons"]
        assert set(v["per_class_recall"]) == set(LABELS)
    on_disk = json.loads((out / "quantization_report.json").read_text())
    assert on_disk["passed"] == report["passed"] == overall(report["variants"]).passed is True
    md = (out / "quantization_report.md").read_text()
    assert "| int8-mixed |" in md and "recall disease %" in md
    assert "int8: threshold re-chosen on 12 validation images" in md
    assert (out / "quantization_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.needs_tf
@pytest.mark.slow
def test_classify_needs_only_the_file(converted, tmp_path):
    out, _ = converted
    alone = tmp_path / "device"
    alone.mkdir()
    model = alone / "m.tflite"
    model.write_bytes((out / "model_int8.tflite").read_bytes())
    img = alone / "x.png"
    _image(1, 999).save(img)
    result = subprocess.run([sys.executable, "-m", "lungedge.cli", "classify", "--model", str(model), "--json", str(img)],
                            capture_output=True, text=True, cwd=alone, timeout=120)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["label"] in LABELS and set(line["probabilities"]) == set(LABELS)


@pytest.mark.needs_tf
@pytest.mark.slow
def test_failed_conversion_leaves_no_file(tiny_run, tmp_path, monkeypatch):
    import lungedge.convert.keras_convert as kc
    from lungedge.convert.keras_convert import convert_keras_model, write_tflite

    def broken(*args, **kwargs):
        raise ModelError("TFLite conversion to float32 failed: simulated")

    monkeypatch.setattr(kc, "tflite_bytes", broken)
    from lungedge.convert.conversion import convert_run

    with pytest.raises(ModelError, match="simulated"):
        convert_run(tiny_run, variants="float32", out_dir=str(tmp_path), learning_floor=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # a write that dies half-way leaves neither the target nor the temporary file
    class Boom(Exception):
        pass

    def bad_replace(*a):
        raise Boom()

    data = convert_keras_model(str(tiny_run / "model.keras"),
                               ModelSpec.from_json((tiny_run / "spec.json").read_text()), "float32")
    monkeypatch.setattr(os, "replace", bad_replace)
    with pytest.raises(Boom):
        write_tflite(tmp_path / "model_float32.tflite", data)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.needs_tf
@pytest.mark.slow
def test_bad_inputs_get_one_line(tiny_run, tmp_path):
    import keras

    from lungedge.convert.keras_convert import convert_keras_model
    from lungedge.cli import main

    runner = CliRunner()
    # the one rule: an input that could not be used is 1, a wrong command line 2
    cases = {
        "missing": ([str(tmp_path / "no_such_run")], "run folder not found", 1),
        "variant": ([str(tiny_run), "--variants", "float32,int3"], "unknown variant 'int3'", 2),
        "calib": ([str(tiny_run), "--variants", "int8", "--calibration-dir", str(tmp_path / "empty")],
                  "calibration folder", 1),
    }
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    for name, (args, expected, code) in cases.items():
        res = runner.invoke(main, ["convert", *args, "--out", str(tmp_path / "out")])
        assert res.exit_code == code, (name, res.exit_code, res.output)
        lines = [ln for ln in res.output.strip().splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (name, res.output)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tflite"))

    spec = ModelSpec.from_json((tiny_run / "spec.json").read_text())
    inp = keras.Input((SIZE, SIZE, 3))
    regression = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inp)))
    with pytest.raises(ModelError, match="not probabilities"):
        convert_keras_model(regression, spec, "float32")
    wrong = keras.Model(inp, keras.layers.Dense(5, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inp)))
    with pytest.raises(ModelError, match="5"):
        convert_keras_model(wrong, spec, "float32")
    with pytest.raises(ConfigError, match="needs calibration"):
        convert_keras_model(regression, spec.replace(output="logits"), "int8")


@pytest.mark.needs_tf
@pytest.mark.slow
def test_cli_gate_exit_codes(tiny_run, tmp_path):
    from lungedge.cli import main

    runner = CliRunner()
    args = ["convert", str(tiny_run), "--variants", "dynamic", "--out", str(tmp_path), "--no-progress"]
    # the tiny model is at chance: convert refuses it whatever the margins, and writes no file
    res = runner.invoke(main, args + ["--max-accuracy-drop", "100", "--max-recall-drop", "100", "--no-bias-correction"])
    assert res.exit_code == 1, res.output
    assert "error: the model did not learn: test accuracy 0.5000 (8/16" in res.output
    assert not list(tmp_path.glob("*.tflite"))
    from lungedge.convert.conversion import convert_run

    report = convert_run(tiny_run, variants="dynamic", out_dir=str(tmp_path), learning_floor=False,
                         bias_correction=False)
    assert report["variants"][0]["size_ratio"] is None and report["variants"][0]["learning_floor"] == "did not learn"
    assert report["bias_correction"] is False and "bias correction off" in (tmp_path / "quantization_report.md").read_text()

    # the same report marked failed: exit 1, or 0 with --no-gate
    import lungedge.convert.conversion as conversion_mod

    failed = dict(report, passed=False)
    failed["variants"] = [dict(report["variants"][0], gate="failed", gate_reasons=["accuracy 3.00 points below Keras"])]
    original = conversion_mod.convert_run
    try:
        conversion_mod.convert_run = lambda *a, **k: failed
        res = runner.invoke(main, args)
        assert res.exit_code == 1 and "gate: FAILED" in res.output
        res = runner.invoke(main, args + ["--no-gate"])
        assert res.exit_code == 0 and "ignored" in res.output
    finally:
        conversion_mod.convert_run = original


def _tiny_bn_model(seed: int = 0):
    """Conv+BN+ReLU6, depthwise+BN+ReLU6, 1x1 conv, pooling and a softmax head: the layer kinds
    the bias correction handles, with BN statistics far from identity (as after training)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(16, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8, name="logits")(x))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 3, g.shape), rng.normal(0.5, 1, b.shape),
                               rng.normal(0, 0.3, m.shape), rng.uniform(0.05, 2, v.shape)])
        elif isinstance(layer, keras.layers.Dense):  # a zero bias is dropped by the converter
            w, b = layer.get_weights()
            layer.set_weights([w, rng.normal(0, 0.5, b.shape)])
    return model


def _logit_means(data: bytes, x: np.ndarray):
    """(per-class mean of the dequantised logits, the SOFTMAX op's input, over images ``x``;
    the logits' quantisation step, 0 for float)."""
    import warnings

    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = Interpreter(model_content=data, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    softmax = next(op for op in it._get_ops_details() if op["op_name"] == "SOFTMAX")
    t = it._get_tensor_details(softmax["inputs"][0], 0)
    inp = it.get_input_details()[0]
    rows = []
    for i in range(len(x)):
        xi = x[i:i + 1]
        if inp["dtype"] != np.float32:
            s, z = inp["quantization"]
            xi = np.clip(np.rint(xi / s + z), -128, 127).astype(inp["dtype"])
        it.set_tensor(inp["index"], xi)
        it.invoke()
        v = it.get_tensor(t["index"]).astype(np.float64)
        s, z = t["quantization"]
        rows.append(((v - z) * s if s else v).reshape(-1, v.shape[-1]))
    return np.concatenate(rows).mean(axis=0), t["quantization"][0]


@pytest.mark.needs_tf
def test_bias_correction_removes_the_mean_shift_layer_by_layer():
    """The int8 model's logits, on the images the correction used, average what the float32
    model's do (the shift left is under half an int8 step), and the file keeps its size."""
    from lungedge.convert.bias_correction import correct_biases
    from lungedge.convert.keras_convert import tflite_bytes

    model = _tiny_bn_model()
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (48, SIZE, SIZE, 3)).astype(np.float32)
    quantized = tflite_bytes(model, get_variant("int8"), x)
    reference = tflite_bytes(model, get_variant("float32"))
    corrected, record = correct_biases(quantized, reference, x, max_images=48)
    # 3 convolutions and the last fully connected op (the converter folds the bias of the linear
    # Dense before it into it, leaving that one without a bias to correct)
    assert record["layers"] == 4 and record["images"] == 48, record
    assert len(corrected) == len(quantized) and corrected != quantized

    want, _ = _logit_means(reference, x)
    got, step = _logit_means(quantized, x)
    fixed, _ = _logit_means(corrected, x)
    before, after = np.abs(got - want), np.abs(fixed - want)
    # left: under half an int8 step (the outputs are rounded to that grid), a quarter of before
    assert after.max() < 0.5 * step and after.max() < 0.25 * before.max(), (before, after, step)
    assert after.mean() < before.mean(), (before, after)


def _in_memory_bias_correction(quantized: bytes, reference: bytes, x: np.ndarray) -> list:
    """The oracle: the correction as first written (every float output held in memory, the
    interpreters with ``experimental_preserve_all_tensors``, no XNNPACK); the corrected biases."""
    import warnings

    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    from lungedge.convert.bias_correction import _LINEAR_RANGE, _correctable_ops, _feed

    def interp(data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            it = Interpreter(model_content=bytes(data), experimental_preserve_all_tensors=True)
        it.allocate_tensors()
        return it

    data = bytearray(quantized)
    model = schema.Model.GetRootAs(data, 0)
    ops = _correctable_ops(model, schema)
    ref = interp(reference)
    by_name = {t["name"]: t["index"] for t in ref.get_tensor_details()}
    expected = {op.name: [] for op in ops}
    for i in range(len(x)):
        _feed(ref, x[i:i + 1])
        for op in ops:
            expected[op.name].append(ref.get_tensor(by_name[op.name]).astype(np.float16))
    biases = []
    for op in ops:
        it = interp(data)
        scale, zero = it._get_tensor_details(op.output, 0)["quantization"]
        got = []
        for i in range(len(x)):
            _feed(it, x[i:i + 1])
            got.append(it.get_tensor(op.output).copy())
        q, f = np.concatenate(got).astype(np.int32), np.concatenate(expected[op.name]).astype(np.float64)
        lo, hi = _LINEAR_RANGE.get(op.activation, (-np.inf, np.inf))
        keep = (q > -128) & (q < 127) & (f > lo) & (f < hi)
        c = f.shape[-1]
        shift = np.where(keep, (q - zero) * scale - f, 0.0).reshape(-1, c).sum(0) / np.maximum(keep.reshape(-1, c).sum(0), 1)
        bias_scale = np.asarray(it._get_tensor_details(op.bias, 0)["quantization_parameters"]["scales"], np.float64)
        view = model.Buffers(op.buffer).DataAsNumpy().view(np.int32)
        view[:] = (view.astype(np.int64) - np.rint(shift / bias_scale).astype(np.int64)).astype(np.int32)
        biases.append(view.copy())
    return biases


@pytest.mark.needs_tf
@pytest.mark.parametrize("variant", ["int8", "uint8", "int8-float-io"])
def test_streamed_bias_correction_gives_the_in_memory_biases(variant):
    """Streaming the float outputs through disk and measuring with XNNPACK on a copy that outputs
    every op changes no bias by more than one int32 step from the in-memory algorithm."""
    from ai_edge_litert import schema_py_generated as schema

    from lungedge.convert.bias_correction import _correctable_ops, correct_biases
    from lungedge.convert.keras_convert import tflite_bytes

    model = _tiny_bn_model()
    x = np.random.default_rng(2).uniform(-1, 1, (24, SIZE, SIZE, 3)).astype(np.float32)
    quantized, reference = tflite_bytes(model, get_variant(variant), x), tflite_bytes(model, get_variant("float32"))
    want = _in_memory_bias_correction(quantized, reference, x)
    corrected, record = correct_biases(quantized, reference, x, max_images=24)
    m = schema.Model.GetRootAs(corrected, 0)
    got = [m.Buffers(op.buffer).DataAsNumpy().view(np.int32) for op in _correctable_ops(m, schema)]
    assert len(got) == len(want) == record["layers"] >= 3
    before = schema.Model.GetRootAs(quantized, 0)
    assert any((g != before.Buffers(op.buffer).DataAsNumpy().view(np.int32)).any()
               for g, op in zip(got, _correctable_ops(before, schema)))  # it did correct something
    worst = max(int(np.abs(g.astype(np.int64) - w).max()) for g, w in zip(got, want))
    assert worst <= 1, worst
    assert len(corrected) == len(quantized)


@pytest.mark.needs_tf
def test_bias_correction_refuses_a_reference_of_another_model():
    from lungedge.convert.bias_correction import correct_biases
    from lungedge.convert.keras_convert import tflite_bytes

    x = np.random.default_rng(0).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
    import keras

    inp = keras.Input((SIZE, SIZE, 3))
    other = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="elsewhere")(
        keras.layers.GlobalAveragePooling2D()(inp)))
    with pytest.raises(ModelError) as err:
        correct_biases(tflite_bytes(_tiny_bn_model(), get_variant("int8"), x),
                       tflite_bytes(other, get_variant("float32")), x)
    assert "reference has no tensor" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelError, match="needs calibration images"):
        correct_biases(b"", b"", np.zeros((0, SIZE, SIZE, 3), np.float32))


@pytest.mark.needs_tf
@pytest.mark.slow
def test_mixed_variant_keeps_the_stem_in_float(converted):
    from ai_edge_litert.interpreter import Interpreter

    out, _ = converted
    kinds = {}
    for name in ("int8-float-io", "int8-mixed"):
        it = Interpreter(model_path=str(out / f"model_{name}.tflite"))
        ops = [op for op in it._get_ops_details() if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")]
        kinds[name] = [it._get_tensor_details(op["outputs"][0], 0)["dtype"].__name__ for op in ops]
    stem = get_variant("int8-mixed").float_stem_ops
    assert kinds["int8-mixed"][:stem] == ["float32"] * stem
    assert set(kinds["int8-mixed"][stem:-1]) == {"int8"}
    assert kinds["int8-float-io"][0] == "int8"
