"""Site recalibration (``lungedge recalibrate``), the temperature, the bootstrap intervals and the
integer variants' logits output."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lungedge.edge_runtime.decision import output_probabilities
from lungedge.edge_runtime.errors import InputError
from lungedge.edge_runtime.metrics import binary_auc, bootstrap_auc
from lungedge.edge_runtime.recalibration import (apply_recalibration, bootstrap_rates, disease_images_needed,
                                                 expected_calibration_error, fit_temperature, recalibrate_outputs)
from lungedge.edge_runtime.spec import ModelSpec, Preprocessing, Threshold

LABELS = ("NORMAL", "PNEUMONIA")


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _overcalling(n_pos: int, n_neg: int, seed: int = 0):
    """Probabilities of a model that ranks well but over-calls the disease (class 1) at 0.5."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    d = rng.normal(0, 1.5, len(y)) + 3.0 * y + 2.0  # log-odds of disease: healthy ones sit above 0 too
    return _softmax(np.c_[np.zeros(len(y)), d]), y


def test_refusal_rule_is_the_exact_binomial_bound():
    for target, n in ((0.95, 59), (0.90, 29), (0.99, 299), (0.80, 14)):
        assert disease_images_needed(target) == n
        assert target ** n <= 0.05 < target ** (n - 1)  # all n detected: lower bound reaches the target
    with pytest.raises(Exception, match="recall of 1 cannot be shown"):
        disease_images_needed(1.0)


def test_too_few_disease_images_are_refused_with_the_count_needed():
    spec = ModelSpec(labels=LABELS, positive_label="PNEUMONIA")
    probs, y = _overcalling(58, 80)
    with pytest.raises(InputError, match=r"58 readable, the rule needs at least 59"):
        recalibrate_outputs(probs, y, spec, 0.95)
    probs, y = _overcalling(59, 80)
    assert recalibrate_outputs(probs, y, spec, 0.95).threshold.value > 0


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (6000, 2))
    y = (rng.random(6000) < _softmax(z / 2.0)[:, 1]).astype(int)  # labels from temperature 2
    t = fit_temperature(_softmax(z), y)
    assert abs(t - 2.0) < 0.25, t
    # the same scaling from logits or from probabilities
    np.testing.assert_allclose(output_probabilities(_softmax(z), "probabilities", t),
                               output_probabilities(z, "logits", t), atol=1e-4)


def test_recalibration_meets_the_target_and_moves_the_threshold_up_for_an_overcalling_model():
    spec = ModelSpec(labels=LABELS, positive_label="PNEUMONIA",
                     threshold=Threshold("PNEUMONIA", 0.5, 0.95, "validation"))
    probs, y = _overcalling(200, 120)
    res = recalibrate_outputs(probs, y, spec, 0.95)
    pred = apply_recalibration(probs, res)
    recall, specificity = (pred[y == 1] == 1).mean(), (pred[y == 0] == 0).mean()
    assert recall >= 0.95 and res.after.sensitivity[0] == pytest.approx(recall)
    assert res.after.specificity[0] == pytest.approx(specificity)
    assert res.before.specificity[0] < specificity  # the old threshold over-called the healthy ones
    assert res.after.accuracy[0] > res.before.accuracy[0]
    for rates in (res.before, res.after):
        for est, lo, hi in (rates.sensitivity, rates.specificity, rates.accuracy):
            assert 0.0 <= lo <= est <= hi <= 1.0
    assert res.temperature > 1.0 and res.nll[1] < res.nll[0]  # over-confident: cooled down
    # without the temperature the same decisions (temperature keeps the ranking), a different threshold value
    plain = recalibrate_outputs(probs, y, spec, 0.95, temperature=False)
    assert plain.temperature == 1.0 and (apply_recalibration(probs, plain) == pred).all()


def test_bootstrap_intervals_match_a_brute_force_bootstrap():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.6
    s = np.round(rng.normal(size=300) + 1.2 * y, 1)  # ties on purpose
    lo, hi = bootstrap_auc(s, y, resamples=2000, seed=0)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    brute = []
    for _ in range(2000):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        brute.append(binary_auc(s[idx], y[idx]))
    b_lo, b_hi = np.percentile(brute, [2.5, 97.5])
    assert lo < binary_auc(s, y) < hi
    assert abs(lo - b_lo) < 0.012 and abs(hi - b_hi) < 0.012, (lo, hi, b_lo, b_hi)
    rates = bootstrap_rates(s > 0.6, y)
    assert rates.n_disease == y.sum() and rates.n_other == (~y).sum()


def test_expected_calibration_error_is_zero_for_calibrated_bins_and_large_for_overconfident():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    assert expected_calibration_error(p, rng.random(20000) < p) < 0.02
    assert expected_calibration_error(np.full(1000, 0.99), rng.random(1000) < 0.5) > 0.45


