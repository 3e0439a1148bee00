"""Training memory against data-set size: peak RSS of a short training on generated images.

    python benchmarks/training_memory.py --sizes 1000,5000,20000 --cache-mb 32 [--image-size 64]

For each size, generates that many synthetic radiographs (two classes, ``lungedge.demo_data``)
and runs ``lungedge train --recipe demo-scratch --epochs 1 --cache-mb B`` under
``/usr/bin/time -v``; prints peak RSS (maximum resident set size), wall time and where each split
was cached (metrics.json ``image_cache``). Target: flat within 10 % from 5,000 to 20,000
images once past the budget. The budget is set small here so that a few thousand small images
pass it; the default (2048 MB) works the same way at ChestX-ray14 scale.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--cache-mb", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--keep", default=None, help="keep the generated images and runs here")
    a = ap.parse_args()
    from lungedge.demo_data import make_demo_dataset

    exe = shutil.which("lungedge") or str(Path(sys.executable).with_name("lungedge"))
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="lungedge-trainmem-"))
    rows = []
    for n in (int(x) for x in a.sizes.split(",")):
        data = root / f"data{n}"
        if not data.exists():
            t0 = time.perf_counter()
            make_demo_dataset(str(data), per_class=n // 2, size=a.image_size, seed=1)
            print(f"generated {n} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out = root / f"run{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", exe, "-q", "train", "--recipe", "demo-scratch", "--epochs", "1",
                               "--image-size", str(a.image_size), "--cache-mb", str(a.cache_mb), "--data", str(data),
                               "--out", str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
        if proc.returncode not in (0, 1) or not rss or not metrics:
            sys.exit(f"error: training on {n} images failed: {proc.stderr[-800:]}")
        rows.append((n, int(rss.group(1)) / 1024, wall, metrics.get("image_cache")))
        print(f"{n:>6} images: peak RSS {rows[-1][1]:7.0f} MB, {wall:5.0f} s, cache {rows[-1][3]}", flush=True)
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    big = [r for r in rows if r[0] >= 5000]
    if len(big) >= 2:
        print(f"peak RSS {big[-1][0]} vs {big[0][0]} images: {big[-1][1] / big[0][1]:.3f}x (target within 1.10x)")


if __name__ == "__main__":
    main()
