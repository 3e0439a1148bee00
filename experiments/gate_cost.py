"""The domain gate's invoke cost, measured fairly: the same model converted with and without the
gate (``lungedge convert RUN`` and ``lungedge convert RUN --no-domain --out RUN-nodomain``),
both loaded in one process on one thread and invoked in alternation on the same input, so that
a busy neighbour or a frequency change touches both alike. Prints p50 per file and the ratio.

    python experiments/gate_cost.py runs/xray runs/xray-nodomain --variant int8 --variant float32 --rounds 400
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gated", type=Path, help="folder with the gated model_VARIANT.tflite files")
    ap.add_argument("plain", type=Path, help="folder with the same variants converted with --no-domain")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()

    from lungedge.edge_runtime.backend import load_backend

    backend = load_backend("auto")
    for v in args.variant:
        interps = []
        for folder in (args.gated, args.plain):
            it = backend.interpreter_class(model_path=str(folder / f"model_{v}.tflite"), num_threads=1)
            it.allocate_tensors()
            d = it.get_input_details()[0]
            x = np.zeros(d["shape"], d["dtype"])
            it.set_tensor(d["index"], x)
            for _ in range(10):
                it.invoke()
            interps.append(it)
        times = [[], []]
        for r in range(args.rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for k in order:
                t = time.perf_counter()
                interps[k].invoke()
                times[k].append(time.perf_counter() - t)
        p50 = [1000 * float(np.median(t)) for t in times]
        print(f"{v:12s} invoke p50 with the gate {p50[0]:.3f} ms, without {p50[1]:.3f} ms: "
              f"{100 * (p50[0] / p50[1] - 1):+.1f} % ({args.rounds} alternating rounds, 1 thread)")


if __name__ == "__main__":
    main()
