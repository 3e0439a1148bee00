"""Contrast normalisation (CLAHE) in the one preprocessing function: OpenCV's result, recorded in
the model's metadata, applied the same way on every path into the model (training included)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lungedge.edge_runtime.contrast import apply_contrast, clahe
from lungedge.edge_runtime.errors import ConfigError
from lungedge.edge_runtime.preprocess import load_pixels, normalize, preprocess
from lungedge.edge_runtime.spec import ModelSpec, Preprocessing

from images import gradient


def _xray_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A low-contrast image with structure: a dark field, a brighter blob and noise, in 60..140."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = 40 * np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 3) / (w / 5)) ** 2))
    return np.clip(70 + blob + 0.1 * xx + rng.normal(0, 6, (h, w)), 60, 140).astype(np.uint8)


@pytest.mark.parametrize("clip,tiles", [(2.0, 8), (4.0, 8), (1.0, 4), (0.0, 8), (2.0, 7)])
def test_clahe_is_opencvs(clip, tiles):
    cv2 = pytest.importorskip("cv2", reason="OpenCV (installed with MediaPipe) is the reference")
    images = [_xray_like(224, 224), gradient(224, 224, seed=1), np.random.default_rng(2).integers(0, 256, (224, 224), dtype=np.uint8),
              np.full((224, 224), 37, np.uint8), _xray_like(61, 97, seed=3)]
    for img in images:
        want = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(img)
        got = clahe(img, clip, tiles)
        assert got.dtype == np.uint8 and got.shape == img.shape
        diff = np.abs(got.astype(int) - want.astype(int))
        # model-size images that divide into the tiles: identical; padded ones: within one level
        assert diff.max() <= (0 if img.shape[0] % tiles == 0 and img.shape[1] % tiles == 0 else 1), (img.shape, diff.max())


def test_clahe_spreads_a_low_contrast_image_and_keeps_its_order():
    img = _xray_like(224, 224)
    out = clahe(img)
    assert out.std() > 1.5 * img.std()  # clip limit 2 caps the stretch
    # monotone within a tile's neighbourhood: brighter pixels never become darker on average
    assert np.corrcoef(img.ravel(), out.ravel())[0, 1] > 0.8


def test_preprocessing_records_contrast_only_when_used():
    plain = Preprocessing(height=32, width=32)
    assert "contrast" not in plain.to_dict() and "clahe_tiles" not in plain.to_dict()  # files read as before
    assert Preprocessing.from_dict(plain.to_dict()) == plain
    eq = Preprocessing(height=32, width=32, contrast="clahe", clahe_clip_limit=3, clahe_tiles=4)
    d = eq.to_dict()
    assert (d["contrast"], d["clahe_clip_limit"], d["clahe_tiles"]) == ("clahe", 3.0, 4)
    assert Preprocessing.from_dict(d) == eq
    spec = ModelSpec(labels=("a", "b"), preprocessing=eq)
    assert ModelSpec.from_json(spec.to_json()).preprocessing == eq


@pytest.mark.parametrize("kw,words", [
    ({"contrast": "hist"}, "contrast must be one of none, clahe"),
    ({"contrast": "clahe", "clahe_clip_limit": -1}, "clahe_clip_limit"),
    ({"contrast": "clahe", "clahe_clip_limit": float("nan")}, "clahe_clip_limit"),
    ({"contrast": "clahe", "clahe_clip_limit": "2"}, "clahe_clip_limit"),
    ({"contrast": "clahe", "clahe_tiles": 0}, "clahe_tiles"),
    ({"contrast": "clahe", "clahe_tiles": 2.0}, "clahe_tiles"),
    ({"contrast": "clahe", "clahe_tiles": 33}, "clahe_tiles"),  # more tiles than pixels per side
])
def test_bad_contrast_settings_are_one_config_error(kw, words):
    with pytest.raises(ConfigError, match=words):
        Preprocessing(height=32, width=32, **kw)


def test_every_source_gets_the_same_equalised_pixels(tmp_path):
    """Path, bytes, Pillow image and array (at the model's size, which skips decoding, or not):
    one result, and it is CLAHE of the resized image, for grayscale and RGB models."""
    big = _xray_like(120, 150, seed=5)
    path = tmp_path / "x.png"
    Image.fromarray(big).save(path)
    for mode in ("grayscale", "rgb"):
        spec = Preprocessing(height=48, width=48, color_mode=mode, contrast="clahe")
        plain = Preprocessing(height=48, width=48, color_mode=mode)
        resized = load_pixels(path, plain)
        want = np.repeat(clahe(resized[:, :, 0])[:, :, None], resized.shape[2], axis=2)
        sources = [path, path.read_bytes(), Image.open(path), big, resized[:, :, 0] if mode == "grayscale" else resized]
        for src in sources:
            got = load_pixels(src, spec)
            assert np.array_equal(got, want), (mode, type(src).__name__)
        assert np.array_equal(preprocess(path, spec), normalize(want, spec))
        assert not np.array_equal(want, resized)


def test_colour_images_are_equalised_per_channel():
    rgb = np.stack([_xray_like(48, 48, seed=s) for s in (1, 2, 3)], axis=2)
    out = apply_contrast(rgb, "clahe", 2.0, 8)
    for c in range(3):
        assert np.array_equal(out[:, :, c], clahe(rgb[:, :, c]))
    assert apply_contrast(rgb, "none", 2.0, 8) is rgb


@pytest.mark.needs_tf
def test_the_device_applies_the_contrast_its_file_records(tmp_path):
    """A model file whose metadata says CLAHE: the Classifier's probabilities are Keras's on the
    CLAHE'd input (computed here by OpenCV when present), not on the plain one."""
    import keras
    import tensorflow as tf

    from lungedge.edge_runtime import Classifier
    from lungedge.edge_runtime.metadata import embed_spec

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(x))
    pre = Preprocessing(height=32, width=32, contrast="clahe")
    spec = ModelSpec(labels=("NORMAL", "PNEUMONIA"), preprocessing=pre, recipe="test", variant="float32")
    path = tmp_path / "m.tflite"
    path.write_bytes(embed_spec(tf.lite.TFLiteConverter.from_keras_model(model).convert(), spec))
    img = _xray_like(32, 32, seed=7)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    # OpenCV is the reference: the project's own CLAHE cannot judge itself
    cv2 = pytest.importorskip("cv2", reason="OpenCV (installed with MediaPipe) is the reference")
    eq = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(img)
    x_eq = np.repeat(((eq.astype(np.float32) - 127.5) / 127.5)[:, :, None], 3, axis=2)
    want = model.predict(x_eq[None], verbose=0)[0]
    clf = Classifier(path, threads=1)
    assert clf.spec.preprocessing.contrast == "clahe"
    got = clf.classify(buf.getvalue())
    np.testing.assert_allclose([got.probabilities[n] for n in clf.labels], want, atol=1e-5)
    x_plain = np.repeat(((img.astype(np.float32) - 127.5) / 127.5)[:, :, None], 3, axis=2)
    plain = model.predict(x_plain[None], verbose=0)[0]
    assert np.abs(plain - want).max() > 1e-4  # the test can tell the two apart
    # what a reader is told: `lungedge inspect`, and the standard record third-party apps read
    from click.testing import CliRunner

    from lungedge.cli import main
    from lungedge.edge_runtime.metadata import read_standard

    text = "CLAHE (OpenCV's, clip limit 2, 8x8 tiles)"
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0 and f"bilinear, {text}, (pixel - " in res.output, res.output
    assert f"Apply {text} to the resized image" in read_standard(path.read_bytes()).description


def test_a_recipe_chooses_the_contrast_step_of_its_model():
    from lungedge.train.recipes import get_recipe
    from lungedge.train.training import preprocessing_for

    assert preprocessing_for(get_recipe("xray-pneumonia-plus")).contrast == "none"
    pre = preprocessing_for(get_recipe("xray-pneumonia-plus", contrast="clahe"))
    assert (pre.contrast, pre.clahe_clip_limit, pre.clahe_tiles, pre.height) == ("clahe", 2.0, 8, 224)
    with pytest.raises(ConfigError, match="contrast must be one of none, clahe"):
        get_recipe("xray-pneumonia-plus", contrast="equalize")
