"""The device runtime: metadata, Classifier, quantised I/O, thresholds, bad models, real models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lungedge.edge_runtime import Classifier, ModelSpec, Preprocessing, Threshold
from lungedge.edge_runtime.errors import ConfigError, ImageError, ModelError
from lungedge.edge_runtime.tflite_metadata import append_associated_files
from lungedge.edge_runtime.preprocess import load_pixels
from lungedge.edge_runtime.metadata import embed_spec, read_metadata_entries, read_spec, read_spec_from_file

from images import gradient


# ---- third-party models from ../shared (no TensorFlow needed) ----------------------------
@pytest.mark.needs_shared
def test_real_uint8_model_sees_the_cat(coral_dir):
    clf = Classifier(coral_dir / "mobilenet_v2_1.0_224_quant.tflite", labels=str(coral_dir / "imagenet_labels.txt"), threads=1)
    assert clf.describe()["input_dtype"] == "uint8" and not clf.has_metadata
    pred = clf.classify(coral_dir / "cat.bmp")
    top3 = [name for name, _ in pred.top_k(3)]
    assert pred.label in ("Egyptian cat", "tabby, tabby cat", "tiger cat"), top3
    # dequantised through scale/zero point: 1001 outputs of 1/256 steps each sum to about 1
    assert 0.9 < sum(pred.probabilities.values()) < 1.1
    assert pred.invoke_ms > 0 and pred.total_ms >= pred.invoke_ms


@pytest.mark.needs_shared
def test_input_size_comes_from_the_model(coral_dir):
    clf = Classifier(coral_dir / "mobilenet_v1_0.25_128_quant.tflite", labels=str(coral_dir / "imagenet_labels.txt"))
    assert (clf.spec.preprocessing.height, clf.spec.preprocessing.width) == (128, 128)
    top3 = [name for name, _ in clf.classify(coral_dir / "cat.bmp").top_k(3)]
    assert {"Egyptian cat", "tabby, tabby cat", "tiger cat"} & set(top3)


@pytest.mark.needs_shared
def test_model_with_unknown_operator_is_one_clear_error(coral_dir):
    with pytest.raises(ModelError) as info:
        Classifier(coral_dir / "model_invoking_error.tflite", labels=str(coral_dir / "imagenet_labels.txt"))
    assert "fake-op-double" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.needs_shared
def test_labels_that_do_not_match_the_output(coral_dir, tmp_path):
    (tmp_path / "l.txt").write_text("a\nb\nc\n")
    with pytest.raises(ModelError, match="3 labels given but the model has 1001 outputs"):
        Classifier(coral_dir / "mobilenet_v2_1.0_224_quant.tflite", labels=str(tmp_path / "l.txt"))
    bare = tmp_path / "bare.tflite"  # the Coral file without its standard metadata
    bare.write_bytes(without_metadata((coral_dir / "mobilenet_v2_1.0_224_quant.tflite").read_bytes()))
    with pytest.raises(ModelError, match="no lungedge metadata and no labels file in standard TFLite metadata"):
        Classifier(bare)


def without_metadata(data: bytes) -> bytes:
    """A TFLite model with its metadata table removed (a file no tool wrote metadata into)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    model.metadata = []
    b = flatbuffers.Builder(len(data) + 1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.mark.needs_shared
def test_converter_metadata_is_read_without_tensorflow(coral_dir):
    data = (coral_dir / "mobilenet_v2_1.0_224_quant.tflite").read_bytes()
    assert "min_runtime_version" in read_metadata_entries(data)
    assert read_spec(data) is None


@pytest.mark.needs_shared
def test_embedded_metadata_round_trips_and_still_runs(coral_dir, tmp_path):
    labels = [ln.strip() for ln in (coral_dir / "imagenet_labels.txt").read_text().splitlines() if ln.strip()]
    labels = [n if labels.index(n) == i else f"{n} [{i}]" for i, n in enumerate(labels)]
    spec = ModelSpec(labels=tuple(labels), variant="uint8", recipe="third-party")
    out = tmp_path / "with_meta.tflite"
    out.write_bytes(embed_spec((coral_dir / "mobilenet_v2_1.0_224_quant.tflite").read_bytes(), spec))
    assert read_spec_from_file(out) == spec
    clf = Classifier(out)  # nothing but the file
    assert clf.has_metadata and clf.classify(coral_dir / "cat.bmp").label in ("Egyptian cat", "tabby, tabby cat", "tiger cat")


# ---- bad model files ---------------------------------------------------------------------
@pytest.mark.parametrize("content,words", [
    (None, "not found"), (b"", "empty"), (b"hello world, not a model", "not a TFLite model"),
    (b"PK\x03\x04" + b"\0" * 40, "zip archive"), (b"\x89HDF\r\n\x1a\n" + b"\0" * 40, "HDF5"),
])
def test_bad_model_files(tmp_path, content, words):
    p = tmp_path / "m.tflite"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ModelError) as info:
        Classifier(p, labels=["a", "b"])
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.needs_shared
def test_truncated_model_file(coral_dir, tmp_path):
    data = (coral_dir / "mobilenet_v2_1.0_224_quant.tflite").read_bytes()
    p = tmp_path / "cut.tflite"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError):
        Classifier(p, labels=str(coral_dir / "imagenet_labels.txt"))


