"""What the device path's checks cost: load stages, cold start, per-image time.

    python benchmarks/device_check_costs.py stages MODEL.tflite [...]
    python benchmarks/device_check_costs.py cold CHECKOUT MODEL.tflite [RUNS] [-- extra classify options]
    python benchmarks/device_check_costs.py many CHECKOUT MODEL.tflite [--no-guard]

``cold`` and ``many`` take a checkout folder, so one version can be compared with another (e.g. a
worktree of an older commit). Images come from ``$LUNGEDGE_SHARED/data/chest_xray_fullres``
(default ``../shared`` beside this repository).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("LUNGEDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
IMAGES = SHARED / "data" / "chest_xray_fullres"


def _median_ms(fn, n: int = 30) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(ts), 2)


def stages(models) -> dict:
    from lungedge.edge_runtime.backend import load_backend
    from lungedge.edge_runtime.load_guard import trial_load
    from lungedge.edge_runtime.metadata import read_model_bytes, read_spec, verify_integrity
    from lungedge.edge_runtime.modelcheck import check_model_structure

    be = load_backend("auto")
    out = {}
    for path in models:
        data = read_model_bytes(path)

        def plain_load():
            it = be.interpreter_class(model_content=data, num_threads=1)
            it.allocate_tensors()
            it.invoke()

        out[Path(path).name] = {
            "size_MB": round(len(data) / 1e6, 2),
            "read_ms": _median_ms(lambda: read_model_bytes(path)),
            "structure_check_ms": _median_ms(lambda: check_model_structure(data)),
            "integrity_verify_ms": _median_ms(lambda: verify_integrity(data)),
            "plain_sha256_ms": _median_ms(lambda: hashlib.sha256(data).hexdigest()),
            "read_spec_ms": _median_ms(lambda: read_spec(data)),
            "guard_trial_load_ms": _median_ms(lambda: trial_load(data, be.interpreter_class, 1, "m"), 10),
            "in_process_load_alloc_invoke_ms": _median_ms(plain_load, 10),
        }
    return out


def cold(code: str, model: str, n: int, extra) -> dict:
    img = sorted(glob.glob(str(IMAGES / "NORMAL" / "*.jpeg")))[0]
    env = dict(os.environ, PYTHONPATH=code)
    ts = []
    for i in range(n + 1):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "lungedge.cli", "classify", "--model", model, img, *extra],
                           cwd=code, env=env, capture_output=True)
        if i:
            ts.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(r.stderr.decode(errors="replace")[-500:])
    return {"code": code, "model": Path(model).name, "extra": list(extra),
            "median_s": round(statistics.median(ts), 4), "min_s": round(min(ts), 4)}


def many(code: str, model: str, no_guard: bool) -> dict:
    sys.path.insert(0, code)
    from lungedge.edge_runtime import Classifier

    imgs = sorted(glob.glob(str(IMAGES / "*" / "*.jpeg")))
    t = time.perf_counter()
    clf = Classifier(model, threads=1, allow_out_of_domain=True, **({"guard": False} if no_guard else {}))
    load = time.perf_counter() - t
    list(clf.classify_many(imgs[:4]))
    per = []
    for _ in range(5):
        t = time.perf_counter()
        res = list(clf.classify_many(imgs))
        per.append((time.perf_counter() - t) / len(imgs) * 1e3)
    if not all(hasattr(r, "label") for r in res):
        raise SystemExit("an image failed")
    return {"code": code, "load_ms": round(load * 1e3, 1), "per_image_ms_median": round(statistics.median(per), 3)}


def main(argv) -> int:
    if not argv or argv[0] not in ("stages", "cold", "many"):
        print(__doc__)
        return 2
    if argv[0] == "stages":
        print(json.dumps(stages(argv[1:]), indent=1))
    elif argv[0] == "cold":
        rest = argv[1:]
        extra = rest[rest.index("--") + 1:] if "--" in rest else []
        rest = rest[:rest.index("--")] if "--" in rest else rest
        print(json.dumps(cold(rest[0], rest[1], int(rest[2]) if len(rest) > 2 else 10, extra)))
    else:
        print(json.dumps(many(argv[1], argv[2], "--no-guard" in argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
