"""Heat maps from the model file: the ``heatmap`` signature written at conversion, read on the device.

MobileNetV2 with the ImageNet weights in ../shared and a head like the recipes' (Dense(64, ReLU),
Dropout, Dense(2), softmax) trained on cached features of generated radiographs
(``lungedge.demo_data``), then converted to float32 and int8. Checked: the default signature is still one input, one output
(single-output consumers unchanged); the map is exactly the head's logit difference spread over
locations; its peak falls inside a synthetic opacity; the int8 map agrees with the float one.
"""

from __future__ import annotations

import numpy as np
import pytest

from lungedge.edge_runtime.preprocess import preprocess
from lungedge.edge_runtime.spec import ModelSpec, Preprocessing
from lungedge.demo_data import synthetic_radiograph

pytestmark = [pytest.mark.needs_tf, pytest.mark.needs_shared, pytest.mark.slow]

SIZE = 224
LABELS = ("NORMAL", "PNEUMONIA")
#: least Pearson correlation of the int8 map with the float32 map, per image (measured 0.977 to 0.991)
MIN_INT8_CORRELATION = 0.9


def with_opacity(seed: int, centre=(0.32, 0.45), radius: float = 0.09):
    """A NORMAL image with one opacity added at ``centre`` (x, y as fractions); (image, mask)."""
    rng = np.random.default_rng(seed)
    img = synthetic_radiograph(rng, SIZE, 0).astype(np.float32) / 255
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    blob = np.exp(-(((xx - centre[0]) / radius) ** 2 + ((yy - centre[1]) / radius) ** 2))
    out = np.clip(img + 0.4 * blob, 0, 1)
    return (out * 255).astype(np.uint8), blob > 0.2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, imagenet_weights):
    """MobileNetV2 with ImageNet features and a head trained on generated radiographs (cached
    features, as the recipes train it): 224 px, so the map is the real 7x7."""
    import keras

    from lungedge.convert.keras_convert import convert_keras_model
    from lungedge.edge_runtime.preprocess import preprocess

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    pre = Preprocessing(SIZE, SIZE, "rgb")
    xs, ys = [], []
    for i in range(200):
        y = i % 2
        xs.append(preprocess(synthetic_radiograph(rng, SIZE, int(rng.integers(1, 3)) if y else 0), pre))
        ys.append(y)
    x, y = np.stack(xs), np.asarray(ys)
    base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=False, weights=str(imagenet_weights))
    base.trainable = False
    feats = keras.layers.GlobalAveragePooling2D(name="gap")
    head = keras.Sequential([keras.Input((1280,)), keras.layers.Dense(64, activation="relu", name="dense"),
                             keras.layers.Dropout(0.3, name="dropout"), keras.layers.Dense(2, name="logits"),
                             keras.layers.Activation("softmax", name="probabilities")], name="head")
    cached = base.predict(x, batch_size=32, verbose=0).mean(axis=(1, 2))
    head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    head.fit(cached, y, epochs=60, batch_size=32, verbose=0)
    acc = float(head.evaluate(cached, y, verbose=0)[1])
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    model = keras.Model(inp, head(feats(base(inp, training=False))))
    spec = ModelSpec(labels=LABELS, preprocessing=pre, recipe="demo")
    out = tmp_path_factory.mktemp("heatmap")
    paths = {}
    for v in ("float32", "int8"):
        data = convert_keras_model(model, spec, v, calibration=x[::5], bias_correction=False, heatmap=True)
        paths[v] = out / f"model_{v}.tflite"
        paths[v].write_bytes(data)
    return {"paths": paths, "acc": acc, "model": model}


def test_default_signature_is_unchanged_and_heatmap_signature_is_there(trained):
    from ai_edge_litert.interpreter import Interpreter

    for v, path in trained["paths"].items():
        it = Interpreter(model_path=str(path))
        it.allocate_tensors()
        # what MediaPipe, the Task Library and a plain interpreter run: subgraph 0, one in, one out
        assert len(it.get_input_details()) == 1 and len(it.get_output_details()) == 1, v
        assert tuple(it.get_output_details()[0]["shape"]) == (1, 2)
        sigs = it.get_signature_list()
        assert sigs["serving_default"]["outputs"] == ["probabilities"]
        assert sorted(sigs["heatmap"]["outputs"]) == ["heatmap", "probabilities"]


