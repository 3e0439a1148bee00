"""Folder throughput: ``lungedge classify FOLDER`` against a bare pipelined loop (the reference).

    python benchmarks/folder_throughput.py --model runs/xray/model_int8.tflite \\
        --images ../shared/data/chest_xray_fullres --copies 10 [--threads 1] [--repeats 3]

The reference is the least a folder run must do, written without any of the runtime's code:
Pillow opens each file, decodes it in draft mode (DCT scaling) near the model's size, resizes,
converts to the model's colour mode, quantises through a 256-entry table and invokes LiteRT, with
decoding on a thread pool (``--workers``, default 2) overlapping ``invoke`` and a bounded window,
results in input order. It has none of the runtime's checks (file type, size and pixel limits,
EXIF orientation, DICOM, finite outputs), so it is an upper bound.

Measured, each the best of ``--repeats`` on the same images (the folder given, ``--copies`` times):
- reference, sequential and pipelined (images/s, the interpreter loaded once), and the pipelined
  reference as a fresh process, wall clock with start-up (the fair comparison for the command);
- ``Classifier.classify_many`` with ``workers=0`` (one image at a time) and the default workers;
- the command, wall clock including start-up: ``lungedge classify --workers 0`` (today's
  sequential path) and ``lungedge classify`` (default workers).
Targets: the command at least 0.9x the pipelined reference, and at least 1.5x the
sequential command, on 2 cores. Nothing is asserted; the ratios are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def reference_loop(model: str, files: list, threads: int, workers: int, warm: bool = True) -> tuple:
    """The bare loop: (images/s, labels). ``workers`` 0 decodes on the calling thread."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=model, num_threads=threads)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    _, h, w, c = inp["shape"]
    scale, zero = inp["quantization"]
    levels = (np.arange(256, dtype=np.float32) - 127.5) / 127.5  # the -1..1 MobileNetV2 input
    lut = np.clip(np.round(levels / scale + zero), -128, 127).astype(inp["dtype"]) if scale else levels

    def prepare(path):
        with Image.open(path) as img:
            img.draft("L" if img.mode == "L" else "RGB", (w, h))
            img = img.resize((w, h), Image.Resampling.BILINEAR)
            img = img.convert("RGB" if c == 3 else "L")
            return lut[np.asarray(img).reshape(h, w, c)]

    def run(x):
        it.set_tensor(inp["index"], x[None])
        it.invoke()
        return int(np.argmax(it.get_tensor(out["index"])[0]))

    if warm:
        run(prepare(files[0]))  # warm-up (XNNPACK packs weights on the first invoke)
    t0 = time.perf_counter()
    if workers == 0:
        labels = [run(prepare(f)) for f in files]
    else:
        labels, window = [], deque()
        with ThreadPoolExecutor(workers) as pool:
            for f in files:
                window.append(pool.submit(prepare, f))
                if len(window) >= 2 * workers:
                    labels.append(run(window.popleft().result()))
            while window:
                labels.append(run(window.popleft().result()))
    return len(files) / (time.perf_counter() - t0), labels


def reference_process(model: str, folder: str, n: int, threads: int, workers: int) -> float:
    """The reference as a command: a fresh Python that imports LiteRT, loads the model and runs the
    loop over the folder; wall clock including start-up, like the command's."""
    code = ("import sys; sys.path.insert(0, %r); from folder_throughput import reference_loop, _files; "
            "f = _files(%r); print(len(reference_loop(%r, f, %d, %d, warm=False)[1]))"
            % (str(Path(__file__).parent), folder, model, threads, workers))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0 or proc.stdout.strip() != str(n):
        sys.exit(f"error: the reference process failed: {proc.stderr[-500:]}")
    return n / dt


def _files(folder: str) -> list:
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())


def api_loop(model: str, files: list, threads: int, workers) -> float:
    from lungedge import Classifier

    with Classifier.from_file(model, threads=threads) as clf:
        clf.classify(files[0])
        t0 = time.perf_counter()
        n = sum(1 for _ in clf.classify_many(files, workers=workers))
        return n / (time.perf_counter() - t0)


def command(model: str, folder: str, n: int, threads: int, workers) -> float:
    exe = shutil.which("lungedge") or str(Path(sys.executable).with_name("lungedge"))
    args = [exe, "-q", "classify", "--json", "--no-guard", "--threads", str(threads), "-m", model, folder]
    if workers is not None:
        args += ["--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    got = sum(1 for line in proc.stdout.splitlines() if line.startswith("{"))
    if proc.returncode != 0 or got != n:
        sys.exit(f"error: the command failed ({proc.returncode}, {got}/{n} results): {proc.stderr[-500:]}")
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    ap.add_argument("--copies", type=int, default=10, help="the folder this many times (default 10)")
    ap.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    ap.add_argument("--workers", type=int, default=2, help="the reference's decoding threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    src = sorted(p for p in Path(a.images).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.copies):
            for p in src:
                dst = Path(tmp, f"{k:02d}", p.relative_to(a.images))
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)
        files = _files(tmp)
        n = len(files)

        def best(fn):
            return max(fn() for _ in range(a.repeats))

        seq_ref, labels_seq = reference_loop(a.model, files, a.threads, 0)
        rows = {
            "reference, sequential": best(lambda: reference_loop(a.model, files, a.threads, 0)[0]),
            f"reference, pipelined ({a.workers} workers)": best(lambda: reference_loop(a.model, files, a.threads, a.workers)[0]),
            f"reference as a process ({a.workers} workers, wall, with start-up)":
                best(lambda: reference_process(a.model, tmp, n, a.threads, a.workers)),
            "Classifier.classify_many(workers=0)": best(lambda: api_loop(a.model, files, a.threads, 0)),
            "Classifier.classify_many() (default workers)": best(lambda: api_loop(a.model, files, a.threads, None)),
            "lungedge classify --workers 0 (wall, with start-up)": best(lambda: command(a.model, tmp, n, a.threads, 0)),
            "lungedge classify (wall, with start-up)": best(lambda: command(a.model, tmp, n, a.threads, None)),
        }
    from lungedge.edge_runtime.batch import default_workers
    from lungedge.edge_runtime.timing import machine_info

    m = machine_info()
    print(f"{n} images, model {a.model}, {a.threads} interpreter thread(s), best of {a.repeats}; "
          f"{m.get('cpu')}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"default workers {default_workers()}")
    for name, ips in rows.items():
        print(f"  {name:<55} {ips:7.1f} images/s")
    ref = rows[f"reference, pipelined ({a.workers} workers)"]
    ref_proc = rows[f"reference as a process ({a.workers} workers, wall, with start-up)"]
    cmd, cmd_seq = rows["lungedge classify (wall, with start-up)"], rows["lungedge classify --workers 0 (wall, with start-up)"]
    print(f"  command / pipelined reference as a process: {cmd / ref_proc:.2f}x (target >= 0.9)")
    print(f"  pipelined / sequential reference: {ref / rows['reference, sequential']:.2f}x (what overlap can give here)")
    print(f"  command / sequential command:  {cmd / cmd_seq:.2f}x (target >= 1.5)")
    print(f"  API (default workers) / pipelined reference: {rows['Classifier.classify_many() (default workers)'] / ref:.2f}x")


if __name__ == "__main__":
    main()
