"""The device path against hostile and damaged files: images, models, metadata,
integrity, output forging, exit codes and full disks. Small files, built here or taken from
../shared through the fixtures; no timing assertions."""

from __future__ import annotations

import importlib
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lungedge.edge_runtime import Classifier, ModelSpec, Preprocessing
from lungedge.edge_runtime import metadata as meta
from lungedge.edge_runtime.errors import ImageError, InputError, ModelError, OutputError, WriteError
from lungedge.edge_runtime.load_guard import trial_load
from lungedge.edge_runtime.modelcheck import check_model_structure
from lungedge.cli import main

from images import gradient

pp = importlib.import_module("lungedge.edge_runtime.preprocess")  # the package exports a function of that name
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fuzz_device as fz  # noqa: E402  (the harness's model and image builders)

SPEC = Preprocessing(height=32, width=32)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _png_header(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + fz._png_chunk(b"IHDR", ihdr) + fz._png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + fz._png_chunk(b"IEND", b""))


# ---- images ------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["jpg", "png", "bmp", "tif", "webp", "gif", "ppm", "pgm"])
def test_every_allowed_format_decodes_whatever_its_name(tmp_path, ext):
    data = fz.good_images(np.random.default_rng(0))[ext]
    p = tmp_path / "scan.jpeg"  # the name says JPEG; the content decides
    p.write_bytes(data)
    assert pp.load_pixels(p, SPEC).shape == (32, 32, 3)


@pytest.fixture(scope="module")
def crafted():
    """The fuzz harness's crafted files, made once (several seconds)."""
    return fz.crafted_images(np.random.default_rng(0))


@pytest.mark.parametrize("name,words", [("postscript.png", "PostScript"), ("eps.jpg", "not an image"),
                                        ("icon.png", "not an image"), ("pcx.bmp", "not an image"),
                                        ("sgi.png", "not an image")])
def test_formats_outside_the_allow_list_are_refused_before_decoding(tmp_path, crafted, name, words):
    p = tmp_path / name
    p.write_bytes(crafted[name])
    with pytest.raises(ImageError, match=words) as info:
        pp.load_pixels(p, SPEC)
    assert repr(str(p)) in str(info.value)


def test_decoder_exceptions_are_that_images_error(tmp_path, monkeypatch):
    """Whatever a decoder raises (here TypeError from the frame count, once outside the try)."""
    from PIL import GifImagePlugin

    p = tmp_path / "a.gif"
    p.write_bytes(fz.good_images(np.random.default_rng(0))["gif"])

    def broken(self):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "n_frames", property(broken))
    with pytest.raises(ImageError, match=r"cannot decode image \(TypeError: unsupported operand\)"):
        pp.load_pixels(p, SPEC)


def test_memory_budget_refuses_before_decoding(tmp_path):
    p = tmp_path / "deep.png"
    p.write_bytes(_png_header(9000, 9000, 16, 0))  # 162 MB of 16-bit pixels in a 100-byte file
    with pytest.raises(ImageError, match="too large to decode .* MiB decoded, limit 128 MiB"):
        pp.load_pixels(p, SPEC)
    p.write_bytes(_png_header(9000, 9000, 8, 6))  # RGBA
    with pytest.raises(ImageError, match="too large to decode"):
        pp.load_pixels(p, SPEC)


def test_pixel_limit_is_the_stated_one_not_pillows(tmp_path):
    """95 MP is over Pillow's 89.5 MP warning but under the 100 MP limit: not refused as too large."""
    p = tmp_path / "big.png"
    p.write_bytes(_png_header(10000, 9500, 8, 0))
    with pytest.raises(ImageError) as info:
        pp.load_pixels(p, SPEC)
    assert "too large" not in str(info.value)  # it gets to decoding, which finds the data truncated
    p.write_bytes(_png_header(10001, 10000, 8, 0))
    with pytest.raises(ImageError, match="limit 100 MP"):
        pp.load_pixels(p, SPEC)


def test_readme_states_the_limits_of_the_code():
    readme = (ROOT / "README.md").read_text()
    assert f"{pp.MAX_PIXELS / 1e6:.0f} megapixels" in readme
    assert f"{pp.MAX_DECODED_BYTES / 2**20:.0f} MiB" in readme
    assert f"{meta.MAX_MODEL_BYTES / 2**20:.0f} MiB" in readme
    assert ", ".join(pp.ALLOWED_FORMATS) in readme


