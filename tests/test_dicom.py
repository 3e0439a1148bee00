"""DICOM input: files built with pydicom from the X-rays in ../shared classify as their JPEGs do.

Each DICOM file encodes the JPEG's grey pixels so that the display pipeline (modality LUT, window,
MONOCHROME1 inversion) gives them back exactly; the tolerance is therefore exact pixels and
probabilities within 1e-6 (the same model input). No TensorFlow: the third-party Coral model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_files import FAKE_PATIENT, make_dicom
from lungedge.edge_runtime import dicom as dcm
from lungedge.edge_runtime.errors import ImageError
from lungedge.edge_runtime.preprocess import load_image, load_pixels
from lungedge.edge_runtime.spec import Preprocessing

pydicom = pytest.importorskip("pydicom", reason="the dicom extra is not installed (pip install 'lungedge[dicom]')")
from pydicom.uid import JPEG2000Lossless, RLELossless  # noqa: E402

SPEC = Preprocessing(224, 224, "rgb")
#: largest probability difference allowed between a DICOM file and its JPEG (same pixels: same input)
PROB_TOLERANCE = 1e-6

VARIANTS = {
    "mono2_8bit": dict(),
    "mono1_8bit": dict(photometric="MONOCHROME1"),
    "mono2_12bit_window": dict(bits=12),
    "mono1_12bit_window": dict(bits=12, photometric="MONOCHROME1"),
    "rescale_intercept": dict(bits=12, rescale_intercept=-1024),
    "rle_lossless": dict(bits=12, syntax=RLELossless),
    "jpeg2000_lossless_mono1": dict(bits=12, syntax=JPEG2000Lossless, photometric="MONOCHROME1"),
}


@pytest.fixture(scope="module")
def xray(xray_dir) -> Path:
    return sorted((xray_dir / "PNEUMONIA").glob("*.jpeg"))[0]


@pytest.fixture(scope="module")
def dicoms(xray, tmp_path_factory):
    grey = np.asarray(Image.open(xray).convert("L"))
    out = tmp_path_factory.mktemp("dicom")
    return {k: make_dicom(grey, out / f"{k}.dcm", uid_suffix=str(i), **kw) for i, (k, kw) in enumerate(VARIANTS.items())}


@pytest.mark.needs_shared
@pytest.mark.parametrize("kind", list(VARIANTS))
def test_dicom_gives_the_jpeg_pixels(dicoms, xray, kind):
    ref = load_pixels(str(xray), SPEC)
    pixels, info = load_image(str(dicoms[kind]), SPEC)
    assert np.array_equal(pixels, ref), f"{kind}: max difference {np.abs(pixels.astype(int) - ref).max()}"
    assert info.sop_instance_uid.startswith("1.2.826.0.1.3680043.10.1234.")
    assert info.modality == "DX"
    # bytes (an upload) decode the same way
    assert np.array_equal(load_image(dicoms[kind].read_bytes(), SPEC, name="upload.dcm")[0], ref)


@pytest.mark.needs_shared
def test_dicom_predictions_match_the_jpeg_and_keep_no_phi(dicoms, xray, coral_dir, tmp_path):
    from lungedge.edge_runtime.classifier import Classifier

    clf = Classifier(coral_dir / "mobilenet_v2_1.0_224_quant.tflite", labels=str(coral_dir / "imagenet_labels.txt"))
    ref = clf.classify(str(xray)).probabilities
    for kind, path in dicoms.items():
        pred = clf.classify(str(path))
        worst = max(abs(pred.probabilities[k] - ref[k]) for k in ref)
        assert worst <= PROB_TOLERANCE, f"{kind}: probabilities differ by {worst}"
        d = pred.to_dict()
        assert d["sop_instance_uid"] == pred.dicom.sop_instance_uid
        assert not any(v in json.dumps(d) for v in FAKE_PATIENT.values())
        assert FAKE_PATIENT["PatientID"] in json.dumps(pred.to_dict(keep_phi=True))
    # the command line: no patient data on stdout or stderr unless --keep-phi
    folder = tmp_path / "in"
    folder.mkdir()
    for kind, path in dicoms.items():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "NOEXTENSION").write_bytes(dicoms["mono2_8bit"].read_bytes())  # found by its marker
    base = [sys.executable, "-m", "lungedge.cli", "classify", "-m", str(coral_dir / "mobilenet_v2_1.0_224_quant.tflite"),
            "--labels", str(coral_dir / "imagenet_labels.txt"), "--report", str(tmp_path / "rep"), str(folder)]
    for extra, shown in (([], False), (["--json"], False), (["--json", "--keep-phi"], True)):
        run = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        text = run.stdout + run.stderr + "".join(p.read_text(errors="replace") for p in (tmp_path / "rep").glob("*.*"))
        assert all((v in text) == shown for v in FAKE_PATIENT.values()), (extra, text[-2000:])
        assert "1.2.826.0.1.3680043.10.1234." in run.stdout
        assert run.stdout.count("1.2.826.0.1.3680043.10.1234.") >= len(dicoms) + 1


def _grey(size=64):
    return (np.arange(size * size).reshape(size, size) % 251).astype(np.uint8)


@pytest.mark.parametrize("kwargs, words", [
    (dict(pixel_data=False), "no pixel data"),
    (dict(frames=3), "multi-frame DICOM (3 frames)"),
    (dict(syntax="1.2.840.10008.1.2.4.100"), "not supported"),  # MPEG2: no decoder in pydicom
])
def test_bad_dicom_is_one_line(tmp_path, kwargs, words):
    p = make_dicom(_grey(), tmp_path / "bad.dcm", **kwargs)
    with pytest.raises(ImageError) as err:
        load_pixels(str(p), SPEC)
    msg = str(err.value)
    assert words in msg and str(p) in msg and "\n" not in msg
    assert not any(v in msg for v in FAKE_PATIENT.values())


def test_ct_slice_to_an_xray_model_is_refused(tmp_path):
    """The modality a model takes is the one its recipe declares, as written to its record; never
    read from the recipe's name."""
    from lungedge.train.intended import intended_for
    from lungedge.train.recipes import Recipe, get_recipe

    def declared(recipe):
        return dcm.expected_modalities(intended_for(recipe.modality, ("a", "b")))

    p = make_dicom(_grey(), tmp_path / "ct.dcm", modality="CT")
    _, info = load_image(str(p), SPEC)
    with pytest.raises(ImageError, match="modality 'CT' is not what an X-ray model is for"):
        dcm.check_modality(info, declared(get_recipe("xray-pneumonia-plus")), str(p))
    dcm.check_modality(info, declared(get_recipe("ct-lung-cancer")), str(p))  # a CT model takes it
    dcm.check_modality(info, dcm.expected_modalities({}), str(p))  # nothing declared: no check
    assert declared(Recipe(name="ct-named", modality="X-ray")) == dcm.XRAY_MODALITIES
    assert declared(Recipe(name="xray-named")) is None
    assert declared(get_recipe("demo")) == dcm.XRAY_MODALITIES  # generated radiograph-like images
    assert dcm.expected_modalities({"modality": "X-ray (CR/DX)"}) == dcm.XRAY_MODALITIES  # an older record


