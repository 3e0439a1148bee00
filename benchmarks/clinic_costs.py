"""What the clinic features cost: DICOM decode against JPEG, and the heat map per model variant.

    python benchmarks/clinic_costs.py --images ../shared/data/chest_xray_fullres \\
        --models runs/x/model_*.tflite [--baseline old_run/model_*.tflite]

DICOM: each full-resolution JPEG is written as DICOM (12-bit in 16-bit words with a window,
uncompressed and JPEG 2000 lossless; 8-bit uncompressed) and the one preprocessing function
(decode, display pipeline, resize to 224) is timed on each, after a warm-up; raw percentiles.
Heat map: ``Classifier.classify`` invoke time with and without ``heatmap=True`` (the heat-map
signature runs the classifier and the map in one invoke), 1 thread, and file sizes against
``--baseline`` files of the same variants converted without the map. No timing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def pct(xs):
    a = np.asarray(xs) * 1e3
    return f"p50 {np.percentile(a, 50):6.1f}  p90 {np.percentile(a, 90):6.1f}  p99 {np.percentile(a, 99):6.1f} ms"


def dicom_costs(folder: Path, repeats: int) -> None:
    from pydicom.uid import JPEG2000Lossless

    from dicom_files import make_dicom
    from lungedge.edge_runtime.preprocess import load_pixels
    from lungedge.edge_runtime.spec import Preprocessing

    spec = Preprocessing(224, 224, "rgb")
    jpegs = sorted(folder.rglob("*.jpeg"))
    tmp = Path(tempfile.mkdtemp(prefix="clinic-costs-"))
    kinds = {"JPEG (as given)": jpegs, "DICOM 8-bit": [], "DICOM 12-bit window": [], "DICOM 12-bit JPEG 2000": []}
    for i, p in enumerate(jpegs):
        grey = np.asarray(Image.open(p).convert("L"))
        kinds["DICOM 8-bit"].append(make_dicom(grey, tmp / f"{i}_8.dcm"))
        kinds["DICOM 12-bit window"].append(make_dicom(grey, tmp / f"{i}_12.dcm", bits=12))
        kinds["DICOM 12-bit JPEG 2000"].append(make_dicom(grey, tmp / f"{i}_j2k.dcm", bits=12, syntax=JPEG2000Lossless))
    sizes = [Image.open(p).size for p in jpegs]
    print(f"DICOM vs JPEG: {len(jpegs)} full-resolution X-rays ({min(sizes)} to {max(sizes)}), decode + display "
          f"pipeline + resize to 224, {repeats} passes after one warm-up")
    for name, paths in kinds.items():
        for p in paths:
            load_pixels(str(p), spec)
        times = []
        for _ in range(repeats):
            for p in paths:
                t = time.perf_counter()
                load_pixels(str(p), spec)
                times.append(time.perf_counter() - t)
        mb = np.mean([Path(p).stat().st_size for p in paths]) / 2**20
        print(f"  {name:<24} {pct(times)}   mean file {mb:.2f} MiB")


def heatmap_costs(models, baselines, runs: int) -> None:
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.demo_data import synthetic_radiograph

    base = {Path(b).name: Path(b).stat().st_size for b in baselines or []}
    img = synthetic_radiograph(np.random.default_rng(0), 224, 2)
    print(f"heat map: invoke time, 1 thread, {runs} runs after 5 warm-ups; size against files converted without it")
    for m in models:
        clf = Classifier(m, threads=1, allow_out_of_domain=True)
        if not clf.has_heatmap:
            print(f"  {Path(m).name}: no heat-map signature")
            continue
        for _ in range(5):
            clf.classify(img)
            clf.classify(img, heatmap=True)
        plain = [clf.classify(img).invoke_ms / 1e3 for _ in range(runs)]
        mapped = [clf.classify(img, heatmap=True).invoke_ms / 1e3 for _ in range(runs)]
        size = Path(m).stat().st_size
        grow = f", {size - base[Path(m).name]:+,d} bytes ({size / base[Path(m).name] - 1:+.2%})" if Path(m).name in base else ""
        print(f"  {Path(m).name:<24} without {pct(plain)}\n  {'':<24} with    {pct(mapped)}   file {size:,d} bytes{grow}")
    print(f"  on {platform.machine()} {platform.processor() or ''}, backend {clf.backend.describe()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, help="folder of full-resolution JPEG X-rays")
    ap.add_argument("--models", nargs="*", default=[], help=".tflite files with the heat-map signature")
    ap.add_argument("--baseline", nargs="*", default=[], help="the same variants converted without it")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=100)
    a = ap.parse_args()
    if a.images:
        dicom_costs(a.images, a.repeats)
    if a.models:
        heatmap_costs(a.models, a.baseline, a.runs)


if __name__ == "__main__":
    main()
