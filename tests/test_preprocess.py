"""The one preprocessing function: every image layout, every bad input, and parity with Keras."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lungedge.edge_runtime.errors import ImageError
from lungedge.edge_runtime.preprocess import load_pixels, normalize, preprocess
from lungedge.edge_runtime.spec import Preprocessing

from images import BAD, GOOD, gradient, write_good_and_bad

SPEC = Preprocessing(height=32, width=40)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_good_and_bad(tmp_path_factory.mktemp("imgs"))


@pytest.mark.parametrize("kind", GOOD)
def test_every_layout_becomes_the_model_input(files, kind):
    x = preprocess(files[kind], SPEC)
    assert x.shape == (32, 40, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert x.std() > 0.05, "the image content must survive (not all one value)"


def test_grayscale_mode_gives_one_channel(files):
    x = preprocess(files["gray"], Preprocessing(height=16, width=16, color_mode="grayscale"))
    assert x.shape == (16, 16, 1)


def test_sixteen_bit_uses_the_image_range(files):
    # 12-bit data in 16-bit: a fixed /257 scale would make it nearly black
    px = load_pixels(files["sixteen"], SPEC)
    assert px.max() >= 250 and px.min() <= 5


def test_rgba_composites_on_black(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., :3] = 255  # white, fully transparent
    Image.fromarray(a).save(tmp_path / "t.png")
    assert load_pixels(tmp_path / "t.png", Preprocessing(height=8, width=8)).max() == 0


@pytest.mark.parametrize("kind,words", [
    ("animated", "multi-frame"), ("truncated", "truncated"), ("empty", "empty"),
    ("text", "not an image"), ("bomb", "too large"),
])
def test_bad_images_raise_one_line_naming_the_file(files, kind, words):
    with pytest.raises(ImageError) as info:
        preprocess(files[kind], SPEC)
    msg = str(info.value)
    assert words in msg and "\n" not in msg
    assert str(files[kind]) in msg or kind == "bomb" and "bomb" in msg


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        preprocess(tmp_path / "nope.jpg", SPEC)
    with pytest.raises(ImageError, match="folder"):
        preprocess(tmp_path, SPEC)


def test_max_pixels_guard(monkeypatch, files):
    import sys

    pp = sys.modules["lungedge.edge_runtime.preprocess"]  # the package exports a function of the same name

    monkeypatch.setattr(pp, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="too large"):
        preprocess(files["gray"], SPEC)


def test_exif_orientation_is_applied(tmp_path):
    g = np.zeros((20, 40), np.uint8)
    g[:, :20] = 255  # left half white
    img = Image.fromarray(g)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW when displayed: the white half goes to the top
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    px = load_pixels(tmp_path / "o.jpg", Preprocessing(height=40, width=20, color_mode="grayscale"))[:, :, 0]
    assert px[:20].mean() > 200 and px[20:].mean() < 50


def test_input_array_is_not_modified_and_output_is_new():
    a = np.stack([gradient(32, 32)] * 3, -1)
    before = a.copy()
    spec = Preprocessing(height=32, width=32)
    x = preprocess(a, spec)
    np.testing.assert_array_equal(a, before)
    px = load_pixels(a, spec)
    px[0, 0, 0] = 7
    assert a[0, 0, 0] == before[0, 0, 0]
    assert not np.shares_memory(x, a)


def test_bad_arrays():
    with pytest.raises(ImageError, match="uint8"):
        preprocess(np.zeros((4, 4, 3), np.float32), SPEC)
    with pytest.raises(ImageError, match="shape"):
        preprocess(np.zeros((4, 4, 2), np.uint8), SPEC)


def test_bytes_and_pil_inputs_match_path(files):
    data = files["rgb"].read_bytes()
    a = preprocess(files["rgb"], SPEC)
    np.testing.assert_array_equal(a, preprocess(data, SPEC))
    with Image.open(files["rgb"]) as im:
        np.testing.assert_array_equal(a, preprocess(im, SPEC))
    with pytest.raises(ImageError, match="empty"):
        preprocess(b"", SPEC)


def test_per_channel_normalisation():
    spec = Preprocessing(height=8, width=8, mean=(0, 100, 200), std=(1, 2, 4))
    px = np.full((8, 8, 3), 200, np.uint8)
    x = normalize(px, spec)
    np.testing.assert_allclose(x[0, 0], [200, 50, 0])


@pytest.mark.needs_tf
def test_matches_keras_mobilenet_v2_preprocess_input(files):
    from keras.applications.mobilenet_v2 import preprocess_input

    spec = Preprocessing(height=48, width=64)  # the files' own size: no resize involved
    for kind in ("rgb", "gray"):
        with Image.open(files[kind]) as im:
            raw = np.asarray(im.convert("RGB"), dtype=np.float32)
        ours = preprocess(files[kind], spec)
        np.testing.assert_allclose(ours, preprocess_input(raw.copy()), atol=1e-6)


@pytest.mark.needs_shared
def test_full_resolution_xrays_draft_decode_is_close_to_full_decode(fullres_dir):
    spec = Preprocessing()
    files = sorted(fullres_dir.rglob("*.jpeg"))[:6]
    assert files
    for f in files:
        fast = load_pixels(f, spec).astype(np.float32)
        with Image.open(f) as im:
            slow = np.asarray(im.convert("RGB").resize(spec.size, Image.Resampling.BILINEAR), np.float32)
        assert np.abs(fast - slow).mean() < 2.0, f