def test_without_pydicom_a_dicom_file_gets_one_line_naming_the_extra(tmp_path, monkeypatch):
    p = make_dicom(_grey(), tmp_path / "scan.dcm")
    ok = tmp_path / "ok.png"
    Image.fromarray(_grey()).save(ok)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as on an edge install without the extra
    monkeypatch.setitem(sys.modules, "pydicom.errors", None)
    with pytest.raises(ImageError) as err:
        load_pixels(str(p), SPEC)
    assert "pip install 'lungedge[dicom]'" in str(err.value) and str(p) in str(err.value)
    assert load_pixels(str(ok), SPEC).shape == (224, 224, 3)  # other images still read


def test_window_functions_follow_the_standard():
    x = np.array([0.0, 1023.5, 2047.5, 4095.0])
    lin = dcm._apply_window(x, 2048.0, 4096.0, "LINEAR")
    assert lin[0] == 0 and lin[-1] == 255 and abs(lin[2] - 127.5) < 0.1
    exact = dcm._apply_window(x, 2048.0, 4096.0, "LINEAR_EXACT")
    assert exact[0] == 0 and abs(exact[-1] - 255 * (4095 - 2048 + 2048) / 4096) < 1e-9
    sig = dcm._apply_window(np.array([2048.0]), 2048.0, 4096.0, "SIGMOID")
    assert sig[0] == pytest.approx(127.5)


def test_zip_upload_is_named_as_an_archive(tmp_path):
    import zipfile

    z = tmp_path / "bomb.jpg"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * (20 * 2**20))
    with pytest.raises(ImageError, match="a zip archive file"):
        load_pixels(str(z), SPEC)
