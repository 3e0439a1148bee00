"""The polarity check measured through the device path: refusals of a gated file on in-domain
images and on their negatives, with the stage that refused each (score, polarity, frame checks).

Each image is read at full resolution (EXIF orientation applied), inverted or not, and given to
``Classifier.classify`` as an array: what a clinic's negative would be.

Run:  python experiments/polarity.py RUN RUN/model_int8.tflite \\
          [--in dev=../shared/data/chest_xray_test_dev --in fullres=../shared/data/chest_xray_fullres]
The run's test split is always measured; ``--limit`` images per extra set (default 300).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lungedge.edge_runtime.classifier import Classifier, Failure, Refusal
from lungedge.edge_runtime.image_files import expand_inputs


def _pixels(path: str, invert: bool) -> np.ndarray:
    with Image.open(path) as im:
        a = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return 255 - a if invert else a


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--in", dest="inside", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--limit", type=int, default=300)
    a = ap.parse_args(argv)
    data = json.loads((a.run / "metrics.json").read_text())["data"]
    rows = [r for r in csv.DictReader(open(a.run / "split_manifest.csv")) if r["split"] == "test"]
    sets = {"test split": [str(Path(data) / r["path"]) for r in rows]}
    for item in a.inside:
        name, folder = item.split("=", 1)
        sets[name] = [p for p, problem in expand_inputs([folder]) if not problem][: a.limit]
    with Classifier(a.model) as clf:
        print(f"{a.model}: threshold {clf.spec.domain.threshold:.4g}")
        for name, paths in sets.items():
            for invert in (False, True):
                stages: dict = {}
                t0 = time.time()
                for p in paths:
                    r = clf.classify(_pixels(p, invert), name=p)
                    stage = r.verdict.stage if isinstance(r, Refusal) else "failed" if isinstance(r, Failure) else "accepted"
                    stages[stage] = stages.get(stage, 0) + 1
                refused = 1 - stages.get("accepted", 0) / len(paths)
                print(f"{name}{' inverted' if invert else ''}: {len(paths)} images, refused {100 * refused:.2f} % "
                      f"by stage {stages} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