def test_sixteen_bit_conversion_is_unchanged_by_blocking():
    rng = np.random.default_rng(0)
    a = rng.integers(100, 3000, (700, 90)).astype(np.uint16)  # more rows than one block
    got = np.asarray(pp._high_bit_depth_to_l(Image.fromarray(a)))
    ref = a.astype(np.float64)
    ref = np.clip(np.rint((ref - ref.min()) * (255.0 / (ref.max() - ref.min()))), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, ref)


def test_devices_and_pipes_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(ImageError, match="not a regular file"):
            pp.load_pixels(path, SPEC)
        with pytest.raises(ModelError, match="not a regular file"):
            meta.read_model_bytes(path)


# ---- models: size, metadata, structure, guard ---------------------------------------------
@pytest.fixture(scope="module")
def small_model(coral_dir):
    return (coral_dir / "mobilenet_v1_0.25_128_quant.tflite").read_bytes()


@pytest.fixture(scope="module")
def labels(coral_dir):
    return str(coral_dir / "imagenet_labels.txt")


def test_model_size_limit(tmp_path, monkeypatch):
    p = tmp_path / "m.tflite"
    p.write_bytes(b"\0\0\0\0TFL3" + b"\0" * 100)
    monkeypatch.setattr(meta, "MAX_MODEL_BYTES", 50)
    with pytest.raises(ModelError, match=r"too large .*m\.tflite"):
        meta.read_model_bytes(p)


BAD_RECORDS = {
    "threshold-number": {"threshold": 0.5}, "threshold-list": {"threshold": [0.5]},
    "threshold-string": {"threshold": "a"}, "preprocessing-list": {"preprocessing": [1, 2]},
    "preprocessing-string": {"preprocessing": "rgb"}, "preprocessing-null": {"preprocessing": None},
    "labels-number": {"labels": 7}, "height-bool": {"preprocessing": {"height": True}},
}


@pytest.mark.needs_shared
@pytest.mark.parametrize("case", sorted(BAD_RECORDS) + ["deep", "not-utf8", "not-object"])
def test_bad_metadata_is_one_model_error_naming_the_file_exit_1(small_model, tmp_path, case):
    if case == "deep":
        payload = b"[" * 50000 + b"]" * 50000
    elif case == "not-utf8":
        payload = b"\xff\xfe{}"
    elif case == "not-object":
        payload = b"42"
    else:
        payload = json.dumps({"labels": ["a", "b"], **BAD_RECORDS[case]}).encode()
    p = tmp_path / "m.tflite"
    p.write_bytes(fz.with_raw_metadata(small_model, "lungedge", payload))
    with pytest.raises(ModelError) as info:
        Classifier(p)
    assert repr(str(p)) in str(info.value) and "\n" not in str(info.value)
    r = run("classify", "--model", p, tmp_path / "x.jpg")
    assert r.exit_code == 1 and "Traceback" not in r.output and str(p) in r.output


@pytest.mark.needs_shared
def test_many_metadata_entries_are_not_copied(small_model, monkeypatch):
    data = fz.with_raw_metadata(small_model, "junk", b"x" * 4096, copies=300)
    assert meta.read_spec(data) is None
    assert set(meta.read_metadata_entries(data, ["junk"])) == {"junk"}
    monkeypatch.setattr(meta, "MAX_METADATA_ENTRIES", 100)
    with pytest.raises(ModelError, match=r"\d+ entries \(limit 100\)"):
        meta.read_spec(data, "m.tflite")


def _mutated(base: bytes, change) -> bytes:
    m = fz.unpack(base)
    change(m, m.subgraphs[0])
    return fz.pack(m)


@pytest.mark.needs_shared
@pytest.mark.parametrize("what,change,words", [
    ("graph output -1", lambda m, g: g.outputs.__setitem__(0, -1), "output is tensor -1"),
    ("op writes a constant", lambda m, g: g.operators[0].outputs.__setitem__(0, g.operators[0].inputs[1]), "writes tensor"),
    ("op reads too early", lambda m, g: g.operators[0].inputs.__setitem__(0, g.operators[3].outputs[0]), "before anything writes it"),
    ("two writers", lambda m, g: g.operators[1].outputs.__setitem__(0, g.operators[0].outputs[0]), "written by two operators"),
    ("buffer index", lambda m, g: setattr(g.tensors[3], "buffer", len(m.buffers) + 5), "points at buffer"),
    ("opcode index", lambda m, g: setattr(g.operators[2], "opcodeIndex", 999), "operator code 999"),
    ("nan scale", lambda m, g: g.tensors[g.inputs[0]].quantization.scale.__setitem__(0, np.nan), "not finite"),
    ("zero point", lambda m, g: g.tensors[g.inputs[0]].quantization.zeroPoint.__setitem__(0, 300), "zero point 300"),
    ("data length", lambda m, g: setattr(m.buffers[g.tensors[g.operators[0].inputs[1]].buffer], "data",
                                         np.zeros(3, np.uint8)), "bytes of data"),
])
def test_structural_check_refuses_before_the_runtime(small_model, tmp_path, what, change, words, labels):
    data = _mutated(small_model, change)
    with pytest.raises(ModelError, match=words):
        check_model_structure(data, "m.tflite")
    p = tmp_path / "m.tflite"
    p.write_bytes(data)
    with pytest.raises(ModelError, match=re.escape(repr(str(p)))):
        Classifier(p, labels=labels)


