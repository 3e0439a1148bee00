"""What the clinic appliance costs: C-STORE to result on the page, the listener's memory in a
burst, and the audit log per image.

    python benchmarks/appliance_costs.py --images ../shared/data/chest_xray_fullres \\
        --coral ../shared/models/coral_mobilenet_v2_quant [--model FILE] [--repeats 20]

A ``lungedge listen`` process on 127.0.0.1 and its page open in headless Chromium; each full-
resolution X-ray is sent as a 12-bit CR image (C-STORE over one association) and the time is
taken from the send until its row is on the page (the page updates itself, no reload). The
first image (cold: decoders loading) is reported apart. Then a burst of 100 images from 5
associations while the listener's resident memory is sampled. Then ``AuditLog`` lines written
to a file on this disk (each one whole, then ``fdatasync``). Without ``--model``, the Coral
MobileNetV2 224 int8 file is given a lungedge record saying it is for X-ray (CR/DX): 1001
classes, so each row carries 1001 probabilities (a lungedge model has two). No timing is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CR = "1.2.840.10008.5.1.4.1.1.1"


def xray_record_model(coral: Path, out: Path) -> Path:
    from lungedge.edge_runtime.metadata import embed_spec
    from lungedge.edge_runtime.spec import ModelSpec, Preprocessing

    raw = [x.strip() for x in (coral / "imagenet_labels.txt").read_text().splitlines() if x.strip()]
    labels = tuple(f"{x} {i}" if raw.count(x) > 1 else x for i, x in enumerate(raw))
    spec = ModelSpec(labels=labels, preprocessing=Preprocessing(224, 224), recipe="xray-appliance-bench",
                     variant="int8", intended={"modality": "X-ray"})
    out.write_bytes(embed_spec((coral / "mobilenet_v2_1.0_224_quant.tflite").read_bytes(), spec))
    return out


def cr_images(folder: Path, out: Path, count: int, start: int = 0) -> list:
    from pydicom import dcmread

    from dicom_files import make_dicom

    jpegs = sorted(folder.rglob("*.jpeg"))
    sets = []
    for i in range(count):
        grey = np.asarray(Image.open(jpegs[(start + i) % len(jpegs)]).convert("L"))
        ds = dcmread(make_dicom(grey, out / f"cr{start + i}.dcm", bits=12, modality="CR", uid_suffix=f"7.{start + i}"))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR
        sets.append(ds)
    return sets


def association(port: int):
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(CR, ExplicitVRLittleEndian)
    ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGEDGE")
    assert assoc.is_established, "no association"
    return assoc


def page_latency(listener: dict, images: list) -> list:
    """Seconds from each C-STORE's start to its row on the page."""
    from browser import page_at

    out = []
    with page_at(f"http://127.0.0.1:{listener['web']}/") as page:
        assoc = association(listener["dicom"])
        for ds in images:
            t0 = time.perf_counter()
            status = assoc.send_c_store(ds)
            assert status.Status == 0, hex(status.Status)
            page.wait_for_selector(f"#worklist tr:has-text('{ds.SOPInstanceUID}')", timeout=60_000)
            out.append(time.perf_counter() - t0)
        assoc.release()
    return out


def burst_memory(listener: dict, images: list) -> tuple:
    """(RSS before, peak RSS, seconds) over a burst from 5 associations."""
    from memory import PeakRSS

    def send(k):
        assoc = association(listener["dicom"])
        for ds in images[k::5]:
            while assoc.send_c_store(ds).Status == 0xA700:  # queue full: send again, as a modality does
                time.sleep(0.05)
        assoc.release()

    t0 = time.perf_counter()
    with PeakRSS(listener["proc"].pid) as rss, concurrent.futures.ThreadPoolExecutor(5) as pool:
        list(pool.map(send, range(5)))
    return rss.start, rss.peak, time.perf_counter() - t0


def audit_cost(folder: Path, lines: int) -> float:
    """Seconds per audit line (a classified DICOM image's record)."""
    from lungedge.audit import AuditLog
    from lungedge.edge_runtime.classifier import Prediction
    from lungedge.edge_runtime.dicom import DicomInfo

    log = AuditLog(folder / "audit.jsonl", {"model": "m", "sha256": "ab" * 32, "variant": "int8"})
    pred = Prediction("PNEUMONIA", {"NORMAL": 0.1, "PNEUMONIA": 0.9}, dicom=DicomInfo("1.2.3.4.5.6.7.8"))
    t0 = time.perf_counter()
    for i in range(lines):
        log.record_result("listen", f"1.2.3.{i}", pred, calling_ae="XRAY1")
    return (time.perf_counter() - t0) / lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, required=True, help="Folder of full-resolution chest X-ray JPEGs.")
    ap.add_argument("--coral", type=Path, help="The Coral model folder (when no --model is given).")
    ap.add_argument("--model", type=Path, help="A .tflite model for X-ray (default: Coral's, see above).")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--audit-lines", type=int, default=2000)
    args = ap.parse_args()
    from test_listen import start, stop

    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        tmp = Path(tmp)
        model = args.model or xray_record_model(args.coral, tmp / "xray.tflite")
        listener = start(model, tmp)
        try:
            lat = page_latency(listener, cr_images(args.images, tmp, args.repeats + 1))
            rss0, peak, took = burst_memory(listener, cr_images(args.images, tmp, 100, start=1000))
        finally:
            stop(listener)
        per_line = audit_cost(tmp, args.audit_lines)
    warm = np.asarray(lat[1:]) * 1e3
    print(f"machine: {platform.machine()}, {platform.python_version()}; model {model.name}")
    print(f"C-STORE to row on the page, 12-bit CR: first (cold) {lat[0] * 1e3:.0f} ms; next {len(warm)}: "
          f"p50 {np.percentile(warm, 50):.0f} ms, p90 {np.percentile(warm, 90):.0f} ms, max {warm.max():.0f} ms")
    print(f"burst of 100 from 5 associations: {took:.1f} s; listener RSS {rss0 / 2**20:.0f} MiB before, "
          f"peak {peak / 2**20:.0f} MiB")
    print(f"audit log: {per_line * 1e6:.0f} us per line ({args.audit_lines} lines, each written whole then fdatasync)")


if __name__ == "__main__":
    main()
