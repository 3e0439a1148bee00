"""Measure the runtime's performance targets (foundation and benchmark issues) and say PASS/MISS.

No TensorFlow needed. Targets:

1. ``Classifier.classify`` of an already-decoded array at the model's size costs at most 1.10x
   the bare ``interpreter.invoke()`` of the same model (p50, 1 thread), float32 and int8.
2. Decode + preprocess of the full-resolution X-ray JPEGs: at most 2x the int8 invoke time at
   1 thread (p50 over rounds cycling through all images; max also reported).
3. ``lungedge classify`` of one image in a cold process: wall time at most 2x and peak RSS at
   most 1.5x a bare Python script that only imports LiteRT, loads the same model and invokes
   it once (medians of several alternating runs).
4. int8 invoke latency at most 0.6x float32 (LiteRT, 1 thread).

Also reported: float32 achieved GFLOP/s at 1 thread (``--gflop-per-image``, about 0.6 for
MobileNetV2 224) next to the CPU's peak under a stated assumption.

Run::

    python benchmarks/targets.py --float32 M/model_float32.tflite --int8 M/model_int8.tflite \
        --images ../shared/data/chest_xray_fullres --runs 200 --out targets.json

Exit code 0 if every target passed, 1 if any missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lungedge.edge_runtime.bench import bench_model  # noqa: E402
from lungedge.edge_runtime.timing import machine_info  # noqa: E402

BARE_SCRIPT = (
    "import sys\n"
    "from ai_edge_litert.interpreter import Interpreter\n"
    "it = Interpreter(model_path=sys.argv[1])\n"
    "it.allocate_tensors()\n"
    "it.invoke()\n"
)


# Runs in a fresh, small Python process: Linux counts the parent's RSS at fork into a child's
# ru_maxrss (Python's subprocess uses vfork), so measuring from this process, which has models
# loaded, would report its own RSS for small children.
_LAUNCHER = r"""
import json, os, subprocess, sys, time
cmds, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {name: {"wall_ms": [], "peak_rss_mb": []} for name in cmds}
for i in range(repeats + 1):
    for name, cmd in cmds.items():  # alternate, so drift hits both alike
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{' '.join(cmd)} failed: {err[-1:] }")
        if i:  # the first round warms the page cache
            out[name]["wall_ms"].append(wall * 1e3)
            out[name]["peak_rss_mb"].append(usage.ru_maxrss / 1024)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
out["launcher_peak_rss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else None  # floor of the children's ru_maxrss
print(json.dumps(out))
"""


def _cold(cmds: dict, repeats: int) -> dict:
    """Median wall time and peak RSS of each command, run ``repeats`` times alternately."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, json.dumps(cmds), str(repeats)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "cold launcher failed")
    raw = json.loads(proc.stdout)
    floor = raw.pop("launcher_peak_rss_mb")
    out = {name: {**r, "wall_ms_median": statistics.median(r["wall_ms"]),
                  "peak_rss_mb_median": statistics.median(r["peak_rss_mb"])} for name, r in raw.items()}
    out["launcher_peak_rss_mb"] = floor
    return out


def _lungedge_cmd() -> list:
    exe = Path(sys.executable).parent / "lungedge"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "lungedge.cli"]


def peak_gflops(clock_ghz=None) -> dict:
    """Peak FP32 GFLOP/s of one core from /proc/cpuinfo, with the assumption stated."""
    flags, mhz, vendor, family = set(), None, "", None
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(val.split())
            elif key == "cpu MHz" and mhz is None:
                mhz = float(val)
            elif key == "vendor_id" and not vendor:
                vendor = val.strip()
            elif key == "cpu family" and family is None:
                family = int(val)
    except OSError:
        return {"assumption": "unknown CPU (no /proc/cpuinfo)", "gflops": None}
    if "avx512f" in flags and vendor == "AuthenticAMD" and family == 25:
        per_cycle, why = 32, "AMD Zen 4 (family 25 with AVX-512): 2 FMA pipes of 256 bits, AVX-512 double-pumped = 32 FP32 FLOP/cycle"
    elif "avx512f" in flags:
        per_cycle, why = 64, "AVX-512 with 2x 512-bit FMA units = 64 FP32 FLOP/cycle (some CPUs have only one)"
    elif "fma" in flags and "avx2" in flags:
        per_cycle, why = 32, "AVX2: 2x 256-bit FMA units = 32 FP32 FLOP/cycle"
    else:
        per_cycle, why = 8, "SSE: 8 FP32 FLOP/cycle"
    if clock_ghz:
        ghz, clock = clock_ghz, f"clock {clock_ghz:.2f} GHz as given (--clock-ghz)"
    else:
        ghz = (mhz or 0) / 1e3
        clock = f"clock = /proc/cpuinfo 'cpu MHz' ({ghz:.2f} GHz, nominal; boost may be higher)"
    return {"flop_per_cycle": per_cycle, "clock_ghz": ghz, "gflops": per_cycle * ghz, "assumption": f"{why}; {clock}"}