# ---- spec validation ---------------------------------------------------------------------
def test_spec_round_trip_and_validation():
    spec = ModelSpec(labels=("NORMAL", "PNEUMONIA"), positive_label="PNEUMONIA",
                     threshold=Threshold("PNEUMONIA", 0.3, target_recall=0.95), variant="int8")
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ConfigError, match="not one of the labels"):
        ModelSpec(labels=("a", "b"), positive_label="c")
    with pytest.raises(ConfigError, match="unique"):
        ModelSpec(labels=("a", "a"))
    with pytest.raises(ConfigError, match="unknown field"):
        ModelSpec.from_dict({"labels": ["a", "b"], "colour": "red"})
    with pytest.raises(ConfigError, match="color_mode"):
        Preprocessing(color_mode="cmyk")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        Threshold("a", 1.5)
    with pytest.raises(ConfigError, match="JSON"):
        ModelSpec.from_json("{not json")


# ---- our own models, built with TensorFlow ------------------------------------------------
def _tiny_keras(n_classes: int, size: int, channels: int = 3, seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, channels))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inp, out)


def _convert(model, int8: bool, spec: ModelSpec) -> bytes:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(0)
        p = spec.preprocessing

        def rep():
            for _ in range(16):
                px = rng.integers(0, 256, (p.height, p.width, p.channels), dtype=np.uint8)
                yield [((px.astype(np.float32) - 127.5) / 127.5)[None]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    return embed_spec(conv.convert(), spec)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    pytest.importorskip("tensorflow")
    d = tmp_path_factory.mktemp("models")
    model = _tiny_keras(2, 32)
    spec = ModelSpec(labels=("NORMAL", "PNEUMONIA"), positive_label="PNEUMONIA",
                     preprocessing=Preprocessing(height=32, width=32), recipe="test")
    paths = {}
    for name, int8 in (("float32", False), ("int8", True)):
        p = d / f"m_{name}.tflite"
        p.write_bytes(_convert(model, int8, spec.replace(variant=name)))
        paths[name] = p
    return model, spec, paths


@pytest.mark.needs_tf
@pytest.mark.parametrize("variant,dtype", [("float32", "float32"), ("int8", "int8")])
def test_own_models_match_keras_through_the_same_preprocessing(tiny_models, variant, dtype):
    from lungedge.edge_runtime.preprocess import preprocess

    model, spec, paths = tiny_models
    clf = Classifier(paths[variant], threads=1)
    assert clf.has_metadata and clf.labels == ["NORMAL", "PNEUMONIA"] and clf.spec.variant == variant
    assert clf.describe()["input_dtype"] == dtype and clf.describe()["output_dtype"] == dtype
    img = np.stack([gradient(50, 40, seed=3)] * 3, -1)
    x = preprocess(img, spec.preprocessing)
    keras_p = model.predict(x[None], verbose=0)[0]
    pred = clf.classify(img)
    ours = np.array([pred.probabilities[n] for n in clf.labels])
    tol = 1e-5 if variant == "float32" else 0.03  # int8: one output step is 1/256
    np.testing.assert_allclose(ours, keras_p, atol=tol)


@pytest.mark.needs_tf
def test_metadata_writer_shares_identical_vectors_and_changes_nothing_else(tiny_models):
    """embed_spec writes each distinct numeric vector once (the per-channel zero points): the
    file gets smaller than a plain repack, and every tensor, quantisation and output is as before."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    _, spec, paths = tiny_models
    shared = paths["int8"].read_bytes()
    model = schema.ModelT.InitFromPackedBuf(bytearray(shared), 0)
    builder = flatbuffers.Builder(len(shared))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    # the same associated labels file appended, as embed_spec does
    plain = append_associated_files(bytes(builder.Output()), {"labels.txt": ("\n".join(spec.labels) + "\n").encode()})
    zero_points = sum(len(t.quantization.zeroPoint) for t in model.subgraphs[0].tensors
                      if t.quantization is not None and t.quantization.zeroPoint is not None)
    assert len(shared) < len(plain) and zero_points > 4
    assert read_spec(shared) == read_spec(plain) == spec.replace(variant="int8")

    def run(data):
        it = Interpreter(model_content=data)
        it.allocate_tensors()
        details = [(t["name"], t["dtype"], tuple(t["shape"]), t["quantization_parameters"]["scales"].tolist(),
                    t["quantization_parameters"]["zero_points"].tolist()) for t in it.get_tensor_details()]
        inp = it.get_input_details()[0]
        it.set_tensor(inp["index"], np.random.default_rng(0).integers(-128, 128, inp["shape"]).astype(np.int8))
        it.invoke()
        return details, it.get_tensor(it.get_output_details()[0]["index"]).tolist()

    assert run(shared) == run(plain)


@pytest.mark.needs_tf
def test_threshold_decides_and_can_be_turned_off(tiny_models, tmp_path):
    model, spec, paths = tiny_models
    img = np.stack([gradient(32, 32, seed=1)] * 3, -1)
    p_pos = Classifier(paths["float32"]).classify(img).probabilities["PNEUMONIA"]
    for value, expected in ((max(p_pos - 0.01, 0.0), "PNEUMONIA"), (min(p_pos + 0.01, 1.0), "NORMAL")):
        data = embed_spec(paths["float32"].read_bytes(), spec.replace(threshold=Threshold("PNEUMONIA", value)))
        f = tmp_path / f"t{value:.3f}.tflite"
        f.write_bytes(data)
        pred = Classifier(f).classify(img)
        assert pred.label == expected and pred.threshold_applied
    argmax = Classifier(f, use_threshold=False).classify(img)
    assert not argmax.threshold_applied
    assert argmax.label == max(argmax.probabilities, key=argmax.probabilities.get)


@pytest.mark.needs_tf
def test_batch_reports_each_bad_file_and_goes_on(tiny_models, tmp_path):
    from images import BAD, GOOD, write_good_and_bad

    _, _, paths = tiny_models
    files = write_good_and_bad(tmp_path / "imgs")
    clf = Classifier(paths["int8"])
    results = list(clf.classify_many([str(files[k]) for k in GOOD + BAD] + [str(tmp_path / "missing.png")]))
    ok = [r for r in results if hasattr(r, "label")]
    bad = [r for r in results if hasattr(r, "error")]
    assert len(ok) == len(GOOD) and len(bad) == len(BAD) + 1
    assert all("\n" not in r.error and r.source for r in bad)


@pytest.mark.needs_tf
@pytest.mark.parametrize("variant", ["float32", "int8"])
def test_pipelined_folder_run_gives_the_sequential_results_in_order(tiny_models, tmp_path, variant):
    """Decoding on worker threads changes nothing: the same results, in input order, a bad file
    still one failure in its place, for every worker count; an abandoned run stops cleanly."""
    from images import BAD, GOOD, write_good_and_bad

    _, _, paths = tiny_models
    files = write_good_and_bad(tmp_path / "imgs")
    order = [str(files[k]) for k in GOOD + BAD] * 3 + [str(tmp_path / "missing.png")]
    rng = np.random.default_rng(0)
    order = [order[i] for i in rng.permutation(len(order))]
    with Classifier(paths[variant]) as clf:
        def run(workers):
            return [(r.source, r.error) if hasattr(r, "error") else (r.source, r.label, r.probabilities)
                    for r in clf.classify_many(order, workers=workers)]

        sequential = run(0)
        assert [r[0] for r in sequential] == order and sum(len(r) == 2 for r in sequential) == 3 * len(BAD) + 1
        for workers in (1, 2, 5):
            assert run(workers) == sequential, workers
        first = next(iter(clf.classify_many(order, workers=2)))  # abandoned after one result
        assert first.source == order[0]


@pytest.mark.needs_tf
def test_classify_command_workers_change_nothing_but_speed(tiny_models, tmp_path):
    from click.testing import CliRunner

    from images import write_good_and_bad
    from lungedge.cli import main

    _, _, paths = tiny_models
    folder = tmp_path / "imgs"
    write_good_and_bad(folder)
    outs = {}
    for workers in ("0", "3"):
        r = CliRunner().invoke(main, ["-q", "classify", "--json", "--workers", workers, "-m", str(paths["int8"]),
                                      str(folder)])
        assert r.exit_code == 1  # the bad files
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        for row in rows:
            row.pop("timing_ms", None)
        outs[workers] = rows
    assert outs["0"] == outs["3"] and len(outs["0"]) > 5 and any("error" in row for row in outs["0"])


@pytest.mark.parametrize("resize", ["bilinear", "bicubic", "nearest"])
def test_grayscale_file_for_an_rgb_model_is_resized_before_the_colour_copy(tmp_path, resize):
    """The one-channel resize the runtime does for speed gives the pixels of convert-then-resize."""
    from PIL import Image

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (301, 257), dtype=np.uint8), "L")
    for fmt in ("PNG", "JPEG"):
        f = tmp_path / f"gray.{fmt.lower()}"
        img.save(f, fmt)
        spec = Preprocessing(color_mode="rgb", resize=resize)
        got = load_pixels(str(f), spec)
        with Image.open(f) as im:
            if fmt == "JPEG":
                im.draft("L", (224, 224))
            want = np.asarray(im.convert("RGB").resize((224, 224), getattr(Image.Resampling, resize.upper())))
        assert got.shape == (224, 224, 3) and np.array_equal(got, want), fmt


@pytest.mark.needs_tf
def test_metadata_that_disagrees_with_the_model(tiny_models, tmp_path):
    _, spec, paths = tiny_models
    wrong = spec.replace(preprocessing=Preprocessing(height=64, width=64))
    f = tmp_path / "wrong.tflite"
    f.write_bytes(embed_spec(paths["float32"].read_bytes(), wrong))
    with pytest.raises(ModelError, match="metadata says input 64x64x3 but the model takes 32x32x3"):
        Classifier(f)
    three = spec.replace(labels=("a", "b", "c"), positive_label=None)
    f.write_bytes(embed_spec(paths["float32"].read_bytes(), three))
    with pytest.raises(ModelError, match="3 labels given but the model has 2 outputs"):
        Classifier(f)
