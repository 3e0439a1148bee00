"""convert/ on real X-rays: a MobileNetV2 1.0/224 ImageNet base with a head trained on ~200
real chest X-rays, converted through a run folder like train/ writes; the int8 file must agree
with its Keras model on held-out real images, and the files must be as small as promised.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lungedge.edge_runtime.image_files import list_labelled_folder
from lungedge.edge_runtime.spec import ModelSpec, Preprocessing, Threshold

TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 50
#: int8 (full integer) must give the Keras model's top-1 class on at least this share.
MIN_INT8_AGREEMENT = 0.97
#: float16 weights: largest probability difference from Keras on any real test image.
FLOAT16_TOLERANCE = 0.05
#: file size as a ratio of float32 (MobileNetV2 1.0/224 with a Dense head), the issue's targets.
#: int8 reaches it because identical vectors are written once (``edge_runtime.metadata``): the
#: all-zero int64 zero points of every channel's weights and bias would otherwise add 0.27 MB.
MAX_FLOAT16_RATIO, MAX_INT8_RATIO = 0.52, 0.30


def _pick(files, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(len(files.class_names)):
        idx = rng.permutation([i for i, y in enumerate(files.labels) if y == c])
        train += [(files.paths[i], files.class_names[c]) for i in idx[:per_class]]
        test += [(files.paths[i], files.class_names[c]) for i in idx[per_class:per_class + TEST_PER_CLASS]]
    return train, test


def _real_run(root: Path, xray_dir: Path, weights: Path) -> Path:
    """A run folder whose model is ImageNet MobileNetV2 + a softmax head fit on cached features."""
    import keras

    from lungedge.edge_runtime.preprocess import preprocess

    keras.utils.set_random_seed(0)
    files = list_labelled_folder(str(xray_dir))
    train, test = _pick(files, TRAIN_PER_CLASS, seed=0)
    pre = Preprocessing(224, 224)
    labels = tuple(files.class_names)
    base = keras.applications.MobileNetV2(input_shape=(224, 224, 3), include_top=False, weights=str(weights))
    pool = keras.layers.GlobalAveragePooling2D()
    features = keras.Sequential([base, pool])
    x = np.stack([preprocess(p, pre) for p, _ in train])
    y = np.array([labels.index(name) for _, name in train])
    f = features.predict(x, batch_size=32, verbose=0)
    head = keras.layers.Dense(len(labels), activation="softmax")
    hin = keras.Input(f.shape[1:])
    head_model = keras.Model(hin, head(hin))
    head_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    head_model.fit(f, y, epochs=30, batch_size=32, verbose=0)
    inp = keras.Input((224, 224, 3))
    model = keras.Model(inp, head(pool(base(inp, training=False))))
    run = root / "run"
    run.mkdir()
    model.save(run / "model.keras")
    spec = ModelSpec(labels=labels, preprocessing=pre, positive_label="PNEUMONIA",
                     threshold=Threshold("PNEUMONIA", 0.5), recipe="test-imagenet-head")
    (run / "spec.json").write_text(spec.to_json())
    with open(run / "split_manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows([p, name, "train"] for p, name in train)
        w.writerows([p, name, "test"] for p, name in test)
    return run


@pytest.mark.needs_tf
@pytest.mark.needs_shared
@pytest.mark.slow
def test_int8_agrees_with_keras_on_real_xrays(xray_dir, imagenet_weights, tmp_path):
    from lungedge.convert.conversion import convert_run
    from lungedge.edge_runtime.metadata import read_spec_from_file

    run = _real_run(tmp_path, xray_dir, imagenet_weights)
    report = convert_run(run, variants="float32,float16,int8", calibration_count=100,
                         max_accuracy_drop=100.0, max_recall_drop=100.0)
    rows = {v["variant"]: v for v in report["variants"]}
    summary = {k: (v["size_bytes"], round(v["size_ratio"], 3), round(v["accuracy"], 3),
                   round(v["top1_agreement"], 3), round(v["max_prob_diff"], 4)) for k, v in rows.items()}
    print(f"\nkeras accuracy {report['keras']['accuracy']:.3f} on {report['test']['n']} images; "
          f"(bytes, x float32, accuracy, agreement, max|dp|): {summary}")
    assert report["test"]["n"] == 2 * TEST_PER_CLASS
    assert rows["int8"]["top1_agreement"] >= MIN_INT8_AGREEMENT, summary
    # the int8 file outputs logits: it keeps the float model's ranking (AUC within 0.01)
    aucs = {k: rows[k]["metrics"]["auc"]["macro"] for k in ("float32", "int8")}
    print(f"AUC on the test images: {aucs}")
    assert abs(aucs["int8"] - aucs["float32"]) <= 0.01, aucs
    record = read_spec_from_file(rows["int8"]["file"]).extra["conversion"]
    # every op corrected: MobileNetV2's 52 convolutions and the head's Dense layer
    assert record["bias_correction"]["layers"] == 53 and record["calibration_images"] == 100
    assert rows["float16"]["top1_agreement"] == 1.0, summary
    assert rows["float16"]["max_prob_diff"] <= FLOAT16_TOLERANCE, summary
    assert rows["float16"]["size_ratio"] <= MAX_FLOAT16_RATIO, summary
    assert rows["int8"]["size_ratio"] <= MAX_INT8_RATIO, summary
    assert report["keras"]["accuracy"] >= 0.75, "the head did not learn: the agreement would say little"