_SGEMM = r"""
import time, numpy as np
n = 2048
a = np.random.default_rng(0).random((n, n), dtype=np.float32)
b = a.copy()
a @ b
best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
print(2 * n ** 3 / best / 1e9)
"""


def sgemm_gflops() -> float:
    """numpy's float32 matmul (OpenBLAS) on one thread: a measured near-peak reference."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _SGEMM], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return float(out.stdout.strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--float32", required=True, help="float32 .tflite (MobileNetV2 224)")
    ap.add_argument("--int8", required=True, help="full-integer int8 .tflite of the same model")
    ap.add_argument("--images", required=True, help="folder of full-resolution JPEGs")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--cold-repeats", type=int, default=7)
    ap.add_argument("--gflop-per-image", type=float, default=0.6)
    ap.add_argument("--backend", default="litert")
    ap.add_argument("--clock-ghz", type=float, default=None,
                    help="clock for the peak estimate (default: /proc/cpuinfo 'cpu MHz', the nominal clock)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    res = {}
    for name in ("float32", "int8"):
        r = bench_model(getattr(args, name), images=[args.images], threads=[1], runs=args.runs, warmup=args.warmup,
                        backend=args.backend)
        if r["status"] != "ok":
            print(f"error: {name}: {r['error']}", file=sys.stderr)
            return 1
        res[name] = r["runs"][0]
    one_image = sorted(Path(args.images).rglob("*.jp*g"))[0]
    cold = _cold({"lungedge_classify": _lungedge_cmd() + ["classify", "--model", args.int8, str(one_image)],
                  "bare_litert": [sys.executable, "-c", BARE_SCRIPT, args.int8]}, args.cold_repeats)
    peak = peak_gflops(args.clock_ghz)
    sgemm = sgemm_gflops()
    f32_inv = res["float32"]["invoke"]["p50_ms"]
    achieved = args.gflop_per_image / (f32_inv / 1e3)
    i8 = res["int8"]
    rows = []

    def target(name, value, limit, detail):
        rows.append({"target": name, "value": value, "limit": limit, "pass": value <= limit, "detail": detail})

    for name in ("float32", "int8"):
        r = res[name]
        target(f"classify(decoded array) / invoke, {name}, p50", r["classify_decoded"]["p50_ms"] / r["invoke"]["p50_ms"],
               1.10, f"{r['classify_decoded']['p50_ms']:.3f} ms / {r['invoke']['p50_ms']:.3f} ms")
    target("decode+preprocess (full-res JPEG) / int8 invoke, p50", i8["preprocess"]["p50_ms"] / i8["invoke"]["p50_ms"], 2.0,
           f"{i8['preprocess']['p50_ms']:.2f} ms (p90 {i8['preprocess']['p90_ms']:.2f}, max {i8['preprocess']['max_ms']:.2f})"
           f" / {i8['invoke']['p50_ms']:.3f} ms")
    lc, bare = cold["lungedge_classify"], cold["bare_litert"]
    target("cold `lungedge classify` wall / bare script", lc["wall_ms_median"] / bare["wall_ms_median"], 2.0,
           f"{lc['wall_ms_median']:.0f} ms / {bare['wall_ms_median']:.0f} ms")
    target("cold `lungedge classify` peak RSS / bare script", lc["peak_rss_mb_median"] / bare["peak_rss_mb_median"], 1.5,
           f"{lc['peak_rss_mb_median']:.0f} MB / {bare['peak_rss_mb_median']:.0f} MB")
    target("int8 / float32 invoke, 1 thread, p50", i8["invoke"]["p50_ms"] / f32_inv, 0.6,
           f"{i8['invoke']['p50_ms']:.3f} ms / {f32_inv:.3f} ms")
    out = {"machine": machine_info(), "load_avg": {"before": load_before, "after": os.getloadavg()},
           "models": {"float32": args.float32, "int8": args.int8}, "backend": args.backend,
           "runs": args.runs, "targets": rows, "cold": cold,
           "gflops": {"achieved_float32_1thread": achieved, "gflop_per_image": args.gflop_per_image,
                      "peak": peak, "fraction_of_peak": achieved / peak["gflops"] if peak.get("gflops") else None,
                      "sgemm_1thread_gflops": sgemm, "fraction_of_sgemm": achieved / sgemm},
           "timings": res}
    for r in rows:
        print(f"{'PASS' if r['pass'] else 'MISS'}  {r['target']}: {r['value']:.3f} (limit {r['limit']})  [{r['detail']}]")
    g = out["gflops"]
    print(f"float32 1 thread: {achieved:.1f} GFLOP/s ({args.gflop_per_image} GFLOP/image / {f32_inv:.3f} ms); peak "
          f"{peak.get('gflops') or float('nan'):.1f} GFLOP/s -> {g['fraction_of_peak'] or float('nan'):.2f} of peak. "
          f"Assumption: {peak['assumption']}. Measured numpy sgemm 2048^3 at 1 thread: {sgemm:.1f} GFLOP/s "
          f"-> {achieved / sgemm:.2f} of it.")
    print(f"load average before {load_before}, after {out['load_avg']['after']}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