def test_map_is_the_logit_difference_over_locations_and_probabilities_agree(trained):
    from lungedge.convert.heatmap_signature import MASK_GAIN
    from lungedge.edge_runtime.classifier import Classifier

    clf = Classifier(trained["paths"]["float32"])
    assert clf.has_heatmap and clf.describe()["heatmap"]
    for seed in range(4):
        img, _ = with_opacity(seed)
        with_map, plain = clf.classify(img, heatmap=True), clf.classify(img)
        assert with_map.probabilities == pytest.approx(plain.probabilities, abs=1e-6)
        p = np.array([with_map.probabilities[k] for k in LABELS], np.float64)
        cam = with_map.heatmap
        assert cam.shape == (7, 7) and cam.dtype == np.float32
        # the map is linear in the features: its mean over locations is the class's centred output
        # weights applied to the masked hidden layer of the pooled features, without the biases
        # (convert/heatmap_signature.py); computed here in numpy from the Keras model's own weights
        i = LABELS.index(with_map.label)
        model = trained["model"]
        pooled = np.asarray(model.get_layer("gap")(model.layers[1](preprocess(img, clf.spec.preprocessing)[None])))[0]
        head = model.get_layer("head")
        w1, b1 = head.get_layer("dense").get_weights()
        w2, b2 = head.get_layer("logits").get_weights()
        z = pooled @ w1
        mask = np.minimum(np.maximum(z + b1, 0) * MASK_GAIN, 1.0)
        want = ((z * mask) @ (w2 - w2.mean(axis=1, keepdims=True)))[i]
        assert cam.mean() == pytest.approx(want, rel=1e-3, abs=1e-3)
        # and the probabilities are the head's: log-odds = the logit difference, biases included
        logits = np.maximum(z + b1, 0) @ w2 + b2
        assert np.log(p[i]) - np.log(p[1 - i]) == pytest.approx(logits[i] - logits[1 - i], abs=1e-3)


def test_peak_falls_inside_a_synthetic_opacity_and_int8_agrees(trained):
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.heatmap_overlay import peak

    assert trained["acc"] > 0.9, f"the test model did not learn the opacities (accuracy {trained['acc']:.2f})"
    clfs = {v: Classifier(p) for v, p in trained["paths"].items()}
    hits, corr = 0, []
    centres = [(0.30, 0.42), (0.70, 0.50), (0.33, 0.58), (0.66, 0.38), (0.31, 0.50), (0.68, 0.60)]
    for seed, c in enumerate(centres):
        img, mask = with_opacity(100 + seed, c)
        f = clfs["float32"].classify(img, heatmap=True)
        q = clfs["int8"].classify(img, heatmap=True)
        assert f.label == "PNEUMONIA"
        x, y = peak(f.heatmap, (SIZE, SIZE))
        # the map has one value per feature cell (32 px at 224): the peak's cell must cover part of
        # the opacity (measured: peaks 13 to 38 px from the opacity's centre, radius 20 px)
        cell = SIZE // f.heatmap.shape[0]
        x0, y0 = x // cell * cell, y // cell * cell
        hits += bool(mask[y0:y0 + cell, x0:x0 + cell].any())
        # the map of PNEUMONIA in both (the int8 model may decide otherwise near the threshold)
        corr.append(np.corrcoef(f.heatmap.ravel(), q.heatmap.ravel())[0, 1] if q.label == f.label else np.nan)
    assert hits == len(centres), f"peak inside the opacity in {hits} of {len(centres)} images"
    corr = np.asarray(corr)
    print(f"int8 vs float32 map correlation per image: {np.round(corr, 3).tolist()}")
    assert np.nanmin(corr) >= MIN_INT8_CORRELATION, f"int8 vs float32 map correlation {np.round(corr, 3)}"


def test_cli_heatmap_and_report(trained, tmp_path):
    import csv

    from click.testing import CliRunner
    from PIL import Image

    from lungedge.cli import main

    img, _ = with_opacity(7)
    Image.fromarray(img).save(tmp_path / "opacity.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    res = CliRunner().invoke(main, ["classify", "-m", str(trained["paths"]["int8"]), "--heatmap", str(tmp_path / "maps"),
                                    "--report", str(tmp_path / "rep"), str(tmp_path / "opacity.png"), str(tmp_path / "broken.png")])
    assert res.exit_code == 1, res.output  # one bad file
    maps = sorted((tmp_path / "maps").glob("*.png"))
    assert [m.name for m in maps] == ["0000_opacity_heatmap.png"]
    assert Image.open(maps[0]).mode == "RGB"
    rows = list(csv.DictReader(open(tmp_path / "rep" / "results.csv")))
    assert [r["label"] for r in rows] == ["PNEUMONIA", ""] and "not an image" in rows[1]["error"]
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Not a medical device" in page and rows[0]["model_sha256"] in page and "int8" in page
    assert (tmp_path / "rep" / rows[0]["heatmap_file"]).is_file()
