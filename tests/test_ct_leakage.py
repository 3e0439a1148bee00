"""experiments/ct_leakage.py: the probes that show how much neighbouring slices are worth (synthetic
features and generated slices; the real measurement is in train/SELECTION.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiment_scripts import experiment
from lungedge.train.dataset import Dataset, kfold_assignments

ct_leakage = experiment("ct_leakage")


def _patients(counts=(120, 200, 150), per_patient=10, class_strength=0.0, seed=0):
    """Slices numbered in order, ``per_patient`` consecutive numbers a patient; a slice's features are
    its patient's vector plus noise (plus a class vector of ``class_strength``)."""
    rng = np.random.default_rng(seed)
    names = ("Bengin case", "Malignant case", "Normal case")
    paths, labels, feats, numbers = [], [], [], []
    class_vec = rng.normal(size=(3, 64))
    for c, n in enumerate(counts):
        for i in range(1, n + 1):
            if i % per_patient == 0 or i == 1:  # patient p holds numbers p * per_patient ... (blocks align)
                patient = rng.normal(size=64) * 3
            paths.append(f"/ct/{names[c]}s/{names[c]} ({i}).jpg")
            labels.append(c)
            numbers.append(i)
            feats.append(patient + class_strength * class_vec[c] + rng.normal(size=64))
    ds = Dataset(paths, np.asarray(labels), tuple(f"{x}s" for x in names), "/ct")
    return ds, np.asarray(feats, dtype=np.float32), np.asarray(numbers)


def test_neighbour_adjacency_finds_the_neighbouring_slice():
    ds, f, numbers = _patients()
    rows = ct_leakage.neighbour_adjacency(f, ds.labels, numbers, ds.class_names)
    for r in rows:
        assert r["nearest_same_class"] > 0.95
        assert r["median_number_distance"] <= 5 < r["random_pair_median_distance"]


def test_probes_score_memorised_patients_on_random_folds_and_not_on_blocked_ones():
    """Features that carry the patient and nothing of the class: a lookup of the nearest slice
    is right on random folds (the patient's other slices are in training) and at chance on
    blocked folds; with a class signal both probes stay well above chance when blocked."""
    ds, f, _ = _patients(class_strength=0.0)
    rare = 0
    random_folds = kfold_assignments(ds, 5, 0.15 / 0.85, "random", 42)
    blocked_folds = kfold_assignments(ds, 5, 0.15 / 0.85, "blocked", 42, block=10)
    on_random = ct_leakage.probe(f, ds.labels, random_folds, rare)["nearest_neighbour"]
    on_blocked = ct_leakage.probe(f, ds.labels, blocked_folds, rare)["nearest_neighbour"]
    assert on_random["accuracy_mean"] > 0.95
    assert on_blocked["accuracy_mean"] < 0.6
    assert len(on_random["accuracy_per_fold"]) == 5 and sum(on_random["test_sizes"]) == len(ds)

    ds, f, _ = _patients(class_strength=2.0, seed=1)
    blocked = ct_leakage.probe(f, ds.labels, kfold_assignments(ds, 5, 0.15 / 0.85, "blocked", 42, block=10), rare)
    for name in ("nearest_neighbour", "logistic_regression"):
        assert blocked[name]["accuracy_mean"] > 0.8, (name, blocked[name])
        assert blocked[name]["rare_recall_min"] <= blocked[name]["rare_recall_mean"]


def test_markdown_and_plot_are_written(tmp_path):
    ds, f, numbers = _patients()
    folds = kfold_assignments(ds, 3, 0.15 / 0.85, "blocked", 42, block=10)
    res = {"data": "/ct", "images": len(ds), "image_size": 224, "k": 3, "seed": 42, "rare_class": ds.class_names[0],
           "command": "python -m lungedge.train.ct_leakage", "neighbours": ct_leakage.neighbour_adjacency(f, ds.labels, numbers, ds.class_names),
           "probes": [{"split": "blocked 10", "block": 10, "results": ct_leakage.probe(f, ds.labels, folds, 0)}]}
    md = ct_leakage._markdown(res)
    assert "| blocked 10 | nearest neighbour |" in md and "Bengin cases" in md
    ct_leakage._plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def _numbered_folder(root: Path, per_class: int = 12) -> Path:
    """Generated numbered slices, ``<class>/<class minus s> (N).png``, each class its own brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("Bengin cases", "Malignant cases", "Normal cases")):
        d = root / name
        d.mkdir(parents=True)
        for i in range(1, per_class + 1):
            pixels = np.clip(rng.normal(60 + 70 * c, 20, (48, 48)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(d / f"{name[:-1]} ({i}).png")
    return root


@pytest.mark.needs_tf
def test_the_command_leaves_out_unreadable_slices_and_refuses_unnumbered_names(tmp_path, capsys):
    data = _numbered_folder(tmp_path / "ct")
    good = next((data / "Bengin cases").iterdir()).read_bytes()
    (data / "Bengin cases" / "Bengin case (90).png").write_bytes(good[: len(good) // 3])
    (data / "Normal cases" / "Normal case (91).png").write_bytes(b"")
    out = tmp_path / "out"
    assert ct_leakage.main(["--data", str(data), "--out", str(out), "--recipe", "demo-scratch", "--folds", "3",
                            "--blocks", "2"]) == 0
    res = json.loads((out / "ct_leakage.json").read_text())
    left_out = sorted(Path(f["path"]).name for f in res["unreadable_left_out"])
    assert left_out == ["Bengin case (90).png", "Normal case (91).png"]
    assert res["images"] == 36 and [r["split"] for r in res["probes"]] == ["random", "blocked 2"]
    assert "truncated" in capsys.readouterr().err

    (data / "Normal cases" / "Normal case.png").write_bytes(good)
    assert ct_leakage.main(["--data", str(data), "--out", str(tmp_path / "out2"), "--recipe", "demo-scratch"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Normal case.png" in err and "no slice number" in err
    assert not (tmp_path / "out2").exists()