@pytest.mark.needs_shared
def test_structural_check_passes_real_models(coral_dir):
    for name in ("mobilenet_v2_1.0_224_quant.tflite", "mobilenet_v1_0.25_128_quant.tflite",
                 "model_invoking_error.tflite"):
        check_model_structure((coral_dir / name).read_bytes(), name)


@pytest.mark.needs_shared
def test_a_model_that_crashes_the_runtime_is_one_error_line(small_model, tmp_path, labels, coral_dir):
    """A convolution without its filter (input -1) passes the static check; LiteRT 2.3 then reads
    whatever memory it finds: usually a segfault (the guard's line), sometimes std::bad_alloc (the
    normal load's line). Either way: one error naming the file, this process alive."""
    data = _mutated(small_model, lambda m, g: g.operators[16].inputs.__setitem__(1, -1))
    check_model_structure(data)
    p = tmp_path / "crash.tflite"
    p.write_bytes(data)
    with pytest.raises(ModelError, match=r"(the interpreter crashed \(SIG[A-Z]+\)|cannot be loaded) .*crash\.tflite"):
        Classifier(p, labels=labels)
    r = subprocess.run([sys.executable, "-m", "lungedge.cli", "classify", "--model", str(p), "--labels", labels,
                        str(coral_dir / "cat.bmp")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "crash.tflite" in errors[0] and "Traceback" not in r.stderr


class _Aborting:
    def __init__(self, **kwargs):
        pass

    def allocate_tensors(self):
        os.abort()


class _Hanging(_Aborting):
    def allocate_tensors(self):
        import time

        time.sleep(60)


class _Raising(_Aborting):
    def allocate_tensors(self):
        raise RuntimeError("bad model")


def test_guard_reports_abort_hang_and_python_errors():
    with pytest.raises(ModelError, match=r"crashed \(SIGABRT\) .*'m.tflite'"):
        trial_load(b"", _Aborting, None, "m.tflite")
    with pytest.raises(ModelError, match=r"did not finish loading the model within 1 s .*'m.tflite'"):
        trial_load(b"", _Hanging, None, "m.tflite", timeout=1)
    with pytest.raises(ModelError, match=r"cannot be loaded \(\w+Error: .*\): 'm\.tflite'"):
        trial_load(b"", _Raising, None, "m.tflite")


# ---- integrity ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def with_record(small_model, coral_dir):
    names = fz.build_labels(coral_dir / "imagenet_labels.txt")
    spec = ModelSpec(labels=tuple(names), preprocessing=Preprocessing(height=128, width=128), variant="uint8")
    return meta.embed_spec(small_model, spec), spec


@pytest.mark.needs_shared
def test_integrity_record_verified_and_changes_refused(with_record, tmp_path):
    data, spec = with_record
    assert meta.verify_integrity(data).status == "verified"
    p = tmp_path / "m.tflite"
    p.write_bytes(data)
    clf = Classifier(p)
    assert clf.describe()["integrity"] == "verified"
    import hashlib

    assert clf.model_sha256 == hashlib.sha256(data).hexdigest()
    m = fz.unpack(data)
    weights = max((b for b in m.buffers if b.data is not None), key=lambda b: len(b.data))
    start = data.find(bytes(weights.data))
    for where in (start + 100, data.find(b'"labels"')):  # a weight, then the record's own labels
        bad = bytearray(data)
        bad[where] ^= 0x01
        p.write_bytes(bytes(bad))
        with pytest.raises(ModelError, match=r"does not match its integrity record.*m\.tflite"):
            Classifier(p)


@pytest.mark.needs_shared
def test_reembedding_replaces_the_record_and_empties_the_old_buffers(with_record):
    data, spec = with_record
    again = meta.embed_spec(data, spec.replace(recipe="again"))
    assert meta.verify_integrity(again).status == "verified" and meta.read_spec(again).recipe == "again"
    names = [e.name for e in fz.unpack(again).metadata]
    assert names.count(b"lungedge") == 1 and names.count(b"lungedge.integrity") == 1
    assert len(again) < len(data) + 1024


@pytest.mark.needs_shared
def test_files_without_a_record_load_with_a_note_in_inspect(coral_dir, labels):
    r = run("inspect", coral_dir / "mobilenet_v1_0.25_128_quant.tflite", "--labels", labels, "--json")
    info = json.loads(r.output)
    assert r.exit_code == 0 and info["integrity"] == "absent" and "no integrity record" in info["integrity_note"]


# ---- outputs: NaN, strict JSON, escaped names, exit codes ---------------------------------
@pytest.mark.needs_tf
def test_nan_output_is_an_error_for_that_image_and_json_stays_strict(tmp_path):
    from test_runtime import _convert, _tiny_keras

    model = _tiny_keras(2, 32)
    dense = model.layers[-1]
    w, b = dense.get_weights()
    dense.set_weights([np.full_like(w, np.nan), b])
    spec = ModelSpec(labels=("NORMAL", "PNEUMONIA"), preprocessing=Preprocessing(height=32, width=32))
    p = tmp_path / "nan.tflite"
    p.write_bytes(_convert(model, False, spec))
    img = tmp_path / "a.png"
    Image.fromarray(gradient(32, 32)).save(img)
    with pytest.raises(OutputError, match="not finite"):
        Classifier(p).classify(img)
    r = run("classify", "--model", p, "--json", img)
    assert r.exit_code == 1
    rec = json.loads(r.output.strip(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert "not finite" in rec["error"] and rec["source"] == str(img)


@pytest.mark.needs_shared
def test_file_names_cannot_forge_lines_or_reach_the_terminal(coral_dir, tmp_path, labels, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative names: shown whole
    cat = (coral_dir / "cat.bmp").read_bytes()
    names = ["ok.bmp\nfake.bmp  tabby  [tabby 0.999]", "x\x1b[2J\x1b[31mred.bmp", "rtl\u202egpj.bmp"]
    for n in names:
        (tmp_path / n).write_bytes(cat)
    model = coral_dir / "mobilenet_v1_0.25_128_quant.tflite"
    r = run("classify", "--model", model, "--labels", labels, *names)
    lines = r.output.splitlines()
    assert r.exit_code == 0 and len(lines) == 1 + len(names) + 1, lines  # header, one per image, summary
    assert "\x1b" not in r.output and "\u202e" not in r.output and "\\n" in r.output and "\\x1b" in r.output
    r = run("classify", "--model", model, "--labels", labels, "--json", *names)
    assert [json.loads(ln)["source"] for ln in r.output.splitlines()] == names


@pytest.mark.needs_shared
def test_exit_codes_follow_one_rule(coral_dir, tmp_path, labels):
    model, cat = coral_dir / "mobilenet_v1_0.25_128_quant.tflite", coral_dir / "cat.bmp"
    data = tmp_path / "data"
    (data / "tabby, tabby cat").mkdir(parents=True)
    (data / "tabby, tabby cat" / "a.bmp").write_bytes(cat.read_bytes())
    assert run("classify", "--model", model, "--labels", labels, "--threads", "0", cat).exit_code == 2
    assert run("classify", "--model", model, "--labels", labels, "--backend", "nope", cat).exit_code == 2
    cases = {
        "labels file": run("classify", "--model", model, "--labels", tmp_path / "none.txt", cat),
        "data folder": run("evaluate", "--model", model, "--labels", labels, "--data", tmp_path / "nodata"),
        "run folder": run("evaluate", "--model", tmp_path, "--data", data),
        "model": run("inspect", tmp_path / "none.tflite"),
        "keras file": run("evaluate", "--model", tmp_path / "none.keras", "--data", data),
    }
    for what, r in cases.items():
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 1 and len(errors) == 1 and str(tmp_path) in errors[0], (what, r.output)
        assert "TensorFlow" not in r.output, (what, r.output)


# ---- full disks --------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 64 kB tmpfs with about 4 kB left; skip where mounting is not permitted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()[:100]}")
    try:
        with open(mnt / "filler", "wb") as fh:
            try:
                fh.write(b"\0" * (60 * 1024))
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _no_partial(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


def test_atomic_write_on_a_full_disk_leaves_nothing(full_disk):
    with pytest.raises(WriteError, match="No space left on device"):
        from lungedge.edge_runtime.atomic_write import atomic_write_bytes

        atomic_write_bytes(str(full_disk / "model.tflite"), b"x" * 100_000)
    assert _no_partial(full_disk) == []


@pytest.mark.needs_shared
def test_classify_results_on_a_full_disk(full_disk, coral_dir, labels, tmp_path):
    model = coral_dir / "mobilenet_v1_0.25_128_quant.tflite"
    images = [coral_dir / "cat.bmp"] * 60  # about 20 kB of JSON lines
    r = run("classify", "--model", model, "--labels", labels, "--json", "--out", full_disk / "r.jsonl", *images)
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "r.jsonl" in errors[0] and "No space left" in errors[0]
    assert _no_partial(full_disk) == []
    target = full_disk / "stdout.jsonl"
    with open(target, "wb") as fh:
        p = subprocess.run([sys.executable, "-m", "lungedge.cli", "classify", "--model", str(model), "--labels", labels,
                            "--json", *map(str, images)], stdout=fh, stderr=subprocess.PIPE, text=True, timeout=300, cwd=ROOT)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 1 and len(errors) == 1 and "No space left" in errors[0], p.stderr
    assert "Traceback" not in p.stderr and target.stat().st_size == 0


@pytest.mark.needs_tf
def test_convert_on_a_full_disk(full_disk, tmp_path):
    from test_runtime import _tiny_keras

    from lungedge.convert.keras_convert import convert_keras_model, write_tflite

    spec = ModelSpec(labels=("a", "b"), preprocessing=Preprocessing(height=32, width=32))
    data = convert_keras_model(_tiny_keras(2, 32), spec, "float32")
    write_tflite(tmp_path / "ok.tflite", data)
    assert meta.verify_integrity(data).status == "verified"
    with pytest.raises(WriteError, match=r"model_float32\.tflite.*No space left"):
        write_tflite(full_disk / "model_float32.tflite", data * 20)
    assert _no_partial(full_disk) == []


# ---- the fuzz harness, CI size -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.needs_shared
def test_fuzz_harness_ci_size(coral_dir, tmp_path):
    """Bounded run (about 60 commands); LUNGEDGE_FUZZ_SIZE=N runs more on demand."""
    out = tmp_path / "fuzz.json"
    code = fz.main(["--size", os.environ.get("LUNGEDGE_FUZZ_SIZE", str(fz.CI_SIZE)), "--json", str(out),
                    "--timeout", "120"])
    report = json.loads(out.read_text())
    bad = [o for o in report["outcomes"] if o["verdict"] != "clean"]
    assert code == 0 and not bad, bad[:5]


@pytest.mark.needs_tf
def test_training_checkpoints_on_a_full_disk_leave_no_partial_file(full_disk):
    """train/checkpoint.py writes each checkpoint whole or not at all: one WriteError naming the file."""
    import keras

    from lungedge.edge_runtime.errors import WriteError
    from lungedge.train import checkpoint as ck

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dense(2)])
    with pytest.raises(WriteError, match="cannot write checkpoint .*last.weights.h5"):
        ck.save_weights_atomic(model, full_disk / "last.weights.h5")
    opt = keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    with pytest.raises(WriteError, match="cannot write checkpoint .*optimizer.npz"):
        ck.save_optimizer(opt, full_disk / "optimizer.npz")
    assert _no_partial(full_disk) == []



@pytest.mark.parametrize("command", ["classify", "inspect"])
def test_thousands_of_metadata_entries_are_refused_before_the_runtime_allocates(small_model, labels, tmp_path,
                                                                                 command):
    """LiteRT copies every metadata entry's buffer at load (5,000 entries pointing at the weights of a
    0.5 MB file: 2.5 GB measured without the bound), so the count is bounded by the structure
    check, before any interpreter sees the file."""
    p = tmp_path / "many.tflite"
    p.write_bytes(fz.with_metadata_flood(small_model, 5000))
    image = tmp_path / "x.png"
    Image.fromarray(gradient(64, 64)).save(image)
    args = ["classify", "-m", str(p), "--labels", labels, str(image)] if command == "classify" else ["inspect", str(p)]
    code = ("import sys\nfrom lungedge.cli import main\n"
            "try:\n    main(sys.argv[1:], standalone_mode=True)\nexcept SystemExit as e:\n    rc = e.code\n"
            # VmHWM: this process's peak since exec (ru_maxrss would include the forking parent's)
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
            "print('maxrss_kb', hwm, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "5002 metadata entries" in errors[0], r.stderr[-2000:]
    assert "many.tflite" in errors[0] and "Traceback" not in r.stderr
    rss_mb = int(r.stderr.split("maxrss_kb")[1].split()[0]) / 1024
    print(f"{command}: {rss_mb:.0f} MB peak resident for a file listing 5,000 metadata entries")
    assert rss_mb < 400, f"{rss_mb:.0f} MB resident: the runtime saw the file"