# ---- the command on a real file --------------------------------------------------------------
def _folder(root: Path, clf, n_pos: int, n_neg: int) -> Path:
    """Images labelled by the model's own score (with a few swapped), so that a threshold matters."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = root / "pool"
    pool.mkdir(parents=True)
    scored = []
    for i in range(3 * (n_pos + n_neg)):
        px = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        path = pool / f"img{i:04d}.png"
        Image.fromarray(px).save(path)
        scored.append((clf.classify(str(path)).probabilities["PNEUMONIA"], path))
    scored.sort()
    negatives, positives = scored[:n_neg], scored[-n_pos:]
    positives[0], negatives[-1] = negatives[-1], positives[0]  # one swap each way: no perfect threshold
    data = root / "site"
    for label, items in (("NORMAL", negatives), ("PNEUMONIA", positives)):
        (data / label).mkdir(parents=True)
        for _, path in items:
            path.rename(data / label / path.name)
    return data


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory):
    """A tiny softmax classifier converted to int8 by ``convert_keras_model`` (logits output)."""
    pytest.importorskip("tensorflow")
    import keras

    from lungedge.convert.keras_convert import convert_keras_model
    from lungedge.edge_runtime.preprocess import normalize

    keras.utils.set_random_seed(0)
    inp = keras.Input((24, 24, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(6, 3, strides=2, activation="relu")(inp))
    x = keras.layers.Dense(8, activation="relu")(x)
    model = keras.Model(inp, keras.layers.Activation("softmax")(keras.layers.Dense(2)(x)))
    spec = ModelSpec(labels=LABELS, preprocessing=Preprocessing(24, 24), positive_label="PNEUMONIA",
                     threshold=Threshold("PNEUMONIA", 0.5, 0.9, "validation"), recipe="test-recalibrate")
    rng = np.random.default_rng(1)
    pre = spec.preprocessing
    calib = np.stack([normalize(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), pre) for _ in range(32)])
    path = tmp_path_factory.mktemp("recal") / "model_int8.tflite"
    path.write_bytes(convert_keras_model(model, spec, "int8", calibration=calib))
    return path, model


@pytest.mark.needs_tf
def test_integer_variant_outputs_centred_logits_with_the_float_probabilities(int8_file):
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.metadata import read_model_bytes, read_spec, score_calibration_text
    from lungedge.edge_runtime.preprocess import normalize

    path, model = int8_file
    spec = read_spec(read_model_bytes(path))
    assert spec.output == "logits" and spec.extra["conversion"]["logits"] == "centred"
    assert score_calibration_text(spec) == "1.0,2.0,0.0\n1.0,2.0,0.0"  # MediaPipe's sigmoid: slope 2/T
    clf = Classifier(path)
    rng = np.random.default_rng(5)
    for _ in range(5):
        px = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        ours = clf.classify(px).probabilities
        keras_p = model.predict(normalize(px, spec.preprocessing)[None], verbose=0)[0]
        assert abs(ours["PNEUMONIA"] - keras_p[1]) < 0.03


@pytest.mark.needs_tf
def test_recalibrate_command_writes_a_file_that_decides_as_printed(int8_file, tmp_path):
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.metadata import read_model_bytes, read_spec, verify_integrity

    path, _ = int8_file
    data = _folder(tmp_path, Classifier(path), n_pos=40, n_neg=30)
    (data / "PNEUMONIA" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "site.tflite"
    cmd = [sys.executable, "-m", "lungedge", "recalibrate", "--model", str(path), "--data", str(data),
           "--target-recall", "0.9", "--out", str(out), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr  # the unreadable image: one error line, the rest done
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0] and "Traceback" not in r.stderr
    printed = json.loads(r.stdout)
    new = read_spec(read_model_bytes(out))
    verify_integrity(read_model_bytes(out))
    record = new.extra["recalibration"]
    assert record["calibration_set"]["images"] == 70 and record["calibration_set"]["unreadable"] == 1
    assert record["calibration_set"]["per_class"] == {"NORMAL": 30, "PNEUMONIA": 40}
    lines = sorted(f"{label}\t{hashlib.sha256(f.read_bytes()).hexdigest()}\n"
                   for label in LABELS for f in (data / label).iterdir() if f.name != "broken.png")
    assert record["calibration_set"]["sha256"] == hashlib.sha256("".join(lines).encode()).hexdigest()
    assert record["threshold"]["before"] == {"label": "PNEUMONIA", "value": 0.5, "target_recall": 0.9,
                                             "chosen_on": "validation", "rule": "balanced"}
    assert new.threshold.chosen_on.startswith("site recalibration: 70 images, sha256 ")
    assert new.threshold.value == pytest.approx(printed["threshold"]["after"]["value"])
    assert new.temperature == pytest.approx(printed["temperature"]["after"])
    # the new file, run by the device on the same folder, decides exactly as printed
    clf = Classifier(out)
    pos = [clf.classify(str(f)).label for f in sorted((data / "PNEUMONIA").iterdir()) if f.name != "broken.png"]
    neg = [clf.classify(str(f)).label for f in sorted((data / "NORMAL").iterdir())]
    sens, spec_ = pos.count("PNEUMONIA") / 40, neg.count("NORMAL") / 30
    assert sens >= 0.9
    assert sens == pytest.approx(printed["at_new_operating_point"]["sensitivity"][0])
    assert spec_ == pytest.approx(printed["at_new_operating_point"]["specificity"][0])
    png = out.with_suffix("").as_posix() + ".reliability.png"
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the text form names the rule and both operating points
    r = subprocess.run(cmd[:-1] + ["--no-temperature"], capture_output=True, text=True, timeout=300)
    assert "at least" not in r.stdout and ">= 29 PNEUMONIA images" in r.stdout
    assert "before" in r.stdout and "after" in r.stdout and "temperature 1.000 -> 1.000" in r.stdout


@pytest.mark.needs_tf
def test_recalibrate_refuses_too_few_disease_images_and_its_own_file(int8_file, tmp_path):
    from lungedge.edge_runtime.classifier import Classifier

    path, _ = int8_file
    data = _folder(tmp_path, Classifier(path), n_pos=40, n_neg=30)
    out = tmp_path / "site.tflite"
    base = [sys.executable, "-m", "lungedge", "recalibrate", "--model", str(path), "--data", str(data), "--out"]
    r = subprocess.run(base + [str(out), "--target-recall", "0.99"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and not out.exists()
    assert r.stderr.strip().splitlines()[-1].startswith("error: too few PNEUMONIA images to promise a recall of 0.99: "
                                                        "40 readable, the rule needs at least 299")
    r = subprocess.run(base + [str(path), "--target-recall", "0.9"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "must be a new file" in r.stderr


def test_recalibration_record_keeps_the_history_of_an_earlier_one():
    from lungedge.edge_runtime.recalibration import recalibrated_spec

    spec = ModelSpec(labels=LABELS, positive_label="PNEUMONIA", threshold=Threshold("PNEUMONIA", 0.5))
    probs, y = _overcalling(100, 60)
    cs = {"images": 160, "sha256": "a" * 64, "date": "2026-11-26T00:00:00+00:00"}
    first = recalibrated_spec(spec, recalibrate_outputs(probs, y, spec, 0.9), cs)
    again = recalibrated_spec(first, recalibrate_outputs(probs, y, first, 0.9), {**cs, "sha256": "b" * 64})
    assert again.extra["recalibration"]["calibration_set"]["sha256"] == "b" * 64
    assert again.extra["recalibration"]["history"][0]["calibration_set"]["sha256"] == "a" * 64
    assert math.isclose(ModelSpec.from_json(again.to_json()).temperature, again.temperature)


@pytest.mark.needs_tf
def test_external_dev_report_cross_fits_the_recalibration(int8_file, tmp_path):
    """experiments/external_dev.py: the file's own numbers as ``lungedge evaluate`` gives them, and a
    cross-fit in which every image is judged by a recalibration chosen without it."""
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.folder_eval import evaluate_classifier

    from experiment_scripts import experiment

    external_dev = experiment("external_dev")

    path, _ = int8_file
    data = _folder(tmp_path, Classifier(path), n_pos=60, n_neg=40)
    row = external_dev.evaluate_file(str(path), str(data), target_recall=0.8, folds=3, repeats=4)
    m = evaluate_classifier(Classifier(path), str(data), progress=False)
    assert row["accuracy"] == pytest.approx(m["accuracy"]) and row["auc"] == pytest.approx(m["auc"]["macro"])
    lo, hi = row["auc_ci95"]
    assert lo <= row["auc"] <= hi
    cf = row["cross_fit"]
    assert sum(f["images"] for f in cf["per_fold"]) == 100 and len(cf["per_fold"]) == 3
    pooled = sum(f["accuracy"] * f["images"] for f in cf["per_fold"]) / 100
    assert cf["accuracy"] == pytest.approx(pooled)
    rep = row["cross_fit_repeats"]  # four fold draws; the first is the cross-fit above
    assert rep["seeds"] == [0, 1, 2, 3] and rep["accuracy"][0] == cf["accuracy"] and rep["recall"][0] == cf["recall"]
    assert rep["accuracy_mean"] == pytest.approx(np.mean(rep["accuracy"]))
    assert rep["accuracy_std"] == pytest.approx(np.std(rep["accuracy"]))
    second = external_dev.evaluate_file(str(path), str(data), 0.8, 3, seed=1)["cross_fit"]  # draw 2 is seed 1's
    assert second["seed"] == 1 and (second["accuracy"], second["recall"]) == (rep["accuracy"][1], rep["recall"][1])
    assert external_dev.main(["--model", str(path), "--data", str(data), "--folds", "3", "--target-recall", "0.8",
                              "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "external_dev_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "cross-fit" in (tmp_path / "report" / "external_dev.md").read_text()
    assert "over 20 fold draws" in (tmp_path / "report" / "external_dev.md").read_text()
