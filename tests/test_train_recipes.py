"""Recipes, splits, manifest, weights lookup: no TensorFlow needed (scikit-learn for splits)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungedge.edge_runtime.errors import ConfigError
from lungedge.edge_runtime.spec import Preprocessing
from lungedge.train import weights as weights_mod
from lungedge.train.dataset import (Dataset, drop_unreadable, kfold_assignments, load_dataset, patient_id, read_manifest,
                        split_dataset, write_manifest)
from lungedge.train.recipes import RECIPES, Augment, FineTune, Recipe, apply_overrides, get_recipe
from lungedge.edge_runtime.decision import apply_threshold
from lungedge.edge_runtime.operating_point import operating_point as choose_operating_point
from lungedge.edge_runtime.operating_point import recall_threshold as choose_threshold
from lungedge.train.labels import resolve_label


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_json_round_trip(name):
    r = RECIPES[name]
    again = Recipe.from_json(r.to_json())
    assert again == r
    assert json.loads(again.to_json()) == json.loads(r.to_json())


def test_paper_recipes_match_the_papers():
    x, ct = get_recipe("xray-pneumonia"), get_recipe("ct-lung-cancer")
    assert (x.fractions, x.epochs, x.image_size, x.split, x.weights) == ((0.75, 0.15, 0.10), 20, 224, "random", "imagenet")
    assert x.augmentation is not None and not x.fine_tune.enabled
    assert (ct.fractions, ct.epochs, ct.batch_size, ct.learning_rate) == ((0.70, 0.15, 0.15), 50, 32, 1e-3)
    assert (ct.patience, ct.monitor, ct.augmentation, ct.head_units, ct.dropout) == (5, "val_accuracy", None, 128, 0.5)
    plus = get_recipe("xray-pneumonia-plus")
    assert plus.split == "grouped" and plus.class_weights and plus.fine_tune.enabled and plus.target_recall == 0.95
    # every named recipe declares what it is for; the DICOM checks and the model card read that, not the name
    assert {n: r.modality for n, r in RECIPES.items()} == {
        "xray-pneumonia": "X-ray", "xray-pneumonia-plus": "X-ray", "xray-pneumonia-micro": "X-ray",
        "ct-lung-cancer": "CT", "ct-lung-cancer-plus": "CT", "demo": "generated", "demo-scratch": "generated"}


def test_the_intended_record_follows_the_declared_modality():
    from lungedge.train.intended import intended_for

    kermany = ("NORMAL", "PNEUMONIA")
    xray = intended_for(get_recipe("xray-pneumonia-plus").modality, kermany)
    assert xray["modality"] == "X-ray" and xray["body_part"] == "chest" and xray["population"].startswith("children")
    demo = intended_for(get_recipe("demo").modality, kermany)  # the demo's classes share Kermany's names
    assert demo["modality"] == "generated" and "children" not in demo["population"] and "site" not in demo
    assert intended_for(get_recipe("ct-lung-cancer").modality, kermany)["view"] == "axial slice"
    assert intended_for("", kermany) == {}


def test_recipe_diff_names_each_changed_field_and_a_named_recipe_has_none():
    from lungedge.train.recipes import RECIPES, customisations, customize, recipe_diff

    assert all(customisations(r) == [] for r in RECIPES.values())
    plus = get_recipe("xray-pneumonia-plus")
    mine = customize(plus, {"image_size": 288}, fine_tune={"epochs": 3}, sets=["augment.gamma=0.5"])
    assert customisations(mine) == [("augment.gamma", 0.3, 0.5), ("fine_tune.epochs", 15, 3), ("image_size", 224, 288)]
    assert recipe_diff(mine, mine) == [] and recipe_diff(plus, mine) == customisations(mine)
    assert [k for k, _, _ in recipe_diff(plus, plus.replace(description="x"))] == ["description"]


def test_overrides_are_validated_and_recipe_is_frozen():
    r = get_recipe("ct-lung-cancer", epochs=3, alpha=0.35, image_size=96, weights="none")
    assert (r.epochs, r.alpha, r.image_size, r.name) == (3, 0.35, 96, "ct-lung-cancer")
    assert get_recipe("ct-lung-cancer").epochs == 50  # the named recipe is unchanged
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        r.epochs = 4  # frozen dataclass
    for bad in ({"epochs": 0}, {"fractions": (0.5, 0.5, 0.5)}, {"split": "by-luck"}, {"alpha": 0.3},
                {"dropout": 1.0}, {"monitor": "loss"}, {"target_recall": 1.5}, {"image_size": "224"},
                {"domain_layers": []}, {"domain_layers": "block_16_project_BN"}, {"domain_layers": ["a", "a"]},
                {"modality": "MRI"}, {"modality": ["CT"]}):
        with pytest.raises(ConfigError):
            r.replace(**bad)
    assert r.replace(domain_layers=["block_16_project_BN", "block_5_project_BN"]).domain_layers == \
        ("block_16_project_BN", "block_5_project_BN")  # a JSON list becomes a tuple
    with pytest.raises(ConfigError, match="unknown recipe field"):
        r.replace(epoch=3)
    with pytest.raises(ConfigError, match="positive_label"):
        r.replace(positive_label=None, target_recall=0.9)


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(ConfigError) as exc:
        get_recipe("xray")
    for name in RECIPES:
        assert name in str(exc.value)


def test_apply_overrides_parses_values_and_dotted_names():
    r = apply_overrides(get_recipe("ct-lung-cancer"), [
        "epochs=7", "fractions=[0.6,0.2,0.2]", "fine_tune.epochs=2", "fine_tune.blocks=3",
        "augment.rotation=5", "weights=none", "target_recall=null", "class_weights=true"])
    assert r.epochs == 7 and r.fractions == (0.6, 0.2, 0.2) and r.weights == "none" and r.class_weights
    assert r.fine_tune == FineTune(epochs=2, blocks=3, learning_rate=1e-5)
    assert r.augmentation == Augment(rotation=5.0)  # defaults for the rest of the augmentation
    with pytest.raises(ConfigError):
        apply_overrides(r, ["epochs"])
    with pytest.raises(ConfigError):
        apply_overrides(r, ["head.units=3"])


# ---------------------------------------------------------------- data and splits

def _dataset(counts, root="/data", groups_per_class=None):
    paths, labels = [], []
    for c, n in enumerate(counts):
        for i in range(n):
            if groups_per_class:
                pid = i % groups_per_class
                paths.append(f"{root}/c{c}/person{c * 1000 + pid}_bacteria_{i}.jpeg")
            else:
                paths.append(f"{root}/c{c}/img{i}.jpeg")
            labels.append(c)
    return Dataset(paths, np.asarray(labels), tuple(f"c{c}" for c in range(len(counts))), root)


def test_patient_ids_from_kermany_names():
    assert patient_id("x/person1000_bacteria_2931.jpeg") == "person1000"
    assert patient_id("person7_virus_12.jpeg") == "person7"
    assert patient_id("IM-0115-0001.jpeg") == "im-0115"
    assert patient_id("NORMAL2-IM-0115-0003.jpeg") == "im-0115"  # one numbering space: merged, never split
    assert patient_id("Bengin case (1).jpg") is None


def test_random_split_is_stratified_with_the_given_fractions():
    ds = _dataset([200, 600])
    a = split_dataset(ds, (0.75, 0.15, 0.10), "random", seed=1)
    for c, n in ((0, 200), (1, 600)):
        for s, f in (("train", 0.75), ("val", 0.15), ("test", 0.10)):
            got = int(((a == s) & (ds.labels == c)).sum())
            assert abs(got - f * n) <= 1.5, (c, s, got)
    assert np.array_equal(a, split_dataset(ds, (0.75, 0.15, 0.10), "random", seed=1))  # seeded
    assert not np.array_equal(a, split_dataset(ds, (0.75, 0.15, 0.10), "random", seed=2))


def test_grouped_split_keeps_each_patient_on_one_side():
    ds = _dataset([300, 900], groups_per_class=60)
    a = split_dataset(ds, (0.70, 0.15, 0.15), "grouped", seed=3)
    sides = {}
    for g, s in zip(ds.groups(), a):
        sides.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in sides.values())
    fr = [float((a == s).mean()) for s in ("train", "val", "test")]
    assert abs(fr[0] - 0.70) < 0.07 and abs(fr[1] - 0.15) < 0.06 and abs(fr[2] - 0.15) < 0.06, fr


def test_grouped_split_refuses_files_without_patient_ids():
    with pytest.raises(ConfigError, match="patient"):
        split_dataset(_dataset([20, 20]), (0.7, 0.15, 0.15), "grouped")


def _ct_numbered(counts, root="/ct"):
    """IQ-OTH/NCCD-like names: 'Bengin case (N).jpg', numbered from 1 per class."""
    names = ("Bengin case", "Malignant case", "Normal case")
    paths, labels = [], []
    for c, n in enumerate(counts):
        for i in range(1, n + 1):
            paths.append(f"{root}/{names[c]}s/{names[c]} ({i}).jpg")
            labels.append(c)
    return Dataset(paths, np.asarray(labels), tuple(f"{x}s" for x in names[:len(counts)]), root)


def test_slice_blocks_group_consecutive_numbers_per_class():
    ds = _ct_numbered([40, 70])
    blocks = ds.slice_blocks(30)
    assert blocks[0] == "Bengin cases/0" and blocks[28] == "Bengin cases/0"  # (1) and (29)
    assert blocks[29] == "Bengin cases/1"  # (30)
    assert blocks[40] == "Malignant cases/0"  # numbers restart per class: blocks never mix classes
    assert len(set(ds.slice_blocks(10))) == 5 + 8
    with pytest.raises(ConfigError, match="no number"):
        Dataset(["/x/a/scan.jpg", "/x/b/scan.jpg"], np.asarray([0, 1]), ("a", "b"), "/x").slice_blocks(30)


def test_blocked_split_and_folds_keep_each_block_on_one_side():
    ds = _ct_numbered([100, 450, 330])
    blocks = ds.slice_blocks(10)

    def one_side(a):
        sides = {}
        for g, s in zip(blocks, a):
            sides.setdefault(g, set()).add(s)
        return all(len(v) == 1 for v in sides.values())

    a = split_dataset(ds, (0.70, 0.15, 0.15), "blocked", seed=3, block=10)
    assert one_side(a) and {"train", "val", "test"} == set(a)
    assert not one_side(split_dataset(ds, (0.70, 0.15, 0.15), "random", seed=3))  # the test can fail
    folds = kfold_assignments(ds, 5, 0.15 / 0.85, "blocked", seed=42, block=10)
    assert all(one_side(f) for f in folds)
    assert (np.stack([f == "test" for f in folds]).sum(axis=0) == 1).all()
    for f in folds:  # every part of every fold holds every class
        assert all(((f == part) & (ds.labels == c)).any() for c in range(3) for part in ("train", "val", "test"))
    # 100 benign slices in blocks of 25 are 5 blocks: no 5-fold CV can give each fold's test and
    # validation parts benign slices, and a silent benign recall of 0 is refused instead
    with pytest.raises(ConfigError, match=r"no 'Bengin cases' image: the class has only 5 blocks"):
        kfold_assignments(ds, 5, 0.15 / 0.85, "blocked", seed=42, block=25)
    with pytest.raises(ConfigError, match="'random', 'grouped' or 'blocked'"):
        split_dataset(ds, (0.70, 0.15, 0.15), "by-date")


def test_recipe_split_block_is_validated_and_reaches_the_folds():
    r = get_recipe("ct-lung-cancer-plus", split="blocked")
    assert r.split_block == 16
    with pytest.raises(ConfigError, match="split_block"):
        r.replace(split_block=0)
    assert apply_overrides(r, ["split_block=12"]).split_block == 12


def test_kfold_folds_cover_everything_once():
    ds = _dataset([40, 100])
    folds = kfold_assignments(ds, 5, 0.15, "random", seed=0)
    assert len(folds) == 5
    tests = np.stack([f == "test" for f in folds])
    assert (tests.sum(axis=0) == 1).all()
    for f in folds:
        assert {"train", "val", "test"} == set(f)
    with pytest.raises(ConfigError):
        kfold_assignments(ds, 41, 0.15)


def _write_images(folder: Path, n: int, value: int, prefix: str = "img") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((20, 24), value + i, dtype=np.uint8)).save(folder / f"{prefix}{i}.png")


def test_unreadable_files_are_reported_and_left_out(tmp_path):
    _write_images(tmp_path / "Bengin cases", 4, 10)
    _write_images(tmp_path / "Normal cases", 4, 100)
    (tmp_path / "Normal cases" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "Bengin cases" / "empty.png").write_bytes(b"")
    ds = load_dataset(str(tmp_path))
    assert ds.class_names == ("Bengin cases", "Normal cases") and len(ds) == 10
    ok = drop_unreadable(ds, Preprocessing(height=32, width=32))
    assert len(ok) == 8 and len(ok.failures) == 2
    assert {Path(f["path"]).name for f in ok.failures} == {"broken.jpg", "empty.png"}
    assert all(f["error"] for f in ok.failures)


def test_kaggle_layout_keeps_the_official_test_split(tmp_path):
    for part, n in (("train", 12), ("val", 2), ("test", 4)):
        _write_images(tmp_path / part / "NORMAL", n, 10, f"IM-00{part}")
        _write_images(tmp_path / part / "PNEUMONIA", n, 200, f"p{part}")
    ds = load_dataset(str(tmp_path))
    assert ds.class_names == ("NORMAL", "PNEUMONIA") and len(ds) == 36
    a = split_dataset(ds, (0.75, 0.15, 0.10), "random", seed=0)
    test_files = {p for p, s in zip(ds.paths, a) if s == "test"}
    assert test_files == {p for p in ds.paths if "/test/" in p}
    assert {"train", "val"} <= set(a[[("/test/" not in p) for p in ds.paths]])


def test_manifest_round_trip(tmp_path):
    _write_images(tmp_path / "data" / "a", 6, 10)
    _write_images(tmp_path / "data" / "b", 6, 100)
    ds = load_dataset(str(tmp_path / "data"))
    a = split_dataset(ds, (0.5, 0.25, 0.25), "random", seed=0)
    write_manifest(tmp_path / "m.csv", ds, a)
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert len(rows) == 12 and set(rows[0]) == {"path", "label", "split", "group"}
    assert rows[0]["path"].startswith("a/")
    assert np.array_equal(read_manifest(tmp_path / "m.csv", ds), a)


# ---------------------------------------------------------------- threshold

def test_choose_threshold_meets_the_target_recall_with_fewest_false_positives():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.4
    p = np.clip(np.where(y, rng.normal(0.7, 0.2, 500), rng.normal(0.3, 0.2, 500)), 0, 1)
    for target in (0.8, 0.95, 1.0):
        t = choose_threshold(p, y, target)
        assert (p[y] >= t).mean() >= target
        higher = np.nextafter(t, 2.0)
        assert (p[y] >= higher).mean() < target  # any higher threshold misses the target
    with pytest.raises(ConfigError):
        choose_threshold(p, np.zeros(500, bool), 0.9)


def _balanced(pred, y, classes):
    return np.mean([(pred[y == c] == c).mean() for c in classes])


@pytest.mark.parametrize("target", [0.8, 0.95, 0.99])
def test_operating_point_meets_recall_with_the_best_balanced_accuracy(target):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3)) + 1.6 * np.eye(3)[y]
    logits[:, 1] += 0.8  # a model that over-calls class 1 (the "disease")
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    t = choose_operating_point(probs, y, 1, target)
    pred = apply_threshold(probs, 1, t)
    assert (pred[y == 1] == 1).mean() >= target
    best = _balanced(pred, y, range(3))
    for g in np.linspace(0, 1, 2001):  # no threshold that meets the target does better
        p = apply_threshold(probs, 1, g)
        if (p[y == 1] == 1).mean() >= target:
            assert _balanced(p, y, range(3)) <= best + 1e-12
    assert t <= choose_threshold(probs[:, 1], y == 1, target)


def test_apply_threshold_is_the_runtime_rule():
    probs = np.array([[0.5, 0.3, 0.2], [0.2, 0.35, 0.45], [0.6, 0.1, 0.3]])
    assert apply_threshold(probs, None, None).tolist() == [0, 2, 0]
    # class 1 when p1 >= 0.3, else the most probable other class
    assert apply_threshold(probs, 1, 0.3).tolist() == [1, 1, 0]


def test_resolve_label_matches_folder_names():
    labels = ("Bengin cases", "Malignant cases", "Normal cases")
    assert resolve_label("malignant", labels) == "Malignant cases"
    assert resolve_label("PNEUMONIA", ("NORMAL", "PNEUMONIA")) == "PNEUMONIA"
    with pytest.raises(ConfigError):
        resolve_label("cases", labels)


# ---------------------------------------------------------------- ImageNet weights lookup

def test_weights_lookup_order_and_clear_error(tmp_path, monkeypatch):
    name = weights_mod.imagenet_file_name(1.0, 224)
    monkeypatch.setattr(weights_mod, "_REPO", tmp_path / "repo")
    monkeypatch.delenv(weights_mod.ENV_VAR, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    fetched = []

    def offline(alpha=1.0, image_size=224):  # what Keras's download does without a network
        fetched.append((alpha, image_size))
        raise weights_mod.WeightsUnavailable("download failed (Name or service not known); "
                                             + weights_mod.how_to_provide(name))

    monkeypatch.setattr(weights_mod, "download_imagenet_weights", offline)
    with pytest.raises(weights_mod.WeightsUnavailable) as exc:
        weights_mod.resolve_weights("imagenet")
    msg = str(exc.value)
    assert fetched == [(1.0, 224)], "the standard download is tried after the local places"
    assert weights_mod.ENV_VAR in msg and "KERAS_HOME" in msg and name in msg and "\n" not in msg
    (tmp_path / "kh" / "models").mkdir(parents=True, exist_ok=True)
    (tmp_path / "kh" / "models" / name).write_bytes(b"h5")
    assert weights_mod.resolve_weights("imagenet", 1.0, 96) == str(tmp_path / "kh" / "models" / name)
    own = tmp_path / "elsewhere.h5"
    own.write_bytes(b"h5")
    monkeypatch.setenv(weights_mod.ENV_VAR, str(own))
    assert weights_mod.resolve_weights("imagenet") == str(own)
    assert weights_mod.resolve_weights("none") is None
    with pytest.raises(ConfigError, match="not found"):
        weights_mod.resolve_weights(str(tmp_path / "missing.h5"))
    assert len(fetched) == 1, "a local file is used without any download"


@pytest.mark.needs_tf
def test_keras_download_failure_is_one_line_naming_the_three_ways(tmp_path, monkeypatch):
    import keras

    def no_network(fname, origin, **kw):
        assert origin.endswith(fname) and kw.get("cache_subdir") == "models"
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    with pytest.raises(weights_mod.WeightsUnavailable) as exc:
        weights_mod.download_imagenet_weights()
    msg = str(exc.value)
    assert "\n" not in msg and "download failed ([Errno -2] Name or service not known)" in msg
    for way in ("$KERAS_HOME/models/", weights_mod.ENV_VAR, "--weights"):
        assert way in msg


@pytest.mark.needs_shared
def test_real_kermany_grouped_split_has_no_patient_on_two_sides(xray_dir):
    ds = load_dataset(str(xray_dir))
    groups = ds.groups(required=True)  # every real file name carries a patient
    a = split_dataset(ds, (0.75, 0.15, 0.10), "grouped", seed=42)
    sides = {}
    for g, s in zip(groups, a):
        sides.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in sides.values())
    assert len(sides) > 1000
    for s, f in (("train", 0.75), ("val", 0.15), ("test", 0.10)):
        assert abs(float((a == s).mean()) - f) < 0.03
    # the random split, by contrast, does put patients on two sides (the leak the grouped split removes)
    r = split_dataset(ds, (0.75, 0.15, 0.10), "random", seed=42)
    mixed = {}
    for g, s in zip(groups, r):
        mixed.setdefault(g, set()).add(s)
    assert sum(len(v) > 1 for v in mixed.values()) > 100


def test_each_training_phase_early_stops_on_its_own(tmp_path):
    """A new phase starts without a best value: fine-tuning keeps its own best epoch even when the
    head phase had a lower validation loss (the checkpoint restores within the phase)."""
    from lungedge.train.checkpoint import TrainState

    s = TrainState(tmp_path)
    assert s.start_phase("head") == 0
    s.best, s.wait, s.epoch = 0.05, 3, 7
    s.finish_phase()
    assert s.start_phase("fine_tune") == 0 and s.best is None and s.wait == 0
    s.best, s.epoch = 0.08, 2
    s.save()
    again = TrainState.load(tmp_path)  # a resumed run continues the phase with its own best
    assert again.start_phase("fine_tune") == 2 and again.best == 0.08


@pytest.mark.needs_tf
def test_site_shift_augmentation_and_its_phases():
    import tensorflow as tf

    from lungedge.train.input_data import build_augmenter, intensity_jitter

    r = get_recipe("xray-pneumonia-plus").replace(augment={"gamma": 0.3, "blur": 1.0, "noise": 0.03, "crop": 0.1},
                                                   augment_phases="fine_tune")
    assert r.augmentation_in("head") is None and r.augmentation_in("fine_tune").gamma == 0.3
    with pytest.raises(ConfigError, match="augment_phases"):
        r.replace(augment_phases="sometimes")
    with pytest.raises(ConfigError, match="augment.gamma"):
        Augment(gamma=2.0)
    a = r.augmentation
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32"))
    y = intensity_jitter(build_augmenter(a, 1)(x, training=True), a, 1)
    assert y.shape == x.shape and float(tf.reduce_min(y)) >= 0.0 and float(tf.reduce_max(y)) <= 255.0
    assert float(tf.reduce_mean(tf.abs(y - x))) > 1.0  # it changed the pixels
    flat = tf.fill((2, 32, 32, 3), 64.0)  # gamma alone: a flat image stays flat, its level moves
    g = intensity_jitter(flat, Augment(rotation=0, shift=0, zoom=0, brightness=0, contrast=0, gamma=0.5), 2)
    assert float(tf.math.reduce_std(g[0])) < 1e-3 and abs(float(g[0, 0, 0, 0]) - 64.0) > 0.1


def test_fine_tuning_weight_average_settings():
    from lungedge.train.model import ema_momentum

    r = get_recipe("ct-lung-cancer-plus", fine_tune={"epochs": 4, "blocks": 6, "early_stopping": False, "ema_epochs": 2})
    assert r.fine_tune.ema_epochs == 2.0
    with pytest.raises(ConfigError, match="early_stopping=false"):
        get_recipe("ct-lung-cancer-plus", fine_tune={"epochs": 4, "blocks": 6, "ema_epochs": 2})
    for bad in (-1, "2", True, 1e9):
        with pytest.raises(ConfigError, match="ema_epochs"):
            get_recipe("ct-lung-cancer-plus", fine_tune={"epochs": 4, "blocks": 6, "early_stopping": False, "ema_epochs": bad})
    assert ema_momentum(0, 19) == 0.0
    assert ema_momentum(2, 50) == pytest.approx(0.99)  # time constant of 100 steps
    assert ema_momentum(0.01, 3) == 0.0  # a time constant under one step: the last weights


@pytest.mark.needs_tf
def test_weight_average_is_the_exponential_average_of_every_step():
    """compile_model's EMA: after fit, the weights are the moving average of the weights after each
    step (Keras's optimizer EMA, first step taken as is), not the last step's."""
    import keras

    from lungedge.train.model import compile_model

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    m = 0.8
    compile_model(model, 0.05, ema=m)
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(model.get_weights()[0].copy()))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 2, 40)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[record])
    assert len(seen) == 10
    avg = seen[0]
    for w in seen[1:]:
        avg = m * avg + (1 - m) * w
    final = model.get_weights()[0]
    np.testing.assert_allclose(final, avg, rtol=1e-5, atol=1e-6)
    assert not np.allclose(final, seen[-1], atol=1e-4)


@pytest.mark.needs_tf
def test_weight_average_survives_an_interrupted_phase(tmp_path):
    """A phase resumed from its epoch checkpoint (raw weights + optimizer variables, which hold the
    average and the step count) ends with the same averaged weights as one uninterrupted fit; a
    phase whose every epoch ran before gets the restored average (what _fit_phase does on resume)."""
    import keras

    from lungedge.train import checkpoint as ck
    from lungedge.train.model import compile_model

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 2, 40)

    def fresh():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        compile_model(model, 0.05, ema=0.7)
        return model

    whole = fresh()
    whole.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    def load(model, path):  # weights only, as training's _load_weights: the optimizer comes from its own file
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(path)

    def save(model, name):
        return keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: (
            ck.save_weights_atomic(model, tmp_path / f"{name}{e}.weights.h5"),
            ck.save_optimizer(model.optimizer, tmp_path / f"{name}{e}.npz")))

    first = fresh()
    first.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[save(first, "e")])
    resumed = fresh()
    load(resumed, tmp_path / "e0.weights.h5")
    assert ck.load_optimizer(resumed.optimizer, resumed.trainable_variables, tmp_path / "e0.npz")
    resumed.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(resumed.get_weights()[0], whole.get_weights()[0], rtol=1e-5, atol=1e-6)

    done = fresh()  # killed after its last epoch's checkpoint, before the phase was marked done
    load(done, tmp_path / "e1.weights.h5")
    assert ck.load_optimizer(done.optimizer, done.trainable_variables, tmp_path / "e1.npz")
    assert not np.allclose(done.get_weights()[0], whole.get_weights()[0], atol=1e-4)  # raw last weights
    done.optimizer.finalize_variable_values(done.trainable_variables)
    np.testing.assert_allclose(done.get_weights()[0], whole.get_weights()[0], rtol=1e-5, atol=1e-6)


def test_model_card_says_which_split_and_what_it_leaks():
    from types import SimpleNamespace

    from lungedge.train.run_report import _card_limitations

    spec = SimpleNamespace(threshold=None)
    assert get_recipe("ct-lung-cancer-plus").split == "blocked"  # the project's CT recipe: no neighbouring slices
    assert get_recipe("ct-lung-cancer").split == "random"  # the paper's split, reproducible by name
    random_ct = "\n".join(_card_limitations(get_recipe("ct-lung-cancer"), spec))
    blocked_ct = "\n".join(_card_limitations(get_recipe("ct-lung-cancer-plus", split="blocked", split_block=20), spec))
    assert "random split puts slices of one patient on both sides" in random_ct and "--split blocked" in random_ct
    assert "blocks of 20 consecutive slice numbers" in blocked_ct and "random split" not in blocked_ct


def test_a_random_split_ct_card_leads_its_metrics_with_the_leakage_warning():
    from types import SimpleNamespace

    from lungedge.train.run_report import _card_metrics

    m = {"accuracy": 0.97, "macro": {"precision": 1, "recall": 1, "f1": 1}, "weighted": {"f1": 1}, "auc": None,
         "per_class": {n: {"precision": 1, "recall": 1, "f1": 1, "specificity": 1, "support": 1}
                       for n in ("benign", "malignant", "normal")}}
    spec = SimpleNamespace(threshold=None, labels=("benign", "malignant", "normal"))
    random_card = _card_metrics(get_recipe("ct-lung-cancer"), spec, m, None, None, None)
    first = next(ln for ln in random_card if ln)
    assert first == "## Test metrics" and random_card[random_card.index(first) + 2].startswith("**Read this first")
    blocked_card = "\n".join(_card_metrics(get_recipe("ct-lung-cancer-plus"), spec, m, None, None, None))
    assert "Read this first" not in blocked_card


def test_the_card_quotes_the_published_result_of_the_declared_task():
    """Which paper a card quotes follows the recipe's declared modality, not its name."""
    from types import SimpleNamespace

    from lungedge.train.run_report import _card_metrics

    labels = ("NORMAL", "PNEUMONIA")
    m = {"accuracy": 0.9, "macro": {"precision": 1, "recall": 1, "f1": 1}, "weighted": {"f1": 1}, "auc": None,
         "per_class": {n: {"precision": 1, "recall": 1, "f1": 1, "specificity": 1, "support": 1} for n in labels}}
    spec = SimpleNamespace(threshold=None, labels=labels)

    def card(recipe):
        return "\n".join(_card_metrics(recipe, spec, m, None, None, None))

    assert "95.40 %" in card(get_recipe("xray-pneumonia-micro")) and "`xray-pneumonia`" in card(get_recipe("xray-pneumonia-micro"))
    assert "97.26" in card(get_recipe("ct-lung-cancer-plus", split="random"))
    renamed = get_recipe("xray-pneumonia").replace(name="my-site-recipe")
    assert "95.40 %" in card(renamed)  # the name does not decide
    assert "Published" not in card(get_recipe("demo"))
