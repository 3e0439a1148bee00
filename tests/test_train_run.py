"""Training end to end on tiny models (MobileNetV2 alpha 0.35, 96 px, weights none) and generated images."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from images import make_images

from lungedge.edge_runtime.errors import ConfigError
from lungedge.edge_runtime.spec import ModelSpec
from lungedge.train.distill import soft_targets, soften

pytestmark = pytest.mark.needs_tf

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ("model.keras", "spec.json", "recipe.json", "split_manifest.csv", "history.csv", "metrics.json",
            "model_card.md", "plots/training_curves.png", "plots/confusion_matrix.png", "plots/roc.png")


_WEIGHTS = {}


def stand_in_weights() -> str:
    """A "pretrained" no-top MobileNetV2 0.35/96 weights file (a fixed random initialisation saved
    once): the transfer-learning path (frozen base, head, fine-tuning) without the ImageNet file.
    With ``weights="none"`` the whole network trains from scratch instead."""
    if "path" not in _WEIGHTS:
        import tempfile

        import keras

        keras.utils.set_random_seed(0)
        base = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None)
        path = Path(tempfile.mkdtemp(prefix="lungedge-test-weights-")) / "base.weights.h5"
        base.save_weights(str(path))
        _WEIGHTS["path"] = str(path)
    return _WEIGHTS["path"]


def tiny(name="xray-pneumonia-plus", **kw):
    from lungedge.train.recipes import get_recipe

    # augmentation on in every phase: the full input pipeline every epoch (the plus recipe itself
    # trains its head on cached features, whose epochs are too quick to interrupt or to exercise tf.data);
    # label smoothing on, so the smoothed loss runs in a real fit with class weights
    base = dict(alpha=0.35, image_size=96, weights=stand_in_weights(), batch_size=8, epochs=2, patience=2,
                fractions=(0.6, 0.2, 0.2), fine_tune={"epochs": 1, "blocks": 2}, augment=True, augment_phases="all",
                label_smoothing=0.05)
    base.update(kw)
    return get_recipe(name, **base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("xray"))


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """One complete tiny run: grouped split, augmentation, class weights, fine-tuning, threshold."""
    from lungedge.train.training import train_run

    out = tmp_path_factory.mktemp("runs") / "plus"
    # patience 0: keep the last weights (with early stopping, the best could be from before fine-tuning)
    # CLAHE on: the run's spec records it, and the threshold test below re-predicts through it
    # the fine-tuning phase keeps the moving average of its weights (the path of fine_tune.ema_epochs)
    recipe = tiny(patience=0, fine_tune={"epochs": 1, "blocks": 2, "learning_rate": 1e-3, "early_stopping": False,
                                         "ema_epochs": 0.5}, contrast="clahe")
    return train_run(recipe, str(data_dir), str(out), learning_floor=False)


@pytest.mark.slow
def test_run_folder_has_every_contract_file(run_dir):
    for name in CONTRACT:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "checkpoints").exists()
    spec = ModelSpec.from_json((run_dir / "spec.json").read_text())
    assert spec.labels == ("NORMAL", "PNEUMONIA") and spec.positive_label == "PNEUMONIA"
    assert spec.preprocessing.height == 96 and spec.variant is None and spec.recipe == "xray-pneumonia-plus"
    assert spec.preprocessing.contrast == "clahe" and spec.preprocessing.clahe_tiles == 8
    assert spec.training_fingerprint.startswith("sha256:") and spec.threshold.target_recall == 0.95
    history = list(csv.DictReader(open(run_dir / "history.csv")))
    assert [r["phase"] for r in history] == ["head", "head", "fine_tune"]
    assert [int(r["epoch"]) for r in history] == list(range(1, len(history) + 1))
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("accuracy", "per_class", "macro", "weighted", "auc", "confusion_matrix", "argmax", "validation"):
        assert key in m
    assert set(m["per_class"]["NORMAL"]) >= {"precision", "recall", "f1", "specificity", "support"}
    card = (run_dir / "model_card.md").read_text()
    assert "Intended use" in card and "Limitations" in card and "patient-grouped" in card
    assert "CLAHE (OpenCV's, clip limit 2, 8x8 tiles)" in card
    assert "moving average of the weights kept (time constant 0.5 epochs)" in card
    # the tiny run customises the named recipe: the card says how, field by field
    assert "**Changed from the named recipe**" in card and "`fine_tune.epochs` 15 -> 1" in card
    assert "`image_size` 224 -> 96" in card


@pytest.mark.slow
def test_images_beyond_the_cache_budget_are_cached_on_disk_and_removed(run_dir, data_dir, tmp_path):
    """Budget 0: every split goes to the tf.data file cache in the run folder; training is
    otherwise the same run, and the cache is gone afterwards. The default budget keeps this small
    set in memory."""
    from lungedge.train.training import train_run

    m = json.loads((run_dir / "metrics.json").read_text())
    n_train = m["counts"]["train"]
    assert m["image_cache"] == {"budget_mb": 2048, "splits": {"train": "memory", "val": "memory", "test": "memory"},
                                "shuffle_buffer": sum(n_train.values())}
    out = train_run(tiny(epochs=1, fine_tune={"epochs": 0}), str(data_dir), str(tmp_path / "disk"),
                    learning_floor=False, cache_mb=0)
    m = json.loads((out / "metrics.json").read_text())
    assert m["image_cache"] == {"budget_mb": 0, "splits": {"train": "disk", "val": "disk", "test": "disk"},
                                "shuffle_buffer": sum(m["counts"]["train"].values())}  # under 1,000 images: all
    assert not (out / ".image-cache").exists() and m["counts"]["test"]


def test_cache_budget_and_shuffle_buffer_rules(monkeypatch):
    from lungedge.edge_runtime.errors import ConfigError
    from lungedge.edge_runtime.spec import Preprocessing
    from lungedge.train.input_data import DEFAULT_CACHE_MB, cache_budget_mb, shuffle_buffer

    monkeypatch.delenv("LUNGEDGE_CACHE_MB", raising=False)
    assert cache_budget_mb() == DEFAULT_CACHE_MB and cache_budget_mb(10) == 10
    monkeypatch.setenv("LUNGEDGE_CACHE_MB", "300")
    assert cache_budget_mb() == 300 and cache_budget_mb(5) == 5
    monkeypatch.setenv("LUNGEDGE_CACHE_MB", "lots")
    with pytest.raises(ConfigError, match="LUNGEDGE_CACHE_MB"):
        cache_budget_mb()
    p224, p64 = Preprocessing(), Preprocessing(height=64, width=64)
    # cached in memory: the whole split up to 10,000 images, as before the budget
    assert shuffle_buffer(500, p224) == 500 and shuffle_buffer(112_000, p224) == 10_000
    # cached on disk: an eighth of the budget, at least 1,000 images: the same for 5,000 and 20,000
    budget = 2048 * 2**20
    assert shuffle_buffer(20_000, p224, True, budget) == shuffle_buffer(112_000, p224, True, budget) == budget // 8 // (224 * 224 * 3)
    assert shuffle_buffer(5_000, p64, True, 32 * 2**20) == shuffle_buffer(20_000, p64, True, 32 * 2**20) == 1000
    assert shuffle_buffer(600, p64, True, 0) == 600


@pytest.mark.slow
def test_corrupt_file_is_reported_and_not_in_the_manifest(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert [Path(f["path"]).name for f in m["failures"]] == ["IM-9999-0001.jpeg"]
    rows = list(csv.DictReader(open(run_dir / "split_manifest.csv")))
    assert len(rows) == 48 and not any("9999" in r["path"] for r in rows)
    assert "1 unreadable" in (run_dir / "model_card.md").read_text()


@pytest.mark.slow
def test_grouped_manifest_keeps_patients_on_one_side(run_dir):
    sides = {}
    for r in csv.DictReader(open(run_dir / "split_manifest.csv")):
        sides.setdefault(r["group"], set()).add(r["split"])
    assert all(g for g in sides) and all(len(v) == 1 for v in sides.values())


@pytest.mark.slow
def test_model_file_opens_in_plain_keras(run_dir):
    """model.keras is saved uncompiled: Keras alone opens it with its defaults (compile=True), though
    the run trained with the project's label-smoothing loss, and gives the run's probabilities."""
    import keras

    from lungedge.edge_runtime.preprocess import preprocess

    spec = ModelSpec.from_json((run_dir / "spec.json").read_text())
    one = next(r for r in csv.DictReader(open(run_dir / "split_manifest.csv")) if r["split"] == "test")
    x = preprocess(str(Path(json.loads((run_dir / "metrics.json").read_text())["data"]) / one["path"]), spec.preprocessing)
    np.save(run_dir.parent / "x.npy", x[None])
    code = ("import sys, numpy as np, keras; m = keras.models.load_model(sys.argv[1]); "
            "assert not any(k.startswith('lungedge') for k in sys.modules); "
            "print('P', *m.predict(np.load(sys.argv[2]))[0])")
    proc = _run_py(code, str(run_dir / "model.keras"), str(run_dir.parent / "x.npy"))
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-2000:]
    got = [float(v) for v in next(l for l in log.splitlines() if l.startswith("P "))[2:].split()]
    want = keras.models.load_model(run_dir / "model.keras", compile=False).predict(x[None])[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_fine_tuning_trains_only_the_top_blocks(run_dir):
    import keras

    from lungedge.train.model import build_model
    from lungedge.train.recipes import Recipe

    recipe = Recipe.from_json((run_dir / "recipe.json").read_text())
    keras.utils.set_random_seed(recipe.seed)
    fresh = build_model(recipe, 2).base  # the same seeded initialisation as the run
    trained = keras.models.load_model(run_dir / "model.keras", compile=False).get_layer(fresh.name)

    def kernel(model, layer):
        return np.asarray(model.get_layer(layer).get_weights()[0])

    assert np.array_equal(kernel(fresh, "block_1_project"), kernel(trained, "block_1_project"))  # frozen
    assert not np.array_equal(kernel(fresh, "block_16_project"), kernel(trained, "block_16_project"))  # fine-tuned
    bn_f, bn_t = fresh.get_layer("block_16_project_BN"), trained.get_layer("block_16_project_BN")
    assert all(np.array_equal(a, b) for a, b in zip(bn_f.get_weights(), bn_t.get_weights()))  # BN stays frozen


def test_unfreeze_top_leaves_lower_blocks_and_batchnorm_frozen():
    import keras

    from lungedge.train.model import build_model, unfreeze_top

    built = build_model(tiny(), 2)
    assert not built.base.trainable_weights
    unfreeze_top(built.base, 2)
    names = {v.path.split("/")[-2] for v in built.base.trainable_weights}
    assert names and all(n.startswith(("block_15", "block_16", "Conv_1")) for n in names), names
    assert not any(isinstance(l, keras.layers.BatchNormalization) and l.trainable for l in built.base.layers)



def test_label_smoothing_loss_is_kerass_smoothed_crossentropy():
    import keras

    from lungedge.train.model import smoothed_loss

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=8).astype("float32")
    y = rng.integers(0, 3, size=8)
    plain = keras.losses.SparseCategoricalCrossentropy(reduction=None)(y, p)
    np.testing.assert_allclose(smoothed_loss(0.0, reduction=None)(y, p), plain, rtol=1e-6)
    onehot = np.eye(3, dtype="float32")[y]
    want = keras.losses.CategoricalCrossentropy(label_smoothing=0.1, reduction=None)(onehot, p)
    got = smoothed_loss(0.1, reduction=None)(y.reshape(-1, 1), p)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # by hand: (1 - e) * -log p_y + e / K * sum_c -log p_c
    hand = 0.9 * -np.log(p[np.arange(8), y]) + 0.1 / 3 * -np.log(p).sum(axis=1)
    np.testing.assert_allclose(got, hand, rtol=1e-5)
    with pytest.raises(ConfigError, match="label_smoothing"):
        tiny().replace(label_smoothing=0.7)


@pytest.mark.slow
def test_a_run_trained_with_label_smoothing_loads_in_a_fresh_process(run_dir):
    # the run_dir recipe smooths labels; a new process (convert, evaluate) loads its model.keras
    # through the project's loader without having trained
    code = ("import sys; from lungedge.train.tfimport import load_keras_model; "
            "m = load_keras_model(sys.argv[1]); print(m.output_shape)")
    r = subprocess.run([sys.executable, "-c", code, str(run_dir / "model.keras")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(None, 2)" in r.stdout

@pytest.mark.slow
def test_threshold_gives_the_target_recall_on_validation(run_dir, data_dir):
    """Re-predict the validation files with the saved model and check the stored operating point."""
    import keras

    from lungedge.edge_runtime.preprocess import preprocess

    spec = ModelSpec.from_json((run_dir / "spec.json").read_text())
    rows = [r for r in csv.DictReader(open(run_dir / "split_manifest.csv")) if r["split"] == "val"]
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    x = np.stack([preprocess(data_dir / r["path"], spec.preprocessing) for r in rows])
    p = model.predict(x)[:, spec.labels.index("PNEUMONIA")]
    pos = np.asarray([r["label"] == "PNEUMONIA" for r in rows])
    assert (p[pos] >= spec.threshold.value - 1e-5).mean() >= 0.95


@pytest.mark.slow
def test_evaluate_keras_on_a_run_folder(run_dir, data_dir):
    from lungedge.train.keras_eval import evaluate_keras

    m = evaluate_keras(str(run_dir), str(data_dir))
    assert m["n"] == 48 and len(m["failures"]) == 1 and m["decision"] == "threshold"
    assert m["model"]["backend"] == "keras" and m["class_names"] == ["NORMAL", "PNEUMONIA"]
    a = evaluate_keras(str(run_dir / "model.keras"), str(data_dir), limit=10, use_threshold=False)
    assert a["n"] == 10 and a["decision"] == "argmax"
    # the CLI uses it for run folders too (exit 1: one image failed)
    from click.testing import CliRunner

    from lungedge.cli import main

    res = CliRunner().invoke(main, ["evaluate", "--model", str(run_dir), "--data", str(data_dir)])
    assert res.exit_code == 1 and "accuracy" in res.output and "IM-9999-0001.jpeg" in res.output


def test_pipeline_matches_the_shared_preprocessing(data_dir):
    from lungedge.edge_runtime.preprocess import load_pixels, preprocess
    from lungedge.edge_runtime.spec import Preprocessing
    from lungedge.train.input_data import image_dataset

    paths = sorted(str(p) for p in (data_dir / "PNEUMONIA").glob("*.jpeg"))[:5]
    for prep in (Preprocessing(height=40, width=40), Preprocessing(height=40, width=40, contrast="clahe")):
        batch = next(iter(image_dataset(paths, None, prep, 5)))
        want = np.stack([preprocess(p, prep) for p in paths])
        assert np.array_equal(batch.numpy(), want)
    assert load_pixels(paths[0], prep).dtype == np.uint8


@pytest.mark.slow
def test_paper_recipe_trains_the_head_on_cached_features_and_cv_table(data_dir, tmp_path, capsys):
    """ct-lung-cancer (frozen base, no augmentation): features once, then k-fold with mean ± population std."""
    from lungedge.train.training import cv_run

    recipe = tiny("ct-lung-cancer", fine_tune={"epochs": 0}, epochs=3, augment=False)
    out = cv_run(recipe, str(data_dir), str(tmp_path / "cv"), 3, learning_floor=False)
    summary = json.loads((out / "cv_summary.json").read_text())
    accs = [json.loads((out / f"fold_{i}" / "metrics.json").read_text())["accuracy"] for i in (1, 2, 3)]
    assert [r["accuracy"] for r in summary["folds"]] == accs
    assert summary["mean"]["accuracy"] == pytest.approx(np.mean(accs))
    assert summary["std"]["accuracy"] == pytest.approx(np.std(accs, ddof=0))
    assert "mean ± std" in (out / "cv_table.md").read_text()
    tests = [{r["path"] for r in csv.DictReader(open(out / f"fold_{i}" / "split_manifest.csv")) if r["split"] == "test"}
             for i in (1, 2, 3)]
    assert sum(len(t) for t in tests) == 48 and not (tests[0] & tests[1]) and not (tests[1] & tests[2])
    for i, t in zip((1, 2, 3), tests):
        assert all((out / f"fold_{i}" / f).is_file() for f in CONTRACT)
        m = json.loads((out / f"fold_{i}" / "metrics.json").read_text())
        cm = np.asarray(m["confusion_matrix"])
        # each fold is judged on its own test rows, and its accuracy is what its predictions say
        assert cm.sum() == len(t) == m["learning_floor"]["n"] and m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    capsys.readouterr()
    _check_cv_decisions(out, summary, tmp_path, capsys)


@pytest.mark.slow
def test_cv_resume_keeps_complete_folds_and_continues_the_interrupted_one(data_dir, tmp_path, monkeypatch):
    """An interrupted cross-validation goes on with --resume: the complete fold is not trained again,
    the interrupted fold keeps its epochs (checkpoint), the rest are trained; a saved fold that is
    not the fold computed again is refused."""
    from click.testing import CliRunner

    from lungedge.cli import main
    from lungedge.edge_runtime.errors import ConfigError, ModelError
    from lungedge.train import training

    recipe = tiny("ct-lung-cancer", fine_tune={"epochs": 0}, epochs=3, patience=0, augment=False)
    out = tmp_path / "cv"
    real_write, calls = training._write_run, []

    def interrupted(*args, **kw):  # the process dies in fold 2, after its epochs, before its files
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(*args, **kw)

    monkeypatch.setattr(training, "_write_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.cv_run(recipe, str(data_dir), str(out), 3, learning_floor=False)
    monkeypatch.setattr(training, "_write_run", real_write)
    fold1 = (out / "fold_1" / "model.keras").read_bytes()
    epochs_before = json.loads((out / "fold_2" / "checkpoints" / "state.json").read_text())["history"]
    assert len(epochs_before) == 3 and not (out / "fold_2" / "model.keras").exists() and not (out / "fold_3").exists()
    with pytest.raises(ConfigError, match="not empty; use --resume"):
        training.cv_run(recipe, str(data_dir), str(out), 3, learning_floor=False)
    with pytest.raises(ConfigError, match="started with --cv 3; resume it with --cv 3"):
        training.cv_run(None, str(data_dir), str(out), 2, resume=True, learning_floor=False)

    training.cv_run(None, str(data_dir), str(out), 3, resume=True, learning_floor=False)
    assert (out / "fold_1" / "model.keras").read_bytes() == fold1  # kept, not trained again
    history2 = list(csv.DictReader(open(out / "fold_2" / "history.csv")))
    assert [float(h["loss"]) for h in history2] == [h["loss"] for h in epochs_before]  # its epochs were not re-run
    summary = json.loads((out / "cv_summary.json").read_text())
    accs = [json.loads((out / f"fold_{i}" / "metrics.json").read_text())["accuracy"] for i in (1, 2, 3)]
    assert [row["accuracy"] for row in summary["folds"]] == accs
    assert not any((out / f"fold_{i}" / "checkpoints").exists() for i in (1, 2, 3))

    for i, status in ((1, "learned"), (3, "learned"), (2, "did not learn")):  # tiny models: the verdicts vary
        metrics = out / f"fold_{i}" / "metrics.json"
        m = json.loads(metrics.read_text())
        m["learning_floor"].update(status=status, sentence=f"({status}: a fold that failed)")
        metrics.write_text(json.dumps(m))
    with pytest.raises(ModelError, match="did not learn: a fold that failed.*fold_2"):  # the floor holds on a kept fold
        training.cv_run(None, str(data_dir), str(out), 3, resume=True)
    metrics.write_text("{")
    with pytest.raises(ConfigError, match="damaged.*fold_2"):
        training.cv_run(None, str(data_dir), str(out), 3, resume=True)
    manifest = out / "fold_3" / "split_manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0]] + [ln.replace(",test,", ",train,") for ln in lines[1:]]) + "\n")
    r = CliRunner().invoke(main, ["train", "--out", str(out), "--data", str(data_dir), "--cv", "3", "--resume"])
    assert r.exit_code == 2 and "fold_3" in r.output and "is not the fold" in r.output  # a usage error


def _check_cv_decisions(out: Path, summary: dict, tmp_path: Path, capsys) -> None:
    """experiments/cv_decisions.py on the CV run: its argmax on each fold's test part is the fold's
    own result; a run averaged with itself is the run; runs with other folds are refused."""
    import shutil

    from experiment_scripts import experiment

    cv_decisions = experiment("cv_decisions")

    assert cv_decisions.main(["--run", str(out), "--run", str(out), "--out", str(tmp_path / "dec")]) == 0
    rows = json.loads((tmp_path / "dec" / "cv_decisions.json").read_text())["rows"]
    single = {r["rule"]: r for r in rows if r["models"] == "cv"}
    both = {r["rule"]: r for r in rows if "mean probabilities" in r["models"]}
    assert single["argmax"]["accuracy_per_fold"] == pytest.approx([f["argmax_accuracy"] for f in summary["folds"]])
    assert set(single) == set(both) == set(cv_decisions.RULES)
    for rule in single:
        assert both[rule]["accuracy_per_fold"] == pytest.approx(single[rule]["accuracy_per_fold"])
    assert all(1.0 <= w <= 20.0 for w in single["rarest-class boost"]["boost_per_fold"])
    assert "| cv | argmax |" in (tmp_path / "dec" / "cv_decisions.md").read_text()
    other = tmp_path / "other"
    shutil.copytree(out, other)
    manifest = other / "fold_1" / "split_manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0]] + lines[1:][::-1]) + "\n")  # the same fold, rows in another order
    assert cv_decisions.main(["--run", str(out), "--run", str(other)]) == 0
    capsys.readouterr()
    manifest.write_text("\n".join(lines).replace(",test,", ",val,", 1) + "\n")  # another fold
    assert cv_decisions.main(["--run", str(out), "--run", str(other)]) == 1
    assert cv_decisions.main(["--run", str(tmp_path / "dec")]) == 1  # no fold models
    (other / "fold_2" / "metrics.json").unlink()
    assert cv_decisions.main(["--run", str(other)]) == 1
    manifest.write_text(lines[0] + "\n" + "\n".join(line.replace(",train", ",val") for line in lines[1:]) + "\n")
    assert cv_decisions.main(["--run", str(other)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert "other folds" in err[0] and "no fold_K" in err[1]
    assert "fold_2" in err[2] and "metrics.json" in err[2] and "no training images" in err[3]


@pytest.mark.slow
def test_refuses_a_non_empty_out_and_unknown_strategy(run_dir, data_dir):
    from lungedge.train.training import train_run

    with pytest.raises(ConfigError, match="not empty"):
        train_run(tiny(), str(data_dir), str(run_dir), learning_floor=False)
    with pytest.raises(ConfigError, match="strategy"):
        train_run(tiny(), str(data_dir), str(run_dir / "x"), strategy="tpu", learning_floor=False)


def test_cli_train_help_and_unknown_recipe():
    from click.testing import CliRunner

    from lungedge.cli import main

    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--resume" in r.output and "--cv" in r.output
    r = CliRunner().invoke(main, ["train", "--recipe", "nope", "--data", ".", "--out", "x"])
    assert r.exit_code == 2 and "ct-lung-cancer" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", "--list-recipes"])
    assert r.exit_code == 0 and "xray-pneumonia-plus" in json.loads(r.output)


def _run_py(code: str, *args, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=str(ROOT), env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


_TRAIN = """
import sys, json
from lungedge.train.recipes import Recipe
from lungedge.train.training import train_run
from lungedge.verbosity import NORMAL, configure
configure(NORMAL, progress=False)  # the run's messages and one line per epoch, as the command in a log file
recipe = Recipe.from_json(open(sys.argv[1]).read())
train_run(recipe, sys.argv[2], sys.argv[3], resume=sys.argv[4] == "1", strategy=sys.argv[5], learning_floor=False)
"""


@pytest.mark.slow
def test_resume_after_kill_9_mid_run(tmp_path):
    data = make_images(tmp_path / "data", per_class=60, bad=False)
    recipe = tiny(epochs=6, patience=0, fine_tune={"epochs": 0}, batch_size=4)
    (tmp_path / "recipe.json").write_text(recipe.to_json())
    out = tmp_path / "run"
    proc = _run_py(_TRAIN, str(tmp_path / "recipe.json"), str(data), str(out), "0", "default")
    state = out / "checkpoints" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 2:
            break
        time.sleep(0.2)
    time.sleep(0.5)  # into the next epoch
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads(state.read_text())
    assert 2 <= before["epoch"] < 6 and not (out / "model.keras").exists()
    manifest = (out / "split_manifest.csv").read_text()
    proc = _run_py(_TRAIN, str(tmp_path / "recipe.json"), str(data), str(out), "1", "default")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert f"resuming phase head after epoch {before['epoch']}" in log
    assert (out / "split_manifest.csv").read_text() == manifest
    history = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4, 5, 6]
    assert [float(r["loss"]) for r in history[:before["epoch"]]] == [r["loss"] for r in before["history"]]
    assert all((out / f).is_file() for f in CONTRACT) and not (out / "checkpoints").exists()


_MIRRORED = """
import sys, json, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from lungedge.train.recipes import Recipe
from lungedge.train.training import train_run
out = train_run(Recipe.from_json(open(sys.argv[1]).read()), sys.argv[2], sys.argv[3], strategy="mirrored", learning_floor=False)
print("DEVICE", json.load(open(out / "metrics.json"))["device"])
"""


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(tmp_path, data_dir):
    recipe = tiny(epochs=2, fine_tune={"epochs": 0})
    (tmp_path / "recipe.json").write_text(recipe.to_json())
    proc = _run_py(_MIRRORED, str(tmp_path / "recipe.json"), str(data_dir), str(tmp_path / "run"))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "strategy mirrored (2 replicas)" in log
    assert all((tmp_path / "run" / f).is_file() for f in CONTRACT)


# --- distillation (train.distill): soft targets from a teacher run (run_dir, a tiny plus run, teaches) ---


def test_distill_soften_is_the_softmax_of_logits_over_the_temperature():
    p = np.array([[0.9, 0.1], [0.5, 0.5], [0.01, 0.99]])
    assert np.allclose(soften(p, 1.0), p)
    t2 = soften(p, 2.0)
    assert np.allclose(t2.sum(axis=1), 1.0)
    logits = np.log(p) / 2.0
    assert np.allclose(t2, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    assert t2[0, 0] < 0.9 and t2[2, 1] < 0.99 and np.allclose(t2[1], 0.5)  # flatter, never flipped


def test_distill_soft_targets_mix_labels_and_teacher():
    labels = np.array([0, 1, 1])
    teacher = np.array([[0.8, 0.2], [0.3, 0.7], [0.9, 0.1]])
    assert np.allclose(soft_targets(labels, teacher, 0.0, 1.0), np.eye(2)[labels])
    assert np.allclose(soft_targets(labels, teacher, 1.0, 1.0), teacher)
    half = soft_targets(labels, teacher, 0.5, 1.0)
    assert np.allclose(half[2], [0.45, 0.55]) and half.dtype == np.float32


def test_recipe_checks_distillation_fields():
    from lungedge.train.recipes import get_recipe

    with pytest.raises(ConfigError, match="needs teacher"):
        get_recipe("xray-pneumonia", distill=0.5)
    with pytest.raises(ConfigError, match="distill must be"):
        get_recipe("xray-pneumonia-micro", distill=1.5)
    with pytest.raises(ConfigError, match="distill_temperature"):
        get_recipe("xray-pneumonia-micro", distill_temperature=0)
    r = get_recipe("xray-pneumonia-micro", teacher="xray-pneumonia-plus", distill=0.7)
    assert r.distills and not get_recipe("xray-pneumonia-micro").distills


def _student(**kw):
    base = dict(weights="none", epochs=1, patience=0, augment=False, label_smoothing=0.0,
                fine_tune={"epochs": 0, "blocks": 0}, teacher="xray-pneumonia-plus", distill=0.7, distill_temperature=2.0)
    base.update(kw)
    return tiny("xray-pneumonia-micro", **base)


@pytest.mark.slow
def test_a_student_learns_from_the_teachers_answers(run_dir, data_dir, tmp_path):
    """The teacher's answers for the student's training images are its model's, in the student's
    order, and the record in metrics.json says who taught and how often it agreed with the labels."""
    import keras

    from lungedge.edge_runtime.preprocess import preprocess
    from lungedge.train.training import train_run

    out = train_run(_student(), str(data_dir), str(tmp_path / "student"), learning_floor=False, teacher=str(run_dir))
    teacher = json.loads((out / "metrics.json").read_text())["teacher"]
    assert teacher["recipe"] == "xray-pneumonia-plus" and teacher["weight"] == 0.7 and teacher["temperature"] == 2.0
    # the agreement, recomputed from the teacher model on the student's training images
    spec = ModelSpec.from_json((run_dir / "spec.json").read_text())
    rows = [r for r in csv.DictReader(open(out / "split_manifest.csv")) if r["split"] == "train"]
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    x = np.stack([preprocess(data_dir / r["path"], spec.preprocessing) for r in rows])
    y = np.asarray([spec.labels.index(r["label"]) for r in rows])
    assert teacher["train_agreement"] == pytest.approx(float(np.mean(model.predict(x).argmax(1) == y)), abs=1e-4)
    assert not (out / "checkpoints").exists()  # the teacher's cached answers went with the checkpoints


def test_a_teacher_that_saw_the_students_test_images_is_refused(run_dir, data_dir, tmp_path):
    from lungedge.train.training import train_run

    with pytest.raises(ConfigError, match="trained on .* validation and test images"):
        train_run(_student(seed=7), str(data_dir), str(tmp_path / "s"), learning_floor=False, teacher=str(run_dir))


def test_teacher_missing_or_of_another_recipe_is_refused(run_dir, data_dir, tmp_path):
    from lungedge.train.training import train_run

    with pytest.raises(ConfigError, match="--teacher RUN.*distill=0"):
        train_run(_student(), str(data_dir), str(tmp_path / "a"), learning_floor=False)
    with pytest.raises(ConfigError, match="not a run folder"):
        train_run(_student(), str(data_dir), str(tmp_path / "b"), learning_floor=False, teacher=str(tmp_path))
    with pytest.raises(ConfigError, match="has distill 0"):
        train_run(_student(distill=0), str(data_dir), str(tmp_path / "d"), learning_floor=False, teacher=str(run_dir))
    with pytest.raises(ConfigError, match="distils from a run of 'xray-pneumonia'"):
        train_run(_student(teacher="xray-pneumonia"), str(data_dir), str(tmp_path / "c"), learning_floor=False,
                  teacher=str(run_dir))
